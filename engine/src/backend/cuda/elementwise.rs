//! Launches for `cuda/elementwise.cu`.

use super::{bf16_of, bf16_tensor, elementwise_config, expect_shape, i32_arg, CudaBackend, T};
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

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
    map(b, name, kernel, x)
}

/// ReLU, the perceptual metrics' activation (forward only: nothing trains through it).
pub(super) fn relu(b: &CudaBackend, x: &T) -> Result<T> {
    map(b, "relu", "relu_bf16", x)
}

/// `y = f(x)` by the elementwise `kernel` of `cuda/elementwise.cu`.
fn map(b: &CudaBackend, name: &'static str, kernel: &'static str, x: &T) -> Result<T> {
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

#[derive(Clone, Copy)]
pub(super) enum Binary {
    Add,
    Mul,
}

/// `a + b` or `a * b` elementwise over two tensors of one shape.
pub(super) fn binary(b: &CudaBackend, op: Binary, x: &T, y: &T) -> Result<T> {
    let (name, kernel) = match op {
        Binary::Add => ("add", "add_bf16"),
        Binary::Mul => ("mul", "mul_bf16"),
    };
    expect_shape("b", name, y.shape(), x.shape())?;
    let (xs, ys) = (bf16_of(name, "a", x)?, bf16_of(name, "b", y)?);
    let n = x.elem_count();
    let mut out = b.alloc_bf16(n)?;
    let (cfg, vec8) = vectorised(n);
    let f = b.function("elementwise", kernel)?;
    let n32 = i32_arg(name, n)?;
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

// ---- Training backward -------------------------------------------------------------------------

/// `gx = gy * f'(x)` for the unary `op`, given its forward input x.
pub(super) fn unary_backward(b: &CudaBackend, op: Unary, x: &T, gy: &T) -> Result<T> {
    let (name, kernel) = match op {
        Unary::GeluTanh => ("gelu_tanh_backward", "gelu_tanh_backward_bf16"),
        Unary::Silu => ("silu_backward", "silu_backward_bf16"),
    };
    expect_shape("output gradient", name, gy.shape(), x.shape())?;
    let (xs, gys) = (bf16_of(name, "x", x)?, bf16_of(name, "output gradient", gy)?);
    let n = x.elem_count();
    let mut gx = b.alloc_bf16(n)?;
    let (cfg, vec8) = vectorised(n);
    let f = b.function("elementwise", kernel)?;
    let n32 = i32_arg(name, n)?;
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(gys).arg(&mut gx).arg(&n32).arg(&vec8);
    // SAFETY: x, gy and gx hold n elements.
    unsafe { l.launch(cfg) }?;
    Ok(bf16_tensor(gx, x.shape().to_vec()))
}

/// The branch gradient of `gated_residual`: `gate * gy`.
pub(super) fn gated_residual_backward(b: &CudaBackend, gy: &T, gate: &T) -> Result<T> {
    let op = "gated_residual_backward";
    ensure!(gy.rank() == 3, "{op}: output gradient has shape {:?}, expected [batch, tokens, dim]", gy.shape());
    let (batch, tokens, dim) = (gy.dim(0), gy.dim(1), gy.dim(2));
    expect_shape("gate", op, gate.shape(), &[batch, dim])?;
    let (gys, gs) = (bf16_of(op, "output gradient", gy)?, bf16_of(op, "gate", gate)?);
    let n = gy.elem_count();
    let mut out = b.alloc_bf16(n)?;
    let (cfg, vec8) = if dim % 8 == 0 { vectorised(n) } else { (elementwise_config(n), 0) };
    let f = b.function("elementwise", "gated_residual_backward_bf16")?;
    let (t32, d32, n32) = (i32_arg(op, tokens)?, i32_arg(op, dim)?, i32_arg(op, n)?);
    let mut l = b.stream().launch_builder(&f);
    l.arg(gys).arg(gs).arg(&mut out).arg(&t32).arg(&d32).arg(&n32).arg(&vec8);
    // SAFETY: gy and out hold batch*tokens*dim elements, gate batch*dim.
    unsafe { l.launch(cfg) }?;
    Ok(bf16_tensor(out, gy.shape().to_vec()))
}

/// The gate gradient of `gated_residual`: `sum_l gy * y` per sample, `[B, D]`.
pub(super) fn gated_residual_backward_gate(b: &CudaBackend, gy: &T, y: &T) -> Result<T> {
    let op = "gated_residual_backward_gate";
    ensure!(gy.rank() == 3, "{op}: output gradient has shape {:?}, expected [batch, tokens, dim]", gy.shape());
    expect_shape("branch", op, y.shape(), gy.shape())?;
    let (batch, tokens, dim) = (gy.dim(0), gy.dim(1), gy.dim(2));
    let (gys, ys) = (bf16_of(op, "output gradient", gy)?, bf16_of(op, "branch", y)?);
    let g_gate = token_sums::<bf16>(b, op, gys, Some(ys), batch, tokens, dim)?;
    Ok(bf16_tensor(g_gate, vec![batch, dim]))
}

/// The output element of `token_sum_product_*` (cuda/elementwise.cu): bf16 for activation
/// gradients, f32 for parameter gradients.
pub(super) trait TokenSumOut: cudarc::driver::DeviceRepr {
    const KERNEL: &'static str;
}

impl TokenSumOut for bf16 {
    const KERNEL: &'static str = "token_sum_product_bf16";
}

impl TokenSumOut for f32 {
    const KERNEL: &'static str = "token_sum_product_f32";
}

/// The launch of a per-sample sum over tokens (`cuda/reduce.cuh`): a 256-thread block per strip
/// of 32 columns and sample.
pub(super) fn token_sum_config(samples: usize, dim: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (dim.div_ceil(32) as u32, samples as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// `sum_l a[s, l, c] (* weights[s, l, c])` for a (and weights) `[samples, tokens, dim]`:
/// `[samples, dim]`.
pub(super) fn token_sums<E: TokenSumOut>(
    b: &CudaBackend,
    op: &str,
    a: &CudaSlice<bf16>,
    weights: Option<&CudaSlice<bf16>>,
    samples: usize,
    tokens: usize,
    dim: usize,
) -> Result<CudaSlice<E>> {
    let mut out = b.alloc::<E>(samples * dim)?;
    if samples * dim == 0 {
        return Ok(out);
    }
    ensure!(samples <= 65_535, "{op}: {samples} samples exceed the 65,535 one launch covers");
    i32_arg(op, samples * tokens * dim)?;
    let (t32, d32) = (i32_arg(op, tokens)?, i32_arg(op, dim)?);
    let f = b.function("elementwise", E::KERNEL)?;
    let no_weights = 0u64; // a null pointer: the kernel sums `a` alone
    let mut l = b.stream().launch_builder(&f);
    l.arg(a);
    match weights {
        Some(w) => l.arg(w),
        None => l.arg(&no_weights),
    };
    l.arg(&mut out).arg(&t32).arg(&d32);
    // SAFETY: a (and weights) hold samples*tokens*dim elements, out samples*dim; the grid covers
    // every (column, sample) once and the kernel guards columns past dim.
    unsafe { l.launch(token_sum_config(samples, dim)) }?;
    Ok(out)
}
