//! Launches for `cuda/attention.cu`: flash attention forward on tensor cores for head dims 64 and
//! 128, and a SIMT kernel for any other head dim up to 512 (the autoencoder's single-head
//! attention). Both write the merged-head layout `[B, Lq, H * D]` directly and, on request, the
//! per-row log-sum-exp `[B, H, Lq]` (f32) that the backward pass needs.
//!
//! Shapes are checked exactly as the CPU backend checks them; the kernels index with 32-bit ints
//! (every tensor under 2^31 elements) and put batch x heads on the grid's y axis (at most 65,535).
//!
//! The training backward (`backward`) is FlashAttention-2's in three launches: a delta kernel, then
//! dK/dV and dQ either on tensor cores (`mma.sync`, head dims 64 and 128; attention.cu part 4) or
//! on the CUDA cores (SIMT, any head dim up to 128; part 3). The tensor-core pair has not run on a
//! GPU yet, hence the same safety valve as the Hopper forward: `CudaBackend::new` runs a start-up
//! probe through both and enables the tensor-core pair for the default dispatch only when they
//! agree; otherwise one warning line and SIMT. `ENGINE_ATTENTION_BWD=simt` skips the probe and
//! keeps SIMT.

use super::probation::{self, Guarded};
use super::{attention_hopper, bf16_of, bf16_tensor, expect_shape, f32_of, i32_arg, CudaBackend, CudaStorage, T};
use crate::backend::shapes::AttentionDims;
use crate::backend::Backend;
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;
use loaders::HostTensor;
use std::sync::atomic::Ordering;

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

/// Which forward kernel `run` launches.
#[derive(Clone, Copy, Debug)]
pub(super) enum Route {
    /// The Hopper kernel when the backend enabled it (compute capability 9.0, `ENGINE_ATTENTION`,
    /// the start-up probe) and the inputs suit it; the portable default otherwise.
    Default,
    /// The portable default for the head dim (tensor cores for 64 and 128, SIMT otherwise).
    Portable,
    /// This tensor-core kernel of attention.cu.
    Flash(FlashKernel),
    /// The Hopper kernel (attention_sm90a.cu), whether or not the probe enabled it; an error
    /// where it cannot run.
    Sm90a,
}

/// `softmax(q k^T / sqrt(D)) v` with heads merged: the `Backend::attention` entry.
pub(super) fn forward(b: &CudaBackend, q: &T, k: &T, v: &T) -> Result<T> {
    Ok(run(b, q, k, v, Route::Default, false)?.0)
}

/// The forward pass plus the log-sum-exp of every query row's scaled scores, `[B, H, Lq]` f32
/// (natural log; `-inf` when there are no keys), for the training backward.
pub(super) fn forward_with_lse(b: &CudaBackend, q: &T, k: &T, v: &T) -> Result<(T, T)> {
    forward_routed(b, q, k, v, Route::Default)
}

/// The forward pass and log-sum-exp through a chosen route (for the start-up probe, the
/// self-test and timing the variants side by side).
pub(super) fn forward_routed(b: &CudaBackend, q: &T, k: &T, v: &T, route: Route) -> Result<(T, T)> {
    let (out, lse) = run(b, q, k, v, route, true)?;
    Ok((out, lse.expect("log-sum-exp was requested")))
}

/// The forward pass through a chosen tensor-core kernel (for timing the variants); fails when
/// the kernel does not fit the head dim or the inputs are not 16-byte aligned.
#[allow(dead_code)] // for the kernel bench harness
pub(super) fn forward_using(b: &CudaBackend, q: &T, k: &T, v: &T, kernel: FlashKernel) -> Result<T> {
    Ok(run(b, q, k, v, Route::Flash(kernel), false)?.0)
}

/// Threads of `attention_bias_bf16`'s CTAs (`AB_THREADS` in attention.cu).
const AB_THREADS: u32 = 128;

/// Shared memory `attention_bias_bf16` may take for its query row and score row: the portable
/// 48 KiB, so that no opt-in is needed (Lk + D up to 12,288: T5's 512 and CLIP's 77 tokens).
const AB_MAX_SHARED: usize = 48 << 10;

