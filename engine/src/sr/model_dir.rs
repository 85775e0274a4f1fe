//! A super-resolution model is a folder (design.md section 4): `model.json` names everything an
//! upscale needs, beside `transformer.safetensors` (BFL or diffusers layout), `ae.safetensors`
//! when the autoencoder has weights, `text.safetensors` with the fixed `txt`/`y` embedding when
//! it is not zeros, and LoRA adapters merged at load. An imported FLUX.1 (`engine model import`)
//! keeps its 24 GB transformer and its autoencoder where they are: `model.json`'s `base` names
//! those files with their sizes and fingerprints, checked at every load.

use crate::ae::{AutoEncoderParams, Autoencoder, FluxAe, PixelShuffle, TileOptions};
use crate::backend::Backend;
use crate::model::{load_flux_from, Flux, FluxParams, LoraMode, PartialFluxParams};
use anyhow::{ensure, Context, Result};
use loaders::fingerprint::FileStamp;
use loaders::flux::FluxCheckpoint;
use loaders::safetensors::Checkpoint;
use loaders::shards::TensorFiles;
use loaders::{DType, HostTensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SrConfig {
    /// Output side / input side.
    pub scale: usize,
    #[serde(default)]
    pub conditioning: ConditioningMode,
    /// What the flow generates at t = 0.
    #[serde(default)]
    pub flow: FlowData,
    /// What the transformer's output stands for.
    #[serde(default)]
    pub prediction: Prediction,
    pub autoencoder: AeConfig,
    pub transformer: FluxParams,
    /// Sampling steps when the user gives none.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Samples averaged per image when the user gives no number (`engine upscale --average`).
    #[serde(default = "default_average")]
    pub average: usize,
    /// Gain on the fine detail of the averaged result when the user gives none (`engine upscale
    /// --detail`, `sr::upscaler::amplify_detail`).
    #[serde(default = "default_detail")]
    pub detail: f32,
    /// The guidance value fed to guidance-distilled backbones, the same in training and sampling.
    #[serde(default = "default_guidance")]
    pub guidance: f32,
    /// Length of the all-zero text embedding used when the folder has no `text.safetensors`.
    #[serde(default = "default_text_tokens")]
    pub text_tokens: usize,
    /// Weights kept outside the folder, used instead of its `transformer.safetensors` /
    /// `ae.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseFiles>,
    /// LoRA adapters (paths relative to the folder) merged into the transformer at load, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<PathBuf>,
}

/// Files of a pretrained model that a folder refers to rather than copies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseFiles {
    /// The transformer: one file, or the shards of a sharded checkpoint, read as one (none: the
    /// folder's own `transformer.safetensors`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transformer: Vec<FileRef>,
    /// The autoencoder's weights, when it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoencoder: Option<FileRef>,
}

/// A file by path (relative to the model folder, or absolute), with the size and fingerprint it
/// had when the folder was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    pub path: PathBuf,
    pub size: u64,
    pub fingerprint: String,
}

impl FileRef {
    /// Records `path` as it is now; `path` is stored as given.
    pub fn record(path: &Path) -> Result<FileRef> {
        let stamp = FileStamp::of(path)?;
        Ok(FileRef { path: path.to_path_buf(), size: stamp.size, fingerprint: stamp.fingerprint })
    }

    /// The file's path, checked to be the file that was recorded.
    pub fn resolve(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(&self.path);
        FileStamp { size: self.size, fingerprint: self.fingerprint.clone() }
            .check(&path)
            .with_context(|| format!("{}: base file of the model", dir.join("model.json").display()))?;
        Ok(path)
    }
}

