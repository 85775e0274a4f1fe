//! CLIP's text transformer (transformers' `CLIPTextModel`, FLUX.1's `text_encoder`): token plus
//! learned position embeddings, pre-LN blocks (LayerNorm eps 1e-5, causal self-attention with
//! biases, an MLP with quick_gelu), a final LayerNorm; the pooled output is the final state at
//! the end-of-text token. FLUX takes that pooled vector without CLIP's projection.

use super::{check_config, count_blocks, embed, layer_bar, open_weights, read_config, split_heads};
use crate::backend::Backend;
use crate::model::layers::Linear;
use crate::model::weights::WeightLoader;
use crate::model::{Trainable, WeightSource};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use loaders::shards::TensorFiles;
use loaders::HostTensor;
use std::path::Path;

/// The prefix of CLIP's names in files written by transformers 4 and ComfyUI; transformers 5
/// writes `CLIPTextModel` without it.
const PREFIX: &str = "text_model.";
/// Tensors a CLIP text checkpoint may hold that the pooled output does not use: the integer
/// position ids older transformers saved, and the projection and logit scale of the
/// `CLIPTextModelWithProjection` / ComfyUI files.
const UNUSED: [&str; 4] = ["text_model.embeddings.position_ids", "embeddings.position_ids", "text_projection.weight", "logit_scale"];

/// quick_gelu's factor: `x * sigmoid(1.702 x)`.
const QUICK_GELU: f32 = 1.702;

#[derive(Default, serde::Deserialize)]
struct ClipJson {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    max_position_embeddings: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
    eos_token_id: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub positions: usize,
    pub eps: f32,
    /// The config's `eos_token_id`: 2 in CLIP-L's original config, which transformers reads as
    /// "the end token is the highest id" (see `pooled_index`).
    pub eos_token_id: u32,
}

pub struct ClipText {
    files: TensorFiles,
    /// `PREFIX` or nothing, as the file names its tensors.
    prefix: &'static str,
    pub config: ClipConfig,
}

impl ClipText {
    /// A `.safetensors` file or a transformers folder (`text_encoder/`: `config.json` and the
    /// weights). A file alone is read with CLIP-L's head size (64) and activation (quick_gelu).
    pub fn open(path: &Path) -> Result<ClipText> {
        let (files, config_path) = open_weights(path)?;
        let json: ClipJson = read_config(config_path.as_deref())?;
        let origin = files.origin();
        let shapes = files.shapes();
        let prefix = if shapes.keys().any(|k| k.starts_with(PREFIX)) { PREFIX } else { "" };
        let matrix = |name: &str| -> Result<(usize, usize)> {
            let name = format!("{prefix}{name}");
            match shapes.get(&name).map(Vec::as_slice) {
                Some(&[a, b]) => Ok((a, b)),
                Some(s) => bail!("{origin}: '{name}' has shape {s:?}, expected a matrix"),
                None => bail!("{origin}: no '{name}': not a CLIP text model"),
            }
        };
        let (vocab, hidden) = matrix("embeddings.token_embedding.weight")?;
        let (positions, _) = matrix("embeddings.position_embedding.weight")?;
        let (intermediate, _) = matrix("encoder.layers.0.mlp.fc1.weight")?;
        let layers = count_blocks(shapes.keys(), &format!("{prefix}encoder.layers."));
        let heads = match json.num_attention_heads {
            Some(heads) => heads,
            None => {
                ensure!(
                    hidden >= 64 && hidden % 64 == 0,
                    "{origin}: without a config.json the heads are CLIP-L's (64 wide), which hidden size {hidden} does not fit; name the model's folder"
                );
                hidden / 64
            }
        };
        ensure!(heads > 0 && hidden % heads == 0, "{origin}: hidden size {hidden} does not split into {heads} heads");
        if let Some(act) = json.hidden_act.filter(|a| a != "quick_gelu") {
            bail!("{origin}: config.json gives hidden_act '{act}'; only CLIP-L's quick_gelu is supported");
        }
        let config = ClipConfig {
            vocab,
            hidden,
            heads,
            intermediate,
            layers,
            positions,
            eps: json.layer_norm_eps.unwrap_or(1e-5) as f32,
            eos_token_id: json.eos_token_id.unwrap_or(2),
        };
        let c = &config;
        check_config(
            &origin,
            &[
                ("hidden_size", json.hidden_size, c.hidden),
                ("intermediate_size", json.intermediate_size, c.intermediate),
                ("num_hidden_layers", json.num_hidden_layers, c.layers),
                ("max_position_embeddings", json.max_position_embeddings, c.positions),
            ],
        )?;
        Ok(ClipText { files, prefix, config })
    }

    /// The empty prompt as FLUX's CLIP tokenizer writes it: start of text, end of text, and end
    /// tokens as padding up to the position count (77). CLIP's BPE vocabulary ends with those two
    /// tokens (49406 and 49407 in CLIP-L's 49408).
    pub fn empty_prompt_ids(&self) -> Vec<u32> {
        let (bos, eos) = (self.config.vocab as u32 - 2, self.config.vocab as u32 - 1);
        let mut ids = vec![eos; self.config.positions];
        ids[0] = bos;
        ids
    }

