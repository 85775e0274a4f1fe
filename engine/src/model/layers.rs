//! FLUX's building blocks (BFL `flux/modules/layers.py`), each a few lines over the backend ops.
//! Field names follow BFL's checkpoint keys so that loading is a lookup.
//!
//! One forward serves inference and training (llm.c's shape): each block's forward is generic
//! over [`Keep`], which decides what becomes of the activations its backward (`backward.rs`)
//! reads. Training keeps them in the block's `*Acts` struct; inference keeps units, so that a
//! tensor is dropped at the point where training would keep it and the inference forward holds
//! no more memory than it needs. Every forward takes the call's [`Trainable`] set: the LoRA
//! deltas it adds beside the model's own weights, and whether the weights themselves are
//! trained (then the gated branches are kept too, for the gates' gradients).

use super::trainable::Trainable;
use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::Result;

/// LayerNorm and RMSNorm epsilon throughout FLUX.
pub const EPS: f32 = 1e-6;

/// Attention's output and what training keeps of it (the row log-sum-exp).
pub type Attended<B, K> = (Tensor<B>, <K as Keep>::Kept<Tensor<B>>);

/// A double block's outputs (img, txt) and what it kept.
pub type DoubleStreamOutputs<B, K> = (Tensor<B>, Tensor<B>, DoubleStreamActs<B, K>);

/// What a forward keeps for its backward (see the module docs).
pub trait Keep: Sized {
    /// A kept value: the value itself when training, a unit at inference.
    type Kept<T>;

    fn keep<T>(value: T) -> Self::Kept<T>;

    /// Softmax attention; training also keeps the row log-sum-exp its backward needs.
    fn attention<B: Backend>(b: &B, q: &Tensor<B>, k: &Tensor<B>, v: &Tensor<B>) -> Result<Attended<B, Self>>;
}

/// The inference forward: nothing is kept.
pub enum Inference {}

/// The training forward: every activation its backward reads is kept.
pub enum Training {}

impl Keep for Inference {
    type Kept<T> = ();

    fn keep<T>(_: T) {}

    fn attention<B: Backend>(b: &B, q: &Tensor<B>, k: &Tensor<B>, v: &Tensor<B>) -> Result<(Tensor<B>, ())> {
        Ok((b.attention(q, k, v)?, ()))
    }
}

impl Keep for Training {
    type Kept<T> = T;

    fn keep<T>(value: T) -> T {
        value
    }

    fn attention<B: Backend>(b: &B, q: &Tensor<B>, k: &Tensor<B>, v: &Tensor<B>) -> Result<(Tensor<B>, Tensor<B>)> {
        b.attention_with_lse(q, k, v)
    }
}

/// A low-rank update kept beside its base weight (unmerged LoRA), covering output rows
/// `offset..offset + up.rows` of the base.
pub struct LoraDelta<B: Backend> {
    pub down: Tensor<B>,
    pub up: Tensor<B>,
    pub up_bias: Option<Tensor<B>>,
    pub scale: f32,
    pub offset: usize,
}

pub struct Linear<B: Backend> {
    /// The BFL path (`double_blocks.0.img_attn.qkv`): what adapters and gradients are keyed by.
    pub name: String,
    pub weight: Tensor<B>,
    pub bias: Option<Tensor<B>>,
    /// The model's own unmerged deltas (`--lora-mode unmerged`), frozen.
    pub lora: Vec<LoraDelta<B>>,
}

impl<B: Backend> Linear<B> {
    /// `x @ weight^T + bias`, then every delta: the model's own, then those `tr` adds here.
    pub fn forward(&self, b: &B, x: &Tensor<B>, tr: Trainable<B>) -> Result<Tensor<B>> {
        let y = b.linear(x, &self.weight, self.bias.as_ref())?;
        self.deltas(tr).try_fold(y, |y, d| b.lora_add(y, x, &d.down, &d.up, d.up_bias.as_ref(), d.scale, d.offset))
    }

