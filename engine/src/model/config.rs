//! FLUX hyper-parameters under BFL's `FluxParams` field names, the named presets, and the
//! inference of a config from a checkpoint's tensor shapes.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FluxParams {
    pub in_channels: usize,
    pub out_channels: usize,
    pub vec_in_dim: usize,
    pub context_in_dim: usize,
    pub hidden_size: usize,
    pub mlp_ratio: f64,
    pub num_heads: usize,
    pub depth: usize,
    pub depth_single_blocks: usize,
    pub axes_dim: Vec<usize>,
    pub theta: f64,
    pub qkv_bias: bool,
    pub guidance_embed: bool,
}

/// A config file may give any subset of the fields; the rest come from the checkpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialFluxParams {
    pub in_channels: Option<usize>,
    pub out_channels: Option<usize>,
    pub vec_in_dim: Option<usize>,
    pub context_in_dim: Option<usize>,
    pub hidden_size: Option<usize>,
    pub mlp_ratio: Option<f64>,
    pub num_heads: Option<usize>,
    pub depth: Option<usize>,
    pub depth_single_blocks: Option<usize>,
    pub axes_dim: Option<Vec<usize>>,
    pub theta: Option<f64>,
    pub qkv_bias: Option<bool>,
    pub guidance_embed: Option<bool>,
}

impl From<&FluxParams> for PartialFluxParams {
    fn from(p: &FluxParams) -> Self {
        PartialFluxParams {
            in_channels: Some(p.in_channels),
            out_channels: Some(p.out_channels),
            vec_in_dim: Some(p.vec_in_dim),
            context_in_dim: Some(p.context_in_dim),
            hidden_size: Some(p.hidden_size),
            mlp_ratio: Some(p.mlp_ratio),
            num_heads: Some(p.num_heads),
            depth: Some(p.depth),
            depth_single_blocks: Some(p.depth_single_blocks),
            axes_dim: Some(p.axes_dim.clone()),
            theta: Some(p.theta),
            qkv_bias: Some(p.qkv_bias),
            guidance_embed: Some(p.guidance_embed),
        }
    }
}

pub const PRESETS: &[&str] = &["flux-dev", "flux-small", "flux-tiny", "asasr-cpu"];

/// Size of the sinusoidal timestep embedding fed to `time_in` and `guidance_in`.
pub const TIME_EMBED_DIM: usize = 256;

impl FluxParams {
    /// FLUX.1-dev, the real shape (in_channels 64; control variants use 128).
    pub fn flux_dev() -> Self {
        FluxParams {
            in_channels: 64,
            out_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_ratio: 4.0,
            num_heads: 24,
            depth: 19,
            depth_single_blocks: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    pub fn preset(name: &str) -> Result<Self> {
        let dev = Self::flux_dev();
        Ok(match name {
            "flux-dev" => dev,
            // Same text interface as FLUX.1-dev, a twentieth of its width x depth: for CPU
            // benchmarks and GPU self-tests at realistic head size.
            "flux-small" => {
                FluxParams { hidden_size: 768, num_heads: 12, depth: 2, depth_single_blocks: 4, axes_dim: vec![8, 28, 28], ..dev }
            }
            // The smallest model with every kind of block, for tests.
            "flux-tiny" => FluxParams {
                vec_in_dim: 32,
                context_in_dim: 64,
                hidden_size: 64,
                num_heads: 2,
                depth: 1,
                depth_single_blocks: 1,
                axes_dim: vec![4, 14, 14],
                ..dev
            },
            // The shipped CPU model: single-stream blocks only (the text is a fixed embedding, so
            // a text stream would be dead weight), 1.8 times as wide as a pixel-shuffle(6) token
            // (12x12 pixels, 432 values): velocity = noise - image must carry the whole noise
            // through, so a width equal to the token's (pixel-shuffle 8) leaves no room for the
            // image and the samples stay noisy. MLP ratio 1 keeps it under 20M parameters.
            "asasr-cpu" => FluxParams {
                vec_in_dim: 32,
                context_in_dim: 64,
                hidden_size: 768,
                mlp_ratio: 1.0,
                num_heads: 6,
                depth: 0,
                depth_single_blocks: 3,
                guidance_embed: false,
                ..dev
            },
            other => bail!("unknown preset '{other}' (known: {})", PRESETS.join(", ")),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// The consistency BFL's constructor asserts, as errors.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.num_heads > 0 && self.hidden_size % self.num_heads == 0,
            "config: hidden_size {} is not divisible by num_heads {}",
            self.hidden_size,
            self.num_heads
        );
        let pe_dim = self.head_dim();
        ensure!(
            self.axes_dim.iter().sum::<usize>() == pe_dim,
            "config: axes_dim {:?} sums to {}, but the head dim (hidden_size / num_heads) is {pe_dim}",
            self.axes_dim,
            self.axes_dim.iter().sum::<usize>()
        );
        ensure!(
            self.axes_dim.iter().all(|d| d % 2 == 0),
            "config: every axes_dim entry must be even (RoPE rotates pairs), got {:?}",
            self.axes_dim
        );
        for (name, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("vec_in_dim", self.vec_in_dim),
            ("context_in_dim", self.context_in_dim),
        ] {
            ensure!(v > 0, "config: {name} must be positive");
        }
        ensure!(self.mlp_ratio > 0.0 && self.mlp_hidden() > 0, "config: mlp_ratio {} gives an empty MLP", self.mlp_ratio);
        ensure!(self.theta > 0.0, "config: theta must be positive, got {}", self.theta);
        Ok(())
    }

    /// Reads a config file, which may give all fields or only some of them.
    pub fn read_partial(path: &Path) -> Result<PartialFluxParams> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read config", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: invalid FLUX config: {e}", path.display()))
    }

