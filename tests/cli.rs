//! The `engine` binary as a user runs it: the golden examples through `forward` and `info`, and
//! bad input of every kind answered by one clear line and a non-zero exit, never a panic.

mod common;
use common::{assert_fails_with, edited, engine};

use loaders::safetensors::Checkpoint;
use loaders::HostTensor;
use std::path::{Path, PathBuf};

fn golden(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/guidance-b2").join(file)
}

fn forward_args<'a>(model: &'a str, inputs: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["forward", "--model", model, "--inputs", inputs, "--out", out]
}

#[test]
fn forward_writes_the_golden_output_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let (model, inputs) = (golden("transformer.diffusers.safetensors"), golden("inputs.safetensors"));
    let args = forward_args(model.to_str().unwrap(), inputs.to_str().unwrap(), out.to_str().unwrap());
    let run = engine(&args);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let got = Checkpoint::open(&out).unwrap().read("out").unwrap().to_f32();
    let want = Checkpoint::open(&golden("out.safetensors")).unwrap().read("out").unwrap().to_f32();
    let scale = want.iter().fold(0f32, |m, w| m.max(w.abs()));
    assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-4 * scale));

    assert_fails_with(&engine(&args), &["out.safetensors", "--overwrite"]);
    let mut again = args.clone();
    again.push("--overwrite");
    assert!(engine(&again).status.success());
}

#[test]
fn info_describes_checkpoints_and_adapters() {
    for (file, fragments) in [
        ("transformer.bfl.safetensors", vec!["BFL layout", "\"hidden_size\":64", "\"guidance_embed\":true", "F32 100.0%"]),
        ("transformer.diffusers.safetensors", vec!["diffusers layout", "\"depth\":2", "\"depth_single_blocks\":2"]),
        ("transformer.bfl.bf16.safetensors", vec!["BF16 100.0%"]),
        ("lora.kohya.safetensors", vec!["LoRA adapter, kohya layout", "rank        4"]),
        ("lora.peft.safetensors", vec!["diffusers/peft layout"]),
    ] {
        let out = engine(&["info", golden(file).to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
        for f in fragments {
            assert!(stdout.contains(f), "{file}: info lacks '{f}':\n{stdout}");
        }
    }
}

#[test]
fn unreadable_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    assert_fails_with(&engine(&["info", missing.to_str().unwrap()]), &["nope.safetensors"]);

    let text = dir.path().join("notes.safetensors");
    std::fs::write(&text, "this is not a checkpoint at all, just some text").unwrap();
    assert_fails_with(&engine(&["info", text.to_str().unwrap()]), &["notes.safetensors"]);

    let bytes = std::fs::read(golden("transformer.bfl.safetensors")).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("o.safetensors");
    let inputs = golden("inputs.safetensors");
    assert_fails_with(
        &engine(&forward_args(truncated.to_str().unwrap(), inputs.to_str().unwrap(), out.to_str().unwrap())),
        &["truncated.safetensors"],
    );
    assert!(!out.exists(), "no output may be written on failure");
}

#[test]
fn checkpoint_mismatches_name_the_key_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let src = golden("transformer.bfl.safetensors");
    let inputs = golden("inputs.safetensors");
    let out = dir.path().join("o.safetensors");
    let run = |model: &Path| engine(&forward_args(model.to_str().unwrap(), inputs.to_str().unwrap(), out.to_str().unwrap()));

    let missing = edited(dir.path(), "missing.safetensors", &src, |t| {
        t.remove("double_blocks.1.txt_attn.proj.bias");
    });
    assert_fails_with(&run(&missing), &["missing.safetensors", "double_blocks.1.txt_attn.proj.bias"]);

    let extra = edited(dir.path(), "extra.safetensors", &src, |t| {
        t.insert("double_blocks.0.img_attn.extra.weight".into(), HostTensor::from_f32(vec![2], vec![1.0, 2.0]));
    });
    assert_fails_with(&run(&extra), &["extra.safetensors", "double_blocks.0.img_attn.extra.weight"]);

    let misshaped = edited(dir.path(), "misshaped.safetensors", &src, |t| {
        t.insert("single_blocks.1.linear2.weight".into(), HostTensor::from_f32(vec![64, 300], vec![0.0; 64 * 300]));
    });
    assert_fails_with(&run(&misshaped), &["misshaped.safetensors", "single_blocks.1.linear2.weight", "[64, 300]", "[64, 320]"]);

    // A diffusers file: the message names the file's own keys.
    let dsrc = golden("transformer.diffusers.safetensors");
    let dmis = edited(dir.path(), "dmis.safetensors", &dsrc, |t| {
        t.insert("transformer_blocks.0.attn.to_out.0.weight".into(), HostTensor::from_f32(vec![64, 63], vec![0.0; 64 * 63]));
    });
    assert_fails_with(&run(&dmis), &["dmis.safetensors", "transformer_blocks.0.attn.to_out.0.weight", "[64, 63]", "[64, 64]"]);

    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"hidden_size": 128}"#).unwrap();
    let mut args = forward_args(src.to_str().unwrap(), inputs.to_str().unwrap(), out.to_str().unwrap());
    args.extend(["--config", config.to_str().unwrap()]);
    assert_fails_with(&engine(&args), &["hidden_size", "128", "64"]);

    std::fs::write(&config, r#"{"hidden_sise": 64}"#).unwrap();
    assert_fails_with(&engine(&args), &["config.json", "hidden_sise"]);
    assert!(!out.exists());
}

