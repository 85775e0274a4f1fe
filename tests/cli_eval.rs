//! `engine eval` as a user runs it: the golden pairs scored into a table, a CSV and a plot that
//! match the scikit-image reference, and every bad input answered by one `error:` line.

mod common;
use common::metric_weights::{golden as golden_file, golden_weights, json};
use common::{assert_fails_with, engine, s};

use std::path::{Path, PathBuf};

fn golden(side: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/metrics").join(side)
}

/// A copy of the golden SR directory, to be edited by a test.
fn sr_copy(dir: &Path) -> PathBuf {
    let sr = dir.join("sr");
    std::fs::create_dir(&sr).unwrap();
    for name in ["blur.png", "noise.png", "shift.png"] {
        std::fs::copy(golden("sr").join(name), sr.join(name)).unwrap();
    }
    sr
}

#[test]
fn eval_matches_the_reference_in_table_csv_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let (csv, plot) = (dir.path().join("scores.csv"), dir.path().join("spectrum.png"));
    let (sr, hq) = (golden("sr"), golden("hq"));
    let args = ["eval", s(&sr), s(&hq), "--csv", s(&csv), "--plot", s(&plot), "--metrics", "psnr,ssim,lsd"];
    let out = engine(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));

    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(golden("reference.json")).unwrap()).unwrap();
    let want = |name: &str, key: &str| -> f64 {
        let pairs = reference["pairs"].as_array().unwrap();
        if name == "mean" {
            pairs.iter().map(|p| p[key].as_f64().unwrap()).sum::<f64>() / pairs.len() as f64
        } else {
            pairs.iter().find(|p| p["name"] == name).unwrap()[key].as_f64().unwrap()
        }
    };

    // The table: a header, one aligned row per pair in stem order, then the mean.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    assert!(lines[0].starts_with("name") && lines[0].contains("PSNR-Y") && lines[0].contains("SSIM-Y") && lines[0].contains("LSD"));
    assert!(lines.iter().all(|l| l.len() == lines[0].len()), "not aligned:\n{stdout}");
    for (line, name) in lines[1..].iter().zip(["blur", "noise", "shift", "mean"]) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[0], name, "{stdout}");
        let psnr: f64 = cells[1].parse().unwrap();
        assert!((psnr - want(name, "psnr_y")).abs() < 1e-3, "{stdout}");
    }

    // The CSV: full precision, the same rows.
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows[0], "name,psnr_y,ssim_y,lsd");
    assert_eq!(rows.len(), 5, "{text}");
    for (row, name) in rows[1..].iter().zip(["blur", "noise", "shift", "mean"]) {
        let cells: Vec<&str> = row.split(',').collect();
        assert_eq!(cells[0], name);
        for (cell, key) in cells[1..].iter().zip(["psnr_y", "ssim_y", "lsd"]) {
            let got: f64 = cell.parse().unwrap();
            assert!((got - want(name, key)).abs() < 1e-3, "{name} {key}: {got} against {}", want(name, key));
        }
    }

    // The plot: an 800x500 RGB PNG, not blank.
    let img = loaders::image::read(&plot).unwrap();
    assert_eq!((img.width, img.height, img.channels), (800, 500, 3));
    assert!(img.data.chunks(3).any(|p| p[0] > 0.5 && p[1] < 0.3 && p[2] < 0.3), "no red SR line");
    assert!(img.data.chunks(3).any(|p| p[2] > 0.5 && p[0] < 0.3 && p[1] < 0.3), "no blue bicubic line");

    // More variants on the plot, and a chosen image: a green line appears; a stem that is not
    // there is named.
    let also = dir.path().join("also.png");
    let with_also = ["eval", s(&sr), s(&hq), "--plot", s(&also), "--plot-also", s(&hq), "--plot-stem", "noise"];
    assert!(engine(&with_also).status.success());
    let img = loaders::image::read(&also).unwrap();
    assert!(img.data.chunks(3).any(|p| p[1] > 0.5 && p[0] < 0.2 && p[2] < 0.2), "no green line");
    let nowhere = dir.path().join("x.png");
    let missing = ["eval", s(&sr), s(&hq), "--plot", s(&nowhere), "--plot-stem", "nope"];
    assert_fails_with(&engine(&missing), &["nope"]);

    // Outputs are not replaced unless asked.
    assert_fails_with(&engine(&args), &["scores.csv", "--overwrite"]);
    let mut again = args.to_vec();
    again.push("--overwrite");
    assert!(engine(&again).status.success());
}

