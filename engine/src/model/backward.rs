//! The FLUX backward for training: each block's forward again, keeping what its backward needs,
//! beside that backward, which reads like the forward (`layers.rs`) from the bottom up.
//! The ops and their conventions are `backend::backward`'s; this file adds the model's:
//! - What is trained is `Flux::trainable`. `Trainable::Lora` (what `Flux::build` sets): every
//!   unmerged LoRA delta on the token path (`img_in`, `txt_in`, the blocks' qkv, proj, MLP,
//!   linear1 and linear2, `final_layer.linear`), with the base weights frozen and the vec path
//!   (time, guidance and vector embedders, every modulation linear) constant: `forward_train`
//!   refuses a model with an adapter there, since its gradient would flow through the modulation
//!   vectors. `Trainable::Full`, to train a model from scratch: every weight and bias of every
//!   linear, the vec path's included, and nothing else: the QK-norm (RMSNorm) scales stay frozen
//!   at the 1 they are initialised to. Full training starts from a model without adapters and
//!   refuses one that has any: an adapter on a linear whose base is trained adds nothing.
//! - In full training the modulation vectors have gradients (from the modulated LayerNorms and the
//!   gated residuals that read them): each block and the final layer push theirs through their
//!   modulation linear, the gradients wrt `SiLU(vec)` are summed over all of them, and the sum
//!   goes back through SiLU and the three embedders once, after the blocks.
//! - LoRA gradients are collected under the target linear's BFL path
//!   (`double_blocks.0.img_attn.qkv`), one per delta in the order of `Linear::lora`, so that they
//!   line up with the adapter parts that built the model. Base gradients are keyed by the
//!   checkpoint key of their tensor (`double_blocks.0.img_attn.qkv.weight`): the names
//!   `Flux::build` reads and `Flux::base_parameters_mut` lists, so that trained weights save as a
//!   BFL checkpoint that loads back (`Flux::download_weights`).
//! - Saved activations are the forward's own tensors (moved, never copied); what is cheap to
//!   recompute from them (a narrow, a GELU, a concat, an embedder's SiLU) is recomputed on the way
//!   back. Full training also keeps the branches the gates scale, which cannot be recovered from
//!   the residual stream, and the vec path's inputs and pre-activations. With
//!   `Checkpointing::PerBlock` a block keeps only its input and reruns its forward in the
//!   backward.

use super::config::TIME_EMBED_DIM;
use super::flux::{Conditioning, Flux};
use super::layers::*;
use crate::backend::backward::BackwardOps;
use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use loaders::HostTensor;
use std::collections::BTreeMap;

/// What `Flux::backward` computes gradients for (`Flux::trainable`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Trainable {
    /// The unmerged LoRA deltas on the token path; the base weights and the vec path are
    /// constants.
    #[default]
    Lora,
    /// Every weight and bias of every linear, the vec path's included; the QK-norm scales stay
    /// frozen. The model must carry no adapter.
    Full,
}

/// The gradient of one LoRA delta (`LoraDelta`): f32, shaped like its down and up.
pub struct LoraGrad<B: Backend> {
    pub down: Tensor<B>,
    pub up: Tensor<B>,
}

/// LoRA gradients by target linear (BFL path), one per delta in the order of `Linear::lora`.
pub type LoraGrads<B> = BTreeMap<String, Vec<LoraGrad<B>>>;

/// Base parameter gradients by checkpoint key (`img_in.weight`), f32, shaped like the parameter.
pub type BaseGrads<B> = BTreeMap<String, Tensor<B>>;

/// What `Flux::backward` returns.
pub struct FluxGrads<B: Backend> {
    /// Empty in full training.
    pub lora: LoraGrads<B>,
    /// Full training: a gradient for every tensor `Flux::base_parameters_mut` lists, under the
    /// same name. Empty in LoRA training.
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
pub struct GradCollector<B: Backend> {
    trainable: Trainable,
    lora: LoraGrads<B>,
    base: BaseGrads<B>,
    vec_silu: Option<Tensor<B>>,
}

impl<B: Backend> GradCollector<B> {
    pub fn new(trainable: Trainable) -> Self {
        GradCollector { trainable, lora: LoraGrads::new(), base: BaseGrads::new(), vec_silu: None }
    }

    fn full(&self) -> bool {
        self.trainable == Trainable::Full
    }
}

/// Backward of `Linear::forward` at input x: returns the input gradient and records the gradient
/// of each LoRA delta under `name`, and in full training those of the weight and bias.
fn linear_backward<B: BackwardOps>(
    b: &B,
    lin: &Linear<B>,
    x: &Tensor<B>,
    gy: &Tensor<B>,
    name: &str,
    grads: &mut GradCollector<B>,
) -> Result<Tensor<B>> {
    linear_params_backward(b, lin, x, gy, name, grads)?;
    let mut gx = b.linear_backward_input(gy, &lin.weight).with_context(|| format!("backward of '{name}'"))?;
    if lin.lora.is_empty() {
        return Ok(gx);
    }
    let mut deltas = Vec::with_capacity(lin.lora.len());
    for d in &lin.lora {
        let g = b.lora_backward(gx, gy, x, &d.down, &d.up, d.scale, d.offset).with_context(|| format!("LoRA on '{name}'"))?;
        gx = g.gx;
        deltas.push(LoraGrad { down: g.down, up: g.up });
    }
    grads.lora.insert(name.to_string(), deltas);
    Ok(gx)
}

/// Full training: records the gradients of a linear's weight and bias as `{name}.weight` and
/// `{name}.bias`. Nothing in LoRA training. For the linears whose input is data, this is their
/// whole backward.
fn linear_params_backward<B: BackwardOps>(
    b: &B,
    lin: &Linear<B>,
    x: &Tensor<B>,
    gy: &Tensor<B>,
    name: &str,
    grads: &mut GradCollector<B>,
) -> Result<()> {
    if !grads.full() {
        return Ok(());
    }
    let (g_weight, g_bias) = b.linear_backward_params(gy, x).with_context(|| format!("parameter backward of '{name}'"))?;
    grads.base.insert(format!("{name}.weight"), g_weight);
    if lin.bias.is_some() {
        grads.base.insert(format!("{name}.bias"), g_bias);
    }
    Ok(())
}

/// Full training: backward of the modulation linear `lin(vec_silu)`, given the gradients of its
/// output's chunks in the order it is cut (`Modulation::forward`: shift, scale, gate per triple;
/// the final layer: shift, scale). Records lin's gradients under `name` and adds the gradient wrt
/// `vec_silu` to the collector's sum.
fn modulation_backward<B: BackwardOps>(
    b: &B,
    lin: &Linear<B>,
    vec_silu: &Tensor<B>,
    chunks: &[&Tensor<B>],
    name: &str,
    grads: &mut GradCollector<B>,
) -> Result<()> {
    let g_m = b.concat(chunks, 1)?;
    let g = linear_backward(b, lin, vec_silu, &g_m, name, grads)?;
    grads.vec_silu = Some(match grads.vec_silu.take() {
        Some(sum) => b.add(&sum, &g)?,
        None => g,
    });
    Ok(())
}

impl<B: BackwardOps> MlpEmbedder<B> {
    /// `forward`, also returning the hidden pre-activation (in_layer's output) for `backward`.
    fn forward_train(&self, b: &B, x: &Tensor<B>) -> Result<(Tensor<B>, Tensor<B>)> {
        let hidden = self.in_layer.forward(b, x)?;
        Ok((self.out_layer.forward(b, &b.silu(&hidden)?)?, hidden))
    }

