//! Performance accounting on the CPU, exactly and without data: model FLOPs (design.md section 11)
//! and device-memory plans for any model size, FLUX.1-dev's 12B parameters included.
//!
//! The model code runs unchanged on `meta::MetaBackend`, a backend that keeps shapes only and
//! records every op, allocation and free in a trace; the weights come from
//! `WeightLoader::shapes_only`, so nothing is materialised. The trace is the model's real code
//! path, so the counts cannot drift from it. From a trace:
//! - `flops::FlopCount` sums model FLOPs per op class;
//! - `plan::MemoryPlan` gives every activation a lifetime and an offset in one arena, and reports
//!   the peak (weights + arena + GEMM workspace) beside the lower bound no plan can beat.
//!
//! The drivers below trace one transformer evaluation (optionally with unmerged LoRA on the
//! design's targets) and FLUX's autoencoder, and estimate training memory from forward traces
//! while the backward pass does not exist.

pub mod flops;
pub mod meta;
pub mod plan;

use crate::ae::{AutoEncoderParams, Autoencoder, FluxAe};
use crate::backend::Backend;
use crate::model::flux::{Flux, FluxInputs};
use crate::model::layers::{Linear, LoraDelta};
use crate::model::weights::WeightLoader;
use crate::model::FluxParams;
use anyhow::{ensure, Result};
use loaders::{DType, HostTensor};
use meta::{MetaBackend, Trace};

/// The sizes of one transformer evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    pub batch: usize,
    pub img_tokens: usize,
    pub txt_tokens: usize,
}

fn zeros(shape: Vec<usize>) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::from_f32(shape, vec![0.0; n])
}

/// BFL's forward arguments of `shape`, all zeros (only their shapes reach the meta backend).
fn step_inputs(p: &FluxParams, shape: StepShape) -> FluxInputs {
    let (b, li, lt, axes) = (shape.batch, shape.img_tokens, shape.txt_tokens, p.axes_dim.len());
    FluxInputs {
        img: zeros(vec![b, li, p.in_channels]),
        img_ids: zeros(vec![b, li, axes]),
        txt: zeros(vec![b, lt, p.context_in_dim]),
        txt_ids: zeros(vec![b, lt, axes]),
        timesteps: zeros(vec![b]),
        y: zeros(vec![b, p.vec_in_dim]),
        guidance: p.guidance_embed.then(|| zeros(vec![b])),
    }
}

/// Attaches an unmerged rank-`rank` LoRA update (placeholders, scale 1) to every LoRA target of
/// design.md section 7: in each double-block stream qkv, proj and both MLP linears; in each single
/// block linear1 and linear2. Each target gets one update covering all its output rows, as the
/// fused internal (BFL) layout holds it. Returns the adapter's parameter count.
pub fn attach_lora<B: Backend>(b: &B, model: &mut Flux<B>, rank: usize, dtype: DType) -> Result<u64> {
    ensure!(rank > 0, "LoRA rank must be positive, got {rank}");
    let streams = model.double_blocks.iter_mut().flat_map(|block| [&mut block.img, &mut block.txt]);
    let mut targets: Vec<&mut Linear<B>> =
        streams.flat_map(|s| [&mut s.attn.qkv, &mut s.attn.proj, &mut s.mlp.fc1, &mut s.mlp.fc2]).collect();
    targets.extend(model.single_blocks.iter_mut().flat_map(|s| [&mut s.linear1, &mut s.linear2]));
    let mut parameters = 0;
    for linear in targets {
        let (out_f, in_f) = (linear.weight.dim(0), linear.weight.dim(1));
        let down = b.placeholder(&[rank, in_f], dtype)?;
        let up = b.placeholder(&[out_f, rank], dtype)?;
        linear.lora.push(LoraDelta { down, up, up_bias: None, scale: 1.0, offset: 0 });
        parameters += (rank * (in_f + out_f)) as u64;
    }
    Ok(parameters)
}

/// The trace of building a FLUX model of `params` (weights and activations in `dtype`), with
/// LoRA of `lora_rank` when given, and running `Flux::forward_host` once on inputs of `shape`.
pub fn trace_flux_step(params: &FluxParams, shape: StepShape, dtype: DType, lora_rank: Option<usize>) -> Result<Trace> {
    let b = MetaBackend::new(dtype);
    {
        let mut model = Flux::build(params, &mut WeightLoader::shapes_only(&b, dtype))?;
        if let Some(rank) = lora_rank {
            attach_lora(&b, &mut model, rank, dtype)?;
        }
        model.forward_host(&b, &step_inputs(params, shape))?;
    }
    Ok(b.take_trace())
}

