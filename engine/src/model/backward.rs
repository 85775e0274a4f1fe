//! The FLUX backward for LoRA training: each block's forward again, keeping what its backward
//! needs, beside that backward, which reads like the forward (`layers.rs`) from the bottom up.
//! The ops and their conventions are `backend::backward`'s; this file adds the model's:
//! - Trained: every unmerged LoRA delta on the token path (`img_in`, `txt_in`, the blocks' qkv,
//!   proj, MLP, linear1 and linear2, `final_layer.linear`). The vec path (time, guidance and vector
//!   embedders, every modulation linear) is constant: `forward_train` refuses a model with an
//!   adapter there, since its gradient would flow through the modulation vectors.
//! - LoRA gradients are collected under the target linear's BFL path
//!   (`double_blocks.0.img_attn.qkv`), one per delta in the order of `Linear::lora`, so that they
//!   line up with the adapter parts that built the model.
//! - Saved activations are the forward's own tensors (moved, never copied); what is cheap to
//!   recompute from them (a narrow, a GELU, a concat) is recomputed on the way back. With
//!   `Checkpointing::PerBlock` a block keeps only its input and reruns its forward in the backward.

use super::config::TIME_EMBED_DIM;
use super::flux::{Conditioning, Flux};
use super::layers::*;
use crate::backend::backward::BackwardOps;
use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::{ensure, Context, Result};
use loaders::HostTensor;
use std::collections::BTreeMap;

/// The gradient of one LoRA delta (`LoraDelta`): f32, shaped like its down and up.
pub struct LoraGrad<B: Backend> {
    pub down: Tensor<B>,
    pub up: Tensor<B>,
}

/// LoRA gradients by target linear (BFL path), one per delta in the order of `Linear::lora`.
pub type LoraGrads<B> = BTreeMap<String, Vec<LoraGrad<B>>>;

/// What `Flux::backward` returns.
pub struct FluxGrads<B: Backend> {
    pub lora: LoraGrads<B>,
    /// The gradient wrt the input latent tokens `img` `[B, L, in]`.
    pub img: Tensor<B>,
}

/// Whether blocks keep their activations for the backward or recompute them from their input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpointing {
    /// Keep every block's activations: the fastest; memory grows with depth.
    Off,
    /// Keep each block's input only and rerun its forward on the way back: one more forward of
    /// the blocks, for the memory of one block's activations.
    PerBlock,
}

/// Backward of `Linear::forward` at input x: returns the input gradient and records the gradient
/// of each LoRA delta under `name`.
fn linear_backward<B: BackwardOps>(
    b: &B,
    lin: &Linear<B>,
    x: &Tensor<B>,
    gy: &Tensor<B>,
    name: &str,
    grads: &mut LoraGrads<B>,
) -> Result<Tensor<B>> {
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
    grads.insert(name.to_string(), deltas);
    Ok(gx)
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
}

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
    /// residual, then the modulated MLP and gated residual. Returns `[out, resid, x_mod2, mlp_pre]`.
    fn attention_outputs(&self, b: &B, x: &Tensor<B>, attn: &Tensor<B>, [mod1, mod2]: [&ModulationOut<B>; 2]) -> Result<[Tensor<B>; 4]> {
        let resid = b.gated_residual(x, &mod1.gate, &self.attn.proj.forward(b, attn)?)?;
        let x_mod2 = b.layer_norm_modulate(&resid, &mod2.shift, &mod2.scale, EPS)?;
        let mlp_pre = self.mlp.fc1.forward(b, &x_mod2)?;
        let out = b.gated_residual(&resid, &mod2.gate, &self.mlp.fc2.forward(b, &b.gelu_tanh(&mlp_pre)?)?)?;
        Ok([out, resid, x_mod2, mlp_pre])
    }

    /// Backward of `attention_outputs`, from the gradient of the stream's output.
    fn attention_outputs_backward(
        &self,
        b: &B,
        acts: &StreamActs<B>,
        attn: &Tensor<B>,
        g_out: &Tensor<B>,
        name: &str,
        grads: &mut LoraGrads<B>,
    ) -> Result<StreamOutputGrads<B>> {
        let g_mlp = b.gated_residual_backward(g_out, &acts.mod2.gate)?;
        let mlp_act = b.gelu_tanh(&acts.mlp_pre)?;
        let g_mlp_act = linear_backward(b, &self.mlp.fc2, &mlp_act, &g_mlp, &format!("{name}_mlp.2"), grads)?;
        let g_mlp_pre = b.gelu_tanh_backward(&acts.mlp_pre, &g_mlp_act)?;
        let g_x_mod2 = linear_backward(b, &self.mlp.fc1, &acts.x_mod2, &g_mlp_pre, &format!("{name}_mlp.0"), grads)?;
        let g_resid = b.add(g_out, &b.layer_norm_modulate_backward(&acts.resid, &acts.mod2.scale, &g_x_mod2, EPS)?)?;

        let g_proj = b.gated_residual_backward(&g_resid, &acts.mod1.gate)?;
        let g_attn = linear_backward(b, &self.attn.proj, attn, &g_proj, &format!("{name}_attn.proj"), grads)?;
        Ok(StreamOutputGrads { attn: g_attn, resid: g_resid })
    }

    /// Backward of `attention_inputs`: the gradient of the stream's input x, from those of its
    /// q, k, v and of the residual stream after attention (through which x also passes).
    #[allow(clippy::too_many_arguments)]
    fn attention_inputs_backward(
        &self,
        b: &B,
        x: &Tensor<B>,
        acts: &StreamActs<B>,
        pe: &Tensor<B>,
        heads: usize,
        g_qkv_heads: [&Tensor<B>; 3],
        g_resid: &Tensor<B>,
        name: &str,
        grads: &mut LoraGrads<B>,
    ) -> Result<Tensor<B>> {
        let norm = &self.attn.norm;
        let g_qkv = b.qk_norm_rope_backward(&acts.qkv, heads, &norm.query_norm, &norm.key_norm, pe, EPS, g_qkv_heads, None)?;
        let g_x_mod1 = linear_backward(b, &self.attn.qkv, &acts.x_mod1, &g_qkv, &format!("{name}_attn.qkv"), grads)?;
        b.add(g_resid, &b.layer_norm_modulate_backward(x, &acts.mod1.scale, &g_x_mod1, EPS)?)
    }
}

