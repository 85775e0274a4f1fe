//! Launches for `cuda/attention_sm90a.cu`: the attention forward on Hopper's warpgroup MMA
//! (wgmma) with K/V tiles brought in by the Tensor Memory Accelerator, for head dims 64 and 128 on
//! compute capability 9.0 only (the module is compute_90a PTX, loaded on no other GPU).
//!
//! The kernel takes each of q, k, v as a TMA tensor map: a 128-byte `CUtensorMap` that
//! `cuTensorMapEncodeTiled` fills on the host and the launch passes by value (a `__grid_constant__`
//! parameter). The maps are 3-D, `{D, L, B * H}` with boxes `{64, 128, 1}`, so that rows past the
//! end of one head are outside the tensor (zero-filled by the copy engine) rather than the next
//! head's rows.
//!
//! It has not run on a GPU yet, hence the safety valve: `CudaBackend::new` on compute capability
//! 9.0 runs one small probe through it and through the portable kernel and enables it for the
//! default dispatch only when they agree; otherwise one warning line and the portable kernel.
//! `ENGINE_ATTENTION=portable` skips the probe and keeps the portable kernel.

use super::probation::{compare, Guarded};
use super::{attention, CudaBackend, T};
use crate::backend::Backend;
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::driver::sys::{
    self, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;
use loaders::HostTensor;
use std::sync::atomic::Ordering;

/// The PTX module (`cuda/attention_sm90a.cu`).
pub(super) const MODULE: &str = "attention_sm90a";

/// Query rows per CTA (two consumer warpgroups of 64), keys per K/V tile and pipeline stages:
/// `flash_fwd_sm90a<D, 128, 2>` with `SM90A_ROWS` in attention_sm90a.cu.
const ROWS: usize = 128;
const KEYS: usize = 128;
const STAGES: usize = 2;
/// A producer warpgroup and two consumer warpgroups.
pub(super) const THREADS: u32 = 384;
/// Columns of one TMA box: one 128-byte swizzle span of bf16.
const BOX_COLS: usize = 64;

/// The Hopper forward, on probation: `ENGINE_ATTENTION=portable` switches it off.
pub(super) const SM90A: Guarded = Guarded {
    kernel: "sm90a attention kernel",
    env: "ENGINE_ATTENTION",
    off: "portable",
    off_means: "the portable kernels only",
    fallback: "the portable kernel",
};

/// One kernel of `cuda/attention_sm90a.cu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct HopperKernel {
    pub name: &'static str,
    pub head_dim: usize,
}

pub(super) const SM90A_D128: HopperKernel = HopperKernel { name: "attention_fwd_sm90a_d128", head_dim: 128 };
pub(super) const SM90A_D64: HopperKernel = HopperKernel { name: "attention_fwd_sm90a_d64", head_dim: 64 };

impl HopperKernel {
    /// Dynamic shared memory as `flash_fwd_sm90a` lays it out: 1 KiB of slack to round the base
    /// up to the 1024-byte boundary of the 128-byte swizzle pattern, the Q tile, and `STAGES`
    /// K and V tiles.
    pub const fn shared_bytes(&self) -> usize {
        1024 + ROWS * self.head_dim * 2 + 2 * STAGES * KEYS * self.head_dim * 2
    }
}

/// Whether the GPU runs the sm90a module at all: compute_90a code is for compute capability 9.0
/// exactly (arch-specific PTX, JIT-compiled for no other architecture).
pub(super) fn runs_on(compute_capability: (i32, i32)) -> bool {
    compute_capability == (9, 0)
}

/// The Hopper kernel for these inputs, or why it cannot take them (one line).
pub(super) fn kernel_for(d: usize, lq: usize, lk: usize, pairs: usize, aligned: bool) -> Result<HopperKernel> {
    let kernel = match d {
        128 => SM90A_D128,
        64 => SM90A_D64,
        _ => bail!("the sm90a attention kernel takes head_dim 64 or 128, the inputs have {d}"),
    };
    ensure!(aligned, "the sm90a attention kernel needs 16-byte-aligned q, k, v and out (TMA addresses)");
    ensure!(lq > 0 && lk > 0, "the sm90a attention kernel needs at least one query and one key (lq {lq}, lk {lk})");
    TensorMapSpec::new(d, lq, pairs, ROWS)?;
    TensorMapSpec::new(d, lk, pairs, KEYS)?;
    Ok(kernel)
}

/// The arguments of `cuTensorMapEncodeTiled` for one of q, k, v: a bf16 tensor `[pairs, len, d]`
/// (batch x heads, tokens, head dim) seen as 3-D with the head dim innermost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct TensorMapSpec {
    /// Elements along each dimension, innermost first: `{d, len, pairs}`.
    pub dims: [u64; 3],
    /// Bytes between consecutive indices of dimensions 1 and 2 (dimension 0 is contiguous).
    pub strides: [u64; 2],
    /// Elements copied per dimension: 64 columns (one 128-byte swizzle span), `rows` rows, 1 head.
    pub box_dims: [u32; 3],
}

