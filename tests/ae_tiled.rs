//! The tiled autoencoder against the whole-image pass it replaces, on random weights of a small
//! autoencoder with FLUX's architecture (three levels, so three resolutions per direction):
//! exact with exact shared statistics, the mid-block attention off and a context covering the
//! receptive field (and not exact when any of the three is taken away); seams hidden by the
//! blending; device memory set by the tile, not the image; a device out of memory retried in
//! smaller tiles; and the CLI's tiling flags.

mod common;
use common::hooked::Hooked;
use common::{assert_fails_with, engine, s};

use engine::ae::tiled::seam_ratio;
use engine::ae::{AeDirection, AutoEncoderParams, Autoencoder, Estimate, FluxAe, Statistics, TileOptions};
use engine::model::weights::WeightLoader;
use engine::perf::meta::MetaBackend;
use engine::perf::plan::MemoryPlan;
use engine::{Backend, CpuBackend};
use loaders::{DType, HostTensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn params() -> AutoEncoderParams {
    AutoEncoderParams { ch: 16, ch_mult: vec![1, 2, 2], num_res_blocks: 1, z_channels: 4, norm_num_groups: 8, ..Default::default() }
}

/// The random weights of `params()` written to `dir`, as `engine model init --ae flux` makes them.
fn weights(dir: &Path) -> PathBuf {
    let path = dir.join("ae.safetensors");
    if path.exists() {
        return path;
    }
    let tensors = params().random_weights(3).unwrap();
    let list: Vec<(&str, &HostTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    loaders::safetensors::write(&path, &list, &BTreeMap::new(), false).unwrap();
    path
}

fn model<B: Backend>(b: &B, dir: &Path, attention: bool) -> FluxAe<B> {
    let mut ae = FluxAe::load(b, &weights(dir), &params()).unwrap();
    ae.mid_attention = attention;
    ae
}

/// A smooth image with some texture, `[1, 3, h, w]` in [-1, 1].
fn image(h: usize, w: usize) -> HostTensor {
    let data = (0..3 * h * w)
        .map(|i| {
            let (c, y, x) = (i / (h * w), (i / w) % h, i % w);
            (0.6 * ((x as f32 * 0.07 + c as f32).sin() * (y as f32 * 0.05).cos()) + 0.3 * ((x * 7 + y * 13) % 5) as f32 / 5.0 - 0.1)
                .clamp(-1.0, 1.0)
        })
        .collect();
    HostTensor::from_f32(vec![1, 3, h, w], data)
}

fn whole() -> TileOptions {
    TileOptions { tile: Some(0), ..TileOptions::default() }
}

fn max_abs_diff(a: &HostTensor, b: &HostTensor) -> f32 {
    assert_eq!(a.shape, b.shape);
    a.to_f32().iter().zip(b.to_f32()).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Largest difference of two decoded images in 8-bit levels, as PNG files store them.
fn levels(a: &HostTensor, b: &HostTensor) -> f32 {
    let level = |v: f32| ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round();
    a.to_f32().iter().zip(b.to_f32()).fold(0f32, |m, (x, y)| m.max((level(*x) - level(y)).abs()))
}

fn no_progress() -> impl FnMut(usize, usize) {
    |_, _| ()
}

/// The untiled reference: `x` encoded and its latent decoded, each as one whole image.
fn whole_round_trip(b: &CpuBackend, ae: &FluxAe<CpuBackend>, x: &HostTensor) -> (HostTensor, HostTensor) {
    let latent = ae.encode_tiled(b, x, &whole(), &mut no_progress()).unwrap().output;
    let decoded = ae.decode_tiled(b, &latent, &whole(), &mut no_progress()).unwrap().output;
    (latent, decoded)
}

#[test]
fn tiles_equal_the_whole_image_with_exact_statistics_no_attention_and_the_receptive_field() {
    let dir = tempfile::tempdir().unwrap();
    let b = CpuBackend::new();
    let ae = model(&b, dir.path(), false);
    // 4 pixels per latent cell; 64 x 48 cells, so that interior tiles see only part of the image
    // even with a context of the whole receptive field (13 cells for the decoder).
    let x = image(256, 192);
    let (reference_latent, reference) = whole_round_trip(&b, &ae, &x);
    let latent_scale = reference_latent.to_f32().iter().fold(0f32, |m, v| m.max(v.abs()));

    let exact = |direction| TileOptions {
        tile: Some(64),
        overlap: 8,
        context: ae.receptive_field(direction),
        statistics: Statistics::Exact,
        max_memory: None,
    };
    let tiled_latent = ae.encode_tiled(&b, &x, &exact(AeDirection::Encode), &mut no_progress()).unwrap();
    assert!(tiled_latent.tiles > 4 && tiled_latent.passes > 10, "{} tiles, {} passes", tiled_latent.tiles, tiled_latent.passes);
    let latent_err = max_abs_diff(&tiled_latent.output, &reference_latent) / latent_scale;
    let tiled = ae.decode_tiled(&b, &reference_latent, &exact(AeDirection::Decode), &mut no_progress()).unwrap();
    let image_err = max_abs_diff(&tiled.output, &reference);
    eprintln!("exact: latent {latent_err:.2e} of its range, image {image_err:.2e}, {} levels", levels(&tiled.output, &reference));
    assert!(latent_err < 1e-4, "encode: {latent_err:e}");
    assert!(image_err < 1e-4 && levels(&tiled.output, &reference) <= 1.0, "decode: {image_err:e}");

    // Each ingredient matters: statistics of the tile itself, one refinement only, or a context
    // short of the receptive field each leave differences far beyond rounding.
    for (what, opts) in [
        ("per-tile statistics", TileOptions { statistics: Statistics::PerTile, ..exact(AeDirection::Decode) }),
        (
            "one refinement",
            TileOptions { statistics: Statistics::Fixed { estimate: Estimate::Downsampled, refinements: 1 }, ..exact(AeDirection::Decode) },
        ),
        ("half the receptive field", TileOptions { context: ae.receptive_field(AeDirection::Decode) / 2, ..exact(AeDirection::Decode) }),
    ] {
        let err = max_abs_diff(&ae.decode_tiled(&b, &reference_latent, &opts, &mut no_progress()).unwrap().output, &reference);
        eprintln!("{what}: {err:.2e}");
        assert!(err > 1e-2, "{what}: {err:e}, as exact as the exact configuration");
    }
}

/// PSNR (dB) of `a` against `b`, both in [-1, 1] (clamped as images are stored).
fn psnr(a: &HostTensor, b: &HostTensor) -> f64 {
    let mse = a.to_f32().iter().zip(b.to_f32()).map(|(x, y)| ((x.clamp(-1.0, 1.0) - y.clamp(-1.0, 1.0)) as f64 / 2.0).powi(2)).sum::<f64>()
        / a.len() as f64;
    -10.0 * mse.log10()
}

#[test]
fn matched_statistics_keep_the_tiles_level_within_the_image() {
    // An image whose right half is nearly flat: normalised over itself, a tile there has its
    // faint texture stretched to the contrast of the textured half's tiles; matched statistics
    // keep it as faint as in the whole image. Fixed statistics from one gathering pass compound
    // their error through the layers.
    let dir = tempfile::tempdir().unwrap();
    let b = CpuBackend::new();
    let ae = model(&b, dir.path(), false);
    let mut x = image(256, 192).to_f32();
    for (i, v) in x.iter_mut().enumerate() {
        if i % 192 >= 96 {
            *v = 0.3 + 0.01 * ((i * 7) % 3) as f32;
        }
    }
    let x = HostTensor::from_f32(vec![1, 3, 256, 192], x);
    let (latent, reference) = whole_round_trip(&b, &ae, &x);
    let opts = |statistics| TileOptions {
        tile: Some(64),
        overlap: 8,
        context: ae.receptive_field(AeDirection::Decode),
        statistics,
        max_memory: None,
    };
    let score = |statistics| psnr(&ae.decode_tiled(&b, &latent, &opts(statistics), &mut no_progress()).unwrap().output, &reference);
    let (matched, per_tile) = (score(Statistics::Matched), score(Statistics::PerTile));
    let fixed = score(Statistics::Fixed { estimate: Estimate::Tiles, refinements: 0 });
    eprintln!("PSNR against the whole image: matched {matched:.2} dB, per-tile {per_tile:.2} dB, fixed {fixed:.2} dB");
    assert!(matched > per_tile + 1.0 && matched > fixed + 1.0, "matched {matched}, per-tile {per_tile}, fixed {fixed}");
}

#[test]
fn blending_hides_the_seams_of_tiles_that_disagree() {
    let dir = tempfile::tempdir().unwrap();
    let b = CpuBackend::new();
    let ae = model(&b, dir.path(), true);
    let x = image(192, 160);
    let (latent, reference) = whole_round_trip(&b, &ae, &x);
    // Tiles made to disagree: each normalised over itself, two latent cells of context, the
    // mid-block attention per tile; blended over the default overlap (half the tile here). With
    // no context at all both sides of a cut would be pulled alike by the zero padding, and a
    // jump across the line would no longer show the seam.
    let opts = TileOptions { tile: Some(32), context: 8, statistics: Statistics::PerTile, ..TileOptions::default() };
    let blended = ae.decode_tiled(&b, &latent, &opts, &mut no_progress()).unwrap();
    let (rows, cols) = &blended.seams;
    assert!(!rows.is_empty() && !cols.is_empty());
    let figure = seam_ratio(&blended.output, rows, cols, 4);
    let own = seam_ratio(&reference, rows, cols, 4);
    // The same tiles cut at the middle of their overlap (no overlap to blend over).
    let cut = ae.decode_tiled(&b, &latent, &TileOptions { overlap: 0, ..opts }, &mut no_progress()).unwrap();
    let cut_figure = seam_ratio(&cut.output, &cut.seams.0, &cut.seams.1, 4);
    eprintln!("seam figure: blended {figure:.3}, cut {cut_figure:.3}, the whole image on the same lines {own:.3}");
    assert!(figure < 1.1, "blended tiles show seams: {figure}");
    assert!(cut_figure > 1.3, "the figure does not see cut tiles: {cut_figure}");
}

#[test]
fn device_memory_is_set_by_the_tile_not_the_image() {
    // The real tiled code on the shapes-only backend: its packed activation arena for two image
    // sizes at one tile, and for the whole image.
    let arena = |cells: usize, tile: usize| {
        let b = MetaBackend::new(DType::BF16);
        {
            let ae = FluxAe::build(&params(), &mut WeightLoader::shapes_only(&b, DType::BF16)).unwrap();
            let latent = HostTensor::from_f32(vec![1, 4, cells, cells], vec![0.0; 4 * cells * cells]);
            let opts = TileOptions { tile: Some(tile), overlap: 8, context: 16, ..TileOptions::default() };
            ae.decode_tiled(&b, &latent, &opts, &mut no_progress()).unwrap();
        }
        MemoryPlan::of(&b.take_trace(), 0).arena
    };
    // 44 and 86 latent cells are 3 and 6 tiles of 16 cells overlapping by 2: the same tiles.
    let (small, large) = (arena(44, 64), arena(86, 64));
    let whole_large = arena(86, 0);
    eprintln!("arena: 176 px {small} B, 344 px {large} B, 344 px whole {whole_large} B");
    assert_eq!(small, large, "the arena grows with the image");
    assert!(whole_large > 4 * large, "whole {whole_large} vs tiled {large}");
}

#[test]
fn out_of_memory_halves_the_tile() {
    let dir = tempfile::tempdir().unwrap();
    // Convolutions over more than 40 x 40 pixels fail as a full GPU would.
    let hooked = Hooked { conv_pixel_limit: 40 * 40, ..Hooked::default() };
    let ae = model(&hooked, dir.path(), true);
    let latent = HostTensor::from_f32(vec![1, 4, 24, 24], (0..4 * 24 * 24).map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0).collect());
    let opts = TileOptions { tile: None, context: 8, overlap: 8, max_memory: Some(1 << 40), ..TileOptions::default() };
    let tiled = ae.decode_tiled(&hooked, &latent, &opts, &mut no_progress()).unwrap();
    // 96 pixels whole, then 48 + 2 x 8 context = 64 > 40, then 24 + 16 = 40.
    assert_eq!(tiled.tile, Some(24));
    let cpu = CpuBackend::new();
    let want =
        model(&cpu, dir.path(), true).decode_tiled(&cpu, &latent, &TileOptions { tile: Some(24), ..opts }, &mut no_progress()).unwrap();
    assert_eq!(tiled.output.to_f32(), want.output.to_f32());
}

#[test]
fn cli_tiles_and_refuses_bad_tiling_flags() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    let model = s(&weights(dir.path())).to_string();
    let config = p("config.json");
    std::fs::write(&config, serde_json::to_string(&params()).unwrap()).unwrap();
    let x = image(96, 64).to_f32();
    let (h, w) = (96, 64);
    let rgb: Vec<f32> = (0..h * w * 3).map(|i| (x[(i % 3) * h * w + i / 3] + 1.0) / 2.0).collect();
    loaders::image::write_png(Path::new(&p("in.png")), &loaders::image::Image::new(w, h, 3, rgb), false).unwrap();
    let ae = ["ae", "encode", "--model", &model, "--config", &config];

    let out = engine(&[&ae[..], &[&p("in.png"), "-o", &p("z.safetensors"), "--tile", "32", "--overlap", "8"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("tiles of 32 px") && said.contains("2 passes") && said.contains("peak resident memory"), "{said}");
    let dec = ["ae", "decode", "--model", &model, "--config", &config];
    let out = engine(&[&dec[..], &[&p("z.safetensors"), "-o", &p("out.png"), "--tile", "0"]].concat());
    assert!(String::from_utf8_lossy(&out.stdout).contains("whole image"), "{}", String::from_utf8_lossy(&out.stderr));

    assert_fails_with(&engine(&[&ae[..], &[&p("in.png"), "-o", &p("a.safetensors"), "--max-memory", "0"]].concat()), &["--max-memory 0"]);
    assert_fails_with(
        &engine(&[&ae[..], &[&p("in.png"), "-o", &p("a.safetensors"), "--max-memory", "nan"]].concat()),
        &["--max-memory NaN"],
    );

    let out = engine(&[
        "ae",
        "compare",
        "--model",
        &model,
        "--config",
        &config,
        &p("in.png"),
        "--tile",
        "32",
        "--overlap",
        "8",
        "--no-mid-attention",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    for what in ["encode", "decode"] {
        let line = said.lines().find(|l| l.trim_start().starts_with(what)).unwrap_or_else(|| panic!("{said}"));
        assert!(line.contains("dB against the whole image") && line.contains("seam figure"), "{said}");
    }
}
