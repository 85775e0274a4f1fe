//! `engine eval` as a user runs it: the golden pairs scored into a table, a CSV and a plot that
//! match the scikit-image reference, and every bad input answered by one `error:` line.

mod common;
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
    let args = ["eval", s(&sr), s(&hq), "--csv", s(&csv), "--plot", s(&plot)];
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
    let out = engine(&["eval", s(&sr), s(&golden("hq"))]);
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
