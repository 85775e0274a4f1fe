//! Launches for `cuda/attention.cu`: flash attention forward on tensor cores for head dims 64 and
//! 128, and a SIMT kernel for any other head dim up to 512 (the autoencoder's single-head
//! attention). Both write the merged-head layout `[B, Lq, H * D]` directly and, on request, the
//! per-row log-sum-exp `[B, H, Lq]` (f32) that the backward pass needs.
//!
//! Shapes are checked exactly as the CPU backend checks them; the kernels index with 32-bit ints
//! (every tensor under 2^31 elements) and put batch x heads on the grid's y axis (at most 65,535).

use super::{bf16_of, bf16_tensor, i32_arg, CudaBackend, CudaStorage, T};
use crate::backend::shapes::AttentionDims;
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;

const OP: &str = "attention";

/// One tensor-core kernel of `cuda/attention.cu` and its launch geometry (the file's header has
/// the reasoning behind each).
#[derive(Clone, Copy, Debug)]
pub(super) struct FlashKernel {
    pub name: &'static str,
    pub head_dim: usize,
    /// Query rows per CTA (BR).
    pub rows: usize,
    /// Keys per K/V tile (BC).
    pub keys: usize,
    pub threads: u32,
    /// Whether Q lives in registers (staged through the K/V buffers) rather than in its own smem tile.
    pub q_in_registers: bool,
}

impl FlashKernel {
    /// Dynamic shared memory: two stages of K and V tiles, plus the resident Q tile unless Q is
    /// kept in registers.
    pub const fn shared_bytes(&self) -> usize {
        let q = if self.q_in_registers { 0 } else { self.rows * self.head_dim * 2 };
        q + 4 * self.keys * self.head_dim * 2
    }
}

/// The default for D = 128: 128 rows x 48 keys, 4 warps of 32 rows, Q in smem; 80 KiB, 2 CTAs/SM.
pub(super) const D128_BR128: FlashKernel =
    FlashKernel { name: "attention_fwd_d128_br128", head_dim: 128, rows: 128, keys: 48, threads: 128, q_in_registers: false };
/// Alternative for D = 128: 64 rows, Q in registers; 48 KiB, 3 CTAs/SM. Timed against the default.
#[allow(dead_code)] // selected only through `forward_using`, for timing
pub(super) const D128_BR64_QREGS: FlashKernel =
    FlashKernel { name: "attention_fwd_d128_br64_qregs", head_dim: 128, rows: 64, keys: 48, threads: 128, q_in_registers: true };
/// The default for D = 64: 128 rows x 64 keys, Q in registers; 32 KiB, 2 CTAs/SM.
pub(super) const D64_BR128_QREGS: FlashKernel =
    FlashKernel { name: "attention_fwd_d64_br128_qregs", head_dim: 64, rows: 128, keys: 64, threads: 128, q_in_registers: true };

fn default_flash_kernel(head_dim: usize) -> Option<FlashKernel> {
    match head_dim {
        128 => Some(D128_BR128),
        64 => Some(D64_BR128_QREGS),
        _ => None,
    }
}

/// The largest head dim the SIMT fallback takes (FLUX's autoencoder attends over 512 channels).
const SIMT_MAX_HEAD_DIM: usize = 512;

/// The SIMT kernel for head dim `d` (1..=512): its name, query rows per CTA and dynamic shared
/// memory, computed exactly as `simt_fwd` in attention.cu lays it out.
fn simt_kernel(d: usize) -> (&'static str, usize, usize) {
    let dc = d.div_ceil(32).next_power_of_two();
    let (name, rows_per_warp) = match dc {
        1 => ("attention_fwd_simt_dc1", 8),
        2 => ("attention_fwd_simt_dc2", 8),
        4 => ("attention_fwd_simt_dc4", 8),
        8 => ("attention_fwd_simt_dc8", 8),
        _ => ("attention_fwd_simt_dc16", 4),
    };
    let rows = 4 * rows_per_warp;
    let dq = (d + 1) & !1;
    let dk = if dq % 4 == 0 { dq + 2 } else { dq };
    let smem = rows * dq * 4 + 4 * rows_per_warp * 32 * 4 + 32 * dk * 2 + 32 * d * 2;
    (name, rows, smem)
}

/// `softmax(q k^T / sqrt(D)) v` with heads merged: the `Backend::attention` entry.
pub(super) fn forward(b: &CudaBackend, q: &T, k: &T, v: &T) -> Result<T> {
    Ok(run(b, q, k, v, None, false)?.0)
}

/// The forward pass plus the log-sum-exp of every query row's scaled scores, `[B, H, Lq]` f32
/// (natural log; `-inf` when there are no keys), for the training backward.
#[allow(dead_code)] // the backward pass (next issue) calls it
pub(super) fn forward_with_lse(b: &CudaBackend, q: &T, k: &T, v: &T) -> Result<(T, T)> {
    let (out, lse) = run(b, q, k, v, None, true)?;
    Ok((out, lse.expect("log-sum-exp was requested")))
}

