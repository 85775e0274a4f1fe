//! The engine against diffusers' `FluxTransformer2DModel` (PyTorch, f32): small random models
//! and inputs written by `tools/golden.sh` into tests/golden/, in both key layouts, with bf16
//! weights, and with LoRA adapters in three layouts loaded through diffusers' own converters; and
//! the LoRA gradients of the engine's backward against PyTorch autograd through peft.

mod common;
use common::max_rel_err;

use engine::backend::Backend;
use engine::model::backward::{Checkpointing, FluxGrads};
use engine::model::flux::scalars;
use engine::model::{load_flux, Adapters, Conditioning, Flux, FluxInputs, FluxParams, LoraMode, PartialFluxParams, Trainable};
use engine::train::params::{down_name, up_name, LoraParams, TensorSet, Trained};
use engine::CpuBackend;
use loaders::lora::{LoraAdapter, LoraPart};
use loaders::safetensors::Checkpoint;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const TOLERANCE: f64 = 1e-4;

fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden").join(case)
}

fn cases() -> Vec<&'static str> {
    vec!["guidance-b2", "control-ch128", "noguid-b3"]
}

fn check(case: &str, model: &str, config: bool, loras: &[&str], mode: LoraMode, expected: &str) {
    let dir = golden(case);
    let b = CpuBackend::new();
    let lora_paths: Vec<PathBuf> = loras.iter().map(|l| dir.join(l)).collect();
    let lora_refs: Vec<&Path> = lora_paths.iter().map(|p| p.as_path()).collect();
    let given = if config { FluxParams::read_partial(&dir.join("config.json")).unwrap() } else { PartialFluxParams::default() };
    let (flux, warnings) = load_flux(&b, &dir.join(model), &given, &lora_refs, mode).unwrap_or_else(|e| panic!("{case}/{model}: {e:#}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    let inputs = FluxInputs::read(&Checkpoint::open(&dir.join("inputs.safetensors")).unwrap()).unwrap();
    let out = flux.forward_host(&b, &inputs).unwrap_or_else(|e| panic!("{case}/{model}: {e:#}"));
    let want = Checkpoint::open(&dir.join(expected)).unwrap().read("out").unwrap();
    assert_eq!(out.shape, want.shape, "{case}/{model}: output shape");
    let err = max_rel_err(&out.to_f32(), &want.to_f32());
    eprintln!("{case}/{model} loras {loras:?} {mode:?}: max relative error {err:.2e}");
    assert!(err < TOLERANCE, "{case}/{model} loras {loras:?} {mode:?}: max relative error {err:.3e} >= {TOLERANCE:e}");
}

#[test]
fn both_layouts_match_diffusers() {
    for case in cases() {
        for model in ["transformer.bfl.safetensors", "transformer.diffusers.safetensors"] {
            check(case, model, false, &[], LoraMode::Merged, "out.safetensors");
        }
    }
}

#[test]
fn explicit_config_gives_the_same_model() {
    for case in cases() {
        check(case, "transformer.diffusers.safetensors", true, &[], LoraMode::Merged, "out.safetensors");
    }
}

#[test]
fn bf16_weights_match_diffusers_with_rounded_weights() {
    check("guidance-b2", "transformer.bfl.bf16.safetensors", false, &[], LoraMode::Merged, "out.bf16.safetensors");
}

#[test]
fn lora_adapters_match_diffusers_in_every_layout_and_mode() {
    for (lora, expected) in [
        ("lora.peft.safetensors", "out.lora-peft.safetensors"),
        ("lora.kohya.safetensors", "out.lora-kohya.safetensors"),
        ("lora.bfl.safetensors", "out.lora-bfl.safetensors"),
    ] {
        for model in ["transformer.bfl.safetensors", "transformer.diffusers.safetensors"] {
            for mode in [LoraMode::Merged, LoraMode::Unmerged] {
                check("guidance-b2", model, false, &[lora], mode, expected);
            }
        }
    }
}

#[test]
fn lora_changes_the_output() {
    // Guards the LoRA goldens themselves: an adapter that did nothing would pass the test above
    // with the base output.
    let dir = golden("guidance-b2");
    let base = Checkpoint::open(&dir.join("out.safetensors")).unwrap().read("out").unwrap().to_f32();
    for f in ["out.lora-peft.safetensors", "out.lora-kohya.safetensors", "out.lora-bfl.safetensors"] {
        let with = Checkpoint::open(&dir.join(f)).unwrap().read("out").unwrap().to_f32();
        let err = max_rel_err(&with, &base);
        assert!(err > 1e-3, "{f} differs from the base output by only {err:.2e}");
    }
}

// LoRA gradients against PyTorch autograd through diffusers + peft (tests/golden/lora-grads, made by
// tools/golden/make_lora_grad_goldens.py on the guidance-b2 model): loss = sum(out * g_out).

/// Worst allowed `max |engine - torch| / max |torch|` per gradient tensor. The reference is f64;
/// the engine's f32 forward matches diffusers to ~1e-5 of the output, and a gradient sums
/// products over all tokens and channels of a 4-block backward, so it may lose a few times that.
/// A transposed, misplaced or wrongly scaled gradient is off by O(1).
const GRAD_TOLERANCE: f64 = 1e-4;

/// The engine's output and LoRA gradients for the golden inputs and `g_out` of `grads.{kind}`,
/// training the adapters of `tr`.
fn engine_lora_grads(
    b: &CpuBackend,
    flux: &Flux<CpuBackend>,
    tr: Trainable<CpuBackend>,
    kind: &str,
) -> (FluxGrads<CpuBackend>, Checkpoint) {
    let dir = golden("lora-grads");
    let inputs = FluxInputs::read(&Checkpoint::open(&dir.join("inputs.safetensors")).unwrap()).unwrap();
    inputs.validate(&flux.params).unwrap();
    let reference = Checkpoint::open(&dir.join(format!("grads.{kind}.safetensors"))).unwrap();
    let c = Conditioning::new(b, flux, &inputs.txt, &inputs.y, inputs.guidance.as_ref(), &inputs.txt_ids, &inputs.img_ids).unwrap();
    let img = b.input(&inputs.img).unwrap();
    let (out, acts) = flux.forward_train(b, &img, &scalars(b, &inputs.timesteps).unwrap(), &c, tr, Checkpointing::Off).unwrap();
    let want = reference.read("out").unwrap();
    let err = max_rel_err(&b.download(&out).unwrap().to_f32(), &want.to_f32());
    assert!(err < TOLERANCE, "{kind}: forward_train output differs from diffusers by {err:.3e}");
    let g_out = b.input(&reference.read("g_out").unwrap()).unwrap();
    (flux.backward(b, &img, &c, tr, acts, &g_out).unwrap(), reference)
}

/// Compares each (name, engine, torch) and reports the worst error per group (the module kind
/// without its block index, and A or B), failing on any tensor over `GRAD_TOLERANCE`.
fn assert_grads_close(what: &str, compared: Vec<(String, Vec<f32>, Vec<f32>)>) {
    let mut worst: BTreeMap<String, (f64, String)> = BTreeMap::new();
    let mut failures = Vec::new();
    for (name, got, want) in &compared {
        assert!(want.iter().any(|&v| v != 0.0), "{what}: the golden gradient of {name} is zero: it would test nothing");
        // max_rel_err's fold skips NaN.
        assert!(got.iter().all(|v| v.is_finite()), "{what}: the engine's gradient of {name} is not finite");
        let err = max_rel_err(got, want);
        if err >= GRAD_TOLERANCE {
            failures.push(format!("{name}: {err:.3e}"));
        }
        let mut parts: Vec<&str> = Vec::new();
        for p in name.strip_prefix("transformer.").unwrap_or(name).split('.') {
            if !(parts.last().is_some_and(|l| l.ends_with("blocks")) && p.parse::<usize>().is_ok()) {
                parts.push(p);
            }
        }
        let group = parts.join(".");
        let entry = worst.entry(group).or_insert((0.0, String::new()));
        if err > entry.0 {
            *entry = (err, name.clone());
        }
    }
    for (group, (err, name)) in &worst {
        eprintln!("{what}: {group:<50} worst {err:.2e} ({name})");
    }
    assert!(failures.is_empty(), "{what}: gradients off by more than {GRAD_TOLERANCE:e}: {failures:?}");
}

#[test]
fn lora_gradients_match_pytorch_autograd() {
    // A peft file with a distinct lora_A and its own alpha per module, loaded unmerged by the real
    // loader: to_q/to_k/to_v (and proj_mlp) become deltas at row offsets of the fused linears.
    let b = CpuBackend::new();
    let lora = golden("lora-grads").join("lora.peft.safetensors");
    let model = golden("guidance-b2").join("transformer.diffusers.safetensors");
    let (flux, warnings) = load_flux(&b, &model, &PartialFluxParams::default(), &[], LoraMode::Unmerged).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let adapter = LoraAdapter::open(&lora, flux.params.hidden_size).unwrap();
    assert!(adapter.parts.iter().any(|p| p.scale != 1.0), "the file must exercise alpha / rank");
    let adapters = Adapters::from_file(&b, &flux, &adapter).unwrap();
    let (grads, reference) = engine_lora_grads(&b, &flux, Trainable::Lora(&adapters), "peft");

    // `backward` gives one gradient per delta in the order the adapters put them on a linear; a
    // delta is the part with its target and row offset.
    let mut compared = Vec::new();
    let mut used = BTreeSet::new();
    for (target, deltas) in adapters.iter() {
        let g = grads.lora.get(target).unwrap_or_else(|| panic!("no gradient for '{target}'"));
        assert_eq!(g.len(), deltas.len(), "{target}");
        for (delta, g) in deltas.iter().zip(g) {
            let part = adapter.parts.iter().find(|p| &p.target == target && p.out_offset == delta.offset).unwrap();
            for (suffix, tensor) in [("lora_A.weight", &g.down), ("lora_B.weight", &g.up)] {
                let key = format!("{}.{suffix}", part.source);
                let want = reference.read(&key).unwrap_or_else(|e| panic!("{key}: {e}"));
                let got = b.download(tensor).unwrap();
                assert_eq!(got.shape, want.shape, "{key}");
                compared.push((key.clone(), got.to_f32(), want.to_f32()));
                used.insert(key);
            }
        }
    }
    let expected: BTreeSet<String> = reference.names().filter(|n| n.contains(".lora_")).map(str::to_string).collect();
    assert_eq!(used, expected, "every golden gradient compared, once");
    assert_grads_close("peft", compared);
}

#[test]
fn trained_lora_gradients_match_pytorch_autograd() {
    // What `engine train` trains: `LoraParams`, one adapter per token-path linear under its BFL
    // name, scale 1. The golden file is the layout it exports (`write_lora`): the members of a
    // fused linear share lora_A, so d/d down is the sum of the members' lora_A gradients and
    // d/d up stacks their lora_B gradients by row offset.
    let b = CpuBackend::new();
    let lora = golden("lora-grads").join("lora.trainer.safetensors");
    let model = golden("guidance-b2").join("transformer.diffusers.safetensors");
    let (mut flux, _) = load_flux(&b, &model, &PartialFluxParams::default(), &[], LoraMode::Unmerged).unwrap();
    let adapter = LoraAdapter::open(&lora, flux.params.hidden_size).unwrap();
    let mut members: BTreeMap<String, Vec<&LoraPart>> = BTreeMap::new();
    for part in &adapter.parts {
        assert_eq!(part.scale, 1.0, "{}", part.source);
        members.entry(part.target.clone()).or_default().push(part);
    }
    let mut set = TensorSet::default();
    for parts in members.values_mut() {
        parts.sort_by_key(|p| p.out_offset);
        let down = &parts[0].down;
        assert!(parts.iter().all(|p| p.down == *down), "{}: fused members must share lora_A", parts[0].target);
        let mut rows = 0;
        let mut up = Vec::new();
        for p in parts.iter() {
            assert_eq!(p.out_offset, rows, "{}: members must tile the rows", p.source);
            rows += p.out_len();
            up.extend(p.up.to_f32());
        }
        let target = &parts[0].target;
        set.insert(down_name(target), down.shape.clone(), down.to_f32());
        set.insert(up_name(target), vec![rows, down.shape[0]], up);
    }
    let params = LoraParams::new(&b, &mut flux, &set).unwrap();
    let (grads, reference) = engine_lora_grads(&b, &flux, params.trainable(), "trainer");
    let got: BTreeMap<String, Vec<f32>> = params
        .masters()
        .names
        .iter()
        .cloned()
        .zip(params.gradients(grads).unwrap().iter().map(|g| b.download(g).unwrap().to_f32()))
        .collect();

    let read = |key: String| reference.read(&key).unwrap_or_else(|e| panic!("{key}: {e}")).to_f32();
    let mut compared = Vec::new();
    for (target, parts) in &members {
        let mut down = vec![0f32; parts[0].down.len()];
        let mut up = Vec::new();
        for p in parts {
            down.iter_mut().zip(read(format!("{}.lora_A.weight", p.source))).for_each(|(d, g)| *d += g);
            up.extend(read(format!("{}.lora_B.weight", p.source)));
        }
        compared.push((down_name(target), got[&down_name(target)].clone(), down));
        compared.push((up_name(target), got[&up_name(target)].clone(), up));
    }
    assert_eq!(compared.len(), got.len(), "every trained tensor compared");
    assert_grads_close("trainer", compared);
}
