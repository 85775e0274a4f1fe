//! From a pretrained FLUX.1 to a super-resolution model folder (`engine model import`): the
//! transformer and autoencoder are checked from their headers and referred to by path, size and
//! fingerprint (or copied, with `copy`); img_in is widened for the LQ channels by the loader
//! (zero columns, so the imported model's output is the base's); the fixed text embedding is the
//! empty prompt as FLUX pipelines encode it.
//!
//! Sources: a diffusers pipeline folder (`model_index.json`, `transformer/`, `vae/`,
//! `text_encoder/` = CLIP-L, `text_encoder_2/` = T5-XXL; sharded parts through their index), or a
//! single transformer checkpoint (BFL, ComfyUI's prefix or diffusers layout) with the other parts
//! named separately. FLUX.1-dev (guidance embedding) and FLUX.1-schnell (none) alike.

use super::model_dir::{AeConfig, BaseFiles, ConditioningMode, FileRef, FlowData, Prediction, SrConfig};
use crate::ae::{AutoEncoderParams, FluxAe};
use crate::backend::Backend;
use crate::model::weights::{WeightLoader, WeightSource};
use crate::model::{Flux, FluxParams, PartialFluxParams};
use crate::perf::meta::MetaBackend;
use crate::text::{ClipText, T5Encoder};
use anyhow::{bail, ensure, Context, Result};
use loaders::ae::AeCheckpoint;
use loaders::flux::FluxCheckpoint;
use loaders::shards::TensorFiles;
use loaders::{DType, HostTensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `text.safetensors` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TextMode {
    /// The empty prompt through T5 and CLIP, as FLUX pipelines compute it.
    Empty,
    /// Zeros (diffusers' control training's convention): no file, `text_tokens` zero tokens.
    Zeros,
}

#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub source: PathBuf,
    pub out: PathBuf,
    pub ae: Option<PathBuf>,
    pub clip: Option<PathBuf>,
    pub t5: Option<PathBuf>,
    pub text: TextMode,
    pub text_tokens: usize,
    pub scale: usize,
    pub steps: usize,
    pub guidance: f32,
    /// Copy the base files into the folder instead of referring to them.
    pub copy: bool,
    pub overwrite: bool,
}

/// Where each part of the pretrained model is.
#[derive(Debug)]
struct Parts {
    transformer: PathBuf,
    ae: PathBuf,
    /// diffusers' `vae/config.json`; FLUX's own values without it.
    ae_config: Option<PathBuf>,
    t5: Option<PathBuf>,
    clip: Option<PathBuf>,
}

impl Parts {
    fn find(o: &ImportOptions) -> Result<Parts> {
        let src = &o.source;
        ensure!(src.exists(), "{}: no such file or folder", src.display());
        let needs_text = o.text == TextMode::Empty;
        if src.join("model_index.json").is_file() {
            let index_path = src.join("model_index.json");
            let text = std::fs::read_to_string(&index_path).with_context(|| format!("{}: cannot read", index_path.display()))?;
            let index: BTreeMap<String, serde_json::Value> =
                serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", index_path.display()))?;
            let class = index.get("_class_name").and_then(|c| c.as_str()).unwrap_or("");
            ensure!(class.starts_with("Flux"), "{}: a {class} pipeline, not a FLUX one", index_path.display());
            let folder = |name: &str| -> Result<PathBuf> {
                let dir = src.join(name);
                ensure!(dir.is_dir(), "{}: missing (a FLUX pipeline keeps its {name} there)", dir.display());
                Ok(dir)
            };
            let ae = match &o.ae {
                Some(ae) => ae.clone(),
                None => folder("vae")?,
            };
            let t5 = if needs_text { Some(o.t5.clone().map_or_else(|| folder("text_encoder_2"), Ok)?) } else { None };
            let clip = if needs_text { Some(o.clip.clone().map_or_else(|| folder("text_encoder"), Ok)?) } else { None };
            let (ae, ae_config) = autoencoder_file(&ae)?;
            return Ok(Parts { transformer: folder("transformer")?, ae, ae_config, t5, clip });
        }
        let ae = o.ae.as_ref().with_context(|| {
            format!(
                "{}: one transformer checkpoint; name its autoencoder with --ae (FLUX's ae.safetensors, or a diffusers vae/ folder)",
                src.display()
            )
        })?;
        if needs_text && (o.t5.is_none() || o.clip.is_none()) {
            bail!(
                "{}: one transformer checkpoint; --text empty needs --t5 and --clip (a pipeline's text_encoder_2/ and text_encoder/, or T5-XXL and CLIP-L files), or use --text zeros",
                src.display()
            );
        }
        let (ae, ae_config) = autoencoder_file(ae)?;
        Ok(Parts { transformer: src.clone(), ae, ae_config, t5: o.t5.clone(), clip: o.clip.clone() })
    }
}