#[test]
fn inputs_that_do_not_fit_the_model_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = golden("transformer.bfl.safetensors");
    let src = golden("inputs.safetensors");
    let out = dir.path().join("o.safetensors");
    let run = |inputs: &Path| engine(&forward_args(model.to_str().unwrap(), inputs.to_str().unwrap(), out.to_str().unwrap()));

    let wrong_ch = edited(dir.path(), "in1.safetensors", &src, |t| {
        t.insert("img".into(), HostTensor::from_f32(vec![2, 24, 128], vec![0.5; 2 * 24 * 128]));
    });
    assert_fails_with(&run(&wrong_ch), &["in1.safetensors", "'img'", "[2, 24, 128]", "[2, 24, 64]"]);

    let no_guidance = edited(dir.path(), "in2.safetensors", &src, |t| {
        t.remove("guidance");
    });
    assert_fails_with(&run(&no_guidance), &["in2.safetensors", "guidance"]);

    let missing_y = edited(dir.path(), "in3.safetensors", &src, |t| {
        t.remove("y");
    });
    assert_fails_with(&run(&missing_y), &["in3.safetensors", "'y'"]);

    let extra = edited(dir.path(), "in4.safetensors", &src, |t| {
        t.insert("mask".into(), HostTensor::from_f32(vec![1], vec![1.0]));
    });
    assert_fails_with(&run(&extra), &["in4.safetensors", "'mask'"]);

    let nan = edited(dir.path(), "in5.safetensors", &src, |t| {
        t.insert("timesteps".into(), HostTensor::from_f32(vec![2], vec![0.5, f32::NAN]));
    });
    assert_fails_with(&run(&nan), &["in5.safetensors", "timesteps", "NaN"]);
    assert!(!out.exists());
}

#[test]
fn lora_that_does_not_fit_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = golden("transformer.bfl.safetensors");
    let inputs = golden("inputs.safetensors");
    let out = dir.path().join("o.safetensors");
    let run = |lora: &Path| {
        let mut a = forward_args(model.to_str().unwrap(), inputs.to_str().unwrap(), out.to_str().unwrap());
        a.extend(["--lora", lora.to_str().unwrap()]);
        engine(&a)
    };
    let src = golden("lora.kohya.safetensors");

    let rank = edited(dir.path(), "rank.safetensors", &src, |t| {
        t.insert("lora_unet_double_blocks_0_img_attn_proj.lora_up.weight".into(), HostTensor::from_f32(vec![64, 3], vec![0.1; 64 * 3]));
    });
    assert_fails_with(&run(&rank), &["rank.safetensors", "lora_unet_double_blocks_0_img_attn_proj"]);

    let width = edited(dir.path(), "width.safetensors", &src, |t| {
        t.insert("lora_unet_double_blocks_0_img_attn_proj.lora_down.weight".into(), HostTensor::from_f32(vec![4, 32], vec![0.1; 4 * 32]));
    });
    assert_fails_with(&run(&width), &["width.safetensors", "lora_unet_double_blocks_0_img_attn_proj", "32", "64"]);

    let deep = edited(dir.path(), "deep.safetensors", &src, |t| {
        t.insert("lora_unet_double_blocks_7_img_attn_proj.lora_down.weight".into(), HostTensor::from_f32(vec![4, 64], vec![0.1; 4 * 64]));
        t.insert("lora_unet_double_blocks_7_img_attn_proj.lora_up.weight".into(), HostTensor::from_f32(vec![64, 4], vec![0.1; 64 * 4]));
    });
    assert_fails_with(&run(&deep), &["deep.safetensors", "double_blocks.7.img_attn.proj"]);

    // A checkpoint passed as a LoRA and a LoRA passed as a checkpoint.
    assert_fails_with(&run(&model), &["transformer.bfl.safetensors"]);
    assert_fails_with(
        &engine(&forward_args(src.to_str().unwrap(), inputs.to_str().unwrap(), out.to_str().unwrap())),
        &["lora.kohya.safetensors", "--lora"],
    );
    assert!(!out.exists());
}
