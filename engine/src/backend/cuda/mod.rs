//! The CUDA backend: bf16 activations and weights, f32 accumulation, f32 for exact scalars
//! (timesteps, guidance) and the RoPE table. GEMMs go through cuBLASLt (`gemm.rs`); every other
//! op is a hand-written kernel in `cuda/<family>.cu`, launched by the file of the same name here.
//!
//! Nothing CUDA is linked: cudarc opens libcuda and libcublasLt at run time. Its loader panics
//! when a library or a symbol is missing, so `CudaBackend::new` probes the libraries first and runs
//! its whole initialisation (a kernel launch and a GEMM included, so that every entry point used
//! later is resolved) under `catch_unwind`; any failure becomes one error line.
//!
//! Memory: allocations are stream-ordered (`cuMemAllocAsync`) from the device's default pool,
//! whose release threshold is raised so that freed activations stay cached and are reused by the
//! next allocation of the step instead of going back to the driver.

mod attention;
mod attention_hopper;
mod backward;
mod elementwise;
mod embed;
mod fields;
mod gemm;
mod layout;
mod nccl;
mod norm;
mod pool;
mod probation;
mod rope;
mod spatial;

pub mod optim;
pub mod sobolev;

use attention_hopper::AttentionKernel;
mod training;

use super::profile::OpClass;
use super::profile::{Clock, OpProfiler, OpTimes, TransferMeter};
use super::{expect_shape, shapes, Backend, MemoryPeak};
use crate::tensor::Tensor;
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::sys::{CUdevice_attribute, CUmemPool_attribute};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig, PushKernelArg,
};
use half::{bf16, f16};
use loaders::{DType, HostData, HostTensor};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Device memory of one tensor, in its element type.
pub enum CudaStorage {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
}

impl CudaStorage {
    fn dtype(&self) -> DType {
        match self {
            CudaStorage::F32(_) => DType::F32,
            CudaStorage::F16(_) => DType::F16,
            CudaStorage::BF16(_) => DType::BF16,
        }
    }
}

pub struct CudaBackend {
    stream: Arc<CudaStream>,
    blas: CudaBlasLT,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    /// Fill every fresh output with NaN before the kernel writes it (the self-test's poison), so
    /// that an element a kernel forgets to write cannot pass as a stale correct value.
    poison: AtomicBool,
    /// Seeds successive `placeholder` tensors differently.
    placeholders: AtomicU64,
    device_name: String,
    compute_capability: (i32, i32),
    /// Op timing for benchmarks (`Backend::start_op_timing`), on CUDA events.
    op_times: OpProfiler<CudaEvent>,
    /// What crosses between host and device (`Backend::bytes_moved`).
    transfers: TransferMeter,
    /// The Sobolev operators' tables on the device, uploaded once per operator (training.rs).
    sobolev_tables: Mutex<HashMap<sobolev::OperatorKey, Arc<sobolev::CudaSobolev>>>,
    /// Whether the default attention forward uses the Hopper kernel: set at initialisation when
    /// the GPU has it, `ENGINE_ATTENTION` allows it and its start-up probe agreed with the
    /// portable kernel (attention_hopper.rs).
    sm90a_attention: AtomicBool,
    /// Whether the default attention backward uses the tensor-core kernels: set at
    /// initialisation when `ENGINE_ATTENTION_BWD` allows them and their start-up probe agreed
    /// with the SIMT ones (attention.rs).
    mma_attention_backward: AtomicBool,
}

type T = Tensor<CudaBackend>;

/// Whether a usable CUDA driver library is present, answered without panicking.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its known names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The GPUs the driver shows this process (CUDA_VISIBLE_DEVICES applied); 0 without a driver.
pub fn gpu_count() -> usize {
    if !driver_present() {
        return 0;
    }
    without_panics(|| Ok(CudaContext::device_count()?)).map_or(0, |n| n.max(0) as usize)
}