/// The autoencoder's weights file and, for a diffusers `vae/` folder, its config.
fn autoencoder_file(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let files = TensorFiles::open(path)?;
    ensure!(files.files().len() == 1, "{}: the autoencoder must be one .safetensors file", path.display());
    let config = path.is_dir().then(|| path.join("config.json")).filter(|c| c.is_file());
    Ok((files.files()[0].path().to_path_buf(), config))
}

/// What an import made, for the CLI to report.
pub struct Imported {
    pub config: SrConfig,
    /// The base transformer's config as stored (before widening).
    pub base: FluxParams,
    pub base_files: usize,
    pub base_bytes: u64,
}

/// Writes the model folder `o.out`; the text encoders (when `o.text` is `Empty`) run on `b`.
pub fn import<B: Backend>(b: &B, o: &ImportOptions) -> Result<Imported> {
    ensure!(o.text_tokens >= 1, "--text-tokens must be at least 1");
    let parts = Parts::find(o)?;
    let targets = ["model.json", "text.safetensors"].map(|f| o.out.join(f));
    if let Some(t) = targets.iter().find(|t| t.exists() && !o.overwrite) {
        bail!("{}: exists; pass --overwrite to replace it", t.display());
    }

    // The transformer and autoencoder, verified from their headers only: every tensor FLUX has,
    // of its shape, and nothing else.
    let meta = MetaBackend::new(DType::BF16);
    let flux = FluxCheckpoint::open(&parts.transformer)?;
    let base = FluxParams::infer(&flux.shapes(), &PartialFluxParams::default()).map_err(|e| anyhow::anyhow!("{}: {e}", flux.origin()))?;
    let mut w = WeightLoader::headers_of(&meta, &flux);
    Flux::build(&base, &mut w)?;
    w.finish()?;
    let ae_params = match &parts.ae_config {
        Some(c) => AutoEncoderParams::from_diffusers_config(c)?,
        None => AutoEncoderParams::default(),
    };
    let ae = AeCheckpoint::open(&parts.ae)?;
    let mut w = WeightLoader::headers_of(&meta, &ae);
    FluxAe::build(&ae_params, &mut w).and_then(|_| w.finish()).with_context(|| format!("{}: autoencoder", parts.ae.display()))?;
    let packed = 4 * ae_params.z_channels;
    ensure!(
        base.out_channels == packed && (base.in_channels == packed || base.in_channels == 2 * packed),
        "{}: the autoencoder has {} latent channels ({packed} packed 2x2), but the transformer {} takes {} and gives {} channels",
        parts.ae.display(),
        ae_params.z_channels,
        parts.transformer.display(),
        base.in_channels,
        base.out_channels
    );

    let text = match (&parts.t5, &parts.clip) {
        (Some(t5), Some(clip)) => Some(encode_empty_prompt(b, t5, clip, &base, o.text_tokens)?),
        _ => None,
    };

    std::fs::create_dir_all(&o.out).with_context(|| format!("{}: cannot create the folder", o.out.display()))?;
    let shards: Vec<PathBuf> = flux.files().files().iter().map(|f| f.path().to_path_buf()).collect();
    let base_files = if o.copy { copy_base(&shards, &parts.ae, &o.out, o.overwrite)? } else { refer_to(&shards, &parts.ae)? };
    if let Some((txt, y, source)) = &text {
        let metadata = BTreeMap::from([("text".to_string(), source.clone())]);
        loaders::safetensors::write(&o.out.join("text.safetensors"), &[("txt", txt), ("y", y)], &metadata, o.overwrite)?;
    } else if o.overwrite && targets[1].exists() {
        std::fs::remove_file(&targets[1]).with_context(|| format!("{}: cannot remove", targets[1].display()))?;
    }
    let config = SrConfig {
        scale: o.scale,
        conditioning: ConditioningMode::Concat,
        flow: FlowData::Latent,
        prediction: Prediction::Velocity,
        autoencoder: AeConfig::Flux { params: ae_params },
        transformer: FluxParams { in_channels: 2 * packed, ..base.clone() },
        steps: o.steps,
        average: 1,
        detail: 1.0,
        guidance: o.guidance,
        text_tokens: o.text_tokens,
        base: base_files,
        adapters: Vec::new(),
    };
    config.validate()?;
    config.write(&o.out, o.overwrite)?;
    Ok(Imported { config, base, base_files: shards.len(), base_bytes: flux.files().file_size() })
}

