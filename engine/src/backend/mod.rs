//! The backend trait: every op the FLUX forward needs, at the granularity a GPU wants to fuse them
//! (LayerNorm with modulation, QK-RMSNorm with RoPE, linear with a GELU epilogue). Model code is
//! written once against this trait; the CPU reference and the CUDA backend implement it with the
//! same signatures and the same semantics, documented here.
//!
//! Conventions: activations are `[batch, tokens, features]` row-major; per-sample vectors
//! (modulation chunks, gates) are `[batch, features]` and broadcast over tokens; linear weights are
//! `[out, in]` as in PyTorch. Activations are computed in f32 (the CPU stores them in f32); weights
//! keep the dtype they were uploaded with.

pub mod adamw;
pub mod backward;
pub mod collective;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod error;
pub mod losses;
pub mod profile;
pub mod shapes;
pub mod sobolev;
pub mod training;

use crate::tensor::Tensor;
use anyhow::Result;
use loaders::{DType, HostTensor};
use std::ops::Range;

pub trait Backend: Sized + Send + Sync {
    type Storage: Send + Sync;

    /// A short human-readable name, e.g. "cpu (2 threads)".
    fn name(&self) -> String;

    fn storage_dtype(storage: &Self::Storage) -> DType;

    /// The dtype model weights should be loaded in, or None to keep each file's dtype (the CPU
    /// widens per op; the GPU's GEMMs want bf16).
    fn weight_dtype(&self) -> Option<DType> {
        None
    }

    /// How activations are stored (what `input` makes and every op returns): f32 on the CPU,
    /// bf16 on a GPU.
    fn activation_dtype(&self) -> DType;

    /// Bytes moved between the host and the backend's memory since it was made, (to it, from
    /// it): uploads, model inputs and downloads, and the per-item scalars of the training ops.
    /// On the CPU, whose memory is the host's, the same accounting says what a device would move.
    fn bytes_moved(&self) -> (u64, u64) {
        (0, 0)
    }

    /// Self-test hook: while on, fill every fresh output with NaN before its kernel writes it, so
    /// that an element a kernel skips cannot pass for a correct one. A no-op where outputs are
    /// always fully initialised (the CPU).
    fn poison_outputs(&self, _on: bool) {}

    /// Waits until every op issued so far has finished (a GPU runs them asynchronously); for
    /// timing. The CPU's ops are done when they return.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Device memory, for benchmarks: the allocator's high-water mark since the last
    /// `reset_memory_peak` and the driver's reading of memory in use, in bytes; None where the
    /// backend has no device memory of its own (the CPU).
    fn memory_peak(&self) -> Result<Option<MemoryPeak>> {
        Ok(None)
    }

    fn reset_memory_peak(&self) -> Result<()> {
        Ok(())
    }

    /// Starts attributing each op's time to its class (`profile`), for benchmarks; false where
    /// this backend does not time its ops.
    fn start_op_timing(&self) -> Result<bool> {
        Ok(false)
    }

    /// Stops op timing and returns the time per class since `start_op_timing`, after waiting for
    /// every op issued so far.
    fn take_op_times(&self) -> Result<profile::OpTimes> {
        Ok(profile::OpTimes::new())
    }

