//! `engine upscale` end to end on an untrained model written by `engine model init`: sizes,
//! modes (alpha, 16-bit, gray) kept, determinism, tiling, sharding, and failures contained.

mod common;
use common::engine;

use engine::model::LoraMode;
use engine::sr::model_dir::SrModel;
use engine::sr::upscaler::UpscaleOptions;
use engine::CpuBackend;
use loaders::image::{self, Image};
use std::path::{Path, PathBuf};
use std::process::Output;

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A model folder and a folder of inputs in a fresh tempdir.
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    ok(engine(&["model", "init", "--out", model.to_str().unwrap(), "--preset", "flux-tiny", "--init-seed", "3"]));
    let inputs = dir.path().join("in");
    std::fs::create_dir_all(inputs.join("sub")).unwrap();
    let pattern = |w: usize, h: usize, c: usize| (0..w * h * c).map(|i| ((i * 37) % 101) as f32 / 100.0).collect::<Vec<f32>>();
    let mut rgba16 = Image::new(13, 7, 4, pattern(13, 7, 4));
    rgba16.sixteen_bit = true;
    image::write_png(&inputs.join("rgba16.png"), &rgba16, false).unwrap();
    image::write_png(&inputs.join("sub/gray.png"), &Image::new(9, 6, 1, pattern(9, 6, 1)), false).unwrap();
    (dir, model, inputs)
}

/// The model folder loaded on `b`, adapters none.
fn load<B: engine::Backend + 'static>(b: &B, model: &Path) -> SrModel<B> {
    SrModel::load(b, model, &[], LoraMode::Merged).unwrap().0
}

/// A `w x h` RGB test image whose value `i` is `(i * step % modulo) / (modulo - 1)`.
fn pattern_lq(w: usize, h: usize, step: usize, modulo: usize) -> Image {
    Image::new(w, h, 3, (0..w * h * 3).map(|i| ((i * step) % modulo) as f32 / (modulo - 1) as f32).collect())
}

fn upscale(model: &Path, inputs: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args =
        vec!["upscale", inputs.to_str().unwrap(), "-o", out.to_str().unwrap(), "--model", model.to_str().unwrap(), "--steps", "2"];
    args.extend(extra);
    engine(&args)
}

#[test]
fn outputs_are_four_times_larger_keep_their_mode_and_repeat_exactly() {
    let (dir, model, inputs) = setup();
    let out = dir.path().join("out");
    ok(upscale(&model, &inputs, &out, &[]));
    let rgba = image::read(&out.join("rgba16.png")).unwrap();
    assert_eq!((rgba.width, rgba.height, rgba.channels, rgba.sixteen_bit), (52, 28, 4, true));
    let gray = image::read(&out.join("sub/gray.png")).unwrap();
    assert_eq!((gray.width, gray.height, gray.channels), (36, 24, 1));

    // Same seed: same bytes. Another seed: other bytes. A tile larger than the image: same bytes.
    let again = dir.path().join("again");
    ok(upscale(&model, &inputs, &again, &["--tile", "4096"]));
    assert_eq!(std::fs::read(out.join("rgba16.png")).unwrap(), std::fs::read(again.join("rgba16.png")).unwrap());
    let other = dir.path().join("other");
    ok(upscale(&model, &inputs, &other, &["--seed", "1"]));
    assert_ne!(std::fs::read(out.join("rgba16.png")).unwrap(), std::fs::read(other.join("rgba16.png")).unwrap());

    // Small tiles: same size, every value finite (decoding succeeded), no failure.
    let tiled = dir.path().join("tiled");
    ok(upscale(&model, &inputs, &tiled, &["--tile", "16", "--outscale", "2"]));
    let t = image::read(&tiled.join("rgba16.png")).unwrap();
    assert_eq!((t.width, t.height), (26, 14));
}

