//! `engine model import|init|merge`: writes model folders (design.md section 4): from a
//! pretrained FLUX.1, around a randomly initialised transformer of a named shape (tests,
//! benchmarks, the start of training), or a model with LoRA adapters merged into its weights
//! (what is shipped after training).

use anyhow::{ensure, Result};
use engine::ae::AutoEncoderParams;
use engine::backend::device::Device;
use engine::model::weights::WeightLoader;
use engine::model::{Flux, LoraMode};
use engine::sr;
use engine::sr::import::{ImportOptions, TextMode};
use engine::sr::model_dir::{load_transformer, write_model_folder, AeConfig, SrConfig};
use engine::CpuBackend;
use loaders::{DType, HostTensor};
use std::path::{Path, PathBuf};

/// Manage super-resolution model folders.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    Import(ImportArgs),
    Init(InitArgs),
    Merge(MergeArgs),
}

/// Turn a pretrained FLUX.1 (dev or schnell) into a super-resolution model folder.
///
/// The folder's model.json refers to the base transformer and autoencoder where they are (path,
/// size and a fingerprint, checked at every load) instead of copying 24 GB; --copy copies them
/// in. img_in is widened for the LQ latent concatenated on channels (64 -> 128 inputs for
/// FLUX.1), the new columns zero, so the imported model's output is the base model's whatever
/// the LQ. text.safetensors holds the empty prompt's embedding as FLUX pipelines compute it (T5
/// on [eos, pad, ...] without mask, CLIP's pooled output), streamed one layer at a time.
#[derive(clap::Args)]
struct ImportArgs {
    /// A diffusers FLUX pipeline folder (model_index.json, transformer/, vae/, text_encoder/,
    /// text_encoder_2/), or one transformer checkpoint (BFL's flux1-dev.safetensors, ComfyUI's,
    /// a diffusers file or sharded transformer/ folder) with --ae, --t5 and --clip.
    source: PathBuf,
    /// Folder to create.
    #[arg(long)]
    out: PathBuf,
    /// The autoencoder: FLUX's ae.safetensors or a diffusers vae/ folder [default: the
    /// pipeline's vae/].
    #[arg(long)]
    ae: Option<PathBuf>,
    /// CLIP-L's text model: a file or a transformers folder [default: the pipeline's text_encoder/].
    #[arg(long)]
    clip: Option<PathBuf>,
    /// T5-XXL's encoder: a file, a sharded index or a transformers folder [default: the
    /// pipeline's text_encoder_2/].
    #[arg(long)]
    t5: Option<PathBuf>,
    /// The fixed text embedding: the empty prompt, or zeros (no text encoders needed).
    #[arg(long, value_enum, default_value = "empty")]
    text: TextMode,
    /// T5 tokens of the embedding (FLUX.1-dev's pipeline uses 512, schnell's 256).
    #[arg(long, default_value_t = 512)]
    text_tokens: usize,
    /// Output side / input side.
    #[arg(long, default_value_t = 4)]
    scale: usize,
    /// Default sampling steps recorded in model.json.
    #[arg(long, default_value_t = 28)]
    steps: usize,
    /// The guidance value fed to a guidance-distilled transformer (FLUX.1-dev), in training and
    /// sampling alike; unused by schnell.
    #[arg(long, default_value_t = 3.5)]
    guidance: f32,
    /// Copy the base transformer and autoencoder into the folder (self-contained, 24 GB for
    /// FLUX.1-dev) instead of referring to them.
    #[arg(long)]
    copy: bool,
    /// Where the text encoders run: auto (a CUDA GPU when usable, else the CPU), cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// Replace files in an existing folder.
    #[arg(long)]
    overwrite: bool,
}

