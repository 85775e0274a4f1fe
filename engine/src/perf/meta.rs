//! The meta backend: every op of the `Backend` trait on shapes alone. Storages hold no data, only
//! an id, a dtype and an element count; every op checks its operands as strictly as the CPU
//! backend, then records one event in an op trace: its name, class, model FLOPs (design.md section
//! 11), the storages it read and the storages it created. Dropping a storage records its free.
//! Running the real model code (`Flux::forward_host`, `FluxAe::decode`) on this backend therefore
//! yields the exact sequence of allocations, ops and frees of that code path, at any model size,
//! in a few milliseconds: the FLOP counter and the memory planner read nothing else.
//!
//! Decisions a reader would otherwise have to reverse-engineer:
//! - Dtypes. Op outputs are stored in the backend's activation dtype (bf16 for a GPU plan).
//!   `upload` and `placeholder` keep the dtype they are given; `concat` and `narrow` keep their
//!   input's dtype (the rotary tables are uploaded in f32 and concatenated as such). Operands the
//!   CPU backend reads as activations must be in the activation dtype here; the others (weights,
//!   modulation vectors, rotary tables, timesteps) may be in any dtype, as there.
//! - Per-sample linears. A linear (or LoRA update) whose input has no token dimension, rank <= 2
//!   (`[batch, features]`, one row per sample: the timestep, guidance and vector embedders and
//!   every adaLN modulation) is class `PerSample` and counts no FLOPs, as design.md section 11 says.
//!   Token activations are `[batch, tokens, features]` by the trait's convention (the autoencoder's
//!   attention runs on `[batch, h w, channels]`), so the rank tells the two apart.
//! - Fusion. `linear_gelu` is one op with one output, as the CUDA backend's GEMM epilogue runs it
//!   (the CPU's default body would add a pre-activation buffer).
//! - In-place. `lora_add` updates its `y` in place, as on the CPU; its rank-r intermediate
//!   `x down^T` `[rows, rank]` is recorded as a buffer created by the op and freed right after it.
//! - Op-internal scratch is otherwise not modelled: attention is flash attention (no score
//!   matrix), GEMMs use the planner's fixed workspace.
//! - `download` returns zeros of the right shape (there is no data to copy).

use crate::backend::profile::OpClass;
use crate::backend::shapes::{AttentionDims, ConvGeometry, PoolGeometry, QkDims};
use crate::backend::{expect_shape, Backend};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use loaders::{DType, HostTensor};
use std::sync::{Arc, Mutex, MutexGuard};

/// Names a storage within one backend's trace.
pub type StorageId = usize;

/// Where a storage's bytes come from, which decides where the planner puts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferKind {
    /// Model parameters (`placeholder`): resident, outside the activation arena.
    Weight,
    /// Host data uploaded as is (`upload`): rotary tables, per-sample timesteps and guidance.
    Constant,
    /// Model inputs (`input`).
    Input,
    /// Everything an op computes.
    Activation,
}

/// A storage an op created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buffer {
    pub id: StorageId,
    pub kind: BufferKind,
    pub dtype: DType,
    pub elements: u64,
}

impl Buffer {
    pub fn bytes(&self) -> u64 {
        self.elements * self.dtype.size() as u64
    }
}

/// One op as it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpEvent {
    pub name: &'static str,
    pub class: OpClass,
    /// Model FLOPs by design.md section 11's rules (0 for classes that are not counted).
    pub flops: u64,
    /// Storages read (and, for `lora_add`, updated in place).
    pub inputs: Vec<StorageId>,
    /// Storages created.
    pub outputs: Vec<Buffer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Op(OpEvent),
    /// A storage was dropped.
    Free(StorageId),
}

/// The events of a run, in order.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub events: Vec<Event>,
}

impl Trace {
    pub fn ops(&self) -> impl Iterator<Item = &OpEvent> {
        self.events.iter().filter_map(|e| match e {
            Event::Op(op) => Some(op),
            Event::Free(_) => None,
        })
    }

    /// Every storage created, in creation order.
    pub fn buffers(&self) -> impl Iterator<Item = &Buffer> {
        self.ops().flat_map(|op| &op.outputs)
    }

    /// Parameters: elements of all weight placeholders.
    pub fn parameters(&self) -> u64 {
        self.buffers().filter(|b| b.kind == BufferKind::Weight).map(|b| b.elements).sum()
    }
}

#[derive(Default)]
struct TraceLog {
    events: Vec<Event>,
    next_id: StorageId,
}

