//! `engine train`: LoRA fine-tuning of a super-resolution model (design.md sections 5 to 7), in
//! four stages that share one run loop (`engine::train::run`), on the CPU or a GPU.
//!
//! Settings come from three layers: the stage's defaults, then `--config FILE` (TOML; every key is
//! a flag's long name, `-` or `_`), then the flags given on the command line. The result is a
//! `TrainConfig` (what a resume must keep) and the run options (what it may change). Errors name
//! the flag, or the file and the key the bad value came from.
//!
//! Under `mpirun -np N` or `srun` (a build with `--features mpi`) each process is one rank of
//! the run: rank 0 prints and writes; a failure on one rank ends all of them.

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use engine::backend::device::Device;
use engine::train::config::{flag, Negatives, Stage, TrainConfig};
use engine::train::run::{train, Progress, RunOptions};
use engine::world::{self, Agreed, World};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set by SIGINT (Ctrl-C) or SIGUSR1 (which mpirun passes to every rank, and Slurm's `scancel
/// --signal=USR1` sends); the run checks it at each step, every rank agreeing with the others.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(signal: libc::c_int) {
    // Only an atomic store: all that is safe inside a signal handler. A second signal ends the
    // process at once through the default handler.
    STOP.store(true, Ordering::SeqCst);
    unsafe { libc::signal(signal, libc::SIG_DFL) };
}

