//! Whole-model properties on seeded random weights: determinism, LoRA merged = unmerged, a
//! zero LoRA is the identity, and batch items are independent.

use engine::model::positions::image_ids;
use engine::model::weights::WeightLoader;
use engine::model::{Flux, FluxInputs, FluxParams, LoraMode};
use engine::CpuBackend;
use loaders::lora::{LoraAdapter, LoraLayout, LoraPart};
use loaders::HostTensor;

fn params() -> FluxParams {
    FluxParams::preset("flux-tiny").unwrap()
}

fn noise(shape: Vec<usize>, seed: usize) -> HostTensor {
    let n = shape.iter().product::<usize>();
    HostTensor::from_f32(shape, (0..n).map(|i| ((((i + 17 * seed) * 2654435761) % 2000) as f32 / 1000.0) - 1.0).collect())
}

fn inputs(p: &FluxParams, batch: usize) -> FluxInputs {
    let (rows, cols, lt) = (3, 5, 4);
    let l = rows * cols;
    FluxInputs {
        img: noise(vec![batch, l, p.in_channels], 1),
        img_ids: HostTensor::from_f32(vec![batch, l, 3], image_ids(rows, cols).repeat(batch)),
        txt: noise(vec![batch, lt, p.context_in_dim], 2),
        txt_ids: HostTensor::from_f32(vec![batch, lt, 3], vec![0.0; batch * lt * 3]),
        timesteps: HostTensor::from_f32(vec![batch], (0..batch).map(|i| 0.2 + 0.3 * i as f32).collect()),
        y: noise(vec![batch, p.vec_in_dim], 3),
        guidance: Some(HostTensor::from_f32(vec![batch], vec![3.5; batch])),
    }
}

fn adapter(h: usize, up_scale: f32) -> LoraAdapter {
    let part = |target: &str, offset: usize, in_f: usize, out_len: usize, seed: usize| LoraPart {
        target: target.to_string(),
        out_offset: offset,
        down: noise(vec![3, in_f], seed),
        up: HostTensor::from_f32(vec![out_len, 3], noise(vec![out_len, 3], seed + 1).to_f32().iter().map(|v| v * up_scale).collect()),
        up_bias: Some(HostTensor::from_f32(vec![out_len], vec![0.05 * up_scale; out_len])),
        scale: 0.5,
        source: target.to_string(),
    };
    LoraAdapter {
        path: "synthetic".into(),
        layout: LoraLayout::Peft,
        replacements: Vec::new(),
        skipped: Vec::new(),
        parts: vec![
            part("double_blocks.0.img_attn.qkv", h, h, h, 10),
            part("double_blocks.0.txt_mlp.2", 0, 4 * h, h, 20),
            part("single_blocks.0.linear1", 3 * h, h, 4 * h, 30),
            part("final_layer.linear", 0, h, 64, 40),
        ],
    }
}

fn run(p: &FluxParams, lora: Option<(LoraAdapter, LoraMode)>, inputs: &FluxInputs) -> Vec<f32> {
    let b = CpuBackend::new();
    let mut w = WeightLoader::random(&b, 7);
    if let Some((a, mode)) = lora {
        w = w.with_lora(vec![a], mode);
    }
    let model = Flux::build(p, &mut w).unwrap();
    w.finish().unwrap();
    model.forward_host(&b, inputs).unwrap().to_f32()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn forward_is_deterministic_and_finite() {
    let p = params();
    let x = inputs(&p, 2);
    let a = run(&p, None, &x);
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, run(&p, None, &x));
}

#[test]
fn lora_merged_equals_unmerged_and_zero_lora_is_identity() {
    let p = params();
    let x = inputs(&p, 1);
    let base = run(&p, None, &x);
    let merged = run(&p, Some((adapter(p.hidden_size, 1.0), LoraMode::Merged)), &x);
    let unmerged = run(&p, Some((adapter(p.hidden_size, 1.0), LoraMode::Unmerged)), &x);
    let scale = base.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(max_diff(&merged, &base) > 1e-2 * scale, "the adapter must change the output");
    assert!(max_diff(&merged, &unmerged) < 1e-5 * scale, "merged and unmerged differ by {}", max_diff(&merged, &unmerged));
    let zero = run(&p, Some((adapter(p.hidden_size, 0.0), LoraMode::Unmerged)), &x);
    assert_eq!(zero, base);
}

#[test]
fn batch_items_are_independent() {
    let p = params();
    let both = inputs(&p, 2);
    let out = run(&p, None, &both);
    let half = out.len() / 2;
    // Item 1 alone: slice every input down to its second sample.
    let second = |t: &HostTensor| {
        let n = t.len() / 2;
        let mut shape = t.shape.clone();
        shape[0] = 1;
        HostTensor::from_f32(shape, t.to_f32()[n..].to_vec())
    };
    let one = FluxInputs {
        img: second(&both.img),
        img_ids: second(&both.img_ids),
        txt: second(&both.txt),
        txt_ids: second(&both.txt_ids),
        timesteps: second(&both.timesteps),
        y: second(&both.y),
        guidance: both.guidance.as_ref().map(second),
    };
    let alone = run(&p, None, &one);
    assert!(max_diff(&alone, &out[half..]) < 1e-5);
}
