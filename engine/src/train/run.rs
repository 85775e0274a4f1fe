//! The training run behind `engine train`: one loop for every stage. The CLI only turns flags
//! and the config file into a [`TrainConfig`] and [`RunOptions`].
//!
//! A stage is a [`StageStep`]: the loss and the gradients of one micro-batch of samples. The loop
//! around it is common: the data draw, gradient accumulation (`grad_accum` micro-batches per
//! optimiser step, gradients and logged values averaged), AdamW on the trained tensors
//! ([`Trained`]), the JSONL log, checkpoints, resume and the stop request (Ctrl-C).
//!
//! Where things live: the model, the trained tensors' f32 masters, their gradients and the
//! optimiser's moments stay on the backend's device for the whole run. A step sends up the batch
//! (its images, t and noise) and brings back the logged scalars; the trained tensors come down
//! only when a checkpoint or an export is written.
//!
//! Ranks: under `mpirun -np N` (or `srun`) N processes run one training run (`world`). Micro-batch
//! k's draws are those of one process with an N-times batch, each rank taking its contiguous
//! share (`batch::Share`); every step the ranks check in (agreeing on a stop request), average
//! their gradients through the backend's collective (NCCL on GPUs, MPI on CPUs) and their logged
//! values through the world, and take the same AdamW step. Rank 0 alone writes the log, the
//! adapter and the checkpoints. So N ranks train the model one process with the N-times batch
//! trains, up to the order of floating-point sums.
//!
//! Determinism: every random draw of micro-batch k (which images, where to crop, the degradation,
//! t and eps, the negatives' sampling noise) comes from seeds derived from (seed, k), so the data
//! position and every RNG state of a run are its step count; a checkpoint therefore holds the
//! step, the trained tensors, the optimiser state and the config, and a resumed run is
//! bit-identical to an uninterrupted one on the CPU (`checkpoint` describes the file and its
//! crash safety). On a GPU a resumed run repeats an uninterrupted one as far as its kernels are
//! deterministic: the training kernels (AdamW, the Sobolev operator, S-DPO, the field reductions)
//! and the attention backward's dQ pass reduce in fixed orders; cuBLASLt's GEMMs are
//! deterministic on one GPU for fixed shapes, algorithm and workspace.

use super::adversary::AdversaryMimic;
use super::batch::{step_seed, stream, Latent, Share};
use super::checkpoint::{self, Checkpoint, CHECKPOINT_FILE};
use super::config::{Negatives, Stage, TrainConfig};
use super::data::{Baselines, Dataset};
use super::optimizer::Optimizer;
use super::params::{FullParams, LoraParams, Trained};
use super::preference::{Losers, Preference};
use super::ranks::{ensure_same_settings, Settings};
use super::sft::{loss_operator, Sft};
use super::stage::{MicroStep, StageStep, StepContext};
use super::times::LogitNormal;
use crate::backend::adamw::{AdamW, AdamWConfig};
use crate::backend::collective::{Collective, DataParallel};
use crate::backend::device::Device;
use crate::backend::sobolev::Grid as FieldGrid;
use crate::backend::training::TrainingOps;
use crate::model::weights::WeightLoader;
use crate::model::{Adapters, Flux, LoraMode};
use crate::sr::conditioning::Conditionings;
use crate::sr::model_dir::{zero_text, SrConfig, SrModel};
use crate::world::{agree, Agreed, World};
use anyhow::{bail, ensure, Context, Result};
use loaders::lora::LoraAdapter;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// How far to run and where to write; these may change between a run and its resume.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub out: PathBuf,
    pub max_steps: u64,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
    pub resume: bool,
    pub log: Option<PathBuf>,
    /// Set (by a Ctrl-C handler) to stop after the current step, with a checkpoint.
    pub stop: Option<&'static AtomicBool>,
}

/// What the run reports as it goes.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// The model is loaded on `device` (the backend's name): `trained` parameters, starting at
    /// `step` (not 0 on resume), on `ranks` ranks averaging their gradients through `collective`.
    Started { device: String, trained: usize, step: u64, max_steps: u64, ranks: usize, collective: &'static str },
    /// An optimiser step is done.
    Step { step: u64, max_steps: u64, loss: f64 },
}

/// Runs (or resumes) `c.stage` to `opts.max_steps` on `device`, as this process's rank of
/// `world`. The start-up's failures are agreed by every rank ([`Agreed`]); `progress` hears
/// from every rank.
pub fn train(device: Device, world: &dyn World, c: &TrainConfig, opts: &RunOptions, progress: &mut dyn FnMut(Progress)) -> Result<()> {
    // A resume is checked against its checkpoint before anything is loaded.
    let checkpoint = opts.out.join(CHECKPOINT_FILE);
    let resumed = c.validate().and_then(|()| opts.resume.then(|| resume_point(c, &checkpoint, world.size())).transpose());
    let resumed = agree(world, resumed)?;
    ensure_same_settings(world, &Settings::of(c, opts, device, resumed.as_ref().map(|r| r.step)))?;
    let opened = agree(world, device.open_for_rank(world))?;
    crate::on_opened!(opened, b => train_on(b, world, c, opts, resumed, progress))
}