    /// Full training: records the embedder's parameter gradients under `name` (`time_in`) from
    /// its output gradient. Its input is data: no gradient.
    fn backward(
        &self,
        b: &B,
        x: &Tensor<B>,
        hidden: &Tensor<B>,
        g_out: &Tensor<B>,
        name: &str,
        grads: &mut GradCollector<B>,
    ) -> Result<()> {
        let g_act = linear_backward(b, &self.out_layer, &b.silu(hidden)?, g_out, &format!("{name}.out_layer"), grads)?;
        let g_hidden = b.silu_backward(hidden, &g_act)?;
        linear_params_backward(b, &self.in_layer, x, &g_hidden, &format!("{name}.in_layer"), grads)
    }
}

/// One stream of a double block, beside the block's input: all but the joint attention.
struct StreamActs<B: Backend> {
    mod1: ModulationOut<B>,
    mod2: ModulationOut<B>,
    /// Input of the qkv linear.
    x_mod1: Tensor<B>,
    /// Output of the qkv linear, input of `qk_norm_rope`.
    qkv: Tensor<B>,
    /// The residual stream after attention, input of the MLP half.
    resid: Tensor<B>,
    /// Input of the first MLP linear.
    x_mod2: Tensor<B>,
    /// Output of the first MLP linear, before GELU.
    mlp_pre: Tensor<B>,
    /// Full training: the branches the gates scale (outputs of the attention projection and of
    /// the MLP), for the gates' gradients.
    branches: Option<[Tensor<B>; 2]>,
}

/// What `DoubleStreamBlock::backward` needs beside the block's inputs.
pub struct DoubleStreamActs<B: Backend> {
    img: StreamActs<B>,
    txt: StreamActs<B>,
    /// The joint `[txt; img]` attention: its inputs, output and row log-sum-exp.
    q: Tensor<B>,
    k: Tensor<B>,
    v: Tensor<B>,
    attn: Tensor<B>,
    lse: Tensor<B>,
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
    "full training needs the gated branches, which this forward did not keep (run forward_train with the same Trainable)";

impl<B: BackwardOps> Stream<B> {
    /// The stream up to attention: modulated LayerNorm, qkv, QK-norm and RoPE. Returns
    /// `[q, k, v, x_mod1, qkv]`.
    fn attention_inputs(&self, b: &B, x: &Tensor<B>, mod1: &ModulationOut<B>, pe: &Tensor<B>, heads: usize) -> Result<[Tensor<B>; 5]> {
        let x_mod1 = b.layer_norm_modulate(x, &mod1.shift, &mod1.scale, EPS)?;
        let qkv = self.attn.qkv.forward(b, &x_mod1)?;
        let [q, k, v] = b.qk_norm_rope(&qkv, heads, &self.attn.norm.query_norm, &self.attn.norm.key_norm, pe, EPS)?;
        Ok([q, k, v, x_mod1, qkv])
    }

    /// The stream after attention, given its rows of the attention output: projection and gated
    /// residual, then the modulated MLP and gated residual. Returns
    /// `[out, resid, x_mod2, mlp_pre, proj_out, mlp_out]`.
    fn attention_outputs(&self, b: &B, x: &Tensor<B>, attn: &Tensor<B>, [mod1, mod2]: [&ModulationOut<B>; 2]) -> Result<[Tensor<B>; 6]> {
        let proj_out = self.attn.proj.forward(b, attn)?;
        let resid = b.gated_residual(x, &mod1.gate, &proj_out)?;
        let x_mod2 = b.layer_norm_modulate(&resid, &mod2.shift, &mod2.scale, EPS)?;
        let mlp_pre = self.mlp.fc1.forward(b, &x_mod2)?;
        let mlp_out = self.mlp.fc2.forward(b, &b.gelu_tanh(&mlp_pre)?)?;
        let out = b.gated_residual(&resid, &mod2.gate, &mlp_out)?;
        Ok([out, resid, x_mod2, mlp_pre, proj_out, mlp_out])
    }