/// Locks the log; a panic elsewhere while it was held leaves it consistent (pushes only), so a
/// poisoned lock is taken as is rather than turning every later drop into a panic.
fn lock(log: &Mutex<TraceLog>) -> MutexGuard<'_, TraceLog> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// A storage without data. Dropping it records its free in the trace it came from.
pub struct MetaStorage {
    id: StorageId,
    dtype: DType,
    log: Arc<Mutex<TraceLog>>,
}

impl MetaStorage {
    pub fn id(&self) -> StorageId {
        self.id
    }
}

impl Drop for MetaStorage {
    fn drop(&mut self) {
        lock(&self.log).events.push(Event::Free(self.id));
    }
}

/// The shape-only backend; see the module docs.
pub struct MetaBackend {
    activation_dtype: DType,
    log: Arc<Mutex<TraceLog>>,
}

type T = Tensor<MetaBackend>;

/// What an op creates: a shape, a dtype and a kind.
struct NewBuffer {
    shape: Vec<usize>,
    dtype: DType,
    kind: BufferKind,
}

impl MetaBackend {
    /// `activation_dtype`: how the backend being planned for stores activations (bf16 on GPUs).
    pub fn new(activation_dtype: DType) -> Self {
        MetaBackend { activation_dtype, log: Arc::default() }
    }

    /// The events recorded since the last call. Storages still alive record their frees later.
    pub fn take_trace(&self) -> Trace {
        Trace { events: std::mem::take(&mut lock(&self.log).events) }
    }

    /// Records one op and returns the tensors it created.
    fn record(&self, name: &'static str, class: OpClass, flops: u64, inputs: &[&T], outputs: Vec<NewBuffer>) -> Vec<T> {
        let mut log = lock(&self.log);
        let mut buffers = Vec::with_capacity(outputs.len());
        let mut tensors = Vec::with_capacity(outputs.len());
        for out in outputs {
            let id = log.next_id;
            log.next_id += 1;
            let elements = out.shape.iter().product::<usize>() as u64;
            buffers.push(Buffer { id, kind: out.kind, dtype: out.dtype, elements });
            tensors.push(Tensor::from_storage(MetaStorage { id, dtype: out.dtype, log: Arc::clone(&self.log) }, out.shape));
        }
        let inputs = inputs.iter().map(|t| t.storage().id).collect();
        log.events.push(Event::Op(OpEvent { name, class, flops, inputs, outputs: buffers }));
        tensors
    }

    /// Records an op with one activation output of `shape`.
    fn op(&self, name: &'static str, class: OpClass, flops: u64, inputs: &[&T], shape: Vec<usize>) -> T {
        let out = NewBuffer { shape, dtype: self.activation_dtype, kind: BufferKind::Activation };
        self.record(name, class, flops, inputs, vec![out]).pop().expect("one output recorded")
    }

    /// Errors unless `t` is stored in the activation dtype (where the CPU backend requires f32).
    fn check_activation(&self, op: &str, what: &str, t: &T) -> Result<()> {
        ensure!(
            t.dtype() == self.activation_dtype,
            "{op}: {what} is stored as {} (expected the activation dtype {})",
            t.dtype(),
            self.activation_dtype
        );
        Ok(())
    }

    /// `[B, L, D]` activation with `[B, D]` per-sample operands: returns (B, L, D).
    fn per_sample_dims(&self, op: &str, x: &T, vecs: &[(&str, &T)]) -> Result<(usize, usize, usize)> {
        ensure!(x.rank() == 3, "{op}: x has shape {:?}, expected [batch, tokens, dim]", x.shape());
        self.check_activation(op, "x", x)?;
        let (b, l, d) = (x.dim(0), x.dim(1), x.dim(2));
        for (name, v) in vecs {
            expect_shape(name, op, v.shape(), &[b, d])?;
        }
        Ok((b, l, d))
    }

    /// An op that maps an activation to one of the same shape.
    fn unary(&self, name: &'static str, class: OpClass, x: &T) -> Result<T> {
        self.check_activation(name, "x", x)?;
        Ok(self.op(name, class, 0, &[x], x.shape().to_vec()))
    }

