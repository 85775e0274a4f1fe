//! `engine kernels`: microbenchmarks of the hand-written kernels against the roofline of the
//! machine measured in the same run (a large copy for bandwidth, a large GEMM for compute).

use super::kernels_training::training_rows;
use anyhow::{ensure, Result};
use engine::backend::device::Device;
use engine::backend::training::TrainingOps;
use engine::{Backend, Tensor};
use half::bf16;
use loaders::{HostData, HostTensor};
use std::path::PathBuf;
use std::time::Instant;

/// Time the hand-written kernels (attention, both forwards side by side on Hopper and both backwards on a GPU, LayerNorm + modulation, QK-norm + RoPE, gated
/// residual, GELU, LoRA matmul; the AdamW step, the Sobolev energy and S-DPO) on FLUX.1-dev shapes and report achieved TFLOP/s (compute-bound
/// kernels) or GB/s (memory-bound ones) beside the ceiling measured in the same run: a large copy
/// and a large GEMM through the same backend.
#[derive(clap::Args)]
pub struct Args {
    /// Where to run: cuda (the point of this command), cpu or auto.
    #[arg(long, value_enum, default_value = "cuda")]
    device: Device,
    /// Problem sizes: full (FLUX.1-dev, 1024x1024: 4608 tokens) or small (a quick check that
    /// runs in seconds on a CPU).
    #[arg(long, value_enum, default_value = "full")]
    size: Size,
    /// Timed repetitions per kernel (after one warm-up).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Size {
    Full,
    Small,
}

/// What bounds a kernel: arithmetic or memory traffic.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bound {
    Compute,
    Memory,
}

struct Row {
    kernel: String,
    shape: String,
    seconds: f64,
    /// FLOPs for compute-bound kernels, bytes moved for memory-bound ones.
    work: f64,
    bound: Bound,
}

impl Row {
    fn rate(&self) -> f64 {
        self.work / self.seconds
    }
}

pub fn run(a: Args) -> Result<()> {
    ensure!(a.iters >= 1, "--iters must be at least 1");
    engine::on_backend!(a.device, b => bench(b, &a))
}