impl TensorMapSpec {
    /// Refuses what the driver would (cuTensorMapEncodeTiled's requirements), with the reason.
    pub fn new(d: usize, len: usize, pairs: usize, rows: usize) -> Result<Self> {
        const MAX_DIM: u64 = 1 << 32;
        const MAX_STRIDE: u64 = 1 << 40;
        ensure!(d % BOX_COLS == 0, "TMA tensor map: head_dim {d} is not a multiple of the {BOX_COLS}-column box");
        ensure!(rows > 0 && rows <= 256, "TMA tensor map: a box of {rows} rows (1..=256 allowed)");
        let dims = [d as u64, len as u64, pairs as u64];
        for (what, n) in ["head_dim", "tokens", "batch x heads"].into_iter().zip(dims) {
            ensure!(n > 0 && n <= MAX_DIM, "TMA tensor map: {what} {n} is outside 1..=2^32");
        }
        let strides = [dims[0] * 2, dims[0] * 2 * dims[1]];
        for s in strides {
            ensure!(s % 16 == 0 && s < MAX_STRIDE, "TMA tensor map: a stride of {s} bytes (must be a multiple of 16 below 2^40)");
        }
        Ok(TensorMapSpec { dims, strides, box_dims: [BOX_COLS as u32, rows as u32, 1] })
    }
}

/// A tensor map as the kernel parameter it is: 128 opaque bytes, aligned as the driver wants.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct TensorMap(sys::CUtensorMap);

// SAFETY: plain bytes; the kernel declares the parameter as a 128-byte CUtensorMap, and cudarc
// passes the address of the value, from which the driver copies the parameter's declared size.
unsafe impl DeviceRepr for TensorMap {}

fn encode(spec: &TensorMapSpec, base: u64) -> Result<TensorMap> {
    ensure!(base % 16 == 0, "TMA tensor map: the address {base:#x} is not 16-byte aligned");
    let mut map = TensorMap(sys::CUtensorMap { opaque: [0; 16] });
    let element_strides = [1u32; 3];
    // SAFETY: every array holds the rank (3) entries the call reads (strides: rank - 1); the map is
    // written in place and its alignment (128) exceeds the 64 bytes the driver requires.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map.0,
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            base as *mut std::ffi::c_void,
            spec.dims.as_ptr(),
            spec.strides.as_ptr(),
            spec.box_dims.as_ptr(),
            element_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            // Zeros outside the tensor: the kernel's tails rely on it.
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .map_err(|e| anyhow!("cuTensorMapEncodeTiled refused {spec:?}: {e}"))?;
    }
    Ok(map)
}

fn address(b: &CudaBackend, s: &CudaSlice<bf16>) -> u64 {
    let (ptr, _sync) = s.device_ptr(b.stream());
    ptr
}

/// Shapes of one launch, as `attention::run` has checked them.
pub(super) struct Launch {
    pub pairs: usize,
    pub heads: i32,
    pub lq: usize,
    pub lk: usize,
    pub scale_log2: f32,
}