    /// `gelu(forward(x))`, fused into the GEMM when no unmerged delta sits between them.
    pub fn forward_gelu(&self, b: &B, x: &Tensor<B>, tr: Trainable<B>) -> Result<Tensor<B>> {
        match self.deltas(tr).next() {
            None => b.linear_gelu(x, &self.weight, self.bias.as_ref()),
            Some(_) => b.gelu_tanh(&self.forward(b, x, tr)?),
        }
    }

    /// The deltas applied after the base product, in order.
    pub fn deltas<'a>(&'a self, tr: Trainable<'a, B>) -> impl Iterator<Item = &'a LoraDelta<B>> {
        self.lora.iter().chain(tr.deltas_on(self))
    }
}

/// `Linear -> SiLU -> Linear`: time_in, vector_in, guidance_in.
pub struct MlpEmbedder<B: Backend> {
    pub in_layer: Linear<B>,
    pub out_layer: Linear<B>,
}

/// What `MlpEmbedder`'s backward needs beside its input.
pub struct MlpEmbedderActs<B: Backend, K: Keep> {
    /// in_layer's output, before SiLU.
    pub(super) hidden: K::Kept<Tensor<B>>,
}

impl<B: Backend> MlpEmbedder<B> {
    pub fn forward<K: Keep>(&self, b: &B, x: &Tensor<B>, tr: Trainable<B>) -> Result<(Tensor<B>, MlpEmbedderActs<B, K>)> {
        let hidden = self.in_layer.forward(b, x, tr)?;
        let out = self.out_layer.forward(b, &b.silu(&hidden)?, tr)?;
        Ok((out, MlpEmbedderActs { hidden: K::keep(hidden) }))
    }
}

/// One (shift, scale, gate) triple of adaLN modulation, each `[B, hidden]`.
pub struct ModulationOut<B: Backend> {
    pub shift: Tensor<B>,
    pub scale: Tensor<B>,
    pub gate: Tensor<B>,
}

/// `Linear(SiLU(vec))` chunked into (shift, scale, gate) triples: two for double blocks, one for
/// single blocks. Takes `SiLU(vec)`, computed once per forward for every block.
pub struct Modulation<B: Backend> {
    pub lin: Linear<B>,
}

impl<B: Backend> Modulation<B> {
    pub fn forward(&self, b: &B, vec_silu: &Tensor<B>, tr: Trainable<B>) -> Result<Vec<ModulationOut<B>>> {
        let m = self.lin.forward(b, vec_silu, tr)?;
        let hidden = self.lin.weight.dim(1);
        (0..m.dim(1) / (3 * hidden))
            .map(|i| {
                let chunk = |j: usize| b.narrow(&m, 1, (3 * i + j) * hidden, hidden);
                Ok(ModulationOut { shift: chunk(0)?, scale: chunk(1)?, gate: chunk(2)? })
            })
            .collect()
    }
}

/// The learned per-head RMSNorm scales of queries and keys (BFL `QKNorm`).
pub struct QkNorm<B: Backend> {
    pub query_norm: Tensor<B>,
    pub key_norm: Tensor<B>,
}

/// Rotary tables for one forward: the joint `[txt; img]` sequence and its two parts, each
/// `[B, L, head_dim / 2, 2]` of (cos, sin).
pub struct Positions<B: Backend> {
    pub joint: Tensor<B>,
    pub txt: Tensor<B>,
    pub img: Tensor<B>,
}

/// The attention half of a double-stream block for one stream.
pub struct SelfAttention<B: Backend> {
    pub qkv: Linear<B>,
    pub norm: QkNorm<B>,
    pub proj: Linear<B>,
}

/// `Linear -> GELU(tanh) -> Linear` (keys `.0` and `.2`).
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

/// One stream (image or text) of a double-stream block.
pub struct Stream<B: Backend> {
    pub modulation: Modulation<B>,
    pub attn: SelfAttention<B>,
    pub mlp: Mlp<B>,
}

