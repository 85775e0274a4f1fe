//! `engine plan`: model FLOPs and a device-memory plan for one transformer step at a given size,
//! computed on the CPU from the model's own code run on shapes only (`engine::perf`).

use super::{human_bytes, human_count};
use anyhow::{bail, ensure, Context, Result};
use engine::ae::tiled::{covers, BUDGET_SHARE};
use engine::ae::AutoEncoderParams;
use engine::ae::TileOptions;
use engine::model::FluxParams;
use engine::perf::flops::{training_step_flops, FlopCount};
use engine::perf::plan::{MemoryPlan, ALIGNMENT, HOPPER_CUBLASLT_WORKSPACE};
use engine::perf::{ae_tile_for_budget, ae_tile_plan, trace_flux_ae, trace_flux_step, training_memory_estimate, AeDirection, StepShape};
use loaders::DType;

/// Plan one transformer step for a GPU, on the CPU: model FLOPs per op class (design.md section 11)
/// and device memory (weights, the packed activation arena, the GEMM workspace), from the model's
/// own code run on shapes only. Also FLUX's autoencoder at the output size, and with --train a
/// training step.
#[derive(clap::Args)]
pub struct Args {
    /// Model shape: flux-dev, flux-small or flux-tiny.
    #[arg(long, default_value = "flux-dev")]
    shape: String,
    /// Output image side in pixels, a multiple of 16: FLUX's autoencoder downsamples by 8 and the
    /// transformer packs 2x2 latent patches, so the step sees (res / 16)^2 image tokens.
    #[arg(long, default_value_t = 1024)]
    res: usize,
    /// Images per step.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Text tokens (FLUX.1-dev: 512).
    #[arg(long, default_value_t = 512)]
    txt_tokens: usize,
    /// Storage dtype of weights and activations: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Unmerged LoRA of this rank on every target linear (design.md section 7).
    #[arg(long)]
    lora_rank: Option<usize>,
    /// Also account a training step: forward + backward.
    #[arg(long)]
    train: bool,
    /// Device memory in GB for the whole-upscale plan: the autoencoder's tiles are chosen for
    /// what the resident weights leave of it, as `engine upscale --max-memory` chooses them.
    #[arg(long, value_name = "GB", default_value_t = 25.0)]
    max_memory: f64,
    /// With --train: data-parallel ranks (mpirun -np N), each with --batch images; every figure
    /// is per rank, each holding the whole model.
    #[arg(long, default_value_t = 1)]
    ranks: usize,
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        _ => bail!("--dtype {s}: expected bf16, f16 or f32"),
    })
}

/// FLOPs with a metric prefix.
fn human_flops(n: u64) -> String {
    let v = n as f64;
    match v {
        v if v >= 1e12 => format!("{:.2} TFLOP", v / 1e12),
        v if v >= 1e9 => format!("{:.2} GFLOP", v / 1e9),
        v if v >= 1e6 => format!("{:.2} MFLOP", v / 1e6),
        v if v >= 1e3 => format!("{:.2} kFLOP", v / 1e3),
        _ => format!("{n} FLOP"),
    }
}

/// One memory line: label, binary and decimal size, a note.
fn bytes_row(label: &str, n: u64, note: &str) {
    let row = format!("  {label:<15} {:>12} {:>10.2} GB   {note}", human_bytes(n), n as f64 / 1e9);
    println!("{}", row.trim_end());
}

/// FLOPs per counted class with their shares, then the total.
fn flop_rows(count: &FlopCount) {
    for (class, &n) in &count.by_class {
        println!("  {:<15} {:>12} {:>9.1}%", class.name(), human_flops(n), 100.0 * n as f64 / count.total as f64);
    }
    println!("  {:<15} {:>12}", "total", human_flops(count.total));
}