impl CudaBackend {
    /// Opens GPU `ordinal`. Fails with one line (never panics) when there is no driver, no GPU,
    /// no cuBLASLt, or the driver is too old for the embedded PTX.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            bail!("no CUDA driver on this machine (libcuda.so could not be loaded); run with --device cpu");
        }
        // SAFETY: only tries to dlopen the library by its known names.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            bail!(
                "CUDA driver found but not cuBLASLt (libcublasLt.so.13): put the CUDA toolkit's lib64, or the \
                 nvidia/cublas/lib folder of a PyTorch install, on LD_LIBRARY_PATH"
            );
        }
        without_panics(|| Self::init(ordinal)).context("CUDA initialisation failed")
    }

    fn init(ordinal: usize) -> Result<Self> {
        let count = CudaContext::device_count()?;
        ensure!(count > 0, "the CUDA driver sees no GPU");
        ensure!((ordinal as i32) < count, "GPU {ordinal} requested, the driver sees {count}");
        let ctx = CudaContext::new(ordinal)?;
        // One stream: cudarc's per-allocation events only matter across streams.
        // SAFETY: every op of this backend runs on the single stream below.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        keep_freed_memory_cached(&ctx)?;
        let compute_capability = (
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        ensure!(
            compute_capability >= (8, 0),
            "GPU compute capability {}.{}: the kernels need 8.0 (Ampere) or newer",
            compute_capability.0,
            compute_capability.1
        );
        let hopper = attention_hopper::runs_on(compute_capability);
        let mut modules = HashMap::new();
        for &(name, ptx) in kernels::MODULES {
            if name.ends_with("_sm90a") && !hopper {
                continue;
            }
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .with_context(|| format!("loading kernels {name}.ptx (a driver older than CUDA 13.0 cannot JIT this PTX)"))?;
            modules.insert(name, module);
        }
        let blas = CudaBlasLT::new(stream.clone())?;
        let backend = CudaBackend {
            stream,
            blas,
            modules,
            functions: Mutex::new(HashMap::new()),
            poison: AtomicBool::new(false),
            placeholders: AtomicU64::new(0),
            device_name: ctx.name()?,
            compute_capability,
            op_times: OpProfiler::new(),
            transfers: TransferMeter::new(),
            sobolev_tables: Mutex::new(HashMap::new()),
            sm90a_attention: AtomicBool::new(false),
            mma_attention_backward: AtomicBool::new(false),
        };
        backend.warm_up()?;
        attention_hopper::enable_after_probe(&backend)?;
        attention::enable_mma_backward_after_probe(&backend)?;
        Ok(backend)
    }

    /// Runs a tiny GEMM and a kernel so that every library entry point the backend uses is
    /// resolved now, inside `new`'s panic guard, rather than in the middle of a job.
    fn warm_up(&self) -> Result<()> {
        let x = self.input(&HostTensor::from_f32(vec![2, 8], (0..16).map(|i| i as f32).collect()))?;
        let w = self.upload(&HostTensor::new(vec![4, 8], HostData::BF16(vec![bf16::ONE; 32])))?;
        let y = self.linear_gelu(&x, &w, None)?;
        let y = self.add(&y, &y)?;
        self.download(&y)?;
        Ok(())
    }

    /// The GPU's marketing name and compute capability, e.g. "NVIDIA H100 80GB HBM3 (sm_90)".
    pub fn device_description(&self) -> String {
        format!("{} (sm_{}{})", self.device_name, self.compute_capability.0, self.compute_capability.1)
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Runs `op`, attributing its device time to `class` while op timing is on.
    fn timed<R>(&self, class: OpClass, op: impl FnOnce() -> Result<R>) -> Result<R> {
        self.op_times.time(&EventClock(&self.stream), class, op)
    }

    /// A kernel by module (the `cuda/<module>.cu` file) and name, loaded once.
    fn function(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap();
        if let Some(f) = cache.get(&(module, name)) {
            return Ok(f.clone());
        }
        let m = self.modules.get(module).ok_or_else(|| anyhow!("kernel module {module} is not loaded on this GPU"))?;
        let f = m.load_function(name).with_context(|| format!("kernel {name} missing from {module}.ptx"))?;
        cache.insert((module, name), f.clone());
        Ok(f)
    }

    /// Uninitialised device memory for `n` elements (NaN-filled when poisoning).
    fn alloc<E: cudarc::driver::DeviceRepr>(&self, n: usize) -> Result<CudaSlice<E>> {
        // SAFETY: every caller writes the whole buffer before reading it (the poison makes a
        // violation visible in the self-test).
        let s = unsafe { self.stream.alloc::<E>(n.max(1)) }.map_err(|e| out_of_memory(e, n * size_of::<E>()))?;
        if self.poison.load(Ordering::Relaxed) {
            let (ptr, _guard) = s.device_ptr(&self.stream);
            // SAFETY: ptr covers the n * size_of::<E>() bytes just allocated.
            unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xff, n.max(1) * size_of::<E>(), self.stream.cu_stream())? };
        }
        Ok(s)
    }

    fn alloc_bf16(&self, n: usize) -> Result<CudaSlice<bf16>> {
        self.alloc::<bf16>(n)
    }
}

