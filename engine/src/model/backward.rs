//! The FLUX backward for training: each block's backward beside the activations its forward
//! (`layers.rs`, the one forward of inference and training) kept, reading like that forward from
//! the bottom up. The ops and their conventions are `backend::backward`'s; this file adds the
//! model's:
//! - What is differentiated is the call's `Trainable` set, the same one the forward was given.
//!   `Trainable::Lora`: the deltas it adds on token-path linears, with the base weights frozen
//!   and the vec path (time, guidance and vector embedders, every modulation linear) constant.
//!   `Trainable::Full`, to train a model from scratch: every weight and bias of every linear, the
//!   vec path's included, and nothing else: the QK-norm (RMSNorm) scales stay frozen at the 1 they
//!   are initialised to. `Trainable::Nothing`: the gradient wrt the input latent only. The model's
//!   own unmerged deltas are frozen in every case: the gradient passes through them.
//! - In full training the modulation vectors have gradients (from the modulated LayerNorms and the
//!   gated residuals that read them): each block and the final layer push theirs through their
//!   modulation linear, the gradients wrt `SiLU(vec)` are summed over all of them, and the sum
//!   goes back through SiLU and the three embedders once, after the blocks.
//! - LoRA gradients are collected under the target linear's BFL path
//!   (`double_blocks.0.img_attn.qkv`), one per delta in the order the adapters list them. Base
//!   gradients are keyed by the checkpoint key of their tensor
//!   (`double_blocks.0.img_attn.qkv.weight`): the names `Flux::build` reads and
//!   `params::base_parameters_mut` lists, so that trained weights save as a BFL checkpoint that
//!   loads back (`params::download_weights`).
//! - Saved activations are the forward's own tensors (moved, never copied); what is cheap to
//!   recompute from them (a narrow, a GELU, a concat, an embedder's SiLU) is recomputed on the way
//!   back. With `Checkpointing::PerBlock` a block keeps only its input and reruns its forward in
//!   the backward.

use super::flux::{Conditioning, Flux, FluxActs};
use super::layers::*;
use super::trainable::Trainable;
use crate::backend::backward::BackwardOps;
use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;

/// The gradient of one LoRA delta (`LoraDelta`): f32, shaped like its down and up.
pub struct LoraGrad<B: Backend> {
    pub down: Tensor<B>,
    pub up: Tensor<B>,
}

/// LoRA gradients by target linear (BFL path), one per trained delta in the adapters' order.
pub type LoraGrads<B> = BTreeMap<String, Vec<LoraGrad<B>>>;

/// Base parameter gradients by checkpoint key (`img_in.weight`), f32, shaped like the parameter.
pub type BaseGrads<B> = BTreeMap<String, Tensor<B>>;

/// What `Flux::backward` returns.
pub struct FluxGrads<B: Backend> {
    /// `Trainable::Lora`: a gradient for every delta the adapters add.
    pub lora: LoraGrads<B>,
    /// `Trainable::Full`: a gradient for every tensor `params::base_parameters_mut` lists, under
    /// the same name.
    pub base: BaseGrads<B>,
    /// The gradient wrt the input latent tokens `img` `[B, L, in]`.
    pub img: Tensor<B>,
}

/// Whether blocks keep their activations for the backward or recompute them from their input
/// (also a command-line value: `off`, `per-block`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Checkpointing {
    /// Keep every block's activations: the fastest; memory grows with depth.
    Off,
    /// Keep each block's input only and rerun its forward on the way back: one more forward of
    /// the blocks, for the memory of one block's activations.
    PerBlock,
}

/// What a backward collects on its way down: LoRA and base gradients by name, and in full
/// training the gradient wrt `SiLU(vec)` summed over the modulation linears passed so far.
struct GradCollector<'a, B: Backend> {
    tr: Trainable<'a, B>,
    lora: LoraGrads<B>,
    base: BaseGrads<B>,
    vec_silu: Option<Tensor<B>>,
}

impl<'a, B: Backend> GradCollector<'a, B> {
    fn full(&self) -> bool {
        self.tr.full()
    }
}

/// Backward of `Linear::forward` at input x: returns the input gradient and records the gradient
/// of each trained delta under the linear's name, and in full training those of its weight and
/// bias.
fn linear_backward<B: BackwardOps>(
    b: &B,
    lin: &Linear<B>,
    x: &Tensor<B>,
    gy: &Tensor<B>,
    grads: &mut GradCollector<B>,
) -> Result<Tensor<B>> {
    linear_params_backward(b, lin, x, gy, grads)?;
    let name = &lin.name;
    let mut gx = b.linear_backward_input(gy, &lin.weight).with_context(|| format!("backward of '{name}'"))?;
    // The model's own deltas are frozen: only their share of the input gradient.
    for d in &lin.lora {
        gx = b.lora_backward(gx, gy, x, &d.down, &d.up, d.scale, d.offset).with_context(|| format!("LoRA on '{name}'"))?.gx;
    }
    let trained = grads.tr.deltas_on(lin);
    if trained.is_empty() {
        return Ok(gx);
    }
    let mut deltas = Vec::with_capacity(trained.len());
    for d in trained {
        let g = b.lora_backward(gx, gy, x, &d.down, &d.up, d.scale, d.offset).with_context(|| format!("LoRA on '{name}'"))?;
        gx = g.gx;
        deltas.push(LoraGrad { down: g.down, up: g.up });
    }
    grads.lora.insert(name.clone(), deltas);
    Ok(gx)
}