/// Median seconds of `iters` runs of `f` after a warm-up, each synchronised.
fn time<B: Backend, R>(b: &B, iters: usize, mut f: impl FnMut() -> Result<R>) -> Result<f64> {
    drop(f()?);
    b.synchronize()?;
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        drop(f()?);
        b.synchronize()?;
        samples.push(t0.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

fn random<B: Backend>(b: &B, shape: &[usize], seed: u64, scale: f32) -> Result<Tensor<B>> {
    let n = shape.iter().product();
    let v = engine::sampler::gaussian_noise(n, seed).into_iter().map(|x| bf16::from_f32(x * scale)).collect();
    b.upload(&HostTensor::new(shape.to_vec(), HostData::BF16(v)))
}

fn activation<B: Backend>(b: &B, shape: &[usize], seed: u64) -> Result<Tensor<B>> {
    b.input(&HostTensor::from_f32(shape.to_vec(), engine::sampler::gaussian_noise(shape.iter().product(), seed)))
}

fn bench<B: TrainingOps>(b: &B, a: &Args) -> Result<()> {
    // FLUX.1-dev at 1024x1024: 4096 image + 512 text tokens, hidden 3072, 24 heads of 128.
    let (l, d, heads, hd, gemm_side) = match a.size {
        Size::Full => (4608, 3072, 24, 128, 8192),
        Size::Small => (256, 512, 4, 128, 512),
    };
    let elem = b.input(&HostTensor::from_f32(vec![1], vec![0.0]))?.dtype().size() as f64;
    let n = a.iters;
    let mut rows = Vec::new();

    // The ceilings: a copy of 1 GiB-ish (narrow of the whole tensor is one copy kernel) and a
    // square GEMM.
    let big = activation(b, &[l * 4, d * 8], 1)?;
    let s = time(b, n, || b.narrow(&big, 0, 0, l * 4))?;
    rows.push(Row {
        kernel: "copy (ceiling)".into(),
        shape: format!("{:?}", big.shape()),
        seconds: s,
        work: 2.0 * big.elem_count() as f64 * elem,
        bound: Bound::Memory,
    });
    drop(big);
    let (x, w) = (activation(b, &[gemm_side, gemm_side], 2)?, random(b, &[gemm_side, gemm_side], 3, 0.01)?);
    let s = time(b, n, || b.linear(&x, &w, None))?;
    let g = gemm_side as f64;
    rows.push(Row {
        kernel: "gemm (ceiling)".into(),
        shape: format!("{gemm_side}^3"),
        seconds: s,
        work: 2.0 * g * g * g,
        bound: Bound::Compute,
    });
    drop((x, w));

    let (q, k, v) = (activation(b, &[1, heads, l, hd], 4)?, activation(b, &[1, heads, l, hd], 5)?, activation(b, &[1, heads, l, hd], 6)?);
    let attn_flops = 4.0 * (l * l * hd * heads) as f64;
    let attn_row = |kernel: String, seconds: f64, work: f64| Row {
        kernel,
        shape: format!("[1,{heads},{l},{hd}]"),
        seconds,
        work,
        bound: Bound::Compute,
    };
    rows.push(attn_row("attention fwd".into(), time(b, n, || b.attention(&q, &k, &v))?, attn_flops));
    // Where the backend chooses between forward kernels (Hopper), each forced, beside the
    // default; all write the log-sum-exp, so they compare like with like.
    for kernel in b.attention_kernels() {
        let s = time(b, n, || b.attention_with_lse_using(kernel, &q, &k, &v))?;
        rows.push(attn_row(format!("attention fwd ({kernel})"), s, attn_flops));
    }
    // The backward counted as FlashAttention's papers count it, 2.5 x the forward (five L x L x d
    // products against two), so that its rate compares with theirs.
    let (out, lse) = b.attention_with_lse(&q, &k, &v)?;
    let g_out = activation(b, out.shape(), 7)?;
    rows.push(attn_row("attention bwd".into(), time(b, n, || b.attention_backward(&q, &k, &v, &out, &lse, &g_out))?, 2.5 * attn_flops));
    // Where the backend chooses between backward kernels (a GPU: SIMT and tensor cores), each
    // forced, beside the default.
    for kernel in b.attention_backward_kernels() {
        let s = time(b, n, || b.attention_backward_using(kernel, &q, &k, &v, &out, &lse, &g_out))?;
        rows.push(attn_row(format!("attention bwd ({kernel})"), s, 2.5 * attn_flops));
    }
    drop((q, k, v, out, lse, g_out));

    let x = activation(b, &[1, l, d], 7)?;
    let (shift, scale) = (activation(b, &[1, d], 8)?, activation(b, &[1, d], 9)?);
    let s = time(b, n, || b.layer_norm_modulate(&x, &shift, &scale, 1e-6))?;
    let act_bytes = (l * d) as f64 * elem;
    rows.push(Row {
        kernel: "layer_norm_modulate".into(),
        shape: format!("[1,{l},{d}]"),
        seconds: s,
        work: 2.0 * act_bytes,
        bound: Bound::Memory,
    });
    let gate = activation(b, &[1, d], 10)?;
    let s = time(b, n, || b.gated_residual(&x, &gate, &x))?;
    rows.push(Row {
        kernel: "gated_residual".into(),
        shape: format!("[1,{l},{d}]"),
        seconds: s,
        work: 3.0 * act_bytes,
        bound: Bound::Memory,
    });
    let s = time(b, n, || b.gelu_tanh(&x))?;
    rows.push(Row { kernel: "gelu_tanh".into(), shape: format!("[1,{l},{d}]"), seconds: s, work: 2.0 * act_bytes, bound: Bound::Memory });

    let qkv = activation(b, &[1, l, 3 * d], 11)?;
    let (qs, ks) = (random(b, &[hd], 12, 1.0)?, random(b, &[hd], 13, 1.0)?);
    let pe = b.upload(&HostTensor::from_f32(vec![1, l, hd / 2, 2], (0..l * hd).map(|i| if i % 2 == 0 { 1.0 } else { 0.0 }).collect()))?;
    let s = time(b, n, || b.qk_norm_rope(&qkv, heads, &qs, &ks, &pe, 1e-6))?;
    let pe_bytes = (l * hd) as f64 * 4.0;
    rows.push(Row {
        kernel: "qk_norm_rope".into(),
        shape: format!("[1,{l},{}]", 3 * d),
        seconds: s,
        work: 2.0 * 3.0 * act_bytes + pe_bytes,
        bound: Bound::Memory,
    });
    drop((qkv, pe));

    // LoRA at rank 16 on a d -> d projection: two skinny GEMMs accumulating into y.
    let rank = 16;
    let (down, up) = (random(b, &[rank, d], 14, 0.02)?, random(b, &[d, rank], 15, 0.02)?);
    let s = time(b, n, || b.lora_add(b.narrow(&x, 0, 0, 1)?, &x, &down, &up, None, 1.0, 0))?;
    let lora_flops = 2.0 * 2.0 * (l * d * rank) as f64;
    rows.push(Row { kernel: "lora_add (r16)".into(), shape: format!("[1,{l},{d}]"), seconds: s, work: lora_flops, bound: Bound::Compute });

    for (kernel, shape, seconds, bytes) in training_rows(b, a.size == Size::Full, &|f| time(b, n, f))? {
        rows.push(Row { kernel: kernel.into(), shape, seconds, work: bytes, bound: Bound::Memory });
    }

    let (copy_rate, gemm_rate) = (rows[0].rate(), rows[1].rate());
    println!("device  {}", b.name());
    println!("{:<26} {:<20} {:>10} {:>14} {:>10}", "kernel", "shape", "time", "achieved", "of ceiling");
    for r in &rows {
        let (rate, unit, ceiling) = match r.bound {
            Bound::Compute => (r.rate() / 1e12, "TFLOP/s", gemm_rate),
            Bound::Memory => (r.rate() / 1e9, "GB/s", copy_rate),
        };
        println!(
            "{:<26} {:<20} {:>7.3} ms {:>6.1} {:<7} {:>9.0}%",
            r.kernel,
            r.shape,
            r.seconds * 1e3,
            rate,
            unit,
            100.0 * r.rate() / ceiling
        );
    }
    println!("(median of {n} runs each; memory-bound kernels against the copy, compute-bound ones against the GEMM)");
    if let Some(path) = &a.json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "kernel": r.kernel, "shape": r.shape, "seconds": r.seconds,
                    "bound": if r.bound == Bound::Compute { "compute" } else { "memory" },
                    "rate": r.rate(), "unit": if r.bound == Bound::Compute { "FLOP/s" } else { "B/s" },
                    "fraction_of_ceiling": r.rate() / if r.bound == Bound::Compute { gemm_rate } else { copy_rate },
                })
            })
            .collect();
        let doc = serde_json::json!({ "device": b.name(), "iters": n, "kernels": list });
        let text = serde_json::to_string_pretty(&doc)?;
        loaders::atomic::write_atomic(path, true, |f| std::io::Write::write_all(f, text.as_bytes()))?;
    }
    Ok(())
}