/// What a run trains, its starting values, and the optimiser's state to start from.
struct Start<B: TrainingOps> {
    trained: Box<dyn Trained<B>>,
    step: u64,
    optimizer: AdamW,
}

/// `train` on an opened backend: everything but the data draw runs there.
fn train_on<B: DataParallel + 'static>(
    b: &B,
    world: &dyn World,
    c: &TrainConfig,
    opts: &RunOptions,
    resumed: Option<Checkpoint>,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    let Prepared { mut model, data, mut stage, adversary, start } = agree(world, prepare(b, c, opts, resumed))?;
    let collective = agree(world, b.collective(world))?;
    let share = Share::of_rank(world.rank(), world.size(), c.batch);
    let conditionings = Conditionings::default();
    let run = Run { b, c, opts, adversary: adversary.as_ref(), data: &data, conditionings, world, collective: collective.as_ref(), share };
    run.run(&mut model, start, stage.as_mut(), progress)
}

/// What a run needs before its first step.
struct Prepared<B: TrainingOps> {
    model: SrModel<B>,
    data: Data,
    stage: Box<dyn StageStep<B>>,
    adversary: Option<Adapters<B>>,
    start: Start<B>,
}

/// The model, the data, the stage and the trained tensors of a run, loaded.
fn prepare<B: TrainingOps + 'static>(b: &B, c: &TrainConfig, opts: &RunOptions, resumed: Option<Checkpoint>) -> Result<Prepared<B>> {
    let mut model = base_model(b, c)?;
    let config = model.config.clone();
    let (scale, unit) = (config.scale, model.token_pixels());
    ensure!(
        c.crop % scale == 0 && c.crop % unit == 0,
        "--crop is {}px, but this model needs a multiple of its scale {scale} and of its {unit}px tokens",
        c.crop
    );
    let baselines = match (c.stage, c.negatives) {
        (Stage::Adversary, _) => Baselines::Required("--stage adversary"),
        (Stage::Dpo, Some(Negatives::Triples)) => Baselines::Required("--negatives triples"),
        (Stage::Dpo, None) => Baselines::IfPresent,
        _ => Baselines::Ignore,
    };
    let dataset = Dataset::open(&c.data, c.crop, scale, baselines)?;
    let side = c.crop / config.ae_factor();
    let latent = Latent(FieldGrid::new(config.latent_channels(), side, side));
    let op = loss_operator(&config.autoencoder, latent.grid(), c.sobolev_s)?;
    let adversary = match &c.adversary_lora {
        Some(path) => Some(Adapters::from_file(b, &model.flux, &LoraAdapter::open(path, config.transformer.hidden_size)?)?),
        None => None,
    };
    let stage: Box<dyn StageStep<B>> = match c.stage {
        Stage::Sft => Box::new(Sft { op }),
        Stage::Adversary => Box::new(AdversaryMimic { op, hardness: c.hardness, rho: c.rho }),
        Stage::Dpo => {
            let negatives = c.negatives.unwrap_or(if dataset.has_baselines() { Negatives::Triples } else { Negatives::Reference });
            Box::new(Preference { op, beta: c.beta, losers: Losers::Fixed { negatives, steps: c.negative_steps } })
        }
        Stage::Asdpo => {
            let losers = if c.closed_form { Losers::ClosedForm { rho: c.rho } } else { Losers::Adversary { rho: c.rho } };
            Box::new(Preference { op, beta: c.beta, losers })
        }
    };
    let start = start(b, c, &mut model, resumed, &opts.out.join(CHECKPOINT_FILE))?;
    let data = Data { dataset, crop: c.crop, scale };
    Ok(Prepared { model, data, stage, adversary, start })
}

/// The trained tensors on the device, from the checkpoint of a resumed run or fresh.
fn start<B: TrainingOps + 'static>(
    b: &B,
    c: &TrainConfig,
    model: &mut SrModel<B>,
    resumed: Option<Checkpoint>,
    path: &Path,
) -> Result<Start<B>> {
    let fresh = AdamW::new(AdamWConfig {
        lr: c.lr,
        warmup_steps: c.warmup,
        decay_steps: c.decay_steps,
        weight_decay: c.weight_decay,
        max_grad_norm: Some(c.max_grad_norm),
        ..AdamWConfig::default()
    });
    let (set, frozen) = match c.full {
        true => {
            let (set, frozen) = FullParams::init(b, model, c.base.is_none())?;
            (set, Some(frozen))
        }
        false => (LoraParams::init(b, &model.flux, c.rank, step_seed(c.seed, 0, 0), &own_trained(c, &model.config)?)?, None),
    };
    let (set, step, optimizer) = match resumed {
        Some(saved) => {
            set.ensure_same_layout(&saved.params, &path.display().to_string())?;
            (saved.params, saved.step, saved.optimizer)
        }
        None => (set, 0, fresh),
    };
    let trained: Box<dyn Trained<B>> = match frozen {
        Some(frozen) => Box::new(FullParams::new(b, model, &set, frozen)?),
        None => Box::new(LoraParams::new(b, &mut model.flux, &set)?),
    };
    Ok(Start { trained, step, optimizer })
}