/// Full training: records the gradients of a linear's weight and bias as `{name}.weight` and
/// `{name}.bias`. Nothing otherwise. For the linears whose input is data, this is their whole
/// backward.
fn linear_params_backward<B: BackwardOps>(
    b: &B,
    lin: &Linear<B>,
    x: &Tensor<B>,
    gy: &Tensor<B>,
    grads: &mut GradCollector<B>,
) -> Result<()> {
    if !grads.full() {
        return Ok(());
    }
    let name = &lin.name;
    let (g_weight, g_bias) = b.linear_backward_params(gy, x).with_context(|| format!("parameter backward of '{name}'"))?;
    grads.base.insert(format!("{name}.weight"), g_weight);
    if lin.bias.is_some() {
        grads.base.insert(format!("{name}.bias"), g_bias);
    }
    Ok(())
}

/// Full training: backward of the modulation linear `lin(vec_silu)`, given the gradients of its
/// output's chunks in the order it is cut (`Modulation::forward`: shift, scale, gate per triple;
/// the final layer: shift, scale). Records lin's gradients and adds the gradient wrt `vec_silu`
/// to the collector's sum.
fn modulation_backward<B: BackwardOps>(
    b: &B,
    lin: &Linear<B>,
    vec_silu: &Tensor<B>,
    chunks: &[&Tensor<B>],
    grads: &mut GradCollector<B>,
) -> Result<()> {
    let g_m = b.concat(chunks, 1)?;
    let g = linear_backward(b, lin, vec_silu, &g_m, grads)?;
    grads.vec_silu = Some(match grads.vec_silu.take() {
        Some(sum) => b.add(&sum, &g)?,
        None => g,
    });
    Ok(())
}

impl<B: BackwardOps> MlpEmbedder<B> {
    /// Full training: records the embedder's parameter gradients from its output gradient. Its
    /// input is data: no gradient.
    fn backward(
        &self,
        b: &B,
        x: &Tensor<B>,
        acts: &MlpEmbedderActs<B, Training>,
        g_out: &Tensor<B>,
        grads: &mut GradCollector<B>,
    ) -> Result<()> {
        let g_act = linear_backward(b, &self.out_layer, &b.silu(&acts.hidden)?, g_out, grads)?;
        let g_hidden = b.silu_backward(&acts.hidden, &g_act)?;
        linear_params_backward(b, &self.in_layer, x, &g_hidden, grads)
    }
}

/// A stream's attention rows' gradient and the gradient of the residual stream after attention.
struct StreamOutputGrads<B: Backend> {
    attn: Tensor<B>,
    resid: Tensor<B>,
    /// Full training: the gradients of the modulation chunks read after attention: mod1's gate,
    /// mod2's shift, scale and gate.
    modulation: Option<[Tensor<B>; 4]>,
}

const NO_BRANCHES: &str =
    "full training needs the gated branches, which this forward did not keep (run forward_train with Trainable::Full)";

impl<B: BackwardOps> Stream<B> {
    /// Backward of `attention_outputs`, from the gradient of the stream's output.
    fn attention_outputs_backward(
        &self,
        b: &B,
        acts: &StreamActs<B, Training>,
        attn: &Tensor<B>,
        g_out: &Tensor<B>,
        grads: &mut GradCollector<B>,
    ) -> Result<StreamOutputGrads<B>> {
        let g_mlp = b.gated_residual_backward(g_out, &acts.mod2.gate)?;
        let mlp_act = b.gelu_tanh(&acts.mlp_pre)?;
        let g_mlp_act = linear_backward(b, &self.mlp.fc2, &mlp_act, &g_mlp, grads)?;
        let g_mlp_pre = b.gelu_tanh_backward(&acts.mlp_pre, &g_mlp_act)?;
        let g_x_mod2 = linear_backward(b, &self.mlp.fc1, &acts.x_mod2, &g_mlp_pre, grads)?;
        let g_resid = b.add(g_out, &b.layer_norm_modulate_backward(&acts.resid, &acts.mod2.scale, &g_x_mod2, EPS)?)?;

        let modulation = if grads.full() {
            let [proj_out, mlp_out] = acts.branches.as_ref().context(NO_BRANCHES)?;
            let (g_shift2, g_scale2) = b.layer_norm_modulate_backward_shift_scale(&acts.resid, &g_x_mod2, EPS)?;
            let g_gate2 = b.gated_residual_backward_gate(g_out, mlp_out)?;
            Some([b.gated_residual_backward_gate(&g_resid, proj_out)?, g_shift2, g_scale2, g_gate2])
        } else {
            None
        };
        let g_proj = b.gated_residual_backward(&g_resid, &acts.mod1.gate)?;
        let g_attn = linear_backward(b, &self.attn.proj, attn, &g_proj, grads)?;
        Ok(StreamOutputGrads { attn: g_attn, resid: g_resid, modulation })
    }