impl SrConfig {
    /// A x4 model around a preset transformer shape (`FluxParams::preset`) with the
    /// autoencoder the preset is meant for, unless `pixel_shuffle` names another: pixel-shuffle(6)
    /// for `asasr-cpu`, (2) for the others. The transformer's channels fit the autoencoder:
    /// in = 2 x 4 x latent channels (noisy latent and LQ, packed 2x2, concatenated),
    /// out = 4 x latent channels.
    pub fn preset(name: &str, pixel_shuffle: Option<usize>) -> Result<Self> {
        let transformer = FluxParams::preset(name)?;
        let factor = pixel_shuffle.unwrap_or(if name == "asasr-cpu" { 6 } else { 2 });
        ensure!(factor >= 1, "the pixel-shuffle factor must be at least 1");
        let latent = 3 * factor * factor;
        let config = SrConfig {
            scale: 4,
            conditioning: ConditioningMode::Concat,
            flow: if name == "asasr-cpu" { FlowData::Residual { scale: 4.0 } } else { FlowData::Latent },
            prediction: if name == "asasr-cpu" { Prediction::Data } else { Prediction::Velocity },
            autoencoder: AeConfig::PixelShuffle { factor },
            transformer: FluxParams { in_channels: 8 * latent, out_channels: 4 * latent, ..transformer },
            steps: if name == "asasr-cpu" { 1 } else { default_steps() },
            average: default_average(),
            detail: default_detail(),
            guidance: default_guidance(),
            text_tokens: default_text_tokens(),
            base: None,
            adapters: Vec::new(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Writes `dir/model.json` atomically.
    pub fn write(&self, dir: &Path, overwrite: bool) -> Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        loaders::atomic::write_atomic(&dir.join("model.json"), overwrite, |f| std::io::Write::write_all(f, text.as_bytes()))?;
        Ok(())
    }

    /// The transformer's weights: the base files (each checked against its record), else the
    /// folder's `transformer.safetensors`.
    pub fn open_transformer(&self, dir: &Path) -> Result<FluxCheckpoint> {
        match self.base.as_ref().filter(|b| !b.transformer.is_empty()) {
            Some(base) => {
                let files = base.transformer.iter().map(|f| f.resolve(dir)).collect::<Result<Vec<_>>>()?;
                let label = dir.join("model.json");
                Ok(FluxCheckpoint::from_files(TensorFiles::from_files(&label, &files)?)?)
            }
            None => Ok(FluxCheckpoint::open(&dir.join("transformer.safetensors"))?),
        }
    }

    /// The autoencoder's weights file: the base's, else the folder's `ae.safetensors`.
    pub fn autoencoder_file(&self, dir: &Path) -> Result<PathBuf> {
        match self.base.as_ref().and_then(|b| b.autoencoder.as_ref()) {
            Some(f) => f.resolve(dir),
            None => Ok(dir.join("ae.safetensors")),
        }
    }

    /// The same model seen from another folder: relative paths of base files and adapters made
    /// absolute, so that a model written elsewhere (`engine model merge`) still finds them.
    pub fn relocated(&self, dir: &Path) -> Result<SrConfig> {
        let absolute = |p: &Path| -> Result<PathBuf> {
            dir.join(p).canonicalize().with_context(|| format!("{}: cannot resolve '{}'", dir.join("model.json").display(), p.display()))
        };
        let mut c = self.clone();
        if let Some(base) = &mut c.base {
            for f in base.transformer.iter_mut().chain(base.autoencoder.as_mut()) {
                f.path = absolute(&f.path)?;
            }
        }
        c.adapters = c.adapters.iter().map(|p| absolute(p)).collect::<Result<_>>()?;
        Ok(c)
    }
}

/// Writes a model folder's `transformer.safetensors` (BFL layout, `tensors` cast to `dtype`) and
/// `model.json`, each atomically. Returns the parameter count.
pub fn write_model_folder(dir: &Path, config: &SrConfig, tensors: &[(&str, &HostTensor)], dtype: DType, overwrite: bool) -> Result<usize> {
    let cast: Vec<HostTensor> = tensors.iter().map(|(_, t)| t.cast(dtype)).collect();
    let list: Vec<(&str, &HostTensor)> = tensors.iter().zip(&cast).map(|((n, _), t)| (*n, t)).collect();
    loaders::safetensors::write(&dir.join("transformer.safetensors"), &list, &std::collections::BTreeMap::new(), overwrite)?;
    config.write(dir, overwrite)?;
    Ok(tensors.iter().map(|(_, t)| t.len()).sum())
}

/// The folder of the shipped model (`models/asasr-cpu` in the repository): beside the
/// executable, two levels up from it (`target/release/engine`), or in the checkout the program
/// was built from.
pub fn shipped_model_dir() -> Result<std::path::PathBuf> {
    const NAME: &str = "models/asasr-cpu";
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        candidates.push(dir.join(NAME));
        candidates.push(dir.join("../..").join(NAME));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(NAME));
    candidates.iter().find(|d| d.join("model.json").is_file()).cloned().with_context(|| {
        format!(
            "the shipped model is not where it belongs ({}); pass --model DIR",
            candidates.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}

fn default_steps() -> usize {
    28
}

fn default_guidance() -> f32 {
    3.5
}

fn default_text_tokens() -> usize {
    1
}

fn default_average() -> usize {
    1
}

fn default_detail() -> f32 {
    1.0
}

/// How the low-quality image reaches the transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConditioningMode {
    /// FLUX control variants' way: the LQ, upsampled bicubically and encoded, is packed and
    /// concatenated on channels with the noisy latent before `img_in`.
    #[default]
    Concat,
}

/// The flow's data end (t = 0), as a function of the HQ latent and the condition (the encoded
/// bicubic upsample, on the same tokens).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum FlowData {
    /// The HQ latent itself.
    #[default]
    Latent,
    /// `scale * (HQ latent - condition)`: the model generates only what bicubic misses, so its
    /// one-step estimate (the posterior mean) starts from bicubic instead of from grey, and a
    /// token's level, which LayerNorm hides from the transformer, comes from the condition. `scale`
    /// brings the residual (about 0.13 RMS on photographs in [-1, 1]) near the noise's unit scale.
    Residual { scale: f32 },
}

impl FlowData {
    /// The flow's data for `latent` under `cond` (both packed alike).
    pub fn to_flow(&self, latent: &[f32], cond: &[f32]) -> Vec<f32> {
        match *self {
            FlowData::Latent => latent.to_vec(),
            FlowData::Residual { scale } => latent.iter().zip(cond).map(|(x, c)| scale * (x - c)).collect(),
        }
    }

    /// The latent a sample `x` of the flow stands for under `cond`: the inverse of [`Self::to_flow`].
    pub fn to_latent(&self, x: &[f32], cond: &[f32]) -> Vec<f32> {
        match *self {
            FlowData::Latent => x.to_vec(),
            FlowData::Residual { scale } => x.iter().zip(cond).map(|(x, c)| c + x / scale).collect(),
        }
    }
}

/// What the transformer outputs; samplers and losses always see the velocity `eps - x0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prediction {
    /// The velocity itself (FLUX).
    #[default]
    Velocity,
    /// The clean data `x0`, turned into the velocity `(x_t - x0) / max(t, T_MIN)` (Li and He,
    /// "Back to Basics: Let Denoising Generative Models Denoise", 2025). A velocity carries the
    /// noise, all of a token's values, through the network; a narrow transformer (width near the
    /// token's values) passes it on badly and its samples keep token-shaped noise. Data lies
    /// near a low-dimensional manifold and fits through the bottleneck.
    Data,
}

impl Prediction {
    /// The smallest t divided by: below it the velocity of a data prediction would amplify the
    /// output's error without bound.
    pub const T_MIN: f32 = 0.05;