/// The empty prompt's `txt` `[tokens, ctx]` and `y` `[vec]`, with a line saying where they came from.
fn encode_empty_prompt<B: Backend>(
    b: &B,
    t5: &Path,
    clip: &Path,
    base: &FluxParams,
    tokens: usize,
) -> Result<(HostTensor, HostTensor, String)> {
    let t5_model = T5Encoder::open(t5)?;
    let clip_model = ClipText::open(clip)?;
    ensure!(
        t5_model.config.d_model == base.context_in_dim,
        "{}: T5's width {} is not the transformer's context_in_dim {}",
        t5.display(),
        t5_model.config.d_model,
        base.context_in_dim
    );
    ensure!(
        clip_model.config.hidden == base.vec_in_dim,
        "{}: CLIP's width {} is not the transformer's vec_in_dim {}",
        clip.display(),
        clip_model.config.hidden,
        base.vec_in_dim
    );
    let e = crate::text::empty_prompt(b, &t5_model, &clip_model, tokens)?;
    let source = format!(
        "empty prompt: T5 encoder ({} layers) on {tokens} tokens [eos, pad, ...], no mask; CLIP text model ({} layers) pooled at the end token",
        t5_model.config.layers, clip_model.config.layers
    );
    Ok((e.txt, e.y, source))
}

/// The base files recorded where they are (absolute paths).
fn refer_to(shards: &[PathBuf], ae: &Path) -> Result<Option<BaseFiles>> {
    let record = |p: &Path| -> Result<FileRef> {
        let absolute = p.canonicalize().with_context(|| format!("{}: cannot resolve", p.display()))?;
        FileRef::record(&absolute)
    };
    Ok(Some(BaseFiles { transformer: shards.iter().map(|s| record(s)).collect::<Result<_>>()?, autoencoder: Some(record(ae)?) }))
}

/// The base files copied into `out`: the autoencoder as `ae.safetensors`, one transformer file
/// as `transformer.safetensors` (an ordinary model folder), shards into `transformer/` (recorded
/// by relative path).
fn copy_base(shards: &[PathBuf], ae: &Path, out: &Path, overwrite: bool) -> Result<Option<BaseFiles>> {
    let total: u64 = shards.iter().chain([&ae.to_path_buf()]).map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:30}] {bytes}/{total_bytes} {elapsed}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message("copying");
    let copy = |src: &Path, relative: &Path| -> Result<()> {
        let start = bar.position();
        loaders::atomic::copy_atomic(src, &out.join(relative), overwrite, |n| bar.set_position(start + n))?;
        Ok(())
    };
    copy(ae, Path::new("ae.safetensors"))?;
    let base = if let [single] = shards {
        copy(single, Path::new("transformer.safetensors"))?;
        None
    } else {
        std::fs::create_dir_all(out.join("transformer"))
            .with_context(|| format!("{}: cannot create", out.join("transformer").display()))?;
        let mut refs = Vec::new();
        for s in shards {
            let relative = Path::new("transformer").join(s.file_name().context("a shard has a file name")?);
            copy(s, &relative)?;
            refs.push(FileRef { path: relative.clone(), ..FileRef::record(&out.join(&relative))? });
        }
        Some(BaseFiles { transformer: refs, autoencoder: None })
    };
    bar.finish_and_clear();
    Ok(base)
}
