//! FLUX autoencoder checkpoints in BFL's layout (`flux/modules/autoencoder.py`, the `ae.safetensors`
//! that ships with FLUX) or diffusers' `AutoencoderKL` layout, seen through one internal naming:
//! BFL's, with BFL's shapes (the mid-block attention projections are 1x1 convolutions
//! `[C, C, 1, 1]`; diffusers stores them as linears `[C, C]` and they are reshaped at load).
//!
//! As in flux.rs, the mapping is built at open from the header alone and `load` reads one tensor at
//! a time. Which tensors a config needs, with which shapes, is the engine's question.
//!
//! The layouts differ in names (`down.0.block.0` / `down_blocks.0.resnets.0`, `mid.block_1` /
//! `mid_block.resnets.0`, `nin_shortcut` / `conv_shortcut`, `norm_out` / `conv_norm_out`, ...) and in
//! the decoder's level order: BFL indexes `decoder.up.{i}` by resolution level (0 = full size),
//! diffusers' `decoder.up_blocks.{i}` in execution order, so `up_blocks.0` is BFL's `up.{last}`.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::flux::Layout;
use crate::safetensors::{Checkpoint, FileDType};
use crate::tensor::HostTensor;

/// Key prefixes under which pipelines store their autoencoder.
const PREFIXES: [&str; 3] = ["vae.", "first_stage_model.", "ae."];

#[derive(Debug, Clone)]
struct Entry {
    key: String,
    shape: Vec<usize>,
    dtype: FileDType,
    /// A diffusers linear `[C, C]` seen as BFL's 1x1 convolution `[C, C, 1, 1]`.
    as_conv1x1: bool,
}

#[derive(Debug, Clone)]
pub struct AeCheckpoint {
    ckpt: Checkpoint,
    layout: Layout,
    tensors: BTreeMap<String, Entry>,
    /// The pipeline prefix the file's keys carry (`vae.`), or "".
    prefix: &'static str,
    /// Diffusers decoder up blocks in the file (to reverse their order).
    up_blocks: usize,
}

impl AeCheckpoint {
    pub fn open(path: &Path) -> Result<AeCheckpoint> {
        AeCheckpoint::from_checkpoint(Checkpoint::open(path)?)
    }

    /// Detects the layout and maps every tensor to its internal name; a tensor that maps to nothing
    /// is an error naming its key.
    pub fn from_checkpoint(ckpt: Checkpoint) -> Result<AeCheckpoint> {
        let path = ckpt.path().to_path_buf();
        let layout = detect(&ckpt)?;
        let up_blocks = ckpt
            .names()
            .filter_map(|k| strip(k).strip_prefix("decoder.up_blocks.")?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1);
        let mut tensors = BTreeMap::new();
        for key in ckpt.names() {
            let name = strip(key);
            if name.starts_with("quant_conv.") || name.starts_with("post_quant_conv.") {
                return Err(Error::invalid(
                    &path,
                    format!("has '{key}': an autoencoder with quant convs (an SD-style VAE); FLUX's autoencoder has none"),
                ));
            }
            let mapped = match layout {
                Layout::Bfl => (name.starts_with("encoder.") || name.starts_with("decoder.")).then(|| (name.to_string(), false)),
                Layout::Diffusers => diffusers_to_bfl(name, up_blocks),
            };
            let Some((internal, reshape)) = mapped else {
                return Err(Error::invalid(&path, format!("unexpected tensor '{key}' ({layout} autoencoder layout)")));
            };
            let info = ckpt.info(key).expect("names come from the checkpoint");
            let as_conv1x1 = reshape && info.shape.len() == 2;
            let mut shape = info.shape.clone();
            if as_conv1x1 {
                shape.extend([1, 1]);
            }
            let entry = Entry { key: key.to_string(), shape, dtype: info.dtype, as_conv1x1 };
            if let Some(old) = tensors.insert(internal.clone(), entry) {
                return Err(Error::invalid(&path, format!("tensors '{}' and '{key}' both map to '{internal}'", old.key)));
            }
        }
        let prefix = ckpt.names().next().and_then(|k| PREFIXES.iter().find(|p| k.starts_with(*p))).copied().unwrap_or("");
        Ok(AeCheckpoint { ckpt, layout, tensors, prefix, up_blocks })
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Internal (BFL) names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The shape `load` will return (BFL's).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|e| e.shape.clone())
    }

    pub fn dtype(&self, name: &str) -> Option<FileDType> {
        self.tensors.get(name).map(|e| e.dtype)
    }

    /// The file key behind an internal name, for messages.
    pub fn source(&self, name: &str) -> Option<String> {
        self.tensors.get(name).map(|e| e.key.clone())
    }

    /// The key an internal name has, or would have if present, in this file's layout, for
    /// messages: `decoder.up_blocks.0.resnets.1.conv1.weight` for `decoder.up.1.block.1.conv1.weight`
    /// in a diffusers file with two up blocks.
    pub fn describe(&self, name: &str) -> String {
        if let Some(key) = self.source(name) {
            return key;
        }
        match self.layout {
            Layout::Bfl => format!("{}{name}", self.prefix),
            Layout::Diffusers => match bfl_to_diffusers(name, self.up_blocks) {
                Some(key) => format!("{}{key}", self.prefix),
                None => name.to_string(),
            },
        }
    }

    /// Materialises one internal tensor in the file's dtype, with BFL's shape.
    pub fn load(&self, name: &str) -> Result<HostTensor> {
        let path = self.ckpt.path();
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::invalid(path, format!("no tensor '{name}' ({} autoencoder layout)", self.layout)))?;
        let mut t = self.ckpt.read(&entry.key)?;
        if entry.as_conv1x1 {
            t.shape.extend([1, 1]);
        }
        Ok(t)
    }
}

