//! The CPU reference backend: f32 compute, weights stored as f32, f16 or bf16 (widened per op),
//! activations in f32. Every op is a plain function over slices in the files beside this one.

pub mod attention;
mod backward;
mod collective;
pub mod conv;
pub mod elementwise;
pub mod embed;
pub mod group_norm;
pub mod layout;
pub mod matmul;
pub mod norm;
pub mod pool;
pub mod rope;
pub mod spatial;
mod training;

use super::profile::OpClass;
use super::profile::{OpProfiler, OpTimes, TransferMeter, WallClock};
use super::{expect_shape, shapes, Backend};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use loaders::{DType, HostData, HostTensor};
use matmul::Rhs;
use rayon::prelude::*;
use std::borrow::Cow;
use std::ops::Range;

#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

type T = Tensor<CpuBackend>;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

/// Op timing (`Backend::start_op_timing`); process-wide, since the backend itself holds no state.
static OP_TIMES: OpProfiler<std::time::Instant> = OpProfiler::new();

/// What crosses between the host and this backend (`Backend::bytes_moved`); process-wide too.
static TRANSFERS: TransferMeter = TransferMeter::new();

/// Runs `op`, attributing its time to `class` while op timing is on.
fn timed<R>(class: OpClass, op: impl FnOnce() -> Result<R>) -> Result<R> {
    OP_TIMES.time(&WallClock, class, op)
}

/// An activation's f32 elements; activations are always f32 on this backend.
fn act<'a>(op: &str, t: &'a T) -> Result<&'a [f32]> {
    match t.storage() {
        HostData::F32(v) => Ok(v),
        other => bail!("{op}: activation stored as {} (expected F32)", dtype_of(other)),
    }
}

/// Any tensor's elements widened to f32: free for f32, a converted copy for f16/bf16 weights.
fn widen(t: &T) -> Cow<'_, [f32]> {
    match t.storage() {
        HostData::F32(v) => Cow::Borrowed(v.as_slice()),
        HostData::F16(v) => Cow::Owned(v.par_iter().map(|x| x.to_f32()).collect()),
        HostData::BF16(v) => Cow::Owned(v.par_iter().map(|x| x.to_f32()).collect()),
    }
}

fn dtype_of(d: &HostData) -> DType {
    match d {
        HostData::F32(_) => DType::F32,
        HostData::F16(_) => DType::F16,
        HostData::BF16(_) => DType::BF16,
    }
}

fn f32_tensor(data: Vec<f32>, shape: Vec<usize>) -> T {
    debug_assert_eq!(data.len(), shape.iter().product::<usize>());
    Tensor::from_storage(HostData::F32(data), shape)
}

/// `[B, L, D]` activation with `[B, D]` per-sample operands: returns (B, L, D).
fn per_sample_dims(op: &str, x: &T, vecs: &[(&str, &T)]) -> Result<(usize, usize, usize)> {
    ensure!(x.rank() == 3, "{op}: x has shape {:?}, expected [batch, tokens, dim]", x.shape());
    let (b, l, d) = (x.dim(0), x.dim(1), x.dim(2));
    for (name, v) in vecs {
        expect_shape(name, op, v.shape(), &[b, d])?;
    }
    Ok((b, l, d))
}

impl Backend for CpuBackend {
    type Storage = HostData;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn storage_dtype(storage: &HostData) -> DType {
        dtype_of(storage)
    }

    fn activation_dtype(&self) -> DType {
        DType::F32
    }

    fn bytes_moved(&self) -> (u64, u64) {
        TRANSFERS.read()
    }

    fn start_op_timing(&self) -> Result<bool> {
        OP_TIMES.start();
        Ok(true)
    }

    fn take_op_times(&self) -> Result<OpTimes> {
        OP_TIMES.take(&WallClock)
    }

    /// `MemAvailable` of /proc/meminfo (Linux); None elsewhere.
    fn free_memory(&self) -> Result<Option<u64>> {
        let Ok(info) = std::fs::read_to_string("/proc/meminfo") else { return Ok(None) };
        let kib = info
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
        Ok(kib.map(|k| k * 1024))
    }

    fn upload(&self, t: &HostTensor) -> Result<T> {
        TRANSFERS.up(t.len() * t.dtype().size());
        timed(OpClass::Transfer, || Ok(Tensor::from_storage(t.data.clone(), t.shape.clone())))
    }