    /// Checks `x [.., in]` against `w [out, in]` and `bias [out]`; returns (rows, out, in).
    fn linear_dims(&self, op: &str, x: &T, w: &T, bias: Option<&T>) -> Result<(usize, usize, usize)> {
        ensure!(w.rank() == 2, "{op}: weight has shape {:?}, expected [out, in]", w.shape());
        let (out_f, in_f) = (w.dim(0), w.dim(1));
        ensure!(x.rank() >= 1 && x.dim(-1) == in_f, "{op}: input has shape {:?}, weight expects {in_f} input features", x.shape());
        self.check_activation(op, "input", x)?;
        if let Some(b) = bias {
            expect_shape("bias", op, b.shape(), &[out_f])?;
        }
        Ok((x.elem_count() / in_f, out_f, in_f))
    }

    /// A linear op; per-sample when `x` has no token dimension (see the module docs).
    fn linear_op(&self, name: &'static str, x: &T, w: &T, bias: Option<&T>) -> Result<T> {
        let (rows, out_f, in_f) = self.linear_dims(name, x, w, bias)?;
        let class = OpClass::of_linear(x.rank());
        let flops = if class == OpClass::Gemm { 2 * (rows * out_f * in_f) as u64 } else { 0 };
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("rank checked") = out_f;
        let inputs: Vec<&T> = [x, w].into_iter().chain(bias).collect();
        Ok(self.op(name, class, flops, &inputs, shape))
    }
}

impl Backend for MetaBackend {
    type Storage = MetaStorage;

    fn name(&self) -> String {
        format!("meta (shapes only, {} activations)", self.activation_dtype)
    }

    fn storage_dtype(storage: &MetaStorage) -> DType {
        storage.dtype
    }

    fn activation_dtype(&self) -> DType {
        self.activation_dtype
    }

    fn upload(&self, t: &HostTensor) -> Result<T> {
        let out = NewBuffer { shape: t.shape.clone(), dtype: t.dtype(), kind: BufferKind::Constant };
        Ok(self.record("upload", OpClass::Transfer, 0, &[], vec![out]).pop().expect("one output recorded"))
    }

    fn input(&self, t: &HostTensor) -> Result<T> {
        let out = NewBuffer { shape: t.shape.clone(), dtype: self.activation_dtype, kind: BufferKind::Input };
        Ok(self.record("input", OpClass::Transfer, 0, &[], vec![out]).pop().expect("one output recorded"))
    }

    fn placeholder(&self, shape: &[usize], dtype: DType) -> Result<T> {
        let out = NewBuffer { shape: shape.to_vec(), dtype, kind: BufferKind::Weight };
        Ok(self.record("placeholder", OpClass::Transfer, 0, &[], vec![out]).pop().expect("one output recorded"))
    }

    /// Zeros of the tensor's shape: a meta storage has no data.
    fn download(&self, t: &T) -> Result<HostTensor> {
        self.record("download", OpClass::Transfer, 0, &[t], Vec::new());
        Ok(HostTensor::from_f32(t.shape().to_vec(), vec![0.0; t.elem_count()]))
    }

    fn zeros(&self, shape: &[usize]) -> Result<T> {
        Ok(self.op("zeros", OpClass::Layout, 0, &[], shape.to_vec()))
    }

    fn cast(&self, x: &T, dtype: DType) -> Result<T> {
        let out = NewBuffer { shape: x.shape().to_vec(), dtype, kind: BufferKind::Activation };
        Ok(self.record("cast", OpClass::Elementwise, 0, &[x], vec![out]).pop().expect("one output recorded"))
    }

    fn linear(&self, x: &T, w: &T, bias: Option<&T>) -> Result<T> {
        self.linear_op("linear", x, w, bias)
    }

    fn linear_gelu(&self, x: &T, w: &T, bias: Option<&T>) -> Result<T> {
        self.linear_op("linear_gelu", x, w, bias)
    }

    fn lora_add(&self, y: T, x: &T, down: &T, up: &T, up_bias: Option<&T>, _scale: f32, offset: usize) -> Result<T> {
        ensure!(down.rank() == 2 && up.rank() == 2, "lora: down {:?} and up {:?} must be matrices", down.shape(), up.shape());
        let (rank, in_f, out_len) = (down.dim(0), down.dim(1), up.dim(0));
        expect_shape("up", "lora", up.shape(), &[out_len, rank])?;
        ensure!(x.rank() >= 1 && x.dim(-1) == in_f, "lora: input has shape {:?}, down expects {in_f} features", x.shape());
        self.check_activation("lora", "input", x)?;
        self.check_activation("lora", "output", &y)?;
        let (rows, width) = (x.elem_count() / in_f, y.dim(-1));
        ensure!(
            y.elem_count() == rows * width && offset + out_len <= width,
            "lora: update of {out_len} rows at {offset} does not fit output {:?}",
            y.shape()
        );
        if let Some(b) = up_bias {
            expect_shape("up bias", "lora", b.shape(), &[out_len])?;
        }
        let class = OpClass::of_lora(x.rank());
        let flops = if class == OpClass::Lora { 2 * (rows * rank * in_f + rows * out_len * rank) as u64 } else { 0 };
        let inputs: Vec<&T> = [&y, x, down, up].into_iter().chain(up_bias).collect();
        let low_rank = NewBuffer { shape: vec![rows, rank], dtype: self.activation_dtype, kind: BufferKind::Activation };
        // The [rows, rank] intermediate lives for this op only: dropping it records its free.
        drop(self.record("lora_add", class, flops, &inputs, vec![low_rank]));
        Ok(y)
    }