fn strip(key: &str) -> &str {
    PREFIXES.iter().find_map(|p| key.strip_prefix(p)).unwrap_or(key)
}

fn detect(ckpt: &Checkpoint) -> Result<Layout> {
    let find = |markers: &[&str]| ckpt.names().find(|k| markers.iter().any(|m| strip(k).contains(m)));
    let bfl = find(&["encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid."]);
    let diffusers = find(&["down_blocks.", "up_blocks.", "mid_block."]);
    match (bfl, diffusers) {
        (Some(a), Some(b)) => Err(Error::invalid(ckpt.path(), format!("mixes BFL ('{a}') and diffusers ('{b}') autoencoder key layouts"))),
        (Some(_), None) => Ok(Layout::Bfl),
        (None, Some(_)) => Ok(Layout::Diffusers),
        (None, None) => Err(Error::invalid(
            ckpt.path(),
            format!(
                "not a FLUX autoencoder: none of its {} tensors has a BFL key (encoder.down.*, decoder.up.*) or a diffusers key (*.down_blocks.*, *.up_blocks.*, *.mid_block.*){}",
                ckpt.len(),
                ckpt.names().next().map(|k| format!("; first key '{k}'")).unwrap_or_default()
            ),
        )),
    }
}

/// `index.rest` with a canonical decimal index.
fn index(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    let canonical = !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()) && (i == "0" || !i.starts_with('0'));
    if !canonical {
        return None;
    }
    Some((i.parse().ok()?, rest))
}

/// A ResnetBlock's parameter (`norm1.weight`, `conv_shortcut.bias`, ...) in BFL's naming.
fn resnet_param(rest: &str) -> Option<String> {
    let (module, param) = rest.split_once('.')?;
    let module = match module {
        "norm1" | "conv1" | "norm2" | "conv2" => module,
        "conv_shortcut" => "nin_shortcut",
        _ => return None,
    };
    matches!(param, "weight" | "bias").then(|| format!("{module}.{param}"))
}

/// A diffusers key (prefix stripped) -> (BFL name, whether a 2-D weight becomes a 1x1 conv).
/// `up_blocks` is the number of decoder up blocks in the file (to reverse their order).
fn diffusers_to_bfl(name: &str, up_blocks: usize) -> Option<(String, bool)> {
    let (side, rest) = name.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let plain = |s: String| Some((s, false));
    if let Some(p) = rest.strip_prefix("conv_norm_out.") {
        return matches!(p, "weight" | "bias").then(|| (format!("{side}.norm_out.{p}"), false));
    }
    for conv in ["conv_in.", "conv_out."] {
        if let Some(p) = rest.strip_prefix(conv) {
            return matches!(p, "weight" | "bias").then(|| (format!("{side}.{conv}{p}"), false));
        }
    }
    if let Some(r) = rest.strip_prefix("mid_block.resnets.") {
        let (i, r) = index(r)?;
        if i >= 2 {
            return None;
        }
        return plain(format!("{side}.mid.block_{}.{}", i + 1, resnet_param(r)?));
    }
    if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
        let (module, param) = r.rsplit_once('.')?;
        let bfl = match module {
            "group_norm" => "norm",
            "to_q" => "q",
            "to_k" => "k",
            "to_v" => "v",
            "to_out.0" => "proj_out",
            _ => return None,
        };
        if !matches!(param, "weight" | "bias") {
            return None;
        }
        return Some((format!("{side}.mid.attn_1.{bfl}.{param}"), bfl != "norm" && param == "weight"));
    }
    let (blocks, level_word, sampler, bfl_sampler) = if side == "encoder" {
        ("down_blocks.", "down", "downsamplers.0.conv.", "downsample.conv.")
    } else {
        ("up_blocks.", "up", "upsamplers.0.conv.", "upsample.conv.")
    };
    let (i, r) = index(rest.strip_prefix(blocks)?)?;
    let level = if side == "encoder" { i } else { up_blocks.checked_sub(i + 1)? };
    if let Some(r) = r.strip_prefix("resnets.") {
        let (j, r) = index(r)?;
        return plain(format!("{side}.{level_word}.{level}.block.{j}.{}", resnet_param(r)?));
    }
    let p = r.strip_prefix(sampler)?;
    matches!(p, "weight" | "bias").then(|| (format!("{side}.{level_word}.{level}.{bfl_sampler}{p}"), false))
}