    fn input(&self, t: &HostTensor) -> Result<T> {
        TRANSFERS.up(t.len() * DType::F32.size());
        timed(OpClass::Transfer, || Ok(f32_tensor(t.to_f32(), t.shape.clone())))
    }

    fn download(&self, t: &T) -> Result<HostTensor> {
        TRANSFERS.down(t.elem_count() * t.dtype().size());
        timed(OpClass::Transfer, || Ok(HostTensor::from_f32(t.shape().to_vec(), widen(t).into_owned())))
    }

    fn zeros(&self, shape: &[usize]) -> Result<T> {
        Ok(f32_tensor(vec![0.0; shape.iter().product()], shape.to_vec()))
    }

    fn cast(&self, x: &T, dtype: DType) -> Result<T> {
        timed(OpClass::Elementwise, || {
            let host = HostTensor::new(x.shape().to_vec(), x.storage().clone());
            Ok(Tensor::from_storage(host.cast(dtype).data, x.shape().to_vec()))
        })
    }

    fn linear(&self, x: &T, w: &T, bias: Option<&T>) -> Result<T> {
        timed(OpClass::of_linear(x.rank()), || {
            ensure!(w.rank() == 2, "linear: weight has shape {:?}, expected [out, in]", w.shape());
            let (out_f, in_f) = (w.dim(0), w.dim(1));
            ensure!(x.rank() >= 1 && x.dim(-1) == in_f, "linear: input has shape {:?}, weight expects {in_f} input features", x.shape());
            let rows = x.elem_count() / in_f;
            let mut y = vec![0f32; rows * out_f];
            if let Some(b) = bias {
                expect_shape("bias", "linear", b.shape(), &[out_f])?;
                let b = widen(b);
                y.chunks_mut(out_f).for_each(|r| r.copy_from_slice(&b));
            }
            matmul::matmul(&mut y, act("linear", x)?, &widen(w), rows, out_f, in_f, Rhs::Transposed, bias.is_some(), true);
            let mut shape = x.shape().to_vec();
            *shape.last_mut().unwrap() = out_f;
            Ok(f32_tensor(y, shape))
        })
    }

    fn lora_add(&self, y: T, x: &T, down: &T, up: &T, up_bias: Option<&T>, scale: f32, offset: usize) -> Result<T> {
        timed(OpClass::of_lora(x.rank()), || {
            ensure!(down.rank() == 2 && up.rank() == 2, "lora: down {:?} and up {:?} must be matrices", down.shape(), up.shape());
            let (rank, in_f, out_len) = (down.dim(0), down.dim(1), up.dim(0));
            expect_shape("up", "lora", up.shape(), &[out_len, rank])?;
            ensure!(x.dim(-1) == in_f, "lora: input has shape {:?}, down expects {in_f} features", x.shape());
            let (rows, width) = (x.elem_count() / in_f, y.dim(-1));
            ensure!(
                y.elem_count() == rows * width && offset + out_len <= width,
                "lora: update of {out_len} rows at {offset} does not fit output {:?}",
                y.shape()
            );
            let mut h = vec![0f32; rows * rank];
            matmul::matmul(&mut h, act("lora", x)?, &widen(down), rows, rank, in_f, Rhs::Transposed, false, true);
            let mut d = vec![0f32; rows * out_len];
            if let Some(b) = up_bias {
                expect_shape("up bias", "lora", b.shape(), &[out_len])?;
                let b = widen(b);
                d.chunks_mut(out_len).for_each(|r| r.copy_from_slice(&b));
            }
            matmul::matmul(&mut d, &h, &widen(up), rows, out_len, rank, Rhs::Transposed, up_bias.is_some(), true);
            let shape = y.shape().to_vec();
            let mut yv = match y.into_storage() {
                HostData::F32(v) => v,
                other => bail!("lora: output stored as {}", dtype_of(&other)),
            };
            for (yr, dr) in yv.chunks_mut(width).zip(d.chunks(out_len)) {
                for (a, b) in yr[offset..offset + out_len].iter_mut().zip(dr) {
                    *a += scale * b;
                }
            }
            Ok(f32_tensor(yv, shape))
        })
    }