/// Which half of the autoencoder to trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AeDirection {
    /// A `[batch, 3, height, width]` image to its latent.
    Encode,
    /// The latent of a `height x width` image back to the image.
    Decode,
}

/// The trace of building FLUX's autoencoder of `params` and running one encode or decode for
/// `height x width` images (in pixels, multiples of the downscale factor).
pub fn trace_flux_ae(
    params: &AutoEncoderParams,
    batch: usize,
    height: usize,
    width: usize,
    dtype: DType,
    direction: AeDirection,
) -> Result<Trace> {
    let f = params.downscale();
    ensure!(height % f == 0 && width % f == 0, "image {width}x{height} is not a multiple of the autoencoder's factor {f}");
    let b = MetaBackend::new(dtype);
    {
        let ae = FluxAe::build(params, &mut WeightLoader::shapes_only(&b, dtype))?;
        let out = match direction {
            AeDirection::Encode => ae.encode(&b, &b.input(&zeros(vec![batch, 3, height, width]))?)?,
            AeDirection::Decode => ae.decode(&b, &b.input(&zeros(vec![batch, params.z_channels, height / f, width / f]))?)?,
        };
        b.download(&out)?;
    }
    Ok(b.take_trace())
}

/// Device memory of one training step, estimated from forward traces (the backward pass is not
/// built yet). It counts weights, forward buffers kept for the backward and the workspace; the
/// backward's own temporaries, gradients and optimizer state are not included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingMemoryEstimate {
    pub weights: u64,
    pub workspace: u64,
    /// Without checkpointing: every buffer of the forward kept until its end (an upper estimate:
    /// autograd keeps only what the backward reads).
    pub all_kept_arena: u64,
    /// With per-block checkpointing, the inputs of every block, kept: `[B, L, hidden]` per
    /// single block, `[B, Li, hidden]` + `[B, Lt, hidden]` per double block.
    pub block_inputs: u64,
    /// ... plus one block recomputed with all its buffers kept: the larger of a one-double-block
    /// and a one-single-block model's all-kept arena (their embeddings and final layer included).
    pub one_block_arena: u64,
}

impl TrainingMemoryEstimate {
    pub fn peak_all_kept(&self) -> u64 {
        self.weights + self.all_kept_arena + self.workspace
    }

    pub fn peak_block_checkpointing(&self) -> u64 {
        self.weights + self.block_inputs + self.one_block_arena + self.workspace
    }
}

/// Aligned bytes of every non-weight buffer of a trace: the arena when all stay live to the end.
fn all_kept_arena(trace: &Trace) -> u64 {
    plan::lifetimes(trace).iter().map(|l| l.bytes).sum()
}

pub fn training_memory_estimate(
    params: &FluxParams,
    shape: StepShape,
    dtype: DType,
    lora_rank: Option<usize>,
    workspace: u64,
) -> Result<TrainingMemoryEstimate> {
    let full = trace_flux_step(params, shape, dtype, lora_rank)?;
    let one_double = FluxParams { depth: 1, depth_single_blocks: 0, ..params.clone() };
    let one_single = FluxParams { depth: 0, depth_single_blocks: 1, ..params.clone() };
    let one_block_arena = all_kept_arena(&trace_flux_step(&one_double, shape, dtype, lora_rank)?).max(all_kept_arena(&trace_flux_step(
        &one_single,
        shape,
        dtype,
        lora_rank,
    )?));
    let stream = |tokens: usize| plan::aligned((shape.batch * tokens * params.hidden_size * dtype.size()) as u64);
    let block_inputs = params.depth as u64 * (stream(shape.img_tokens) + stream(shape.txt_tokens))
        + params.depth_single_blocks as u64 * stream(shape.img_tokens + shape.txt_tokens);
    Ok(TrainingMemoryEstimate {
        weights: plan::weight_bytes(&full),
        workspace,
        all_kept_arena: all_kept_arena(&full),
        block_inputs,
        one_block_arena,
    })
}

#[cfg(test)]
mod tests {
    use super::flops::{closed_form, FlopCount};
    use super::meta::{BufferKind, Event};
    use super::plan::{self, MemoryPlan};
    use super::*;
    use crate::backend::profile::OpClass;
    use crate::CpuBackend;

    fn step(batch: usize, img_tokens: usize, txt_tokens: usize) -> StepShape {
        StepShape { batch, img_tokens, txt_tokens }
    }

    fn preset(name: &str) -> FluxParams {
        FluxParams::preset(name).unwrap()
    }

