//! `engine train --stage sft` end to end: a random base from a preset trains with no file at all,
//! logs every step, writes a LoRA that `engine upscale --lora` loads and that changes its output,
//! equals a run from the same base written by `engine model init`, and names what it refuses.

mod common;
use common::{assert_fails_with, engine, s};

use loaders::image::{self, Image};
use std::path::Path;
use std::process::Output;

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn write_data(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (k, (w, h)) in [(48usize, 40usize), (32, 36)].into_iter().enumerate() {
        let data = (0..w * h * 3).map(|i| ((i * (31 + k) + i / (3 * w) * 7) % 97) as f32 / 96.0).collect();
        image::write_png(&dir.join(format!("{k}.png")), &Image::new(w, h, 3, data), false).unwrap();
    }
}

/// `engine train` with small defaults; a flag in `extra` replaces its default.
fn train(data: &Path, out: &Path, log: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--data", s(data), "--out", s(out), "--log", s(log)];
    let defaults =
        [("--stage", "sft"), ("--max-steps", "3"), ("--batch", "2"), ("--crop", "32"), ("--rank", "2"), ("--lr", "1e-2"), ("--seed", "5")];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend_from_slice(&[flag, value]);
        }
    }
    args.extend_from_slice(extra);
    engine(&args)
}

#[test]
fn sft_trains_logs_and_writes_a_lora_that_upscale_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (data, model) = (dir.path().join("data"), dir.path().join("model"));
    write_data(&data);
    ok(engine(&["model", "init", "--out", s(&model), "--preset", "flux-tiny", "--init-seed", "3"]));

    let log = dir.path().join("log.jsonl");
    ok(train(&data, &dir.path().join("preset"), &log, &["--preset", "flux-tiny", "--init-seed", "3"]));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["step"], i as u64 + 1);
        for key in ["loss", "grad_norm", "lr", "samples_per_s"] {
            assert!(line[key].as_f64().is_some_and(f64::is_finite), "{key} in {line}");
        }
    }

    // The same base read from a folder trains to the same adapter.
    ok(train(&data, &dir.path().join("folder"), &dir.path().join("log2.jsonl"), &["--base", s(&model)]));
    let lora = dir.path().join("preset/lora.safetensors");
    assert_eq!(std::fs::read(&lora).unwrap(), std::fs::read(dir.path().join("folder/lora.safetensors")).unwrap());

    let lq = dir.path().join("lq.png");
    image::write_png(&lq, &Image::new(8, 8, 3, (0..192).map(|i| (i % 17) as f32 / 16.0).collect()), false).unwrap();
    let upscale = |out: &str, extra: &[&str]| {
        let out = dir.path().join(out);
        let mut args = vec!["upscale", s(&lq), "-o", s(&out), "--model", s(&model), "--steps", "2", "--device", "cpu"];
        args.extend_from_slice(extra);
        ok(engine(&args));
        image::read(&out.join("lq.png")).unwrap()
    };
    let (base, adapted) = (upscale("base", &[]), upscale("adapted", &["--lora", s(&lora)]));
    assert_eq!((adapted.width, adapted.height), (32, 32));
    assert_ne!(base.data, adapted.data, "the trained LoRA changes the output");
}

#[test]
fn refusals_name_the_flag_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_data(&data);
    let (out, log) = (dir.path().join("out"), dir.path().join("log.jsonl"));
    ok(train(&data, &out, &log, &[]));
    assert_fails_with(&train(&data, &out, &log, &["--resume", "--rank", "4"]), &["'rank'", "checkpoint.json"]);
    assert_fails_with(&train(&data, &out, &log, &["--crop", "30"]), &["crop", "30"]);
    assert_fails_with(&train(&data, &out, &log, &["--device", "cuda"]), &["--device"]);
    assert_fails_with(&train(&data, &out, &log, &["--stage", "dpo"]), &["sft"]);
    assert_fails_with(&train(&dir.path().join("nothing"), &out, &log, &[]), &["nothing"]);
}