    /// Backward of `attention_outputs`, from the gradient of the stream's output.
    fn attention_outputs_backward(
        &self,
        b: &B,
        acts: &StreamActs<B>,
        attn: &Tensor<B>,
        g_out: &Tensor<B>,
        name: &str,
        grads: &mut GradCollector<B>,
    ) -> Result<StreamOutputGrads<B>> {
        let g_mlp = b.gated_residual_backward(g_out, &acts.mod2.gate)?;
        let mlp_act = b.gelu_tanh(&acts.mlp_pre)?;
        let g_mlp_act = linear_backward(b, &self.mlp.fc2, &mlp_act, &g_mlp, &format!("{name}_mlp.2"), grads)?;
        let g_mlp_pre = b.gelu_tanh_backward(&acts.mlp_pre, &g_mlp_act)?;
        let g_x_mod2 = linear_backward(b, &self.mlp.fc1, &acts.x_mod2, &g_mlp_pre, &format!("{name}_mlp.0"), grads)?;
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
        let g_attn = linear_backward(b, &self.attn.proj, attn, &g_proj, &format!("{name}_attn.proj"), grads)?;
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
        acts: &StreamActs<B>,
        pe: &Tensor<B>,
        heads: usize,
        g_qkv_heads: [&Tensor<B>; 3],
        after: &StreamOutputGrads<B>,
        vec_silu: &Tensor<B>,
        name: &str,
        grads: &mut GradCollector<B>,
    ) -> Result<Tensor<B>> {
        let norm = &self.attn.norm;
        let g_qkv = b.qk_norm_rope_backward(&acts.qkv, heads, &norm.query_norm, &norm.key_norm, pe, EPS, g_qkv_heads, None)?;
        let g_x_mod1 = linear_backward(b, &self.attn.qkv, &acts.x_mod1, &g_qkv, &format!("{name}_attn.qkv"), grads)?;
        if let Some([g_gate1, g_shift2, g_scale2, g_gate2]) = &after.modulation {
            let (g_shift1, g_scale1) = b.layer_norm_modulate_backward_shift_scale(x, &g_x_mod1, EPS)?;
            let chunks = [&g_shift1, &g_scale1, g_gate1, g_shift2, g_scale2, g_gate2];
            modulation_backward(b, &self.modulation.lin, vec_silu, &chunks, &format!("{name}_mod.lin"), grads)?;
        }
        b.add(&after.resid, &b.layer_norm_modulate_backward(x, &acts.mod1.scale, &g_x_mod1, EPS)?)
    }
}

impl<B: BackwardOps> DoubleStreamBlock<B> {
    /// `forward`, keeping the activations `backward` needs for `trainable`.
    pub fn forward_train(
        &self,
        b: &B,
        img: &Tensor<B>,
        txt: &Tensor<B>,
        vec_silu: &Tensor<B>,
        pe: &Positions<B>,
        trainable: Trainable,
    ) -> Result<(Tensor<B>, Tensor<B>, DoubleStreamActs<B>)> {
        let h = self.num_heads;
        let [img_mod1, img_mod2] = two(self.img.modulation.forward(b, vec_silu)?)?;
        let [txt_mod1, txt_mod2] = two(self.txt.modulation.forward(b, vec_silu)?)?;
        let [img_q, img_k, img_v, img_x_mod1, img_qkv] = self.img.attention_inputs(b, img, &img_mod1, &pe.img, h)?;
        let [txt_q, txt_k, txt_v, txt_x_mod1, txt_qkv] = self.txt.attention_inputs(b, txt, &txt_mod1, &pe.txt, h)?;

        // Joint attention over [txt; img].
        let q = b.concat(&[&txt_q, &img_q], 2)?;
        let k = b.concat(&[&txt_k, &img_k], 2)?;
        let v = b.concat(&[&txt_v, &img_v], 2)?;
        let (attn, lse) = b.attention_with_lse(&q, &k, &v)?;
        let (lt, li) = (txt.dim(1), img.dim(1));
        let [img_out, img_resid, img_x_mod2, img_mlp_pre, img_proj_out, img_mlp_out] =
            self.img.attention_outputs(b, img, &b.narrow(&attn, 1, lt, li)?, [&img_mod1, &img_mod2])?;
        let [txt_out, txt_resid, txt_x_mod2, txt_mlp_pre, txt_proj_out, txt_mlp_out] =
            self.txt.attention_outputs(b, txt, &b.narrow(&attn, 1, 0, lt)?, [&txt_mod1, &txt_mod2])?;
        let full = trainable == Trainable::Full;

        let acts = DoubleStreamActs {
            img: StreamActs {
                mod1: img_mod1,
                mod2: img_mod2,
                x_mod1: img_x_mod1,
                qkv: img_qkv,
                resid: img_resid,
                x_mod2: img_x_mod2,
                mlp_pre: img_mlp_pre,
                branches: full.then_some([img_proj_out, img_mlp_out]),
            },
            txt: StreamActs {
                mod1: txt_mod1,
                mod2: txt_mod2,
                x_mod1: txt_x_mod1,
                qkv: txt_qkv,
                resid: txt_resid,
                x_mod2: txt_x_mod2,
                mlp_pre: txt_mlp_pre,
                branches: full.then_some([txt_proj_out, txt_mlp_out]),
            },
            q,
            k,
            v,
            attn,
            lse,
        };
        Ok((img_out, txt_out, acts))
    }

    /// The gradients of the block's inputs (img, txt) from those of its outputs; parameter
    /// gradients are recorded under `name` (`double_blocks.N`), and in full training the
    /// gradient wrt `vec_silu` is added to the collector's sum.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        b: &B,
        img: &Tensor<B>,
        txt: &Tensor<B>,
        acts: &DoubleStreamActs<B>,
        pe: &Positions<B>,
        vec_silu: &Tensor<B>,
        g_img: &Tensor<B>,
        g_txt: &Tensor<B>,
        name: &str,
        grads: &mut GradCollector<B>,
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        let (h, lt, li) = (self.num_heads, txt.dim(1), img.dim(1));
        let (img_name, txt_name) = (format!("{name}.img"), format!("{name}.txt"));
        let g_img_out = self.img.attention_outputs_backward(b, &acts.img, &b.narrow(&acts.attn, 1, lt, li)?, g_img, &img_name, grads)?;
        let g_txt_out = self.txt.attention_outputs_backward(b, &acts.txt, &b.narrow(&acts.attn, 1, 0, lt)?, g_txt, &txt_name, grads)?;