    fn layer_norm_modulate(&self, x: &T, shift: &T, scale: &T, _eps: f32) -> Result<T> {
        self.per_sample_dims("layer_norm_modulate", x, &[("shift", shift), ("scale", scale)])?;
        Ok(self.op("layer_norm_modulate", OpClass::Elementwise, 0, &[x, shift, scale], x.shape().to_vec()))
    }

    fn qk_norm_rope(&self, x: &T, heads: usize, q_scale: &T, k_scale: &T, pe: &T, _eps: f32) -> Result<[T; 3]> {
        let dims = QkDims::new(x.shape(), heads, q_scale.shape(), k_scale.shape(), pe.shape())?;
        self.check_activation("qk_norm_rope", "x", x)?;
        let (b, l, hd) = (dims.batch, dims.tokens, dims.head_dim);
        let head = || NewBuffer { shape: vec![b, heads, l, hd], dtype: self.activation_dtype, kind: BufferKind::Activation };
        let outs = self.record("qk_norm_rope", OpClass::Elementwise, 0, &[x, q_scale, k_scale, pe], vec![head(), head(), head()]);
        Ok(outs.try_into().unwrap_or_else(|_| unreachable!("three outputs recorded")))
    }

    fn attention(&self, q: &T, k: &T, v: &T) -> Result<T> {
        let dims = AttentionDims::new(q.shape(), k.shape(), v.shape())?;
        let (b, h, lq, lk, d) = (dims.batch, dims.heads, dims.lq, dims.lk, dims.head_dim);
        for (what, t) in [("q", q), ("k", k), ("v", v)] {
            self.check_activation("attention", what, t)?;
        }
        let flops = 4 * (b * h * lq * lk * d) as u64;
        Ok(self.op("attention", OpClass::Attention, flops, &[q, k, v], vec![b, lq, h * d]))
    }

    fn attention_bias(&self, q: &T, k: &T, v: &T, bias: &T, _scale: f32) -> Result<T> {
        let dims = AttentionDims::with_bias(q.shape(), k.shape(), v.shape(), bias.shape())?;
        let (b, h, lq, lk, d) = (dims.batch, dims.heads, dims.lq, dims.lk, dims.head_dim);
        for (what, t) in [("q", q), ("k", k), ("v", v)] {
            self.check_activation("attention_bias", what, t)?;
        }
        let flops = 4 * (b * h * lq * lk * d) as u64;
        Ok(self.op("attention_bias", OpClass::Attention, flops, &[q, k, v, bias], vec![b, lq, h * d]))
    }

    fn rms_norm(&self, x: &T, weight: &T, _eps: f32) -> Result<T> {
        ensure!(x.rank() >= 1, "rms_norm: x has shape {:?}, expected [.., dim]", x.shape());
        expect_shape("weight", "rms_norm", weight.shape(), &[x.dim(-1)])?;
        self.check_activation("rms_norm", "x", x)?;
        Ok(self.op("rms_norm", OpClass::Elementwise, 0, &[x, weight], x.shape().to_vec()))
    }

    fn attention_with_lse(&self, q: &T, k: &T, v: &T) -> Result<(T, T)> {
        let dims = AttentionDims::new(q.shape(), k.shape(), v.shape())?;
        let (b, h, lq, lk, d) = (dims.batch, dims.heads, dims.lq, dims.lk, dims.head_dim);
        for (what, t) in [("q", q), ("k", k), ("v", v)] {
            self.check_activation("attention_with_lse", what, t)?;
        }
        let out = NewBuffer { shape: vec![b, lq, h * d], dtype: self.activation_dtype, kind: BufferKind::Activation };
        let lse = NewBuffer { shape: vec![b, h, lq], dtype: DType::F32, kind: BufferKind::Activation };
        let flops = 4 * (b * h * lq * lk * d) as u64;
        let [out, lse] = self
            .record("attention_with_lse", OpClass::Attention, flops, &[q, k, v], vec![out, lse])
            .try_into()
            .unwrap_or_else(|_| unreachable!("two outputs recorded"));
        Ok((out, lse))
    }

