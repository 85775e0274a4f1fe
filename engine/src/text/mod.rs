//! The text encoders FLUX.1 is conditioned on, for the fixed embedding of an SR model
//! (design.md section 4): T5 v1.1's encoder gives the token sequence `txt`, CLIP-L's text model
//! the pooled vector `y`. Written once against the backend, like the transformer; weights stream
//! one layer at a time from the checkpoint (`TensorFiles`: a file, or transformers' shards), so
//! T5-XXL's 9.5 GB never sit in memory together.
//!
//! The empty prompt needs no tokenizer: T5's is `[eos, pad, pad, ...]` and CLIP's
//! `[bos, eos, eos, ...]` (FLUX's CLIP tokenizer pads with its end token), ids the configs give.

pub mod clip;
pub mod t5;

use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::{Context, Result};
use loaders::shards::TensorFiles;
use loaders::{HostData, HostTensor};
use std::path::{Path, PathBuf};

pub use clip::ClipText;
pub use t5::T5Encoder;

/// `[1, L, H * D]` -> `[1, H, L, D]`: two transposes of the last two dims around a free reshape.
pub(crate) fn split_heads<B: Backend>(b: &B, x: &Tensor<B>, heads: usize) -> Result<Tensor<B>> {
    let (batch, tokens, width) = (x.dim(0), x.dim(1), x.dim(2));
    let t = b.transpose_last2(x)?.reshape(&[batch, heads, width / heads, tokens])?;
    b.transpose_last2(&t)
}

/// The weights and, when the encoder comes as a transformers folder (or index), its
/// `config.json`, which a lone `.safetensors` file has not (its shapes then tell what they can).
pub(crate) fn open_weights(path: &Path) -> Result<(TensorFiles, Option<PathBuf>)> {
    let files = TensorFiles::open(path)?;
    let folder = if path.is_dir() { Some(path) } else { path.to_str().filter(|p| p.ends_with(".index.json")).and(path.parent()) };
    let config = folder.map(|d| d.join("config.json")).filter(|c| c.is_file());
    Ok((files, config))
}

/// How many numbered blocks `prefix0.`, `prefix1.`, ... the names hold (the highest index + 1).
pub(crate) fn count_blocks<'a>(names: impl Iterator<Item = &'a String>, prefix: &str) -> usize {
    names.filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok()).max().map_or(0, |m| m + 1)
}

/// Errors on the first `(field, config.json's value, the weights' value)` that disagrees.
pub(crate) fn check_config(origin: &str, fields: &[(&str, Option<usize>, usize)]) -> Result<()> {
    for &(field, given, found) in fields {
        anyhow::ensure!(given.is_none_or(|g| g == found), "{origin}: config.json gives {field} = {given:?}, but the weights say {found}");
    }
    Ok(())
}

/// Reads a transformers `config.json` into the fields `T` names (the others are ignored).
pub(crate) fn read_config<T: serde::de::DeserializeOwned + Default>(path: Option<&Path>) -> Result<T> {
    let Some(path) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Rows `ids` of an embedding table `[vocab, dim]`, as `[1, L, dim]` f32 (only those rows
/// widened: T5-XXL's table is 263 MB in bf16).
pub(crate) fn embed(table: &HostTensor, ids: &[u32], origin: &str) -> Result<HostTensor> {
    let (vocab, dim) = (table.shape[0], table.shape[1]);
    let mut out = Vec::with_capacity(ids.len() * dim);
    for &id in ids {
        let id = id as usize;
        anyhow::ensure!(id < vocab, "{origin}: token id {id} is outside the vocabulary of {vocab}");
        let row = id * dim..(id + 1) * dim;
        match &table.data {
            HostData::F32(v) => out.extend_from_slice(&v[row]),
            HostData::F16(v) => out.extend(v[row].iter().map(|x| x.to_f32())),
            HostData::BF16(v) => out.extend(v[row].iter().map(|x| x.to_f32())),
        }
    }
    Ok(HostTensor::from_f32(vec![1, ids.len(), dim], out))
}

/// A progress bar over an encoder's layers.
pub(crate) fn layer_bar(what: &str, layers: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(layers as u64);
    let style = indicatif::ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} layers {elapsed}")
        .expect("a valid template")
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

/// FLUX's conditioning for one prompt: `txt` `[L, 4096]` from T5, `y` `[768]` from CLIP.
pub struct TextEmbedding {
    pub txt: HostTensor,
    pub y: HostTensor,
}

/// The empty prompt's embedding, exactly as FLUX pipelines compute it: T5 on `tokens` ids
/// `[eos, pad, ...]` with no attention mask (every row kept), CLIP's pooled output of
/// `[bos, eos, ...]` (77 tokens).
pub fn empty_prompt<B: Backend>(b: &B, t5: &T5Encoder, clip: &ClipText, tokens: usize) -> Result<TextEmbedding> {
    let txt = t5.encode(b, &t5.empty_prompt_ids(tokens))?;
    let (_, y) = clip.encode(b, &clip.empty_prompt_ids())?;
    Ok(TextEmbedding { txt, y })
}
