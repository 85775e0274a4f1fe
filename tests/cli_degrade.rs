//! `engine degrade` as a user runs it: seeded, byte-identical pairs of exact sizes, mirrored
//! subfolders, per-image seeds, and bad inputs reported without stopping the batch.

mod common;
use common::{assert_fails_with, engine, s};

use loaders::image::Image;
use std::path::{Path, PathBuf};
use std::process::Output;

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A textured RGB test image written as PNG.
fn write_photo(path: &Path, w: usize, h: usize, phase: f32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let data = (0..h)
        .flat_map(|y| {
            (0..w).flat_map(move |x| {
                let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
                [fx, 0.5 + 0.4 * (7.0 * fx * fy + phase).sin(), if (x / 6 + y / 6) % 2 == 0 { 0.85 } else { 0.15 }]
            })
        })
        .collect();
    loaders::image::write_png(path, &Image::new(w, h, 3, data), false).unwrap();
}

/// HQ_DIR with `a.png` (70x50), `sub/b.PNG` (45x61) and `c.txt` (not an image).
fn hq_dir(root: &Path) -> PathBuf {
    let hq = root.join("in");
    write_photo(&hq.join("a.png"), 70, 50, 0.0);
    write_photo(&hq.join("sub/b.PNG"), 45, 61, 1.0);
    std::fs::write(hq.join("c.txt"), "notes").unwrap();
    hq
}

fn size(path: &Path) -> (usize, usize) {
    let img = loaders::image::read(path).unwrap();
    assert_eq!(img.channels, 3);
    (img.width, img.height)
}

#[test]
fn the_same_seed_gives_the_same_bytes_at_exact_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let hq = hq_dir(dir.path());
    let (one, two, other) = (dir.path().join("one"), dir.path().join("two"), dir.path().join("other"));
    let stdout = ok(&engine(&["degrade", s(&hq), "-o", s(&one), "--seed", "7"]));
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert!(stdout.contains("a.png") && stdout.contains("2 pair(s) written"), "{stdout}");
    ok(&engine(&["degrade", s(&hq), "-o", s(&two), "--seed", "7", "--scale", "4"]));
    ok(&engine(&["degrade", s(&hq), "-o", s(&other), "--seed", "8"]));

    // HQ cropped to a multiple of 4; LQ exactly a quarter; subfolders mirrored; always .png.
    assert_eq!(size(&one.join("hq/a.png")), (68, 48));
    assert_eq!(size(&one.join("lq/a.png")), (17, 12));
    assert_eq!(size(&one.join("hq/sub/b.png")), (44, 60));
    assert_eq!(size(&one.join("lq/sub/b.png")), (11, 15));
    assert!(!one.join("lq/c.png").exists());
    for name in ["a.png", "sub/b.png"] {
        let read = |d: &Path| std::fs::read(d.join("lq").join(name)).unwrap();
        assert_eq!(read(&one), read(&two), "{name} differs between runs");
        assert_ne!(read(&one), read(&other), "{name} ignores the seed");
    }

    // Adding an image leaves the others' LQ as they were.
    write_photo(&hq.join("0.png"), 33, 33, 2.0);
    let more = dir.path().join("more");
    ok(&engine(&["degrade", s(&hq), "-o", s(&more), "--seed", "7"]));
    assert_eq!(std::fs::read(more.join("lq/a.png")).unwrap(), std::fs::read(one.join("lq/a.png")).unwrap());
    assert_eq!(size(&more.join("lq/0.png")), (8, 8));

    // Existing pairs are refused unless --overwrite.
    assert_fails_with(&engine(&["degrade", s(&hq), "-o", s(&one), "--seed", "7"]), &["a.png", "--overwrite"]);
    ok(&engine(&["degrade", s(&hq), "-o", s(&one), "--seed", "7", "--overwrite"]));
}

#[test]
fn crop_takes_the_centre_and_skips_small_images() {
    let dir = tempfile::tempdir().unwrap();
    let hq = hq_dir(dir.path());
    let out = dir.path().join("out");
    let run = engine(&["degrade", s(&hq), "-o", s(&out), "--seed", "1", "--crop", "50", "--scale", "2"]);
    ok(&run);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("warning: ") && stderr.contains("b.PNG") && stderr.contains("--crop 50"), "{stderr}");
    assert_eq!(size(&out.join("hq/a.png")), (50, 50));
    assert_eq!(size(&out.join("lq/a.png")), (25, 25));
    assert!(!out.join("lq/sub/b.png").exists());
    // The centre: the crop's first pixel is the source's pixel (10, 0).
    let (src, hq_out) = (loaders::image::read(&hq.join("a.png")).unwrap(), loaders::image::read(&out.join("hq/a.png")).unwrap());
    assert_eq!(&hq_out.data[..3], &src.data[10 * 3..10 * 3 + 3]);
}

#[test]
fn a_corrupt_image_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let hq = hq_dir(dir.path());
    std::fs::write(hq.join("bad.png"), "not a png").unwrap();
    let out = dir.path().join("out");
    let run = engine(&["degrade", s(&hq), "-o", s(&out), "--seed", "3"]);
    assert_fails_with(&run, &["bad.png", "1 of 3"]);
    assert!(out.join("lq/a.png").exists() && out.join("lq/sub/b.png").exists());
    assert!(!out.join("lq/bad.png").exists());
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("bad.png  failed") && stdout.contains("1 failed"), "{stdout}");
}

#[test]
fn bad_arguments_are_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let out = dir.path().join("out");
    assert_fails_with(&engine(&["degrade", s(&missing), "-o", s(&out), "--seed", "1"]), &["nowhere", "cannot open"]);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_fails_with(&engine(&["degrade", s(&empty), "-o", s(&out), "--seed", "1"]), &["empty", "no PNG"]);
    let hq = hq_dir(dir.path());
    assert_fails_with(&engine(&["degrade", s(&hq), "-o", s(&out), "--seed", "1", "--scale", "0"]), &["--scale"]);
    assert!(!out.exists());
}