/// The linears whose own weights train beside a LoRA: an imported model's img_in in SFT, whose
/// columns for the LQ latent start at zero (widened at load), unless `no_train_img_in`. The
/// later stages train a LoRA on the frozen SFT model.
fn own_trained(c: &TrainConfig, config: &SrConfig) -> Result<BTreeSet<String>> {
    let import = config.base.is_some();
    ensure!(
        import || !c.no_train_img_in,
        "--no-train-img-in: only an imported model's img_in trains, and the base is not one (`engine model import` makes them)"
    );
    Ok(match c.stage == Stage::Sft && import && !c.no_train_img_in {
        true => BTreeSet::from(["img_in".to_string()]),
        false => BTreeSet::new(),
    })
}

/// The checkpoint a resume continues from, refused if its config or its rank count differs from
/// this run's.
fn resume_point(c: &TrainConfig, path: &Path, ranks: usize) -> Result<Checkpoint> {
    if !path.exists() {
        let old = path.with_file_name("checkpoint.json");
        let hint = if old.exists() {
            format!(" ({} is the format of earlier versions, which cannot be resumed)", old.display())
        } else {
            String::new()
        };
        bail!("--resume: {} does not exist{hint}; start without --resume", path.display());
    }
    let saved = checkpoint::load(path).with_context(|| format!("--resume: cannot read {}", path.display()))?;
    if let Some((key, was, now)) = saved.config.first_difference(c) {
        bail!("--resume: '{key}' was {was} in {} but is {now} now; resume with the same value", path.display());
    }
    if saved.ranks != ranks {
        let name = |n: usize| if n == 1 { "1 rank (one process)".to_string() } else { format!("{n} ranks") };
        bail!(
            "--resume: {} was written by a run of {} (global batch {}), this run has {}; resume with {}",
            path.display(),
            name(saved.ranks),
            saved.ranks * c.batch * c.grad_accum,
            name(ranks),
            name(saved.ranks)
        );
    }
    Ok(saved)
}

/// The data of a run and how to draw from it.
struct Data {
    dataset: Dataset,
    crop: usize,
    scale: usize,
}

/// What stays fixed over a run's steps.
struct Run<'a, B: TrainingOps> {
    b: &'a B,
    c: &'a TrainConfig,
    opts: &'a RunOptions,
    adversary: Option<&'a Adapters<B>>,
    data: &'a Data,
    conditionings: Conditionings<B>,
    /// The run's ranks, and how they average gradients.
    world: &'a dyn World,
    collective: &'a dyn Collective<B>,
    /// This rank's part of every micro-batch.
    share: Share,
}