/// `softmax(scale q k^T + bias) v` with bias `[H, Lq, Lk]` (f32): the text encoders' attention,
/// through the plain one-row-per-CTA kernel (attention.cu part 5).
pub(super) fn forward_bias(b: &CudaBackend, q: &T, k: &T, v: &T, bias: &T, scale: f32) -> Result<T> {
    const OP: &str = "attention_bias";
    let dims = AttentionDims::with_bias(q.shape(), k.shape(), v.shape(), bias.shape())?;
    let (batch, heads, lq, lk, d) = (dims.batch, dims.heads, dims.lq, dims.lk, dims.head_dim);
    let (qs, ks, vs) = (bf16_of(OP, "q", q)?, bf16_of(OP, "k", k)?, bf16_of(OP, "v", v)?);
    let bs = f32_of(OP, "bias", bias)?;
    let mut out = b.alloc_bf16(batch * lq * heads * d)?;
    if batch * heads * lq * d == 0 {
        return Ok(bf16_tensor(out, vec![batch, lq, heads * d]));
    }
    ensure!(lk > 0, "{OP}: no keys to attend to");
    let smem = (lk + d) * 4;
    ensure!(smem <= AB_MAX_SHARED, "{OP}: {lk} keys of head dim {d} exceed the kernel's {AB_MAX_SHARED} bytes of shared memory");
    for n in [q.elem_count(), k.elem_count(), bias.elem_count()] {
        i32_arg(OP, n)?;
    }
    ensure!(heads <= 65_535 && batch <= 65_535, "{OP}: {heads} heads or batch {batch} exceed one launch's grid");
    let (h32, lq32, lk32, d32) = (i32_arg(OP, heads)?, i32_arg(OP, lq)?, i32_arg(OP, lk)?, i32_arg(OP, d)?);
    let f = b.function("attention", "attention_bias_bf16")?;
    let cfg =
        LaunchConfig { grid_dim: (lq32 as u32, h32 as u32, batch as u32), block_dim: (AB_THREADS, 1, 1), shared_mem_bytes: smem as u32 };
    let mut l = b.stream().launch_builder(&f);
    l.arg(qs).arg(ks).arg(vs).arg(bs).arg(&mut out).arg(&h32).arg(&lq32).arg(&lk32).arg(&d32).arg(&scale);
    // SAFETY: q is [B, H, Lq, D], k and v [B, H, Lk, D], bias [H, Lq, Lk], out [B, Lq, H, D]
    // (shapes checked above); each CTA writes the D outputs of its (row, head, batch) once.
    unsafe { l.launch(cfg) }?;
    Ok(bf16_tensor(out, vec![batch, lq, heads * d]))
}

fn aligned16(b: &CudaBackend, s: &CudaSlice<bf16>) -> bool {
    let (ptr, _sync) = s.device_ptr(b.stream());
    ptr % 16 == 0
}

fn run(b: &CudaBackend, q: &T, k: &T, v: &T, route: Route, want_lse: bool) -> Result<(T, Option<T>)> {
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
    // always are); the SIMT kernel otherwise. On Hopper, wgmma + TMA where enabled.
    let aligned = aligned16(b, qs) && aligned16(b, ks) && aligned16(b, vs) && aligned16(b, &out);
    let hopper = match route {
        Route::Sm90a => {
            ensure!(
                b.has_sm90a_attention(),
                "attention: the sm90a kernel needs compute capability 9.0 (this GPU is {})",
                b.device_description()
            );
            Some(attention_hopper::kernel_for(d, lq, lk, grid_y, aligned).map_err(|e| anyhow!("attention: {e}"))?)
        }
        Route::Default if b.sm90a_attention_enabled() => attention_hopper::kernel_for(d, lq, lk, grid_y, aligned).ok(),
        _ => None,
    };
    if let Some(kernel) = hopper {
        let shape = attention_hopper::Launch { pairs: grid_y, heads: heads32, lq, lk, scale_log2 };
        attention_hopper::launch(b, kernel, (qs, ks, vs), &mut out, lse.as_mut(), &shape)?;
        return Ok(finish(out, lse));
    }
    let flash = match route {
        Route::Flash(kernel) => {
            ensure!(kernel.head_dim == d, "attention: kernel {} is for head_dim {}, the inputs have {d}", kernel.name, kernel.head_dim);
            ensure!(aligned, "attention: kernel {} needs 16-byte-aligned q, k, v", kernel.name);
            Some(kernel)
        }
        _ => default_flash_kernel(d).filter(|_| aligned),
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

/// The largest head dim the backward kernels take (FLUX's is 128).
const BWD_MAX_HEAD_DIM: usize = 128;
/// Keys per dK/dV CTA and query rows per dQ CTA (`BWD_BLOCK` in attention.cu).
const BWD_BLOCK: usize = 32;

/// The (dK dV, dQ) kernels for head dim `d` (1..=128): those of the smallest of 32, 64, 128 that
/// holds it (their registers grow with it).
fn backward_kernels(d: usize) -> (&'static str, &'static str) {
    match d {
        0..=32 => ("attention_bwd_dkdv_d32", "attention_bwd_dq_d32"),
        33..=64 => ("attention_bwd_dkdv_d64", "attention_bwd_dq_d64"),
        _ => ("attention_bwd_dkdv_d128", "attention_bwd_dq_d128"),
    }
}

/// Dynamic shared memory of both backward kernels, as `bwd_tiles` in attention.cu lays it out: Q
/// and dO rows in f32 (stride Dq, D rounded up to even), P and dS tiles, lse and delta, then K and
/// V rows in bf16 (stride Dk: Dq, plus 2 when that is a multiple of 4, for an odd word stride).
fn backward_shared_bytes(d: usize) -> usize {
    let dq = (d + 1) & !1;
    let dk = if dq % 4 == 0 { dq + 2 } else { dq };
    4 * (2 * BWD_BLOCK * dq + 2 * BWD_BLOCK * BWD_BLOCK + 2 * BWD_BLOCK) + 2 * 2 * BWD_BLOCK * dk
}

/// The tensor-core backward, on probation: `ENGINE_ATTENTION_BWD=simt` switches it off.
pub(super) const MMA_BACKWARD: Guarded = Guarded {
    kernel: "mma attention backward kernel",
    env: "ENGINE_ATTENTION_BWD",
    off: "simt",
    off_means: "the SIMT backward only",
    fallback: "the SIMT backward",
};

/// Which backward kernels to run, for the self-test and `engine kernels`, which compare them side
/// by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BackwardKernel {
    /// attention.cu part 3, any head dim up to 128.
    Simt,
    /// attention.cu part 4 (tensor cores), head dims 64 and 128, whether or not the start-up
    /// probe enabled it.
    Mma,
}

impl BackwardKernel {
    pub const ALL: [BackwardKernel; 2] = [BackwardKernel::Simt, BackwardKernel::Mma];

    /// The name `BackwardOps::attention_backward_kernels` gives it.
    pub fn name(self) -> &'static str {
        match self {
            BackwardKernel::Simt => "simt",
            BackwardKernel::Mma => "mma",
        }
    }
}