    /// Bytes that activations could still take: on a GPU its free memory plus what its pool holds
    /// unused, on the CPU the memory the kernel reports available; None where unknown. Default
    /// autoencoder tiles are sized from it.
    fn free_memory(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Uploads host data keeping its dtype exactly (weights, position tables).
    fn upload(&self, t: &HostTensor) -> Result<Tensor<Self>>;

    /// Uploads model inputs as activations, in the backend's activation dtype.
    fn input(&self, t: &HostTensor) -> Result<Tensor<Self>>;

    /// A tensor of `shape` stored as `dtype` whose contents do not matter: the weights of a model
    /// built for its shapes only (`WeightLoader::shapes_only`: FLOP counts, memory plans). The
    /// default uploads zeros; a backend that tracks shapes only allocates nothing.
    fn placeholder(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        self.upload(&HostTensor::from_f32(shape.to_vec(), vec![0.0; shape.iter().product()]).cast(dtype))
    }

    /// Zeros of `shape` in the activation dtype, made where the backend keeps its data (nothing
    /// crosses from the host).
    fn zeros(&self, shape: &[usize]) -> Result<Tensor<Self>>;

    /// Copies a tensor back to the host as f32.
    fn download(&self, t: &Tensor<Self>) -> Result<HostTensor>;

    /// `x` stored as `dtype`: rounded to nearest when narrowing, a copy when it already is. The
    /// training math runs in f32 fields and casts the model's activations to and from them.
    fn cast(&self, x: &Tensor<Self>, dtype: DType) -> Result<Tensor<Self>>;

    /// `x @ w^T + bias` over the last dimension: x `[.., in]`, w `[out, in]`, bias `[out]`.
    fn linear(&self, x: &Tensor<Self>, w: &Tensor<Self>, bias: Option<&Tensor<Self>>) -> Result<Tensor<Self>>;

    /// `gelu_tanh(linear(x, w, bias))`; the CUDA backend fuses the activation into the GEMM epilogue.
    fn linear_gelu(&self, x: &Tensor<Self>, w: &Tensor<Self>, bias: Option<&Tensor<Self>>) -> Result<Tensor<Self>> {
        let y = self.linear(x, w, bias)?;
        self.gelu_tanh(&y)
    }

    /// Adds a low-rank update to columns `[offset, offset + up.rows)` of `y`:
    /// `y[.., offset..] += scale * (x @ down^T @ up^T + up_bias)`, with x `[.., in]`,
    /// down `[rank, in]`, up `[out_len, rank]`, up_bias `[out_len]`.
    #[allow(clippy::too_many_arguments)]
    fn lora_add(
        &self,
        y: Tensor<Self>,
        x: &Tensor<Self>,
        down: &Tensor<Self>,
        up: &Tensor<Self>,
        up_bias: Option<&Tensor<Self>>,
        scale: f32,
        offset: usize,
    ) -> Result<Tensor<Self>>;

    /// `(1 + scale) * LayerNorm(x) + shift`, LayerNorm without affine over the last dim;
    /// x `[B, L, D]`, shift and scale `[B, D]`.
    fn layer_norm_modulate(&self, x: &Tensor<Self>, shift: &Tensor<Self>, scale: &Tensor<Self>, eps: f32) -> Result<Tensor<Self>>;

    /// Splits the first `3 * heads * head_dim` columns of `x` `[B, L, W]` into q, k, v
    /// `[B, heads, L, head_dim]` (BFL's `B L (K H D) -> K B H L D`), RMS-normalises q and k per
    /// head with their learned scales `[head_dim]`, then rotates q and k by `pe`
    /// `[B, L, head_dim / 2, 2]` holding (cos, sin) per interleaved pair.
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope(
        &self,
        x: &Tensor<Self>,
        heads: usize,
        q_scale: &Tensor<Self>,
        k_scale: &Tensor<Self>,
        pe: &Tensor<Self>,
        eps: f32,
    ) -> Result<[Tensor<Self>; 3]>;

    /// Softmax attention with scale `1/sqrt(head_dim)`: q, k, v `[B, H, L, D]` (k and v may be
    /// longer than q) -> `[B, Lq, H * D]` (heads merged, BFL's `B H L D -> B L (H D)`).
    fn attention(&self, q: &Tensor<Self>, k: &Tensor<Self>, v: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// `attention(q, k, v)` that also returns the log-sum-exp of each row of scaled scores,
    /// `lse[b, h, i] = ln sum_j exp(q_i . k_j / sqrt(head_dim))`, `[B, H, Lq]` f32: what a flash
    /// attention backward needs to rebuild the probabilities block by block. The output must equal
    /// `attention`'s, so that a training forward computes what inference does.
    fn attention_with_lse(&self, q: &Tensor<Self>, k: &Tensor<Self>, v: &Tensor<Self>) -> Result<(Tensor<Self>, Tensor<Self>)>;

    /// Attention with a score scale and an additive bias, `softmax(scale q k^T + bias) v`, shapes
    /// as `attention`'s: bias `[H, Lq, Lk]` in f32, shared by the batch; `-inf` masks a key out
    /// (every row must keep one finite entry). The text encoders' attention: T5's relative-position
    /// bias (scale 1), CLIP's causal mask (scale `1/sqrt(head_dim)`).
    fn attention_bias(&self, q: &Tensor<Self>, k: &Tensor<Self>, v: &Tensor<Self>, bias: &Tensor<Self>, scale: f32)
        -> Result<Tensor<Self>>;

    /// `x * rsqrt(mean(x^2) + eps) * weight` over the last dimension, statistics in f32 or wider:
    /// x `[.., D]`, weight `[D]` (T5's LayerNorm, which has no mean and no bias).
    fn rms_norm(&self, x: &Tensor<Self>, weight: &Tensor<Self>, eps: f32) -> Result<Tensor<Self>>;

    /// GELU, tanh approximation.
    fn gelu_tanh(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>;

    fn silu(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Elementwise sum of two tensors of the same shape.
    fn add(&self, a: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Elementwise product of two tensors of the same shape (T5's gated GELU).
    fn mul(&self, a: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// `x + gate * y` with x, y `[B, L, D]` and gate `[B, D]`.
    fn gated_residual(&self, x: &Tensor<Self>, gate: &Tensor<Self>, y: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Concatenation along `dim`; all other dimensions must agree.
    fn concat(&self, xs: &[&Tensor<Self>], dim: usize) -> Result<Tensor<Self>>;

    /// The slice `start..start + len` of dimension `dim`.
    fn narrow(&self, x: &Tensor<Self>, dim: usize, start: usize, len: usize) -> Result<Tensor<Self>>;

    /// Sinusoidal embedding of `t * time_factor`, `[B] -> [B, dim]`, laid out `cat(cos, sin)` with
    /// frequencies `exp(-ln(max_period) * i / (dim / 2))`.
    fn timestep_embedding(&self, t: &Tensor<Self>, dim: usize, max_period: f32, time_factor: f32) -> Result<Tensor<Self>>;

    // ---- Image ops (the autoencoder): tensors are NCHW `[B, C, H, W]`. ----

    /// 2-D convolution (PyTorch's cross-correlation): x `[B, C, H, W]`, weight `[O, C, kh, kw]`,
    /// bias `[O]`, zero padding `pad` = (top, bottom, left, right) given separately because BFL pads
    /// asymmetrically, (0, 1, 0, 1), before its stride-2 convolutions. Output
    /// `[B, O, (H + top + bottom - kh) / stride + 1, (W + left + right - kw) / stride + 1]`.
    fn conv2d(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        stride: usize,
        pad: [usize; 4],
    ) -> Result<Tensor<Self>>;

    /// GroupNorm over `[B, C, ...]`: the C channels split into `groups` contiguous groups, each
    /// normalised over its channels and all spatial positions (biased variance), then
    /// `* weight[c] + bias[c]` with weight and bias `[C]`.
    fn group_norm(&self, x: &Tensor<Self>, groups: usize, weight: &Tensor<Self>, bias: &Tensor<Self>, eps: f32) -> Result<Tensor<Self>>;

    /// Per-group statistics of a window of `x` `[B, C, H, W]` (rows `rows`, columns `cols` of
    /// every channel plane, the channels grouped as in `group_norm`): f32 `[B, groups, 2]`
    /// holding each group's mean and biased variance over its channels and the window. Tiled
    /// autoencoder passes merge them over tiles into whole-image statistics (`ae::tiled`).
    fn group_norm_stats(&self, x: &Tensor<Self>, groups: usize, rows: Range<usize>, cols: Range<usize>) -> Result<Tensor<Self>>;

    /// GroupNorm with given statistics: `stats` f32 `[B, groups, 2]` holds each group's mean and
    /// reciprocal standard deviation; `out = (x - mean) * rstd * weight[c] + bias[c]`.
    fn group_norm_apply(&self, x: &Tensor<Self>, stats: &Tensor<Self>, weight: &Tensor<Self>, bias: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Nearest-neighbour upsampling by 2 on both sides: `[B, C, H, W] -> [B, C, 2H, 2W]`.
    fn upsample_nearest2x(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Swaps the last two dimensions: `[.., M, N] -> [.., N, M]` (channels-first maps to tokens).
    fn transpose_last2(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Space-to-depth, PyTorch's `pixel_unshuffle`: `[B, C, H, W] -> [B, C f f, H / f, W / f]` with
    /// `out[b, (c f + i) f + j, y, x] = in[b, c, y f + i, x f + j]`.
    fn pixel_unshuffle(&self, x: &Tensor<Self>, f: usize) -> Result<Tensor<Self>>;

    /// Depth-to-space, PyTorch's `pixel_shuffle`: the inverse of `pixel_unshuffle`.
    fn pixel_shuffle(&self, x: &Tensor<Self>, f: usize) -> Result<Tensor<Self>>;

    /// `x * scale + offset` elementwise (the latent's scale and shift).
    fn affine(&self, x: &Tensor<Self>, scale: f32, offset: f32) -> Result<Tensor<Self>>;

    // ---- The feature networks of the perceptual metrics (AlexNet, VGG16 and their
    // anti-aliased variants, `metrics::perceptual`): NCHW like the image ops. ----

    /// `max(x, 0)` elementwise.
    fn relu(&self, x: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Max pooling over `kernel x kernel` windows `stride` apart, unpadded, rounding the output
    /// size down (PyTorch's `MaxPool2d`): `[B, C, H, W] -> [B, C, (H - k) / s + 1, (W - k) / s + 1]`.
    fn max_pool2d(&self, x: &Tensor<Self>, kernel: usize, stride: usize) -> Result<Tensor<Self>>;

    /// Blur pooling, the anti-aliased downsampling of ST-LPIPS (`Downsample`): channel c filtered
    /// by its own `filter[c, 0]` (`filter` `[C, 1, k, k]`, a depthwise convolution) with `stride`,
    /// on the input padded by reflection (PyTorch's `ReflectionPad2d`; `pad` = (top, bottom, left,
    /// right), each smaller than the side it pads).
    fn blur_pool2d(&self, x: &Tensor<Self>, filter: &Tensor<Self>, stride: usize, pad: [usize; 4]) -> Result<Tensor<Self>>;

    /// L2 pooling (DISTS): `sqrt(depthwise(x^2) + 1e-12)` with the depthwise filter as in
    /// `blur_pool2d`, but zero padding.
    fn l2_pool2d(&self, x: &Tensor<Self>, filter: &Tensor<Self>, stride: usize, pad: [usize; 4]) -> Result<Tensor<Self>>;
}

/// Device memory readings (see `Backend::memory_peak`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPeak {
    pub allocator_high_water: u64,
    pub driver_used: u64,
}

/// Checks a shape and names the operand, so that a wiring bug reads as one line.
pub(crate) fn expect_shape(what: &str, op: &str, found: &[usize], expected: &[usize]) -> Result<()> {
    anyhow::ensure!(found == expected, "{op}: {what} has shape {found:?}, expected {expected:?}");
    Ok(())
}
