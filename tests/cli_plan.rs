//! `engine plan` as a user runs it: the design's FLOP check values for FLUX.1-dev, a memory plan
//! that fits the target, the training estimate labelled as one, and bad values answered by one
//! clear line.

mod common;
use common::{assert_fails_with, engine};

/// Runs `engine plan` with `args`, expects success, returns stdout.
fn plan(args: &[&str]) -> String {
    let mut all = vec!["plan"];
    all.extend_from_slice(args);
    let out = engine(&all);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The line that starts (after indentation) with `label`.
fn line<'a>(stdout: &'a str, label: &str) -> &'a str {
    stdout.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("no '{label}' line in:\n{stdout}"))
}

/// The decimal-gigabyte column of a memory line.
fn gigabytes(line: &str) -> f64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "GB").unwrap_or_else(|| panic!("no GB in '{line}'"));
    words[at - 1].parse().unwrap()
}

#[test]
fn flux_dev_steps_match_the_design_check_values() {
    // Design section 11: FLUX.1-dev, 512 text tokens, batch 1: 21.50 TFLOP at 512x512 output
    // (1024 image tokens), 74.38 TFLOP at 1024x1024 (4096 tokens).
    for (res, tokens, tflop) in [("512", "1024 image", "21.50 TFLOP"), ("1024", "4096 image", "74.38 TFLOP")] {
        let out = plan(&["--shape", "flux-dev", "--res", res, "--batch", "1", "--txt-tokens", "512"]);
        assert!(line(&out, "tokens").contains(tokens), "{out}");
        assert!(line(&out, "total").contains(tflop), "{res}: {out}");
        assert!(line(&out, "parameters").contains("11.90B (11901408320)"), "{out}");
        // bf16 weights: 2 bytes x 11.90B parameters.
        assert_eq!(gigabytes(line(&out, "weights")), 23.80);
    }
}

#[test]
fn flux_dev_1024_inference_fits_in_25_gb() {
    let out = plan(&["--res", "1024"]);
    let (peak, weights) = (gigabytes(line(&out, "planned peak")), gigabytes(line(&out, "weights")));
    let (arena, bound) = (gigabytes(line(&out, "arena")), gigabytes(line(&out, "lower bound")));
    assert!(peak < 25.0, "{out}");
    assert!(arena >= bound && peak > weights + arena, "{out}");
}

#[test]
fn training_is_three_forwards_and_labelled_an_estimate() {
    let out = plan(&["--res", "1024", "--train"]);
    // 3 x 74.378 TFLOP.
    assert!(line(&out, "FLOPs   ").contains("223.13 TFLOP"), "{out}");
    assert!(out.contains("training step: estimates"), "{out}");
    let (all_kept, checkpointed) = (gigabytes(line(&out, "peak, all kept")), gigabytes(line(&out, "peak, per block")));
    let inference = gigabytes(line(&out, "planned peak"));
    assert!(inference < checkpointed && checkpointed < all_kept, "{out}");
}

#[test]
fn small_shapes_lora_and_dtypes_are_planned() {
    let f32_out = plan(&["--shape", "flux-tiny", "--res", "64", "--batch", "2", "--txt-tokens", "8", "--dtype", "f32"]);
    let bf16_out = plan(&["--shape", "flux-tiny", "--res", "64", "--batch", "2", "--txt-tokens", "8"]);
    assert!(line(&f32_out, "tokens").contains("16 image (4x4 patches of the 8x8 latent) + 8 text"), "{f32_out}");
    assert!(line(&f32_out, "plan").contains("F32 weights and activations"), "{f32_out}");
    // The same FLOPs whatever the dtype, other bytes.
    assert_eq!(line(&f32_out, "total"), line(&bf16_out, "total"));
    assert_ne!(line(&f32_out, "weights"), line(&bf16_out, "weights"));

    let lora = plan(&["--shape", "flux-small", "--res", "256", "--lora-rank", "8"]);
    assert!(line(&lora, "plan").contains("unmerged LoRA rank 8"), "{lora}");
    assert!(line(&lora, "lora").contains("FLOP"), "{lora}");
}

#[test]
fn bad_values_are_one_clear_line() {
    let fails = |args: &[&str], fragments: &[&str]| {
        let mut all = vec!["plan"];
        all.extend_from_slice(args);
        assert_fails_with(&engine(&all), fragments);
    };
    fails(&["--res", "1000"], &["--res 1000", "multiple of 16"]);
    fails(&["--res", "0"], &["--res 0"]);
    fails(&["--batch", "0"], &["--batch 0"]);
    fails(&["--shape", "flux-huge"], &["flux-huge", "flux-dev, flux-small, flux-tiny"]);
    fails(&["--dtype", "int8"], &["--dtype int8", "bf16"]);
    fails(&["--lora-rank", "0"], &["--lora-rank 0"]);
}
