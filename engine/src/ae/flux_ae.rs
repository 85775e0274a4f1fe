//! FLUX's KL autoencoder (BFL `flux/modules/autoencoder.py`): a convolutional Encoder / Decoder of
//! ResnetBlocks (GroupNorm, SiLU, 3x3 conv, twice, plus a 1x1 shortcut where channels change), a
//! single-head self-attention block in the middle, stride-2 downsampling after BFL's asymmetric
//! (0, 1, 0, 1) pad, and nearest x2 upsampling + conv. The encoder's Gaussian posterior is reduced
//! to its mean (no sampling). Field names are BFL's checkpoint keys; diffusers checkpoints are
//! mapped onto them by `loaders::ae`.

use super::{check_image_shape, check_latent_shape, Autoencoder};
use crate::backend::Backend;
use crate::model::weights::{WeightLoader, WeightSource};
use crate::tensor::Tensor;
use anyhow::{ensure, Context, Result};
use loaders::ae::AeCheckpoint;
use loaders::HostTensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// GroupNorm epsilon throughout the autoencoder.
const EPS: f32 = 1e-6;

/// BFL's `AutoEncoderParams`, FLUX's values as the default. `norm_num_groups` is ours (BFL
/// hard-codes 32) so that small test models can be built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoEncoderParams {
    pub resolution: usize,
    pub in_channels: usize,
    pub ch: usize,
    pub out_ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub z_channels: usize,
    pub scale_factor: f32,
    pub shift_factor: f32,
    pub norm_num_groups: usize,
}

impl Default for AutoEncoderParams {
    fn default() -> Self {
        AutoEncoderParams {
            resolution: 256,
            in_channels: 3,
            ch: 128,
            out_ch: 3,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 16,
            scale_factor: 0.3611,
            shift_factor: 0.1159,
            norm_num_groups: 32,
        }
    }
}

impl AutoEncoderParams {
    /// Reads a JSON object of these fields; omitted fields take FLUX's values.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let p: Self = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        p.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(p)
    }

    /// From diffusers' `AutoencoderKL` config (a pipeline's `vae/config.json`): channels from
    /// `block_out_channels`, the latent's scale and shift from `scaling_factor` and `shift_factor`.
    /// A VAE without FLUX's traits (a shift, no quant convs, attention in the middle) is refused.
    pub fn from_diffusers_config(path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct Vae {
            in_channels: usize,
            out_channels: usize,
            block_out_channels: Vec<usize>,
            layers_per_block: usize,
            latent_channels: usize,
            norm_num_groups: usize,
            sample_size: usize,
            scaling_factor: f32,
            shift_factor: Option<f32>,
            #[serde(default = "yes")]
            use_quant_conv: bool,
            #[serde(default = "yes")]
            mid_block_add_attention: bool,
        }
        fn yes() -> bool {
            true
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let v: Vae = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not an AutoencoderKL config: {e}", path.display()))?;
        let fail = |why: &str| anyhow::anyhow!("{}: not FLUX's autoencoder: {why}", path.display());
        let shift_factor = v.shift_factor.ok_or_else(|| fail("no shift_factor"))?;
        if v.use_quant_conv || !v.mid_block_add_attention {
            return Err(fail("it has quant convs or no attention in its middle block"));
        }
        let ch = *v.block_out_channels.first().ok_or_else(|| fail("no block_out_channels"))?;
        if ch == 0 || v.block_out_channels.iter().any(|c| c % ch != 0) {
            return Err(fail("block_out_channels are not multiples of the first"));
        }
        let p = AutoEncoderParams {
            resolution: v.sample_size,
            in_channels: v.in_channels,
            ch,
            out_ch: v.out_channels,
            ch_mult: v.block_out_channels.iter().map(|c| c / ch).collect(),
            num_res_blocks: v.layers_per_block,
            z_channels: v.latent_channels,
            scale_factor: v.scaling_factor,
            shift_factor,
            norm_num_groups: v.norm_num_groups,
        };
        p.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(!self.ch_mult.is_empty() && self.ch_mult.iter().all(|&m| m > 0), "ch_mult must be non-empty and positive");
        ensure!(
            self.ch > 0 && self.z_channels > 0 && self.in_channels == 3 && self.out_ch == 3,
            "ch and z_channels must be positive, in/out channels 3"
        );
        ensure!(
            self.scale_factor != 0.0 && self.scale_factor.is_finite() && self.shift_factor.is_finite(),
            "scale_factor must be finite and nonzero"
        );
        let g = self.norm_num_groups;
        ensure!(
            g > 0 && self.ch_mult.iter().all(|m| (self.ch * m) % g == 0),
            "every level's channels (ch {} x ch_mult {:?}) must be a multiple of norm_num_groups {g}",
            self.ch,
            self.ch_mult
        );
        Ok(())
    }

    /// 2^(levels - 1): each level but the last halves the resolution.
    pub fn downscale(&self) -> usize {
        1 << (self.ch_mult.len() - 1)
    }
}