/// Marks in the stream as CUDA events; the time between two is the device's.
struct EventClock<'a>(&'a Arc<CudaStream>);

impl Clock for EventClock<'_> {
    type Mark = CudaEvent;

    fn mark(&self) -> Result<CudaEvent> {
        // Timing events (not CU_EVENT_DISABLE_TIMING, which cudarc uses by default).
        let event = self.0.context().new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        event.record(self.0)?;
        Ok(event)
    }

    fn seconds(&self, start: &CudaEvent, end: &CudaEvent) -> Result<f64> {
        Ok(start.elapsed_ms(end)? as f64 / 1e3)
    }
}

fn out_of_memory(e: DriverError, bytes: usize) -> anyhow::Error {
    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        super::error::DeviceOutOfMemory { bytes }.into()
    } else {
        anyhow::Error::from(e)
    }
}

fn default_pool(ctx: &Arc<CudaContext>) -> Result<cudarc::driver::sys::CUmemoryPool> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: writes one pool handle for a valid device.
    unsafe { cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()? };
    Ok(pool)
}

/// One of the pool's memory attributes (all u64 byte counts).
fn pool_attribute(pool: cudarc::driver::sys::CUmemoryPool, attr: CUmemPool_attribute) -> Result<u64> {
    let mut v = 0u64;
    // SAFETY: the pool's memory attributes are u64s.
    unsafe { cudarc::driver::sys::cuMemPoolGetAttribute(pool, attr, (&mut v) as *mut u64 as *mut _).result()? };
    Ok(v)
}

fn keep_freed_memory_cached(ctx: &Arc<CudaContext>) -> Result<()> {
    let pool = default_pool(ctx)?;
    let mut threshold = u64::MAX;
    // SAFETY: the release threshold attribute takes a u64.
    unsafe {
        cudarc::driver::sys::cuMemPoolSetAttribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold) as *mut u64 as *mut _,
        )
        .result()?
    };
    Ok(())
}

/// Runs `f` turning a panic (cudarc's loader on a missing library or symbol) into an error,
/// without the panic message and backtrace on stderr.
fn without_panics<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    match result {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown failure");
            Err(anyhow!("{msg}"))
        }
    }
}

/// One thread per element, 256 per block.
fn elementwise_config(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// The bf16 device memory of a tensor, or an error naming the op and operand.
fn bf16_of<'a>(op: &str, what: &str, t: &'a T) -> Result<&'a CudaSlice<bf16>> {
    match t.storage() {
        CudaStorage::BF16(s) => Ok(s),
        other => bail!("{op}: {what} is {} on the GPU, expected BF16 (weights are loaded as bf16 for CUDA)", other.dtype()),
    }
}

fn f32_of<'a>(op: &str, what: &str, t: &'a T) -> Result<&'a CudaSlice<f32>> {
    match t.storage() {
        CudaStorage::F32(s) => Ok(s),
        other => bail!("{op}: {what} is {} on the GPU, expected F32", other.dtype()),
    }
}

fn bf16_tensor(s: CudaSlice<bf16>, shape: Vec<usize>) -> T {
    Tensor::from_storage(CudaStorage::BF16(s), shape)
}

/// Kernel arguments are 32-bit where sizes allow; refuse (rather than wrap) beyond that.
fn i32_arg(op: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| anyhow!("{op}: size {n} exceeds the kernels' 32-bit indexing"))
}