/// Write a model folder (model.json + transformer.safetensors) with a randomly initialised
/// transformer of a preset's shape, its channels fitted to the autoencoder: in = 2 x 4 x latent
/// channels (noisy latent and LQ, packed 2x2, concatenated), out = 4 x latent channels. With
/// `--ae flux`, also ae.safetensors: FLUX's autoencoder at its real shapes (16 latent channels,
/// factor 8), randomly initialised as PyTorch initialises it. Untrained: the output is noise,
/// useful only to exercise the pipeline and to measure it.
#[derive(clap::Args)]
struct InitArgs {
    /// Folder to create.
    #[arg(long)]
    out: PathBuf,
    /// Transformer shape: flux-dev, flux-small, flux-tiny or asasr-cpu (the shipped model's).
    #[arg(long, default_value = "flux-tiny")]
    preset: String,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    init_seed: u64,
    /// Autoencoder: the weightless pixel shuffle, or FLUX's with random weights.
    #[arg(long, value_enum, default_value = "pixel-shuffle")]
    ae: AeKind,
    /// With `--ae flux`: a JSON file of BFL AutoEncoderParams fields for other shapes (omitted
    /// fields: FLUX's values).
    #[arg(long, value_name = "JSON")]
    ae_config: Option<PathBuf>,
    /// Pixel-shuffle factor of the (weightless) autoencoder, latent channels 3 x F^2 (default:
    /// the preset's, 6 for asasr-cpu and 2 for the others).
    #[arg(long, conflicts_with = "ae")]
    pixel_shuffle: Option<usize>,
    /// Output side / input side.
    #[arg(long, default_value_t = 4)]
    scale: usize,
    /// Default sampling steps recorded in model.json (default: the preset's).
    #[arg(long)]
    steps: Option<usize>,
    /// Replace files in an existing folder.
    #[arg(long)]
    overwrite: bool,
}

/// Write a model folder whose transformer has LoRA adapters merged into its weights, in bf16 or
/// f32: the model folder's other files are copied, transformer.safetensors is rewritten (BFL
/// layout).
#[derive(clap::Args)]
struct MergeArgs {
    /// Model folder to start from.
    #[arg(long)]
    model: PathBuf,
    /// LoRA adapter to merge; repeat to merge several, in order. None: the model is only
    /// rewritten in --dtype.
    #[arg(long)]
    lora: Vec<PathBuf>,
    /// Folder to create.
    #[arg(long)]
    out: PathBuf,
    /// Dtype of the written weights.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: WeightDtype,
    /// The default sampling steps written to the new model.json [default: the model's].
    #[arg(long, value_name = "N")]
    steps: Option<usize>,
    /// The default number of samples averaged per image written to the new model.json
    /// (`engine upscale --average`) [default: the model's].
    #[arg(long, value_name = "N")]
    average: Option<usize>,
    /// The default gain on the averaged result's fine detail written to the new model.json
    /// (`engine upscale --detail`) [default: the model's].
    #[arg(long, value_name = "GAIN", value_parser = super::upscale::parse_gain, allow_negative_numbers = true)]
    detail: Option<f32>,
    /// Replace files in an existing folder.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AeKind {
    PixelShuffle,
    Flux,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum WeightDtype {
    Bf16,
    F32,
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        Command::Import(a) => import(a),
        Command::Init(a) => init(a),
        Command::Merge(a) => merge(a),
    }
}