impl WeightSource for AeCheckpoint {
    fn origin(&self) -> String {
        format!("{} ({} autoencoder layout)", self.checkpoint().path().display(), self.layout())
    }

    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.names().filter_map(|n| Some((n.to_string(), self.shape(n)?))).collect()
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        Ok(AeCheckpoint::load(self, name)?)
    }

    fn describe(&self, name: &str) -> String {
        AeCheckpoint::describe(self, name)
    }
}

pub struct Conv<B: Backend> {
    pub weight: Tensor<B>,
    pub bias: Tensor<B>,
}

impl<B: Backend> Conv<B> {
    fn load(w: &mut WeightLoader<B>, prefix: &str, cin: usize, cout: usize, k: usize) -> Result<Self> {
        Ok(Conv { weight: w.tensor(&format!("{prefix}.weight"), &[cout, cin, k, k])?, bias: w.tensor(&format!("{prefix}.bias"), &[cout])? })
    }

    /// Stride 1, "same" padding.
    fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        let p = self.weight.dim(2) / 2;
        b.conv2d(x, &self.weight, Some(&self.bias), 1, [p; 4])
    }
}

pub struct GroupNorm<B: Backend> {
    pub weight: Tensor<B>,
    pub bias: Tensor<B>,
    pub groups: usize,
}

impl<B: Backend> GroupNorm<B> {
    fn load(w: &mut WeightLoader<B>, prefix: &str, c: usize, groups: usize) -> Result<Self> {
        Ok(GroupNorm { weight: w.tensor(&format!("{prefix}.weight"), &[c])?, bias: w.tensor(&format!("{prefix}.bias"), &[c])?, groups })
    }

    fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        b.group_norm(x, self.groups, &self.weight, &self.bias, EPS)
    }

    /// `silu(norm(x))`, the pre-activation every conv in the autoencoder takes.
    fn forward_silu(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        b.silu(&self.forward(b, x)?)
    }
}

pub struct ResnetBlock<B: Backend> {
    pub norm1: GroupNorm<B>,
    pub conv1: Conv<B>,
    pub norm2: GroupNorm<B>,
    pub conv2: Conv<B>,
    pub nin_shortcut: Option<Conv<B>>,
}

impl<B: Backend> ResnetBlock<B> {
    fn load(w: &mut WeightLoader<B>, prefix: &str, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: GroupNorm::load(w, &format!("{prefix}.norm1"), cin, groups)?,
            conv1: Conv::load(w, &format!("{prefix}.conv1"), cin, cout, 3)?,
            norm2: GroupNorm::load(w, &format!("{prefix}.norm2"), cout, groups)?,
            conv2: Conv::load(w, &format!("{prefix}.conv2"), cout, cout, 3)?,
            nin_shortcut: (cin != cout).then(|| Conv::load(w, &format!("{prefix}.nin_shortcut"), cin, cout, 1)).transpose()?,
        })
    }

    fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        let h = self.conv1.forward(b, &self.norm1.forward_silu(b, x)?)?;
        let h = self.conv2.forward(b, &self.norm2.forward_silu(b, &h)?)?;
        match &self.nin_shortcut {
            Some(s) => b.add(&s.forward(b, x)?, &h),
            None => b.add(x, &h),
        }
    }
}

/// Single-head self-attention over the H W positions; q, k, v and proj_out are 1x1 convs in the
/// checkpoint, applied here as linears over tokens.
pub struct AttnBlock<B: Backend> {
    pub norm: GroupNorm<B>,
    pub q: (Tensor<B>, Tensor<B>),
    pub k: (Tensor<B>, Tensor<B>),
    pub v: (Tensor<B>, Tensor<B>),
    pub proj_out: (Tensor<B>, Tensor<B>),
}