/// What one stream of a double block keeps for the backward, beside the block's input.
pub struct StreamActs<B: Backend, K: Keep> {
    pub(super) mod1: K::Kept<ModulationOut<B>>,
    pub(super) mod2: K::Kept<ModulationOut<B>>,
    /// Input of the qkv linear.
    pub(super) x_mod1: K::Kept<Tensor<B>>,
    /// Output of the qkv linear, input of `qk_norm_rope`.
    pub(super) qkv: K::Kept<Tensor<B>>,
    /// The residual stream after attention, input of the MLP half.
    pub(super) resid: K::Kept<Tensor<B>>,
    /// Input of the first MLP linear.
    pub(super) x_mod2: K::Kept<Tensor<B>>,
    /// Output of the first MLP linear, before GELU.
    pub(super) mlp_pre: K::Kept<Tensor<B>>,
    /// Full training: the branches the gates scale (outputs of the attention projection and of
    /// the MLP), for the gates' gradients.
    pub(super) branches: K::Kept<Option<[Tensor<B>; 2]>>,
}

/// The stream up to attention: modulated LayerNorm, qkv, QK-norm and RoPE.
struct AttentionInputs<B: Backend, K: Keep> {
    q: Tensor<B>,
    k: Tensor<B>,
    v: Tensor<B>,
    x_mod1: K::Kept<Tensor<B>>,
    qkv: K::Kept<Tensor<B>>,
}

/// What the stream after attention keeps.
struct AttentionOutputs<B: Backend, K: Keep> {
    resid: K::Kept<Tensor<B>>,
    x_mod2: K::Kept<Tensor<B>>,
    mlp_pre: K::Kept<Tensor<B>>,
    branches: K::Kept<Option<[Tensor<B>; 2]>>,
}

impl<B: Backend> Stream<B> {
    fn attention_inputs<K: Keep>(
        &self,
        b: &B,
        x: &Tensor<B>,
        mod1: &ModulationOut<B>,
        pe: &Tensor<B>,
        heads: usize,
        tr: Trainable<B>,
    ) -> Result<AttentionInputs<B, K>> {
        let x_mod1 = b.layer_norm_modulate(x, &mod1.shift, &mod1.scale, EPS)?;
        let qkv = self.attn.qkv.forward(b, &x_mod1, tr)?;
        let x_mod1 = K::keep(x_mod1);
        let [q, k, v] = b.qk_norm_rope(&qkv, heads, &self.attn.norm.query_norm, &self.attn.norm.key_norm, pe, EPS)?;
        Ok(AttentionInputs { q, k, v, x_mod1, qkv: K::keep(qkv) })
    }

    /// Projection and gated residual of the stream's rows of the attention output, then the
    /// modulated MLP and gated residual.
    fn attention_outputs<K: Keep>(
        &self,
        b: &B,
        x: &Tensor<B>,
        attn: &Tensor<B>,
        [mod1, mod2]: [&ModulationOut<B>; 2],
        tr: Trainable<B>,
    ) -> Result<(Tensor<B>, AttentionOutputs<B, K>)> {
        let proj_out = self.attn.proj.forward(b, attn, tr)?;
        let resid = b.gated_residual(x, &mod1.gate, &proj_out)?;
        let x_mod2 = b.layer_norm_modulate(&resid, &mod2.shift, &mod2.scale, EPS)?;
        let mlp_pre = self.mlp.fc1.forward(b, &x_mod2, tr)?;
        let x_mod2 = K::keep(x_mod2);
        let mlp_out = self.mlp.fc2.forward(b, &b.gelu_tanh(&mlp_pre)?, tr)?;
        let out = b.gated_residual(&resid, &mod2.gate, &mlp_out)?;
        let branches = K::keep(tr.full().then_some([proj_out, mlp_out]));
        Ok((out, AttentionOutputs { resid: K::keep(resid), x_mod2, mlp_pre: K::keep(mlp_pre), branches }))
    }
}

pub struct DoubleStreamBlock<B: Backend> {
    pub img: Stream<B>,
    pub txt: Stream<B>,
    pub num_heads: usize,
}