/// The peak of a whole upscale at `a.res`: the LQ encode, the transformer's steps and the decode
/// run one after another beside both models' resident weights, each pass's activations freed
/// before the next, so the peak is the weights, the largest of the three arenas and the
/// workspace. The autoencoder runs in the tiles the upscaler's default would choose for what
/// the weights leave of `--max-memory`.
fn upscale_rows(ae: &AutoEncoderParams, a: &Args, step: &MemoryPlan, dtype: DType) -> Result<()> {
    let budget = super::ae::max_memory_bytes(Some(a.max_memory))?.expect("given");
    // Either trace builds the whole autoencoder: its weights are both halves'.
    let ae_weights = ae_tile_plan(ae, a.batch, AeDirection::Decode, dtype, 64, 0)?.weights;
    let resident = step.weights + ae_weights + step.workspace;
    let left = (budget.saturating_sub(resident) as f64 * BUDGET_SHARE) as u64;
    let context = TileOptions::default().context;
    println!();
    println!("whole upscale, {res}x{res}: LQ encode, the steps, decode (autoencoder tiles for {:.1} GB)", a.max_memory, res = a.res);
    bytes_row(
        "weights",
        step.weights + ae_weights,
        &format!("transformer {} + autoencoder {}", human_bytes(step.weights), human_bytes(ae_weights)),
    );
    let mut arenas = vec![step.arena];
    for (label, direction) in [("encode", AeDirection::Encode), ("decode", AeDirection::Decode)] {
        let tile = ae_tile_for_budget(ae, a.batch, direction, dtype, context, left)?;
        let (arena, note) = if covers(tile, context, a.res) {
            (trace_plan(ae, a, direction, dtype)?, "whole image".to_string())
        } else {
            (
                ae_tile_plan(ae, a.batch, direction, dtype, tile, context)?.arena,
                format!("tiles of {tile} px, {context} px of context around each"),
            )
        };
        bytes_row(&format!("{label} arena"), arena, &note);
        arenas.push(arena);
    }
    bytes_row("step arena", step.arena, "one transformer step, as above");
    bytes_row("workspace", step.workspace, "cuBLASLt on Hopper");
    let peak = step.weights + ae_weights + arenas.iter().max().copied().unwrap_or(0) + step.workspace;
    let verdict = if peak <= budget { "within" } else { "OVER" };
    bytes_row("planned peak", peak, &format!("weights + the largest arena + workspace: {verdict} {:.1} GB", a.max_memory));
    Ok(())
}

/// The arena of a whole-image autoencoder pass at `a.res`.
fn trace_plan(ae: &AutoEncoderParams, a: &Args, direction: AeDirection, dtype: DType) -> Result<u64> {
    Ok(MemoryPlan::of(&trace_flux_ae(ae, a.batch, a.res, a.res, dtype, direction)?, 0).arena)
}

