//! `engine model init|merge`: writes model folders (design.md section 4): around a randomly
//! initialised transformer of a named shape (tests, benchmarks, the start of training), or a
//! model with LoRA adapters merged into its weights (what is shipped after training).

use anyhow::{ensure, Result};
use engine::model::weights::WeightLoader;
use engine::model::{load_flux, Flux, LoraMode, PartialFluxParams};
use engine::ae::AutoEncoderParams;
use engine::sr::model_dir::{write_model_folder, AeConfig, SrConfig};
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
    Init(InitArgs),
    Merge(MergeArgs),
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
    let mut config = SrConfig::read(&a.model.join("model.json"))?;
    if let Some(steps) = a.steps {
        ensure!(steps >= 1, "--steps {steps}: must be at least 1");
        config.steps = steps;
    }
    if let Some(average) = a.average {
        ensure!(average >= 1, "--average {average}: must be at least 1");
        config.average = average;
    }
    let b = CpuBackend::new();
    let loras: Vec<&Path> = a.lora.iter().map(PathBuf::as_path).collect();
    let given = PartialFluxParams::from(&config.transformer);
    let (flux, warnings) = load_flux(&b, &a.model.join("transformer.safetensors"), &given, &loras, LoraMode::Merged)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let tensors = flux.download_weights(&b)?;

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
