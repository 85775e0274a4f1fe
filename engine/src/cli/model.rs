//! `engine model init`: writes a model folder (design.md section 4) around a randomly
//! initialised transformer of a named shape, for tests, benchmarks and as the start of training.

use anyhow::{ensure, Result};
use engine::model::weights::WeightLoader;
use engine::model::{Flux, FluxParams};
use engine::sr::model_dir::{AeConfig, ConditioningMode, SrConfig};
use engine::CpuBackend;
use loaders::safetensors;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Manage super-resolution model folders.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    Init(InitArgs),
}

/// Write a model folder (model.json + transformer.safetensors) with a randomly initialised
/// transformer of a preset's shape, its channels fitted to the autoencoder: in = 2 x 4 x latent
/// channels (noisy latent and LQ, packed 2x2, concatenated), out = 4 x latent channels.
#[derive(clap::Args)]
struct InitArgs {
    /// Folder to create.
    #[arg(long)]
    out: PathBuf,
    /// Transformer shape: flux-dev, flux-small or flux-tiny.
    #[arg(long, default_value = "flux-tiny")]
    preset: String,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    init_seed: u64,
    /// Pixel-shuffle factor of the (weightless) autoencoder: latent channels 3 x F^2.
    #[arg(long, default_value_t = 2)]
    pixel_shuffle: usize,
    /// Output side / input side.
    #[arg(long, default_value_t = 4)]
    scale: usize,
    /// Default sampling steps recorded in model.json.
    #[arg(long, default_value_t = 28)]
    steps: usize,
    /// Replace files in an existing folder.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        Command::Init(a) => init(a),
    }
}

fn init(a: InitArgs) -> Result<()> {
    ensure!(a.pixel_shuffle >= 1, "--pixel-shuffle must be at least 1");
    let latent = 3 * a.pixel_shuffle * a.pixel_shuffle;
    let transformer = FluxParams { in_channels: 8 * latent, out_channels: 4 * latent, ..FluxParams::preset(&a.preset)? };
    let config = SrConfig {
        scale: a.scale,
        conditioning: ConditioningMode::Concat,
        autoencoder: AeConfig::PixelShuffle { factor: a.pixel_shuffle },
        transformer,
        steps: a.steps,
        guidance: 3.5,
        text_tokens: 1,
    };
    config.validate()?;
    let (json, weights) = (a.out.join("model.json"), a.out.join("transformer.safetensors"));
    for f in [&json, &weights] {
        ensure!(a.overwrite || !f.exists(), "{}: exists; pass --overwrite to replace it", f.display());
    }
    std::fs::create_dir_all(&a.out).map_err(|e| anyhow::anyhow!("{}: cannot create folder: {e}", a.out.display()))?;
    let b = CpuBackend::new();
    let mut w = WeightLoader::random(&b, a.init_seed).recording();
    Flux::build(&config.transformer, &mut w)?;
    let tensors = w.take_recorded();
    let list: Vec<(&str, &loaders::HostTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::write(&weights, &list, &BTreeMap::new(), a.overwrite)?;
    let text = serde_json::to_string_pretty(&config)? + "\n";
    loaders::atomic::write_atomic(&json, a.overwrite, |out| std::io::Write::write_all(out, text.as_bytes()))?;
    let params: usize = tensors.iter().map(|(_, t)| t.len()).sum();
    println!(
        "wrote {} ({} transformer, {} parameters, random init seed {}, pixel-shuffle {} autoencoder, x{})",
        a.out.display(),
        a.preset,
        super::human_count(params),
        a.init_seed,
        a.pixel_shuffle,
        a.scale
    );
    Ok(())
}
