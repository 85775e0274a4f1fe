//! The backward ops of training: for each forward op of `Backend` that lies on the path from a
//! trained parameter to the loss, the op that maps the gradient of its output to the gradients of
//! its inputs. The CPU reference and the CUDA backend implement this trait with the same semantics.
//!
//! Conventions (read these before the signatures):
//! - What is trained: in LoRA training, LoRA down/up matrices only; the base weights are frozen
//!   and the modulation vectors (shift, scale, gate) sit upstream of no trainable parameter, so
//!   only the ops' input and adapter gradients are needed. In full training (`model::backward`'s
//!   `Trainable::Full`) also every linear's weight and bias, the modulation linears and the
//!   time, guidance and vector embedders included; the ops documented as "Full training" give
//!   what only it needs (the gradients of linear parameters, of modulation vectors, through
//!   SiLU). In both, the
//!   QK-norm (RMSNorm) scales stay frozen, at the 1 they are initialised to, and the RoPE table and
//!   `eps` are constants: no op returns a gradient for them. Every op takes its weights as they
//!   were uploaded (any dtype).
//! - No tape: each op takes the forward activations it needs explicitly (the forward's inputs,
//!   and for attention its output and row log-sum-exp). Saving them is the caller's business
//!   (`model::backward`), which may also recompute them (activation checkpointing).
//! - Activation gradients are fresh activations (the backend's activation dtype, f32 on the CPU)
//!   of the forward input's shape, with one exception that mirrors the forward: `lora_backward`
//!   takes the input gradient of the base linear by value and returns it with the adapter's
//!   contribution added, as `lora_add` does with `y`. The gradients of per-sample vectors
//!   (modulation shift, scale, gate) are activations too, `[B, D]`: they feed the modulation
//!   linear's backward as its output gradient.
//! - Parameter gradients (LoRA down/up, linear weight and bias) are fresh f32 tensors, summed over
//!   the batch and the tokens: each parameter is used once per forward, so summing over
//!   micro-batches is the optimizer's business.
//! - Shapes follow `Backend`: activations `[B, L, D]`, per-sample vectors `[B, D]`, linear weights
//!   `[out, in]`, attention heads `[B, H, L, head_dim]`.
//!
//! Ops with no entry here: `narrow` and `concat` are each other's backward (the gradient of a
//! narrow is the concatenation of the part's gradient with those of its siblings; the gradient of
//! a concat is narrowed back into parts), `add` passes its gradient to both operands, and the
//! residual input of `gated_residual` receives the output gradient unchanged.

use super::Backend;
use crate::tensor::Tensor;
use anyhow::Result;

/// The gradients of one `lora_add`.
pub struct LoraAddGrads<B: Backend> {
    /// The input gradient given to `lora_backward`, plus this adapter's contribution; `[.., in]`.
    pub gx: Tensor<B>,
    /// d loss / d down, `[rank, in]`, f32.
    pub down: Tensor<B>,
    /// d loss / d up, `[out_len, rank]`, f32.
    pub up: Tensor<B>,
}

pub trait BackwardOps: Backend {
    /// Backward of `linear` wrt its input: `gx = gy @ w` for gy `[.., out]` and w `[out, in]`,
    /// giving gx `[.., in]`. The bias has no effect on gx. For `linear_gelu`, apply
    /// `gelu_tanh_backward` to gy first.
    fn linear_backward_input(&self, gy: &Tensor<Self>, w: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Full training: backward of `linear(x, w, bias)` wrt its parameters, given its input x
    /// `[.., in]` and output gradient gy `[.., out]` (the same leading dimensions): returns
    /// `(g_weight, g_bias)` with `g_weight = gy^T @ x` `[out, in]` and `g_bias = sum gy` `[out]`,
    /// both summed over every leading dimension (all rows share the parameters). The weight itself
    /// does not enter; a linear without a bias ignores g_bias. For `linear_gelu`, apply
    /// `gelu_tanh_backward` to gy first.
    fn linear_backward_params(&self, gy: &Tensor<Self>, x: &Tensor<Self>) -> Result<(Tensor<Self>, Tensor<Self>)>;

    /// Backward of `lora_add(y, x, down, up, up_bias, scale, offset)`, whose output columns
    /// `offset..offset + out_len` received `scale * (x @ down^T @ up^T + up_bias)`. With
    /// `gy_part = gy[.., offset..offset + out_len]` and `h = x @ down^T`:
    /// `gx += scale * gy_part @ up @ down`, `g_down = scale * (gy_part @ up)^T @ x`,
    /// `g_up = scale * gy_part^T @ h`. `gx` `[.., in]` comes in holding the gradient of the base
    /// linear (`linear_backward_input`) and goes out with the adapter's part added, so that a stack
    /// of adapters on one linear chains like the forward does. `up_bias` is not an argument: it
    /// shifts the output without changing any gradient, and it is not trained (adapters that carry
    /// one keep it frozen).
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        gx: Tensor<Self>,
        gy: &Tensor<Self>,
        x: &Tensor<Self>,
        down: &Tensor<Self>,
        up: &Tensor<Self>,
        scale: f32,
        offset: usize,
    ) -> Result<LoraAddGrads<Self>>;