impl<B: TrainingOps + 'static> Run<'_, B> {
    /// The common loop: steps of `grad_accum` micro-batches, logs and checkpoints, from `start`.
    fn run(&self, model: &mut SrModel<B>, start: Start<B>, stage: &mut dyn StageStep<B>, progress: &mut dyn FnMut(Progress)) -> Result<()> {
        let (b, c, opts, world) = (self.b, self.c, self.opts, self.world);
        let (ranks, writes) = (world.size(), world.rank() == 0);
        let out = &opts.out;
        let checkpoint_path = out.join(CHECKPOINT_FILE);
        let Start { mut trained, mut step, optimizer } = start;
        let mut optimizer = Optimizer::new(b, trained.masters(), &optimizer)?;
        let mut log = None;
        if writes {
            std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create folder", out.display()))?;
            checkpoint::remove_leftovers(out)?;
            log = open_log(opts.log.as_deref(), opts.resume.then_some(step))?;
        }
        let collective = self.collective.name();
        let (device, count) = (b.name(), trained.masters().count());
        progress(Progress::Started { device, trained: count, step, max_steps: opts.max_steps, ranks, collective });

        // Every rank holds the same trained tensors: rank 0 writes them.
        let save = |step: u64, trained: &dyn Trained<B>, optimizer: &Optimizer<B>| -> Result<()> {
            if !writes {
                return Ok(());
            }
            trained.export(b, out)?;
            checkpoint::save(&checkpoint_path, c, step, ranks, &trained.masters().download(b)?, &optimizer.download(b, trained.masters())?)
        };
        let accum = c.grad_accum as u64;
        while step < opts.max_steps {
            let started = Instant::now();
            let moved = b.bytes_moved();
            let mut total: Option<MicroStep<B>> = None;
            for micro in 0..accum {
                let draw = step * accum + micro;
                let d = self.data;
                let samples = d.dataset.draw(self.share, d.crop, d.scale, c.augment, step_seed(c.seed, draw, stream::DATA))?;
                let times = LogitNormal { mean: c.t_mean, std: c.t_std, one: c.t_one };
                let cx = StepContext {
                    b,
                    model: &*model,
                    conditionings: &self.conditionings,
                    trained: trained.as_ref(),
                    adversary: self.adversary,
                    run_seed: c.seed,
                    draw,
                    share: self.share,
                    times,
                };
                let result = stage.micro_step(&cx, &samples)?;
                total = Some(match total {
                    None => result,
                    Some(sum) => accumulate(b, sum, result)?,
                });
            }
            let total = total.context("a step of no micro-batches")?;
            let mut grads = match accum {
                1 => total.grads,
                _ => total.grads.iter().map(|g| b.scale_items(&[1.0 / accum as f32], g)).collect::<Result<Vec<_>>>()?,
            };
            // The ranks meet (and agree whether to stop after this step), then average.
            let stop = world.check_in(step, opts.stop.is_some_and(|s| s.load(Ordering::SeqCst)))?;
            let reducing = Instant::now();
            self.collective.average(b, &mut grads)?;
            let mut logged: Vec<f64> = std::iter::once(total.loss).chain(total.metrics.iter().map(|(_, v)| *v)).collect();
            world.sum_f64(&mut logged)?;
            let reduce_s = reducing.elapsed().as_secs_f64();
            // Means over the ranks and the micro-batches.
            let mean = |v: f64| v / (ranks * accum as usize) as f64;
            let stats = optimizer.step(b, trained.masters_mut(), &grads)?;
            trained.refresh(b, &mut model.flux)?;
            step += 1;

            let mut line = serde_json::Map::new();
            line.insert("step".into(), step.into());
            line.insert("loss".into(), mean(logged[0]).into());
            line.insert("grad_norm".into(), stats.grad_norm.into());
            line.insert("lr".into(), stats.lr.into());
            let global_batch = ranks * c.batch * c.grad_accum;
            line.insert("samples_per_s".into(), (global_batch as f64 / started.elapsed().as_secs_f64()).into());
            line.insert("global_batch".into(), global_batch.into());
            if ranks > 1 {
                line.insert("ranks".into(), ranks.into());
                line.insert("allreduce_s".into(), reduce_s.into());
            }
            let (to_device, to_host) = b.bytes_moved();
            line.insert("bytes_to_device".into(), (to_device - moved.0).into());
            line.insert("bytes_to_host".into(), (to_host - moved.1).into());
            for ((key, _), value) in total.metrics.iter().zip(&logged[1..]) {
                line.insert((*key).into(), mean(*value).into());
            }
            if let Some(f) = log.as_mut() {
                writeln!(f, "{}", serde_json::Value::Object(line)).context("cannot write the log")?;
            }
            progress(Progress::Step { step, max_steps: opts.max_steps, loss: mean(logged[0]) });
            if opts.save_every > 0 && step % opts.save_every == 0 {
                save(step, trained.as_ref(), &optimizer)?;
            }
            if stop {
                save(step, trained.as_ref(), &optimizer)?;
                let saved = out.display();
                let message = format!("interrupted after step {step}: the checkpoint in {saved} is saved; --resume continues from it");
                return Err(Agreed(message).into());
            }
        }
        save(step, trained.as_ref(), &optimizer)
    }
}

/// A micro-batch's loss, gradients and metrics added to the step's sums.
fn accumulate<B: TrainingOps>(b: &B, mut total: MicroStep<B>, micro: MicroStep<B>) -> Result<MicroStep<B>> {
    ensure!(
        total.grads.len() == micro.grads.len(),
        "micro-batches disagree on the gradients: {} and {}",
        total.grads.len(),
        micro.grads.len()
    );
    total.loss += micro.loss;
    total.grads = total.grads.iter().zip(&micro.grads).map(|(sum, g)| b.axpby(&[1.0], sum, &[1.0], g)).collect::<Result<Vec<_>>>()?;
    ensure!(total.metrics.len() == micro.metrics.len(), "micro-batches disagree on the logged values");
    for ((key, sum), (other, value)) in total.metrics.iter_mut().zip(micro.metrics) {
        ensure!(*key == other, "micro-batches disagree on the logged values: '{key}' and '{other}'");
        *sum += value;
    }
    Ok(total)
}

/// The JSONL log: truncated on a fresh start; on resume from `step`, appended to after dropping
/// the lines of steps after it (written by a run that stopped before its next checkpoint).
fn open_log(path: Option<&Path>, resumed_at: Option<u64>) -> Result<Option<std::fs::File>> {
    let Some(path) = path else { return Ok(None) };
    let open = |append: bool| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("{}: cannot open the log", path.display()))
    };
    let Some(step) = resumed_at else { return open(false).map(Some) };
    if let Ok(text) = std::fs::read_to_string(path) {
        let after = |line: &str| -> bool {
            serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s > step)
        };
        if text.lines().any(after) {
            let kept: String = text.lines().filter(|l| !after(l)).map(|l| format!("{l}\n")).collect();
            loaders::atomic::write_atomic(path, true, |f| f.write_all(kept.as_bytes()))?;
        }
    }
    open(true).map(Some)
}

