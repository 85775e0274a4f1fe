//! The self-test harness, checked on the CPU: it must pass the reference against itself, flag an
//! op whose results drift, flag an output element a kernel never writes (the NaN poison), and the
//! CLI must print its table and exit non-zero on failure or when no GPU exists. The same checks on
//! a real GPU live in `tests/gpu.rs`.

mod common;

use common::hooked::Hooked;
use common::{assert_fails_with, engine, s};
use engine::backend::cpu::CpuBackend;
use engine::selftest::{attention_backward_kernel_checks, attention_kernel_checks, model_check, op_checks, training_checks};

/// The CPU with two planted bugs: `silu` 10% too large, and `gelu_tanh` leaving its first
/// element unwritten (NaN) while outputs are poisoned.
fn faulty() -> Hooked {
    Hooked { silu_scale: 1.1, gelu_skips_first_when_poisoned: true, ..Hooked::default() }
}

#[test]
fn every_op_is_checked_and_exactly_the_faulty_ones_fail() {
    let checks = op_checks(&faulty(), 7).unwrap();
    let ops: std::collections::BTreeSet<&str> = checks.iter().map(|c| c.op.split('[').next().unwrap().trim()).collect();
    for op in [
        "linear",
        "linear_gelu",
        "lora_add",
        "layer_norm_modulate",
        "qk_norm_rope",
        "attention",
        "attention_bias",
        "rms_norm",
        "gelu_tanh",
        "silu",
        "add",
        "mul",
        "gated_residual",
        "concat",
        "narrow",
        "timestep_embedding",
        "conv2d",
        "group_norm",
        "upsample_nearest2x",
        "transpose_last2",
        "pixel_unshuffle",
        "pixel_shuffle",
        "affine",
        "zeros",
    ] {
        assert!(ops.contains(op), "no check covers {op}");
    }
    let failed: std::collections::BTreeSet<&str> = checks.iter().filter(|c| !c.passed()).map(|c| c.op.as_str()).collect();
    assert_eq!(failed, ["gelu_tanh", "silu"].into_iter().collect(), "{}", engine::selftest::render_table(&checks));
    let gelu = checks.iter().find(|c| c.op == "gelu_tanh").unwrap();
    assert!(gelu.max_rel_err.is_infinite(), "the unwritten element must read as NaN");
}

#[test]
fn each_attention_kernel_of_a_backend_is_checked_forced_and_a_wrong_one_fails() {
    assert!(attention_kernel_checks(&CpuBackend::new(), 1).unwrap().is_empty(), "the CPU has no choice of kernels");
    let hooked = Hooked { attention_kernels: vec![("portable", 1.0), ("sm90a", 1.02)], ..Hooked::default() };
    let checks = attention_kernel_checks(&hooked, 1).unwrap();
    let table = engine::selftest::render_table(&checks);
    for kernel in ["portable", "sm90a"] {
        let outputs: Vec<_> = checks.iter().filter(|c| c.op == format!("attention ({kernel})")).collect();
        let lse: Vec<_> = checks.iter().filter(|c| c.op == format!("attention ({kernel}) lse")).collect();
        assert!(outputs.len() >= 4 && outputs.len() == lse.len(), "{table}");
        // The planted 2% error is in the output only.
        assert!(outputs.iter().all(|c| c.passed() == (kernel == "portable")), "{table}");
        assert!(lse.iter().all(|c| c.passed()), "{table}");
    }
}

#[test]
fn each_attention_backward_kernel_is_checked_forced_and_a_wrong_one_fails() {
    assert!(attention_backward_kernel_checks(&CpuBackend::new(), 1).unwrap().is_empty(), "the CPU has no choice of kernels");
    let hooked = Hooked { attention_backward_kernels: vec![("simt", 1.0), ("mma", 1.02)], ..Hooked::default() };
    let checks = attention_backward_kernel_checks(&hooked, 1).unwrap();
    let table = engine::selftest::render_table(&checks);
    for kernel in ["simt", "mma"] {
        for grad in ["gq", "gk", "gv"] {
            let op = format!("attention backward ({kernel}) {grad}");
            let mine: Vec<_> = checks.iter().filter(|c| c.op == op).collect();
            assert_eq!(mine.len(), 4, "one check per shape: {table}");
            // The planted 2% error is past the 1% tolerance; the right kernel matches exactly.
            assert!(mine.iter().all(|c| c.passed() == (kernel == "simt")), "{table}");
        }
    }
}