    fn layer_norm_modulate(&self, x: &T, shift: &T, scale: &T, eps: f32) -> Result<T> {
        timed(OpClass::Elementwise, || {
            let (_, l, d) = per_sample_dims("layer_norm_modulate", x, &[("shift", shift), ("scale", scale)])?;
            let mut out = vec![0f32; x.elem_count()];
            norm::layer_norm_modulate(&mut out, act("layer_norm_modulate", x)?, &widen(shift), &widen(scale), l, d, eps);
            Ok(f32_tensor(out, x.shape().to_vec()))
        })
    }

    fn qk_norm_rope(&self, x: &T, heads: usize, q_scale: &T, k_scale: &T, pe: &T, eps: f32) -> Result<[T; 3]> {
        timed(OpClass::Elementwise, || {
            let dims = shapes::QkDims::new(x.shape(), heads, q_scale.shape(), k_scale.shape(), pe.shape())?;
            let (b, l, w, hd) = (dims.batch, dims.tokens, dims.width, dims.head_dim);
            let [q, k, v] =
                rope::qk_norm_rope(act("qk_norm_rope", x)?, b, l, w, heads, hd, &widen(q_scale), &widen(k_scale), &widen(pe), eps);
            let shape = vec![b, heads, l, hd];
            Ok([f32_tensor(q, shape.clone()), f32_tensor(k, shape.clone()), f32_tensor(v, shape)])
        })
    }

    fn attention(&self, q: &T, k: &T, v: &T) -> Result<T> {
        timed(OpClass::Attention, || {
            let dims = shapes::AttentionDims::new(q.shape(), k.shape(), v.shape())?;
            let (b, h, lq, lk, d) = (dims.batch, dims.heads, dims.lq, dims.lk, dims.head_dim);
            let out = attention::attention(act("attention", q)?, act("attention", k)?, act("attention", v)?, None, b, h, lq, lk, d);
            Ok(f32_tensor(out, vec![b, lq, h * d]))
        })
    }

    fn attention_bias(&self, q: &T, k: &T, v: &T, bias: &T, scale: f32) -> Result<T> {
        timed(OpClass::Attention, || {
            let dims = shapes::AttentionDims::with_bias(q.shape(), k.shape(), v.shape(), bias.shape())?;
            let (b, h, lq, lk, d) = (dims.batch, dims.heads, dims.lq, dims.lk, dims.head_dim);
            const OP: &str = "attention_bias";
            let out = attention::attention(act(OP, q)?, act(OP, k)?, act(OP, v)?, Some((&widen(bias), scale)), b, h, lq, lk, d);
            Ok(f32_tensor(out, vec![b, lq, h * d]))
        })
    }

    fn rms_norm(&self, x: &T, weight: &T, eps: f32) -> Result<T> {
        timed(OpClass::Elementwise, || {
            ensure!(x.rank() >= 1, "rms_norm: x has shape {:?}, expected [.., dim]", x.shape());
            let d = x.dim(-1);
            expect_shape("weight", "rms_norm", weight.shape(), &[d])?;
            let mut out = vec![0f32; x.elem_count()];
            norm::rms_norm(&mut out, act("rms_norm", x)?, &widen(weight), d, eps);
            Ok(f32_tensor(out, x.shape().to_vec()))
        })
    }

