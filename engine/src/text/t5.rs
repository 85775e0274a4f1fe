//! T5 v1.1's encoder (transformers' `T5EncoderModel`, FLUX.1's `text_encoder_2`): token
//! embedding (not scaled), pre-norm blocks of self-attention and a gated-GELU MLP with RMSNorm
//! ("T5LayerNorm": no mean, no bias, eps 1e-6) and residual adds, a final RMSNorm. Attention
//! scores are not scaled by 1/sqrt(d); block 0's learned relative-position bias (bucketed
//! distances) is added to every block's scores. No biases anywhere; GELU is the tanh form
//! (`gelu_new`).

use super::{check_config, count_blocks, embed, layer_bar, open_weights, read_config, split_heads};
use crate::backend::Backend;
use crate::model::layers::Linear;
use crate::model::weights::WeightLoader;
use crate::model::{Trainable, WeightSource};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use loaders::shards::TensorFiles;
use loaders::HostTensor;
use std::path::Path;

const EMBEDDINGS: [&str; 2] = ["encoder.embed_tokens.weight", "shared.weight"];
const RELATIVE_BIAS: &str = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";

/// The transformers config fields the encoder needs (any may be absent: shapes tell the sizes).
#[derive(Default, serde::Deserialize)]
struct T5Json {
    d_model: Option<usize>,
    d_kv: Option<usize>,
    d_ff: Option<usize>,
    num_layers: Option<usize>,
    num_heads: Option<usize>,
    relative_attention_max_distance: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    feed_forward_proj: Option<String>,
    eos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    pub vocab: usize,
    pub d_model: usize,
    pub heads: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub layers: usize,
    pub buckets: usize,
    pub max_distance: usize,
    pub eps: f32,
    pub eos: u32,
    pub pad: u32,
}

pub struct T5Encoder {
    files: TensorFiles,
    embedding: &'static str,
    pub config: T5Config,
}

