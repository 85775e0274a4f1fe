//! The perceptual metrics (ST-LPIPS, LPIPS, DISTS) and the no-reference ones (NIQE, BRISQUE)
//! against the values their reference packages give on the same files, made by
//! tools/metrics/make_goldens.py: stlpips_pytorch, lpips and DISTS_pytorch on random backbones
//! with their shipped heads (tests/golden/perceptual), scikit-video's NIQE and OpenCV's BRISQUE
//! (tests/golden/noref). The networks run on the CPU backend in f32.

mod common;
use common::metric_weights::{golden, golden_weights, json, read_all, write};

use engine::backend::cpu::CpuBackend;
use engine::metrics::brisque::{self, Brisque};
use engine::metrics::niqe::Niqe;
use engine::metrics::perceptual::{Perceptual, PerceptualNet};
use engine::metrics::weights::MetricWeights;
use loaders::HostTensor;
use std::path::PathBuf;

fn rel_err(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs()
}

/// Every network on every golden pair, within 1e-4 of the reference (relative).
fn check_pairs(weights: &MetricWeights, metrics: &[(Perceptual, &str)], reference: &serde_json::Value) {
    let cpu = CpuBackend::new();
    for &(metric, key) in metrics {
        let net = PerceptualNet::load(&cpu, metric, weights).unwrap();
        for pair in reference["pairs"].as_array().unwrap() {
            let name = pair["name"].as_str().unwrap();
            let read = |side: &str| loaders::image::read(&golden(&format!("metrics/{side}/{name}.png"))).unwrap();
            let got = net.distance(&cpu, &read("sr"), &read("hq")).unwrap();
            let want = pair[key].as_f64().unwrap();
            assert!(rel_err(got, want) < 1e-4, "{key} on {name}: {got} against the reference's {want}");
        }
    }
}

#[test]
fn perceptual_metrics_match_the_reference_packages() {
    let dir = tempfile::tempdir().unwrap();
    let weights = golden_weights(dir.path());
    let metrics = [
        (Perceptual::StLpipsAlex, "st_lpips_alex"),
        (Perceptual::StLpipsVgg, "st_lpips_vgg"),
        (Perceptual::LpipsAlex, "lpips_alex"),
        (Perceptual::LpipsVgg, "lpips_vgg"),
        (Perceptual::Dists, "dists"),
    ];
    check_pairs(&weights, &metrics, &json("perceptual/reference.json"));
}

/// ST-LPIPS with the weights stlpips_pytorch ships, converted by tools/metric-weights.sh:
/// `bash tools/metric-weights.sh` then `cargo test --test perceptual -- --ignored` (the folder
/// from ENGINE_METRIC_WEIGHTS, else the script's default).
#[test]
#[ignore = "needs tools/metric-weights.sh (PyPI)"]
fn st_lpips_with_its_shipped_weights_matches_the_reference() {
    let dir = std::env::var_os("ENGINE_METRIC_WEIGHTS").map(PathBuf::from).or_else(MetricWeights::default_dir).unwrap();
    let metrics = [(Perceptual::StLpipsAlex, "st_lpips_alex_real"), (Perceptual::StLpipsVgg, "st_lpips_vgg_real")];
    check_pairs(&MetricWeights::new(dir), &metrics, &json("perceptual/reference.json"));
}

#[test]
fn a_missing_or_misshapen_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let weights = golden_weights(dir.path());
    let cpu = CpuBackend::new();
    let path = dir.path().join("alexnet.safetensors");
    let mut tensors = read_all(&path);
    tensors.remove("features.3.bias");
    write(&path, &tensors);
    let e = PerceptualNet::load(&cpu, Perceptual::LpipsAlex, &weights).err().unwrap().to_string();
    assert!(e.contains("alexnet.safetensors") && e.contains("'features.3.bias'"), "{e}");

    let path = dir.path().join("dists.safetensors");
    let mut tensors = read_all(&path);
    tensors.insert("alpha".into(), HostTensor::from_f32(vec![1, 3, 1, 1], vec![0.1; 3]));
    write(&path, &tensors);
    let e = PerceptualNet::load(&cpu, Perceptual::Dists, &weights).err().unwrap().to_string();
    assert!(e.contains("dists.safetensors") && e.contains("'alpha'") && e.contains("[1, 1475, 1, 1]"), "{e}");

    std::fs::remove_file(dir.path().join("st-lpips-vgg.safetensors")).unwrap();
    let e = PerceptualNet::load(&cpu, Perceptual::StLpipsVgg, &weights).err().unwrap().to_string();
    assert!(e.contains("st-lpips-vgg.safetensors: not found") && e.contains("tools/metric-weights.sh"), "{e}");
}

#[test]
fn an_image_too_small_for_a_network_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let weights = golden_weights(dir.path());
    let cpu = CpuBackend::new();
    let net = PerceptualNet::load(&cpu, Perceptual::StLpipsAlex, &weights).unwrap();
    let tiny = loaders::image::Image::new(12, 12, 3, vec![0.5; 12 * 12 * 3]);
    let e = format!("{:#}", net.distance(&cpu, &tiny, &tiny).unwrap_err());
    assert!(e.contains("st-lpips") && e.contains("12x12"), "{e}");
}

#[test]
fn niqe_matches_scikit_video() {
    let niqe = Niqe::load(&MetricWeights::new(golden("perceptual/weights"))).unwrap();
    let mut checked = 0;
    for image in json("noref/reference.json")["images"].as_array().unwrap() {
        let img = loaders::image::read(&golden(image["path"].as_str().unwrap())).unwrap();
        match image["niqe"].as_f64() {
            Some(want) => {
                let got = niqe.score(&img).unwrap();
                assert!(rel_err(got, want) < 1e-3, "{}: NIQE {got} against scikit-video's {want}", image["path"]);
                checked += 1;
            }
            None => {
                let e = niqe.score(&img).unwrap_err().to_string();
                assert!(e.contains("larger than 193 pixels"), "{e}");
            }
        }
    }
    assert_eq!(checked, 3);
}

#[test]
fn brisque_matches_opencv() {
    let model = Brisque::load(&MetricWeights::new(golden("perceptual/weights"))).unwrap();
    let mut inside = 0;
    for image in json("noref/reference.json")["images"].as_array().unwrap() {
        let path = image["path"].as_str().unwrap();
        let img = loaders::image::read(&golden(path)).unwrap();
        let got = brisque::features(&img);
        let want: Vec<f64> = image["brisque_features"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        // Within 2e-3 of the larger of the value and 1: a fit's shape may land one 0.001 step of
        // the search away, and the mean parameters are differences of nearly equal scales.
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - w).abs() <= 2e-3 * w.abs().max(1.0), "{path}: feature {k}: {g} against OpenCV's {w}");
        }
        let (got, want) = (model.score(&img), image["brisque"].as_f64().unwrap());
        assert!((got - want).abs() <= 1e-3 * want.abs().max(1.0), "{path}: BRISQUE {got} against OpenCV's {want}");
        inside += (want > 0.0 && want < 100.0) as usize;
    }
    assert!(inside >= 4, "too few scores inside the clamp to test the model");
}