    /// Derives the config from tensor shapes (`shapes` maps internal BFL names to shapes), taking
    /// from `given` what shapes cannot tell (axes_dim, theta) and checking that what `given` states
    /// agrees with the shapes.
    pub fn infer(shapes: &BTreeMap<String, Vec<usize>>, given: &PartialFluxParams) -> Result<Self> {
        let shape = |name: &str| -> Result<&Vec<usize>> {
            shapes.get(name).with_context(|| format!("checkpoint has no '{name}', which every FLUX model has"))
        };
        let matrix = |name: &str| -> Result<(usize, usize)> {
            let s = shape(name)?;
            ensure!(s.len() == 2, "tensor '{name}' has shape {s:?}, expected a matrix");
            Ok((s[0], s[1]))
        };
        let (hidden, in_channels) = matrix("img_in.weight")?;
        let (out_channels, _) = matrix("final_layer.linear.weight")?;
        let (_, context_in_dim) = matrix("txt_in.weight")?;
        let (_, vec_in_dim) = matrix("vector_in.in_layer.weight")?;
        let count = |prefix: &str| {
            shapes.keys().filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok()).max().map_or(0, |m| m + 1)
        };
        let depth = count("double_blocks.");
        let depth_single = count("single_blocks.");
        let norm_scale = if depth > 0 { "double_blocks.0.img_attn.norm.query_norm.scale" } else { "single_blocks.0.norm.query_norm.scale" };
        let head_dim = match shapes.get(norm_scale) {
            Some(s) if s.len() == 1 && s[0] > 0 => s[0],
            Some(s) => bail!("tensor '{norm_scale}' has shape {s:?}, expected [head_dim]"),
            None if depth + depth_single == 0 => bail!("checkpoint has no transformer blocks"),
            None => bail!("checkpoint has no '{norm_scale}' (the QK-norm scale, which gives the head dim)"),
        };
        ensure!(hidden % head_dim == 0, "hidden size {hidden} is not a multiple of the head dim {head_dim}");
        let mlp_ratio = if depth > 0 {
            matrix("double_blocks.0.img_mlp.0.weight")?.0 as f64 / hidden as f64
        } else {
            (matrix("single_blocks.0.linear1.weight")?.0 - 3 * hidden) as f64 / hidden as f64
        };
        let qkv_name = if depth > 0 { "double_blocks.0.img_attn.qkv.bias" } else { "single_blocks.0.linear1.bias" };
        let inferred = FluxParams {
            in_channels,
            out_channels,
            vec_in_dim,
            context_in_dim,
            hidden_size: hidden,
            mlp_ratio,
            num_heads: hidden / head_dim,
            depth,
            depth_single_blocks: depth_single,
            axes_dim: given.axes_dim.clone().unwrap_or_else(|| default_axes_dim(head_dim)),
            theta: given.theta.unwrap_or(10_000.0),
            qkv_bias: depth == 0 && depth_single == 0 || shapes.contains_key(qkv_name),
            guidance_embed: shapes.contains_key("guidance_in.in_layer.weight"),
        };
        inferred.check_agrees(given)?;
        inferred.validate()?;
        Ok(inferred)
    }

    /// Errors on the first field that `given` states differently.
    fn check_agrees(&self, given: &PartialFluxParams) -> Result<()> {
        macro_rules! agree {
            ($($f:ident),*) => {$(
                if let Some(v) = &given.$f {
                    ensure!(*v == self.$f, "config gives {} = {:?}, but the checkpoint's tensors say {:?}", stringify!($f), v, self.$f);
                }
            )*};
        }
        agree!(
            in_channels,
            out_channels,
            vec_in_dim,
            context_in_dim,
            hidden_size,
            num_heads,
            depth,
            depth_single_blocks,
            qkv_bias,
            guidance_embed
        );
        if let Some(r) = given.mlp_ratio {
            ensure!(
                (self.hidden_size as f64 * r) as usize == self.mlp_hidden(),
                "config gives mlp_ratio = {r}, but the checkpoint's tensors say {}",
                self.mlp_ratio
            );
        }
        Ok(())
    }
}

/// FLUX's split of the rotary dims over (index, row, column) is [16, 56, 56] for head dim 128;
/// other head dims keep the proportions 1/8, 7/16, 7/16, rounded to even sizes.
pub fn default_axes_dim(head_dim: usize) -> Vec<usize> {
    let first = (head_dim / 8) & !1;
    let rest = head_dim - first;
    let second = (rest / 2) & !1;
    vec![first, second, rest - second]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_consistent() {
        for p in PRESETS {
            FluxParams::preset(p).unwrap().validate().unwrap();
        }
        assert!(FluxParams::preset("flux-huge").unwrap_err().to_string().contains("flux-huge"));
    }

    #[test]
    fn default_axes_split_matches_flux_and_sums_to_head_dim() {
        assert_eq!(default_axes_dim(128), vec![16, 56, 56]);
        assert_eq!(default_axes_dim(32), vec![4, 14, 14]);
        for d in (8..=256).step_by(2) {
            let a = default_axes_dim(d);
            assert_eq!(a.iter().sum::<usize>(), d);
            assert!(a.iter().all(|x| x % 2 == 0), "{d}: {a:?}");
        }
    }

    #[test]
    fn bad_config_is_named() {
        let mut p = FluxParams::flux_dev();
        p.axes_dim = vec![16, 56, 50];
        assert!(p.validate().unwrap_err().to_string().contains("axes_dim"));
    }
}
