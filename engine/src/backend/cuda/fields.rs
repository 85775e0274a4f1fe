//! Launches for `cuda/fields.cu`: casts between bf16 activations and f32 fields, the per-item
//! linear combination of f32 fields, and per-item dot products.

use super::{f32_of, i32_arg, CudaBackend, CudaStorage, T};
use crate::backend::expect_shape;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use loaders::DType;

const THREADS: u32 = 256;
const DOT_THREADS: u32 = 1024;

/// A grid-strided launch over `n` elements.
fn strided(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(THREADS as usize).clamp(1, 65_535) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

pub(super) fn cast(b: &CudaBackend, x: &T, dtype: DType) -> Result<T> {
    let n = x.elem_count() as i64;
    let storage = match (x.storage(), dtype) {
        (CudaStorage::BF16(s), DType::F32) => {
            let mut out = b.alloc::<f32>(n as usize)?;
            let f = b.function("fields", "cast_bf16_to_f32")?;
            let mut l = b.stream().launch_builder(&f);
            l.arg(s).arg(&mut out).arg(&n);
            // SAFETY: both buffers hold n elements; each of out's is written once.
            unsafe { l.launch(strided(n as usize)) }?;
            CudaStorage::F32(out)
        }
        (CudaStorage::F32(s), DType::BF16) => {
            let mut out = b.alloc::<half::bf16>(n as usize)?;
            let f = b.function("fields", "cast_f32_to_bf16")?;
            let mut l = b.stream().launch_builder(&f);
            l.arg(s).arg(&mut out).arg(&n);
            // SAFETY: both buffers hold n elements; each of out's is written once.
            unsafe { l.launch(strided(n as usize)) }?;
            CudaStorage::BF16(out)
        }
        (CudaStorage::F32(s), DType::F32) => CudaStorage::F32(b.stream().clone_dtod(s)?),
        (CudaStorage::BF16(s), DType::BF16) => CudaStorage::BF16(b.stream().clone_dtod(s)?),
        (other, _) => bail!("cast: no kernel from {} to {dtype}", other.dtype()),
    };
    Ok(Tensor::from_storage(storage, x.shape().to_vec()))
}

/// The items of a field batch (its first dimension) and the values of each.
fn items(op: &str, x: &T) -> Result<(usize, usize)> {
    ensure!(x.rank() >= 1 && x.dim(0) > 0 && x.elem_count() > 0, "{op}: x has shape {:?}, expected [items, ...]", x.shape());
    Ok((x.dim(0), x.elem_count() / x.dim(0)))
}

/// Per-item coefficients on the device: one per item, or one for all.
fn coefficients(b: &CudaBackend, op: &str, what: &str, c: &[f32], items: usize) -> Result<(CudaSlice<f32>, i32)> {
    ensure!(c.len() == 1 || c.len() == items, "{op}: {what} has {} coefficients for {items} items (one per item, or one for all)", c.len());
    b.transfers.up(4 * c.len());
    Ok((b.stream().clone_htod(c)?, i32_arg(op, c.len())?))
}

pub(super) fn axpby(b: &CudaBackend, a: &[f32], x: &T, c: &[f32], y: &T) -> Result<T> {
    const OP: &str = "axpby";
    expect_shape("y", OP, y.shape(), x.shape())?;
    let (n_items, per_item) = items(OP, x)?;
    let (xs, ys) = (f32_of(OP, "x", x)?, f32_of(OP, "y", y)?);
    let ((a_dev, a_len), (c_dev, c_len)) = (coefficients(b, OP, "a", a, n_items)?, coefficients(b, OP, "b", c, n_items)?);
    let n = x.elem_count();
    let mut out = b.alloc::<f32>(n)?;
    let (per_item64, n64) = (per_item as i64, n as i64);
    let f = b.function("fields", "axpby_items")?;
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(ys).arg(&mut out).arg(&a_dev).arg(&a_len).arg(&c_dev).arg(&c_len).arg(&per_item64).arg(&n64);
    // SAFETY: x, y and out hold n elements, the coefficients a_len and c_len (1 or the item count).
    unsafe { l.launch(strided(n)) }?;
    Ok(Tensor::from_storage(CudaStorage::F32(out), x.shape().to_vec()))
}

pub(super) fn dot_items(b: &CudaBackend, x: &T, y: &T) -> Result<Vec<f64>> {
    const OP: &str = "dot_items";
    expect_shape("y", OP, y.shape(), x.shape())?;
    let (n_items, per_item) = items(OP, x)?;
    let (xs, ys) = (f32_of(OP, "x", x)?, f32_of(OP, "y", y)?);
    let mut out = b.alloc::<f64>(n_items)?;
    let per_item64 = per_item as i64;
    let f = b.function("fields", "dot_items")?;
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(ys).arg(&mut out).arg(&per_item64);
    let cfg = LaunchConfig { grid_dim: (i32_arg(OP, n_items)? as u32, 1, 1), block_dim: (DOT_THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: x and y hold n_items * per_item elements, out one per item; block i writes out[i].
    unsafe { l.launch(cfg) }?;
    b.transfers.down(8 * n_items);
    Ok(b.stream().clone_dtoh(&out)?)
}