/// `--batch` runs the tiles of same-size inputs through the model together; the result of each
/// image is the one it gets alone.
#[test]
fn batching_images_and_tiles_leaves_every_result_unchanged() {
    let (dir, model, _) = setup();
    let inputs = dir.path().join("batch");
    std::fs::create_dir_all(&inputs).unwrap();
    for (name, w, h, k) in [("a.png", 10, 8, 3), ("b.png", 10, 8, 7), ("c.png", 6, 9, 5), ("d.png", 10, 8, 11)] {
        let px = (0..w * h * 3).map(|i| ((i * k) % 23) as f32 / 22.0).collect();
        image::write_png(&inputs.join(name), &Image::new(w, h, 3, px), false).unwrap();
    }
    let (one, many) = (dir.path().join("one"), dir.path().join("many"));
    ok(upscale(&model, &inputs, &one, &["--tile", "16"]));
    let out = ok(upscale(&model, &inputs, &many, &["--tile", "16", "--batch", "3"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 together"), "{}", String::from_utf8_lossy(&out.stderr));
    for name in ["a.png", "b.png", "c.png", "d.png"] {
        assert_eq!(std::fs::read(one.join(name)).unwrap(), std::fs::read(many.join(name)).unwrap(), "{name}");
    }
    assert_ne!(std::fs::read(one.join("a.png")).unwrap(), std::fs::read(one.join("b.png")).unwrap());
    let zero = upscale(&model, &inputs, &dir.path().join("zero"), &["--batch", "0"]);
    assert!(!zero.status.success() && String::from_utf8_lossy(&zero.stderr).contains("--batch"));

    // The bicubic baseline needs no model, and takes no adapter.
    let bicubic = dir.path().join("bicubic");
    ok(engine(&["upscale", inputs.to_str().unwrap(), "-o", bicubic.to_str().unwrap(), "--bicubic"]));
    let a = image::read(&bicubic.join("a.png")).unwrap();
    assert_eq!((a.width, a.height), (40, 32));
    assert_ne!(std::fs::read(bicubic.join("a.png")).unwrap(), std::fs::read(one.join("a.png")).unwrap());
    let lora = engine(&["upscale", inputs.to_str().unwrap(), "-o", bicubic.to_str().unwrap(), "--bicubic", "--lora", "x.safetensors"]);
    assert!(!lora.status.success() && String::from_utf8_lossy(&lora.stderr).contains("--lora"));
}

#[test]
fn existing_outputs_shards_and_bad_files() {
    let (dir, model, inputs) = setup();
    let out = dir.path().join("out");
    ok(upscale(&model, &inputs, &out, &["--shard", "2/2"]));
    assert!(!out.join("rgba16.png").exists() && out.join("sub/gray.png").exists(), "shard 2/2 takes the second input only");

    let again = upscale(&model, &inputs, &out, &["--shard", "2/2"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    ok(upscale(&model, &inputs, &out, &["--skip-existing"]));

    std::fs::write(inputs.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let bad = upscale(&model, &inputs, &dir.path().join("out2"), &[]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && stderr.contains("broken.png") && !stderr.contains("panicked"), "{stderr}");
    assert!(dir.path().join("out2/rgba16.png").exists(), "the good images are still written");

    // A negative detail gain, given or in model.json, is refused and named.
    let bad = upscale(&model, &inputs, &dir.path().join("out3"), &["--detail", "-1"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--detail"));
    let config = std::fs::read_to_string(model.join("model.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["detail"] = serde_json::json!(-1.0);
    std::fs::write(model.join("model.json"), config.to_string()).unwrap();
    let bad = upscale(&model, &inputs, &dir.path().join("out3"), &[]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && stderr.contains("detail") && !stderr.contains("panicked"), "{stderr}");
    config["detail"] = serde_json::json!(1.0);
    std::fs::write(model.join("model.json"), config.to_string()).unwrap();

    // Without --model: the shipped model, found from the test binary's target folder.
    let shipped = dir.path().join("shipped");
    let run = ok(engine(&["upscale", inputs.join("sub").to_str().unwrap(), "-o", shipped.to_str().unwrap(), "--steps", "1"]));
    assert!(String::from_utf8_lossy(&run.stderr).contains("models/asasr-cpu"), "{}", String::from_utf8_lossy(&run.stderr));
    let gray = image::read(&shipped.join("gray.png")).unwrap();
    assert_eq!((gray.width, gray.height, gray.channels), (36, 24, 1));
}

#[test]
fn a_gpu_out_of_memory_halves_the_tile_until_it_fits() {
    use common::hooked::Hooked;

    let (_dir, model, _) = setup();
    let lq = pattern_lq(24, 16, 53, 97);
    let opts = UpscaleOptions { steps: 2, seed: 5, tile: 64, batch: 1, average: 1, shift: false, detail: 1.0 };
    let cpu = CpuBackend::new();
    let plain = load(&cpu, &model);
    let want = plain.upscale(&cpu, &lq, &UpscaleOptions { tile: 32, ..opts }, &mut |_, _| {}).unwrap();

    // A "GPU" whose attention fits 32-pixel tiles but not 64-pixel ones.
    let unit = plain.token_pixels();
    let limit = (32 / unit) * (32 / unit) + plain.txt.shape[1];
    let small_gpu = Hooked { attention_token_limit: limit, ..Hooked::default() };
    let model_on_small = load(&small_gpu, &model);
    let got = model_on_small.upscale(&small_gpu, &lq, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(got.data, want.data, "the retry must be the run with half the tile");

    // Nothing fits: the out-of-memory error comes back once the tile cannot shrink further.
    let no_gpu = Hooked { attention_token_limit: 0, ..Hooked::default() };
    let model_on_none = load(&no_gpu, &model);
    let err = model_on_none.upscale(&no_gpu, &lq, &opts, &mut |_, _| {}).unwrap_err();
    assert!(format!("{err:#}").contains("GPU out of memory"), "{err:#}");
}

/// `average: 3` on one grid is the mean of the runs with seeds s, s + 1 and s + 2 wherever no run
/// clamps.
#[test]
fn averaged_samples_are_the_mean_of_their_seeds() {
    let (_dir, model, _) = setup();
    let lq = pattern_lq(12, 8, 31, 89);
    let cpu = CpuBackend::new();
    let sr = load(&cpu, &model);
    let run = |seed: u64, average: usize| {
        sr.upscale(&cpu, &lq, &UpscaleOptions { steps: 2, seed, tile: 64, batch: 1, average, shift: false, detail: 1.0 }, &mut |_, _| {})
            .unwrap()
            .data
    };
    let (mean, runs) = (run(7, 3), [run(7, 1), run(8, 1), run(9, 1)]);
    let mut compared = 0;
    for (i, &m) in mean.iter().enumerate() {
        let each: Vec<f32> = runs.iter().map(|r| r[i]).collect();
        if each.iter().chain([&m]).all(|&v| v > 0.0 && v < 1.0) {
            let want = each.iter().sum::<f32>() / 3.0;
            assert!((m - want).abs() < 1e-5, "pixel value {i}: {m} vs the mean {want}");
            compared += 1;
        }
    }
    // The random test model saturates most pixels; a few hundred unclamped ones remain.
    assert!(compared > 100, "only {compared} of {} values unclamped", mean.len());
    assert_ne!(runs[0], runs[1], "the seeds must give different samples");
}

/// `engine model merge` writes the model with the adapter in its weights: in f32 it upscales
/// exactly as the model with the adapter merged at load; in bf16 within bf16 rounding.
#[test]
fn a_merged_model_upscales_as_the_model_with_its_adapter() {
    use loaders::HostTensor;
    let (dir, model, inputs) = setup();
    let lora = dir.path().join("lora.safetensors");
    let rank = 2;
    let values = |n: usize, k: usize| (0..n).map(|i| (((i * k) % 17) as f32 - 8.0) / 40.0).collect::<Vec<f32>>();
    let tensors = [
        ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", HostTensor::from_f32(vec![rank, 64], values(rank * 64, 3))),
        ("transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight", HostTensor::from_f32(vec![64, rank], values(64 * rank, 5))),
        ("transformer.transformer_blocks.0.ff.net.2.lora_A.weight", HostTensor::from_f32(vec![rank, 256], values(rank * 256, 7))),
        ("transformer.transformer_blocks.0.ff.net.2.lora_B.weight", HostTensor::from_f32(vec![64, rank], values(64 * rank, 11))),
    ];
    let list: Vec<(&str, &HostTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    loaders::safetensors::write(&lora, &list, &Default::default(), false).unwrap();

    let (merged32, merged16) = (dir.path().join("merged32"), dir.path().join("merged16"));
    let merge = |out: &Path, extra: &[&str]| {
        let (model, lora, out) = (model.to_str().unwrap(), lora.to_str().unwrap(), out.to_str().unwrap());
        engine(&[&["model", "merge", "--model", model, "--lora", lora, "--out", out], extra].concat())
    };
    ok(merge(&merged32, &["--dtype", "f32"]));
    ok(merge(&merged16, &["--dtype", "bf16"]));
    let resampled = dir.path().join("resampled");
    ok(merge(&resampled, &["--steps", "3", "--average", "2"]));
    let config = |dir: &Path| -> serde_json::Value { serde_json::from_slice(&std::fs::read(dir.join("model.json")).unwrap()).unwrap() };
    assert_eq!((config(&resampled)["steps"].clone(), config(&resampled)["average"].clone()), (3.into(), 2.into()));
    assert_eq!(config(&merged32)["steps"], config(&model)["steps"]);
    let again = merge(&merged32, &[]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--overwrite"));

    let run = |model: &Path, extra: &[&str], out: &str| {
        let out = dir.path().join(out);
        ok(upscale(model, &inputs, &out, &[&["--color-fix", "none"], extra].concat()));
        image::read(&out.join("rgba16.png")).unwrap().data
    };
    let with_adapter = run(&model, &["--lora", lora.to_str().unwrap()], "a");
    assert_ne!(with_adapter, run(&model, &[], "plain"), "the adapter changes the result");
    assert_eq!(with_adapter, run(&merged32, &[], "m32"));
    let bf16 = run(&merged16, &[], "m16");
    let worst = with_adapter.iter().zip(&bf16).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 0.1, "bf16 weights move a pixel by {worst}");
}

/// The shipped model's token is 12 output pixels; one sample shows its grid (the grid figure of
/// metrics/grid.rs near 2 on photographs). Its default mean of 4 samples on grids shifted by 0,
/// 3, 6 and 9 pixels must bring the figure close to a photograph's (about 1.1), and below what
/// the same 4 samples on one grid give.
#[test]
fn shifted_samples_average_the_token_grid_out() {
    use engine::metrics::{grid_figure, y_channel};
    use engine::sr::resample::resize;

    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let hq = image::read(&root.join("tests/golden/noref/photo.png")).unwrap();
    std::fs::create_dir_all(dir.path().join("lq")).unwrap();
    image::write_png(&dir.path().join("lq/photo.png"), &resize(&hq, 64, 64), false).unwrap();
    let figure = |extra: &[&str]| {
        let (lq, out) = (dir.path().join("lq"), dir.path().join(format!("out{}", extra.len())));
        let mut args = vec!["upscale", lq.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend(extra);
        ok(engine(&args));
        grid_figure(&y_channel(&image::read(&out.join("photo.png")).unwrap()))
    };
    let (shifted, one_grid, single) = (figure(&[]), figure(&["--no-shift"]), figure(&["--average", "1", "--seed", "3"]));
    assert!(single > 1.4, "one sample's grid figure {single}: the test image no longer shows the token grid");
    assert!(shifted < 1.25 && shifted < one_grid - 0.2, "grid figure {shifted} shifted, {one_grid} on one grid");
}

/// An image that fits one tile stays one tile on every shifted grid, although the shift pads it
/// by up to a token: a larger tile changes nothing.
#[test]
fn shifted_grids_of_an_image_of_one_tile_are_not_tiled() {
    let (_dir, model, _) = setup();
    let lq = pattern_lq(16, 16, 29, 83);
    let cpu = CpuBackend::new();
    let sr = load(&cpu, &model);
    let run = |tile: usize| {
        let opts = UpscaleOptions { steps: 2, seed: 1, tile, batch: 1, average: 4, shift: true, detail: 1.0 };
        sr.upscale(&cpu, &lq, &opts, &mut |_, _| {}).unwrap().data
    };
    // 64 output pixels are 16 tokens of 4; the grids shifted by 1, 2 and 3 pixels need 17.
    assert_eq!(run(64), run(256));
    assert_ne!(run(32), run(256), "a tile of half the image must change the result (the test would see no tiling)");
}
