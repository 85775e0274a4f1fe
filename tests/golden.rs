//! The engine against diffusers' `FluxTransformer2DModel` (PyTorch, f32): small random models
//! and inputs written by `tools/golden.sh` into tests/golden/, in both key layouts, with bf16
//! weights, and with LoRA adapters in three layouts loaded through diffusers' own converters.

mod common;
use common::max_rel_err;

use engine::model::{load_flux, FluxInputs, FluxParams, LoraMode, PartialFluxParams};
use engine::CpuBackend;
use loaders::safetensors::Checkpoint;
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