    #[test]
    fn flux_dev_matches_the_design_check_values() {
        // Design section 11: FLUX.1-dev, 512 text tokens, batch 1, one transformer step.
        let p = preset("flux-dev");
        for (img_tokens, tflop) in [(1024, "21.50"), (4096, "74.38")] {
            let trace = trace_flux_step(&p, step(1, img_tokens, 512), DType::BF16, None).unwrap();
            let count = FlopCount::of(&trace);
            assert_eq!(count.total, closed_form::flux_step(&p, 1, img_tokens, 512, None), "{img_tokens} tokens");
            assert_eq!(format!("{:.2}", count.total as f64 / 1e12), tflop, "{img_tokens} tokens");
            let l = (img_tokens + 512) as u64;
            assert_eq!(count.class(OpClass::Attention), 57 * 4 * l * l * 3072);
            assert_eq!(count.by_class.keys().copied().collect::<Vec<_>>(), [OpClass::Gemm, OpClass::Attention]);
        }
    }

    #[test]
    fn per_sample_linears_are_traced_but_not_counted() {
        let p = preset("flux-dev");
        let trace = trace_flux_step(&p, step(2, 64, 16), DType::BF16, None).unwrap();
        let per_sample: Vec<_> = trace.ops().filter(|op| op.class == OpClass::PerSample).collect();
        // time_in, guidance_in, vector_in (2 linears each), 2 modulations per double block, 1
        // per single block, the final layer's adaLN.
        assert_eq!(per_sample.len(), 6 + 2 * p.depth + p.depth_single_blocks + 1);
        assert!(per_sample.iter().all(|op| op.flops == 0));
        assert_eq!(FlopCount::of(&trace).total, closed_form::flux_step(&p, 2, 64, 16, None));
    }

    #[test]
    fn lora_adds_its_closed_form_and_its_parameters() {
        let p = preset("flux-small");
        let (batch, li, lt, rank) = (3, 20, 7, 8);
        let base = FlopCount::of(&trace_flux_step(&p, step(batch, li, lt), DType::BF16, None).unwrap());
        let trace = trace_flux_step(&p, step(batch, li, lt), DType::BF16, Some(rank)).unwrap();
        let with = FlopCount::of(&trace);
        let lora = closed_form::flux_lora(&p, batch, li, lt, rank);
        assert_eq!(with.class(OpClass::Lora), lora);
        assert_eq!(with.total - base.total, lora);
        assert_eq!(with.total, closed_form::flux_step(&p, batch, li, lt, Some(rank)));

        let b = MetaBackend::new(DType::BF16);
        let mut model = Flux::build(&p, &mut WeightLoader::shapes_only(&b, DType::BF16)).unwrap();
        let h = p.hidden_size;
        // Per double block 2 x (4h + 2h + 5h + 5h) r, per single block (8h + 6h) r (mlp = 4h).
        assert_eq!(
            attach_lora(&b, &mut model, rank, DType::BF16).unwrap(),
            ((p.depth * 32 + p.depth_single_blocks * 14) * h * rank) as u64
        );
        assert!(attach_lora(&b, &mut model, 0, DType::BF16).unwrap_err().to_string().contains("rank"));
    }

    #[test]
    fn flux_dev_lora_rank_8_is_28m_parameters() {
        // The fused-layout targets give 1140 h r: 28.0M at rank 8 (design.md section 7 quotes about
        // 29.5M for the paper's adapter, whose exact target split is not stated).
        let p = preset("flux-dev");
        let b = MetaBackend::new(DType::BF16);
        let mut model = Flux::build(&p, &mut WeightLoader::shapes_only(&b, DType::BF16)).unwrap();
        assert_eq!(attach_lora(&b, &mut model, 8, DType::BF16).unwrap(), 1140 * 3072 * 8);
    }

    fn small_ae() -> AutoEncoderParams {
        AutoEncoderParams { ch: 16, ch_mult: vec![1, 2, 2], num_res_blocks: 1, z_channels: 4, norm_num_groups: 8, ..Default::default() }
    }