    /// Backward of `gelu_tanh` (and of the activation of `linear_gelu`):
    /// `gx = gy * gelu_tanh'(x_pre)`, with x_pre the activation's input; any shape.
    fn gelu_tanh_backward(&self, x_pre: &Tensor<Self>, gy: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Backward of `layer_norm_modulate(x, shift, scale, eps)` wrt x `[B, L, D]`, given its
    /// output gradient gy `[B, L, D]` and the forward's scale `[B, D]` (shift does not enter).
    /// The row statistics are recomputed from x.
    fn layer_norm_modulate_backward(&self, x: &Tensor<Self>, scale: &Tensor<Self>, gy: &Tensor<Self>, eps: f32) -> Result<Tensor<Self>>;

    /// Full training: backward of `layer_norm_modulate(x, shift, scale, eps)` wrt shift and scale,
    /// given x `[B, L, D]` and the output gradient gy `[B, L, D]`: returns `(g_shift, g_scale)`,
    /// each `[B, D]`, with `g_shift[b] = sum_l gy[b, l]` and `g_scale[b] = sum_l gy[b, l] * x_hat[b, l]`
    /// (x_hat the normalised x, recomputed from x; neither shift nor scale enters).
    fn layer_norm_modulate_backward_shift_scale(
        &self,
        x: &Tensor<Self>,
        gy: &Tensor<Self>,
        eps: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)>;

    /// Backward of `qk_norm_rope(x, heads, q_scale, k_scale, pe, eps)` wrt x, given the gradients
    /// of its outputs `g_qkv` = (gq, gk, gv), each `[B, heads, L, head_dim]`: inverse rotation,
    /// then RMSNorm backward for q and k; a plain copy for v. The result is `[B, L, W]` with
    /// `W = 3 heads head_dim + tail_width`: the q, k, v columns, then `tail` `[B, L, tail_width]`
    /// if given. The tail is the gradient of the columns of x the op does not read (a single
    /// block's MLP pre-activation, which shares linear1's output with q, k, v), written in place
    /// so that the caller needs no concat; W must equal the forward input's width.
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope_backward(
        &self,
        x: &Tensor<Self>,
        heads: usize,
        q_scale: &Tensor<Self>,
        k_scale: &Tensor<Self>,
        pe: &Tensor<Self>,
        eps: f32,
        g_qkv: [&Tensor<Self>; 3],
        tail: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>>;

    /// The attention forward kernels this backend chooses between, by name, where it has more
    /// than one (a Hopper GPU: "portable" and "sm90a"); empty where there is no choice, or where
    /// the user switched the alternatives off. The self-test checks each and `engine kernels`
    /// times each, whichever the dispatch picks.
    fn attention_kernels(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// `attention_with_lse` through one of `attention_kernels`, forced.
    fn attention_with_lse_using(
        &self,
        kernel: &str,
        _q: &Tensor<Self>,
        _k: &Tensor<Self>,
        _v: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        anyhow::bail!("attention kernel '{kernel}': this backend has no choice of attention kernels")
    }

    /// Backward of `attention(q, k, v)`: given the forward's inputs, its output `out` and `lse`
    /// (from `attention_with_lse`) and the output gradient `g_out` `[B, Lq, H * D]` (heads merged,
    /// as the output), returns (gq, gk, gv) in the inputs' layout `[B, H, L, D]`. With
    /// `P = exp(q k^T / sqrt(D) - lse)` and `delta_i = g_out_i . out_i`:
    /// `gv = P^T g_out`, `gS = P * (g_out v^T - delta)`, `gq = gS k / sqrt(D)`,
    /// `gk = gS^T q / sqrt(D)`. Implementations rebuild P one query block at a time and never hold
    /// an `Lq x Lk` matrix.
    fn attention_backward(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        out: &Tensor<Self>,
        lse: &Tensor<Self>,
        g_out: &Tensor<Self>,
    ) -> Result<[Tensor<Self>; 3]>;

    /// The attention backward kernels this backend chooses between, by name, where it has more
    /// than one (a CUDA GPU: "simt" and "mma"); empty where there is no choice, or where the user
    /// switched the alternative off. The self-test checks each and `engine kernels` times each,
    /// whichever the dispatch picks.
    fn attention_backward_kernels(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// `attention_backward` through one of `attention_backward_kernels`, forced.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_using(
        &self,
        kernel: &str,
        _q: &Tensor<Self>,
        _k: &Tensor<Self>,
        _v: &Tensor<Self>,
        _out: &Tensor<Self>,
        _lse: &Tensor<Self>,
        _g_out: &Tensor<Self>,
    ) -> Result<[Tensor<Self>; 3]> {
        anyhow::bail!("attention backward kernel '{kernel}': this backend has no choice of attention backward kernels")
    }

    /// Backward of `gated_residual(x, gate, y) = x + gate * y` wrt the branch y: `gate * gy`, with
    /// gy `[B, L, D]` and gate `[B, D]`. (The gradient wrt x is gy itself.)
    fn gated_residual_backward(&self, gy: &Tensor<Self>, gate: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Full training: backward of `gated_residual(x, gate, y) = x + gate * y` wrt the gate, given
    /// the output gradient gy and the branch y, both `[B, L, D]`: `g_gate[b] = sum_l gy[b, l] * y[b, l]`,
    /// `[B, D]`.
    fn gated_residual_backward_gate(&self, gy: &Tensor<Self>, y: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Full training: backward of `silu`, `gx = gy * silu'(x)` with
    /// `silu'(x) = s (1 + x (1 - s))`, `s = sigmoid(x)`, given the forward's input x; any shape.
    fn silu_backward(&self, x: &Tensor<Self>, gy: &Tensor<Self>) -> Result<Tensor<Self>>;
}