        let g_attn = b.concat(&[&g_txt_out.attn, &g_img_out.attn], 1)?;
        let [gq, gk, gv] = b.attention_backward(&acts.q, &acts.k, &acts.v, &acts.attn, &acts.lse, &g_attn)?;
        // Each stream's rows of the joint q, k, v gradients.
        let rows = |start: usize, len: usize| -> Result<[Tensor<B>; 3]> {
            Ok([b.narrow(&gq, 2, start, len)?, b.narrow(&gk, 2, start, len)?, b.narrow(&gv, 2, start, len)?])
        };
        let [img_gq, img_gk, img_gv] = rows(lt, li)?;
        let [txt_gq, txt_gk, txt_gv] = rows(0, lt)?;
        let g_img_in = self.img.attention_inputs_backward(
            b,
            img,
            &acts.img,
            &pe.img,
            h,
            [&img_gq, &img_gk, &img_gv],
            &g_img_out,
            vec_silu,
            &img_name,
            grads,
        )?;
        let g_txt_in = self.txt.attention_inputs_backward(
            b,
            txt,
            &acts.txt,
            &pe.txt,
            h,
            [&txt_gq, &txt_gk, &txt_gv],
            &g_txt_out,
            vec_silu,
            &txt_name,
            grads,
        )?;
        Ok((g_img_in, g_txt_in))
    }
}

/// What `SingleStreamBlock::backward` needs beside the block's input.
pub struct SingleStreamActs<B: Backend> {
    modulation: ModulationOut<B>,
    /// Input of linear1.
    x_mod: Tensor<B>,
    /// Output of linear1: `[qkv | mlp]`.
    h: Tensor<B>,
    q: Tensor<B>,
    k: Tensor<B>,
    v: Tensor<B>,
    attn: Tensor<B>,
    lse: Tensor<B>,
    /// Full training: the branch the gate scales (linear2's output), for the gate's gradient.
    branch: Option<Tensor<B>>,
}

impl<B: BackwardOps> SingleStreamBlock<B> {
    /// `forward`, keeping the activations `backward` needs for `trainable`.
    pub fn forward_train(
        &self,
        b: &B,
        x: &Tensor<B>,
        vec_silu: &Tensor<B>,
        pe: &Positions<B>,
        trainable: Trainable,
    ) -> Result<(Tensor<B>, SingleStreamActs<B>)> {
        let [m] = one(self.modulation.forward(b, vec_silu)?)?;
        let x_mod = b.layer_norm_modulate(x, &m.shift, &m.scale, EPS)?;
        let h = self.linear1.forward(b, &x_mod)?;
        let hidden = x.dim(2);
        let [q, k, v] = b.qk_norm_rope(&h, self.num_heads, &self.norm.query_norm, &self.norm.key_norm, &pe.joint, EPS)?;
        let (attn, lse) = b.attention_with_lse(&q, &k, &v)?;
        let mlp = b.gelu_tanh(&b.narrow(&h, 2, 3 * hidden, h.dim(2) - 3 * hidden)?)?;
        let out = self.linear2.forward(b, &b.concat(&[&attn, &mlp], 2)?)?;
        let y = b.gated_residual(x, &m.gate, &out)?;
        let branch = (trainable == Trainable::Full).then_some(out);
        Ok((y, SingleStreamActs { modulation: m, x_mod, h, q, k, v, attn, lse, branch }))
    }

    /// The gradient of the block's input from that of its output; parameter gradients are
    /// recorded under `name` (`single_blocks.N`), and in full training the gradient wrt
    /// `vec_silu` is added to the collector's sum.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        b: &B,
        x: &Tensor<B>,
        acts: &SingleStreamActs<B>,
        pe: &Positions<B>,
        vec_silu: &Tensor<B>,
        g_y: &Tensor<B>,
        name: &str,
        grads: &mut GradCollector<B>,
    ) -> Result<Tensor<B>> {
        let (hidden, h) = (x.dim(2), &acts.h);
        let mlp_width = h.dim(2) - 3 * hidden;
        let g_out = b.gated_residual_backward(g_y, &acts.modulation.gate)?;
        let mlp_pre = b.narrow(h, 2, 3 * hidden, mlp_width)?;
        let linear2_in = b.concat(&[&acts.attn, &b.gelu_tanh(&mlp_pre)?], 2)?;
        let g_linear2_in = linear_backward(b, &self.linear2, &linear2_in, &g_out, &format!("{name}.linear2"), grads)?;
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
        let g_x_mod = linear_backward(b, &self.linear1, &acts.x_mod, &g_h, &format!("{name}.linear1"), grads)?;
        if grads.full() {
            let g_gate = b.gated_residual_backward_gate(g_y, acts.branch.as_ref().context(NO_BRANCHES)?)?;
            let (g_shift, g_scale) = b.layer_norm_modulate_backward_shift_scale(x, &g_x_mod, EPS)?;
            modulation_backward(
                b,
                &self.modulation.lin,
                vec_silu,
                &[&g_shift, &g_scale, &g_gate],
                &format!("{name}.modulation.lin"),
                grads,
            )?;
        }
        b.add(g_y, &b.layer_norm_modulate_backward(x, &acts.modulation.scale, &g_x_mod, EPS)?)
    }
}

/// What `LastLayer::backward` needs beside the layer's input.
pub struct LastLayerActs<B: Backend> {
    scale: Tensor<B>,
    /// Input of the output projection.
    x_mod: Tensor<B>,
}

impl<B: BackwardOps> LastLayer<B> {
    /// `forward`, keeping the activations `backward` needs.
    pub fn forward_train(&self, b: &B, x: &Tensor<B>, vec_silu: &Tensor<B>) -> Result<(Tensor<B>, LastLayerActs<B>)> {
        let m = self.ada_ln_modulation.forward(b, vec_silu)?;
        let hidden = x.dim(2);
        let shift = b.narrow(&m, 1, 0, hidden)?;
        let scale = b.narrow(&m, 1, hidden, hidden)?;
        let x_mod = b.layer_norm_modulate(x, &shift, &scale, EPS)?;
        Ok((self.linear.forward(b, &x_mod)?, LastLayerActs { scale, x_mod }))
    }

    /// The gradient of the layer's input from that of its output; parameter gradients are
    /// recorded under `final_layer.linear` (and `final_layer.adaLN_modulation.1` in full
    /// training, which also adds the gradient wrt `vec_silu` to the collector's sum).
    pub fn backward(
        &self,
        b: &B,
        x: &Tensor<B>,
        acts: &LastLayerActs<B>,
        vec_silu: &Tensor<B>,
        g_out: &Tensor<B>,
        grads: &mut GradCollector<B>,
    ) -> Result<Tensor<B>> {
        let g_x_mod = linear_backward(b, &self.linear, &acts.x_mod, g_out, "final_layer.linear", grads)?;
        if grads.full() {
            let (g_shift, g_scale) = b.layer_norm_modulate_backward_shift_scale(x, &g_x_mod, EPS)?;
            modulation_backward(b, &self.ada_ln_modulation, vec_silu, &[&g_shift, &g_scale], "final_layer.adaLN_modulation.1", grads)?;
        }
        b.layer_norm_modulate_backward(x, &acts.scale, &g_x_mod, EPS)
    }
}

/// A double block's inputs, and its activations unless they are recomputed.
struct DoubleStep<B: Backend> {
    img: Tensor<B>,
    txt: Tensor<B>,
    acts: Option<DoubleStreamActs<B>>,
}

/// A single block's input, and its activations unless they are recomputed.
struct SingleStep<B: Backend> {
    x: Tensor<B>,
    acts: Option<SingleStreamActs<B>>,
}