/// Train a LoRA on a super-resolution model: sft (flow matching), adversary (the AMG artifact
/// adversary), dpo (S-DPO against fixed negatives) or asdpo (S-DPO against the adversary's
/// negatives). Writes OUT/lora.safetensors (diffusers/peft layout; for adversary, dpo and asdpo
/// the new adapter only, loaded on top of the SFT one: `engine upscale --lora sft.safetensors
/// --lora dpo.safetensors`) and OUT/checkpoint.safetensors.
#[derive(clap::Args, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// TOML settings: every key is a flag's long name (`-` or `_`), e.g. `grad-accum = 4`; flags on
    /// the command line override it. Relative paths in it are relative to its folder.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// sft | adversary | dpo | asdpo [default: sft].
    #[arg(long, value_enum, hide_possible_values = true)]
    stage: Option<Stage>,
    /// Model folder to fine-tune. Without it, a random base of --preset from --init-seed.
    #[arg(long, value_name = "DIR")]
    base: Option<PathBuf>,
    /// Transformer shape of a random base: flux-dev, flux-small or flux-tiny (pixel-shuffle x4)
    /// [default: flux-tiny].
    #[arg(long)]
    preset: Option<String>,
    /// Seed of a random base's weights [default: 0].
    #[arg(long)]
    init_seed: Option<u64>,
    /// The SFT adapter, merged into the base and frozen (adversary, dpo, asdpo: required; the
    /// reference is base + this adapter).
    #[arg(long, value_name = "FILE")]
    sft_lora: Option<PathBuf>,
    /// asdpo: the adversary's adapter (from --stage adversary); A_phi = base + SFT LoRA + this,
    /// frozen.
    #[arg(long, value_name = "FILE")]
    adversary_lora: Option<PathBuf>,
    /// Training data: a folder of HQ images (walked recursively, degraded on the fly), or a
    /// prepared folder DIR/hq/NAME.png, DIR/lq/NAME.png (as `engine degrade` writes them) and, for
    /// adversary and --negatives triples, DIR/baseline/NAME.png (a baseline upscaler's outputs).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Output folder: lora.safetensors, checkpoint.safetensors.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Optimiser steps to run to [default: 1000].
    #[arg(long)]
    max_steps: Option<u64>,
    /// Samples per micro-batch (preference pairs for dpo and asdpo), per rank: N ranks (mpirun -np
    /// N) train with a global batch of N x batch x grad-accum [default: 4].
    #[arg(long)]
    batch: Option<usize>,
    /// Micro-batches per optimiser step, gradients averaged [default: 1].
    #[arg(long, value_name = "N")]
    grad_accum: Option<usize>,
    /// Peak learning rate [default: 1e-4].
    #[arg(long)]
    lr: Option<f64>,
    /// Steps of linear learning-rate warm-up [default: 0].
    #[arg(long)]
    warmup: Option<u64>,
    /// The step at which a half-cosine decay of the learning rate, starting after the warm-up,
    /// reaches 0 (usually --max-steps); 0 keeps the rate constant [default: 0].
    #[arg(long, value_name = "STEP")]
    decay_steps: Option<u64>,
    /// Decoupled AdamW weight decay [default: 0].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Global gradient norm clip [default: 1].
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// LoRA rank [default: 16].
    #[arg(long)]
    rank: Option<usize>,
    /// Sobolev exponent s of the energies, 0 being the MSE [default: 0 for sft, 1.5 otherwise].
    #[arg(long, value_name = "S")]
    sobolev_s: Option<f64>,
    /// Seed of the data order, crops, degradations, t, noise and the negatives' sampling [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// HQ crop side in pixels [default: 64].
    #[arg(long)]
    crop: Option<usize>,
    /// dpo, asdpo: S-DPO's beta [default: 2000].
    #[arg(long)]
    beta: Option<f64>,
    /// asdpo (and adversary with --hardness): the Sobolev trust-region radius of a loser's
    /// deviation from the winner, ||d||_H <= rho; 0.1 is an RMS error of 0.1 on [-1, 1] at s = 0,
    /// a decent x4 restoration's error [default: 0.1].
    #[arg(long)]
    rho: Option<f64>,
    /// dpo: the losers, triples (DATA/baseline), reference (the reference's own few-step
    /// restoration of the LQ) or bicubic [default: triples when DATA has baseline/, else reference].
    #[arg(long, value_enum, hide_possible_values = true)]
    negatives: Option<Negatives>,
    /// dpo --negatives reference: Euler steps of the reference's restorations [default: 4].
    #[arg(long, value_name = "N")]
    negative_steps: Option<usize>,
    /// asdpo: losers from Proposition 1's closed form (the steepest Sobolev-ball deviation against
    /// the reference's residual energy) instead of --adversary-lora.
    #[arg(long)]
    #[serde(default)]
    closed_form: bool,
    /// adversary: weight lambda_E of the hardness term E(v_ref(x^l_t) - u^l) [default: 0].
    #[arg(long, value_name = "LAMBDA")]
    hardness: Option<f64>,
    /// sft: train every weight of the transformer, not a LoRA (a small model from scratch; a
    /// random base then starts adaLN-Zero). Writes a model folder: OUT/model.json and
    /// OUT/transformer.safetensors.
    #[arg(long)]
    #[serde(default)]
    full: bool,
    /// sft on an imported model (`engine model import`): give img_in a LoRA pair like the other
    /// linears instead of training its own weight and bias. By default they train beside the
    /// LoRA (img_in's columns for the LQ latent start at zero), and lora.safetensors carries
    /// their change as a full-rank pair on x_embedder with a lora_B bias, as BFL's control LoRAs
    /// store it. The later stages train a LoRA pair on img_in like the other linears.
    #[arg(long)]
    #[serde(default)]
    no_train_img_in: bool,
    /// HQ folders: draw each crop from a region up to twice its side, reduced by area averaging,
    /// mirrored and turned into one of the 8 orientations of the square (more distinct samples
    /// from few photographs).
    #[arg(long)]
    #[serde(default)]
    augment: bool,
    /// The flow's t is sigmoid(t-mean + t-std n), n standard normal [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    t_mean: Option<f64>,
    /// See --t-mean; larger values put more samples near t = 0 and 1 [default: 1].
    #[arg(long)]
    t_std: Option<f64>,
    /// The fraction of samples drawn at t = 1 exactly (pure noise), where the model learns the
    /// posterior mean that one-step sampling returns [default: 0].
    #[arg(long, value_name = "FRACTION")]
    t_one: Option<f64>,
    /// Save a checkpoint every N steps, 0: only at the end (and on a stop request: Ctrl-C, or
    /// SIGUSR1, which mpirun passes to every rank) [default: 0].
    #[arg(long, value_name = "N")]
    save_every: Option<u64>,
    /// Continue from OUT/checkpoint.safetensors; refused if any setting of the run changed.
    #[arg(long)]
    #[serde(default)]
    resume: bool,
    /// JSONL log, one line per step: step, loss, grad_norm, lr, samples_per_s, the bytes that
    /// crossed between host and device (bytes_to_device, bytes_to_host) and the stage's values
    /// (implicit_acc, reward_margin, ...); appended to on resume.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Where to run the training step: auto (a CUDA GPU when usable, else the CPU), cpu or cuda
    /// [default: auto]. The model, its losses, the trained tensors' master copies and the
    /// optimiser's moments stay there; the batch goes up and logged scalars come back. Each rank
    /// of an mpirun/srun launch takes the GPU of its rank on its node.
    #[arg(long)]
    device: Option<String>,
    /// Several ranks: how long a rank waits for the others (at a step, or for rank 0's
    /// checkpoint) before the run stops with an error naming the rank that did not arrive
    /// [default: 300].
    #[arg(long, value_name = "SECONDS")]
    peer_timeout: Option<u64>,
}