impl<B: Backend> AttnBlock<B> {
    fn load(w: &mut WeightLoader<B>, prefix: &str, c: usize, groups: usize) -> Result<Self> {
        let mut lin = |name: &str| -> Result<(Tensor<B>, Tensor<B>)> {
            let weight = w.tensor(&format!("{prefix}.{name}.weight"), &[c, c, 1, 1])?.reshape(&[c, c])?;
            Ok((weight, w.tensor(&format!("{prefix}.{name}.bias"), &[c])?))
        };
        let (q, k, v, proj_out) = (lin("q")?, lin("k")?, lin("v")?, lin("proj_out")?);
        Ok(AttnBlock { norm: GroupNorm::load(w, &format!("{prefix}.norm"), c, groups)?, q, k, v, proj_out })
    }

    fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        let (n, c, h, wd) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        let tokens = b.transpose_last2(&self.norm.forward(b, x)?.reshape(&[n, c, h * wd])?)?;
        let head = |(w, bias): &(Tensor<B>, Tensor<B>)| b.linear(&tokens, w, Some(bias))?.reshape(&[n, 1, h * wd, c]);
        let o = b.attention(&head(&self.q)?, &head(&self.k)?, &head(&self.v)?)?;
        let o = b.linear(&o, &self.proj_out.0, Some(&self.proj_out.1))?;
        b.add(x, &b.transpose_last2(&o)?.reshape(&[n, c, h, wd])?)
    }
}

pub struct Level<B: Backend> {
    pub block: Vec<ResnetBlock<B>>,
    /// Encoder: pad (0, 1, 0, 1) + stride-2 conv. Decoder: nearest x2 + conv.
    pub sample: Option<Conv<B>>,
}

pub struct Mid<B: Backend> {
    pub block_1: ResnetBlock<B>,
    pub attn_1: AttnBlock<B>,
    pub block_2: ResnetBlock<B>,
}

impl<B: Backend> Mid<B> {
    fn load(w: &mut WeightLoader<B>, prefix: &str, c: usize, groups: usize) -> Result<Self> {
        Ok(Mid {
            block_1: ResnetBlock::load(w, &format!("{prefix}.block_1"), c, c, groups)?,
            attn_1: AttnBlock::load(w, &format!("{prefix}.attn_1"), c, groups)?,
            block_2: ResnetBlock::load(w, &format!("{prefix}.block_2"), c, c, groups)?,
        })
    }

    fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        self.block_2.forward(b, &self.attn_1.forward(b, &self.block_1.forward(b, x)?)?)
    }
}

pub struct Encoder<B: Backend> {
    pub conv_in: Conv<B>,
    pub down: Vec<Level<B>>,
    pub mid: Mid<B>,
    pub norm_out: GroupNorm<B>,
    pub conv_out: Conv<B>,
}

impl<B: Backend> Encoder<B> {
    fn load(w: &mut WeightLoader<B>, p: &AutoEncoderParams) -> Result<Self> {
        let g = p.norm_num_groups;
        let conv_in = Conv::load(w, "encoder.conv_in", p.in_channels, p.ch, 3)?;
        let mut down = Vec::new();
        let mut block_in = p.ch;
        for (i, &mult) in p.ch_mult.iter().enumerate() {
            let block_out = p.ch * mult;
            let mut block = Vec::new();
            for j in 0..p.num_res_blocks {
                block.push(ResnetBlock::load(w, &format!("encoder.down.{i}.block.{j}"), block_in, block_out, g)?);
                block_in = block_out;
            }
            let last = i + 1 == p.ch_mult.len();
            let sample = (!last).then(|| Conv::load(w, &format!("encoder.down.{i}.downsample.conv"), block_in, block_in, 3)).transpose()?;
            down.push(Level { block, sample });
        }
        Ok(Encoder {
            conv_in,
            down,
            mid: Mid::load(w, "encoder.mid", block_in, g)?,
            norm_out: GroupNorm::load(w, "encoder.norm_out", block_in, g)?,
            conv_out: Conv::load(w, "encoder.conv_out", block_in, 2 * p.z_channels, 3)?,
        })
    }

    /// `[B, 3, H, W] -> [B, 2 z, H / f, W / f]` (mean, logvar).
    fn forward(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        let mut h = self.conv_in.forward(b, x)?;
        for level in &self.down {
            for block in &level.block {
                h = block.forward(b, &h)?;
            }
            if let Some(conv) = &level.sample {
                h = b.conv2d(&h, &conv.weight, Some(&conv.bias), 2, [0, 1, 0, 1])?;
            }
        }
        let h = self.mid.forward(b, &h)?;
        self.conv_out.forward(b, &self.norm_out.forward_silu(b, &h)?)
    }
}