#[test]
fn hq_images_without_a_match_are_one_warning() {
    let dir = tempfile::tempdir().unwrap();
    let sr = sr_copy(dir.path());
    std::fs::remove_file(sr.join("blur.png")).unwrap();
    std::fs::remove_file(sr.join("shift.png")).unwrap();
    // Extensions match case-insensitively.
    std::fs::rename(sr.join("noise.png"), sr.join("noise.PNG")).unwrap();
    let out = engine(&["eval", s(&sr), s(&golden("hq")), "--metrics", "psnr,ssim,lsd"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("warning: ") && stderr.contains("blur.png") && stderr.contains("shift.png"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("noise") && stdout.contains("mean") && !stdout.contains("blur"), "{stdout}");
}

#[test]
fn missing_directories_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    assert_fails_with(&engine(&["eval", s(&missing), s(&golden("hq"))]), &["no-such-dir"]);
    assert_fails_with(&engine(&["eval", s(&golden("sr")), s(&missing)]), &["no-such-dir"]);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_fails_with(&engine(&["eval", s(&empty), s(&golden("hq"))]), &["no image", "empty"]);
}

#[test]
fn a_size_mismatch_names_both_files_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let sr = sr_copy(dir.path());
    std::fs::copy(golden("sr").join("noise.png"), sr.join("blur.png")).unwrap();
    assert_fails_with(&engine(&["eval", s(&sr), s(&golden("hq"))]), &["sr/blur.png", "hq/blur.png", "56x40", "47x33"]);
}

#[test]
fn an_unreadable_image_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let sr = sr_copy(dir.path());
    std::fs::write(sr.join("noise.png"), b"not a picture").unwrap();
    assert_fails_with(&engine(&["eval", s(&sr), s(&golden("hq"))]), &["noise.png"]);
    let bytes = std::fs::read(golden("sr").join("shift.png")).unwrap();
    std::fs::write(sr.join("noise.png"), &bytes[..bytes.len() / 2]).unwrap();
    assert_fails_with(&engine(&["eval", s(&sr), s(&golden("hq"))]), &["noise.png"]);
}

/// `dir/weights`, a metric-weights folder with the goldens' random backbones.
fn weights_dir(dir: &Path) -> PathBuf {
    let weights = dir.join("weights");
    std::fs::create_dir(&weights).unwrap();
    golden_weights(&weights);
    weights
}

/// The CSV's header and rows as (name, cells).
fn read_csv(path: &Path) -> (Vec<String>, Vec<(String, Vec<f64>)>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap().split(',').map(str::to_string).collect();
    let rows = lines
        .map(|l| {
            let mut cells = l.split(',');
            (cells.next().unwrap().to_string(), cells.map(|c| c.parse().unwrap()).collect())
        })
        .collect();
    (header, rows)
}

