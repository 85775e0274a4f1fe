//! Against files made by diffusers itself (tests/golden, see its README): the diffusers and BFL
//! layouts of one model must load to identical internal tensors, and diffusers' LoRA files must
//! land on rows that exist in that model, with the scales the generator used.

use std::collections::BTreeSet;
use std::path::PathBuf;

use loaders::flux::{FluxCheckpoint, Layout};
use loaders::lora::{LoraAdapter, LoraLayout};
use loaders::safetensors::FileDType;

const HIDDEN: usize = 64;

fn golden(case: &str, file: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden").join(case).join(file);
    assert!(path.exists(), "{} is missing: run tools/golden.sh", path.display());
    path
}

#[test]
fn diffusers_and_bfl_files_load_identically() {
    for case in ["guidance-b2", "control-ch128", "noguid-b3"] {
        let diffusers = FluxCheckpoint::open(&golden(case, "transformer.diffusers.safetensors")).unwrap();
        let bfl = FluxCheckpoint::open(&golden(case, "transformer.bfl.safetensors")).unwrap();
        assert_eq!((diffusers.layout(), bfl.layout()), (Layout::Diffusers, Layout::Bfl));
        assert_eq!(diffusers.names().collect::<Vec<_>>(), bfl.names().collect::<Vec<_>>(), "{case}");
        for name in bfl.names() {
            let (d, b) = (diffusers.load(name).unwrap(), bfl.load(name).unwrap());
            assert_eq!(d, b, "{case}: {name} from {}", diffusers.source(name).unwrap());
            assert_eq!(diffusers.shape(name).unwrap(), d.shape, "{case}: {name}");
        }
    }
}

#[test]
fn bf16_file_holds_the_rounded_weights() {
    let f32s = FluxCheckpoint::open(&golden("guidance-b2", "transformer.bfl.safetensors")).unwrap();
    let bf16s = FluxCheckpoint::open(&golden("guidance-b2", "transformer.bfl.bf16.safetensors")).unwrap();
    for name in f32s.names() {
        assert_eq!(bf16s.dtype(name), Some(FileDType::BF16), "{name}");
        let rounded = f32s.load(name).unwrap().cast(loaders::DType::BF16);
        assert_eq!(bf16s.load(name).unwrap(), rounded, "{name}");
    }
}

/// Every part must fit its target in the real model: `in` equal, rows inside. Returns, per
/// target, the row ranges covered.
fn check_fit(adapter: &LoraAdapter, model: &FluxCheckpoint) -> Vec<(String, usize, usize)> {
    let mut covered = Vec::new();
    for p in &adapter.parts {
        let shape = model.shape(&format!("{}.weight", p.target)).unwrap_or_else(|| panic!("{} -> {}", p.source, p.target));
        assert_eq!(p.down.shape[1], shape[1], "{}: in", p.source);
        assert!(p.out_offset + p.out_len() <= shape[0], "{}: rows {}+{} of {}", p.source, p.out_offset, p.out_len(), shape[0]);
        if let Some(b) = &p.up_bias {
            assert_eq!(b.shape, [p.out_len()], "{}", p.source);
        }
        covered.push((p.target.clone(), p.out_offset, p.out_offset + p.out_len()));
    }
    covered.sort();
    covered
}

#[test]
fn peft_adapter_places_split_projections_and_honours_alpha() {
    let model = FluxCheckpoint::open(&golden("guidance-b2", "transformer.bfl.safetensors")).unwrap();
    let a = LoraAdapter::open(&golden("guidance-b2", "lora.peft.safetensors"), HIDDEN).unwrap();
    assert_eq!(a.layout, LoraLayout::Peft);
    assert_eq!(a.rank(), 4);
    let covered = check_fit(&a, &model);
    // q, k, v (64 rows each) and proj_mlp (256) tile linear1 exactly.
    let linear1: Vec<_> = covered.iter().filter(|(t, ..)| t == "single_blocks.1.linear1").map(|&(_, s, e)| (s, e)).collect();
    assert_eq!(linear1, [(0, 64), (64, 128), (128, 192), (192, 448)]);
    let qkv: Vec<_> = covered.iter().filter(|(t, ..)| t == "double_blocks.0.txt_attn.qkv").map(|&(_, s, e)| (s, e)).collect();
    assert_eq!(qkv, [(0, 64), (64, 128), (128, 192)]);
    for p in &a.parts {
        let module = p.source.strip_prefix("transformer.").unwrap();
        let expected = match module {
            "transformer_blocks.0.attn.to_q" | "transformer_blocks.0.attn.to_add_out" | "transformer_blocks.1.ff.net.0.proj" => 0.5,
            "transformer_blocks.0.attn.to_out.0" | "transformer_blocks.1.attn.to_k" | "single_transformer_blocks.1.proj_out" => 2.0,
            _ => 1.0,
        };
        assert_eq!(p.scale, expected, "{module}");
    }
}

#[test]
fn kohya_adapter_targets_bfl_linears() {
    let model = FluxCheckpoint::open(&golden("guidance-b2", "transformer.bfl.safetensors")).unwrap();
    let a = LoraAdapter::open(&golden("guidance-b2", "lora.kohya.safetensors"), HIDDEN).unwrap();
    assert_eq!(a.layout, LoraLayout::Kohya);
    // 2 double blocks x 10 linears + 2 single blocks x 3, each whole.
    let covered = check_fit(&a, &model);
    assert_eq!(covered.len(), 26);
    for (target, start, end) in covered {
        assert_eq!((start, end), (0, model.shape(&format!("{target}.weight")).unwrap()[0]), "{target}");
    }
    assert!(a.parts.iter().all(|p| p.scale == 0.5));
}

#[test]
fn bfl_control_adapter_carries_biases_and_norm_scales() {
    let model = FluxCheckpoint::open(&golden("guidance-b2", "transformer.bfl.safetensors")).unwrap();
    let a = LoraAdapter::open(&golden("guidance-b2", "lora.bfl.safetensors"), HIDDEN).unwrap();
    assert_eq!(a.layout, LoraLayout::Bfl);
    check_fit(&a, &model);
    let linears: BTreeSet<String> = model.names().filter_map(|n| n.strip_suffix(".weight")).map(str::to_string).collect();
    let targets: BTreeSet<String> = a.parts.iter().map(|p| p.target.clone()).collect();
    assert_eq!(targets, linears, "every linear of the model is adapted");
    assert!(a.parts.iter().all(|p| p.scale == 1.0 && p.up_bias.is_some()));
    let norms: BTreeSet<&str> = model.names().filter(|n| n.ends_with("_norm.scale")).collect();
    let replaced: BTreeSet<&str> = a.replacements.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(replaced, norms);
    for (name, t) in &a.replacements {
        assert_eq!(Some(t.shape.clone()), model.shape(name), "{name}");
    }
}