/// Rows per CTA of the tensor-core backward (`BWD_MMA_ROWS`: 4 warps of 16): keys for dK/dV,
/// queries for dQ.
const MMA_BWD_ROWS: usize = 64;

/// The tensor-core dK/dV and dQ kernels for one head dim (`BWD_MMA_KERNELS` in attention.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MmaBackward {
    pub dkdv: &'static str,
    pub dq: &'static str,
    pub head_dim: usize,
    /// Query rows per streamed tile of the dK/dV pass (BN).
    pub dkdv_cols: usize,
    /// Keys per streamed tile of the dQ pass (BN).
    pub dq_cols: usize,
}

const MMA_BWD_D128: MmaBackward =
    MmaBackward { dkdv: "attention_bwd_dkdv_mma_d128", dq: "attention_bwd_dq_mma_d128", head_dim: 128, dkdv_cols: 32, dq_cols: 64 };
const MMA_BWD_D64: MmaBackward =
    MmaBackward { dkdv: "attention_bwd_dkdv_mma_d64", dq: "attention_bwd_dq_mma_d64", head_dim: 64, dkdv_cols: 64, dq_cols: 64 };

impl MmaBackward {
    fn for_head_dim(d: usize) -> Option<MmaBackward> {
        match d {
            128 => Some(MMA_BWD_D128),
            64 => Some(MMA_BWD_D64),
            _ => None,
        }
    }

    /// Dynamic shared memory of a pass streaming `cols`-row tiles, as `flash_bwd` lays it out: the
    /// resident X and Y tiles, two stages of U and W, and (dK/dV only) two stages of the tile's
    /// lse and delta.
    const fn shared_bytes(&self, cols: usize, dkdv: bool) -> usize {
        let tiles = 2 * MMA_BWD_ROWS * self.head_dim * 2 + 4 * cols * self.head_dim * 2;
        if dkdv {
            tiles + 2 * 2 * cols * 4
        } else {
            tiles
        }
    }

    pub const fn dkdv_shared_bytes(&self) -> usize {
        self.shared_bytes(self.dkdv_cols, true)
    }

    pub const fn dq_shared_bytes(&self) -> usize {
        self.shared_bytes(self.dq_cols, false)
    }
}

/// The tensor-core kernels to run, or None for SIMT: the forced kernel (an error where the
/// tensor-core one cannot take the inputs), otherwise tensor cores where the head dim and the
/// alignment allow and the start-up probe enabled them.
fn choose_backward(d: usize, aligned: bool, mma_enabled: bool, forced: Option<BackwardKernel>) -> Result<Option<MmaBackward>> {
    let mma = MmaBackward::for_head_dim(d);
    match forced {
        Some(BackwardKernel::Simt) => Ok(None),
        Some(BackwardKernel::Mma) => {
            let kernels = mma.ok_or_else(|| anyhow!("the mma attention backward takes head_dim 64 or 128, the inputs have {d}"))?;
            ensure!(aligned, "the mma attention backward needs 16-byte-aligned q, k, v and output gradient");
            Ok(Some(kernels))
        }
        None => Ok(mma.filter(|_| aligned && mma_enabled)),
    }
}