impl<B: BackwardOps> DoubleStreamBlock<B> {
    /// `forward`, keeping the activations `backward` needs.
    pub fn forward_train(
        &self,
        b: &B,
        img: &Tensor<B>,
        txt: &Tensor<B>,
        vec_silu: &Tensor<B>,
        pe: &Positions<B>,
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
        let [img_out, img_resid, img_x_mod2, img_mlp_pre] =
            self.img.attention_outputs(b, img, &b.narrow(&attn, 1, lt, li)?, [&img_mod1, &img_mod2])?;
        let [txt_out, txt_resid, txt_x_mod2, txt_mlp_pre] =
            self.txt.attention_outputs(b, txt, &b.narrow(&attn, 1, 0, lt)?, [&txt_mod1, &txt_mod2])?;

        let acts = DoubleStreamActs {
            img: StreamActs {
                mod1: img_mod1,
                mod2: img_mod2,
                x_mod1: img_x_mod1,
                qkv: img_qkv,
                resid: img_resid,
                x_mod2: img_x_mod2,
                mlp_pre: img_mlp_pre,
            },
            txt: StreamActs {
                mod1: txt_mod1,
                mod2: txt_mod2,
                x_mod1: txt_x_mod1,
                qkv: txt_qkv,
                resid: txt_resid,
                x_mod2: txt_x_mod2,
                mlp_pre: txt_mlp_pre,
            },
            q,
            k,
            v,
            attn,
            lse,
        };
        Ok((img_out, txt_out, acts))
    }

    /// The gradients of the block's inputs (img, txt) from those of its outputs; LoRA gradients
    /// are recorded under `name` (`double_blocks.N`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        b: &B,
        img: &Tensor<B>,
        txt: &Tensor<B>,
        acts: &DoubleStreamActs<B>,
        pe: &Positions<B>,
        g_img: &Tensor<B>,
        g_txt: &Tensor<B>,
        name: &str,
        grads: &mut LoraGrads<B>,
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
            &g_img_out.resid,
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
            &g_txt_out.resid,
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
}

