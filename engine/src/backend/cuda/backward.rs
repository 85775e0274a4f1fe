//! The training backward ops on the GPU (`backend::backward` states their semantics): products
//! through cuBLASLt (`gemm.rs`), the rest in kernels beside their forward in `cuda/<family>.cu`,
//! launched from the matching file here. This file only dispatches.

use super::attention::BackwardKernel;
use super::{attention, attention_hopper, elementwise, gemm, norm, rope, AttentionKernel, CudaBackend, T};
use crate::backend::backward::{BackwardOps, LoraAddGrads};
use crate::backend::profile::OpClass;
use anyhow::Result;

impl BackwardOps for CudaBackend {
    fn linear_backward_input(&self, gy: &T, w: &T) -> Result<T> {
        self.timed(OpClass::of_linear(gy.rank()), || gemm::linear_backward_input(self, gy, w))
    }

    fn linear_backward_params(&self, gy: &T, x: &T) -> Result<(T, T)> {
        self.timed(OpClass::of_linear(gy.rank()), || gemm::linear_backward_params(self, gy, x))
    }

    fn lora_backward(&self, gx: T, gy: &T, x: &T, down: &T, up: &T, scale: f32, offset: usize) -> Result<LoraAddGrads<Self>> {
        self.timed(OpClass::of_lora(x.rank()), || gemm::lora_backward(self, gx, gy, x, down, up, scale, offset))
    }

    fn gelu_tanh_backward(&self, x_pre: &T, gy: &T) -> Result<T> {
        self.timed(OpClass::Elementwise, || elementwise::unary_backward(self, elementwise::Unary::GeluTanh, x_pre, gy))
    }

    fn layer_norm_modulate_backward(&self, x: &T, scale: &T, gy: &T, eps: f32) -> Result<T> {
        self.timed(OpClass::Elementwise, || norm::layer_norm_modulate_backward(self, x, scale, gy, eps))
    }

    fn layer_norm_modulate_backward_shift_scale(&self, x: &T, gy: &T, eps: f32) -> Result<(T, T)> {
        self.timed(OpClass::Elementwise, || norm::layer_norm_modulate_backward_shift_scale(self, x, gy, eps))
    }

    fn qk_norm_rope_backward(
        &self,
        x: &T,
        heads: usize,
        q_scale: &T,
        k_scale: &T,
        pe: &T,
        eps: f32,
        g_qkv: [&T; 3],
        tail: Option<&T>,
    ) -> Result<T> {
        self.timed(OpClass::Elementwise, || rope::qk_norm_rope_backward(self, x, heads, q_scale, k_scale, pe, eps, g_qkv, tail))
    }

    fn attention_kernels(&self) -> Vec<&'static str> {
        match self.has_sm90a_attention() && attention_hopper::SM90A.allowed().unwrap_or(false) {
            true => AttentionKernel::ALL.iter().map(|k| k.name()).collect(),
            false => Vec::new(),
        }
    }

    fn attention_with_lse_using(&self, kernel: &str, q: &T, k: &T, v: &T) -> Result<(T, T)> {
        let kernel = AttentionKernel::ALL
            .into_iter()
            .find(|k| k.name() == kernel)
            .ok_or_else(|| anyhow::anyhow!("attention kernel '{kernel}': expected one of {:?}", AttentionKernel::ALL.map(|k| k.name())))?;
        self.timed(OpClass::Attention, || self.attention_using(q, k, v, kernel))
    }

    fn attention_backward(&self, q: &T, k: &T, v: &T, out: &T, lse: &T, g_out: &T) -> Result<[T; 3]> {
        self.timed(OpClass::Attention, || attention::backward(self, q, k, v, out, lse, g_out))
    }

    fn attention_backward_kernels(&self) -> Vec<&'static str> {
        match attention::MMA_BACKWARD.allowed().unwrap_or(false) {
            true => BackwardKernel::ALL.iter().map(|k| k.name()).collect(),
            false => Vec::new(),
        }
    }

    fn attention_backward_using(&self, kernel: &str, q: &T, k: &T, v: &T, out: &T, lse: &T, g_out: &T) -> Result<[T; 3]> {
        let kernel = BackwardKernel::ALL.into_iter().find(|k| k.name() == kernel).ok_or_else(|| {
            anyhow::anyhow!("attention backward kernel '{kernel}': expected one of {:?}", BackwardKernel::ALL.map(|k| k.name()))
        })?;
        self.timed(OpClass::Attention, || attention::backward_using(self, q, k, v, out, lse, g_out, Some(kernel)))
    }

    fn gated_residual_backward(&self, gy: &T, gate: &T) -> Result<T> {
        self.timed(OpClass::Elementwise, || elementwise::gated_residual_backward(self, gy, gate))
    }

    fn gated_residual_backward_gate(&self, gy: &T, y: &T) -> Result<T> {
        self.timed(OpClass::Elementwise, || elementwise::gated_residual_backward_gate(self, gy, y))
    }

    fn silu_backward(&self, x: &T, gy: &T) -> Result<T> {
        self.timed(OpClass::Elementwise, || elementwise::unary_backward(self, elementwise::Unary::Silu, x, gy))
    }
}