/// One gradient launch: kernel, grid x (row blocks), dynamic shared memory, and whether it takes
/// the head dim as an argument (the SIMT kernels; the tensor-core ones are compiled for theirs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GradPass {
    name: &'static str,
    blocks: usize,
    smem: usize,
    takes_head_dim: bool,
}

/// The dK/dV launch (one CTA per key block) and the dQ launch (one per query block).
fn grad_passes(d: usize, lq: usize, lk: usize, mma: Option<MmaBackward>) -> [GradPass; 2] {
    match mma {
        Some(m) => [
            GradPass { name: m.dkdv, blocks: lk.div_ceil(MMA_BWD_ROWS), smem: m.dkdv_shared_bytes(), takes_head_dim: false },
            GradPass { name: m.dq, blocks: lq.div_ceil(MMA_BWD_ROWS), smem: m.dq_shared_bytes(), takes_head_dim: false },
        ],
        None => {
            let (dkdv, dq) = backward_kernels(d);
            let smem = backward_shared_bytes(d);
            [
                GradPass { name: dkdv, blocks: lk.div_ceil(BWD_BLOCK), smem, takes_head_dim: true },
                GradPass { name: dq, blocks: lq.div_ceil(BWD_BLOCK), smem, takes_head_dim: true },
            ]
        }
    }
}

/// `(gq, gk, gv)` of `attention(q, k, v)` (`BackwardOps::attention_backward`), in the inputs'
/// layout, bf16, through the default kernels.
pub(super) fn backward(b: &CudaBackend, q: &T, k: &T, v: &T, out: &T, lse: &T, g_out: &T) -> Result<[T; 3]> {
    backward_using(b, q, k, v, out, lse, g_out, None)
}

