//! The metrics against scikit-image and numpy on the golden pairs that `tools/metrics-goldens.py`
//! generated: PSNR-Y, SSIM-Y and LSD each within 1e-3 (absolute) of the reference.

use engine::metrics;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/metrics")
}

#[test]
fn metrics_match_scikit_image_on_the_golden_pairs() {
    let text = std::fs::read_to_string(dir().join("reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let pairs = reference["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 3);
    let mut worst = [0f64; 3];
    for pair in pairs {
        let name = pair["name"].as_str().unwrap();
        let sr = loaders::image::read(&dir().join("sr").join(format!("{name}.png"))).unwrap();
        let hq = loaders::image::read(&dir().join("hq").join(format!("{name}.png"))).unwrap();
        assert_eq!((hq.width as u64, hq.height as u64), (pair["width"].as_u64().unwrap(), pair["height"].as_u64().unwrap()));
        let got = metrics::evaluate(&sr, &hq).unwrap();
        for (i, (key, value)) in [("psnr_y", got.psnr_y), ("ssim_y", got.ssim_y), ("lsd", got.lsd)].into_iter().enumerate() {
            let want = pair[key].as_f64().unwrap();
            let diff = (value - want).abs();
            assert!(diff <= 1e-3, "{name} {key}: got {value}, scikit-image/numpy {want}");
            worst[i] = worst[i].max(diff);
        }
    }
    eprintln!("largest differences: psnr_y {:.2e}, ssim_y {:.2e}, lsd {:.2e}", worst[0], worst[1], worst[2]);
}