#[test]
fn a_faulty_op_inside_the_model_fails_the_forward_check() {
    // flux-tiny's modulation goes through SiLU: its 10% error reaches the output.
    let c = model_check(&faulty(), "flux-tiny", (4, 4), 3).unwrap();
    assert!(!c.passed(), "{c:?}");
    let c = model_check(&CpuBackend::new(), "flux-tiny", (4, 4), 3).unwrap();
    assert!(c.passed() && c.max_rel_err == 0.0, "{c:?}");
}

#[test]
fn cli_selftest_on_the_cpu_prints_the_table_and_passes() {
    let out = engine(&["selftest", "--device", "cpu"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().next().unwrap().starts_with("device  cpu"), "{stdout}");
    for op in ["attention", "qk_norm_rope", "conv2d", "forward flux-tiny", "forward flux-small"] {
        assert!(stdout.lines().any(|l| l.starts_with(op) && l.ends_with("pass")), "{op} missing: {stdout}");
    }
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

#[test]
fn asking_for_cuda_without_a_gpu_is_one_clear_line() {
    if engine::backend::cuda::driver_present() {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    assert_fails_with(&engine(&["selftest"]), &["--device cuda", "no CUDA driver"]);
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/guidance-b2");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let (model, inputs) = (golden.join("transformer.bfl.safetensors"), golden.join("inputs.safetensors"));
    let forward = engine(&["forward", "--device", "cuda", "--model", s(&model), "--inputs", s(&inputs), "--out", s(&out)]);
    assert_fails_with(&forward, &["--device cuda", "no CUDA driver"]);
    assert!(!out.exists());
    // auto falls back to the CPU.
    let auto = engine(&["forward", "--device", "auto", "--model", s(&model), "--inputs", s(&inputs), "--out", s(&out)]);
    assert!(auto.status.success() && String::from_utf8_lossy(&auto.stdout).contains("device  cpu"));
}

#[test]
fn cli_kernels_reports_every_kernel_against_the_ceilings() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("kernels.json");
    let out = engine(&["kernels", "--device", "cpu", "--size", "small", "--iters", "1", "--json", s(&json)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let kernels = doc["kernels"].as_array().unwrap();
    let names: Vec<&str> = kernels.iter().map(|k| k["kernel"].as_str().unwrap()).collect();
    for k in [
        "copy (ceiling)",
        "gemm (ceiling)",
        "attention fwd",
        "attention bwd",
        "layer_norm_modulate",
        "qk_norm_rope",
        "gated_residual",
        "lora_add (r16)",
    ] {
        assert!(names.contains(&k), "{k} missing from {names:?}");
    }
    for k in kernels {
        let (rate, secs, frac) = (k["rate"].as_f64().unwrap(), k["seconds"].as_f64().unwrap(), k["fraction_of_ceiling"].as_f64().unwrap());
        assert!(rate > 0.0 && secs > 0.0 && frac > 0.0, "{k}");
    }
    // Each ceiling is measured against itself.
    assert_eq!(kernels[0]["fraction_of_ceiling"].as_f64(), Some(1.0));
    assert_eq!(kernels[1]["fraction_of_ceiling"].as_f64(), Some(1.0));
}

#[test]
fn cli_bench_times_steps_and_reports_flops() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let args =
        ["bench", "--device", "cpu", "--shape", "flux-tiny", "--random-weights", "--res", "128", "--steps", "3", "--txt-tokens", "8"];
    let mut with_json = args.to_vec();
    with_json.extend(["--json", s(&json)]);
    let out = engine(&with_json);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(doc["steps"], 3);
    assert_eq!(doc["image_tokens"], 64);
    assert!(doc["seconds_per_step"].as_f64().unwrap() > 0.0);
    let by_class = doc["flops_by_class"].as_object().unwrap();
    let sum: u64 = by_class.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(sum, doc["flops_per_step"].as_u64().unwrap());
    assert!(by_class.contains_key("gemm") && by_class.contains_key("attention"));
    assert!(doc["mfu"].is_null() && doc["memory_peak_bytes"].is_null(), "the CPU has neither a peak rate nor device memory");
    // The planner's peak is there to compare with a GPU's measured one: at least the weights.
    let weights = 2 * doc["parameters"].as_u64().unwrap();
    assert!(doc["memory_planned_peak_bytes"].as_u64().unwrap() > weights, "{doc}");

    // One more step had every op timed: the classes' times fit inside that step's wall time.
    let profiled = doc["profiled_step_seconds"].as_f64().unwrap();
    let classes = doc["by_class"].as_object().unwrap();
    let timed: f64 = classes.values().map(|c| c["seconds"].as_f64().unwrap()).sum();
    assert!(timed > 0.0 && timed <= profiled * 1.001, "classes {timed} s, step {profiled} s");
    for class in ["gemm", "attention", "norm/elementwise"] {
        assert!(classes[class]["ops"].as_u64().unwrap() > 0, "no {class} op timed: {classes:?}");
    }
    let inference_flops = doc["flops_per_step"].as_u64().unwrap();

    // A LoRA training step: forward, backward (counted as twice the forward) and AdamW.
    let mut train = with_json.clone();
    train.extend(["--train", "--rank", "4"]);
    let out = engine(&train);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        (doc["train"].as_bool(), doc["lora_rank"].as_u64(), doc["checkpointing"].as_str()),
        (Some(true), Some(4), Some("per-block"))
    );
    let flops = doc["flops_per_step"].as_u64().unwrap();
    assert!(flops % 3 == 0 && flops > 3 * inference_flops, "training {flops} FLOPs against inference {inference_flops}");
    assert!(doc["optimizer_seconds_per_step"].as_f64().unwrap() > 0.0);
    assert!(doc["by_class"]["lora"]["ops"].as_u64().unwrap() > 0);

    // FLUX's autoencoder too, at a small output: its passes add to the latency per image.
    let mut with_ae = with_json.clone();
    with_ae[7] = "32";
    with_ae.push("--autoencoder");
    let out = engine(&with_ae);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let ae = &doc["autoencoder"];
    for key in ["encode_seconds", "decode_seconds"] {
        assert!(ae[key].as_f64().unwrap() > 0.0, "{ae}");
    }
    // design.md's FLUX autoencoder: decoding costs about twice encoding (10.47 against 4.88 TFLOP at 1024).
    let (enc, dec) = (ae["encode_flops"].as_u64().unwrap(), ae["decode_flops"].as_u64().unwrap());
    assert!(enc > 0 && dec > 2 * enc && dec < 3 * enc, "encode {enc}, decode {dec}");
    assert!(ae["seconds_per_image_with_steps"].as_f64() > doc["seconds_per_image"].as_f64(), "{doc}");

    let mut bad = args.to_vec();
    bad[7] = "1000";
    assert_fails_with(&engine(&bad), &["--res 1000", "multiple of 16"]);
    let mut bad_rank = args.to_vec();
    bad_rank.extend(["--train", "--rank", "0"]);
    assert_fails_with(&engine(&bad_rank), &["--rank"]);
    assert_fails_with(&engine(&args[..5].iter().chain(&args[6..]).copied().collect::<Vec<_>>()), &["--random-weights"]);
}

/// What a device inherits from `TrainingOps` (the SFT loss, the adversary's losses, the loser
/// synthesis and the flow arithmetic composed from the device's own kernels) against the host
/// references the CPU runs: the backend under test keeps the trait's defaults.
#[test]
fn the_training_ops_a_device_composes_match_the_host_references() {
    let checks = training_checks(&Hooked::default(), 3).unwrap();
    let table = engine::selftest::render_table(&checks);
    assert!(checks.iter().all(|c| c.passed()), "{table}");
    // The composed versions ran (in f32 where the references use f64), not the references.
    let composed = ["limit_sobolev_norm_backward", "amg_mimic_loss grad", "steepest_sobolev_deviation"];
    assert!(checks.iter().any(|c| composed.contains(&c.op.as_str()) && c.max_rel_err > 0.0), "{table}");
}

/// One planted bug per training kernel family, each of the kind a GPU kernel makes: the Sobolev
/// filters run with height and width swapped, the S-DPO loser gradient leaves its last element
/// unwritten, every AdamW step is too short. Each fails its own checks and those of the ops
/// composed from it, and nothing else.
#[test]
fn each_planted_training_bug_fails_its_checks_and_only_those() {
    let hooked = Hooked { sobolev_swaps_axes: true, sdpo_skips_last: true, adamw_short_step: true, ..Hooked::default() };
    let checks = training_checks(&hooked, 3).unwrap();
    let table = engine::selftest::render_table(&checks);
    for c in &checks {
        // The swap is invisible on a square plane (128 x 128), on a single row (1 x 9: the same
        // weights in the same order) and at exponent 0 (every weight one).
        let swap_visible =
            !c.shape.contains("128x128") && !c.shape.contains("2x1x9") && !c.shape.contains("s = 0,") && !c.shape.ends_with("s = 0");
        let filtered = (c.op.starts_with("sobolev ") && !c.op.starts_with("sobolev energy"))
            || c.op == "limit_sobolev_norm_backward"
            || c.op == "steepest_sobolev_deviation";
        let planted = (filtered && swap_visible) || c.op == "sdpo loser grad" || c.op == "adamw params";
        assert_eq!(c.passed(), !planted, "{}: {}\n{table}", c.op, c.shape);
    }
}