fn merge(a: MergeArgs) -> Result<()> {
    ensure!(
        a.model.canonicalize().ok() != a.out.canonicalize().ok(),
        "--out {}: is the model folder itself; write the merged model to a new folder",
        a.out.display()
    );
    let source = SrConfig::read(&a.model.join("model.json"))?;
    // The merged model is a folder of its own: the transformer and the adapters are written into
    // it, what stays outside (an imported model's autoencoder) is referred to by absolute path.
    let mut config = source.relocated(&a.model)?;
    config.adapters.clear();
    if let Some(base) = &mut config.base {
        base.transformer.clear();
    }
    config.base = config.base.filter(|b| b.autoencoder.is_some());
    if let Some(steps) = a.steps {
        ensure!(steps >= 1, "--steps {steps}: must be at least 1");
        config.steps = steps;
    }
    if let Some(average) = a.average {
        ensure!(average >= 1, "--average {average}: must be at least 1");
        config.average = average;
    }
    if let Some(detail) = a.detail {
        config.detail = detail;
    }
    let b = CpuBackend::new();
    let loras: Vec<&Path> = a.lora.iter().map(PathBuf::as_path).collect();
    let (flux, warnings) = load_transformer(&b, &a.model, &source, &loras, LoraMode::Merged)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let tensors = engine::model::params::download_weights(&b, &flux)?;

    let target = a.out.join("transformer.safetensors");
    ensure!(a.overwrite || !target.exists(), "{}: exists; pass --overwrite to replace it", target.display());
    std::fs::create_dir_all(&a.out).map_err(|e| anyhow::anyhow!("{}: cannot create folder: {e}", a.out.display()))?;
    let dtype = match a.dtype {
        WeightDtype::Bf16 => DType::BF16,
        WeightDtype::F32 => DType::F32,
    };
    let list: Vec<(&str, &HostTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let count = write_model_folder(&a.out, &config, &list, dtype, a.overwrite)?;
    // The model's other files as they are; not what else shares the folder (a training run's
    // checkpoint.safetensors, say).
    for name in ["ae.safetensors", "text.safetensors"] {
        let path = a.model.join(name);
        if path.is_file() {
            let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            loaders::atomic::write_atomic(&a.out.join(name), a.overwrite, |out| std::io::Write::write_all(out, &bytes))?;
        }
    }
    println!(
        "wrote {} ({} parameters, {} adapter(s) merged, {})",
        a.out.display(),
        super::human_count(count),
        a.lora.len(),
        if matches!(dtype, DType::BF16) { "bf16" } else { "f32" }
    );
    Ok(())
}

fn import(a: ImportArgs) -> Result<()> {
    let options = ImportOptions {
        source: a.source,
        out: a.out,
        ae: a.ae,
        clip: a.clip,
        t5: a.t5,
        text: a.text,
        text_tokens: a.text_tokens,
        scale: a.scale,
        steps: a.steps,
        guidance: a.guidance,
        copy: a.copy,
        overwrite: a.overwrite,
    };
    // The device matters only to the text encoders: do not open a GPU to write zeros.
    let done = if options.text == TextMode::Zeros {
        sr::import::import(&CpuBackend::new(), &options)?
    } else {
        engine::on_backend!(a.device, b => sr::import::import(b, &options)?)
    };
    let (c, t) = (&done.config, &done.config.transformer);
    println!(
        "wrote {}: FLUX.1 transformer ({} double + {} single blocks, {}guidance) {} ({} file(s), {}), img_in widened {} -> {} inputs, x{}",
        options.out.display(),
        t.depth,
        t.depth_single_blocks,
        if t.guidance_embed { "" } else { "no " },
        if options.copy { "copied" } else { "by reference" },
        done.base_files,
        super::human_bytes(done.base_bytes),
        done.base.in_channels,
        t.in_channels,
        c.scale
    );
    match options.text {
        TextMode::Empty => println!("text: the empty prompt, {} T5 tokens -> text.safetensors", c.text_tokens),
        TextMode::Zeros => println!("text: zeros, {} tokens", c.text_tokens),
    }
    Ok(())
}

fn init(a: InitArgs) -> Result<()> {
    let mut config = SrConfig::preset(&a.preset, a.pixel_shuffle)?;
    ensure!(a.ae_config.is_none() || a.ae == AeKind::Flux, "--ae-config describes FLUX's autoencoder: pass --ae flux with it");
    if a.ae == AeKind::Flux {
        let params = a.ae_config.as_deref().map(AutoEncoderParams::read).transpose()?.unwrap_or_default();
        let packed = 4 * params.z_channels;
        config.autoencoder = AeConfig::Flux { params };
        config.transformer.in_channels = 2 * packed;
        config.transformer.out_channels = packed;
    }
    config.scale = a.scale;
    config.steps = a.steps.unwrap_or(config.steps);
    config.validate()?;
    let (json, weights, ae) = (a.out.join("model.json"), a.out.join("transformer.safetensors"), a.out.join("ae.safetensors"));
    for f in [&json, &weights].into_iter().chain((a.ae == AeKind::Flux).then_some(&ae)) {
        ensure!(a.overwrite || !f.exists(), "{}: exists; pass --overwrite to replace it", f.display());
    }
    std::fs::create_dir_all(&a.out).map_err(|e| anyhow::anyhow!("{}: cannot create folder: {e}", a.out.display()))?;
    if let AeConfig::Flux { params } = &config.autoencoder {
        let tensors = params.random_weights(a.init_seed)?;
        let list: Vec<(&str, &HostTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        loaders::safetensors::write(&ae, &list, &std::collections::BTreeMap::new(), a.overwrite)?;
    }
    let b = CpuBackend::new();
    let mut w = WeightLoader::random(&b, a.init_seed).recording();
    Flux::build(&config.transformer, &mut w)?;
    let tensors = w.take_recorded();
    let list: Vec<(&str, &HostTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let params = write_model_folder(&a.out, &config, &list, DType::F32, a.overwrite)?;
    let autoencoder = match config.autoencoder {
        AeConfig::PixelShuffle { factor } => format!("pixel-shuffle {factor} autoencoder"),
        AeConfig::Flux { .. } => "FLUX autoencoder (random weights, ae.safetensors)".into(),
    };
    println!(
        "wrote {} ({} transformer, {} parameters, random init seed {}, {autoencoder}, x{})",
        a.out.display(),
        a.preset,
        super::human_count(params),
        a.init_seed,
        a.scale
    );
    Ok(())
}