/// The run options' keys beside the `TrainConfig` ones, with their defaults.
#[derive(Deserialize)]
#[serde(default)]
struct RunSettings {
    out: Option<PathBuf>,
    max_steps: u64,
    save_every: u64,
    resume: bool,
    log: Option<PathBuf>,
    device: String,
    peer_timeout: u64,
}

impl Default for RunSettings {
    fn default() -> Self {
        let peer_timeout = world::DEFAULT_TIMEOUT.as_secs();
        RunSettings { out: None, max_steps: 1000, save_every: 0, resume: false, log: None, device: "auto".into(), peer_timeout }
    }
}

/// Keys whose values are paths: relative ones in a config file are relative to its folder.
const PATH_KEYS: [&str; 6] = ["base", "sft_lora", "adversary_lora", "data", "out", "log"];

/// The settings of `--config FILE` as JSON values under their `_` keys, each checked against its
/// flag's type.
fn read_config_file(path: &Path) -> Result<Map<String, Value>> {
    let name = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("{name}: cannot read the config file"))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(0, |s| text[..s.start].lines().count().max(1));
        anyhow::anyhow!("{name}:{line}: {}", e.message().trim())
    })?;
    let known = serde_json::to_value(Args::default())?;
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut out = Map::new();
    for (key, value) in table {
        let normal = key.replace('-', "_");
        if known.get(&normal).is_none() {
            bail!("{name}: unknown key '{key}' (the keys are the long names of `engine train`'s flags)");
        }
        let mut value = serde_json::to_value(&value)?;
        if let (true, Some(p)) = (PATH_KEYS.contains(&normal.as_str()), value.as_str()) {
            value = Value::String(dir.join(p).display().to_string());
        }
        let single = Value::Object(Map::from_iter([(normal.clone(), value.clone())]));
        if let Err(e) = serde_json::from_value::<Args>(single) {
            bail!("{name}: key '{key}': {e}");
        }
        if out.insert(normal, value).is_some() {
            bail!("{name}: key '{key}' is given twice (with '-' and with '_')");
        }
    }
    Ok(out)
}

/// The flags given on the command line, as JSON values under their `_` keys.
fn given_flags(a: &Args) -> Result<Map<String, Value>> {
    let Value::Object(map) = serde_json::to_value(a)? else { bail!("flags do not serialise as a map") };
    Ok(map.into_iter().filter(|(_, v)| !v.is_null() && *v != Value::Bool(false)).collect())
}