#[test]
fn perceptual_and_no_reference_columns_match_their_references() {
    let dir = tempfile::tempdir().unwrap();
    let weights = weights_dir(dir.path());
    let (csv, sr, hq) = (dir.path().join("scores.csv"), golden("sr"), golden("hq"));
    let metrics = "brisque,st-lpips,lpips,dists,psnr";
    let out = engine(&["eval", s(&sr), s(&hq), "--weights", s(&weights), "--metrics", metrics, "--csv", s(&csv), "--device", "cpu"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for h in ["PSNR-Y", "ST-LPIPS", "LPIPS", "DISTS", "BRISQUE"] {
        assert!(stdout.lines().next().unwrap().contains(h), "{stdout}");
    }
    // Columns in the fixed order, whatever the order asked.
    let (header, rows) = read_csv(&csv);
    assert_eq!(header, ["name", "psnr_y", "st_lpips", "lpips", "dists", "brisque"]);
    let (perceptual, noref) = (json("perceptual/reference.json"), json("noref/reference.json"));
    let pairs = perceptual["pairs"].as_array().unwrap();
    let mut sums = [0f64; 4];
    for (name, cells) in &rows[..3] {
        let pair = pairs.iter().find(|p| p["name"] == name.as_str()).unwrap();
        let brisque = noref["images"].as_array().unwrap().iter().find(|i| i["path"] == format!("metrics/sr/{name}.png")).unwrap();
        let want = [
            pair["st_lpips_alex"].as_f64().unwrap(),
            pair["lpips_alex"].as_f64().unwrap(),
            pair["dists"].as_f64().unwrap(),
            brisque["brisque"].as_f64().unwrap(),
        ];
        for (k, (got, want)) in cells[1..].iter().zip(want).enumerate() {
            // the networks within 1e-4, BRISQUE within 1e-3 (relative); the CSV keeps 6 decimals
            let tolerance = if k == 3 { 1e-3 } else { 1e-4 };
            assert!((got - want).abs() <= tolerance * want.abs() + 1e-6, "{name} {}: {got} against {want}", header[k + 2]);
            sums[k] += got;
        }
    }
    assert_eq!(rows[3].0, "mean");
    for (k, sum) in sums.iter().enumerate() {
        assert!((rows[3].1[k + 1] - sum / 3.0).abs() < 2e-6, "mean of {}", header[k + 2]);
    }
}

#[test]
fn no_reference_scores_a_folder_alone() {
    let dir = tempfile::tempdir().unwrap();
    let weights = weights_dir(dir.path());
    let (csv, sr, noref) = (dir.path().join("noref.csv"), golden("sr"), golden_file("noref"));
    // Without --metrics: the no-reference metrics whose weights are there.
    let out = engine(&["eval", s(&noref), "--no-reference", "--weights", s(&weights), "--csv", s(&csv)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let (header, rows) = read_csv(&csv);
    assert_eq!(header, ["name", "niqe", "brisque", "grid"]);
    assert!(rows.iter().all(|(_, cells)| cells[2].is_finite() && cells[2] > 0.0), "{rows:?}");
    let reference = json("noref/reference.json");
    for (name, cells) in &rows[..3] {
        let image = reference["images"].as_array().unwrap().iter().find(|i| i["path"] == format!("noref/{name}.png")).unwrap();
        for (got, key) in cells.iter().zip(["niqe", "brisque"]) {
            let want = image[key].as_f64().unwrap();
            assert!((got - want).abs() <= 1e-3 * want.abs(), "{name} {key}: {got} against {want}");
        }
    }

    // NIQE's size limit names the file.
    let small = ["eval", s(&sr), "--no-reference", "--weights", s(&weights), "--metrics", "niqe"];
    assert_fails_with(&engine(&small), &["blur.png", "193 pixels"]);
    // Full-reference metrics need a reference.
    let psnr = ["eval", s(&sr), "--no-reference", "--weights", s(&weights), "--metrics", "psnr"];
    assert_fails_with(&engine(&psnr), &["psnr_y", "--no-reference"]);
}

#[test]
fn missing_weights_are_skipped_by_default_and_named_when_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let weights = weights_dir(dir.path());
    std::fs::remove_file(weights.join("niqe.safetensors")).unwrap();
    std::fs::remove_file(weights.join("vgg16.safetensors")).unwrap();
    let (csv, sr, hq) = (dir.path().join("scores.csv"), golden("sr"), golden("hq"));
    let out = engine(&["eval", s(&sr), s(&hq), "--weights", s(&weights), "--csv", s(&csv)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("note: DISTS, NIQE skipped") && stderr.contains("tools/metric-weights.sh"), "{stderr}");
    assert_eq!(read_csv(&csv).0, ["name", "psnr_y", "ssim_y", "lsd", "st_lpips", "lpips", "brisque", "grid"]);

    let asked = ["eval", s(&sr), s(&hq), "--weights", s(&weights), "--metrics", "dists"];
    assert_fails_with(&engine(&asked), &["--metrics dists", "vgg16.safetensors: not found", "tools/metric-weights.sh"]);
    let nowhere = dir.path().join("nowhere");
    assert_fails_with(&engine(&["eval", s(&sr), s(&hq), "--weights", s(&nowhere)]), &["--weights", "nowhere"]);
    let corrupt = weights.join("brisque.safetensors");
    std::fs::write(&corrupt, b"not safetensors").unwrap();
    let broken = ["eval", s(&sr), s(&hq), "--weights", s(&weights), "--metrics", "brisque"];
    assert_fails_with(&engine(&broken), &["brisque.safetensors"]);
}