impl Backend for CudaBackend {
    type Storage = CudaStorage;

    fn name(&self) -> String {
        format!("cuda: {}", self.device_description())
    }

    fn storage_dtype(storage: &CudaStorage) -> DType {
        storage.dtype()
    }

    fn weight_dtype(&self) -> Option<DType> {
        Some(DType::BF16)
    }

    fn activation_dtype(&self) -> DType {
        DType::BF16
    }

    /// The driver's free memory plus what the pool holds reserved but unused (freed activations
    /// stay cached there, and the next allocation reuses them).
    fn free_memory(&self) -> Result<Option<u64>> {
        let ctx = self.stream.context();
        let pool = default_pool(ctx)?;
        let reserved = pool_attribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
        let used = pool_attribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
        let (free, _) = ctx.mem_get_info()?;
        Ok(Some(free as u64 + reserved.saturating_sub(used)))
    }

    fn bytes_moved(&self) -> (u64, u64) {
        self.transfers.read()
    }

    fn poison_outputs(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()?;
        Ok(())
    }

    fn memory_peak(&self) -> Result<Option<MemoryPeak>> {
        let ctx = self.stream.context();
        let high = pool_attribute(default_pool(ctx)?, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
        let (free, total) = ctx.mem_get_info()?;
        Ok(Some(MemoryPeak { allocator_high_water: high, driver_used: (total - free) as u64 }))
    }

    fn reset_memory_peak(&self) -> Result<()> {
        self.stream.synchronize()?;
        let mut zero = 0u64;
        // SAFETY: resetting the high-water mark takes a u64 zero.
        unsafe {
            cudarc::driver::sys::cuMemPoolSetAttribute(
                default_pool(self.stream.context())?,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero) as *mut u64 as *mut _,
            )
            .result()?;
        }
        Ok(())
    }

    fn start_op_timing(&self) -> Result<bool> {
        self.op_times.start();
        Ok(true)
    }

    fn take_op_times(&self) -> Result<OpTimes> {
        self.stream.synchronize()?;
        self.op_times.take(&EventClock(&self.stream))
    }

    fn upload(&self, t: &HostTensor) -> Result<T> {
        self.transfers.up(t.len() * t.dtype().size());
        self.timed(OpClass::Transfer, || {
            let s = match &t.data {
                HostData::F32(v) => CudaStorage::F32(self.stream.clone_htod(v)?),
                HostData::F16(v) => CudaStorage::F16(self.stream.clone_htod(v)?),
                HostData::BF16(v) => CudaStorage::BF16(self.stream.clone_htod(v)?),
            };
            Ok(Tensor::from_storage(s, t.shape.clone()))
        })
    }

    fn input(&self, t: &HostTensor) -> Result<T> {
        self.transfers.up(t.len() * DType::BF16.size());
        self.timed(OpClass::Transfer, || {
            let v: Vec<bf16> = t.to_f32().iter().map(|&x| bf16::from_f32(x)).collect();
            Ok(bf16_tensor(self.stream.clone_htod(&v)?, t.shape.clone()))
        })
    }

