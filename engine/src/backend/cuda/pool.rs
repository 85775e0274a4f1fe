//! Launches for `cuda/pool.cu`: max pooling and the depthwise blur / L2 pooling of the
//! perceptual metrics' feature networks. Shape checks and messages are the CPU backend's
//! (`shapes::PoolGeometry`).

use super::{bf16_of, bf16_tensor, elementwise_config, i32_arg, CudaBackend, T};
use crate::backend::shapes::PoolGeometry;
use anyhow::Result;
use cudarc::driver::PushKernelArg;

pub(super) fn max_pool2d(b: &CudaBackend, x: &T, kernel: usize, stride: usize) -> Result<T> {
    let op = "max_pool2d";
    let g = PoolGeometry::max_pool(x.shape(), kernel, stride)?;
    let xs = bf16_of(op, "x", x)?;
    let n = g.batch * g.channels * g.oh * g.ow;
    let mut out = b.alloc_bf16(n)?;
    if n == 0 {
        return Ok(bf16_tensor(out, g.out_shape()));
    }
    i32_arg(op, g.h * g.w)?; // a plane's offset inside it is computed in int
    let args = [g.h, g.w, kernel, stride, g.oh, g.ow, n].map(|v| i32_arg(op, v)).into_iter().collect::<Result<Vec<_>>>()?;
    let f = b.function("pool", "max_pool2d_bf16")?;
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(&mut out);
    for a in &args {
        l.arg(a);
    }
    // SAFETY: x holds B C H W elements and every window lies inside its plane (PoolGeometry);
    // out holds n elements, one written per thread.
    unsafe { l.launch(elementwise_config(n)) }?;
    Ok(bf16_tensor(out, g.out_shape()))
}

/// `blur_pool2d` (reflection padding) or, with `l2`, `l2_pool2d` (zero padding, squares, root).
pub(super) fn depthwise_pool2d(b: &CudaBackend, x: &T, filter: &T, stride: usize, pad: [usize; 4], l2: bool) -> Result<T> {
    let op = if l2 { "l2_pool2d" } else { "blur_pool2d" };
    let g = PoolGeometry::depthwise(op, x.shape(), filter.shape(), stride, pad, !l2)?;
    let (xs, fs) = (bf16_of(op, "x", x)?, bf16_of(op, "filter", filter)?);
    let n = g.batch * g.channels * g.oh * g.ow;
    let mut out = b.alloc_bf16(n)?;
    if n == 0 {
        return Ok(bf16_tensor(out, g.out_shape()));
    }
    i32_arg(op, g.h * g.w)?;
    let sizes = [g.channels, g.h, g.w, g.kernel, stride, pad[0], pad[2], g.oh, g.ow, n];
    let args = sizes.map(|v| i32_arg(op, v)).into_iter().collect::<Result<Vec<_>>>()?;
    let l2_flag = i32::from(l2);
    let f = b.function("pool", "depthwise_pool2d_bf16")?;
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(fs).arg(&mut out);
    for a in &args {
        l.arg(a);
    }
    l.arg(&l2_flag);
    // SAFETY: x holds B C H W elements, filter C k k; taps outside the plane are reflected back
    // into it (the padding is smaller than the side, PoolGeometry) or read as zero; out holds n
    // elements, one written per thread.
    unsafe { l.launch(elementwise_config(n)) }?;
    Ok(bf16_tensor(out, g.out_shape()))
}