pub fn run(a: Args) -> Result<()> {
    let params = FluxParams::preset(&a.shape).context("--shape")?;
    let dtype = parse_dtype(&a.dtype)?;
    ensure!(a.batch > 0, "--batch 0: a step needs at least one image");
    ensure!(
        a.res > 0 && a.res % 16 == 0,
        "--res {}: the output side must be a positive multiple of 16 (autoencoder 8 x 2x2 patches)",
        a.res
    );
    if let Some(rank) = a.lora_rank {
        ensure!(rank > 0, "--lora-rank 0: a LoRA rank must be positive");
    }
    ensure!(a.ranks > 0, "--ranks 0: a run has at least one rank");
    let grid = a.res / 16;
    let shape = StepShape { batch: a.batch, img_tokens: grid * grid, txt_tokens: a.txt_tokens };
    let trace = trace_flux_step(&params, shape, dtype, a.lora_rank)?;
    let count = FlopCount::of(&trace);
    let plan = MemoryPlan::of(&trace, HOPPER_CUBLASLT_WORKSPACE);

    let lora = a.lora_rank.map_or(String::new(), |r| format!(", unmerged LoRA rank {r}"));
    println!("plan          {}, {res}x{res} output, batch {}, {dtype} weights and activations{lora}", a.shape, a.batch, res = a.res);
    println!(
        "tokens        {} image ({grid}x{grid} patches of the {l}x{l} latent) + {} text",
        shape.img_tokens,
        a.txt_tokens,
        l = 2 * grid
    );
    let parameters = trace.parameters();
    let lora_count = match a.lora_rank {
        // The adapter's share: the same model traced without it.
        Some(_) => Some((parameters - trace_flux_step(&params, shape, dtype, None)?.parameters()) as usize),
        None => None,
    };
    let lora_parameters = lora_count.map_or(String::new(), |n| format!(", LoRA {}", human_count(n)));
    println!("parameters    {} ({parameters}{lora_parameters})", human_count(parameters as usize));
    println!();
    println!("memory, one transformer step (inference)");
    bytes_row("weights", plan.weights, "");
    bytes_row("arena", plan.arena, &format!("activations packed at {ALIGNMENT}-byte offsets, largest first"));
    bytes_row("lower bound", plan.lower_bound, "most bytes live at once: no plan can use less");
    bytes_row("workspace", plan.workspace, "cuBLASLt on Hopper");
    bytes_row("planned peak", plan.peak(), "weights + arena + workspace");
    println!();
    println!("FLOPs, one transformer step");
    flop_rows(&count);
    println!("  (not counted: per-sample embedding and modulation linears, norms, elementwise ops, copies)");

    let ae = AutoEncoderParams::default();
    println!();
    println!("FLUX autoencoder, {res}x{res}, batch {}", a.batch, res = a.res);
    for (label, direction) in [("encode", AeDirection::Encode), ("decode", AeDirection::Decode)] {
        let trace = trace_flux_ae(&ae, a.batch, a.res, a.res, dtype, direction)?;
        let plan = MemoryPlan::of(&trace, HOPPER_CUBLASLT_WORKSPACE);
        let flops = FlopCount::of(&trace).total;
        println!("  {label:<15} {:>12}   arena {}, weights {}", human_flops(flops), human_bytes(plan.arena), human_bytes(plan.weights));
    }

    upscale_rows(&ae, &a, &plan, dtype)?;

    if a.train {
        let t = training_memory_estimate(&params, shape, dtype, a.lora_rank, HOPPER_CUBLASLT_WORKSPACE)?;
        println!();
        println!("training step: estimates, not a plan of the backward's own buffers");
        println!(
            "  {:<15} {:>12}   forward + backward, the backward counted as 2 x forward",
            "FLOPs",
            human_flops(training_step_flops(count.total))
        );
        bytes_row(
            "peak, all kept",
            t.peak_all_kept(),
            &format!("every forward buffer kept for the backward: arena {}", human_bytes(t.all_kept_arena)),
        );
        bytes_row(
            "peak, per block",
            t.peak_block_checkpointing(),
            &format!(
                "checkpointing: {} blocks' inputs {} + one block recomputed {}",
                params.depth + params.depth_single_blocks,
                human_bytes(t.block_inputs),
                human_bytes(t.one_block_arena)
            ),
        );
        if let Some(n) = lora_count {
            // An f32 master, gradient and two AdamW moments per trained value.
            let state = 16 * n as u64;
            bytes_row("trained state", state, &format!("{} LoRA values: f32 masters, gradients, AdamW m and v", human_count(n)));
            if a.ranks > 1 {
                let sharded = 8 * n as u64 * (a.ranks as u64 - 1) / a.ranks as u64;
                println!("  ZeRO-1 (AdamW's moments sharded over the ranks) would save {} per rank", human_bytes(sharded));
            }
        }
        if a.ranks > 1 {
            println!(
                "  {} ranks x batch {} = {} samples per micro-batch (times --grad-accum per optimiser step); every figure is per \
                 rank, each holding all of it",
                a.ranks,
                a.batch,
                a.ranks * a.batch
            );
        }
        println!("  (not included: the backward's own temporaries, NCCL's buffers)");
    }
    Ok(())
}
