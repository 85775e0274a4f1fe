//! `engine bench`: the transformer's sampling steps (or LoRA training steps) timed at a given
//! shape, with model FLOPs (the meta backend's count, design.md section 11), TFLOP/s, MFU, peak
//! memory and the time per op class. Under `mpirun` (a build with the `mpi` feature) every rank
//! times training steps on its own GPU with the gradients averaged over the ranks: rank 0 reports
//! the all-reduce's time and the scaling efficiency.

use super::human_bytes;
use anyhow::{ensure, Result};
use clap::ValueEnum;
use engine::ae::{AutoEncoderParams, Autoencoder, FluxAe};
use engine::backend::adamw::{AdamW, AdamWConfig};
use engine::backend::collective::{Collective, DataParallel};
use engine::backend::device::Device;
use engine::backend::profile::OpClass;
use engine::backend::profile::OpTimes;
use engine::backend::training::TrainingOps;
use engine::backend::Backend;
use engine::model::backward::Checkpointing;
use engine::model::flux::{scalars, Conditioning};
use engine::model::weights::WeightLoader;
use engine::model::Trainable;
use engine::model::{Flux, FluxInputs, FluxParams};
use engine::perf::flops::{training_step_flops, FlopCount};
use engine::perf::plan::{MemoryPlan, HOPPER_CUBLASLT_WORKSPACE};
use engine::perf::{trace_flux_ae, trace_flux_step, training_memory_estimate, AeDirection, StepShape};
use engine::train::optimizer::Optimizer;
use engine::train::params::{LoraParams, Trained};
use engine::world::{self, agree, World};
use engine::Tensor;
use loaders::{DType, HostTensor};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// Time the transformer's sampling steps at a model shape with random weights of the real shapes
/// (timings are those of the real model): latency per step and per image, TFLOP/s, MFU against
/// the card's peak dense bf16 rate and against a cuBLAS GEMM measured in the same run, peak memory,
/// and the FLOPs and time per op class (from one more step with every op timed). The autoencoder
/// is not included. With --train, LoRA training steps as `engine train` runs them: forward keeping
/// activations, backward, AdamW on the device-resident masters and moments, the adapters
/// refreshed; the bytes that cross between host and device per step are reported. Under mpirun
/// (a build with --features mpi), each rank times --train steps on the GPU of its rank on its
/// node, the gradients averaged over the ranks (NCCL) before AdamW; rank 0 reports the
/// all-reduce's time per step and the scaling efficiency.
#[derive(clap::Args)]
pub struct Args {
    /// Model shape: flux-dev, flux-small or flux-tiny.
    #[arg(long, default_value = "flux-dev")]
    shape: String,
    /// Random weights of the shape's real sizes, made on the device (zeros on the CPU). Required:
    /// benchmarking a checkpoint is not supported yet.
    #[arg(long)]
    random_weights: bool,
    /// Output image side in pixels, a multiple of 16 ((res / 16)^2 image tokens).
    #[arg(long, default_value_t = 1024)]
    res: usize,
    /// Sampling steps to time (one transformer evaluation each).
    #[arg(long, default_value_t = 28)]
    steps: usize,
    /// Images per step.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Text tokens (FLUX.1-dev: 512).
    #[arg(long, default_value_t = 512)]
    txt_tokens: usize,
    /// Time LoRA training steps instead (forward, backward, AdamW); FLOPs count the backward as
    /// twice the forward.
    #[arg(long)]
    train: bool,
    /// LoRA rank for --train.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Activation checkpointing for --train: per-block keeps each block's input and reruns its
    /// forward in the backward; off keeps every activation (faster, much more memory).
    #[arg(long, value_enum, default_value = "per-block")]
    checkpointing: Checkpointing,
    /// Also time FLUX's autoencoder at the output size (random weights of its real shapes): one
    /// encode of the image and one decode of its latent, as an upscale runs them; the latency per
    /// image then includes them.
    #[arg(long)]
    autoencoder: bool,
    /// Where to run: cuda, cpu or auto.
    #[arg(long, value_enum, default_value = "cuda")]
    device: Device,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Peak dense bf16 tensor-core rate by card name (design.md section 11), for MFU.
fn peak_bf16_flops(device: &str) -> Option<f64> {
    [("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("A800", 312e12)].into_iter().find(|(n, _)| device.contains(n)).map(|(_, f)| f)
}

pub fn run(a: Args) -> Result<()> {
    ensure!(a.res > 0 && a.res % 16 == 0, "--res {}: the output side must be a positive multiple of 16", a.res);
    ensure!(a.steps >= 1, "--steps must be at least 1");
    ensure!(a.batch >= 1, "--batch must be at least 1");
    ensure!(a.rank >= 1, "--rank must be at least 1");
    ensure!(a.random_weights, "pass --random-weights: only random weights of the shape's real sizes are benchmarked for now");
    let world = world::open(world::DEFAULT_TIMEOUT)?;
    ensure!(a.train || world.size() == 1, "{} ranks: only training steps (--train) are timed over several ranks", world.size());
    let opened = agree(world.as_ref(), a.device.open_for_rank(world.as_ref()))?;
    engine::on_opened!(opened, b => bench(b, &a, world.as_ref()))
}

/// What one timed step runs: a sampling step, or a LoRA training step.
enum Work<'w, B: TrainingOps> {
    Sample,
    Train(Box<Training<'w, B>>),
}

/// A LoRA training step's state.
struct Training<'w, B: TrainingOps> {
    trained: LoraParams<B>,
    optimizer: Optimizer<B>,
    g_out: Tensor<B>,
    checkpointing: Checkpointing,
    /// How the ranks average the gradients (nothing for one rank).
    collective: Box<dyn Collective<B> + 'w>,
}

/// Where a step's time went besides the model's passes, measured after syncs.
#[derive(Clone, Copy, Default)]
struct StepParts {
    /// AdamW and the adapters' refresh.
    optimizer_s: f64,
    /// The gradients' average over the ranks.
    allreduce_s: f64,
}

/// The model and its inputs at the benchmark's shape.
struct Setup<B: TrainingOps> {
    model: Flux<B>,
    img: Tensor<B>,
    c: Conditioning<B>,
    batch: usize,
}

impl<B: TrainingOps> Setup<B> {
    /// One step at time `t`; for training, where its time went besides the passes.
    fn step(&mut self, b: &B, work: &mut Work<B>, t: f32) -> Result<StepParts> {
        let timesteps = scalars(b, &HostTensor::from_f32(vec![self.batch], vec![t; self.batch]))?;
        match work {
            Work::Sample => {
                drop(self.model.forward(b, &self.img, &timesteps, &self.c, Trainable::Nothing)?);
                Ok(StepParts::default())
            }
            Work::Train(training) => {
                let Training { trained, optimizer, g_out, checkpointing, collective } = training.as_mut();
                let tr = trained.trainable();
                let (out, acts) = self.model.forward_train(b, &self.img, &timesteps, &self.c, tr, *checkpointing)?;
                drop(out);
                let grads = self.model.backward(b, &self.img, &self.c, tr, acts, g_out)?;
                let mut g = trained.gradients(grads)?;
                b.synchronize()?;
                let t = Instant::now();
                collective.average(b, &mut g)?;
                b.synchronize()?;
                let allreduce_s = t.elapsed().as_secs_f64();
                let t = Instant::now();
                optimizer.step(b, trained.masters_mut(), &g)?;
                drop(g);
                trained.refresh(b, &mut self.model)?;
                b.synchronize()?;
                Ok(StepParts { optimizer_s: t.elapsed().as_secs_f64(), allreduce_s })
            }
        }
    }
}

fn bench<B: DataParallel>(b: &B, a: &Args, world: &dyn World) -> Result<()> {
    let params = FluxParams::preset(&a.shape)?;
    let side = a.res / 16;
    let shape = StepShape { batch: a.batch, img_tokens: side * side, txt_tokens: a.txt_tokens };
    let dtype = b.weight_dtype().unwrap_or(DType::F32);
    // Training counts the backward as twice the forward, per class as in total.
    let trace = trace_flux_step(&params, shape, DType::BF16, a.train.then_some(a.rank))?;
    let forward = FlopCount::of(&trace);
    // What the planner predicts for this step (`engine plan`), printed beside the measured peak.
    let planned_peak = match a.train {
        false => MemoryPlan::of(&trace, HOPPER_CUBLASLT_WORKSPACE).peak(),
        true => {
            let estimate = training_memory_estimate(&params, shape, DType::BF16, Some(a.rank), HOPPER_CUBLASLT_WORKSPACE)?;
            match a.checkpointing {
                Checkpointing::PerBlock => estimate.peak_block_checkpointing(),
                Checkpointing::Off => estimate.peak_all_kept(),
            }
        }
    };
    let flops = match a.train {
        false => forward,
        true => FlopCount {
            by_class: forward.by_class.iter().map(|(&c, &f)| (c, training_step_flops(f))).collect(),
            total: training_step_flops(forward.total),
        },
    };

    let t0 = Instant::now();
    let mut model = Flux::build(&params, &mut WeightLoader::shapes_only(b, dtype))?;
    let inputs = FluxInputs::random(&params, a.batch, (side, side), a.txt_tokens, 0);
    let mut work = match a.train {
        false => Work::Sample,
        true => {
            let set = LoraParams::init(b, &model, a.rank, 0, &Default::default())?;
            let trained = LoraParams::new(b, &mut model, &set)?;
            let n = a.batch * side * side * params.in_channels;
            let g_out = b.input(&HostTensor::from_f32(vec![a.batch, side * side, params.in_channels], vec![1.0 / n as f32; n]))?;
            let optimizer = Optimizer::new(b, trained.masters(), &AdamW::new(AdamWConfig::default()))?;
            let collective = agree(world, b.collective(world))?;
            Work::Train(Box::new(Training { trained, optimizer, g_out, checkpointing: a.checkpointing, collective }))
        }
    };
    let c = Conditioning::new(b, &model, &inputs.txt, &inputs.y, inputs.guidance.as_ref(), &inputs.txt_ids, &inputs.img_ids)?;
    let mut setup = Setup { img: b.input(&inputs.img)?, model, c, batch: a.batch };
    b.synchronize()?;
    let build_s = t0.elapsed().as_secs_f64();

    setup.step(b, &mut work, 1.0)?; // warm-up: kernel JIT, cuBLASLt heuristics, the memory pool
    b.synchronize()?;
    b.reset_memory_peak()?;
    let mut times = Vec::with_capacity(a.steps);
    let (mut optimizer_s, mut allreduce_s) = (0.0, 0.0);
    let moved_before = b.bytes_moved();
    for i in 0..a.steps {
        let t = Instant::now();
        let parts = setup.step(b, &mut work, 1.0 - i as f32 / a.steps as f32)?;
        (optimizer_s, allreduce_s) = (optimizer_s + parts.optimizer_s, allreduce_s + parts.allreduce_s);
        b.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    // The ranks' all-reduce: its name, the bytes each rank reduces per step, and the share of
    // the step it takes.
    let reduced = match &work {
        Work::Train(t) if t.collective.name() != "none" => {
            let bytes = 4 * t.trained.masters().count() as u64;
            Some((t.collective.name(), bytes, allreduce_s / a.steps as f64))
        }
        _ => None,
    };
    let moved = b.bytes_moved();
    let per_step = |now: u64, before: u64| (now - before) as f64 / a.steps as f64;
    let moved = (per_step(moved.0, moved_before.0), per_step(moved.1, moved_before.1));
    let memory = b.memory_peak()?;
    // One more step with every op timed, for the breakdown; its events are kept out of the
    // timed steps above.
    let profiled = match b.start_op_timing()? {
        true => {
            let t = Instant::now();
            setup.step(b, &mut work, 0.5)?;
            let op_times = b.take_op_times()?;
            Some((op_times, t.elapsed().as_secs_f64()))
        }
        false => None,
    };
    drop(setup);

    let total: f64 = times.iter().sum();
    let mean = total / a.steps as f64;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let achieved = flops.total as f64 / mean;

    let ae = match a.autoencoder {
        true => Some(time_autoencoder(b, a, dtype)?),
        false => None,
    };

    // The cuBLAS ceiling on this machine: a square bf16 GEMM through the same backend.
    let n = if b.memory_peak()?.is_some() { 8192 } else { 512 };
    let x = b.placeholder(&[n, n], DType::BF16).and_then(|t| b.input(&b.download(&t)?))?;
    let w = b.placeholder(&[n, n], dtype)?;
    drop(b.linear(&x, &w, None)?);
    b.synchronize()?;
    let t = Instant::now();
    let reps = 10;
    for _ in 0..reps {
        drop(b.linear(&x, &w, None)?);
    }
    b.synchronize()?;
    let gemm_rate = 2.0 * (n as f64).powi(3) * reps as f64 / t.elapsed().as_secs_f64();

    if world.rank() != 0 {
        return Ok(());
    }
    let device = b.name();
    let peak = peak_bf16_flops(&device);
    println!("device      {device}");
    println!(
        "model       {} ({} double + {} single blocks, hidden {}), random weights (zeros on the CPU), built in {build_s:.1} s",
        a.shape, params.depth, params.depth_single_blocks, params.hidden_size
    );
    println!("shape       {}x{} output, {} image + {} text tokens, batch {}", a.res, a.res, side * side, a.txt_tokens, a.batch);
    if a.train {
        let mode = match a.checkpointing {
            Checkpointing::PerBlock => "per-block activation checkpointing",
            Checkpointing::Off => "every activation kept",
        };
        println!("training    LoRA rank {} on every token-path linear, {mode}, AdamW", a.rank);
    }
    println!(
        "steps       {}: {:.3} s in all, {:.1} ms per step (median {:.1} ms), {:.3} s per image",
        a.steps,
        total,
        mean * 1e3,
        median * 1e3,
        total / a.batch as f64
    );
    if a.train {
        println!("optimizer   {:.1} ms per step of that (AdamW on the device, the adapters refreshed)", optimizer_s / a.steps as f64 * 1e3);
    }
    let ranks = world.size();
    // Weak scaling: each rank's step is one process's step plus the all-reduce.
    let efficiency = reduced.map(|(_, _, s)| 1.0 - s / mean);
    if let (Some((name, bytes, seconds)), Some(efficiency)) = (reduced, efficiency) {
        // A ring all-reduce moves 2 (n - 1) / n of the buffer through each rank's link.
        let bus = 2.0 * (ranks as f64 - 1.0) / ranks as f64 * bytes as f64 / seconds;
        println!(
            "allreduce   {:.2} ms per step of that: {} of f32 gradients per rank through {name} over {ranks} rank(s), \
             {:.1} GB/s bus bandwidth",
            seconds * 1e3,
            human_bytes(bytes),
            bus / 1e9
        );
        println!(
            "scaling     {:.1}% efficiency over {ranks} rank(s) (weak scaling: a rank's step without the all-reduce over the \
             step with it); global batch {}",
            100.0 * efficiency,
            ranks * a.batch
        );
    }
    println!("transfers   {} to the device and {} back per step", human_bytes(moved.0 as u64), human_bytes(moved.1 as u64));
    if let Some(ae) = &ae {
        let rate = |flops: u64, s: f64| flops as f64 / s / 1e12;
        println!(
            "autoencoder encode {:.1} ms ({:.1} TFLOP/s), decode {:.1} ms ({:.1} TFLOP/s); with the steps {:.3} s per image",
            ae.encode.0 * 1e3,
            rate(ae.encode.1, ae.encode.0),
            ae.decode.0 * 1e3,
            rate(ae.decode.1, ae.decode.0),
            (total + ae.encode.0 + ae.decode.0) / a.batch as f64
        );
    }
    println!("flops       {:.2} TFLOP per step, {:.1} TFLOP/s achieved", flops.total as f64 / 1e12, achieved / 1e12);
    match peak {
        Some(p) => println!("mfu         {:.1}% of the card's {:.0} TFLOP/s dense bf16", 100.0 * achieved / p, p / 1e12),
        None => println!("mfu         (no peak rate known for this device)"),
    }
    println!("gemm        {:.1} TFLOP/s measured ({n}^3); the steps reach {:.1}% of it", gemm_rate / 1e12, 100.0 * achieved / gemm_rate);
    let planned =
        format!("planned {}{}", human_bytes(planned_peak), if a.train { " (engine plan --train's estimate)" } else { " (engine plan)" });
    match memory {
        Some(m) => println!(
            "memory      peak {} (allocator), {} in use (driver); {planned}",
            human_bytes(m.allocator_high_water),
            human_bytes(m.driver_used)
        ),
        None => println!("memory      not measured on this backend; {planned}"),
    }
    let breakdown = class_breakdown(&flops, profiled.as_ref());
    match &profiled {
        Some((_, step_s)) => println!("by class    (one more step, every op timed: {:.1} ms in all)", step_s * 1e3),
        None => println!("by class    (model FLOPs per step; this backend does not time its ops)"),
    }
    println!("  {:<18} {:>10} {:>6} {:>11} {:>7} {:>10}", "class", "TFLOP", "flops", "ms", "time", "TFLOP/s");
    for row in &breakdown {
        let share = |x: f64, all: f64| if all > 0.0 { format!("{:.1}%", 100.0 * x / all) } else { "-".into() };
        let (ms, time_share, rate) = match row.seconds {
            Some(s) => {
                let rate = if row.flops > 0 && s > 0.0 { format!("{:.1}", row.flops as f64 / s / 1e12) } else { "-".into() };
                (format!("{:.2}", s * 1e3), share(s, profiled.as_ref().map_or(0.0, |p| p.1)), rate)
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "  {:<18} {:>10.3} {:>6} {:>11} {:>7} {:>10}",
            row.class.name(),
            row.flops as f64 / 1e12,
            share(row.flops as f64, flops.total as f64),
            ms,
            time_share,
            rate
        );
    }

    if let Some(path) = &a.json {
        let classes: BTreeMap<&str, serde_json::Value> = breakdown
            .iter()
            .map(|r| (r.class.name(), serde_json::json!({ "flops": r.flops, "seconds": r.seconds, "ops": r.ops })))
            .collect();
        let doc = serde_json::json!({
            "device": device, "shape": a.shape, "res": a.res, "batch": a.batch, "steps": a.steps,
            "image_tokens": side * side, "text_tokens": a.txt_tokens, "parameters": trace.parameters(),
            "train": a.train, "lora_rank": a.train.then_some(a.rank),
            "checkpointing": a.train.then(|| a.checkpointing.to_possible_value().map(|v| v.get_name().to_string())),
            "seconds_per_step": mean, "seconds_per_step_median": median, "seconds_per_image": total / a.batch as f64,
            "optimizer_seconds_per_step": a.train.then(|| optimizer_s / a.steps as f64),
            "ranks": ranks, "collective": reduced.map(|r| r.0),
            "allreduce_seconds_per_step": reduced.map(|r| r.2), "allreduce_bytes_per_rank": reduced.map(|r| r.1),
            "scaling_efficiency": efficiency,
            "bytes_to_device_per_step": moved.0, "bytes_to_host_per_step": moved.1,
            "flops_per_step": flops.total, "flops_per_second": achieved,
            "mfu": peak.map(|p| achieved / p), "gemm_flops_per_second": gemm_rate, "fraction_of_gemm": achieved / gemm_rate,
            "memory_peak_bytes": memory.map(|m| m.allocator_high_water), "memory_driver_used_bytes": memory.map(|m| m.driver_used),
            "memory_planned_peak_bytes": planned_peak,
            "profiled_step_seconds": profiled.as_ref().map(|p| p.1),
            "autoencoder": ae.as_ref().map(|ae| serde_json::json!({
                "encode_seconds": ae.encode.0, "encode_flops": ae.encode.1,
                "decode_seconds": ae.decode.0, "decode_flops": ae.decode.1,
                "seconds_per_image_with_steps": (total + ae.encode.0 + ae.decode.0) / a.batch as f64,
            })),
            "flops_by_class": flops.by_class.iter().map(|(c, f)| (c.name().to_string(), *f)).collect::<BTreeMap<_, _>>(),
            "by_class": classes,
        });
        let text = serde_json::to_string_pretty(&doc)?;
        loaders::atomic::write_atomic(path, true, |f| std::io::Write::write_all(f, text.as_bytes()))?;
    }
    Ok(())
}

/// Seconds and model FLOPs of one autoencoder pass each way, for the whole batch.
struct AeTiming {
    encode: (f64, u64),
    decode: (f64, u64),
}

/// FLUX's autoencoder with random weights of its real shapes: one encode of a `res x res` image
/// batch and one decode of its latent, each after a warm-up pass.
fn time_autoencoder<B: Backend>(b: &B, a: &Args, dtype: DType) -> Result<AeTiming> {
    let params = AutoEncoderParams::default();
    let f = params.downscale();
    ensure!(a.res % f == 0, "--res {}: the autoencoder needs a multiple of {f}", a.res);
    let ae = FluxAe::build(&params, &mut WeightLoader::shapes_only(b, dtype))?;
    let n = a.batch * 3 * a.res * a.res;
    let image = b.input(&HostTensor::from_f32(vec![a.batch, 3, a.res, a.res], engine::sampler::gaussian_noise(n, 1)))?;
    let timed = |pass: &dyn Fn() -> Result<Tensor<B>>| -> Result<f64> {
        drop(pass()?);
        b.synchronize()?;
        let t = Instant::now();
        drop(pass()?);
        b.synchronize()?;
        Ok(t.elapsed().as_secs_f64())
    };
    let latent = ae.encode(b, &image)?;
    let flops =
        |direction| -> Result<u64> { Ok(FlopCount::of(&trace_flux_ae(&params, a.batch, a.res, a.res, DType::BF16, direction)?).total) };
    Ok(AeTiming {
        encode: (timed(&|| ae.encode(b, &image))?, flops(AeDirection::Encode)?),
        decode: (timed(&|| ae.decode(b, &latent))?, flops(AeDirection::Decode)?),
    })
}

/// One op class's row of the breakdown.
struct ClassRow {
    class: OpClass,
    flops: u64,
    /// Time in the profiled step; None when ops were not timed.
    seconds: Option<f64>,
    ops: Option<usize>,
}

/// Every class that has FLOPs or was timed, with both.
fn class_breakdown(flops: &FlopCount, profiled: Option<&(OpTimes, f64)>) -> Vec<ClassRow> {
    let mut classes: Vec<OpClass> = flops.by_class.keys().copied().collect();
    if let Some((times, _)) = profiled {
        classes.extend(times.keys().copied());
    }
    classes.sort();
    classes.dedup();
    classes
        .into_iter()
        .map(|class| {
            let time = profiled.map(|(times, _)| times.get(&class).copied().unwrap_or_default());
            ClassRow { class, flops: flops.class(class), seconds: time.map(|t| t.seconds), ops: time.map(|t| t.ops) }
        })
        .collect()
}