impl T5Encoder {
    /// A `.safetensors` file, a sharded checkpoint's index, or a transformers folder
    /// (`text_encoder_2/`: `config.json` and the weights).
    pub fn open(path: &Path) -> Result<T5Encoder> {
        let (files, config_path) = open_weights(path)?;
        let json: T5Json = read_config(config_path.as_deref())?;
        let origin = files.origin();
        let shapes = files.shapes();
        let shape = |name: &str| shapes.get(name).with_context(|| format!("{origin}: no '{name}': not a T5 encoder"));
        let embedding = *EMBEDDINGS
            .iter()
            .find(|n| shapes.contains_key(**n))
            .with_context(|| format!("{origin}: no '{}' or '{}': not a T5 encoder", EMBEDDINGS[0], EMBEDDINGS[1]))?;
        if shapes.contains_key("encoder.block.0.layer.1.DenseReluDense.wi.weight") {
            bail!("{origin}: a T5 v1.0 encoder (ReLU MLP); FLUX uses T5 v1.1 (gated GELU)");
        }
        let (vocab, d_model) = matrix(shape(embedding)?, embedding, &origin)?;
        let (buckets, heads) = matrix(shape(RELATIVE_BIAS)?, RELATIVE_BIAS, &origin)?;
        let (inner, _) = matrix(shape("encoder.block.0.layer.0.SelfAttention.q.weight")?, "q", &origin)?;
        let (d_ff, _) = matrix(shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")?, "wi_0", &origin)?;
        let layers = count_blocks(shapes.keys(), "encoder.block.");
        ensure!(heads > 0 && inner % heads == 0, "{origin}: {inner} query features do not split into {heads} heads");
        let config = T5Config {
            vocab,
            d_model,
            heads,
            d_kv: inner / heads,
            d_ff,
            layers,
            buckets,
            max_distance: json.relative_attention_max_distance.unwrap_or(128),
            eps: json.layer_norm_epsilon.unwrap_or(1e-6) as f32,
            eos: json.eos_token_id.unwrap_or(1),
            pad: json.pad_token_id.unwrap_or(0),
        };
        let c = &config;
        check_config(
            &origin,
            &[
                ("d_model", json.d_model, c.d_model),
                ("d_kv", json.d_kv, c.d_kv),
                ("d_ff", json.d_ff, c.d_ff),
                ("num_layers", json.num_layers, c.layers),
                ("num_heads", json.num_heads, c.heads),
            ],
        )?;
        if let Some(act) = json.feed_forward_proj.filter(|a| a != "gated-gelu") {
            bail!("{origin}: config.json gives feed_forward_proj '{act}'; FLUX's T5 v1.1 is 'gated-gelu'");
        }
        Ok(T5Encoder { files, embedding, config })
    }

    /// The empty prompt as T5's tokenizer writes it, padded to `tokens`: end of text, then pads.
    pub fn empty_prompt_ids(&self, tokens: usize) -> Vec<u32> {
        let mut ids = vec![self.config.pad; tokens];
        if let Some(first) = ids.first_mut() {
            *first = self.config.eos;
        }
        ids
    }

    /// The last hidden state `[L, d_model]` for one sequence of ids, with no attention mask (as
    /// FLUX pipelines call it); one layer's weights loaded at a time.
    pub fn encode<B: Backend>(&self, b: &B, ids: &[u32]) -> Result<HostTensor> {
        let c = &self.config;
        ensure!(!ids.is_empty(), "T5: no tokens to encode");
        let mut w = WeightLoader::new(b, &self.files);
        for name in EMBEDDINGS.iter().filter(|n| **n != self.embedding && self.files.info(n).is_some()) {
            w.skip(name); // the tied copy
        }
        let table = w.host_tensor(self.embedding, &[c.vocab, c.d_model])?;
        let mut x = b.input(&embed(&table, ids, &self.files.origin())?)?;
        drop(table);
        let relative = w.host_tensor(RELATIVE_BIAS, &[c.buckets, c.heads])?;
        let bias = b.upload(&position_bias(&relative.to_f32(), c, ids.len()))?;
        let bar = layer_bar("T5 encoder", c.layers);
        for i in 0..c.layers {
            x = T5Block::load(&mut w, i, c)?.forward(b, &x, &bias, c)?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let x = b.rms_norm(&x, &w.tensor("encoder.final_layer_norm.weight", &[c.d_model])?, c.eps)?;
        w.finish()?;
        Ok(HostTensor::from_f32(vec![ids.len(), c.d_model], b.download(&x)?.to_f32()))
    }
}

fn matrix(shape: &[usize], name: &str, origin: &str) -> Result<(usize, usize)> {
    match shape {
        &[a, b] => Ok((a, b)),
        _ => bail!("{origin}: '{name}' has shape {shape:?}, expected a matrix"),
    }
}

struct T5Block<B: Backend> {
    attention_norm: Tensor<B>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    o: Linear<B>,
    mlp_norm: Tensor<B>,
    wi_0: Linear<B>,
    wi_1: Linear<B>,
    wo: Linear<B>,
}

impl<B: Backend> T5Block<B> {
    fn load(w: &mut WeightLoader<'_, B>, i: usize, c: &T5Config) -> Result<Self> {
        let (d, inner) = (c.d_model, c.heads * c.d_kv);
        let attn = format!("encoder.block.{i}.layer.0");
        let mlp = format!("encoder.block.{i}.layer.1");
        Ok(T5Block {
            attention_norm: w.tensor(&format!("{attn}.layer_norm.weight"), &[d])?,
            q: w.linear(&format!("{attn}.SelfAttention.q"), d, inner, false)?,
            k: w.linear(&format!("{attn}.SelfAttention.k"), d, inner, false)?,
            v: w.linear(&format!("{attn}.SelfAttention.v"), d, inner, false)?,
            o: w.linear(&format!("{attn}.SelfAttention.o"), inner, d, false)?,
            mlp_norm: w.tensor(&format!("{mlp}.layer_norm.weight"), &[d])?,
            wi_0: w.linear(&format!("{mlp}.DenseReluDense.wi_0"), d, c.d_ff, false)?,
            wi_1: w.linear(&format!("{mlp}.DenseReluDense.wi_1"), d, c.d_ff, false)?,
            wo: w.linear(&format!("{mlp}.DenseReluDense.wo"), c.d_ff, d, false)?,
        })
    }

    fn forward(&self, b: &B, x: &Tensor<B>, bias: &Tensor<B>, c: &T5Config) -> Result<Tensor<B>> {
        let h = b.rms_norm(x, &self.attention_norm, c.eps)?;
        let q = split_heads(b, &self.q.forward(b, &h, Trainable::Nothing)?, c.heads)?;
        let k = split_heads(b, &self.k.forward(b, &h, Trainable::Nothing)?, c.heads)?;
        let v = split_heads(b, &self.v.forward(b, &h, Trainable::Nothing)?, c.heads)?;
        // T5 does not scale its scores (the 1/sqrt(d) lives in its initialisation).
        let attn = b.attention_bias(&q, &k, &v, bias, 1.0)?;
        let x = b.add(x, &self.o.forward(b, &attn, Trainable::Nothing)?)?;
        let h = b.rms_norm(&x, &self.mlp_norm, c.eps)?;
        let gated = b.mul(&self.wi_0.forward_gelu(b, &h, Trainable::Nothing)?, &self.wi_1.forward(b, &h, Trainable::Nothing)?)?;
        b.add(&x, &self.wo.forward(b, &gated, Trainable::Nothing)?)
    }
}

/// T5's bucket of the distance `key - query` (transformers' `_relative_position_bucket`,
/// bidirectional): half the buckets for each sign; of those, exact distances below half, then
/// logarithmic bins up to `max_distance`, computed in f32 as PyTorch does.
fn relative_bucket(distance: i64, buckets: usize, max_distance: usize) -> usize {
    let half = buckets / 2;
    let side = if distance > 0 { half } else { 0 };
    let n = distance.unsigned_abs() as usize;
    let exact = half / 2;
    if n < exact {
        return side + n;
    }
    let log_ratio = (n as f32 / exact as f32).ln() / (max_distance as f64 / exact as f64).ln() as f32;
    side + (exact + (log_ratio * (half - exact) as f32) as usize).min(half - 1)
}

/// The bias `[heads, L, L]` every block adds to its scores: `table[bucket(j - i), h]` for query i,
/// key j, from block 0's table `[buckets, heads]`.
fn position_bias(table: &[f32], c: &T5Config, tokens: usize) -> HostTensor {
    let mut out = vec![0f32; c.heads * tokens * tokens];
    for i in 0..tokens {
        for j in 0..tokens {
            let bucket = relative_bucket(j as i64 - i as i64, c.buckets, c.max_distance);
            for h in 0..c.heads {
                out[(h * tokens + i) * tokens + j] = table[bucket * c.heads + h];
            }
        }
    }
    HostTensor::from_f32(vec![c.heads, tokens, tokens], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by transformers 5.24's `T5Attention._relative_position_bucket`
    /// (bidirectional, 32 buckets, max distance 128).
    #[test]
    fn buckets_follow_t5() {
        let cases = [
            (0, 0),
            (1, 17),
            (-1, 1),
            (7, 23),
            (-7, 7),
            (8, 24),
            (-8, 8),
            (11, 24),
            (12, 25),
            (16, 26),
            (-16, 10),
            (20, 26),
            (40, 28),
            (64, 30),
            (-64, 14),
            (90, 30),
            (127, 31),
            (128, 31),
            (-500, 15),
        ];
        for (distance, bucket) in cases {
            assert_eq!(relative_bucket(distance, 32, 128), bucket, "distance {distance}");
        }
    }
}