/// Full training: the vec path's activations. vector_in's input is the conditioning's `y`, which
/// `backward` is given again.
struct VecActs<B: Backend> {
    /// The timesteps' sinusoidal embedding (time_in's input) and time_in's hidden pre-activation.
    time: [Tensor<B>; 2],
    /// The same for the guidance value and guidance_in.
    guidance: Option<[Tensor<B>; 2]>,
    /// vector_in's hidden pre-activation.
    vector_hidden: Tensor<B>,
    /// The sum of the embeddings, before SiLU.
    vec: Tensor<B>,
}

/// What `Flux::backward` needs beside the model's inputs.
pub struct FluxActs<B: Backend> {
    /// What the activations were kept for: `backward` checks that the model still says so.
    trainable: Trainable,
    vec_silu: Tensor<B>,
    /// Full training only.
    vec: Option<VecActs<B>>,
    double: Vec<DoubleStep<B>>,
    single: Vec<SingleStep<B>>,
    /// The image rows of the last single block's output: the final layer's input.
    final_in: Tensor<B>,
    last: LastLayerActs<B>,
}

/// Every linear of a `Flux` by BFL path, as two lists: the token path's (in the order of
/// `token_path_linears_mut`) and the vec path's. A macro so that one list of names, which must be
/// those `Flux::build` reads, serves shared and mutable access: `linears!(flux, iter, as_ref)` or
/// `linears!(flux, iter_mut, as_mut, mut)`.
macro_rules! linears {
    ($flux:expr, $iter:ident, $as_opt:ident $(, $m:tt)?) => {{
        let f = $flux;
        let mut token = vec![("img_in".to_string(), &$($m)? f.img_in), ("txt_in".to_string(), &$($m)? f.txt_in)];
        let mut vec_path = Vec::new();
        let embedders =
            [("time_in", Some(&$($m)? f.time_in)), ("vector_in", Some(&$($m)? f.vector_in)), ("guidance_in", f.guidance_in.$as_opt())];
        for (name, e) in embedders {
            if let Some(e) = e {
                vec_path.push((format!("{name}.in_layer"), &$($m)? e.in_layer));
                vec_path.push((format!("{name}.out_layer"), &$($m)? e.out_layer));
            }
        }
        for (i, block) in f.double_blocks.$iter().enumerate() {
            for (stream, s) in [("img", &$($m)? block.img), ("txt", &$($m)? block.txt)] {
                let pre = format!("double_blocks.{i}.{stream}");
                vec_path.push((format!("{pre}_mod.lin"), &$($m)? s.modulation.lin));
                token.push((format!("{pre}_attn.qkv"), &$($m)? s.attn.qkv));
                token.push((format!("{pre}_attn.proj"), &$($m)? s.attn.proj));
                token.push((format!("{pre}_mlp.0"), &$($m)? s.mlp.fc1));
                token.push((format!("{pre}_mlp.2"), &$($m)? s.mlp.fc2));
            }
        }
        for (i, block) in f.single_blocks.$iter().enumerate() {
            token.push((format!("single_blocks.{i}.linear1"), &$($m)? block.linear1));
            token.push((format!("single_blocks.{i}.linear2"), &$($m)? block.linear2));
            vec_path.push((format!("single_blocks.{i}.modulation.lin"), &$($m)? block.modulation.lin));
        }
        token.push(("final_layer.linear".to_string(), &$($m)? f.final_layer.linear));
        vec_path.push(("final_layer.adaLN_modulation.1".to_string(), &$($m)? f.final_layer.ada_ln_modulation));
        (token, vec_path)
    }};
}

impl<B: BackwardOps> Flux<B> {
    /// `forward`, keeping what `backward` needs for `self.trainable` (every block's activations,
    /// or with `Checkpointing::PerBlock` only their inputs). The output equals `forward`'s.
    pub fn forward_train(
        &self,
        b: &B,
        img: &Tensor<B>,
        timesteps: &Tensor<B>,
        c: &Conditioning<B>,
        checkpointing: Checkpointing,
    ) -> Result<(Tensor<B>, FluxActs<B>)> {
        self.check_adapters()?;
        let trainable = self.trainable;
        let embed_time = |t: &Tensor<B>| b.timestep_embedding(t, TIME_EMBED_DIM, 10_000.0, 1000.0);
        let t_emb = embed_time(timesteps)?;
        let (mut vec, time_hidden) = self.time_in.forward_train(b, &t_emb)?;
        let guidance = match &self.guidance_in {
            Some(g_in) => {
                let g = c.guidance.as_ref().context("this model has a guidance embedding and needs a guidance value")?;
                let g_emb = embed_time(g)?;
                let (out, hidden) = g_in.forward_train(b, &g_emb)?;
                vec = b.add(&vec, &out)?;
                Some([g_emb, hidden])
            }
            None => None,
        };
        let (vector_out, vector_hidden) = self.vector_in.forward_train(b, &c.y)?;
        vec = b.add(&vec, &vector_out)?;
        let vec_silu = b.silu(&vec)?;
        let vec = (trainable == Trainable::Full).then_some(VecActs { time: [t_emb, time_hidden], guidance, vector_hidden, vec });

        let mut img = self.img_in.forward(b, img)?;
        let mut txt = self.txt_in.forward(b, &c.txt)?;
        let mut double = Vec::with_capacity(self.double_blocks.len());
        for block in &self.double_blocks {
            let (img_out, txt_out, acts) = match checkpointing {
                Checkpointing::Off => {
                    let (i, t, acts) = block.forward_train(b, &img, &txt, &vec_silu, &c.pe, trainable)?;
                    (i, t, Some(acts))
                }
                Checkpointing::PerBlock => {
                    let (i, t) = block.forward(b, &img, &txt, &vec_silu, &c.pe)?;
                    (i, t, None)
                }
            };
            double.push(DoubleStep { img, txt, acts });
            (img, txt) = (img_out, txt_out);
        }
        let lt = txt.dim(1);
        let mut x = b.concat(&[&txt, &img], 1)?;
        let mut single = Vec::with_capacity(self.single_blocks.len());
        for block in &self.single_blocks {
            let (y, acts) = match checkpointing {
                Checkpointing::Off => {
                    let (y, acts) = block.forward_train(b, &x, &vec_silu, &c.pe, trainable)?;
                    (y, Some(acts))
                }
                Checkpointing::PerBlock => (block.forward(b, &x, &vec_silu, &c.pe)?, None),
            };
            single.push(SingleStep { x, acts });
            x = y;
        }
        let final_in = b.narrow(&x, 1, lt, x.dim(1) - lt)?;
        let (out, last) = self.final_layer.forward_train(b, &final_in, &vec_silu)?;
        Ok((out, FluxActs { trainable, vec_silu, vec, double, single, final_in, last }))
    }