pub struct Decoder<B: Backend> {
    pub conv_in: Conv<B>,
    pub mid: Mid<B>,
    /// Indexed by resolution level as in BFL (`up[0]` runs last, at full size).
    pub up: Vec<Level<B>>,
    pub norm_out: GroupNorm<B>,
    pub conv_out: Conv<B>,
}

impl<B: Backend> Decoder<B> {
    fn load(w: &mut WeightLoader<B>, p: &AutoEncoderParams) -> Result<Self> {
        let g = p.norm_num_groups;
        let mut block_in = p.ch * p.ch_mult[p.ch_mult.len() - 1];
        let conv_in = Conv::load(w, "decoder.conv_in", p.z_channels, block_in, 3)?;
        let mid = Mid::load(w, "decoder.mid", block_in, g)?;
        let mut up: Vec<Level<B>> = Vec::new();
        for (i, &mult) in p.ch_mult.iter().enumerate().rev() {
            let block_out = p.ch * mult;
            let mut block = Vec::new();
            for j in 0..=p.num_res_blocks {
                block.push(ResnetBlock::load(w, &format!("decoder.up.{i}.block.{j}"), block_in, block_out, g)?);
                block_in = block_out;
            }
            let sample = (i != 0).then(|| Conv::load(w, &format!("decoder.up.{i}.upsample.conv"), block_in, block_in, 3)).transpose()?;
            up.insert(0, Level { block, sample });
        }
        Ok(Decoder {
            conv_in,
            mid,
            up,
            norm_out: GroupNorm::load(w, "decoder.norm_out", block_in, g)?,
            conv_out: Conv::load(w, "decoder.conv_out", block_in, p.out_ch, 3)?,
        })
    }

    fn forward(&self, b: &B, z: &Tensor<B>) -> Result<Tensor<B>> {
        let mut h = self.mid.forward(b, &self.conv_in.forward(b, z)?)?;
        for level in self.up.iter().rev() {
            for block in &level.block {
                h = block.forward(b, &h)?;
            }
            if let Some(conv) = &level.sample {
                h = conv.forward(b, &b.upsample_nearest2x(&h)?)?;
            }
        }
        self.conv_out.forward(b, &self.norm_out.forward_silu(b, &h)?)
    }
}

pub struct FluxAe<B: Backend> {
    pub params: AutoEncoderParams,
    pub encoder: Encoder<B>,
    pub decoder: Decoder<B>,
}

impl<B: Backend> FluxAe<B> {
    /// Builds the model from a weight source; the caller calls `finish` on the loader.
    pub fn build(params: &AutoEncoderParams, w: &mut WeightLoader<B>) -> Result<Self> {
        params.validate()?;
        Ok(FluxAe { params: params.clone(), encoder: Encoder::load(w, params)?, decoder: Decoder::load(w, params)? })
    }

    /// Opens a checkpoint (BFL or diffusers layout) and loads it strictly: every tensor present with
    /// the expected shape, none left over.
    pub fn load(b: &B, path: &Path, params: &AutoEncoderParams) -> Result<Self> {
        let ckpt = AeCheckpoint::open(path)?;
        let mut w = WeightLoader::new(b, &ckpt);
        let model = Self::build(params, &mut w)?;
        w.finish()?;
        Ok(model)
    }
}

impl<B: Backend> Autoencoder<B> for FluxAe<B> {
    fn encode(&self, b: &B, image: &Tensor<B>) -> Result<Tensor<B>> {
        check_image_shape(image.shape(), self.params.downscale())?;
        let moments = self.encoder.forward(b, image)?;
        let mean = b.narrow(&moments, 1, 0, self.params.z_channels)?;
        let (s, t) = (self.params.scale_factor, self.params.shift_factor);
        b.affine(&mean, s, -s * t)
    }

    fn decode(&self, b: &B, latent: &Tensor<B>) -> Result<Tensor<B>> {
        check_latent_shape(latent.shape(), self.params.z_channels)?;
        let (s, t) = (self.params.scale_factor, self.params.shift_factor);
        let z = b.affine(latent, 1.0 / s, t)?;
        self.decoder.forward(b, &z)
    }

    fn downscale(&self) -> usize {
        self.params.downscale()
    }

    fn latent_channels(&self) -> usize {
        self.params.z_channels
    }
}