    /// Backward of `attention_inputs`: the gradient of the stream's input x, from those of its
    /// q, k, v and of the residual stream after attention (through which x also passes). In full
    /// training, also the backward of the stream's modulation linear.
    #[allow(clippy::too_many_arguments)]
    fn attention_inputs_backward(
        &self,
        b: &B,
        x: &Tensor<B>,
        acts: &StreamActs<B, Training>,
        pe: &Tensor<B>,
        heads: usize,
        g_qkv_heads: [&Tensor<B>; 3],
        after: &StreamOutputGrads<B>,
        vec_silu: &Tensor<B>,
        grads: &mut GradCollector<B>,
    ) -> Result<Tensor<B>> {
        let norm = &self.attn.norm;
        let g_qkv = b.qk_norm_rope_backward(&acts.qkv, heads, &norm.query_norm, &norm.key_norm, pe, EPS, g_qkv_heads, None)?;
        let g_x_mod1 = linear_backward(b, &self.attn.qkv, &acts.x_mod1, &g_qkv, grads)?;
        if let Some([g_gate1, g_shift2, g_scale2, g_gate2]) = &after.modulation {
            let (g_shift1, g_scale1) = b.layer_norm_modulate_backward_shift_scale(x, &g_x_mod1, EPS)?;
            let chunks = [&g_shift1, &g_scale1, g_gate1, g_shift2, g_scale2, g_gate2];
            modulation_backward(b, &self.modulation.lin, vec_silu, &chunks, grads)?;
        }
        b.add(&after.resid, &b.layer_norm_modulate_backward(x, &acts.mod1.scale, &g_x_mod1, EPS)?)
    }
}

impl<B: BackwardOps> DoubleStreamBlock<B> {
    /// The gradients of the block's inputs (img, txt) from those of its outputs; parameter
    /// gradients are recorded, and in full training the gradient wrt `vec_silu` is added to the
    /// collector's sum.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        b: &B,
        img: &Tensor<B>,
        txt: &Tensor<B>,
        acts: &DoubleStreamActs<B, Training>,
        pe: &Positions<B>,
        vec_silu: &Tensor<B>,
        g_img: &Tensor<B>,
        g_txt: &Tensor<B>,
        grads: &mut GradCollector<B>,
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        let (h, lt, li) = (self.num_heads, txt.dim(1), img.dim(1));
        let g_img_out = self.img.attention_outputs_backward(b, &acts.img, &b.narrow(&acts.attn, 1, lt, li)?, g_img, grads)?;
        let g_txt_out = self.txt.attention_outputs_backward(b, &acts.txt, &b.narrow(&acts.attn, 1, 0, lt)?, g_txt, grads)?;

        let g_attn = b.concat(&[&g_txt_out.attn, &g_img_out.attn], 1)?;
        let [gq, gk, gv] = b.attention_backward(&acts.q, &acts.k, &acts.v, &acts.attn, &acts.lse, &g_attn)?;
        // Each stream's rows of the joint q, k, v gradients.
        let rows = |start: usize, len: usize| -> Result<[Tensor<B>; 3]> {
            Ok([b.narrow(&gq, 2, start, len)?, b.narrow(&gk, 2, start, len)?, b.narrow(&gv, 2, start, len)?])
        };
        let [img_gq, img_gk, img_gv] = rows(lt, li)?;
        let [txt_gq, txt_gk, txt_gv] = rows(0, lt)?;
        let g_img_in =
            self.img.attention_inputs_backward(b, img, &acts.img, &pe.img, h, [&img_gq, &img_gk, &img_gv], &g_img_out, vec_silu, grads)?;
        let g_txt_in =
            self.txt.attention_inputs_backward(b, txt, &acts.txt, &pe.txt, h, [&txt_gq, &txt_gk, &txt_gv], &g_txt_out, vec_silu, grads)?;
        Ok((g_img_in, g_txt_in))
    }
}

impl<B: BackwardOps> SingleStreamBlock<B> {
    /// The gradient of the block's input from that of its output; parameter gradients are
    /// recorded, and in full training the gradient wrt `vec_silu` is added to the collector's sum.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        b: &B,
        x: &Tensor<B>,
        acts: &SingleStreamActs<B, Training>,
        pe: &Positions<B>,
        vec_silu: &Tensor<B>,
        g_y: &Tensor<B>,
        grads: &mut GradCollector<B>,
    ) -> Result<Tensor<B>> {
        let (hidden, h) = (x.dim(2), &acts.h);
        let mlp_width = h.dim(2) - 3 * hidden;
        let g_out = b.gated_residual_backward(g_y, &acts.modulation.gate)?;
        let mlp_pre = b.narrow(h, 2, 3 * hidden, mlp_width)?;
        let linear2_in = b.concat(&[&acts.attn, &b.gelu_tanh(&mlp_pre)?], 2)?;
        let g_linear2_in = linear_backward(b, &self.linear2, &linear2_in, &g_out, grads)?;
        let g_attn = b.narrow(&g_linear2_in, 2, 0, hidden)?;
        let g_mlp_pre = b.gelu_tanh_backward(&mlp_pre, &b.narrow(&g_linear2_in, 2, hidden, mlp_width)?)?;

        let [gq, gk, gv] = b.attention_backward(&acts.q, &acts.k, &acts.v, &acts.attn, &acts.lse, &g_attn)?;
        let norm = &self.norm;
        // linear1's output gradient: q, k, v's, then the MLP's in the columns after them.
        let g_h = b.qk_norm_rope_backward(
            h,
            self.num_heads,
            &norm.query_norm,
            &norm.key_norm,
            &pe.joint,
            EPS,
            [&gq, &gk, &gv],
            Some(&g_mlp_pre),
        )?;
        let g_x_mod = linear_backward(b, &self.linear1, &acts.x_mod, &g_h, grads)?;
        if grads.full() {
            let g_gate = b.gated_residual_backward_gate(g_y, acts.branch.as_ref().context(NO_BRANCHES)?)?;
            let (g_shift, g_scale) = b.layer_norm_modulate_backward_shift_scale(x, &g_x_mod, EPS)?;
            modulation_backward(b, &self.modulation.lin, vec_silu, &[&g_shift, &g_scale, &g_gate], grads)?;
        }
        b.add(g_y, &b.layer_norm_modulate_backward(x, &acts.modulation.scale, &g_x_mod, EPS)?)
    }
}