    /// The gradients of a scalar loss wrt what `self.trainable` trains (see `FluxGrads`) and wrt
    /// the input `img`, given `g_out` = d loss / d out for the `out` of
    /// `forward_train(img, .., c)`.
    pub fn backward(&self, b: &B, img: &Tensor<B>, c: &Conditioning<B>, acts: FluxActs<B>, g_out: &Tensor<B>) -> Result<FluxGrads<B>> {
        let FluxActs { trainable, vec_silu, vec, double, single, final_in, last } = acts;
        ensure!(
            trainable == self.trainable,
            "forward_train kept the activations of {trainable:?} training, but the model now trains {:?}",
            self.trainable
        );
        let mut grads = GradCollector::new(trainable);
        let g_final_in = self.final_layer.backward(b, &final_in, &last, &vec_silu, g_out, &mut grads)?;
        // Only the image rows reach the final layer: the text rows of the last single block's
        // output have a zero gradient.
        let (batch, lt, hidden) = (c.txt.dim(0), c.txt.dim(1), self.params.hidden_size);
        let zeros = b.input(&HostTensor::from_f32(vec![batch, lt, hidden], vec![0.0; batch * lt * hidden]))?;
        let mut g_x = b.concat(&[&zeros, &g_final_in], 1)?;
        for (i, (block, step)) in self.single_blocks.iter().zip(single).enumerate().rev() {
            let acts = match step.acts {
                Some(acts) => acts,
                None => block.forward_train(b, &step.x, &vec_silu, &c.pe, trainable)?.1,
            };
            g_x = block.backward(b, &step.x, &acts, &c.pe, &vec_silu, &g_x, &format!("single_blocks.{i}"), &mut grads)?;
        }
        let mut g_txt = b.narrow(&g_x, 1, 0, lt)?;
        let mut g_img = b.narrow(&g_x, 1, lt, g_x.dim(1) - lt)?;
        for (i, (block, step)) in self.double_blocks.iter().zip(double).enumerate().rev() {
            let acts = match step.acts {
                Some(acts) => acts,
                None => block.forward_train(b, &step.img, &step.txt, &vec_silu, &c.pe, trainable)?.2,
            };
            let name = format!("double_blocks.{i}");
            (g_img, g_txt) = block.backward(b, &step.img, &step.txt, &acts, &c.pe, &vec_silu, &g_img, &g_txt, &name, &mut grads)?;
        }
        let g_input = linear_backward(b, &self.img_in, img, &g_img, "img_in", &mut grads)?;
        // The text tokens are data: txt_in only matters for its parameters (or its adapters).
        match trainable {
            Trainable::Lora if !self.txt_in.lora.is_empty() => {
                linear_backward(b, &self.txt_in, &c.txt, &g_txt, "txt_in", &mut grads)?;
            }
            Trainable::Lora => {}
            Trainable::Full => linear_params_backward(b, &self.txt_in, &c.txt, &g_txt, "txt_in", &mut grads)?,
        }
        if trainable == Trainable::Full {
            let vec = vec.context("full training needs the vec path's activations, which this forward did not keep")?;
            let g_vec_silu = grads.vec_silu.take().context("no modulation linear gave a gradient wrt SiLU(vec)")?;
            let g_vec = b.silu_backward(&vec.vec, &g_vec_silu)?;
            let [t_emb, time_hidden] = &vec.time;
            self.time_in.backward(b, t_emb, time_hidden, &g_vec, "time_in", &mut grads)?;
            if let (Some(g_in), Some([g_emb, hidden])) = (&self.guidance_in, &vec.guidance) {
                g_in.backward(b, g_emb, hidden, &g_vec, "guidance_in", &mut grads)?;
            }
            self.vector_in.backward(b, &c.y, &vec.vector_hidden, &g_vec, "vector_in", &mut grads)?;
        }
        Ok(FluxGrads { lora: grads.lora, base: grads.base, img: g_input })
    }