    #[test]
    fn autoencoder_flops_match_the_closed_form() {
        let p = small_ae();
        let (batch, h, w) = (2, 24, 16);
        let enc = FlopCount::of(&trace_flux_ae(&p, batch, h, w, DType::F32, AeDirection::Encode).unwrap());
        let dec = FlopCount::of(&trace_flux_ae(&p, batch, h, w, DType::F32, AeDirection::Decode).unwrap());
        assert_eq!(enc.total, closed_form::ae_encode(&p, batch, h, w));
        assert_eq!(dec.total, closed_form::ae_decode(&p, batch, h / 4, w / 4));
        // The middle attention: one head of 32 channels over the (h/4)(w/4) positions.
        let n = (h / 4 * w / 4) as u64;
        assert_eq!(enc.class(OpClass::Attention), 4 * batch as u64 * n * n * 32);
        assert!(enc.class(OpClass::Conv) > 0 && dec.class(OpClass::Gemm) > 0);
        assert!(trace_flux_ae(&p, 1, 10, 16, DType::F32, AeDirection::Decode).unwrap_err().to_string().contains("10"));
    }

    #[test]
    fn the_real_flux_ae_decoder_matches_its_closed_form_at_1024() {
        // FLUX's own autoencoder at full size: 10.47 TFLOP, mostly 3x3 convs at full and half resolution.
        let p = AutoEncoderParams::default();
        let dec = FlopCount::of(&trace_flux_ae(&p, 1, 1024, 1024, DType::BF16, AeDirection::Decode).unwrap());
        assert_eq!(dec.total, closed_form::ae_decode(&p, 1, 128, 128));
    }

    /// A valid packing (`plan::assert_valid`) whose arena is the plan's, at or above the bound.
    fn assert_valid_plan(trace: &Trace) -> MemoryPlan {
        let lifetimes = plan::lifetimes(trace);
        let packing = plan::pack(&lifetimes);
        plan::assert_valid(&lifetimes, &packing);
        let plan = MemoryPlan::of(trace, plan::HOPPER_CUBLASLT_WORKSPACE);
        assert!(plan.arena >= plan.lower_bound && plan.arena == packing.arena);
        plan
    }

    #[test]
    fn plans_of_real_traces_are_valid() {
        let p = preset("flux-tiny");
        for trace in [
            trace_flux_step(&p, step(2, 48, 9), DType::BF16, None).unwrap(),
            trace_flux_step(&preset("flux-dev"), step(1, 4096, 512), DType::BF16, None).unwrap(),
            trace_flux_step(&p, step(1, 16, 4), DType::F32, Some(4)).unwrap(),
            trace_flux_ae(&small_ae(), 1, 16, 16, DType::BF16, AeDirection::Decode).unwrap(),
        ] {
            let plan = assert_valid_plan(&trace);
            // Every buffer is freed by the end of the trace (the drivers drop everything).
            let freed = trace.events.iter().filter(|e| matches!(e, Event::Free(_))).count();
            assert_eq!(freed, trace.buffers().count());
            assert!(plan.lower_bound > 0);
        }
    }

    #[test]
    fn flux_dev_weights_are_parameters_times_dtype_size() {
        let p = preset("flux-dev");
        let trace = trace_flux_step(&p, step(1, 256, 512), DType::BF16, None).unwrap();
        // FLUX.1-dev has 11.90B parameters.
        assert_eq!(trace.parameters(), 11_901_408_320);
        assert_eq!(plan::weight_bytes(&trace), 2 * 11_901_408_320);
    }

    #[test]
    fn a_chain_of_meta_ops_packs_to_its_lower_bound() {
        // x -> linear -> linear -> gelu, each input dropped once used.
        let b = MetaBackend::new(DType::BF16);
        let w1 = b.placeholder(&[96, 64], DType::BF16).unwrap();
        let w2 = b.placeholder(&[40, 96], DType::BF16).unwrap();
        let x = b.input(&zeros(vec![2, 10, 64])).unwrap();
        let y = b.linear(&x, &w1, None).unwrap();
        drop(x);
        let z = b.linear(&y, &w2, None).unwrap();
        drop(y);
        let out = b.gelu_tanh(&z).unwrap();
        drop(z);
        drop(out);
        let trace = b.take_trace();
        let plan = assert_valid_plan(&trace);
        // bf16 bytes: x 2560, y 3840, z and out 1600 -> 1792 aligned. Most live at once: x and y
        // while y is made (y and z: 5632; z and out: 3584).
        assert_eq!(plan.lower_bound, 2560 + 3840);
        assert_eq!(plan.arena, plan.lower_bound);
        assert_eq!(plan.weights, 2 * (96 * 64 + 40 * 96));
    }