/// The backward through the forced kernels, or (None) the default ones.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_using(
    b: &CudaBackend,
    q: &T,
    k: &T,
    v: &T,
    out: &T,
    lse: &T,
    g_out: &T,
    forced: Option<BackwardKernel>,
) -> Result<[T; 3]> {
    let op = "attention_backward";
    ensure!(q.rank() == 4, "{op}: q has shape {:?}, expected [batch, heads, tokens, head_dim]", q.shape());
    let (batch, heads, lq, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    ensure!(k.rank() == 4, "{op}: k has shape {:?}, expected [batch, heads, tokens, head_dim]", k.shape());
    let lk = k.dim(2);
    expect_shape("k", op, k.shape(), &[batch, heads, lk, d])?;
    expect_shape("v", op, v.shape(), &[batch, heads, lk, d])?;
    expect_shape("output", op, out.shape(), &[batch, lq, heads * d])?;
    expect_shape("output gradient", op, g_out.shape(), &[batch, lq, heads * d])?;
    expect_shape("lse", op, lse.shape(), &[batch, heads, lq])?;
    ensure!(d <= BWD_MAX_HEAD_DIM, "{op}: head_dim {d} is not supported on the GPU (at most {BWD_MAX_HEAD_DIM})");
    let (qs, ks, vs) = (bf16_of(op, "q", q)?, bf16_of(op, "k", k)?, bf16_of(op, "v", v)?);
    let (outs, gos) = (bf16_of(op, "output", out)?, bf16_of(op, "output gradient", g_out)?);
    let lses = f32_of(op, "lse", lse)?;

    let (mut gq, mut gk, mut gv) = (b.alloc_bf16(q.elem_count())?, b.alloc_bf16(k.elem_count())?, b.alloc_bf16(v.elem_count())?);
    let finish =
        |gq, gk, gv| [bf16_tensor(gq, q.shape().to_vec()), bf16_tensor(gk, k.shape().to_vec()), bf16_tensor(gv, v.shape().to_vec())];
    let pairs = batch * heads;
    if pairs == 0 || d == 0 {
        return Ok(finish(gq, gk, gv));
    }
    ensure!(pairs <= 65_535, "{op}: batch {batch} x heads {heads} exceeds the 65,535 (batch, head) pairs one launch covers");
    // 32-bit indexing inside the kernels, the last block's spare rows included.
    let spare = BWD_BLOCK.max(MMA_BWD_ROWS);
    for n in [q.elem_count(), k.elem_count(), pairs * (lq + spare) * d, pairs * (lk + spare) * d] {
        i32_arg(op, n)?;
    }
    let (h32, lq32, lk32, d32) = (i32_arg(op, heads)?, i32_arg(op, lq)?, i32_arg(op, lk)?, i32_arg(op, d)?);
    let scale = 1.0 / (d as f32).sqrt();
    let scale_log2 = std::f32::consts::LOG2_E * scale;

    // 1. delta = rowsum(g_out * out), one warp per query row.
    let rows = pairs * lq;
    let mut delta = b.alloc::<f32>(rows)?;
    if rows > 0 {
        let rows32 = i32_arg(op, rows)?;
        let f = b.function("attention", "attention_bwd_delta")?;
        let cfg = LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut l = b.stream().launch_builder(&f);
        l.arg(outs).arg(gos).arg(&mut delta).arg(&h32).arg(&lq32).arg(&d32).arg(&rows32);
        // SAFETY: out and g_out hold rows * d elements, delta rows floats.
        unsafe { l.launch(cfg) }?;
    }

    // 2. dK, dV per key block; 3. dQ per query block (each writes zeros when the other length is
    // 0). Tensor cores need 16-byte-aligned sources for cp.async (fresh device buffers always are).
    let aligned = [qs, ks, vs, gos].into_iter().all(|s| aligned16(b, s));
    let mma = choose_backward(d, aligned, b.mma_attention_backward_enabled(), forced).map_err(|e| anyhow!("{op}: {e}"))?;
    let [dkdv_pass, dq_pass] = grad_passes(d, lq, lk, mma);
    for (i, GradPass { name, blocks, smem, takes_head_dim }) in [dkdv_pass, dq_pass].into_iter().enumerate() {
        if blocks == 0 {
            continue;
        }
        let f = b.function("attention", name)?;
        if smem > 48 * 1024 {
            b.stream().context().bind_to_thread()?;
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                .with_context(|| format!("{op}: kernel {name} needs {smem} bytes of shared memory per block, more than this GPU allows"))?;
        }
        let cfg = LaunchConfig { grid_dim: (blocks as u32, pairs as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: smem as u32 };
        let mut l = b.stream().launch_builder(&f);
        l.arg(qs).arg(ks).arg(vs).arg(gos).arg(lses).arg(&delta);
        if i == 0 {
            l.arg(&mut gk).arg(&mut gv);
        } else {
            l.arg(&mut gq);
        }
        l.arg(&h32).arg(&lq32).arg(&lk32);
        if takes_head_dim {
            l.arg(&d32);
        }
        l.arg(&scale_log2).arg(&scale);
        // SAFETY: q and gq hold pairs * lq * d elements, k, v, gk, gv pairs * lk * d, g_out
        // batch * lq * heads * d, lse and delta pairs * lq floats; the grid covers every key (or
        // query) block of every head once and the kernels guard rows past lk and lq. Argument
        // order and types match the kernels' signatures.
        unsafe { l.launch(cfg) }?;
    }
    Ok(finish(gq, gk, gv))
}

/// Probe shapes (B = 1; heads, Lq = Lk, head dim): lengths with partial tiles of every size the
/// kernels use (64-row blocks, 32- and 64-row column tiles), both head dims.
const BWD_PROBE: [[usize; 3]; 2] = [[2, 200, 128], [2, 200, 64]];

/// Runs the probe through both backward pairs (on one forward's output and log-sum-exp): Ok(())
/// when they agree, Err(reason) when the tensor-core pair fails to launch or disagrees.
fn probe_backward(b: &CudaBackend) -> std::result::Result<(), String> {
    for (i, [heads, l, d]) in BWD_PROBE.into_iter().enumerate() {
        let shape = [1, heads, l, d];
        let input = |dims: Vec<usize>, seed: u64| {
            let values = crate::sampler::gaussian_noise(dims.iter().product(), seed);
            b.input(&HostTensor::from_f32(dims, values))
        };
        let run = || -> Result<[[Vec<f32>; 3]; 2]> {
            let seed = 0xb3d0 + 4 * i as u64;
            let (q, k, v) = (input(shape.to_vec(), seed)?, input(shape.to_vec(), seed + 1)?, input(shape.to_vec(), seed + 2)?);
            let g_out = input(vec![1, l, heads * d], seed + 3)?;
            let (out, lse) = forward_routed(b, &q, &k, &v, Route::Portable)?;
            let host = |grads: [T; 3]| -> Result<[Vec<f32>; 3]> {
                let [gq, gk, gv] = grads;
                Ok([b.download(&gq)?.to_f32(), b.download(&gk)?.to_f32(), b.download(&gv)?.to_f32()])
            };
            let mma = host(backward_using(b, &q, &k, &v, &out, &lse, &g_out, Some(BackwardKernel::Mma))?)?;
            let simt = host(backward_using(b, &q, &k, &v, &out, &lse, &g_out, Some(BackwardKernel::Simt))?)?;
            Ok([mma, simt])
        };
        let [mma, simt] = run().map_err(|e| format!("it failed on the start-up probe: {e:#}"))?;
        for (what, (m, s)) in ["gq", "gk", "gv"].into_iter().zip(mma.iter().zip(&simt)) {
            probation::compare(what, m, s)
                .map_err(|e| format!("it differs from the SIMT backward on the start-up probe (q {shape:?}, {e})"))?;
        }
    }
    Ok(())
}

/// At `CudaBackend` initialisation: reads `ENGINE_ATTENTION_BWD` and, unless it says `simt`,
/// probes the tensor-core backward and enables it for the default dispatch when it agrees with
/// the SIMT one (see `probation::Guarded::settle` for what a failure does).
pub(super) fn enable_mma_backward_after_probe(b: &CudaBackend) -> Result<()> {
    if !MMA_BACKWARD.allowed()? {
        return Ok(());
    }
    MMA_BACKWARD.settle(b, probe_backward(b), &b.mma_attention_backward)
}

impl CudaBackend {
    /// Whether the default attention backward uses the tensor-core kernels (where the inputs
    /// allow): `ENGINE_ATTENTION_BWD` allows them and they passed the start-up probe.
    pub(super) fn mma_attention_backward_enabled(&self) -> bool {
        self.mma_attention_backward.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    //! The backward kernels' decomposition, modelled in f64 on the host: the same blocks of
    //! `BWD_BLOCK` keys and query rows, the same masks for the tails, the same indexing of the
    //! merged-head `g_out` and `out` (delta per row of the merged layout), the 1 / sqrt(D) applied
    //! at the store; compared with the CPU reference on lengths that leave partial blocks.
    use super::*;
    use crate::backend::backward::BackwardOps;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Backend;
    use loaders::HostTensor;

    /// What the three launches compute, block by block; `[gq, gk, gv]`.
    #[allow(clippy::too_many_arguments)]
    fn tiled_backward(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        g_out: &[f32],
        (batch, heads, lq, lk, d): (usize, usize, usize, usize, usize),
    ) -> [Vec<f64>; 3] {
        let scale = 1.0 / (d as f64).sqrt();
        // attention_bwd_delta: one merged row r = (b lq + i) heads + h at a time.
        let mut delta = vec![0f64; batch * heads * lq];
        for r in 0..batch * lq * heads {
            let (h, bi) = (r % heads, r / heads);
            let (b, i) = (bi / lq, bi % lq);
            delta[(b * heads + h) * lq + i] = (0..d).map(|c| out[r * d + c] as f64 * g_out[r * d + c] as f64).sum();
        }
        // bwd_probs for query block q0 and key block k0 of head bh: P and dS, zero outside.
        let probs = |bh: usize, q0: usize, k0: usize| {
            let (b, h) = (bh / heads, bh % heads);
            let mut p = [[0f64; BWD_BLOCK]; BWD_BLOCK];
            let mut ds = [[0f64; BWD_BLOCK]; BWD_BLOCK];
            for row in 0..BWD_BLOCK {
                for key in 0..BWD_BLOCK {
                    let (i, j) = (q0 + row, k0 + key);
                    if i >= lq || j >= lk {
                        continue;
                    }
                    let qi = &q[(bh * lq + i) * d..][..d];
                    let gi = &g_out[((b * lq + i) * heads + h) * d..][..d];
                    let (kj, vj) = (&k[(bh * lk + j) * d..][..d], &v[(bh * lk + j) * d..][..d]);
                    let s: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let dp: f64 = gi.iter().zip(vj).map(|(&a, &b)| a as f64 * b as f64).sum();
                    p[row][key] = (s * scale - lse[bh * lq + i] as f64).exp();
                    ds[row][key] = p[row][key] * (dp - delta[bh * lq + i]);
                }
            }
            (p, ds)
        };
        let (mut gq, mut gk, mut gv) = (vec![0f64; q.len()], vec![0f64; k.len()], vec![0f64; v.len()]);
        for bh in 0..batch * heads {
            let (b, h) = (bh / heads, bh % heads);
            // attention_bwd_dkdv: per key block, over every query block.
            for k0 in (0..lk).step_by(BWD_BLOCK) {
                for q0 in (0..lq).step_by(BWD_BLOCK) {
                    let (p, ds) = probs(bh, q0, k0);
                    for key in 0..BWD_BLOCK.min(lk - k0) {
                        for row in 0..BWD_BLOCK.min(lq - q0) {
                            let i = q0 + row;
                            for c in 0..d {
                                gv[(bh * lk + k0 + key) * d + c] += p[row][key] * g_out[((b * lq + i) * heads + h) * d + c] as f64;
                                gk[(bh * lk + k0 + key) * d + c] += ds[row][key] * q[(bh * lq + i) * d + c] as f64 * scale;
                            }
                        }
                    }
                }
            }
            // attention_bwd_dq: per query block, over every key block.
            for q0 in (0..lq).step_by(BWD_BLOCK) {
                for k0 in (0..lk).step_by(BWD_BLOCK) {
                    let (_, ds) = probs(bh, q0, k0);
                    for row in 0..BWD_BLOCK.min(lq - q0) {
                        for key in 0..BWD_BLOCK.min(lk - k0) {
                            for c in 0..d {
                                gq[(bh * lq + q0 + row) * d + c] += ds[row][key] * k[(bh * lk + k0 + key) * d + c] as f64 * scale;
                            }
                        }
                    }
                }
            }
        }
        [gq, gk, gv]
    }

    /// The most shared memory one block may use on sm_86/89 (and well under A100's and H100's).
    const PORTABLE_MAX_SHARED: usize = 99 * 1024;

    #[test]
    fn engine_attention_bwd_takes_auto_or_simt_and_names_a_bad_value() {
        for allowed in [None, Some(""), Some("auto"), Some(" Auto ")] {
            assert!(MMA_BACKWARD.allowed_by(allowed).unwrap(), "{allowed:?}");
        }
        assert!(!MMA_BACKWARD.allowed_by(Some("simt")).unwrap());
        assert!(!MMA_BACKWARD.allowed_by(Some("SIMT\n")).unwrap());
        let e = MMA_BACKWARD.allowed_by(Some("mma")).unwrap_err().to_string();
        assert!(e.contains("ENGINE_ATTENTION_BWD") && e.contains("\"mma\"") && e.contains("simt"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn the_backward_uses_tensor_cores_only_for_aligned_64_and_128_after_the_probe() {
        let choose = |d, aligned, enabled, forced| choose_backward(d, aligned, enabled, forced).unwrap();
        // Default dispatch: all three conditions.
        assert_eq!(choose(128, true, true, None), Some(MMA_BWD_D128));
        assert_eq!(choose(64, true, true, None), Some(MMA_BWD_D64));
        assert_eq!(choose(128, true, false, None), None, "not enabled by the probe");
        assert_eq!(choose(128, false, true, None), None, "misaligned");
        for d in [1, 32, 63, 96, 100, 127] {
            assert_eq!(choose(d, true, true, None), None, "head_dim {d}");
        }
        // Forced: SIMT always; tensor cores whether or not enabled, or a one-line reason.
        assert_eq!(choose(128, true, true, Some(BackwardKernel::Simt)), None);
        assert_eq!(choose(64, true, false, Some(BackwardKernel::Mma)), Some(MMA_BWD_D64));
        let why = |d, aligned| choose_backward(d, aligned, true, Some(BackwardKernel::Mma)).unwrap_err().to_string();
        assert!(why(96, true).contains("head_dim 64 or 128, the inputs have 96"));
        assert!(why(128, false).contains("16-byte-aligned"));
    }

    #[test]
    fn backward_kernel_names_round_trip_and_exist_in_the_ptx() {
        assert_eq!(BackwardKernel::ALL.map(|k| k.name()), ["simt", "mma"]);
        let (_, ptx) = super::super::kernels::MODULES.iter().find(|(name, _)| *name == "attention").unwrap();
        let mut names = vec!["attention_bwd_delta"];
        for m in [MMA_BWD_D128, MMA_BWD_D64] {
            names.extend([m.dkdv, m.dq]);
        }
        for d in [1, 33, 65] {
            let (dkdv, dq) = backward_kernels(d);
            names.extend([dkdv, dq]);
        }
        for name in names {
            assert!(ptx.contains(&format!(".entry {name}(")), "{name} is not in attention.ptx");
        }
    }

    #[test]
    fn mma_backward_shared_memory_matches_the_kernel_layout_and_fits_every_gpu() {
        // D 128: X, Y 64 x 128 bf16 (32 KiB), 2 stages x (U + W) of BN rows, lse/delta 2 x 2 x BN f32.
        assert_eq!(MMA_BWD_D128.dkdv_shared_bytes(), 32 * 1024 + 4 * 32 * 256 + 4 * 32 * 4);
        assert_eq!(MMA_BWD_D128.dq_shared_bytes(), 32 * 1024 + 4 * 64 * 256);
        assert_eq!(MMA_BWD_D64.dkdv_shared_bytes(), 16 * 1024 + 4 * 64 * 128 + 4 * 64 * 4);
        assert_eq!(MMA_BWD_D64.dq_shared_bytes(), 16 * 1024 + 4 * 64 * 128);
        for m in [MMA_BWD_D128, MMA_BWD_D64] {
            assert!(m.dkdv_shared_bytes() <= PORTABLE_MAX_SHARED && m.dq_shared_bytes() <= PORTABLE_MAX_SHARED, "{m:?}");
            // flash_bwd: pairs of n-tiles, and one thread (of 128) per lse and delta value.
            for cols in [m.dkdv_cols, m.dq_cols] {
                assert!(cols % 16 == 0 && 2 * cols <= 128, "{m:?}");
            }
            assert_eq!(MmaBackward::for_head_dim(m.head_dim), Some(m));
        }
        assert!(backward_shared_bytes(BWD_MAX_HEAD_DIM) <= PORTABLE_MAX_SHARED);
    }

    #[test]
    fn gradient_launches_cover_every_key_and_query_block_once() {
        // Tensor cores: 64-row blocks, head dim compiled in.
        let [dkdv, dq] = grad_passes(128, 77, 200, Some(MMA_BWD_D128));
        assert_eq!(
            dkdv,
            GradPass { name: "attention_bwd_dkdv_mma_d128", blocks: 4, smem: MMA_BWD_D128.dkdv_shared_bytes(), takes_head_dim: false }
        );
        assert_eq!(
            dq,
            GradPass { name: "attention_bwd_dq_mma_d128", blocks: 2, smem: MMA_BWD_D128.dq_shared_bytes(), takes_head_dim: false }
        );
        let [dkdv, dq] = grad_passes(64, 129, 1, Some(MMA_BWD_D64));
        assert_eq!((dkdv.blocks, dq.blocks), (1, 3));
        // SIMT: 32-row blocks, head dim as an argument; no blocks for an empty side.
        let [dkdv, dq] = grad_passes(100, 65, 0, None);
        assert_eq!((dkdv.name, dkdv.blocks, dq.name, dq.blocks), ("attention_bwd_dkdv_d128", 0, "attention_bwd_dq_d128", 3));
        assert!(dkdv.takes_head_dim && dq.takes_head_dim && dq.smem == backward_shared_bytes(100));
    }

    #[test]
    fn the_backward_probe_leaves_partial_tiles_of_every_size() {
        for [heads, l, d] in BWD_PROBE {
            assert!(heads > 1 && MmaBackward::for_head_dim(d).is_some());
            for tile in [BWD_BLOCK, MMA_BWD_ROWS, MMA_BWD_D128.dkdv_cols, MMA_BWD_D128.dq_cols] {
                assert!(l % tile != 0 && l > tile, "{l} rows, tile {tile}");
            }
        }
        assert_eq!(BWD_PROBE.map(|[_, _, d]| d), [128, 64]);
    }

    #[test]
    fn the_tiled_backward_is_the_reference_backward() {
        let cpu = CpuBackend::new();
        // Partial blocks of rows and keys, more keys than queries and fewer, several heads.
        for dims @ (batch, heads, lq, lk, d) in [(2, 3, 37, 70, 8), (1, 2, 65, 31, 12), (1, 1, 32, 64, 6)] {
            let gauss = |n: usize, seed: u64| crate::sampler::gaussian_noise(n, seed);
            let (q, k, v) = (gauss(batch * heads * lq * d, 1), gauss(batch * heads * lk * d, 2), gauss(batch * heads * lk * d, 3));
            let g_out = gauss(batch * lq * heads * d, 4);
            let up = |data: &[f32], shape: &[usize]| cpu.upload(&HostTensor::from_f32(shape.to_vec(), data.to_vec())).unwrap();
            let (qt, kt, vt) = (up(&q, &[batch, heads, lq, d]), up(&k, &[batch, heads, lk, d]), up(&v, &[batch, heads, lk, d]));
            let (out, lse) = cpu.attention_with_lse(&qt, &kt, &vt).unwrap();
            let (out_v, lse_v) = (cpu.download(&out).unwrap().to_f32(), cpu.download(&lse).unwrap().to_f32());
            let reference = cpu.attention_backward(&qt, &kt, &vt, &out, &lse, &up(&g_out, &[batch, lq, heads * d])).unwrap();
            let tiled = tiled_backward(&q, &k, &v, &out_v, &lse_v, &g_out, dims);
            for (name, (want, got)) in ["gq", "gk", "gv"].iter().zip(reference.iter().zip(&tiled)) {
                let want = cpu.download(want).unwrap().to_f32();
                let scale = want.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
                for (i, (&w, &g)) in want.iter().zip(got).enumerate() {
                    assert!((w as f64 - g).abs() <= 1e-4 * scale, "{name} {dims:?} at {i}: tiled {g} vs reference {w}");
                }
            }
        }
    }
}