/// Runs `kernel` on q, k, v into `out` (and `lse` when given); shapes checked by the caller.
pub(super) fn launch(
    b: &CudaBackend,
    kernel: HopperKernel,
    (q, k, v): (&CudaSlice<bf16>, &CudaSlice<bf16>, &CudaSlice<bf16>),
    out: &mut CudaSlice<bf16>,
    lse: Option<&mut CudaSlice<f32>>,
    shape: &Launch,
) -> Result<()> {
    let d = kernel.head_dim;
    let tq = encode(&TensorMapSpec::new(d, shape.lq, shape.pairs, ROWS)?, address(b, q))?;
    let tk = encode(&TensorMapSpec::new(d, shape.lk, shape.pairs, KEYS)?, address(b, k))?;
    let tv = encode(&TensorMapSpec::new(d, shape.lk, shape.pairs, KEYS)?, address(b, v))?;
    let f = b.function(MODULE, kernel.name)?;
    let smem = kernel.shared_bytes();
    b.stream().context().bind_to_thread()?;
    f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).with_context(|| {
        format!("attention: kernel {} needs {smem} bytes of shared memory per block, more than this GPU allows", kernel.name)
    })?;
    let cfg = LaunchConfig {
        grid_dim: (shape.lq.div_ceil(ROWS) as u32, shape.pairs as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (lq32, lk32) = (super::i32_arg("attention", shape.lq)?, super::i32_arg("attention", shape.lk)?);
    let no_lse = 0u64; // a null pointer: the kernel skips the log-sum-exp
    let mut l = b.stream().launch_builder(&f);
    l.arg(&tq).arg(&tk).arg(&tv).arg(out);
    match lse {
        Some(s) => l.arg(s),
        None => l.arg(&no_lse),
    };
    l.arg(&shape.heads).arg(&lq32).arg(&lk32).arg(&shape.scale_log2);
    // SAFETY: the tensor maps describe exactly q ([pairs, lq, d]), k and v ([pairs, lk, d]), which
    // outlive the launch on this stream; out holds pairs * lq * d elements in the merged layout and
    // lse (when given) pairs * lq; the grid covers every query row once and the kernel stores no
    // row past lq. Argument order and types match the kernel's signature.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// Probe shape: two heads of 300 tokens, deliberately no multiple of the 128-row and 128-key
/// tiles, head dim 128 (FLUX's).
const PROBE: [usize; 4] = [1, 2, 300, 128];

/// Runs the probe through both kernels: Ok(()) when they agree, Err(reason) when the Hopper
/// kernel fails to launch or disagrees.
fn probe(b: &CudaBackend) -> std::result::Result<(), String> {
    let [batch, heads, l, d] = PROBE;
    let input = |seed: u64| {
        let values = crate::sampler::gaussian_noise(batch * heads * l * d, seed);
        b.input(&HostTensor::from_f32(PROBE.to_vec(), values))
    };
    let run = || -> Result<[Vec<f32>; 4]> {
        let (q, k, v) = (input(0x5e90a)?, input(0x5e90b)?, input(0x5e90c)?);
        let (out_h, lse_h) = attention::forward_routed(b, &q, &k, &v, attention::Route::Sm90a)?;
        let (out_p, lse_p) = attention::forward_routed(b, &q, &k, &v, attention::Route::Portable)?;
        let host = |t: &T| -> Result<Vec<f32>> { Ok(b.download(t)?.to_f32()) };
        Ok([host(&out_h)?, host(&lse_h)?, host(&out_p)?, host(&lse_p)?])
    };
    let [out_h, lse_h, out_p, lse_p] = run().map_err(|e| format!("it failed on the start-up probe: {e:#}"))?;
    let shape = format!("q {PROBE:?}");
    compare("output", &out_h, &out_p).map_err(|e| format!("it differs from the portable kernel on the start-up probe ({shape}, {e})"))?;
    compare("log-sum-exp", &lse_h, &lse_p)
        .map_err(|e| format!("it differs from the portable kernel on the start-up probe ({shape}, {e})"))?;
    Ok(())
}

/// At `CudaBackend` initialisation: reads `ENGINE_ATTENTION` and, on compute capability 9.0 with
/// the policy `auto`, probes the Hopper kernel and enables it for the default dispatch when it
/// agrees with the portable kernel. A disagreement or a failed launch disables it with one warning
/// line on stderr; a failure that leaves the GPU unusable (a fault inside the kernel is sticky)
/// fails the initialisation, naming the way around it.
pub(super) fn enable_after_probe(b: &CudaBackend) -> Result<()> {
    if !SM90A.allowed()? || !b.modules.contains_key(MODULE) {
        return Ok(());
    }
    SM90A.settle(b, probe(b), &b.sm90a_attention)
}

/// Which attention forward to run, for the self-test and `engine kernels`, which compare the
/// kernels side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AttentionKernel {
    /// The portable tensor-core (or SIMT) kernels of attention.cu, whatever the GPU.
    Portable,
    /// The Hopper kernel of attention_sm90a.cu, whether or not the start-up probe enabled it.
    Sm90a,
}

impl AttentionKernel {
    pub const ALL: [AttentionKernel; 2] = [AttentionKernel::Portable, AttentionKernel::Sm90a];

    /// The name `BackwardOps::attention_kernels` gives it.
    pub fn name(self) -> &'static str {
        match self {
            AttentionKernel::Portable => "portable",
            AttentionKernel::Sm90a => "sm90a",
        }
    }
}

impl CudaBackend {
    /// Whether this GPU has the Hopper attention kernel (compute capability 9.0).
    pub(super) fn has_sm90a_attention(&self) -> bool {
        self.modules.contains_key(MODULE)
    }

    /// Whether the default `attention` uses the Hopper kernel (where the inputs allow): the GPU
    /// has it, `ENGINE_ATTENTION` allows it, and it passed the start-up probe.
    pub(super) fn sm90a_attention_enabled(&self) -> bool {
        self.sm90a_attention.load(Ordering::Relaxed)
    }

