//! `engine bench`: the transformer's sampling steps timed at a given shape, with model FLOPs (the
//! meta backend's count, design section 11), TFLOP/s, MFU and peak memory.

use super::human_bytes;
use anyhow::{bail, ensure, Result};
use engine::backend::device::Device;
use engine::model::weights::WeightLoader;
use engine::model::{Flux, FluxInputs, FluxParams};
use engine::perf::flops::FlopCount;
use engine::perf::{trace_flux_step, StepShape};
use engine::{Backend, Tensor};
use loaders::{DType, HostTensor};
use std::path::PathBuf;
use std::time::Instant;

/// Time the transformer's sampling steps at a model shape with random weights of the real shapes
/// (timings are those of the real model): latency per step and per image, TFLOP/s, MFU against
/// the card's peak dense bf16 rate and against a cuBLAS GEMM measured in the same run, peak memory,
/// and the FLOPs per op class. The autoencoder is not included.
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
    /// Time a training step instead (forward + backward): needs the training engine.
    #[arg(long)]
    train: bool,
    /// Where to run: cuda, cpu or auto.
    #[arg(long, value_enum, default_value = "cuda")]
    device: Device,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Peak dense bf16 tensor-core rate by card name (design section 11), for MFU.
fn peak_bf16_flops(device: &str) -> Option<f64> {
    [("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("A800", 312e12)].into_iter().find(|(n, _)| device.contains(n)).map(|(_, f)| f)
}

pub fn run(a: Args) -> Result<()> {
    ensure!(a.res > 0 && a.res % 16 == 0, "--res {}: the output side must be a positive multiple of 16", a.res);
    ensure!(a.steps >= 1, "--steps must be at least 1");
    ensure!(a.batch >= 1, "--batch must be at least 1");
    ensure!(a.random_weights, "pass --random-weights: only random weights of the shape's real sizes are benchmarked for now");
    if a.train {
        bail!("--train: the training step is not benchmarked yet (the training engine is being built); time inference for now");
    }
    engine::on_backend!(a.device, b => bench(b, &a))
}

fn bench<B: Backend>(b: &B, a: &Args) -> Result<()> {
    let params = FluxParams::preset(&a.shape)?;
    let side = a.res / 16;
    let shape = StepShape { batch: a.batch, img_tokens: side * side, txt_tokens: a.txt_tokens };
    let flops = FlopCount::of(&trace_flux_step(&params, shape, DType::BF16, None)?);

    let t0 = Instant::now();
    let model = Flux::build(&params, &mut WeightLoader::shapes_only(b, b.weight_dtype().unwrap_or(DType::F32)))?;
    b.synchronize()?;
    let build_s = t0.elapsed().as_secs_f64();
    let inputs = FluxInputs::random(&params, a.batch, (side, side), a.txt_tokens, 0);
    let c = engine::model::Conditioning {
        txt: b.input(&inputs.txt)?,
        pe: model.positions(b, &inputs.txt_ids, &inputs.img_ids)?,
        y: b.input(&inputs.y)?,
        guidance: inputs.guidance.as_ref().map(|g| engine::model::flux::scalars(b, g)).transpose()?,
    };
    let img = b.input(&inputs.img)?;
    let step = |t: f32| -> Result<Tensor<B>> {
        model.forward(b, &img, &engine::model::flux::scalars(b, &HostTensor::from_f32(vec![a.batch], vec![t; a.batch]))?, &c)
    };

    drop(step(1.0)?); // warm-up: kernel JIT, cuBLASLt heuristics, the memory pool
    b.synchronize()?;
    b.reset_memory_peak()?;
    let mut times = Vec::with_capacity(a.steps);
    for i in 0..a.steps {
        let t = Instant::now();
        drop(step(1.0 - i as f32 / a.steps as f32)?);
        b.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    let memory = b.memory_peak()?;
    let total: f64 = times.iter().sum();
    let mean = total / a.steps as f64;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let achieved = flops.total as f64 / mean;

    // The cuBLAS ceiling on this machine: a square bf16 GEMM through the same backend.
    let n = if b.memory_peak()?.is_some() { 8192 } else { 512 };
    let x = b.placeholder(&[n, n], DType::BF16).and_then(|t| b.input(&b.download(&t)?))?;
    let w = b.placeholder(&[n, n], b.weight_dtype().unwrap_or(DType::F32))?;
    drop(b.linear(&x, &w, None)?);
    b.synchronize()?;
    let t = Instant::now();
    let reps = 10;
    for _ in 0..reps {
        drop(b.linear(&x, &w, None)?);
    }
    b.synchronize()?;
    let gemm_rate = 2.0 * (n as f64).powi(3) * reps as f64 / t.elapsed().as_secs_f64();

    let device = b.name();
    let peak = peak_bf16_flops(&device);
    println!("device      {device}");
    println!(
        "model       {} ({} double + {} single blocks, hidden {}), random weights (zeros on the CPU), built in {build_s:.1} s",
        a.shape, params.depth, params.depth_single_blocks, params.hidden_size
    );
    println!("shape       {}x{} output, {} image + {} text tokens, batch {}", a.res, a.res, side * side, a.txt_tokens, a.batch);
    println!(
        "steps       {}: {:.3} s in all, {:.1} ms per step (median {:.1} ms), {:.3} s per image",
        a.steps,
        total,
        mean * 1e3,
        median * 1e3,
        total / a.batch as f64
    );
    println!("flops       {:.2} TFLOP per step, {:.1} TFLOP/s achieved", flops.total as f64 / 1e12, achieved / 1e12);
    match peak {
        Some(p) => println!("mfu         {:.1}% of the card's {:.0} TFLOP/s dense bf16", 100.0 * achieved / p, p / 1e12),
        None => println!("mfu         (no peak rate known for this device)"),
    }
    println!("gemm        {:.1} TFLOP/s measured ({n}^3); the steps reach {:.1}% of it", gemm_rate / 1e12, 100.0 * achieved / gemm_rate);
    match memory {
        Some(m) => {
            println!("memory      peak {} (allocator), {} in use (driver)", human_bytes(m.allocator_high_water), human_bytes(m.driver_used))
        }
        None => println!("memory      (not measured on this backend)"),
    }
    println!("by class    (model FLOPs per step; per-class timing is not measured yet)");
    for (class, f) in &flops.by_class {
        println!("  {:<10} {:>9.3} TFLOP  {:>5.1}%", class.name(), *f as f64 / 1e12, 100.0 * *f as f64 / flops.total as f64);
    }

    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "device": device, "shape": a.shape, "res": a.res, "batch": a.batch, "steps": a.steps,
            "image_tokens": side * side, "text_tokens": a.txt_tokens,
            "seconds_per_step": mean, "seconds_per_step_median": median, "seconds_per_image": total / a.batch as f64,
            "flops_per_step": flops.total, "flops_per_second": achieved,
            "mfu": peak.map(|p| achieved / p), "gemm_flops_per_second": gemm_rate, "fraction_of_gemm": achieved / gemm_rate,
            "memory_peak_bytes": memory.map(|m| m.allocator_high_water), "memory_driver_used_bytes": memory.map(|m| m.driver_used),
            "flops_by_class": flops.by_class.iter().map(|(c, f)| (c.name().to_string(), *f)).collect::<std::collections::BTreeMap<_, _>>(),
        });
        let text = serde_json::to_string_pretty(&doc)?;
        loaders::atomic::write_atomic(path, true, |f| std::io::Write::write_all(f, text.as_bytes()))?;
    }
    Ok(())
}
