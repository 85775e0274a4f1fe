//! Launches for `cuda/elementwise.cu`.

use super::{bf16_of, bf16_tensor, elementwise_config, expect_shape, i32_arg, CudaBackend, T};
use anyhow::{ensure, Result};
use cudarc::driver::PushKernelArg;

/// The launch for `n` elements: 8 per thread when `n % 8 == 0` (16-byte accesses), else 1.
fn vectorised(n: usize) -> (cudarc::driver::LaunchConfig, i32) {
    if n % 8 == 0 {
        (elementwise_config(n / 8), 1)
    } else {
        (elementwise_config(n), 0)
    }
}

#[derive(Clone, Copy)]
pub(super) enum Unary {
    GeluTanh,
    Silu,
}

pub(super) fn unary(b: &CudaBackend, op: Unary, x: &T) -> Result<T> {
    let (name, kernel) = match op {
        Unary::GeluTanh => ("gelu_tanh", "gelu_tanh_bf16"),
        Unary::Silu => ("silu", "silu_bf16"),
    };
    let xs = bf16_of(name, "x", x)?;
    let n = x.elem_count();
    let mut y = b.alloc_bf16(n)?;
    let (cfg, vec8) = vectorised(n);
    let f = b.function("elementwise", kernel)?;
    let n32 = i32_arg(name, n)?;
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(&mut y).arg(&n32).arg(&vec8);
    // SAFETY: x and y hold n elements; the kernel writes each of y's once.
    unsafe { l.launch(cfg) }?;
    Ok(bf16_tensor(y, x.shape().to_vec()))
}

pub(super) fn add(b: &CudaBackend, x: &T, y: &T) -> Result<T> {
    expect_shape("b", "add", y.shape(), x.shape())?;
    let (xs, ys) = (bf16_of("add", "a", x)?, bf16_of("add", "b", y)?);
    let n = x.elem_count();
    let mut out = b.alloc_bf16(n)?;
    let (cfg, vec8) = vectorised(n);
    let f = b.function("elementwise", "add_bf16")?;
    let n32 = i32_arg("add", n)?;
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(ys).arg(&mut out).arg(&n32).arg(&vec8);
    // SAFETY: all three buffers hold n elements.
    unsafe { l.launch(cfg) }?;
    Ok(bf16_tensor(out, x.shape().to_vec()))
}

pub(super) fn affine(b: &CudaBackend, x: &T, scale: f32, offset: f32) -> Result<T> {
    let xs = bf16_of("affine", "x", x)?;
    let n = x.elem_count();
    let mut out = b.alloc_bf16(n)?;
    let (cfg, vec8) = vectorised(n);
    let f = b.function("elementwise", "affine_bf16")?;
    let n32 = i32_arg("affine", n)?;
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(&mut out).arg(&scale).arg(&offset).arg(&n32).arg(&vec8);
    // SAFETY: x and out hold n elements.
    unsafe { l.launch(cfg) }?;
    Ok(bf16_tensor(out, x.shape().to_vec()))
}

pub(super) fn gated_residual(b: &CudaBackend, x: &T, gate: &T, y: &T) -> Result<T> {
    let op = "gated_residual";
    ensure!(x.rank() == 3, "{op}: x has shape {:?}, expected [batch, tokens, dim]", x.shape());
    let (batch, tokens, dim) = (x.dim(0), x.dim(1), x.dim(2));
    expect_shape("y", op, y.shape(), x.shape())?;
    expect_shape("gate", op, gate.shape(), &[batch, dim])?;
    let (xs, gs, ys) = (bf16_of(op, "x", x)?, bf16_of(op, "gate", gate)?, bf16_of(op, "y", y)?);
    let n = x.elem_count();
    let mut out = b.alloc_bf16(n)?;
    // Groups of 8 must not straddle rows, which dim % 8 == 0 guarantees.
    let (cfg, vec8) = if dim % 8 == 0 { vectorised(n) } else { (elementwise_config(n), 0) };
    let f = b.function("elementwise", "gated_residual_bf16")?;
    let (t32, d32, n32) = (i32_arg(op, tokens)?, i32_arg(op, dim)?, i32_arg(op, n)?);
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(gs).arg(ys).arg(&mut out).arg(&t32).arg(&d32).arg(&n32).arg(&vec8);
    // SAFETY: x, y, out hold batch*tokens*dim elements, gate batch*dim.
    unsafe { l.launch(cfg) }?;
    Ok(bf16_tensor(out, x.shape().to_vec()))
}
