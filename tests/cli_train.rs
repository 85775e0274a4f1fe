//! `engine train` end to end: every stage from a random base or a model folder, on images degraded
//! on the fly or on prepared triples (`engine degrade`, then a baseline upscaler's outputs); the
//! adapters stack in `engine upscale`; settings from a TOML file; what it refuses, named.

mod common;
use common::{assert_fails_with, engine, s};

use loaders::image::{self, Image};
use std::path::{Path, PathBuf};
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

fn log_lines(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The saved config of a run, from its checkpoint's metadata.
fn saved_config(out: &Path) -> serde_json::Value {
    let ckpt = loaders::safetensors::Checkpoint::open(&out.join("checkpoint.safetensors")).unwrap();
    serde_json::from_str(&ckpt.metadata()["config"]).unwrap()
}

/// A training step moves the batch to the device and a few scalars back, never the trained
/// tensors or their gradients: the log's per-step byte counts (the CPU counts what a device would
/// move) stay within the batch's size, here a third of the rank-16 adapter's.
#[test]
fn a_training_step_moves_only_the_batch_and_scalars() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_data(&data);
    let log = dir.path().join("log.jsonl");
    let out = ok(train(&data, &dir.path().join("out"), &log, &["--preset", "flux-tiny", "--rank", "16", "--device", "cpu"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // "training 52.3K LoRA parameters on ...".
    let words: Vec<&str> = stdout.split_whitespace().collect();
    let count = words[words.iter().position(|w| *w == "LoRA").expect("the parameter count") - 1];
    let trained: f64 = match count.strip_suffix('K') {
        Some(k) => k.parse::<f64>().unwrap() * 1e3,
        None => count.parse().unwrap(),
    };
    // Two 32x32 crops: the HQ, the LQ's bicubic upsample and the noise, each 2 x 3 x 32 x 32 f32.
    let batch = 3.0 * 2.0 * 3.0 * 32.0 * 32.0 * 4.0;
    assert!(4.0 * trained > 2.0 * batch, "the adapter ({trained} values) must outweigh the batch for this test to mean anything");
    for line in &log_lines(&log)[1..] {
        let (up, down) = (line["bytes_to_device"].as_f64().unwrap(), line["bytes_to_host"].as_f64().unwrap());
        assert!(up <= batch + 1024.0, "{up} bytes to the device in a step: {line}");
        assert!(down <= 1024.0, "{down} bytes back in a step: {line}");
    }
}

#[test]
fn sft_trains_logs_and_writes_a_lora_that_upscale_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (data, model) = (dir.path().join("data"), dir.path().join("model"));
    write_data(&data);
    ok(engine(&["model", "init", "--out", s(&model), "--preset", "flux-tiny", "--init-seed", "3"]));

    let log = dir.path().join("log.jsonl");
    let out = ok(train(&data, &dir.path().join("preset"), &log, &["--preset", "flux-tiny", "--init-seed", "3"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("LoRA parameters"), "the trained parameter count is reported");
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 3);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["step"], i as u64 + 1);
        for key in ["loss", "grad_norm", "lr", "samples_per_s"] {
            assert!(line[key].as_f64().is_some_and(f64::is_finite), "{key} in {line}");
        }
    }

    // The defaults that `--help` states are the ones the run used.
    let help = String::from_utf8(ok(engine(&["train", "--help"])).stdout).unwrap();
    let saved = saved_config(&dir.path().join("preset"));
    for key in
        ["grad_accum", "warmup", "decay_steps", "weight_decay", "max_grad_norm", "sobolev_s", "beta", "rho", "negative_steps", "hardness"]
    {
        let flag = format!("--{} ", key.replace('_', "-"));
        let line = help.lines().find(|l| l.trim_start().starts_with(&flag)).unwrap_or_else(|| panic!("{flag}: not in {help}"));
        let stated = line.rsplit("[default: ").next().unwrap().split([']', ' ']).next().unwrap();
        assert_eq!(stated.parse::<f64>().ok(), saved[key].as_f64(), "{key}: {line}");
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

/// The paper's pipeline on a model folder: pairs from `engine degrade`, a baseline upscaler's
/// outputs beside them, SFT, the adversary on the triples, dpo on the triples and asdpo against
/// the adversary; each later adapter loads on top of the SFT one in `engine upscale`.
#[test]
fn every_stage_runs_and_the_adapters_stack_in_upscale() {
    let dir = tempfile::tempdir().unwrap();
    let at = |p: &str| dir.path().join(p);
    let (model, pairs) = (at("model"), at("pairs"));
    write_data(&at("images"));
    ok(engine(&["model", "init", "--out", s(&model), "--preset", "flux-tiny", "--init-seed", "3"]));
    ok(engine(&["degrade", s(&at("images")), "-o", s(&pairs), "--seed", "1"]));
    // The base model as the baseline upscaler of the LQ images.
    ok(engine(&[
        "upscale",
        s(&pairs.join("lq")),
        "-o",
        s(&pairs.join("baseline")),
        "--model",
        s(&model),
        "--steps",
        "2",
        "--device",
        "cpu",
    ]));

    let base: [&str; 2] = ["--base", s(&model)];
    let sft = at("sft/lora.safetensors");
    let run = |stage: &str, out: &str, data: &Path, extra: &[&str]| {
        let mut args = vec!["--stage", stage];
        args.extend_from_slice(&base);
        args.extend_from_slice(extra);
        ok(train(data, &at(out), &at(&format!("{out}.jsonl")), &args));
        log_lines(&at(&format!("{out}.jsonl")))
    };
    run("sft", "sft", &pairs, &[]);
    let adversary = run("adversary", "adversary", &pairs, &["--sft-lora", s(&sft), "--hardness", "0.1"]);
    assert!(adversary.iter().all(|l| l["mimic"].as_f64().is_some() && l["hardness"].as_f64().is_some()), "{adversary:?}");
    let adversary_lora = at("adversary/lora.safetensors");
    for (out, extra) in [
        ("dpo", vec!["--stage", "dpo", "--sft-lora", s(&sft)]),
        ("dpo-reference", vec!["--stage", "dpo", "--sft-lora", s(&sft), "--negatives", "reference", "--grad-accum", "2"]),
        ("asdpo", vec!["--stage", "asdpo", "--sft-lora", s(&sft), "--adversary-lora", s(&adversary_lora)]),
        ("asdpo-closed-form", vec!["--stage", "asdpo", "--sft-lora", s(&sft), "--closed-form", "--rho", "0.05"]),
    ] {
        let lines = run(extra[1], out, &pairs, &extra[2..]);
        assert_eq!(lines.len(), 3, "{out}");
        let first = lines[0]["loss"].as_f64().unwrap();
        assert!((first - std::f64::consts::LN_2).abs() < 1e-9, "{out}: first loss {first}");
        for line in &lines {
            for key in ["implicit_acc", "reward_margin", "loser_deviation"] {
                assert!(line[key].as_f64().is_some_and(f64::is_finite), "{out}: {key} in {line}");
            }
        }
    }
    assert_eq!(saved_config(&at("dpo"))["negatives"], serde_json::Value::Null, "auto: triples, since the data have baseline/");

    let lq = pairs.join("lq/0.png");
    let upscale = |out: &str, loras: &[&PathBuf]| {
        let out = at(out);
        let mut args = vec!["upscale", s(&lq), "-o", s(&out), "--model", s(&model), "--steps", "2", "--device", "cpu"];
        for l in loras {
            args.extend_from_slice(&["--lora", s(l)]);
        }
        ok(engine(&args));
        image::read(&out.join("0.png")).unwrap().data
    };
    let with_sft = upscale("up-sft", &[&sft]);
    for stage in ["dpo", "asdpo"] {
        let stacked = upscale(&format!("up-{stage}"), &[&sft, &at(&format!("{stage}/lora.safetensors"))]);
        assert_ne!(stacked, with_sft, "{stage}: the new adapter changes the SFT model's output");
    }
}

#[test]
fn a_config_file_sets_every_flag_and_the_command_line_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    write_data(&dir.path().join("data"));
    let config = dir.path().join("train.toml");
    // Relative paths are relative to the file's folder; keys take `-` or `_`.
    std::fs::write(
        &config,
        "stage = \"sft\"\ndata = \"data\"\nout = \"out\"\nlog = \"log.jsonl\"\nmax-steps = 2\nbatch = 1\ngrad_accum = 2\ncrop = 32\nrank = 2\nlr = 1e-2\nsobolev-s = 0.5\n",
    )
    .unwrap();
    let cwd_independent = dir.path().join("elsewhere");
    std::fs::create_dir_all(&cwd_independent).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["train", "--config", s(&config), "--rank", "3"])
        .current_dir(&cwd_independent)
        .output()
        .unwrap();
    ok(out);
    let saved = saved_config(&dir.path().join("out"));
    assert_eq!((saved["rank"].as_u64(), saved["grad_accum"].as_u64(), saved["sobolev_s"].as_f64()), (Some(3), Some(2), Some(0.5)));
    assert_eq!(log_lines(&dir.path().join("log.jsonl")).len(), 2);

    // Resuming with the same file continues; a changed value is refused by key.
    ok(engine(&["train", "--config", s(&config), "--rank", "3", "--max-steps", "3", "--resume"]));
    assert_eq!(log_lines(&dir.path().join("log.jsonl")).len(), 3);
    assert_fails_with(&engine(&["train", "--config", s(&config), "--max-steps", "4", "--resume"]), &["'rank'", "checkpoint.safetensors"]);
    assert_fails_with(
        &engine(&[
            "train",
            "--config",
            s(&config),
            "--rank",
            "3",
            "--max-steps",
            "4",
            "--resume",
            "--stage",
            "dpo",
            "--sft-lora",
            s(&config),
        ]),
        &["'stage'", "checkpoint.safetensors"],
    );

    let bad = |text: &str| {
        std::fs::write(&config, text).unwrap();
        engine(&["train", "--config", s(&config)])
    };
    assert_fails_with(&bad("data = \"data\"\nout = \"o\"\nlearning_rate = 1\n"), &["train.toml", "unknown key 'learning_rate'"]);
    assert_fails_with(&bad("data = \"data\"\nout = \"o\"\nlr = \"fast\"\n"), &["train.toml", "'lr'"]);
    assert_fails_with(&bad("data = \"data\"\nout = \"o\"\nbatch = 0\n"), &["train.toml", "'batch'", "at least 1"]);
    assert_fails_with(&bad("data = \"data\"\nout = \"o\"\nstage = \"dpo\"\n"), &["--sft-lora"]);
    assert_fails_with(&bad("data = \"data\"\nout = \"o\"\nconfig = \"x\"\n"), &["unknown key 'config'"]);
    assert_fails_with(&bad("data = \"data\"\nbatch = = 2\n"), &["train.toml:2"]);
    assert_fails_with(&engine(&["train", "--config", s(&dir.path().join("none.toml"))]), &["none.toml"]);
}

#[test]
fn refusals_name_the_flag_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_data(&data);
    let (out, log) = (dir.path().join("out"), dir.path().join("log.jsonl"));
    ok(train(&data, &out, &log, &[]));
    assert_fails_with(&train(&data, &out, &log, &["--resume", "--rank", "4"]), &["'rank'", "checkpoint.safetensors"]);
    assert_fails_with(&train(&data, &out, &log, &["--crop", "30"]), &["crop", "30"]);
    assert_fails_with(&train(&data, &out, &log, &["--device", "cuda"]), &["--device"]);
    assert_fails_with(&train(&data, &out, &log, &["--device", "gpu"]), &["--device gpu", "auto, cpu or cuda"]);
    assert_fails_with(&train(&data, &out, &log, &["--stage", "dpo"]), &["--sft-lora"]);
    assert_fails_with(&train(&data, &out, &log, &["--stage", "asdpo", "--sft-lora", s(&log)]), &["--adversary-lora", "--closed-form"]);
    assert_fails_with(&train(&data, &out, &log, &["--closed-form"]), &["--closed-form", "asdpo"]);
    assert_fails_with(&train(&dir.path().join("nothing"), &out, &log, &[]), &["nothing"]);
    assert_fails_with(&engine(&["train", "--data", s(&data)]), &["--out"]);

    // An SFT adapter for the adversary, and a prepared folder without baseline/.
    let sft = out.join("lora.safetensors");
    let pairs = dir.path().join("pairs");
    ok(engine(&["degrade", s(&data), "-o", s(&pairs), "--seed", "1"]));
    let adversary = |data: &Path| train(data, &dir.path().join("adv"), &log, &["--stage", "adversary", "--sft-lora", s(&sft)]);
    assert_fails_with(&adversary(&pairs), &["baseline", "--stage adversary"]);
    assert_fails_with(&adversary(&data), &["triples", "--stage adversary"]);
    std::fs::create_dir_all(pairs.join("baseline")).unwrap();
    assert_fails_with(&adversary(&pairs), &["baseline/0.png", "missing"]);
    assert_fails_with(
        &train(&pairs, &dir.path().join("dpo"), &log, &["--stage", "dpo", "--sft-lora", s(&dir.path().join("no.safetensors"))]),
        &["no.safetensors"],
    );
}