/// The inverse of `diffusers_to_bfl`, for naming tensors that are missing.
fn bfl_to_diffusers(name: &str, up_blocks: usize) -> Option<String> {
    let (side, rest) = name.split_once('.')?;
    let resnet = |r: &str| r.replace("nin_shortcut.", "conv_shortcut.");
    if let Some(p) = rest.strip_prefix("norm_out.") {
        return Some(format!("{side}.conv_norm_out.{p}"));
    }
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return Some(name.to_string());
    }
    if let Some(r) = rest.strip_prefix("mid.block_") {
        let (i, r) = index(r)?;
        return Some(format!("{side}.mid_block.resnets.{}.{}", i.checked_sub(1)?, resnet(r)));
    }
    if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let (module, param) = r.split_once('.')?;
        let module = match module {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        return Some(format!("{side}.mid_block.attentions.0.{module}.{param}"));
    }
    let (blocks, level_word, sampler, bfl_sampler) = if side == "encoder" {
        ("down_blocks", "down.", "downsamplers.0.conv.", "downsample.conv.")
    } else {
        ("up_blocks", "up.", "upsamplers.0.conv.", "upsample.conv.")
    };
    let (level, r) = index(rest.strip_prefix(level_word)?)?;
    let i = if side == "encoder" { level } else { up_blocks.checked_sub(level + 1)? };
    if let Some(r) = r.strip_prefix("block.") {
        return Some(format!("{side}.{blocks}.{i}.resnets.{}", resnet(r)));
    }
    Some(format!("{side}.{blocks}.{i}.{sampler}{}", r.strip_prefix(bfl_sampler)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_keys_map_to_bfl_with_the_decoder_reversed() {
        let cases = [
            ("encoder.conv_in.weight", "encoder.conv_in.weight", false),
            ("encoder.conv_norm_out.bias", "encoder.norm_out.bias", false),
            ("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", "encoder.down.1.block.0.nin_shortcut.weight", false),
            ("encoder.down_blocks.0.downsamplers.0.conv.bias", "encoder.down.0.downsample.conv.bias", false),
            ("encoder.mid_block.resnets.1.norm2.weight", "encoder.mid.block_2.norm2.weight", false),
            ("decoder.mid_block.attentions.0.to_q.weight", "decoder.mid.attn_1.q.weight", true),
            ("decoder.mid_block.attentions.0.to_out.0.bias", "decoder.mid.attn_1.proj_out.bias", false),
            ("decoder.mid_block.attentions.0.group_norm.weight", "decoder.mid.attn_1.norm.weight", false),
            ("decoder.up_blocks.0.resnets.2.conv1.weight", "decoder.up.3.block.2.conv1.weight", false),
            ("decoder.up_blocks.2.upsamplers.0.conv.weight", "decoder.up.1.upsample.conv.weight", false),
        ];
        for (d, b, reshape) in cases {
            assert_eq!(diffusers_to_bfl(d, 4), Some((b.to_string(), reshape)), "{d}");
            assert_eq!(bfl_to_diffusers(b, 4).as_deref(), Some(d), "{b}");
        }
        for bad in [
            "encoder.down_blocks.01.resnets.0.conv1.weight",
            "decoder.up_blocks.4.resnets.0.conv1.weight",
            "encoder.mid_block.resnets.2.conv1.weight",
            "encoder.down_blocks.0.resnets.0.conv3.weight",
            "unet.conv_in.weight",
            "decoder.mid_block.attentions.0.to_q.scale",
        ] {
            assert_eq!(diffusers_to_bfl(bad, 4), None, "{bad}");
        }
    }
}