/// Defaults, then the config file, then the flags.
fn settings(a: &Args) -> Result<(TrainConfig, RunSettings)> {
    let file = a.config.as_deref().map(read_config_file).transpose()?.unwrap_or_default();
    let flags = given_flags(a)?;
    let mut given = file.clone();
    given.extend(flags.clone());
    let stage: Stage = match given.get("stage") {
        Some(v) => serde_json::from_value(v.clone())?,
        None => Stage::default(),
    };
    let Value::Object(mut all) = serde_json::to_value(TrainConfig::defaults(stage))? else {
        bail!("the defaults do not serialise as a map")
    };
    all.extend(given.clone());
    let config: TrainConfig = serde_json::from_value(Value::Object(all.clone()))?;
    let run: RunSettings = serde_json::from_value(Value::Object(all))?;
    // A bad value is named where it was given: the flag, or the file and its key.
    if let Err(e) = config.check() {
        match a.config.as_ref().filter(|_| file.contains_key(e.key) && !flags.contains_key(e.key)) {
            Some(path) => bail!("{}: key '{}': {}", path.display(), e.key, e.message),
            None => bail!("--{}: {}", flag(e.key), e.message),
        }
    }
    Ok((config, run))
}

pub fn run(a: Args) -> Result<()> {
    let (config, settings) = settings(&a)?;
    let device = Device::from_str(&settings.device, true)
        .map_err(|_| anyhow::anyhow!("--device {}: expected auto, cpu or cuda", settings.device))?;
    let out = settings.out.context("--out: no output folder given (the flag, or 'out' in the config file)")?;
    if settings.peer_timeout == 0 {
        bail!("--peer-timeout 0: a rank must be given time to reach a step");
    }
    let world = world::open(Duration::from_secs(settings.peer_timeout))?;
    let opts = RunOptions {
        out: out.clone(),
        max_steps: settings.max_steps,
        save_every: settings.save_every,
        resume: settings.resume,
        log: settings.log,
        stop: Some(&STOP),
    };
    for signal in [libc::SIGINT, libc::SIGUSR1] {
        // SAFETY: the handler only stores to an atomic and resets the disposition, both
        // async-signal-safe.
        unsafe { libc::signal(signal, on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
    // Rank 0 speaks for the run.
    let speaks = world.rank() == 0;
    let bar = if speaks { ProgressBar::new(settings.max_steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]").unwrap_or(ProgressStyle::default_bar()),
    );
    let trained = train(device, world.as_ref(), &config, &opts, &mut |p| match p {
        Progress::Started { device, trained, step, ranks, collective, .. } => {
            let kind = if config.full { "" } else { "LoRA " };
            let mut what = format!(
                "--stage {}: training {} {kind}parameters on {device}, from step {step}",
                config.stage,
                super::human_count(trained)
            );
            if ranks > 1 || collective != "none" {
                what += &format!(
                    "; {ranks} ranks ({}), gradients averaged through {collective}: global batch {ranks} ranks x {} x {} accumulated = {}",
                    world.describe(),
                    config.batch,
                    config.grad_accum,
                    ranks * config.batch * config.grad_accum
                );
            }
            if speaks {
                bar.suspend(|| println!("{what}"));
            }
            bar.set_position(step);
        }
        Progress::Step { step, loss, .. } => {
            bar.set_position(step);
            bar.set_message(format!("loss {loss:.4}"));
        }
    });
    if let Err(e) = trained {
        return end_failed_rank(world, e);
    }
    bar.finish();
    if speaks {
        let product = if config.full { out.clone() } else { out.join("lora.safetensors") };
        println!("wrote {}", product.display());
    }
    Ok(())
}

/// A failed run, on one of several ranks: a failure every rank agreed on is reported by rank 0
/// and the ranks end in order; any other is reported by the rank that met it, which ends the run
/// on every rank at once (the others may be waiting for it).
fn end_failed_rank(world: Box<dyn World>, e: anyhow::Error) -> Result<()> {
    if world.size() == 1 {
        return Err(e);
    }
    let agreed = e.downcast_ref::<Agreed>().is_some();
    if !agreed {
        super::print_error(&format!("rank {}: ", world.rank()), &e);
        world.abort(1);
    }
    // Before any rank exits, so that the launcher's own report comes after it.
    if world.rank() == 0 {
        super::print_error("", &e);
    }
    drop(world);
    std::process::exit(1)
}