    /// Where transformers takes the pooled output: with the original config's `eos_token_id`
    /// of 2, the first position of the highest id; otherwise the first end token.
    pub fn pooled_index(&self, ids: &[u32]) -> usize {
        if self.config.eos_token_id == 2 {
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&id| id == max).unwrap_or(0)
        } else {
            ids.iter().position(|&id| id == self.config.eos_token_id).unwrap_or(0)
        }
    }

    /// The final-normed hidden state `[L, hidden]` and the pooled output `[hidden]` for one
    /// sequence of ids (at most the position count), one layer's weights loaded at a time.
    pub fn encode<B: Backend>(&self, b: &B, ids: &[u32]) -> Result<(HostTensor, HostTensor)> {
        let c = &self.config;
        let origin = self.files.origin();
        ensure!(!ids.is_empty() && ids.len() <= c.positions, "{origin}: {} tokens; CLIP takes 1 to {}", ids.len(), c.positions);
        let l = ids.len();
        let mut w = WeightLoader::new(b, &self.files);
        for name in UNUSED.iter().filter(|n| self.files.info(n).is_some()) {
            w.skip(name);
        }
        let p = self.prefix;
        let tokens = embed(&w.host_tensor(&format!("{p}embeddings.token_embedding.weight"), &[c.vocab, c.hidden])?, ids, &origin)?;
        let positions = w.host_tensor(&format!("{p}embeddings.position_embedding.weight"), &[c.positions, c.hidden])?.to_f32();
        let x: Vec<f32> = tokens.to_f32().iter().zip(&positions).map(|(t, p)| t + p).collect();
        let mut x = b.input(&HostTensor::from_f32(vec![1, l, c.hidden], x))?;
        // The causal mask: query i sees keys 0..=i.
        let mask = (0..c.heads * l * l).map(|n| if n % l > n / l % l { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = b.upload(&HostTensor::from_f32(vec![c.heads, l, l], mask))?;
        let bar = layer_bar("CLIP", c.layers);
        for i in 0..c.layers {
            x = ClipBlock::load(b, &mut w, &format!("{p}encoder.layers.{i}"), c)?.forward(b, &x, &mask, c)?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let final_norm = LayerNorm::load(b, &mut w, &format!("{p}final_layer_norm"), c.hidden)?;
        let x = b.download(&final_norm.forward(b, &x, c.eps)?)?.to_f32();
        w.finish()?;
        let at = self.pooled_index(ids);
        let pooled = HostTensor::from_f32(vec![c.hidden], x[at * c.hidden..(at + 1) * c.hidden].to_vec());
        Ok((HostTensor::from_f32(vec![l, c.hidden], x), pooled))
    }
}

/// LayerNorm with weight and bias, as the modulated LayerNorm op with `scale = weight - 1`,
/// `shift = bias` for the one sample.
struct LayerNorm<B: Backend> {
    shift: Tensor<B>,
    scale: Tensor<B>,
}

impl<B: Backend> LayerNorm<B> {
    fn load(b: &B, w: &mut WeightLoader<'_, B>, prefix: &str, dim: usize) -> Result<Self> {
        let weight = w.host_tensor(&format!("{prefix}.weight"), &[dim])?.to_f32();
        let bias = w.host_tensor(&format!("{prefix}.bias"), &[dim])?;
        Ok(LayerNorm {
            shift: b.input(&HostTensor::from_f32(vec![1, dim], bias.to_f32()))?,
            scale: b.input(&HostTensor::from_f32(vec![1, dim], weight.iter().map(|g| g - 1.0).collect()))?,
        })
    }

    fn forward(&self, b: &B, x: &Tensor<B>, eps: f32) -> Result<Tensor<B>> {
        b.layer_norm_modulate(x, &self.shift, &self.scale, eps)
    }
}

struct ClipBlock<B: Backend> {
    norm1: LayerNorm<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    out: Linear<B>,
    norm2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

impl<B: Backend> ClipBlock<B> {
    /// The layer whose tensors are named `p.*`.
    fn load(b: &B, w: &mut WeightLoader<'_, B>, p: &str, c: &ClipConfig) -> Result<Self> {
        let d = c.hidden;
        let linear = |w: &mut WeightLoader<'_, B>, name: &str, inputs: usize, outputs: usize| {
            w.linear(&format!("{p}.{name}"), inputs, outputs, true)
        };
        Ok(ClipBlock {
            norm1: LayerNorm::load(b, w, &format!("{p}.layer_norm1"), d)?,
            q: linear(w, "self_attn.q_proj", d, d)?,
            k: linear(w, "self_attn.k_proj", d, d)?,
            v: linear(w, "self_attn.v_proj", d, d)?,
            out: linear(w, "self_attn.out_proj", d, d)?,
            norm2: LayerNorm::load(b, w, &format!("{p}.layer_norm2"), d)?,
            fc1: linear(w, "mlp.fc1", d, c.intermediate)?,
            fc2: linear(w, "mlp.fc2", c.intermediate, d)?,
        })
    }

    fn forward(&self, b: &B, x: &Tensor<B>, mask: &Tensor<B>, c: &ClipConfig) -> Result<Tensor<B>> {
        let h = self.norm1.forward(b, x, c.eps)?;
        let q = split_heads(b, &self.q.forward(b, &h, Trainable::Nothing)?, c.heads)?;
        let k = split_heads(b, &self.k.forward(b, &h, Trainable::Nothing)?, c.heads)?;
        let v = split_heads(b, &self.v.forward(b, &h, Trainable::Nothing)?, c.heads)?;
        let attn = b.attention_bias(&q, &k, &v, mask, 1.0 / ((c.hidden / c.heads) as f32).sqrt())?;
        let x = b.add(x, &self.out.forward(b, &attn, Trainable::Nothing)?)?;
        let h = self.fc1.forward(b, &self.norm2.forward(b, &x, c.eps)?, Trainable::Nothing)?;
        // quick_gelu(h) = h sigmoid(1.702 h) = silu(1.702 h) / 1.702.
        let h = b.affine(&b.silu(&b.affine(&h, QUICK_GELU, 0.0)?)?, 1.0 / QUICK_GELU, 0.0)?;
        b.add(&x, &self.fc2.forward(b, &h, Trainable::Nothing)?)
    }
}