    /// The linears on the token path, which `backward` trains the adapters of, by BFL path.
    pub fn token_path_linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        linears!(self, iter_mut, as_mut, mut).0
    }

    /// Every tensor full training trains, by checkpoint key (`img_in.weight`, `img_in.bias`,
    /// `time_in.in_layer.weight`, ...): each linear's weight and bias, the keys of
    /// `FluxGrads::base`, so that a trainer can put each optimiser step's result in place.
    /// Unmerged adapters and the QK-norm scales are not listed.
    pub fn base_parameters_mut(&mut self) -> Vec<(String, &mut Tensor<B>)> {
        let (token, vec_path) = linears!(self, iter_mut, as_mut, mut);
        let mut out = Vec::new();
        for (name, Linear { weight, bias, .. }) in token.into_iter().chain(vec_path) {
            out.push((format!("{name}.weight"), weight));
            if let Some(bias) = bias {
                out.push((format!("{name}.bias"), bias));
            }
        }
        out
    }

    /// Every tensor of the model downloaded in f32 under its checkpoint key: exactly the tensors
    /// `Flux::build` reads (the linears' weights and biases and the frozen QK-norm scales), so
    /// that written as safetensors they load back as a BFL-layout transformer. Refuses a model
    /// with unmerged adapters, which the file could not hold.
    pub fn download_weights(&self, b: &B) -> Result<BTreeMap<String, HostTensor>> {
        let (token, vec_path) = linears!(self, iter, as_ref);
        let mut tensors: Vec<(String, &Tensor<B>)> = Vec::new();
        for (name, lin) in token.into_iter().chain(vec_path) {
            if !lin.lora.is_empty() {
                bail!("'{name}' carries an unmerged LoRA, which a transformer checkpoint cannot hold (merge it first)");
            }
            tensors.push((format!("{name}.weight"), &lin.weight));
            if let Some(bias) = &lin.bias {
                tensors.push((format!("{name}.bias"), bias));
            }
        }
        let mut norms: Vec<(String, &QkNorm<B>)> = Vec::new();
        for (i, block) in self.double_blocks.iter().enumerate() {
            norms.push((format!("double_blocks.{i}.img_attn.norm"), &block.img.attn.norm));
            norms.push((format!("double_blocks.{i}.txt_attn.norm"), &block.txt.attn.norm));
        }
        for (i, block) in self.single_blocks.iter().enumerate() {
            norms.push((format!("single_blocks.{i}.norm"), &block.norm));
        }
        for (name, norm) in norms {
            tensors.push((format!("{name}.query_norm.scale"), &norm.query_norm));
            tensors.push((format!("{name}.key_norm.scale"), &norm.key_norm));
        }
        tensors.into_iter().map(|(name, t)| Ok((name, b.download(t)?))).collect()
    }

    /// Errors on an adapter that `backward` cannot train: any adapter in full training, one on the
    /// vec path (which LoRA training treats as constant) otherwise.
    fn check_adapters(&self) -> Result<()> {
        let (token, vec_path) = linears!(self, iter, as_ref);
        if self.trainable == Trainable::Full {
            if let Some((name, _)) = token.iter().chain(&vec_path).find(|(_, lin)| !lin.lora.is_empty()) {
                bail!(
                    "'{name}' carries an unmerged LoRA, which full training does not support: full training starts from a model \
                     without adapters (merge it into the weights, or leave it out)"
                );
            }
        }
        for (name, lin) in vec_path {
            ensure!(
                lin.lora.is_empty(),
                "'{name}' carries an unmerged LoRA, which training does not support: the modulation path is held constant \
                 (merge that adapter, or leave it out)"
            );
        }
        Ok(())
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
    use crate::model::weights::{LoraMode, WeightLoader};
    use loaders::lora::{LoraAdapter, LoraLayout, LoraPart};
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

    fn tiny_model(parts: Vec<LoraPart>) -> Result<Flux<CpuBackend>> {
        let p = FluxParams::preset("flux-tiny")?;
        let adapter =
            LoraAdapter { path: "random.safetensors".into(), layout: LoraLayout::Bfl, parts, replacements: vec![], skipped: vec![] };
        let mut w = WeightLoader::random(&B, 11).with_lora(vec![adapter], LoraMode::Unmerged);
        let model = Flux::build(&p, &mut w)?;
        w.finish()?;
        Ok(model)
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
        let c = Conditioning {
            txt: B.input(&host(vec![batch, lt, p.context_in_dim], randn(batch * lt * p.context_in_dim, rng, 1.0))).unwrap(),
            pe: model.positions(&B, &host(vec![batch, lt, 3], vec![0.0; batch * lt * 3]), &host(vec![batch, li, 3], img_ids)).unwrap(),
            y: B.input(&host(vec![batch, p.vec_in_dim], randn(batch * p.vec_in_dim, rng, 1.0))).unwrap(),
            guidance: Some(B.input(&host(vec![batch], vec![3.5, 1.5])).unwrap()),
        };
        Problem {
            img: B.input(&host(vec![batch, li, p.in_channels], randn(batch * li * p.in_channels, rng, 1.0))).unwrap(),
            timesteps: B.input(&host(vec![batch], vec![0.3, 0.85])).unwrap(),
            c,
            g_out: randn(batch * li * p.out_channels, rng, 1.0),
        }
    }

    impl Problem {
        /// `sum(g_out * forward(img))` through the inference forward.
        fn loss(&self, model: &Flux<CpuBackend>, img: &T) -> f64 {
            dot(&self.g_out, &values(&model.forward(&B, img, &self.timesteps, &self.c).unwrap()))
        }

        fn grads(&self, model: &Flux<CpuBackend>, checkpointing: Checkpointing) -> (Vec<f32>, FluxGrads<CpuBackend>) {
            let (out, acts) = model.forward_train(&B, &self.img, &self.timesteps, &self.c, checkpointing).unwrap();
            let g_out = B.input(&HostTensor::from_f32(out.shape().to_vec(), self.g_out.clone())).unwrap();
            (values(&out), model.backward(&B, &self.img, &self.c, acts, &g_out).unwrap())
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

    /// One factor of the `index`-th delta on the linear `target`.
    fn factor<'m>(model: &'m mut Flux<CpuBackend>, target: &str, index: usize, which: Factor) -> &'m mut T {
        let lin = model.token_path_linears_mut().into_iter().find(|(n, _)| n == target).unwrap().1;
        match which {
            Factor::Down => &mut lin.lora[index].down,
            Factor::Up => &mut lin.lora[index].up,
        }
    }

    /// `base + t * dir` as a tensor of `shape`.
    fn moved(base: &[f32], dir: &[f32], t: f64, shape: &[usize]) -> T {
        let data = base.iter().zip(dir).map(|(&p, &d)| (p as f64 + t * d as f64) as f32).collect();
        B.input(&HostTensor::from_f32(shape.to_vec(), data)).unwrap()
    }

    #[test]
    fn training_forward_is_the_forward_and_checkpointing_changes_nothing() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let model = tiny_model(every_target(&mut rng)).unwrap();
        let pb = problem(&model, &mut rng);
        let reference = values(&model.forward(&B, &pb.img, &pb.timesteps, &pb.c).unwrap());
        let (out_kept, kept) = pb.grads(&model, Checkpointing::Off);
        let (out_recomputed, recomputed) = pb.grads(&model, Checkpointing::PerBlock);
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
        let mut model = tiny_model(every_target(&mut rng)).unwrap();
        let pb = problem(&model, &mut rng);
        let (_, grads) = pb.grads(&model, Checkpointing::Off);
        let mut targets: Vec<String> = model.token_path_linears_mut().into_iter().map(|(n, _)| n).collect();
        targets.sort();
        assert_eq!(grads.lora.keys().cloned().collect::<Vec<_>>(), targets, "a gradient for every adapted linear");

        // Each factor of each delta along a random direction whose elements have the factor's
        // size, so that one step size suits all.
        for (target, deltas) in &grads.lora {
            for (index, g) in deltas.iter().enumerate() {
                for (which, grad) in [(Factor::Down, &g.down), (Factor::Up, &g.up)] {
                    let shape = grad.shape().to_vec();
                    let p0 = values(factor(&mut model, target, index, which));
                    let rms = (dot(&p0, &p0) / p0.len() as f64).sqrt() as f32;
                    let dir = randn(p0.len(), &mut rng, rms);
                    let numeric = derivative(
                        |t| {
                            *factor(&mut model, target, index, which) = moved(&p0, &dir, t, &shape);
                            pb.loss(&model, &pb.img)
                        },
                        0.05,
                    );
                    *factor(&mut model, target, index, which) = moved(&p0, &dir, 0.0, &shape);
                    assert_agree(&format!("{target}[{index}] {which:?}"), dot(&values(grad), &dir), numeric);
                }
            }
        }

        let img = values(&pb.img);
        for _ in 0..3 {
            let dir = randn(img.len(), &mut rng, 1.0);
            let numeric = derivative(|t| pb.loss(&model, &moved(&img, &dir, t, pb.img.shape())), 0.05);
            assert_agree("input img", dot(&values(&grads.img), &dir), numeric);
        }
    }

    #[test]
    fn an_adapter_on_the_modulation_path_is_refused() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let model = tiny_model(vec![part("double_blocks.0.img_mod.lin", 64, 64, 64, 2, 1.0, &mut rng)]).unwrap();
        let pb = problem(&model, &mut rng);
        let err = model.forward_train(&B, &pb.img, &pb.timesteps, &pb.c, Checkpointing::Off).err().expect("refused");
        assert!(err.to_string().contains("double_blocks.0.img_mod.lin"), "{err}");
    }

    /// flux-tiny (which has a guidance embedding, so that guidance_in is covered) with random
    /// weights and no adapter, set to full training.
    fn full_model() -> Flux<CpuBackend> {
        let mut model = tiny_model(vec![]).unwrap();
        assert!(model.guidance_in.is_some(), "flux-tiny has no guidance embedding: guidance_in would go untested");
        model.trainable = Trainable::Full;
        model
    }

    /// The base parameter `name`, as `base_parameters_mut` names it.
    fn base<'m>(model: &'m mut Flux<CpuBackend>, name: &str) -> &'m mut T {
        model.base_parameters_mut().into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no base parameter '{name}'")).1
    }

    #[test]
    fn full_training_forward_is_the_forward_and_checkpointing_changes_nothing() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut model = full_model();
        let pb = problem(&model, &mut rng);
        let reference = values(&model.forward(&B, &pb.img, &pb.timesteps, &pb.c).unwrap());
        let (out_kept, kept) = pb.grads(&model, Checkpointing::Off);
        let (out_recomputed, recomputed) = pb.grads(&model, Checkpointing::PerBlock);
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
        for (name, t) in model.base_parameters_mut() {
            let g = kept.base.get(&name).unwrap_or_else(|| panic!("no gradient for '{name}'"));
            assert_eq!(g.shape(), t.shape(), "{name}");
            names.push(name);
        }
        names.sort();
        assert_eq!(kept.base.keys().cloned().collect::<Vec<_>>(), names);

        // LoRA training of the same model: no base gradients, the same input gradient.
        model.trainable = Trainable::Lora;
        let (_, lora) = pb.grads(&model, Checkpointing::Off);
        assert!(lora.base.is_empty() && lora.lora.is_empty());
        assert_eq!(values(&lora.img), values(&kept.img));

        // Activations kept for one kind of training do not serve the other.
        let (out, acts) = model.forward_train(&B, &pb.img, &pb.timesteps, &pb.c, Checkpointing::Off).unwrap();
        model.trainable = Trainable::Full;
        let g_out = B.input(&HostTensor::from_f32(out.shape().to_vec(), pb.g_out.clone())).unwrap();
        let err = model.backward(&B, &pb.img, &pb.c, acts, &g_out).err().expect("refused");
        assert!(err.to_string().contains("Lora"), "{err}");
    }

    #[test]
    fn full_gradients_match_differences_of_the_forward() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut model = full_model();
        let pb = problem(&model, &mut rng);
        let (_, grads) = pb.grads(&model, Checkpointing::Off);
        let names: Vec<String> = model.base_parameters_mut().into_iter().map(|(n, _)| n).collect();
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
                        pb.loss(&model, &pb.img)
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
        let mut model = tiny_model(vec![part("double_blocks.0.img_attn.proj", 64, 64, 0, 2, 1.0, &mut rng)]).unwrap();
        let pb = problem(&model, &mut rng);
        model.trainable = Trainable::Full;
        let err = model.forward_train(&B, &pb.img, &pb.timesteps, &pb.c, Checkpointing::Off).err().expect("refused");
        assert!(err.to_string().contains("double_blocks.0.img_attn.proj") && err.to_string().contains("full training"), "{err}");
        model.trainable = Trainable::Lora;
        assert!(model.forward_train(&B, &pb.img, &pb.timesteps, &pb.c, Checkpointing::Off).is_ok());
    }

    #[test]
    fn downloaded_weights_are_the_checkpoint_and_load_back() {
        let p = FluxParams::preset("flux-tiny").unwrap();
        let mut w = WeightLoader::random(&B, 12).recording();
        let mut model = Flux::build(&p, &mut w).unwrap();
        let recorded: BTreeMap<String, HostTensor> = w.take_recorded().into_iter().collect();
        w.finish().unwrap();
        let weights = model.download_weights(&B).unwrap();
        assert_eq!(weights.keys().collect::<Vec<_>>(), recorded.keys().collect::<Vec<_>>(), "the tensors Flux::build reads");
        for (name, t) in &weights {
            assert_eq!((&t.shape, t.to_f32()), (&recorded[name].shape, recorded[name].to_f32()), "{name}");
        }
        // Full training trains all of them but the QK-norm scales.
        let mut trained: Vec<String> = model.base_parameters_mut().into_iter().map(|(n, _)| n).collect();
        trained.sort();
        let unscaled: Vec<String> = recorded.keys().filter(|n| !n.ends_with("_norm.scale")).cloned().collect();
        assert_eq!(trained, unscaled);

        // A weight changed in place is what gets saved, and the file loads back as a BFL
        // transformer that computes what the model does.
        let name = "double_blocks.0.txt_mod.lin.weight";
        let changed: Vec<f32> = values(base(&mut model, name)).iter().map(|v| 1.5 * v + 0.01).collect();
        let shape = base(&mut model, name).shape().to_vec();
        *base(&mut model, name) = B.upload(&HostTensor::from_f32(shape, changed)).unwrap();
        let weights = model.download_weights(&B).unwrap();
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
        let out = |m: &Flux<CpuBackend>| values(&m.forward(&B, &pb.img, &pb.timesteps, &pb.c).unwrap());
        assert_eq!(out(&loaded), out(&model));
    }
}