    fn gelu_tanh(&self, x: &T) -> Result<T> {
        self.unary("gelu_tanh", OpClass::Elementwise, x)
    }

    fn silu(&self, x: &T) -> Result<T> {
        self.unary("silu", OpClass::Elementwise, x)
    }

    fn add(&self, a: &T, b: &T) -> Result<T> {
        expect_shape("b", "add", b.shape(), a.shape())?;
        self.check_activation("add", "a", a)?;
        self.check_activation("add", "b", b)?;
        Ok(self.op("add", OpClass::Elementwise, 0, &[a, b], a.shape().to_vec()))
    }

    fn mul(&self, a: &T, b: &T) -> Result<T> {
        expect_shape("b", "mul", b.shape(), a.shape())?;
        self.check_activation("mul", "a", a)?;
        self.check_activation("mul", "b", b)?;
        Ok(self.op("mul", OpClass::Elementwise, 0, &[a, b], a.shape().to_vec()))
    }

    fn gated_residual(&self, x: &T, gate: &T, y: &T) -> Result<T> {
        self.per_sample_dims("gated_residual", x, &[("gate", gate)])?;
        expect_shape("y", "gated_residual", y.shape(), x.shape())?;
        self.check_activation("gated_residual", "y", y)?;
        Ok(self.op("gated_residual", OpClass::Elementwise, 0, &[x, gate, y], x.shape().to_vec()))
    }

    fn concat(&self, xs: &[&T], dim: usize) -> Result<T> {
        ensure!(!xs.is_empty(), "concat: no tensors");
        let first = xs[0].shape();
        ensure!(dim < first.len(), "concat: dim {dim} out of range for {first:?}");
        for x in xs {
            let s = x.shape();
            ensure!(
                s.len() == first.len() && s.iter().zip(first).enumerate().all(|(i, (a, b))| i == dim || a == b),
                "concat along {dim}: shapes {first:?} and {s:?} disagree"
            );
            ensure!(x.dtype() == xs[0].dtype(), "concat: dtypes {} and {} disagree", xs[0].dtype(), x.dtype());
        }
        let mut shape = first.to_vec();
        shape[dim] = xs.iter().map(|x| x.dim(dim as isize)).sum();
        let out = NewBuffer { shape, dtype: xs[0].dtype(), kind: BufferKind::Activation };
        Ok(self.record("concat", OpClass::Layout, 0, xs, vec![out]).pop().expect("one output recorded"))
    }

    fn narrow(&self, x: &T, dim: usize, start: usize, len: usize) -> Result<T> {
        ensure!(
            dim < x.rank() && start + len <= x.dim(dim as isize),
            "narrow: {start}..{} out of range for dim {dim} of {:?}",
            start + len,
            x.shape()
        );
        let mut shape = x.shape().to_vec();
        shape[dim] = len;
        let out = NewBuffer { shape, dtype: x.dtype(), kind: BufferKind::Activation };
        Ok(self.record("narrow", OpClass::Layout, 0, &[x], vec![out]).pop().expect("one output recorded"))
    }

    fn timestep_embedding(&self, t: &T, dim: usize, _max_period: f32, _time_factor: f32) -> Result<T> {
        ensure!(t.rank() == 1, "timestep_embedding: t has shape {:?}, expected [batch]", t.shape());
        Ok(self.op("timestep_embedding", OpClass::Elementwise, 0, &[t], vec![t.dim(0), dim]))
    }

    fn conv2d(&self, x: &T, w: &T, bias: Option<&T>, stride: usize, pad: [usize; 4]) -> Result<T> {
        let g = ConvGeometry::new(x.shape(), w.shape(), bias.map(|b| b.shape()), stride, pad)?;
        self.check_activation("conv2d", "input", x)?;
        let out_elems = g.batch * g.cout * g.oh * g.ow;
        let flops = 2 * (out_elems * g.cin * g.kh * g.kw) as u64;
        let inputs: Vec<&T> = [x, w].into_iter().chain(bias).collect();
        Ok(self.op("conv2d", OpClass::Conv, flops, &inputs, vec![g.batch, g.cout, g.oh, g.ow]))
    }