impl<B: BackwardOps> SingleStreamBlock<B> {
    /// `forward`, keeping the activations `backward` needs.
    pub fn forward_train(&self, b: &B, x: &Tensor<B>, vec_silu: &Tensor<B>, pe: &Positions<B>) -> Result<(Tensor<B>, SingleStreamActs<B>)> {
        let [m] = one(self.modulation.forward(b, vec_silu)?)?;
        let x_mod = b.layer_norm_modulate(x, &m.shift, &m.scale, EPS)?;
        let h = self.linear1.forward(b, &x_mod)?;
        let hidden = x.dim(2);
        let [q, k, v] = b.qk_norm_rope(&h, self.num_heads, &self.norm.query_norm, &self.norm.key_norm, &pe.joint, EPS)?;
        let (attn, lse) = b.attention_with_lse(&q, &k, &v)?;
        let mlp = b.gelu_tanh(&b.narrow(&h, 2, 3 * hidden, h.dim(2) - 3 * hidden)?)?;
        let out = self.linear2.forward(b, &b.concat(&[&attn, &mlp], 2)?)?;
        let y = b.gated_residual(x, &m.gate, &out)?;
        Ok((y, SingleStreamActs { modulation: m, x_mod, h, q, k, v, attn, lse }))
    }

    /// The gradient of the block's input from that of its output; LoRA gradients are recorded
    /// under `name` (`single_blocks.N`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        b: &B,
        x: &Tensor<B>,
        acts: &SingleStreamActs<B>,
        pe: &Positions<B>,
        g_y: &Tensor<B>,
        name: &str,
        grads: &mut LoraGrads<B>,
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