    /// The divisor of item `i`'s velocity at time `t`.
    fn divisor(t: f32) -> f32 {
        t.max(Self::T_MIN)
    }

    /// The velocity from the transformer's `output` at `x_t` (both `n` items of equal length,
    /// packed alike), item `i` at time `t[i]`.
    pub fn velocity(&self, output: Vec<f32>, x_t: &[f32], t: &[f32]) -> Vec<f32> {
        match self {
            Prediction::Velocity => output,
            Prediction::Data => {
                let per_item = output.len() / t.len();
                output.iter().zip(x_t).enumerate().map(|(i, (&x0, &x))| (x - x0) / Self::divisor(t[i / per_item])).collect()
            }
        }
    }

    /// The backward of [`Self::velocity`]: from d loss / d velocity, the gradients wrt the output
    /// and the extra gradient wrt `x_t` that the velocity's direct dependence on it adds.
    pub fn backward(&self, g_velocity: &[f32], t: &[f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        match self {
            Prediction::Velocity => (g_velocity.to_vec(), None),
            Prediction::Data => {
                let per_item = g_velocity.len() / t.len();
                let g_x: Vec<f32> = g_velocity.iter().enumerate().map(|(i, &g)| g / Self::divisor(t[i / per_item])).collect();
                (g_x.iter().map(|g| -g).collect(), Some(g_x))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AeConfig {
    PixelShuffle {
        factor: usize,
    },
    Flux {
        #[serde(default)]
        params: AutoEncoderParams,
    },
}

impl SrConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let c: SrConfig = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        c.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(c)
    }

    /// Latent channels of the autoencoder.
    pub fn latent_channels(&self) -> usize {
        match &self.autoencoder {
            AeConfig::PixelShuffle { factor } => 3 * factor * factor,
            AeConfig::Flux { params } => params.z_channels,
        }
    }

    /// Image pixels per latent cell along one side.
    pub fn ae_factor(&self) -> usize {
        match &self.autoencoder {
            AeConfig::PixelShuffle { factor } => *factor,
            AeConfig::Flux { params } => params.downscale(),
        }
    }

    /// The transformer's channels must fit the conditioning: packed latent in, twice that in.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.scale >= 1, "scale must be at least 1");
        ensure!(self.steps >= 1, "steps must be at least 1");
        ensure!(self.average >= 1, "average must be at least 1");
        ensure!(self.detail.is_finite() && self.detail >= 0.0, "detail must be a gain of 0 or more, not {}", self.detail);
        ensure!(self.text_tokens >= 1, "text_tokens must be at least 1");
        if let AeConfig::PixelShuffle { factor } = self.autoencoder {
            ensure!(factor >= 1, "autoencoder factor must be at least 1");
        }
        if let FlowData::Residual { scale } = self.flow {
            ensure!(scale.is_finite() && scale > 0.0, "flow: the residual scale must be positive, not {scale}");
        }
        let packed = 4 * self.latent_channels();
        let t = &self.transformer;
        ensure!(
            t.in_channels == 2 * packed && t.out_channels == packed,
            "transformer has in_channels {} and out_channels {}, but a {}-channel latent packed 2x2 and concatenated with the LQ needs {} and {packed}",
            t.in_channels,
            t.out_channels,
            self.latent_channels(),
            2 * packed
        );
        t.validate()
    }
}

/// Everything an upscale needs, loaded.
pub struct SrModel<B: Backend> {
    pub config: SrConfig,
    pub flux: Flux<B>,
    pub ae: Box<dyn Autoencoder<B>>,
    /// How the autoencoder's passes are cut into tiles (its defaults: the tile from the device's
    /// free memory).
    pub ae_tiling: TileOptions,
    /// `[1, Lt, context_in_dim]` and `[1, vec_in_dim]`.
    pub txt: HostTensor,
    pub y: HostTensor,
}

impl<B: Backend + 'static> SrModel<B> {
    /// Loads a model folder, with LoRA adapters on the transformer. Also returns warnings.
    pub fn load(b: &B, dir: &Path, loras: &[&Path], mode: LoraMode) -> Result<(Self, Vec<String>)> {
        ensure!(dir.is_dir(), "{}: not a model folder (expected model.json and transformer.safetensors inside)", dir.display());
        let config = SrConfig::read(&dir.join("model.json"))?;
        let (flux, warnings) = load_transformer(b, dir, &config, loras, mode)?;
        let ae: Box<dyn Autoencoder<B>> = match &config.autoencoder {
            AeConfig::PixelShuffle { factor } => Box::new(PixelShuffle::new(*factor)),
            AeConfig::Flux { params } => Box::new(FluxAe::load(b, &config.autoencoder_file(dir)?, params)?),
        };
        let text = dir.join("text.safetensors");
        let (txt, y) = if text.exists() { read_text(&text, &config.transformer)? } else { zero_text(&config) };
        Ok((SrModel { config, flux, ae, ae_tiling: TileOptions::default(), txt, y }, warnings))
    }
}

/// The transformer of the model folder `dir` (read by `config`), with the folder's adapters and
/// then `loras` on it; img_in is widened when the base stores fewer inputs than the config says.
pub fn load_transformer<B: Backend>(
    b: &B,
    dir: &Path,
    config: &SrConfig,
    loras: &[&Path],
    mode: LoraMode,
) -> Result<(Flux<B>, Vec<String>)> {
    let source = config.open_transformer(dir)?;
    let own: Vec<PathBuf> = config.adapters.iter().map(|p| dir.join(p)).collect();
    let all: Vec<&Path> = own.iter().map(PathBuf::as_path).chain(loras.iter().copied()).collect();
    load_flux_from(b, &source, &PartialFluxParams::from(&config.transformer), &all, mode)
}

/// The all-zero text conditioning of `config.text_tokens` tokens.
pub fn zero_text(config: &SrConfig) -> (HostTensor, HostTensor) {
    let t = &config.transformer;
    (
        HostTensor::from_f32(vec![1, config.text_tokens, t.context_in_dim], vec![0.0; config.text_tokens * t.context_in_dim]),
        HostTensor::from_f32(vec![1, t.vec_in_dim], vec![0.0; t.vec_in_dim]),
    )
}

/// `txt` `[Lt, ctx]` or `[1, Lt, ctx]` and `y` `[vec]` or `[1, vec]` from a file.
fn read_text(path: &Path, t: &FluxParams) -> Result<(HostTensor, HostTensor)> {
    let ckpt = Checkpoint::open(path)?;
    let get = |name: &str| -> Result<HostTensor> {
        ensure!(ckpt.info(name).is_some(), "{}: missing tensor '{name}'", path.display());
        Ok(ckpt.read(name)?)
    };
    let (txt, y) = (get("txt")?, get("y")?);
    let lt = txt.shape.iter().rev().nth(1).copied().unwrap_or(0);
    ensure!(
        matches!(txt.shape.as_slice(), [l, c] | [1, l, c] if *l == lt && *c == t.context_in_dim && lt > 0),
        "{}: 'txt' has shape {:?}, expected [tokens, {}]",
        path.display(),
        txt.shape,
        t.context_in_dim
    );
    ensure!(
        matches!(y.shape.as_slice(), [v] | [1, v] if *v == t.vec_in_dim),
        "{}: 'y' has shape {:?}, expected [{}]",
        path.display(),
        y.shape,
        t.vec_in_dim
    );
    Ok((HostTensor::from_f32(vec![1, lt, t.context_in_dim], txt.to_f32()), HostTensor::from_f32(vec![1, t.vec_in_dim], y.to_f32())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_data_round_trips_and_old_model_files_read_as_latent() {
        let cond = [0.5f32, -0.25, 1.0];
        let latent = [0.75f32, -1.0, 1.0];
        for flow in [FlowData::Latent, FlowData::Residual { scale: 4.0 }] {
            assert_eq!(flow.to_latent(&flow.to_flow(&latent, &cond), &cond), latent);
        }
        assert_eq!(FlowData::Residual { scale: 4.0 }.to_flow(&latent, &cond), [1.0, -3.0, 0.0]);
        let mut json = serde_json::to_value(SrConfig::preset("flux-tiny", None).unwrap()).unwrap();
        json.as_object_mut().unwrap().remove("flow");
        assert_eq!(serde_json::from_value::<SrConfig>(json).unwrap().flow, FlowData::Latent);
        let mut bad = SrConfig::preset("asasr-cpu", None).unwrap();
        assert_eq!(bad.flow, FlowData::Residual { scale: 4.0 });
        assert_eq!(bad.prediction, Prediction::Data);
        bad.flow = FlowData::Residual { scale: 0.0 };
        assert!(bad.validate().unwrap_err().to_string().contains("residual scale"));
    }

    /// A data prediction x0 at x_t gives the velocity of the straight line through both, with
    /// the divisor floored at T_MIN; its backward is that linear map's transpose.
    #[test]
    fn a_data_prediction_is_the_velocity_of_the_line_through_it() {
        let (output, x_t, t) = (vec![1.0f32, 2.0, 3.0, 4.0], vec![2.0f32, 2.0, 4.0, 4.0], [0.5f32, 0.01]);
        assert_eq!(Prediction::Data.velocity(output.clone(), &x_t, &t), [2.0, 0.0, 20.0, 0.0]);
        assert_eq!(Prediction::Velocity.velocity(output, &x_t, &t), [1.0, 2.0, 3.0, 4.0]);
        let (g_out, g_x) = Prediction::Data.backward(&[1.0, 1.0, 1.0, 2.0], &t);
        assert_eq!(g_out, [-2.0, -2.0, -20.0, -40.0]);
        assert_eq!(g_x.unwrap(), [2.0, 2.0, 20.0, 40.0]);
    }
}
