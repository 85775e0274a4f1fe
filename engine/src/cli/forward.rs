//! `engine forward`: one transformer evaluation from BFL's forward arguments in a file.

use anyhow::{bail, Result};
use engine::backend::device::Device;
use engine::model::{load_flux, FluxInputs, FluxParams, LoraMode};
use engine::sr::model_dir::{load_transformer, SrConfig};
use engine::Backend;
use loaders::safetensors::{self, Checkpoint};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// Run one FLUX transformer forward on inputs from a safetensors file.
///
/// The inputs file holds BFL's forward arguments by name: img [B,L,in_channels],
/// img_ids [B,L,3], txt [B,Lt,context_in_dim], txt_ids [B,Lt,3], timesteps [B] (in [0,1]),
/// y [B,vec_in_dim], and guidance [B] when the model has a guidance embedding.
/// The output file holds `out` [B,L,out_channels] in f32.
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Transformer checkpoint (BFL or diffusers key layout): a .safetensors file, a sharded
    /// checkpoint's *.safetensors.index.json or a folder holding one (diffusers' transformer/),
    /// or a super-resolution model folder (model.json; `engine model import` makes them).
    #[arg(long)]
    model: PathBuf,
    /// JSON config with BFL FluxParams field names; fields it omits are inferred from the checkpoint.
    #[arg(long)]
    config: Option<PathBuf>,
    /// LoRA adapter (diffusers/peft, kohya or BFL layout); repeat to stack several.
    #[arg(long)]
    lora: Vec<PathBuf>,
    /// Fold LoRA weights into the base at load time, or apply them beside it on every forward.
    #[arg(long, value_enum, default_value = "merged")]
    lora_mode: LoraMode,
    /// Inputs (.safetensors).
    #[arg(long)]
    inputs: PathBuf,
    /// Output file (.safetensors) to write.
    #[arg(long)]
    out: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Where to run: auto (a CUDA GPU when usable, else the CPU), cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
}

pub fn run(a: Args) -> Result<()> {
    if a.out.exists() && !a.overwrite {
        bail!("{}: output exists; pass --overwrite to replace it", a.out.display());
    }
    engine::on_backend!(a.device, b => forward(b, &a))
}

fn forward<B: Backend>(b: &B, a: &Args) -> Result<()> {
    let t0 = Instant::now();
    let loras: Vec<&std::path::Path> = a.lora.iter().map(|p| p.as_path()).collect();
    let (model, warnings) = if a.model.join("model.json").is_file() {
        if let Some(config) = &a.config {
            bail!("--config {}: {} is a model folder, whose model.json gives the config", config.display(), a.model.display());
        }
        let config = SrConfig::read(&a.model.join("model.json"))?;
        load_transformer(b, &a.model, &config, &loras, a.lora_mode)?
    } else {
        let given = a.config.as_deref().map(FluxParams::read_partial).transpose()?.unwrap_or_default();
        load_flux(b, &a.model, &given, &loras, a.lora_mode)?
    };
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let inputs = FluxInputs::read(&Checkpoint::open(&a.inputs)?)?;
    inputs.validate(&model.params).map_err(|e| anyhow::anyhow!("{}: {e}", a.inputs.display()))?;
    let loaded = t0.elapsed();
    let t1 = Instant::now();
    let out = model.forward_host(b, &inputs)?;
    let ran = t1.elapsed();
    safetensors::write(&a.out, &[("out", &out)], &BTreeMap::new(), a.overwrite)?;

    let v = out.to_f32();
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    let p = &model.params;
    println!(
        "model   {} (hidden {}, {} double + {} single blocks, {} heads){}",
        a.model.display(),
        p.hidden_size,
        p.depth,
        p.depth_single_blocks,
        p.num_heads,
        if a.lora.is_empty() { String::new() } else { format!(", {} LoRA {:?}", a.lora.len(), a.lora_mode).to_lowercase() }
    );
    println!("device  {}", b.name());
    println!("inputs  img {:?}, txt {:?}", inputs.img.shape, inputs.txt.shape);
    println!("time    load {:.3} s, forward {:.3} s", loaded.as_secs_f64(), ran.as_secs_f64());
    println!("out     {:?} f32, mean {mean:.6}, std {std:.6} -> {}", out.shape, a.out.display());
    Ok(())
}