    /// The gradient of the layer's input from that of its output; LoRA gradients of the output
    /// projection are recorded as `final_layer.linear`.
    pub fn backward(
        &self,
        b: &B,
        x: &Tensor<B>,
        acts: &LastLayerActs<B>,
        g_out: &Tensor<B>,
        grads: &mut LoraGrads<B>,
    ) -> Result<Tensor<B>> {
        let g_x_mod = linear_backward(b, &self.linear, &acts.x_mod, g_out, "final_layer.linear", grads)?;
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

/// What `Flux::backward` needs beside the model's inputs.
pub struct FluxActs<B: Backend> {
    vec_silu: Tensor<B>,
    double: Vec<DoubleStep<B>>,
    single: Vec<SingleStep<B>>,
    /// The image rows of the last single block's output: the final layer's input.
    final_in: Tensor<B>,
    last: LastLayerActs<B>,
}

impl<B: BackwardOps> Flux<B> {
    /// `forward`, keeping what `backward` needs (every block's activations, or with
    /// `Checkpointing::PerBlock` only their inputs). The output equals `forward`'s.
    pub fn forward_train(
        &self,
        b: &B,
        img: &Tensor<B>,
        timesteps: &Tensor<B>,
        c: &Conditioning<B>,
        checkpointing: Checkpointing,
    ) -> Result<(Tensor<B>, FluxActs<B>)> {
        self.ensure_vec_path_frozen()?;
        let embed_time = |t: &Tensor<B>| b.timestep_embedding(t, TIME_EMBED_DIM, 10_000.0, 1000.0);
        let mut vec = self.time_in.forward(b, &embed_time(timesteps)?)?;
        if let Some(g_in) = &self.guidance_in {
            let g = c.guidance.as_ref().context("this model has a guidance embedding and needs a guidance value")?;
            vec = b.add(&vec, &g_in.forward(b, &embed_time(g)?)?)?;
        }
        vec = b.add(&vec, &self.vector_in.forward(b, &c.y)?)?;
        let vec_silu = b.silu(&vec)?;

        let mut img = self.img_in.forward(b, img)?;
        let mut txt = self.txt_in.forward(b, &c.txt)?;
        let mut double = Vec::with_capacity(self.double_blocks.len());
        for block in &self.double_blocks {
            let (img_out, txt_out, acts) = match checkpointing {
                Checkpointing::Off => {
                    let (i, t, acts) = block.forward_train(b, &img, &txt, &vec_silu, &c.pe)?;
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
                    let (y, acts) = block.forward_train(b, &x, &vec_silu, &c.pe)?;
                    (y, Some(acts))
                }
                Checkpointing::PerBlock => (block.forward(b, &x, &vec_silu, &c.pe)?, None),
            };
            single.push(SingleStep { x, acts });
            x = y;
        }
        let final_in = b.narrow(&x, 1, lt, x.dim(1) - lt)?;
        let (out, last) = self.final_layer.forward_train(b, &final_in, &vec_silu)?;
        Ok((out, FluxActs { vec_silu, double, single, final_in, last }))
    }

    /// The gradients of a scalar loss wrt every LoRA delta on the token path and wrt the input
    /// `img`, given `g_out` = d loss / d out for the `out` of `forward_train(img, .., c)`.
    pub fn backward(&self, b: &B, img: &Tensor<B>, c: &Conditioning<B>, acts: FluxActs<B>, g_out: &Tensor<B>) -> Result<FluxGrads<B>> {
        let FluxActs { vec_silu, double, single, final_in, last } = acts;
        let mut lora = LoraGrads::new();
        let g_final_in = self.final_layer.backward(b, &final_in, &last, g_out, &mut lora)?;
        // Only the image rows reach the final layer: the text rows of the last single block's
        // output have a zero gradient.
        let (batch, lt, hidden) = (c.txt.dim(0), c.txt.dim(1), self.params.hidden_size);
        let zeros = b.input(&HostTensor::from_f32(vec![batch, lt, hidden], vec![0.0; batch * lt * hidden]))?;
        let mut g_x = b.concat(&[&zeros, &g_final_in], 1)?;
        for (i, (block, step)) in self.single_blocks.iter().zip(single).enumerate().rev() {
            let acts = match step.acts {
                Some(acts) => acts,
                None => block.forward_train(b, &step.x, &vec_silu, &c.pe)?.1,
            };
            g_x = block.backward(b, &step.x, &acts, &c.pe, &g_x, &format!("single_blocks.{i}"), &mut lora)?;
        }
        let mut g_txt = b.narrow(&g_x, 1, 0, lt)?;
        let mut g_img = b.narrow(&g_x, 1, lt, g_x.dim(1) - lt)?;
        for (i, (block, step)) in self.double_blocks.iter().zip(double).enumerate().rev() {
            let acts = match step.acts {
                Some(acts) => acts,
                None => block.forward_train(b, &step.img, &step.txt, &vec_silu, &c.pe)?.2,
            };
            (g_img, g_txt) =
                block.backward(b, &step.img, &step.txt, &acts, &c.pe, &g_img, &g_txt, &format!("double_blocks.{i}"), &mut lora)?;
        }
        let g_input = linear_backward(b, &self.img_in, img, &g_img, "img_in", &mut lora)?;
        // The text tokens are data: txt_in only matters for its adapters.
        if !self.txt_in.lora.is_empty() {
            linear_backward(b, &self.txt_in, &c.txt, &g_txt, "txt_in", &mut lora)?;
        }
        Ok(FluxGrads { lora, img: g_input })
    }

    /// The linears on the token path, which `backward` trains the adapters of, by BFL path.
    pub fn token_path_linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        let mut out = vec![("img_in".to_string(), &mut self.img_in), ("txt_in".to_string(), &mut self.txt_in)];
        for (i, block) in self.double_blocks.iter_mut().enumerate() {
            for (stream, s) in [("img", &mut block.img), ("txt", &mut block.txt)] {
                let pre = format!("double_blocks.{i}.{stream}");
                out.push((format!("{pre}_attn.qkv"), &mut s.attn.qkv));
                out.push((format!("{pre}_attn.proj"), &mut s.attn.proj));
                out.push((format!("{pre}_mlp.0"), &mut s.mlp.fc1));
                out.push((format!("{pre}_mlp.2"), &mut s.mlp.fc2));
            }
        }
        for (i, block) in self.single_blocks.iter_mut().enumerate() {
            out.push((format!("single_blocks.{i}.linear1"), &mut block.linear1));
            out.push((format!("single_blocks.{i}.linear2"), &mut block.linear2));
        }
        out.push(("final_layer.linear".to_string(), &mut self.final_layer.linear));
        out
    }

    /// Errors if an unmerged adapter sits on the vec path, which `backward` treats as constant.
    fn ensure_vec_path_frozen(&self) -> Result<()> {
        let mut vec_path: Vec<(String, &Linear<B>)> = Vec::new();
        for (name, e) in
            [("time_in", Some(&self.time_in)), ("vector_in", Some(&self.vector_in)), ("guidance_in", self.guidance_in.as_ref())]
        {
            if let Some(e) = e {
                vec_path.push((format!("{name}.in_layer"), &e.in_layer));
                vec_path.push((format!("{name}.out_layer"), &e.out_layer));
            }
        }
        for (i, block) in self.double_blocks.iter().enumerate() {
            vec_path.push((format!("double_blocks.{i}.img_mod.lin"), &block.img.modulation.lin));
            vec_path.push((format!("double_blocks.{i}.txt_mod.lin"), &block.txt.modulation.lin));
        }
        for (i, block) in self.single_blocks.iter().enumerate() {
            vec_path.push((format!("single_blocks.{i}.modulation.lin"), &block.modulation.lin));
        }
        vec_path.push(("final_layer.adaLN_modulation.1".to_string(), &self.final_layer.ada_ln_modulation));
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
    use rand::SeedableRng;
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
}