impl<B: BackwardOps> LastLayer<B> {
    /// The gradient of the layer's input from that of its output; parameter gradients are
    /// recorded (and in full training the gradient wrt `vec_silu` added to the collector's sum).
    fn backward(
        &self,
        b: &B,
        x: &Tensor<B>,
        acts: &LastLayerActs<B, Training>,
        vec_silu: &Tensor<B>,
        g_out: &Tensor<B>,
        grads: &mut GradCollector<B>,
    ) -> Result<Tensor<B>> {
        let g_x_mod = linear_backward(b, &self.linear, &acts.x_mod, g_out, grads)?;
        if grads.full() {
            let (g_shift, g_scale) = b.layer_norm_modulate_backward_shift_scale(x, &g_x_mod, EPS)?;
            modulation_backward(b, &self.ada_ln_modulation, vec_silu, &[&g_shift, &g_scale], grads)?;
        }
        b.layer_norm_modulate_backward(x, &acts.scale, &g_x_mod, EPS)
    }
}

impl<B: BackwardOps> Flux<B> {
    /// The gradients of a scalar loss wrt what `tr` trains (see `FluxGrads`) and wrt the input
    /// `img`, given `g_out` = d loss / d out for the `out` of `forward_train(img, .., c, tr)`.
    pub fn backward(
        &self,
        b: &B,
        img: &Tensor<B>,
        c: &Conditioning<B>,
        tr: Trainable<B>,
        acts: FluxActs<B>,
        g_out: &Tensor<B>,
    ) -> Result<FluxGrads<B>> {
        let FluxActs { trained, vec_silu, vec, double, single, final_in, last } = acts;
        ensure!(trained == tr.kind(), "forward_train kept the activations of {trained} training, but the backward trains {}", tr.kind());
        let mut grads = GradCollector { tr, lora: LoraGrads::new(), base: BaseGrads::new(), vec_silu: None };
        let g_final_in = self.final_layer.backward(b, &final_in, &last, &vec_silu, g_out, &mut grads)?;
        // Only the image rows reach the final layer: the text rows of the last single block's
        // output have a zero gradient.
        let (batch, lt, hidden) = (c.txt.dim(0), c.txt.dim(1), self.params.hidden_size);
        let zeros = b.zeros(&[batch, lt, hidden])?;
        let mut g_x = b.concat(&[&zeros, &g_final_in], 1)?;
        for (block, step) in self.single_blocks.iter().zip(single).rev() {
            let acts = match step.acts {
                Some(acts) => acts,
                None => block.forward::<Training>(b, &step.x, &vec_silu, &c.pe, tr)?.1,
            };
            g_x = block.backward(b, &step.x, &acts, &c.pe, &vec_silu, &g_x, &mut grads)?;
        }
        let mut g_txt = b.narrow(&g_x, 1, 0, lt)?;
        let mut g_img = b.narrow(&g_x, 1, lt, g_x.dim(1) - lt)?;
        for (block, step) in self.double_blocks.iter().zip(double).rev() {
            let acts = match step.acts {
                Some(acts) => acts,
                None => block.forward::<Training>(b, &step.img, &step.txt, &vec_silu, &c.pe, tr)?.2,
            };
            (g_img, g_txt) = block.backward(b, &step.img, &step.txt, &acts, &c.pe, &vec_silu, &g_img, &g_txt, &mut grads)?;
        }
        let g_input = linear_backward(b, &self.img_in, img, &g_img, &mut grads)?;
        // The text tokens are data: txt_in only matters for its parameters (or its adapters).
        if tr.full() {
            linear_params_backward(b, &self.txt_in, &c.txt, &g_txt, &mut grads)?;
        } else if !tr.deltas_on(&self.txt_in).is_empty() {
            linear_backward(b, &self.txt_in, &c.txt, &g_txt, &mut grads)?;
        }
        if let Some(vec) = vec {
            let g_vec_silu = grads.vec_silu.take().context("no modulation linear gave a gradient wrt SiLU(vec)")?;
            let g_vec = b.silu_backward(&vec.vec, &g_vec_silu)?;
            let (t_emb, time) = &vec.time;
            self.time_in.backward(b, t_emb, time, &g_vec, &mut grads)?;
            if let (Some(g_in), Some((g_emb, acts))) = (&self.guidance_in, &vec.guidance) {
                g_in.backward(b, g_emb, acts, &g_vec, &mut grads)?;
            }
            self.vector_in.backward(b, &c.y, &vec.vector, &g_vec, &mut grads)?;
        } else {
            ensure!(!tr.full(), "full training needs the vec path's activations, which this forward did not keep");
        }
        Ok(FluxGrads { lora: grads.lora, base: grads.base, img: g_input })
    }
}

