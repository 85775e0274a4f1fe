//! `engine info`: what a checkpoint, LoRA file or model folder holds, without computing anything.

use super::{human_bytes, human_count};
use anyhow::{Context, Result};
use engine::model::weights::WeightSource;
use engine::model::FluxParams;
use engine::sr::model_dir::{AeConfig, SrConfig};
use loaders::flux::FluxCheckpoint;
use loaders::lora::LoraAdapter;
use loaders::safetensors::Checkpoint;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Describe a FLUX checkpoint (layout, inferred config, parameters, dtypes, size), a LoRA adapter,
/// or a super-resolution model folder (its base, widened channels, text embedding, adapters).
#[derive(clap::Args)]
pub struct Args {
    /// A .safetensors file (a FLUX transformer in BFL or diffusers layout, or a LoRA adapter), a
    /// sharded checkpoint (*.safetensors.index.json or its folder), or a model folder (model.json).
    checkpoint: PathBuf,
    /// JSON config completing what shapes cannot tell (axes_dim, theta).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    if a.checkpoint.join("model.json").is_file() {
        return model_info(&a.checkpoint);
    }
    let flux = if a.checkpoint.is_file() && a.checkpoint.extension().is_some_and(|e| e == "safetensors") {
        let ckpt = Checkpoint::open(&a.checkpoint)?;
        let is_lora = ckpt.names().any(|n| ["lora_A", "lora_B", "lora_down", "lora_up"].iter().any(|k| n.contains(k)));
        if is_lora {
            return lora_info(&ckpt, &a);
        }
        FluxCheckpoint::from_checkpoint(ckpt)?
    } else {
        FluxCheckpoint::open(&a.checkpoint)?
    };
    let given = a.config.as_deref().map(FluxParams::read_partial).transpose()?.unwrap_or_default();
    let params = FluxParams::infer(&flux.shapes(), &given).map_err(|e| anyhow::anyhow!("{}: {e}", flux.origin()))?;
    println!("file        {}", a.checkpoint.display());
    println!("kind        FLUX transformer, {} layout", flux.layout());
    transformer_lines(&flux);
    println!("config      {}", serde_json::to_string(&params)?);
    Ok(())
}

/// Size, tensors, parameters and dtypes of a transformer checkpoint.
fn transformer_lines(flux: &FluxCheckpoint) {
    let files = flux.files();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut count = 0usize;
    for name in flux.names() {
        let n: usize = flux.shape(name).unwrap_or_default().iter().product();
        count += n;
        *dtypes.entry(format!("{:?}", flux.dtype(name).expect("listed name has a dtype"))).or_default() += n;
    }
    let shards = if files.files().len() > 1 { format!(" in {} shards", files.files().len()) } else { String::new() };
    println!("size        {}{shards}", human_bytes(files.file_size()));
    println!("tensors     {}", files.len());
    println!("parameters  {} ({count})", human_count(count));
    let dt: Vec<String> = dtypes.iter().map(|(d, n)| format!("{d} {:.1}%", 100.0 * *n as f64 / count.max(1) as f64)).collect();
    println!("dtypes      {}", dt.join(", "));
}

fn model_info(dir: &Path) -> Result<()> {
    let config = SrConfig::read(&dir.join("model.json"))?;
    let t = &config.transformer;
    println!("folder      {}", dir.display());
    println!(
        "kind        super-resolution model, x{}, {} prediction, {} steps{}",
        config.scale,
        serde_json::to_string(&config.prediction)?.trim_matches('"'),
        config.steps,
        if t.guidance_embed { format!(", guidance {}", config.guidance) } else { String::new() }
    );
    let flux = config.open_transformer(dir)?;
    match config.base.as_ref().filter(|b| !b.transformer.is_empty()) {
        Some(base) => {
            println!("base        {} layout, {} file(s), fingerprints match", flux.layout(), base.transformer.len());
            for f in &base.transformer {
                println!("              {} ({})", dir.join(&f.path).display(), human_bytes(f.size));
            }
        }
        None => println!("transformer {} ({} layout)", dir.join("transformer.safetensors").display(), flux.layout()),
    }
    transformer_lines(&flux);
    let stored = flux.shape("img_in.weight").and_then(|s| s.get(1).copied()).context("the transformer has no img_in.weight")?;
    if stored < t.in_channels {
        println!(
            "img_in      widened from {stored} to {} inputs, the new columns zero (noisy latent {} + LQ {})",
            t.in_channels,
            t.out_channels,
            t.in_channels - t.out_channels
        );
    } else {
        println!("img_in      {} inputs (noisy latent {} + LQ {})", t.in_channels, t.out_channels, t.in_channels - t.out_channels);
    }
    println!("config      {}", serde_json::to_string(t)?);
    match &config.autoencoder {
        AeConfig::PixelShuffle { factor } => println!("autoencoder pixel-shuffle({factor}), no weights"),
        AeConfig::Flux { params } => {
            println!("autoencoder FLUX KL, {} latent channels, {}", params.z_channels, config.autoencoder_file(dir)?.display())
        }
    }
    let text = dir.join("text.safetensors");
    if text.is_file() {
        let ckpt = Checkpoint::open(&text)?;
        let describe = |name: &str| -> Result<String> {
            let v = ckpt.read(name)?.to_f32();
            let rms = (v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt();
            Ok(format!("{name} {:?} (rms {rms:.4})", ckpt.info(name).expect("read succeeded").shape))
        };
        let source = ckpt.metadata().get("text").map(|s| format!(", {s}")).unwrap_or_default();
        println!("text        {}, {}{source}", describe("txt")?, describe("y")?);
    } else {
        println!("text        zeros, {} token(s)", config.text_tokens);
    }
    if config.adapters.is_empty() {
        println!("adapters    none");
    }
    for path in &config.adapters {
        let lora = LoraAdapter::open(&dir.join(path), t.hidden_size)?;
        let targets: std::collections::BTreeSet<&str> = lora.parts.iter().map(|p| p.target.as_str()).collect();
        println!(
            "adapter     {} ({} layout, rank {}, {} parameters, {} linear layers)",
            path.display(),
            lora.layout,
            lora.rank(),
            human_count(lora.parameter_count()),
            targets.len()
        );
    }
    Ok(())
}

fn lora_info(ckpt: &Checkpoint, a: &Args) -> Result<()> {
    let size = ckpt.file_size();
    // The hidden size only places split q/k/v parts inside fused targets; for a description,
    // read it from the config when given, else from the adapter's own shapes.
    let hidden = match a.config.as_deref().map(FluxParams::read_partial).transpose()?.and_then(|p| p.hidden_size) {
        Some(h) => h,
        None => ckpt
            .names()
            .find(|n| n.contains("lora_A") || n.contains("lora_down"))
            .and_then(|n| ckpt.info(n))
            .map_or(0, |i| i.shape.get(1).copied().unwrap_or(0)),
    };
    let lora = LoraAdapter::from_checkpoint(ckpt, hidden)?;
    let targets: std::collections::BTreeSet<&str> = lora.parts.iter().map(|p| p.target.as_str()).collect();
    println!("file        {}", a.checkpoint.display());
    println!("kind        LoRA adapter, {} layout", lora.layout);
    println!("size        {}", human_bytes(size));
    println!("rank        {}", lora.rank());
    println!("parameters  {} ({})", human_count(lora.parameter_count()), lora.parameter_count());
    println!("targets     {} linear layers ({} parts)", targets.len(), lora.parts.len());
    if !lora.replacements.is_empty() {
        println!("replaces    {} base tensors outright (QK-norm scales of a BFL control LoRA)", lora.replacements.len());
    }
    Ok(())
}