    /// Attention forward and log-sum-exp through the chosen kernel; fails with one line when it
    /// cannot take the inputs (`Sm90a` on another GPU, another head dim, ...).
    pub(super) fn attention_using(&self, q: &T, k: &T, v: &T, kernel: AttentionKernel) -> Result<(T, T)> {
        let route = match kernel {
            AttentionKernel::Portable => attention::Route::Portable,
            AttentionKernel::Sm90a => attention::Route::Sm90a,
        };
        attention::forward_routed(self, q, k, v, route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The most shared memory one block may use on Hopper (227 KiB).
    const HOPPER_MAX_SHARED: usize = 227 * 1024;

    #[test]
    fn tensor_maps_describe_one_head_per_outer_index_in_64_column_boxes() {
        // q [2, 3, 300, 128]: 6 heads of 300 rows of 256 bytes.
        let q = TensorMapSpec::new(128, 300, 6, ROWS).unwrap();
        assert_eq!(q.dims, [128, 300, 6]);
        assert_eq!(q.strides, [256, 300 * 256]);
        assert_eq!(q.box_dims, [64, 128, 1]);
        // Head dim 64 with an odd length: one box per row, strides still multiples of 16.
        let k = TensorMapSpec::new(64, 77, 1, KEYS).unwrap();
        assert_eq!(k.dims, [64, 77, 1]);
        assert_eq!(k.strides, [128, 77 * 128]);
        assert_eq!(k.box_dims, [64, 128, 1]);
        // The box's inner extent is exactly the 128-byte swizzle span.
        assert_eq!(k.box_dims[0] as usize * 2, 128);
    }

    #[test]
    fn tensor_maps_refuse_what_the_driver_refuses() {
        let err = |r: Result<TensorMapSpec>| r.unwrap_err().to_string();
        assert!(err(TensorMapSpec::new(96, 10, 1, ROWS)).contains("head_dim 96"));
        assert!(err(TensorMapSpec::new(128, 0, 1, ROWS)).contains("tokens 0"));
        assert!(err(TensorMapSpec::new(128, 10, 0, ROWS)).contains("batch x heads 0"));
        assert!(err(TensorMapSpec::new(128, (1 << 32) + 1, 1, ROWS)).contains("outside 1..=2^32"));
        assert!(err(TensorMapSpec::new(128, 1 << 32, 1, ROWS)).contains("below 2^40"));
        assert!(err(TensorMapSpec::new(128, 10, 1, 257)).contains("257 rows"));
    }

    #[test]
    fn the_kernel_is_chosen_by_head_dim_and_refuses_other_inputs_with_a_reason() {
        assert_eq!(kernel_for(128, 300, 300, 2, true).unwrap(), SM90A_D128);
        assert_eq!(kernel_for(64, 1, 1, 1, true).unwrap(), SM90A_D64);
        let why = |r: Result<HopperKernel>| r.unwrap_err().to_string();
        assert!(why(kernel_for(96, 300, 300, 2, true)).contains("head_dim 64 or 128"));
        assert!(why(kernel_for(512, 64, 64, 1, true)).contains("512"));
        assert!(why(kernel_for(128, 300, 300, 2, false)).contains("16-byte-aligned"));
        assert!(why(kernel_for(128, 300, 0, 2, true)).contains("lk 0"));
    }

    #[test]
    fn the_module_runs_on_compute_capability_9_0_only() {
        assert!(runs_on((9, 0)));
        for cc in [(8, 0), (8, 6), (8, 9), (10, 0), (12, 0)] {
            assert!(!runs_on(cc), "{cc:?}");
        }
    }

    #[test]
    fn engine_attention_takes_auto_or_portable_and_names_a_bad_value() {
        for allowed in [None, Some(""), Some("auto")] {
            assert!(SM90A.allowed_by(allowed).unwrap(), "{allowed:?}");
        }
        assert!(!SM90A.allowed_by(Some("portable")).unwrap());
        assert!(!SM90A.allowed_by(Some(" Portable ")).unwrap());
        let e = SM90A.allowed_by(Some("hopper")).unwrap_err().to_string();
        assert!(e.contains("ENGINE_ATTENTION") && e.contains("hopper") && e.contains("portable"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn shared_memory_matches_the_kernel_layout_and_fits_hopper() {
        // Q 128 x 128 + 2 stages x (K + V) 128 x 128, bf16, + 1 KiB alignment slack.
        assert_eq!(SM90A_D128.shared_bytes(), 1024 + 32 * 1024 + 4 * 32 * 1024);
        assert_eq!(SM90A_D64.shared_bytes(), 1024 + 16 * 1024 + 4 * 16 * 1024);
        for k in [SM90A_D128, SM90A_D64] {
            // Plus the kernel's static shared memory (its mbarriers, under 128 bytes).
            assert!(k.shared_bytes() + 128 <= HOPPER_MAX_SHARED, "{k:?}");
        }
    }
}
