//! `engine info`: what a checkpoint or LoRA file holds, without computing anything.

use super::{human_bytes, human_count};
use anyhow::Result;
use engine::model::weights::WeightSource;
use engine::model::FluxParams;
use loaders::flux::FluxCheckpoint;
use loaders::lora::LoraAdapter;
use loaders::safetensors::Checkpoint;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Describe a FLUX checkpoint (layout, inferred config, parameters, dtypes, size) or a LoRA adapter.
#[derive(clap::Args)]
pub struct Args {
    /// A .safetensors file: a FLUX transformer (BFL or diffusers layout) or a LoRA adapter.
    checkpoint: PathBuf,
    /// JSON config completing what shapes cannot tell (axes_dim, theta).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let ckpt = Checkpoint::open(&a.checkpoint)?;
    let size = ckpt.file_size();
    let is_lora = ckpt.names().any(|n| ["lora_A", "lora_B", "lora_down", "lora_up"].iter().any(|k| n.contains(k)));
    if is_lora {
        return lora_info(&ckpt, size, &a);
    }
    let flux = FluxCheckpoint::from_checkpoint(ckpt)?;
    let given = a.config.as_deref().map(FluxParams::read_partial).transpose()?.unwrap_or_default();
    let params = FluxParams::infer(&flux.shapes(), &given).map_err(|e| anyhow::anyhow!("{}: {e}", flux.origin()))?;
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut count = 0usize;
    for name in flux.names() {
        let n: usize = flux.shape(name).unwrap_or_default().iter().product();
        count += n;
        *dtypes.entry(format!("{:?}", flux.dtype(name).expect("listed name has a dtype"))).or_default() += n;
    }
    println!("file        {}", a.checkpoint.display());
    println!("kind        FLUX transformer, {} layout", flux.layout());
    println!("size        {}", human_bytes(size));
    println!("tensors     {}", flux.checkpoint().names().count());
    println!("parameters  {} ({count})", human_count(count));
    let dt: Vec<String> = dtypes.iter().map(|(d, n)| format!("{d} {:.1}%", 100.0 * *n as f64 / count.max(1) as f64)).collect();
    println!("dtypes      {}", dt.join(", "));
    println!("config      {}", serde_json::to_string(&params)?);
    Ok(())
}

fn lora_info(ckpt: &Checkpoint, size: u64, a: &Args) -> Result<()> {
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
