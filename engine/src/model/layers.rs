//! FLUX's building blocks (BFL `flux/modules/layers.py`), each a few lines over the backend ops.
//! Field names follow BFL's checkpoint keys so that loading is a lookup.

use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::Result;

/// LayerNorm and RMSNorm epsilon throughout FLUX.
pub const EPS: f32 = 1e-6;

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
    pub weight: Tensor<B>,
    pub bias: Option<Tensor<B>>,
    pub lora: Vec<LoraDelta<B>>,
}

impl<B: Backend> Linear<B> {
    pub fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        let y = b.linear(x, &self.weight, self.bias.as_ref())?;
        self.lora.iter().try_fold(y, |y, d| b.lora_add(y, x, &d.down, &d.up, d.up_bias.as_ref(), d.scale, d.offset))
    }

    /// `gelu(forward(x))`, fused into the GEMM when no unmerged LoRA sits between them.
    pub fn forward_gelu(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        if self.lora.is_empty() {
            b.linear_gelu(x, &self.weight, self.bias.as_ref())
        } else {
            b.gelu_tanh(&self.forward(b, x)?)
        }
    }
}

/// `Linear -> SiLU -> Linear`: time_in, vector_in, guidance_in.
pub struct MlpEmbedder<B: Backend> {
    pub in_layer: Linear<B>,
    pub out_layer: Linear<B>,
}

impl<B: Backend> MlpEmbedder<B> {
    pub fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        self.out_layer.forward(b, &b.silu(&self.in_layer.forward(b, x)?)?)
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
    pub fn forward(&self, b: &B, vec_silu: &Tensor<B>) -> Result<Vec<ModulationOut<B>>> {
        let m = self.lin.forward(b, vec_silu)?;
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

/// Projects to q, k, v and prepares them for attention (head split, QK-norm, RoPE).
pub fn qkv_heads<B: Backend>(
    b: &B,
    qkv: &Linear<B>,
    norm: &QkNorm<B>,
    x: &Tensor<B>,
    heads: usize,
    pe: &Tensor<B>,
) -> Result<[Tensor<B>; 3]> {
    b.qk_norm_rope(&qkv.forward(b, x)?, heads, &norm.query_norm, &norm.key_norm, pe, EPS)
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

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        self.fc2.forward(b, &self.fc1.forward_gelu(b, x)?)
    }
}

/// One stream (image or text) of a double-stream block.
pub struct Stream<B: Backend> {
    pub modulation: Modulation<B>,
    pub attn: SelfAttention<B>,
    pub mlp: Mlp<B>,
}

pub struct DoubleStreamBlock<B: Backend> {
    pub img: Stream<B>,
    pub txt: Stream<B>,
    pub num_heads: usize,
}

impl<B: Backend> DoubleStreamBlock<B> {
    pub fn forward(
        &self,
        b: &B,
        img: &Tensor<B>,
        txt: &Tensor<B>,
        vec_silu: &Tensor<B>,
        pe: &Positions<B>,
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        let h = self.num_heads;
        let [img_mod1, img_mod2] = two(self.img.modulation.forward(b, vec_silu)?)?;
        let [txt_mod1, txt_mod2] = two(self.txt.modulation.forward(b, vec_silu)?)?;

        let img_x = b.layer_norm_modulate(img, &img_mod1.shift, &img_mod1.scale, EPS)?;
        let [img_q, img_k, img_v] = qkv_heads(b, &self.img.attn.qkv, &self.img.attn.norm, &img_x, h, &pe.img)?;
        let txt_x = b.layer_norm_modulate(txt, &txt_mod1.shift, &txt_mod1.scale, EPS)?;
        let [txt_q, txt_k, txt_v] = qkv_heads(b, &self.txt.attn.qkv, &self.txt.attn.norm, &txt_x, h, &pe.txt)?;

        // Joint attention over [txt; img].
        let q = b.concat(&[&txt_q, &img_q], 2)?;
        let k = b.concat(&[&txt_k, &img_k], 2)?;
        let v = b.concat(&[&txt_v, &img_v], 2)?;
        let attn = b.attention(&q, &k, &v)?;
        let (lt, li) = (txt.dim(1), img.dim(1));
        let txt_attn = b.narrow(&attn, 1, 0, lt)?;
        let img_attn = b.narrow(&attn, 1, lt, li)?;

        let img = b.gated_residual(img, &img_mod1.gate, &self.img.attn.proj.forward(b, &img_attn)?)?;
        let img_mlp = self.img.mlp.forward(b, &b.layer_norm_modulate(&img, &img_mod2.shift, &img_mod2.scale, EPS)?)?;
        let img = b.gated_residual(&img, &img_mod2.gate, &img_mlp)?;

        let txt = b.gated_residual(txt, &txt_mod1.gate, &self.txt.attn.proj.forward(b, &txt_attn)?)?;
        let txt_mlp = self.txt.mlp.forward(b, &b.layer_norm_modulate(&txt, &txt_mod2.shift, &txt_mod2.scale, EPS)?)?;
        let txt = b.gated_residual(&txt, &txt_mod2.gate, &txt_mlp)?;
        Ok((img, txt))
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

impl<B: Backend> SingleStreamBlock<B> {
    pub fn forward(&self, b: &B, x: &Tensor<B>, vec_silu: &Tensor<B>, pe: &Positions<B>) -> Result<Tensor<B>> {
        let [m] = one(self.modulation.forward(b, vec_silu)?)?;
        let x_mod = b.layer_norm_modulate(x, &m.shift, &m.scale, EPS)?;
        let h = self.linear1.forward(b, &x_mod)?;
        let hidden = x.dim(2);
        let [q, k, v] = b.qk_norm_rope(&h, self.num_heads, &self.norm.query_norm, &self.norm.key_norm, &pe.joint, EPS)?;
        let attn = b.attention(&q, &k, &v)?;
        let mlp = b.gelu_tanh(&b.narrow(&h, 2, 3 * hidden, h.dim(2) - 3 * hidden)?)?;
        let out = self.linear2.forward(b, &b.concat(&[&attn, &mlp], 2)?)?;
        b.gated_residual(x, &m.gate, &out)
    }
}

/// Modulated LayerNorm then the output projection. adaLN here is (shift, scale), no gate.
pub struct LastLayer<B: Backend> {
    pub ada_ln_modulation: Linear<B>,
    pub linear: Linear<B>,
}

impl<B: Backend> LastLayer<B> {
    pub fn forward(&self, b: &B, x: &Tensor<B>, vec_silu: &Tensor<B>) -> Result<Tensor<B>> {
        let m = self.ada_ln_modulation.forward(b, vec_silu)?;
        let hidden = x.dim(2);
        let shift = b.narrow(&m, 1, 0, hidden)?;
        let scale = b.narrow(&m, 1, hidden, hidden)?;
        self.linear.forward(b, &b.layer_norm_modulate(x, &shift, &scale, EPS)?)
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