    fn group_norm(&self, x: &T, groups: usize, weight: &T, bias: &T, _eps: f32) -> Result<T> {
        ensure!(x.rank() >= 2, "group_norm: input has shape {:?}, expected [batch, channels, ..]", x.shape());
        self.check_activation("group_norm", "input", x)?;
        let c = x.dim(1);
        ensure!(groups > 0 && c % groups == 0, "group_norm: {c} channels do not split into {groups} groups");
        expect_shape("weight", "group_norm", weight.shape(), &[c])?;
        expect_shape("bias", "group_norm", bias.shape(), &[c])?;
        Ok(self.op("group_norm", OpClass::Elementwise, 0, &[x, weight, bias], x.shape().to_vec()))
    }

    fn upsample_nearest2x(&self, x: &T) -> Result<T> {
        ensure!(x.rank() == 4, "upsample_nearest2x: input has shape {:?}, expected [batch, channels, height, width]", x.shape());
        self.check_activation("upsample_nearest2x", "input", x)?;
        Ok(self.op("upsample_nearest2x", OpClass::Layout, 0, &[x], vec![x.dim(0), x.dim(1), 2 * x.dim(2), 2 * x.dim(3)]))
    }

    fn transpose_last2(&self, x: &T) -> Result<T> {
        ensure!(x.rank() >= 2, "transpose_last2: input has shape {:?}, expected at least 2 dims", x.shape());
        self.check_activation("transpose_last2", "input", x)?;
        let mut shape = x.shape().to_vec();
        let r = shape.len();
        shape.swap(r - 2, r - 1);
        Ok(self.op("transpose_last2", OpClass::Layout, 0, &[x], shape))
    }

    fn pixel_unshuffle(&self, x: &T, f: usize) -> Result<T> {
        ensure!(x.rank() == 4, "pixel_unshuffle: input has shape {:?}, expected [batch, channels, height, width]", x.shape());
        self.check_activation("pixel_unshuffle", "input", x)?;
        let (b, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        ensure!(f > 0 && h % f == 0 && w % f == 0, "pixel_unshuffle: {h}x{w} is not a multiple of the factor {f}");
        Ok(self.op("pixel_unshuffle", OpClass::Layout, 0, &[x], vec![b, c * f * f, h / f, w / f]))
    }

    fn pixel_shuffle(&self, x: &T, f: usize) -> Result<T> {
        ensure!(x.rank() == 4, "pixel_shuffle: input has shape {:?}, expected [batch, channels, height, width]", x.shape());
        self.check_activation("pixel_shuffle", "input", x)?;
        let (b, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        ensure!(f > 0 && c % (f * f) == 0, "pixel_shuffle: {c} channels are not a multiple of {f}x{f}");
        Ok(self.op("pixel_shuffle", OpClass::Layout, 0, &[x], vec![b, c / (f * f), h * f, w * f]))
    }

    fn affine(&self, x: &T, _scale: f32, _offset: f32) -> Result<T> {
        self.unary("affine", OpClass::Elementwise, x)
    }

    fn relu(&self, x: &T) -> Result<T> {
        self.unary("relu", OpClass::Elementwise, x)
    }

    fn max_pool2d(&self, x: &T, kernel: usize, stride: usize) -> Result<T> {
        let g = PoolGeometry::max_pool(x.shape(), kernel, stride)?;
        self.check_activation("max_pool2d", "input", x)?;
        Ok(self.op("max_pool2d", OpClass::Elementwise, 0, &[x], g.out_shape()))
    }

    fn blur_pool2d(&self, x: &T, filter: &T, stride: usize, pad: [usize; 4]) -> Result<T> {
        let g = PoolGeometry::depthwise("blur_pool2d", x.shape(), filter.shape(), stride, pad, true)?;
        self.check_activation("blur_pool2d", "input", x)?;
        Ok(self.op("blur_pool2d", OpClass::Elementwise, 0, &[x, filter], g.out_shape()))
    }

    fn l2_pool2d(&self, x: &T, filter: &T, stride: usize, pad: [usize; 4]) -> Result<T> {
        let g = PoolGeometry::depthwise("l2_pool2d", x.shape(), filter.shape(), stride, pad, false)?;
        self.check_activation("l2_pool2d", "input", x)?;
        Ok(self.op("l2_pool2d", OpClass::Elementwise, 0, &[x, filter], g.out_shape()))
    }
}