/// What `DoubleStreamBlock`'s backward needs beside the block's inputs.
pub struct DoubleStreamActs<B: Backend, K: Keep> {
    pub(super) img: StreamActs<B, K>,
    pub(super) txt: StreamActs<B, K>,
    /// The joint `[txt; img]` attention: its inputs, output and row log-sum-exp.
    pub(super) q: K::Kept<Tensor<B>>,
    pub(super) k: K::Kept<Tensor<B>>,
    pub(super) v: K::Kept<Tensor<B>>,
    pub(super) attn: K::Kept<Tensor<B>>,
    pub(super) lse: K::Kept<Tensor<B>>,
}

impl<B: Backend> DoubleStreamBlock<B> {
    pub fn forward<K: Keep>(
        &self,
        b: &B,
        img: &Tensor<B>,
        txt: &Tensor<B>,
        vec_silu: &Tensor<B>,
        pe: &Positions<B>,
        tr: Trainable<B>,
    ) -> Result<DoubleStreamOutputs<B, K>> {
        let h = self.num_heads;
        let [img_mod1, img_mod2] = two(self.img.modulation.forward(b, vec_silu, tr)?)?;
        let [txt_mod1, txt_mod2] = two(self.txt.modulation.forward(b, vec_silu, tr)?)?;
        let img_in = self.img.attention_inputs::<K>(b, img, &img_mod1, &pe.img, h, tr)?;
        let txt_in = self.txt.attention_inputs::<K>(b, txt, &txt_mod1, &pe.txt, h, tr)?;

        // Joint attention over [txt; img].
        let q = b.concat(&[&txt_in.q, &img_in.q], 2)?;
        let k = b.concat(&[&txt_in.k, &img_in.k], 2)?;
        let v = b.concat(&[&txt_in.v, &img_in.v], 2)?;
        let (attn, lse) = K::attention(b, &q, &k, &v)?;
        let (lt, li) = (txt.dim(1), img.dim(1));
        let (img, img_out) = self.img.attention_outputs::<K>(b, img, &b.narrow(&attn, 1, lt, li)?, [&img_mod1, &img_mod2], tr)?;
        let (txt, txt_out) = self.txt.attention_outputs::<K>(b, txt, &b.narrow(&attn, 1, 0, lt)?, [&txt_mod1, &txt_mod2], tr)?;

        let stream = |mod1, mod2, i: AttentionInputs<B, K>, o: AttentionOutputs<B, K>| StreamActs {
            mod1: K::keep(mod1),
            mod2: K::keep(mod2),
            x_mod1: i.x_mod1,
            qkv: i.qkv,
            resid: o.resid,
            x_mod2: o.x_mod2,
            mlp_pre: o.mlp_pre,
            branches: o.branches,
        };
        let acts = DoubleStreamActs {
            img: stream(img_mod1, img_mod2, img_in, img_out),
            txt: stream(txt_mod1, txt_mod2, txt_in, txt_out),
            q: K::keep(q),
            k: K::keep(k),
            v: K::keep(v),
            attn: K::keep(attn),
            lse,
        };
        Ok((img, txt, acts))
    }
}

/// A parallel attention + MLP block over the joint sequence: `linear1 -> [qkv | mlp]`,
/// `linear2(cat(attn, gelu(mlp)))`, gated residual.
pub struct SingleStreamBlock<B: Backend> {
    pub linear1: Linear<B>,
    pub linear2: Linear<B>,
    pub norm: QkNorm<B>,
    pub modulation: Modulation<B>,
    pub num_heads: usize,
}

