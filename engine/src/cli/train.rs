//! `engine train`: LoRA fine-tuning of a super-resolution model (design.md sections 5 to 7).
//! Only `--stage sft` on the CPU exists so far; the flags map one to one onto
//! `engine::train::run::TrainConfig` (what a resume must keep) and `RunOptions` (what it may change).

use anyhow::{bail, Result};
use engine::train::run::{train_sft, RunOptions, TrainConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by SIGINT; the run checks it after each step.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    // Only an atomic store: all that is safe inside a signal handler. A second Ctrl-C exits
    // at once through the default handler.
    STOP.store(true, Ordering::SeqCst);
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Stage {
    Sft,
    Adversary,
    Dpo,
    Asdpo,
}

/// Train a LoRA on a super-resolution model from a folder of HQ images, degraded on the fly.
#[derive(clap::Args)]
pub struct Args {
    /// Which stage: sft (flow matching); adversary, dpo and asdpo are not implemented yet.
    #[arg(long, value_enum, default_value = "sft")]
    stage: Stage,
    /// Model folder to fine-tune. Without it, a random base of --preset from --init-seed.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Transformer shape of a random base: flux-dev, flux-small or flux-tiny (pixel-shuffle x4).
    #[arg(long, default_value = "flux-tiny")]
    preset: String,
    /// Seed of a random base's weights.
    #[arg(long, default_value_t = 0)]
    init_seed: u64,
    /// Folder of HQ training images (walked recursively).
    #[arg(long)]
    data: PathBuf,
    /// Output folder: lora.safetensors, checkpoint.json.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    max_steps: u64,
    /// Images per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Steps of linear learning-rate warm-up.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Decoupled AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Global gradient norm clip.
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Sobolev exponent of the loss; 0 is the MSE.
    #[arg(long, default_value_t = 0.0)]
    sobolev_s: f64,
    /// Seed of the data order, crops, degradations, t and noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// HQ crop side in pixels.
    #[arg(long, default_value_t = 64)]
    crop: usize,
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    save_every: u64,
    /// Continue from OUT/checkpoint.json; refused if any config value changed.
    #[arg(long)]
    resume: bool,
    /// JSONL log, one line per step (appended on resume).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Where to run: only cpu so far.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    if a.stage != Stage::Sft {
        bail!("--stage: only sft is implemented so far");
    }
    if a.device != "cpu" {
        bail!("--device {}: training runs on the CPU only so far (use --device cpu)", a.device);
    }
    let config = TrainConfig {
        base: a.base,
        preset: a.preset,
        init_seed: a.init_seed,
        data: a.data,
        batch: a.batch,
        lr: a.lr,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        rank: a.rank,
        sobolev_s: a.sobolev_s,
        seed: a.seed,
        crop: a.crop,
    };
    let opts = RunOptions {
        out: a.out.clone(),
        max_steps: a.max_steps,
        save_every: a.save_every,
        resume: a.resume,
        log: a.log,
        stop: Some(&STOP),
    };
    // SAFETY: the handler only stores to an atomic and resets the disposition, both
    // async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    let bar = ProgressBar::new(a.max_steps);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]").unwrap_or(ProgressStyle::default_bar()),
    );
    train_sft(&config, &opts, &mut |step, _, loss| {
        bar.set_position(step);
        bar.set_message(format!("loss {loss:.4}"));
    })?;
    bar.finish();
    println!("wrote {}", a.out.join("lora.safetensors").display());
    Ok(())
}