    /// Made on the device, never in host memory (a FLUX.1-dev-size model for benchmarks): bf16
    /// storage holds seeded uniform values scaled like an initialisation (`sqrt(3 / fan_in)`
    /// bounds, fan_in the last dim; 0.02-scale for vectors), so that benchmarks run on non-zero
    /// data; other dtypes hold zeros.
    fn placeholder(&self, shape: &[usize], dtype: DType) -> Result<T> {
        self.timed(OpClass::Transfer, || {
            let n: usize = shape.iter().product();
            let oom = |e| out_of_memory(e, n * dtype.size());
            let s = match dtype {
                DType::F32 => CudaStorage::F32(self.stream.alloc_zeros(n).map_err(oom)?),
                DType::F16 => CudaStorage::F16(self.stream.alloc_zeros(n).map_err(oom)?),
                DType::BF16 => {
                    let mut x = self.alloc::<bf16>(n)?;
                    let bound = match shape {
                        [.., fan_in] if shape.len() >= 2 => (3.0 / (*fan_in).max(1) as f32).sqrt(),
                        _ => 0.02 * 3f32.sqrt(),
                    };
                    let seed = self.placeholders.fetch_add(1, Ordering::Relaxed);
                    let f = self.function("elementwise", "fill_uniform_bf16")?;
                    let n64 = n as i64;
                    let cfg = LaunchConfig {
                        grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let mut l = self.stream.launch_builder(&f);
                    l.arg(&mut x).arg(&seed).arg(&bound).arg(&n64);
                    // SAFETY: x holds n elements; the kernel writes each once (grid-strided).
                    unsafe { l.launch(cfg) }?;
                    CudaStorage::BF16(x)
                }
            };
            Ok(Tensor::from_storage(s, shape.to_vec()))
        })
    }

    fn download(&self, t: &T) -> Result<HostTensor> {
        self.transfers.down(t.elem_count() * t.dtype().size());
        self.timed(OpClass::Transfer, || {
            let data = match t.storage() {
                CudaStorage::F32(s) => self.stream.clone_dtoh(s)?,
                CudaStorage::F16(s) => self.stream.clone_dtoh(s)?.iter().map(|x| x.to_f32()).collect(),
                CudaStorage::BF16(s) => self.stream.clone_dtoh(s)?.iter().map(|x| x.to_f32()).collect(),
            };
            Ok(HostTensor::from_f32(t.shape().to_vec(), data))
        })
    }

    fn zeros(&self, shape: &[usize]) -> Result<T> {
        let n: usize = shape.iter().product();
        let s = self.stream.alloc_zeros::<bf16>(n.max(1)).map_err(|e| out_of_memory(e, n * 2))?;
        Ok(bf16_tensor(s, shape.to_vec()))
    }

    fn cast(&self, x: &T, dtype: DType) -> Result<T> {
        self.timed(OpClass::Elementwise, || fields::cast(self, x, dtype))
    }

    fn linear(&self, x: &T, w: &T, bias: Option<&T>) -> Result<T> {
        self.timed(OpClass::of_linear(x.rank()), || gemm::linear(self, x, w, bias, gemm::Epilogue::None))
    }

    fn linear_gelu(&self, x: &T, w: &T, bias: Option<&T>) -> Result<T> {
        self.timed(OpClass::of_linear(x.rank()), || gemm::linear(self, x, w, bias, gemm::Epilogue::GeluTanh))
    }

    fn lora_add(&self, y: T, x: &T, down: &T, up: &T, up_bias: Option<&T>, scale: f32, offset: usize) -> Result<T> {
        self.timed(OpClass::of_lora(x.rank()), || gemm::lora_add(self, y, x, down, up, up_bias, scale, offset))
    }

    fn layer_norm_modulate(&self, x: &T, shift: &T, scale: &T, eps: f32) -> Result<T> {
        self.timed(OpClass::Elementwise, || norm::layer_norm_modulate(self, x, shift, scale, eps))
    }

    fn qk_norm_rope(&self, x: &T, heads: usize, q_scale: &T, k_scale: &T, pe: &T, eps: f32) -> Result<[T; 3]> {
        self.timed(OpClass::Elementwise, || rope::qk_norm_rope(self, x, heads, q_scale, k_scale, pe, eps))
    }

    fn attention(&self, q: &T, k: &T, v: &T) -> Result<T> {
        self.timed(OpClass::Attention, || attention::forward(self, q, k, v))
    }

    fn attention_with_lse(&self, q: &T, k: &T, v: &T) -> Result<(T, T)> {
        self.timed(OpClass::Attention, || attention::forward_with_lse(self, q, k, v))
    }

    fn attention_bias(&self, q: &T, k: &T, v: &T, bias: &T, scale: f32) -> Result<T> {
        self.timed(OpClass::Attention, || attention::forward_bias(self, q, k, v, bias, scale))
    }

    fn rms_norm(&self, x: &T, weight: &T, eps: f32) -> Result<T> {
        self.timed(OpClass::Elementwise, || norm::rms_norm(self, x, weight, eps))
    }

    fn gelu_tanh(&self, x: &T) -> Result<T> {
        self.timed(OpClass::Elementwise, || elementwise::unary(self, elementwise::Unary::GeluTanh, x))
    }

    fn silu(&self, x: &T) -> Result<T> {
        self.timed(OpClass::Elementwise, || elementwise::unary(self, elementwise::Unary::Silu, x))
    }

    fn add(&self, a: &T, b: &T) -> Result<T> {
        self.timed(OpClass::Elementwise, || elementwise::binary(self, elementwise::Binary::Add, a, b))
    }

    fn mul(&self, a: &T, b: &T) -> Result<T> {
        self.timed(OpClass::Elementwise, || elementwise::binary(self, elementwise::Binary::Mul, a, b))
    }

    fn gated_residual(&self, x: &T, gate: &T, y: &T) -> Result<T> {
        self.timed(OpClass::Elementwise, || elementwise::gated_residual(self, x, gate, y))
    }

    fn concat(&self, xs: &[&T], dim: usize) -> Result<T> {
        self.timed(OpClass::Layout, || layout::concat(self, xs, dim))
    }

    fn narrow(&self, x: &T, dim: usize, start: usize, len: usize) -> Result<T> {
        self.timed(OpClass::Layout, || layout::narrow(self, x, dim, start, len))
    }

    fn timestep_embedding(&self, t: &T, dim: usize, max_period: f32, time_factor: f32) -> Result<T> {
        self.timed(OpClass::Elementwise, || embed::timestep_embedding(self, t, dim, max_period, time_factor))
    }

    fn conv2d(&self, x: &T, w: &T, bias: Option<&T>, stride: usize, pad: [usize; 4]) -> Result<T> {
        self.timed(OpClass::Conv, || spatial::conv2d(self, x, w, bias, stride, pad))
    }

    fn group_norm(&self, x: &T, groups: usize, weight: &T, bias: &T, eps: f32) -> Result<T> {
        self.timed(OpClass::Elementwise, || norm::group_norm(self, x, groups, weight, bias, eps))
    }

    fn group_norm_stats(&self, x: &T, groups: usize, rows: Range<usize>, cols: Range<usize>) -> Result<T> {
        self.timed(OpClass::Elementwise, || norm::group_norm_stats(self, x, groups, rows, cols))
    }

    fn group_norm_apply(&self, x: &T, stats: &T, weight: &T, bias: &T) -> Result<T> {
        self.timed(OpClass::Elementwise, || norm::group_norm_apply(self, x, stats, weight, bias))
    }

    fn upsample_nearest2x(&self, x: &T) -> Result<T> {
        self.timed(OpClass::Layout, || spatial::upsample_nearest2x(self, x))
    }

    fn transpose_last2(&self, x: &T) -> Result<T> {
        self.timed(OpClass::Layout, || layout::transpose_last2(self, x))
    }

    fn pixel_unshuffle(&self, x: &T, f: usize) -> Result<T> {
        self.timed(OpClass::Layout, || spatial::pixel_shuffle(self, x, f, spatial::Direction::SpaceToDepth))
    }

    fn pixel_shuffle(&self, x: &T, f: usize) -> Result<T> {
        self.timed(OpClass::Layout, || spatial::pixel_shuffle(self, x, f, spatial::Direction::DepthToSpace))
    }

    fn affine(&self, x: &T, scale: f32, offset: f32) -> Result<T> {
        self.timed(OpClass::Elementwise, || elementwise::affine(self, x, scale, offset))
    }

    fn relu(&self, x: &T) -> Result<T> {
        self.timed(OpClass::Elementwise, || elementwise::relu(self, x))
    }

    fn max_pool2d(&self, x: &T, kernel: usize, stride: usize) -> Result<T> {
        self.timed(OpClass::Elementwise, || pool::max_pool2d(self, x, kernel, stride))
    }

    fn blur_pool2d(&self, x: &T, filter: &T, stride: usize, pad: [usize; 4]) -> Result<T> {
        self.timed(OpClass::Elementwise, || pool::depthwise_pool2d(self, x, filter, stride, pad, false))
    }

    fn l2_pool2d(&self, x: &T, filter: &T, stride: usize, pad: [usize; 4]) -> Result<T> {
        self.timed(OpClass::Elementwise, || pool::depthwise_pool2d(self, x, filter, stride, pad, true))
    }
}