/// The base model with the SFT adapter (if any) merged: a folder, or a random one of a preset
/// shape with the preset's pixel-shuffle autoencoder at x4 (no file at all).
fn base_model<B: TrainingOps + 'static>(b: &B, c: &TrainConfig) -> Result<SrModel<B>> {
    let loras: Vec<&Path> = c.sft_lora.iter().map(PathBuf::as_path).collect();
    if let Some(dir) = &c.base {
        return Ok(SrModel::load(b, dir, &loras, LoraMode::Merged)?.0);
    }
    let config = SrConfig::preset(&c.preset, None)?;
    let factor = config.ae_factor();
    let adapters = loras.iter().map(|p| LoraAdapter::open(p, config.transformer.hidden_size)).collect::<Result<Vec<_>, _>>()?;
    let mut w = WeightLoader::random(b, c.init_seed).with_lora(adapters, LoraMode::Merged);
    let flux = Flux::build(&config.transformer, &mut w)?;
    w.finish()?;
    let (txt, y) = zero_text(&config);
    Ok(SrModel { config, flux, ae: Box::new(crate::ae::PixelShuffle::new(factor)), ae_tiling: Default::default(), txt, y })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Backend;
    use crate::sr::resample::resize;
    use crate::train::checkpoint::{load, LORA_FILE, MODEL_FILES};
    use crate::train::data::Sample;
    use crate::train::params::{up_name, write_adapter, LoraParams};
    use crate::train::preference::tests::randomise;
    use crate::train::sft::tests::{samples, tiny_sr_model, B};
    use std::f64::consts::LN_2;

    /// A folder of HQ images, and a prepared triples folder of the same images (LQ by area
    /// averaging, the baseline the LQ's bicubic upsample).
    fn write_data(dir: &Path) -> (PathBuf, PathBuf) {
        let (hq_only, triples) = (dir.join("images"), dir.join("triples"));
        for (i, s) in samples(2).iter().enumerate() {
            let baseline = resize(&s.lq, 32, 32);
            for (path, img) in [
                (hq_only.join(format!("{i}.png")), &s.hq),
                (triples.join(format!("hq/{i}.png")), &s.hq),
                (triples.join(format!("lq/{i}.png")), &s.lq),
                (triples.join(format!("baseline/{i}.png")), &baseline),
            ] {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                loaders::image::write_png(&path, img, true).unwrap();
            }
        }
        (hq_only, triples)
    }

    /// A random adapter for the flux-tiny base of `init_seed` 3 (`randomise`d factors).
    fn random_lora(path: &Path, seed: u64, scale: f32) {
        let mut set = LoraParams::init(&B, &tiny_sr_model(3).flux, 2, seed, &Default::default()).unwrap();
        randomise(&mut set, seed + 1, scale);
        write_adapter(path, &set, &Default::default()).unwrap();
    }

    fn config(stage: Stage, data: &Path) -> TrainConfig {
        TrainConfig {
            preset: "flux-tiny".into(),
            init_seed: 3,
            data: data.to_path_buf(),
            batch: 2,
            lr: 1e-3,
            warmup: 2,
            rank: 2,
            sobolev_s: 0.5,
            seed: 7,
            crop: 32,
            ..TrainConfig::defaults(stage)
        }
    }

    fn options(out: &Path, max_steps: u64, resume: bool) -> RunOptions {
        RunOptions { out: out.to_path_buf(), max_steps, save_every: 0, resume, log: Some(out.with_extension("jsonl")), stop: None }
    }

    fn run(c: &TrainConfig, opts: &RunOptions) -> Result<()> {
        train(Device::Cpu, &crate::world::Solo, c, opts, &mut |_| ())
    }

    fn log_lines(log: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn column(log: &Path, key: &str) -> Vec<f64> {
        log_lines(log).iter().map(|l| l[key].as_f64().unwrap_or_else(|| panic!("no '{key}' in {l}"))).collect()
    }

    /// A run of 4 steps and one stopped at 2 and resumed write the same files and log the same
    /// losses.
    fn assert_resume_is_bit_identical(dir: &Path, c: &TrainConfig) {
        let (straight, split) = (dir.join("straight"), dir.join("split"));
        run(c, &options(&straight, 4, false)).unwrap();
        run(c, &options(&split, 2, false)).unwrap();
        run(c, &options(&split, 4, true)).unwrap();
        let exported: &[&str] = if c.full { &MODEL_FILES } else { &[LORA_FILE] };
        for file in exported.iter().chain([&CHECKPOINT_FILE]) {
            assert_eq!(std::fs::read(straight.join(file)).unwrap(), std::fs::read(split.join(file)).unwrap(), "{}: {file}", c.stage);
        }
        let (a, b) = (column(&straight.with_extension("jsonl"), "loss"), column(&split.with_extension("jsonl"), "loss"));
        assert_eq!((a.len(), &a), (4, &b), "{}", c.stage);
    }

    #[test]
    fn sft_resumes_bit_identically_and_refuses_a_changed_config() {
        let dir = tempfile::tempdir().unwrap();
        let (images, _) = write_data(dir.path());
        let c = config(Stage::Sft, &images);
        assert_resume_is_bit_identical(dir.path(), &c);

        let split = dir.path().join("split");
        for (changed, key) in [
            (TrainConfig { lr: 2e-3, ..c.clone() }, "'lr'"),
            (TrainConfig { grad_accum: 2, ..c.clone() }, "'grad_accum'"),
            (TrainConfig { stage: Stage::Adversary, sft_lora: Some("x".into()), ..c.clone() }, "'stage'"),
        ] {
            let err = run(&changed, &options(&split, 8, true)).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(CHECKPOINT_FILE), "{err}");
        }

        // The written adapter reads back, in the diffusers/peft layout, as the trained factors:
        // fused qkv and linear1 split into one part per member (3 + 3 + 4 more than 13 linears).
        let adapter = LoraAdapter::open(&split.join(LORA_FILE), 64).unwrap();
        assert_eq!(adapter.layout, loaders::lora::LoraLayout::Peft);
        assert_eq!(adapter.parts.len(), 13 + 2 + 2 + 3);
        let saved = load(&split.join(CHECKPOINT_FILE)).unwrap();
        assert_eq!((saved.step, saved.optimizer.step, &saved.config), (4, 4, &c));
        for part in &adapter.parts {
            let (down, up) = (&saved.params.values[&format!("{}.lora_down", part.target)], &saved.params.values[&up_name(&part.target)]);
            let rank = part.rank();
            assert_eq!(&part.down.to_f32(), down, "{}", part.source);
            assert_eq!(part.up.to_f32(), up[part.out_offset * rank..(part.out_offset + part.out_len()) * rank], "{}", part.source);
            assert_eq!(part.scale, 1.0);
        }
    }

    /// `--full` trains every linear of a random base from adaLN-Zero: the model starts at zero
    /// output, learns, exports a model folder holding exactly the checkpoint's weights, and
    /// resumes bit-identically.
    #[test]
    fn full_training_starts_at_zero_output_learns_and_exports_a_model_folder() {
        let dir = tempfile::tempdir().unwrap();
        let (images, _) = write_data(dir.path());

        let mut sr = tiny_sr_model(3);
        let (set, frozen) = FullParams::init(&B, &mut sr, true).unwrap();
        FullParams::new(&B, &mut sr, &set, frozen).unwrap();
        let inputs = crate::model::FluxInputs::random(&sr.flux.params, 1, (4, 4), 1, 5);
        let out = sr.flux.forward_host(&B, &inputs).unwrap().to_f32();
        assert!(out.iter().all(|&v| v == 0.0), "adaLN-Zero: the output is zero");

        let c = TrainConfig { full: true, lr: 3e-3, ..config(Stage::Sft, &images) };
        let out = dir.path().join("long");
        run(&c, &options(&out, 12, false)).unwrap();
        let loss = column(&out.with_extension("jsonl"), "loss");
        let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
        assert!(mean(&loss[9..]) < 0.8 * mean(&loss[..3]), "{loss:?}");

        let (model, _) = SrModel::load(&B, &out, &[], LoraMode::Merged).unwrap();
        let weights = crate::model::params::download_weights(&B, &model.flux).unwrap();
        let saved = load(&out.join(CHECKPOINT_FILE)).unwrap();
        let every = crate::model::params::base_parameters_mut(&mut tiny_sr_model(3).flux).len();
        assert_eq!(saved.params.values.len(), every, "every linear's weight and bias");
        for (name, values) in &saved.params.values {
            assert_eq!(&weights[name].to_f32(), values, "{name}");
        }
        assert_resume_is_bit_identical(dir.path(), &c);
    }

    /// A stop request ends the run after the current step with a checkpoint that resumes.
    #[test]
    fn a_stop_request_saves_a_checkpoint_that_resumes() {
        static STOP: AtomicBool = AtomicBool::new(true);
        let dir = tempfile::tempdir().unwrap();
        let (images, _) = write_data(dir.path());
        let c = config(Stage::Sft, &images);
        let opts = RunOptions { stop: Some(&STOP), ..options(&dir.path().join("out"), 4, false) };
        let err = run(&c, &opts).unwrap_err();
        assert!(err.to_string().contains("interrupted after step 1"), "{err}");
        assert_eq!(load(&dir.path().join("out").join(CHECKPOINT_FILE)).unwrap().step, 1);
        run(&c, &RunOptions { resume: true, stop: None, ..opts }).unwrap();
        assert_eq!(load(&dir.path().join("out").join(CHECKPOINT_FILE)).unwrap().step, 4);
    }

    /// Files by name and content.
    type Files = Vec<(String, Vec<u8>)>;

    /// The state a crash leaves at each point of the save of step 3 (after a complete save of
    /// step 2): the run resumes from it and ends as an uninterrupted one does.
    #[test]
    fn a_crash_anywhere_in_a_save_resumes_bit_identically() {
        let dir = tempfile::tempdir().unwrap();
        let (images, _) = write_data(dir.path());
        let c = config(Stage::Sft, &images);
        let at = |name: &str| dir.path().join(name);
        run(&c, &options(&at("straight"), 4, false)).unwrap();
        run(&c, &options(&at("two"), 2, false)).unwrap();
        run(&c, &options(&at("three"), 3, false)).unwrap();
        let file = |run: &str, name: &str| std::fs::read(at(run).join(name)).unwrap();
        let half = |bytes: Vec<u8>| bytes[..bytes.len() / 2].to_vec();
        // (what the folder holds, what is in the log) after a crash.
        let leftovers: Vec<(&str, Files)> = vec![
            (
                "while writing the adapter",
                vec![(format!(".{LORA_FILE}.1.0.tmp"), half(file("three", LORA_FILE))), (LORA_FILE.into(), file("two", LORA_FILE))],
            ),
            ("after renaming the adapter", vec![(LORA_FILE.into(), file("three", LORA_FILE))]),
            (
                "while writing the checkpoint",
                vec![
                    (LORA_FILE.into(), file("three", LORA_FILE)),
                    (format!(".{CHECKPOINT_FILE}.1.0.tmp"), half(file("three", CHECKPOINT_FILE))),
                ],
            ),
            ("with the adapter missing", vec![]),
        ];
        for (k, (when, files)) in leftovers.into_iter().enumerate() {
            let out = at(&format!("crash{k}"));
            std::fs::create_dir_all(&out).unwrap();
            std::fs::write(out.join(CHECKPOINT_FILE), file("two", CHECKPOINT_FILE)).unwrap();
            for (name, bytes) in files {
                std::fs::write(out.join(name), bytes).unwrap();
            }
            // The log of a run that got to step 3 before the crash.
            std::fs::copy(at("three").with_extension("jsonl"), out.with_extension("jsonl")).unwrap();
            run(&c, &options(&out, 4, true)).unwrap_or_else(|e| panic!("{when}: {e:#}"));
            for name in [LORA_FILE, CHECKPOINT_FILE] {
                assert_eq!(std::fs::read(out.join(name)).unwrap(), file("straight", name), "{when}: {name}");
            }
            let names: Vec<String> =
                std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            assert_eq!(names.len(), 2, "{when}: leftovers are removed: {names:?}");
            assert_eq!(column(&out.with_extension("jsonl"), "loss"), column(&at("straight").with_extension("jsonl"), "loss"), "{when}");
        }
        let err = run(&c, &options(&at("empty"), 4, true)).unwrap_err().to_string();
        assert!(err.contains(CHECKPOINT_FILE) && err.contains("does not exist"), "{err}");
    }

    /// A stage that reports its draw: loss = draw, every gradient = draw + 1.
    struct Echo {
        draws: Vec<(u64, usize)>,
    }

    impl StageStep<CpuBackend> for Echo {
        fn micro_step(&mut self, cx: &StepContext<CpuBackend>, samples: &[Sample]) -> Result<MicroStep<CpuBackend>> {
            self.draws.push((cx.draw, samples.len()));
            let grads = cx
                .trained
                .masters()
                .tensors
                .iter()
                .map(|t| B.upload(&loaders::HostTensor::from_f32(t.shape().to_vec(), vec![(cx.draw + 1) as f32; t.elem_count()])))
                .collect::<Result<Vec<_>>>()?;
            Ok(MicroStep { loss: cx.draw as f64, grads, metrics: vec![("draw", cx.draw as f64)] })
        }
    }

    #[test]
    fn gradient_accumulation_averages_micro_batches() {
        let dir = tempfile::tempdir().unwrap();
        let (images, _) = write_data(dir.path());
        let c = TrainConfig { grad_accum: 3, max_grad_norm: 1e9, ..config(Stage::Sft, &images) };
        let b = CpuBackend::new();
        let mut model = tiny_sr_model(3);
        let set = LoraParams::init(&b, &model.flux, 2, 1, &Default::default()).unwrap();
        let count = (set.count() as f64).sqrt();
        let trained: Box<dyn Trained<CpuBackend>> = Box::new(LoraParams::new(&b, &mut model.flux, &set).unwrap());
        let data = Data { dataset: Dataset::open(&images, 32, 4, Baselines::Ignore).unwrap(), crop: 32, scale: 4 };
        let mut echo = Echo { draws: Vec::new() };
        let opts = options(&dir.path().join("out"), 2, false);
        let (world, collective, share) = (crate::world::Solo, crate::backend::collective::Alone, Share::whole(2));
        let conditionings = Conditionings::default();
        let (world, collective) = (&world, &collective);
        let run = Run { b: &b, c: &c, opts: &opts, adversary: None, data: &data, conditionings, world, collective, share };
        let start = Start { trained, step: 0, optimizer: AdamW::new(AdamWConfig::default()) };
        run.run(&mut model, start, &mut echo, &mut |_| ()).unwrap();
        assert_eq!(echo.draws, (0..6).map(|d| (d, 2)).collect::<Vec<_>>());
        let log = dir.path().join("out.jsonl");
        // Means over draws 0..3 and 3..6: losses 1 and 4, gradients 2 and 5 everywhere.
        assert_eq!(column(&log, "loss"), vec![1.0, 4.0]);
        assert_eq!(column(&log, "draw"), vec![1.0, 4.0]);
        let norms = column(&log, "grad_norm");
        assert!((norms[0] - 2.0 * count).abs() < 1e-9 * norms[0] && (norms[1] - 5.0 * count).abs() < 1e-9 * norms[1], "{norms:?}");
    }

    #[test]
    fn preference_stages_start_at_ln_2_and_resume_bit_identically() {
        let dir = tempfile::tempdir().unwrap();
        let (images, triples) = write_data(dir.path());
        let (sft, adversary) = (dir.path().join("sft.safetensors"), dir.path().join("adversary.safetensors"));
        random_lora(&sft, 11, 0.3);
        random_lora(&adversary, 12, 1.0);
        let with_sft = |stage: Stage, data: &Path| TrainConfig { sft_lora: Some(sft.clone()), ..config(stage, data) };
        let cases = [
            ("dpo-reference", TrainConfig { grad_accum: 2, ..with_sft(Stage::Dpo, &images) }),
            ("dpo-triples", with_sft(Stage::Dpo, &triples)),
            ("dpo-bicubic", TrainConfig { negatives: Some(Negatives::Bicubic), ..with_sft(Stage::Dpo, &triples) }),
            ("asdpo", TrainConfig { adversary_lora: Some(adversary.clone()), ..with_sft(Stage::Asdpo, &images) }),
            ("asdpo-closed-form", TrainConfig { closed_form: true, ..with_sft(Stage::Asdpo, &images) }),
        ];
        for (name, c) in cases {
            let case = dir.path().join(name);
            assert_resume_is_bit_identical(&case, &c);
            let lines = log_lines(&case.join("straight.jsonl"));
            let first = lines[0]["loss"].as_f64().unwrap();
            assert!((first - LN_2).abs() <= 1e-9 * LN_2, "{name}: the first step's loss is {first}, not ln 2");
            for key in ["implicit_acc", "reward_margin", "loser_deviation"] {
                assert!(lines.iter().all(|l| l[key].as_f64().is_some_and(f64::is_finite)), "{name}: {key}");
            }
            assert_eq!(lines[0]["implicit_acc"], 0.0, "{name}: dE = 0 exactly, so no pair counts as won");
            assert!(lines[1]["loss"].as_f64().unwrap() != LN_2, "{name}: the policy moves");
            let deviation = column(&case.join("straight.jsonl"), "loser_deviation");
            if name.starts_with("asdpo") {
                assert!(deviation.iter().all(|&d| d <= c.rho * (1.0 + 1e-5)), "{name}: {deviation:?}");
            }
        }
        // The negatives of a folder without baselines are the reference's restorations: triples
        // are asked for in vain.
        let c = TrainConfig { negatives: Some(Negatives::Triples), ..with_sft(Stage::Dpo, &images) };
        let err = run(&c, &options(&dir.path().join("no-triples"), 1, false)).unwrap_err().to_string();
        assert!(err.contains("baseline") && err.contains("--negatives triples"), "{err}");
    }

    /// One image, a fixed crop (the whole image): AS-DPO against a random adversary soon prefers
    /// the winners on fresh noise and times.
    #[test]
    fn asdpo_overfits_one_image() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("one");
        std::fs::create_dir_all(&images).unwrap();
        loaders::image::write_png(&images.join("0.png"), &samples(1)[0].hq, true).unwrap();
        let (sft, adversary) = (dir.path().join("sft.safetensors"), dir.path().join("adversary.safetensors"));
        random_lora(&sft, 11, 0.3);
        random_lora(&adversary, 12, 1.0);
        let c = TrainConfig {
            sft_lora: Some(sft),
            adversary_lora: Some(adversary),
            batch: 4,
            lr: 2e-3,
            warmup: 0,
            sobolev_s: 1.5,
            ..config(Stage::Asdpo, &images)
        };
        let out = dir.path().join("out");
        run(&c, &options(&out, 20, false)).unwrap();
        let accuracy = column(&out.with_extension("jsonl"), "implicit_acc");
        let last: f64 = accuracy[accuracy.len() - 5..].iter().sum::<f64>() / 5.0;
        assert!(last > 0.9, "implicit accuracy over the last 5 steps {last}: {accuracy:?}");
        let loss = column(&out.with_extension("jsonl"), "loss");
        assert!(loss[15..].iter().all(|&l| l < 0.1 * LN_2), "{loss:?}");
    }

    /// The adversary learns to mimic the baseline: its mimic loss falls, with and without the
    /// hardness term.
    #[test]
    fn the_adversary_mimic_loss_decreases() {
        let dir = tempfile::tempdir().unwrap();
        let (_, triples) = write_data(dir.path());
        let sft = dir.path().join("sft.safetensors");
        random_lora(&sft, 11, 0.3);
        for hardness in [0.0, 0.5] {
            let c = TrainConfig { sft_lora: Some(sft.clone()), lr: 1e-2, warmup: 0, hardness, ..config(Stage::Adversary, &triples) };
            let out = dir.path().join(format!("out{hardness}"));
            run(&c, &options(&out, 30, false)).unwrap();
            let mimic = column(&out.with_extension("jsonl"), "mimic");
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            let (first, last) = (mean(&mimic[..5]), mean(&mimic[25..]));
            assert!(last < 0.7 * first, "hardness {hardness}: mimic {first} -> {last}: {mimic:?}");
        }
    }
}