/// What `SingleStreamBlock`'s backward needs beside the block's input.
pub struct SingleStreamActs<B: Backend, K: Keep> {
    pub(super) modulation: K::Kept<ModulationOut<B>>,
    /// Input of linear1.
    pub(super) x_mod: K::Kept<Tensor<B>>,
    /// Output of linear1: `[qkv | mlp]`.
    pub(super) h: K::Kept<Tensor<B>>,
    pub(super) q: K::Kept<Tensor<B>>,
    pub(super) k: K::Kept<Tensor<B>>,
    pub(super) v: K::Kept<Tensor<B>>,
    pub(super) attn: K::Kept<Tensor<B>>,
    pub(super) lse: K::Kept<Tensor<B>>,
    /// Full training: the branch the gate scales (linear2's output), for the gate's gradient.
    pub(super) branch: K::Kept<Option<Tensor<B>>>,
}

impl<B: Backend> SingleStreamBlock<B> {
    pub fn forward<K: Keep>(
        &self,
        b: &B,
        x: &Tensor<B>,
        vec_silu: &Tensor<B>,
        pe: &Positions<B>,
        tr: Trainable<B>,
    ) -> Result<(Tensor<B>, SingleStreamActs<B, K>)> {
        let [m] = one(self.modulation.forward(b, vec_silu, tr)?)?;
        let x_mod = b.layer_norm_modulate(x, &m.shift, &m.scale, EPS)?;
        let h = self.linear1.forward(b, &x_mod, tr)?;
        let x_mod = K::keep(x_mod);
        let hidden = x.dim(2);
        let [q, k, v] = b.qk_norm_rope(&h, self.num_heads, &self.norm.query_norm, &self.norm.key_norm, &pe.joint, EPS)?;
        let (attn, lse) = K::attention(b, &q, &k, &v)?;
        let mlp = b.gelu_tanh(&b.narrow(&h, 2, 3 * hidden, h.dim(2) - 3 * hidden)?)?;
        let out = self.linear2.forward(b, &b.concat(&[&attn, &mlp], 2)?, tr)?;
        let y = b.gated_residual(x, &m.gate, &out)?;
        let acts = SingleStreamActs {
            modulation: K::keep(m),
            x_mod,
            h: K::keep(h),
            q: K::keep(q),
            k: K::keep(k),
            v: K::keep(v),
            attn: K::keep(attn),
            lse,
            branch: K::keep(tr.full().then_some(out)),
        };
        Ok((y, acts))
    }
}

/// Modulated LayerNorm then the output projection. adaLN here is (shift, scale), no gate.
pub struct LastLayer<B: Backend> {
    pub ada_ln_modulation: Linear<B>,
    pub linear: Linear<B>,
}

/// What `LastLayer`'s backward needs beside the layer's input.
pub struct LastLayerActs<B: Backend, K: Keep> {
    pub(super) scale: K::Kept<Tensor<B>>,
    /// Input of the output projection.
    pub(super) x_mod: K::Kept<Tensor<B>>,
}

impl<B: Backend> LastLayer<B> {
    pub fn forward<K: Keep>(
        &self,
        b: &B,
        x: &Tensor<B>,
        vec_silu: &Tensor<B>,
        tr: Trainable<B>,
    ) -> Result<(Tensor<B>, LastLayerActs<B, K>)> {
        let m = self.ada_ln_modulation.forward(b, vec_silu, tr)?;
        let hidden = x.dim(2);
        let shift = b.narrow(&m, 1, 0, hidden)?;
        let scale = b.narrow(&m, 1, hidden, hidden)?;
        let x_mod = b.layer_norm_modulate(x, &shift, &scale, EPS)?;
        let out = self.linear.forward(b, &x_mod, tr)?;
        Ok((out, LastLayerActs { scale: K::keep(scale), x_mod: K::keep(x_mod) }))
    }
}

pub(crate) fn two<T>(v: Vec<T>) -> Result<[T; 2]> {
    let n = v.len();
    v.try_into().map_err(|_| anyhow::anyhow!("double block modulation gave {n} chunks, expected 2"))
}

pub(crate) fn one<T>(v: Vec<T>) -> Result<[T; 1]> {
    let n = v.len();
    v.try_into().map_err(|_| anyhow::anyhow!("single block modulation gave {n} chunks, expected 1"))
}