    #[test]
    fn lora_updates_in_place_and_frees_its_intermediate() {
        let b = MetaBackend::new(DType::F32);
        let x = b.input(&zeros(vec![1, 5, 16])).unwrap();
        let w = b.placeholder(&[24, 16], DType::F32).unwrap();
        let (down, up) = (b.placeholder(&[4, 16], DType::F32).unwrap(), b.placeholder(&[8, 4], DType::F32).unwrap());
        let y = b.linear(&x, &w, None).unwrap();
        let y_id = y.storage().id();
        b.take_trace();
        let y = b.lora_add(y, &x, &down, &up, None, 0.5, 16).unwrap();
        assert_eq!(y.storage().id(), y_id);
        let events = b.take_trace().events;
        let Event::Op(op) = &events[0] else { panic!("{events:?}") };
        assert_eq!((op.name, op.class, op.flops), ("lora_add", OpClass::Lora, 2 * (5 * 4 * 16 + 5 * 8 * 4)));
        assert_eq!(op.inputs[0], y_id);
        assert_eq!((op.outputs.len(), op.outputs[0].elements, op.outputs[0].kind), (1, 5 * 4, BufferKind::Activation));
        assert_eq!(events[1], Event::Free(op.outputs[0].id));
        assert_eq!(events.len(), 2);
        let err = b.lora_add(y, &x, &down, &up, None, 1.0, 20).unwrap_err().to_string();
        assert!(err.contains("20") && err.contains("[1, 5, 24]"), "{err}");
    }

    #[test]
    fn meta_shape_checks_are_strict() {
        let b = MetaBackend::new(DType::BF16);
        let x = b.input(&zeros(vec![2, 3, 8])).unwrap();
        let w = b.placeholder(&[4, 7], DType::BF16).unwrap();
        let err = b.linear(&x, &w, None).unwrap_err().to_string();
        assert!(err.contains("[2, 3, 8]") && err.contains("7"), "{err}");
        let weight_as_input = b.placeholder(&[3, 8], DType::F32).unwrap();
        let err = b.silu(&weight_as_input).unwrap_err().to_string();
        assert!(err.contains("F32") && err.contains("BF16"), "{err}");
        let q = b.input(&zeros(vec![1, 2, 5, 4])).unwrap();
        let k = b.input(&zeros(vec![1, 2, 6, 8])).unwrap();
        assert!(b.attention(&q, &k, &k).unwrap_err().to_string().contains("[1, 2, 6, 8]"));
        let err =
            b.conv2d(&b.input(&zeros(vec![1, 3, 2, 2])).unwrap(), &b.placeholder(&[4, 3, 5, 5], DType::BF16).unwrap(), None, 1, [0; 4]);
        assert!(err.unwrap_err().to_string().contains("does not fit"));
    }

    #[test]
    fn download_gives_zeros_of_the_shape() {
        let b = MetaBackend::new(DType::BF16);
        let t = b.download(&b.input(&zeros(vec![2, 3])).unwrap()).unwrap();
        assert_eq!((t.shape.clone(), t.dtype(), t.to_f32()), (vec![2, 3], DType::F32, vec![0.0; 6]));
    }

    #[test]
    fn the_default_placeholder_uploads_zeros_and_shapes_only_models_run_on_the_cpu() {
        let cpu = CpuBackend::new();
        let t = cpu.placeholder(&[2, 3], DType::BF16).unwrap();
        assert_eq!((t.shape(), t.dtype()), (&[2usize, 3][..], DType::BF16));
        assert_eq!(cpu.download(&t).unwrap().to_f32(), vec![0.0; 6]);
        let p = preset("flux-tiny");
        let model = Flux::build(&p, &mut WeightLoader::shapes_only(&cpu, DType::F32)).unwrap();
        let out = model.forward_host(&cpu, &step_inputs(&p, step(1, 4, 2))).unwrap();
        assert_eq!(out.shape, vec![1, 4, p.out_channels]);
    }

    #[test]
    fn training_estimates_bracket_inference() {
        let p = preset("flux-small");
        let shape = step(1, 64, 16);
        let ws = plan::HOPPER_CUBLASLT_WORKSPACE;
        let t = training_memory_estimate(&p, shape, DType::BF16, Some(4), ws).unwrap();
        let inference = MemoryPlan::of(&trace_flux_step(&p, shape, DType::BF16, Some(4)).unwrap(), ws);
        assert_eq!(t.weights, inference.weights);
        // Inference frees as it goes; checkpointing keeps a block's worth more; keeping
        // everything keeps most.
        assert!(inference.peak() < t.peak_block_checkpointing() && t.peak_block_checkpointing() < t.peak_all_kept());
        let stream = |tokens: u64| plan::aligned(tokens * 768 * 2);
        assert_eq!(t.block_inputs, 2 * (stream(64) + stream(16)) + 4 * stream(80));
    }
}