#[cfg(test)]
mod tests {
    //! The whole model against central differences of its inference forward, on `flux-tiny` with
    //! random weights and a random adapter on every token-path linear. The forward is f32, so the
    //! differences are taken with a fourth-order stencil at a step of a few percent of each
    //! parameter's size, and agreement is asserted at 1e-2 relative.
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::config::FluxParams;
    use crate::model::params;
    use crate::model::trainable::Adapters;
    use crate::model::weights::{LoraMode, WeightLoader};
    use loaders::lora::{LoraAdapter, LoraLayout, LoraPart};
    use loaders::HostTensor;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    type T = Tensor<CpuBackend>;
    const B: CpuBackend = CpuBackend;

    fn randn(n: usize, rng: &mut ChaCha8Rng, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let z: f32 = StandardNormal.sample(rng);
                std * z
            })
            .collect()
    }

    fn values(t: &T) -> Vec<f32> {
        B.download(t).unwrap().to_f32()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    /// A random adapter part: down ~ N(0, 1/in), up ~ N(0, 0.25/rank), so that the update is
    /// about half the size of the base weight's rows and B is not zero (else A gets no gradient).
    fn part(target: &str, in_f: usize, out_len: usize, offset: usize, rank: usize, scale: f32, rng: &mut ChaCha8Rng) -> LoraPart {
        LoraPart {
            target: target.to_string(),
            out_offset: offset,
            down: HostTensor::from_f32(vec![rank, in_f], randn(rank * in_f, rng, 1.0 / (in_f as f32).sqrt())),
            up: HostTensor::from_f32(vec![out_len, rank], randn(out_len * rank, rng, 0.5 / (rank as f32).sqrt())),
            up_bias: None,
            scale,
            source: target.to_string(),
        }
    }

    fn file(parts: Vec<LoraPart>) -> LoraAdapter {
        LoraAdapter { path: "random.safetensors".into(), layout: LoraLayout::Bfl, parts, replacements: vec![], skipped: vec![] }
    }

    /// flux-tiny with random weights, with `own` as its own unmerged adapters.
    fn tiny_model(own: Vec<LoraPart>) -> Result<Flux<CpuBackend>> {
        let p = FluxParams::preset("flux-tiny")?;
        let mut w = WeightLoader::random(&B, 11).with_lora(vec![file(own)], LoraMode::Unmerged);
        let model = Flux::build(&p, &mut w)?;
        w.finish()?;
        Ok(model)
    }

    /// `parts` as adapters passed to the model's passes.
    fn adapters(model: &Flux<CpuBackend>, parts: &[LoraPart]) -> Result<Adapters<CpuBackend>> {
        Adapters::from_file(&B, model, &file(parts.to_vec()))
    }

    /// An adapter on every token-path linear of flux-tiny (hidden 64, MLP 256): ranks 2 to 4,
    /// whole outputs and row ranges (q and v of a fused qkv, as diffusers adapters split them).
    fn every_target(rng: &mut ChaCha8Rng) -> Vec<LoraPart> {
        let (h, mlp) = (64, 256);
        let mut parts = vec![part("img_in", 64, h, 0, 2, 0.8, rng), part("txt_in", 64, h, 0, 2, 1.0, rng)];
        for s in ["img", "txt"] {
            let pre = format!("double_blocks.0.{s}");
            parts.push(part(&format!("{pre}_attn.qkv"), h, h, 0, 3, 1.0, rng));
            parts.push(part(&format!("{pre}_attn.qkv"), h, h, 2 * h, 2, 0.5, rng));
            parts.push(part(&format!("{pre}_attn.proj"), h, h, 0, 4, 1.0, rng));
            parts.push(part(&format!("{pre}_mlp.0"), h, mlp, 0, 2, 1.25, rng));
            parts.push(part(&format!("{pre}_mlp.2"), mlp, h, 0, 3, 1.0, rng));
        }
        parts.push(part("single_blocks.0.linear1", h, 3 * h + mlp, 0, 4, 1.0, rng));
        parts.push(part("single_blocks.0.linear2", h + mlp, h, 0, 2, 0.75, rng));
        parts.push(part("final_layer.linear", h, 64, 0, 2, 1.0, rng));
        parts
    }

    /// Random inputs for 2 samples of 3 x 4 image tokens and 5 text tokens, and the loss weights.
    struct Problem {
        img: T,
        c: Conditioning<CpuBackend>,
        timesteps: T,
        g_out: Vec<f32>,
    }

    fn problem(model: &Flux<CpuBackend>, rng: &mut ChaCha8Rng) -> Problem {
        let p = &model.params;
        let (batch, rows, cols, lt) = (2, 3, 4, 5);
        let li = rows * cols;
        let img_ids: Vec<f32> = (0..batch).flat_map(|_| (0..li).flat_map(|i| [0.0, (i / cols) as f32, (i % cols) as f32])).collect();
        let host = |shape: Vec<usize>, data: Vec<f32>| HostTensor::from_f32(shape, data);
        let txt = host(vec![batch, lt, p.context_in_dim], randn(batch * lt * p.context_in_dim, rng, 1.0));
        let y = host(vec![batch, p.vec_in_dim], randn(batch * p.vec_in_dim, rng, 1.0));
        let guidance = host(vec![batch], vec![3.5, 1.5]);
        let txt_ids = host(vec![batch, lt, 3], vec![0.0; batch * lt * 3]);
        let c = Conditioning::new(&B, model, &txt, &y, Some(&guidance), &txt_ids, &host(vec![batch, li, 3], img_ids)).unwrap();
        Problem {
            img: B.input(&host(vec![batch, li, p.in_channels], randn(batch * li * p.in_channels, rng, 1.0))).unwrap(),
            timesteps: B.input(&host(vec![batch], vec![0.3, 0.85])).unwrap(),
            c,
            g_out: randn(batch * li * p.out_channels, rng, 1.0),
        }
    }

    impl Problem {
        /// `sum(g_out * forward(img))` through the inference forward.
        fn loss(&self, model: &Flux<CpuBackend>, tr: Trainable<CpuBackend>, img: &T) -> f64 {
            dot(&self.g_out, &values(&model.forward(&B, img, &self.timesteps, &self.c, tr).unwrap()))
        }

        fn grads(
            &self,
            model: &Flux<CpuBackend>,
            tr: Trainable<CpuBackend>,
            checkpointing: Checkpointing,
        ) -> (Vec<f32>, FluxGrads<CpuBackend>) {
            let (out, acts) = model.forward_train(&B, &self.img, &self.timesteps, &self.c, tr, checkpointing).unwrap();
            let g_out = B.input(&HostTensor::from_f32(out.shape().to_vec(), self.g_out.clone())).unwrap();
            (values(&out), model.backward(&B, &self.img, &self.c, tr, acts, &g_out).unwrap())
        }
    }

    /// The derivative of `f` at 0 by the fourth-order central stencil.
    fn derivative(mut f: impl FnMut(f64) -> f64, step: f64) -> f64 {
        (8.0 * (f(step) - f(-step)) - (f(2.0 * step) - f(-2.0 * step))) / (12.0 * step)
    }

    fn assert_agree(what: &str, analytic: f64, numeric: f64) {
        assert!((analytic - numeric).abs() <= 1e-2 * numeric.abs(), "{what}: analytic {analytic} vs numeric {numeric}");
    }

    #[derive(Clone, Copy, Debug)]
    enum Factor {
        Down,
        Up,
    }

    /// `base + t * dir` as a host tensor of `shape`.
    fn moved_host(base: &[f32], dir: &[f32], t: f64, shape: &[usize]) -> HostTensor {
        HostTensor::from_f32(shape.to_vec(), base.iter().zip(dir).map(|(&p, &d)| (p as f64 + t * d as f64) as f32).collect())
    }

    /// `base + t * dir` as a tensor of `shape`.
    fn moved(base: &[f32], dir: &[f32], t: f64, shape: &[usize]) -> T {
        B.input(&moved_host(base, dir, t, shape)).unwrap()
    }

    #[test]
    fn training_forward_is_the_forward_and_checkpointing_changes_nothing() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let model = tiny_model(vec![]).unwrap();
        let parts = every_target(&mut rng);
        let ad = adapters(&model, &parts).unwrap();
        let pb = problem(&model, &mut rng);
        let reference = values(&model.forward(&B, &pb.img, &pb.timesteps, &pb.c, Trainable::Lora(&ad)).unwrap());
        let (out_kept, kept) = pb.grads(&model, Trainable::Lora(&ad), Checkpointing::Off);
        let (out_recomputed, recomputed) = pb.grads(&model, Trainable::Lora(&ad), Checkpointing::PerBlock);
        assert_eq!(out_kept, reference);
        assert_eq!(out_recomputed, reference);
        assert_eq!(values(&kept.img), values(&recomputed.img));
        assert_eq!(kept.lora.keys().collect::<Vec<_>>(), recomputed.lora.keys().collect::<Vec<_>>());
        for (name, deltas) in &kept.lora {
            for (a, b) in deltas.iter().zip(&recomputed.lora[name]) {
                assert_eq!((values(&a.down), values(&a.up)), (values(&b.down), values(&b.up)), "{name}");
            }
        }
    }

    #[test]
    fn gradients_match_differences_of_the_forward() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let model = tiny_model(vec![]).unwrap();
        let parts = every_target(&mut rng);
        let pb = problem(&model, &mut rng);
        let ad = adapters(&model, &parts).unwrap();
        let (_, grads) = pb.grads(&model, Trainable::Lora(&ad), Checkpointing::Off);
        let mut targets: Vec<String> = params::token_path(&model).into_iter().map(|lin| lin.name.clone()).collect();
        targets.sort();
        assert_eq!(grads.lora.keys().cloned().collect::<Vec<_>>(), targets, "a gradient for every adapted linear");

        // Each factor of each delta along a random direction whose elements have the factor's
        // size, so that one step size suits all. The k-th part on a target is its k-th delta.
        for (target, deltas) in &grads.lora {
            let on_target: Vec<usize> = (0..parts.len()).filter(|&i| &parts[i].target == target).collect();
            for (index, g) in deltas.iter().enumerate() {
                for (which, grad) in [(Factor::Down, &g.down), (Factor::Up, &g.up)] {
                    let k = on_target[index];
                    let shape = grad.shape().to_vec();
                    let p0 = match which {
                        Factor::Down => parts[k].down.to_f32(),
                        Factor::Up => parts[k].up.to_f32(),
                    };
                    let rms = (dot(&p0, &p0) / p0.len() as f64).sqrt() as f32;
                    let dir = randn(p0.len(), &mut rng, rms);
                    let numeric = derivative(
                        |t| {
                            let mut moved_parts = parts.clone();
                            match which {
                                Factor::Down => moved_parts[k].down = moved_host(&p0, &dir, t, &shape),
                                Factor::Up => moved_parts[k].up = moved_host(&p0, &dir, t, &shape),
                            }
                            pb.loss(&model, Trainable::Lora(&adapters(&model, &moved_parts).unwrap()), &pb.img)
                        },
                        0.05,
                    );
                    assert_agree(&format!("{target}[{index}] {which:?}"), dot(&values(grad), &dir), numeric);
                }
            }
        }

        let img = values(&pb.img);
        for _ in 0..3 {
            let dir = randn(img.len(), &mut rng, 1.0);
            let numeric = derivative(|t| pb.loss(&model, Trainable::Lora(&ad), &moved(&img, &dir, t, pb.img.shape())), 0.05);
            assert_agree("input img", dot(&values(&grads.img), &dir), numeric);
        }
    }

    #[test]
    fn an_adapter_on_the_modulation_path_is_refused() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let model = tiny_model(vec![]).unwrap();
        let err = adapters(&model, &[part("double_blocks.0.img_mod.lin", 64, 64, 64, 2, 1.0, &mut rng)]).err().expect("refused");
        assert!(err.to_string().contains("double_blocks.0.img_mod.lin"), "{err}");
    }

    /// flux-tiny (which has a guidance embedding, so that guidance_in is covered) with random
    /// weights and no adapter, to train fully.
    fn full_model() -> Flux<CpuBackend> {
        let model = tiny_model(vec![]).unwrap();
        assert!(model.guidance_in.is_some(), "flux-tiny has no guidance embedding: guidance_in would go untested");
        model
    }

    /// The base parameter `name`, as `params::base_parameters_mut` names it.
    fn base<'m>(model: &'m mut Flux<CpuBackend>, name: &str) -> &'m mut T {
        params::base_parameters_mut(model).into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no base parameter '{name}'")).1
    }

    #[test]
    fn full_training_forward_is_the_forward_and_checkpointing_changes_nothing() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut model = full_model();
        let pb = problem(&model, &mut rng);
        let reference = values(&model.forward(&B, &pb.img, &pb.timesteps, &pb.c, Trainable::Full).unwrap());
        let (out_kept, kept) = pb.grads(&model, Trainable::Full, Checkpointing::Off);
        let (out_recomputed, recomputed) = pb.grads(&model, Trainable::Full, Checkpointing::PerBlock);
        assert_eq!(out_kept, reference);
        assert_eq!(out_recomputed, reference);
        assert!(kept.lora.is_empty());
        assert_eq!(values(&kept.img), values(&recomputed.img));
        assert_eq!(kept.base.keys().collect::<Vec<_>>(), recomputed.base.keys().collect::<Vec<_>>());
        for (name, g) in &kept.base {
            assert_eq!(values(g), values(&recomputed.base[name]), "{name}");
        }

        // A gradient for every trainable tensor, of its shape, under its name.
        let mut names = Vec::new();
        for (name, t) in params::base_parameters_mut(&mut model) {
            let g = kept.base.get(&name).unwrap_or_else(|| panic!("no gradient for '{name}'"));
            assert_eq!(g.shape(), t.shape(), "{name}");
            names.push(name);
        }
        names.sort();
        assert_eq!(kept.base.keys().cloned().collect::<Vec<_>>(), names);

        // LoRA training of the same model, with no adapter: no base gradients, the same input
        // gradient.
        let none = adapters(&model, &[]).unwrap();
        let (_, lora) = pb.grads(&model, Trainable::Lora(&none), Checkpointing::Off);
        assert!(lora.base.is_empty() && lora.lora.is_empty());
        assert_eq!(values(&lora.img), values(&kept.img));

        // Activations kept for one kind of training do not serve the other.
        let (out, acts) = model.forward_train(&B, &pb.img, &pb.timesteps, &pb.c, Trainable::Lora(&none), Checkpointing::Off).unwrap();
        let g_out = B.input(&HostTensor::from_f32(out.shape().to_vec(), pb.g_out.clone())).unwrap();
        let err = model.backward(&B, &pb.img, &pb.c, Trainable::Full, acts, &g_out).err().expect("refused");
        assert!(err.to_string().contains("Lora"), "{err}");
    }

    #[test]
    fn full_gradients_match_differences_of_the_forward() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut model = full_model();
        let pb = problem(&model, &mut rng);
        let (_, grads) = pb.grads(&model, Trainable::Full, Checkpointing::Off);
        let names: Vec<String> = params::base_parameters_mut(&mut model).into_iter().map(|(n, _)| n).collect();
        for name in &names {
            let grad = values(&grads.base[name]);
            let p0 = values(base(&mut model, name));
            let shape = base(&mut model, name).shape().to_vec();
            let n = p0.len();
            let rms = (dot(&p0, &p0) / n as f64).sqrt();
            let g_rms = (dot(&grad, &grad) / n as f64).sqrt();
            let mut at = |dir: &[f32], step: f64| {
                let numeric = derivative(
                    |t| {
                        *base(&mut model, name) = moved(&p0, dir, t, &shape);
                        pb.loss(&model, Trainable::Full, &pb.img)
                    },
                    step,
                );
                *base(&mut model, name) = moved(&p0, dir, 0.0, &shape);
                numeric
            };
            // The whole tensor along a random direction of its elements' size, as for the LoRA
            // factors, but at least 0.1: the biases start near 0, and a step of a few percent of
            // theirs would drown the difference in the forward's rounding.
            let size = rms.max(0.1);
            let dir = randn(n, &mut rng, size as f32);
            let (analytic, numeric) = (dot(&grad, &dir), at(&dir, 0.05));
            assert_agree(name, analytic, numeric);
            // Single entries, each moved by half that size. An entry whose derivative happens to
            // be small is held to the size of a typical one, which is all f32 can resolve.
            for _ in 0..4 {
                let i = rng.random_range(0..n);
                let mut dir = vec![0f32; n];
                dir[i] = 1.0;
                let (analytic, numeric) = (grad[i] as f64, at(&dir, 0.5 * size));
                let err = (analytic - numeric).abs() / numeric.abs().max(g_rms);
                assert!(err <= 1e-2, "{name}[{i}]: analytic {analytic} vs numeric {numeric} (typical size {g_rms})");
            }
        }
    }

    #[test]
    fn full_training_refuses_adapters() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let model = tiny_model(vec![part("double_blocks.0.img_attn.proj", 64, 64, 0, 2, 1.0, &mut rng)]).unwrap();
        let pb = problem(&model, &mut rng);
        let err = model.forward_train(&B, &pb.img, &pb.timesteps, &pb.c, Trainable::Full, Checkpointing::Off).err().expect("refused");
        assert!(err.to_string().contains("double_blocks.0.img_attn.proj") && err.to_string().contains("full training"), "{err}");
        assert!(model.forward_train(&B, &pb.img, &pb.timesteps, &pb.c, Trainable::Nothing, Checkpointing::Off).is_ok());
    }

    #[test]
    fn downloaded_weights_are_the_checkpoint_and_load_back() {
        let p = FluxParams::preset("flux-tiny").unwrap();
        let mut w = WeightLoader::random(&B, 12).recording();
        let mut model = Flux::build(&p, &mut w).unwrap();
        let recorded: BTreeMap<String, HostTensor> = w.take_recorded().into_iter().collect();
        w.finish().unwrap();
        let weights = params::download_weights(&B, &model).unwrap();
        assert_eq!(weights.keys().collect::<Vec<_>>(), recorded.keys().collect::<Vec<_>>(), "the tensors Flux::build reads");
        for (name, t) in &weights {
            assert_eq!((&t.shape, t.to_f32()), (&recorded[name].shape, recorded[name].to_f32()), "{name}");
        }
        // Full training trains all of them but the QK-norm scales.
        let mut trained: Vec<String> = params::base_parameters_mut(&mut model).into_iter().map(|(n, _)| n).collect();
        trained.sort();
        let unscaled: Vec<String> = recorded.keys().filter(|n| !n.ends_with("_norm.scale")).cloned().collect();
        assert_eq!(trained, unscaled);

        // A weight changed in place is what gets saved, and the file loads back as a BFL
        // transformer that computes what the model does.
        let name = "double_blocks.0.txt_mod.lin.weight";
        let changed: Vec<f32> = values(base(&mut model, name)).iter().map(|v| 1.5 * v + 0.01).collect();
        let shape = base(&mut model, name).shape().to_vec();
        *base(&mut model, name) = B.upload(&HostTensor::from_f32(shape, changed)).unwrap();
        let weights = params::download_weights(&B, &model).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("transformer.safetensors");
        let list: Vec<(&str, &HostTensor)> = weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
        loaders::safetensors::write(&path, &list, &BTreeMap::new(), false).unwrap();
        let ckpt = loaders::flux::FluxCheckpoint::open(&path).unwrap();
        assert_eq!(ckpt.layout(), loaders::flux::Layout::Bfl);
        let mut w = WeightLoader::new(&B, &ckpt);
        let loaded = Flux::build(&p, &mut w).unwrap();
        w.finish().unwrap();
        let pb = problem(&model, &mut ChaCha8Rng::seed_from_u64(7));
        let out = |m: &Flux<CpuBackend>| values(&m.forward(&B, &pb.img, &pb.timesteps, &pb.c, Trainable::Nothing).unwrap());
        assert_eq!(out(&loaded), out(&model));
    }
}