/// The forward pass through a chosen tensor-core kernel (for timing the variants); fails when
/// the kernel does not fit the head dim or the inputs are not 16-byte aligned.
#[allow(dead_code)] // for the kernel bench harness
pub(super) fn forward_using(b: &CudaBackend, q: &T, k: &T, v: &T, kernel: FlashKernel) -> Result<T> {
    Ok(run(b, q, k, v, Some(kernel), false)?.0)
}

fn aligned16(b: &CudaBackend, s: &CudaSlice<bf16>) -> bool {
    let (ptr, _sync) = s.device_ptr(b.stream());
    ptr % 16 == 0
}

fn run(b: &CudaBackend, q: &T, k: &T, v: &T, forced: Option<FlashKernel>, want_lse: bool) -> Result<(T, Option<T>)> {
    let dims = AttentionDims::new(q.shape(), k.shape(), v.shape())?;
    let (batch, heads, lq, lk, d) = (dims.batch, dims.heads, dims.lq, dims.lk, dims.head_dim);
    let (qs, ks, vs) = (bf16_of(OP, "q", q)?, bf16_of(OP, "k", k)?, bf16_of(OP, "v", v)?);

    let rows = batch * heads * lq;
    let mut out = b.alloc_bf16(rows * d)?;
    let mut lse = if want_lse { Some(b.alloc::<f32>(rows)?) } else { None };
    let finish = |out: CudaSlice<bf16>, lse: Option<CudaSlice<f32>>| {
        (bf16_tensor(out, vec![batch, lq, heads * d]), lse.map(|s| T::from_storage(CudaStorage::F32(s), vec![batch, heads, lq])))
    };
    if rows == 0 || (d == 0 && !want_lse) {
        return Ok(finish(out, lse));
    }
    ensure!(d > 0, "attention: head_dim 0 has no log-sum-exp on the GPU");

    // 32-bit indexing inside the kernels; grid y is batch x heads.
    for n in [q.elem_count(), k.elem_count(), rows * d] {
        i32_arg(OP, n)?;
    }
    let (heads32, lq32, lk32, d32) = (i32_arg(OP, heads)?, i32_arg(OP, lq)?, i32_arg(OP, lk)?, i32_arg(OP, d)?);
    let grid_y = batch * heads;
    ensure!(grid_y <= 65_535, "attention: batch {batch} x heads {heads} exceeds the 65,535 (batch, head) pairs one launch covers");
    let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();

    // Tensor cores for D in {64, 128} when the 16-byte copies are legal (fresh device buffers
    // always are); the SIMT kernel otherwise.
    let aligned = aligned16(b, qs) && aligned16(b, ks) && aligned16(b, vs) && aligned16(b, &out);
    let flash = match forced {
        Some(kernel) => {
            ensure!(kernel.head_dim == d, "attention: kernel {} is for head_dim {}, the inputs have {d}", kernel.name, kernel.head_dim);
            ensure!(aligned, "attention: kernel {} needs 16-byte-aligned q, k, v", kernel.name);
            Some(kernel)
        }
        None => default_flash_kernel(d).filter(|_| aligned),
    };

    let (name, rows_per_cta, threads, smem) = match flash {
        Some(kernel) => (kernel.name, kernel.rows, kernel.threads, kernel.shared_bytes()),
        None => {
            if d > SIMT_MAX_HEAD_DIM {
                bail!("attention: head_dim {d} is not supported on the GPU (tensor cores take 64 and 128, the fallback up to {SIMT_MAX_HEAD_DIM})");
            }
            let (name, rows, smem) = simt_kernel(d);
            (name, rows, 128, smem)
        }
    };
    let f = b.function("attention", name)?;
    if smem > 48 * 1024 {
        b.stream().context().bind_to_thread()?;
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).with_context(|| {
            format!("attention: kernel {name} needs {smem} bytes of shared memory per block, more than this GPU allows")
        })?;
    }
    let cfg = LaunchConfig {
        grid_dim: (lq.div_ceil(rows_per_cta) as u32, grid_y as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let no_lse = 0u64; // a null pointer: the kernels skip the log-sum-exp
    let mut l = b.stream().launch_builder(&f);
    l.arg(qs).arg(ks).arg(vs).arg(&mut out);
    match lse.as_mut() {
        Some(s) => l.arg(s),
        None => l.arg(&no_lse),
    };
    l.arg(&heads32).arg(&lq32).arg(&lk32);
    if flash.is_none() {
        l.arg(&d32);
    }
    l.arg(&scale_log2);
    // SAFETY: q holds batch*heads*lq*d elements, k and v batch*heads*lk*d, out batch*lq*heads*d,
    // lse (when given) batch*heads*lq; the grid covers every query row once and the kernels guard
    // rows past lq and keys past lk. Argument order and types match the kernels' signatures.
    unsafe { l.launch(cfg) }?;
    Ok(finish(out, lse))
}