    fn attention_with_lse(&self, q: &T, k: &T, v: &T) -> Result<(T, T)> {
        timed(OpClass::Attention, || {
            // The forward checks the shapes, and its output is the one inference computes.
            let out = self.attention(q, k, v)?;
            let (b, h, lq, lk, d) = (q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3));
            let lse = backward::row_log_sum_exp(act("attention_with_lse", q)?, act("attention_with_lse", k)?, b * h, lq, lk, d);
            Ok((out, f32_tensor(lse, vec![b, h, lq])))
        })
    }

    fn gelu_tanh(&self, x: &T) -> Result<T> {
        timed(OpClass::Elementwise, || Ok(f32_tensor(elementwise::map(act("gelu", x)?, elementwise::gelu_tanh), x.shape().to_vec())))
    }

    fn silu(&self, x: &T) -> Result<T> {
        timed(OpClass::Elementwise, || Ok(f32_tensor(elementwise::map(act("silu", x)?, elementwise::silu), x.shape().to_vec())))
    }

    fn add(&self, a: &T, b: &T) -> Result<T> {
        timed(OpClass::Elementwise, || {
            expect_shape("b", "add", b.shape(), a.shape())?;
            Ok(f32_tensor(elementwise::add(act("add", a)?, act("add", b)?), a.shape().to_vec()))
        })
    }

    fn mul(&self, a: &T, b: &T) -> Result<T> {
        timed(OpClass::Elementwise, || {
            expect_shape("b", "mul", b.shape(), a.shape())?;
            Ok(f32_tensor(elementwise::mul(act("mul", a)?, act("mul", b)?), a.shape().to_vec()))
        })
    }

    fn gated_residual(&self, x: &T, gate: &T, y: &T) -> Result<T> {
        timed(OpClass::Elementwise, || {
            let (_, l, d) = per_sample_dims("gated_residual", x, &[("gate", gate)])?;
            expect_shape("y", "gated_residual", y.shape(), x.shape())?;
            let out = elementwise::gated_residual(act("gated_residual", x)?, &widen(gate), act("gated_residual", y)?, l, d);
            Ok(f32_tensor(out, x.shape().to_vec()))
        })
    }

    fn concat(&self, xs: &[&T], dim: usize) -> Result<T> {
        timed(OpClass::Layout, || {
            let shape = shapes::concat(&xs.iter().map(|x| x.shape()).collect::<Vec<_>>(), dim)?;
            let (outer, inner) = shapes::outer_inner(&shape, dim);
            let sizes: Vec<usize> = xs.iter().map(|x| x.dim(dim as isize)).collect();
            let parts = xs.iter().map(|x| act("concat", x)).collect::<Result<Vec<_>>>()?;
            Ok(f32_tensor(layout::concat(&parts, &sizes, outer, inner), shape))
        })
    }

    fn narrow(&self, x: &T, dim: usize, start: usize, len: usize) -> Result<T> {
        timed(OpClass::Layout, || {
            let shape = shapes::narrow(x.shape(), dim, start, len)?;
            let (outer, inner) = shapes::outer_inner(x.shape(), dim);
            Ok(f32_tensor(layout::narrow(&widen(x), x.dim(dim as isize), start, len, outer, inner), shape))
        })
    }

    fn timestep_embedding(&self, t: &T, dim: usize, max_period: f32, time_factor: f32) -> Result<T> {
        timed(OpClass::Elementwise, || {
            ensure!(t.rank() == 1, "timestep_embedding: t has shape {:?}, expected [batch]", t.shape());
            Ok(f32_tensor(embed::timestep_embedding(&widen(t), dim, max_period, time_factor), vec![t.dim(0), dim]))
        })
    }

    fn conv2d(&self, x: &T, w: &T, bias: Option<&T>, stride: usize, pad: [usize; 4]) -> Result<T> {
        timed(OpClass::Conv, || {
            let g = shapes::ConvGeometry::new(x.shape(), w.shape(), bias.map(|b| b.shape()), stride, pad)?;
            let bias = bias.map(widen);
            let out = conv::conv2d(act("conv2d", x)?, &widen(w), bias.as_deref(), &g);
            Ok(f32_tensor(out, vec![g.batch, g.cout, g.oh, g.ow]))
        })
    }

    fn group_norm(&self, x: &T, groups: usize, weight: &T, bias: &T, eps: f32) -> Result<T> {
        timed(OpClass::Elementwise, || {
            let d = shapes::GroupNormDims::new("group_norm", x.shape(), groups, weight.shape(), bias.shape())?;
            let mut out = vec![0f32; x.elem_count()];
            group_norm::group_norm(&mut out, act("group_norm", x)?, d.channels, d.spatial, groups, &widen(weight), &widen(bias), eps);
            Ok(f32_tensor(out, x.shape().to_vec()))
        })
    }

    fn group_norm_stats(&self, x: &T, groups: usize, rows: Range<usize>, cols: Range<usize>) -> Result<T> {
        timed(OpClass::Elementwise, || {
            let d = shapes::GroupNormDims::windowed(x.shape(), groups, &rows, &cols)?;
            let stats = group_norm::group_norm_stats(act("group_norm_stats", x)?, d.channels, (x.dim(2), x.dim(3)), groups, rows, cols);
            Ok(f32_tensor(stats, vec![d.batch, groups, 2]))
        })
    }

    fn group_norm_apply(&self, x: &T, stats: &T, weight: &T, bias: &T) -> Result<T> {
        timed(OpClass::Elementwise, || {
            let d = shapes::GroupNormDims::with_stats(x.shape(), stats.shape(), weight.shape(), bias.shape())?;
            let mut out = vec![0f32; x.elem_count()];
            let (w, b) = (widen(weight), widen(bias));
            group_norm::group_norm_apply(&mut out, act("group_norm_apply", x)?, d.channels, d.spatial, d.groups, &widen(stats), &w, &b);
            Ok(f32_tensor(out, x.shape().to_vec()))
        })
    }

    fn upsample_nearest2x(&self, x: &T) -> Result<T> {
        timed(OpClass::Layout, || {
            ensure!(x.rank() == 4, "upsample_nearest2x: input has shape {:?}, expected [batch, channels, height, width]", x.shape());
            let (h, w) = (x.dim(2), x.dim(3));
            let out = spatial::upsample_nearest2x(act("upsample_nearest2x", x)?, x.dim(0) * x.dim(1), h, w);
            Ok(f32_tensor(out, vec![x.dim(0), x.dim(1), 2 * h, 2 * w]))
        })
    }

    fn transpose_last2(&self, x: &T) -> Result<T> {
        timed(OpClass::Layout, || {
            let shape = shapes::transpose_last2(x.shape())?;
            let (m, n) = (x.dim(-2), x.dim(-1));
            Ok(f32_tensor(spatial::transpose_last2(act("transpose_last2", x)?, x.elem_count() / (m * n).max(1), m, n), shape))
        })
    }

    fn pixel_unshuffle(&self, x: &T, f: usize) -> Result<T> {
        timed(OpClass::Layout, || {
            ensure!(x.rank() == 4, "pixel_unshuffle: input has shape {:?}, expected [batch, channels, height, width]", x.shape());
            let (b, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
            ensure!(f > 0 && h % f == 0 && w % f == 0, "pixel_unshuffle: {h}x{w} is not a multiple of the factor {f}");
            let out = spatial::pixel_unshuffle(act("pixel_unshuffle", x)?, b, c, h, w, f);
            Ok(f32_tensor(out, vec![b, c * f * f, h / f, w / f]))
        })
    }

    fn pixel_shuffle(&self, x: &T, f: usize) -> Result<T> {
        timed(OpClass::Layout, || {
            ensure!(x.rank() == 4, "pixel_shuffle: input has shape {:?}, expected [batch, channels, height, width]", x.shape());
            let (b, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
            ensure!(f > 0 && c % (f * f) == 0, "pixel_shuffle: {c} channels are not a multiple of {f}x{f}");
            let out = spatial::pixel_shuffle(act("pixel_shuffle", x)?, b, c, h, w, f);
            Ok(f32_tensor(out, vec![b, c / (f * f), h * f, w * f]))
        })
    }

    fn affine(&self, x: &T, scale: f32, offset: f32) -> Result<T> {
        timed(OpClass::Elementwise, || Ok(f32_tensor(spatial::affine(act("affine", x)?, scale, offset), x.shape().to_vec())))
    }

    fn relu(&self, x: &T) -> Result<T> {
        timed(OpClass::Elementwise, || Ok(f32_tensor(elementwise::map(act("relu", x)?, |v| v.max(0.0)), x.shape().to_vec())))
    }

    fn max_pool2d(&self, x: &T, kernel: usize, stride: usize) -> Result<T> {
        timed(OpClass::Elementwise, || {
            let g = shapes::PoolGeometry::max_pool(x.shape(), kernel, stride)?;
            Ok(f32_tensor(pool::max_pool2d(act("max_pool2d", x)?, &g), g.out_shape()))
        })
    }

    fn blur_pool2d(&self, x: &T, filter: &T, stride: usize, pad: [usize; 4]) -> Result<T> {
        depthwise_pool(x, filter, stride, pad, pool::FilterPool::Blur)
    }

    fn l2_pool2d(&self, x: &T, filter: &T, stride: usize, pad: [usize; 4]) -> Result<T> {
        depthwise_pool(x, filter, stride, pad, pool::FilterPool::L2)
    }
}

fn depthwise_pool(x: &T, filter: &T, stride: usize, pad: [usize; 4], kind: pool::FilterPool) -> Result<T> {
    timed(OpClass::Elementwise, || {
        let op = match kind {
            pool::FilterPool::Blur => "blur_pool2d",
            pool::FilterPool::L2 => "l2_pool2d",
        };
        let g = shapes::PoolGeometry::depthwise(op, x.shape(), filter.shape(), stride, pad, kind == pool::FilterPool::Blur)?;
        Ok(f32_tensor(pool::depthwise(act(op, x)?, &widen(filter), &g, kind), g.out_shape()))
    })
}
