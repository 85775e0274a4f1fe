//! The autoencoders against diffusers' `AutoencoderKL` (PyTorch, f32): a small random model shaped
//! like FLUX's, written by `tools/golden/make_ae_goldens.py` into tests/golden/ae/ in both key
//! layouts; the weightless pixel shuffle; strict loading; and `engine ae encode|decode`.

mod common;
use common::{assert_fails_with, edited, engine, max_rel_err};

use engine::ae::{AutoEncoderParams, Autoencoder, FluxAe, PixelShuffle};
use engine::{Backend, CpuBackend};
use loaders::image::{self, Image};
use loaders::safetensors::Checkpoint;
use loaders::HostTensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

const TOLERANCE: f64 = 1e-4;

fn golden(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/ae").join(file)
}

fn params() -> AutoEncoderParams {
    AutoEncoderParams::read(&golden("config.json")).unwrap()
}

fn io(name: &str) -> HostTensor {
    Checkpoint::open(&golden("io.safetensors")).unwrap().read(name).unwrap()
}

#[test]
fn both_layouts_match_diffusers() {
    let b = CpuBackend::new();
    for file in ["ae.bfl.safetensors", "ae.diffusers.safetensors"] {
        let ae = FluxAe::load(&b, &golden(file), &params()).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        assert_eq!((ae.downscale(), ae.latent_channels()), (2, 4));
        for (what, input, expected) in [("encode", "image", "latent"), ("decode", "latent", "decoded")] {
            let x = b.input(&io(input)).unwrap();
            let y = if what == "encode" { ae.encode(&b, &x) } else { ae.decode(&b, &x) };
            let y = b.download(&y.unwrap_or_else(|e| panic!("{file} {what}: {e:#}"))).unwrap();
            let want = io(expected);
            assert_eq!(y.shape, want.shape, "{file} {what}: shape");
            let err = max_rel_err(&y.to_f32(), &want.to_f32());
            eprintln!("{file} {what}: max relative error {err:.2e}");
            assert!(err < TOLERANCE, "{file} {what}: max relative error {err:.3e} >= {TOLERANCE:e}");
        }
    }
}

#[test]
fn pixel_shuffle_round_trip_is_exact() {
    let b = CpuBackend::new();
    let (n, h, w) = (2, 12, 18);
    let data: Vec<f32> = (0..n * 3 * h * w).map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0).collect();
    let x = b.input(&HostTensor::from_f32(vec![n, 3, h, w], data.clone())).unwrap();
    for f in [1, 2, 3, 6] {
        let ps = PixelShuffle::new(f);
        let z = Autoencoder::<CpuBackend>::encode(&ps, &b, &x).unwrap();
        assert_eq!(z.shape(), &[n, 3 * f * f, h / f, w / f]);
        assert_eq!(Autoencoder::<CpuBackend>::latent_channels(&ps), 3 * f * f);
        let back = b.download(&Autoencoder::<CpuBackend>::decode(&ps, &b, &z).unwrap()).unwrap();
        assert_eq!(back.shape, vec![n, 3, h, w]);
        assert_eq!(back.to_f32(), data, "factor {f}");
    }
    let err = Autoencoder::<CpuBackend>::encode(&PixelShuffle::new(4), &b, &x).unwrap_err().to_string();
    assert!(err.contains("18x12") && err.contains("multiples of 4"), "{err}");
}

#[test]
fn wrong_image_size_is_an_error() {
    let b = CpuBackend::new();
    let ae = FluxAe::load(&b, &golden("ae.bfl.safetensors"), &params()).unwrap();
    let x = b.input(&HostTensor::from_f32(vec![1, 3, 7, 8], vec![0.0; 3 * 56])).unwrap();
    let err = ae.encode(&b, &x).unwrap_err().to_string();
    assert!(err.contains("8x7") && err.contains("multiples of 2"), "{err}");
    let z = b.input(&HostTensor::from_f32(vec![1, 5, 2, 2], vec![0.0; 20])).unwrap();
    let err = ae.decode(&b, &z).unwrap_err().to_string();
    assert!(err.contains("[1, 5, 2, 2]"), "{err}");
}

/// A change to a checkpoint's tensors.
type Edit = Box<dyn FnOnce(&mut BTreeMap<String, HostTensor>)>;

fn load_err(path: &Path) -> String {
    match FluxAe::load(&CpuBackend::new(), path, &params()) {
        Ok(_) => panic!("{}: loaded", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_checkpoints_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, &str, Edit, Vec<&str>)> = vec![
        (
            "missing.bfl.safetensors",
            "ae.bfl.safetensors",
            Box::new(|t| {
                t.remove("encoder.mid.attn_1.q.weight");
            }),
            vec!["missing tensor 'encoder.mid.attn_1.q.weight'"],
        ),
        (
            "missing.diffusers.safetensors",
            "ae.diffusers.safetensors",
            Box::new(|t| {
                t.remove("decoder.up_blocks.0.resnets.1.conv1.weight");
            }),
            vec!["missing tensor 'decoder.up_blocks.0.resnets.1.conv1.weight'"],
        ),
        (
            "shape.diffusers.safetensors",
            "ae.diffusers.safetensors",
            Box::new(|t| {
                t.insert("encoder.mid_block.attentions.0.to_k.weight".into(), HostTensor::from_f32(vec![32, 31], vec![0.0; 32 * 31]));
            }),
            vec!["'encoder.mid_block.attentions.0.to_k.weight' has shape [32, 31, 1, 1], expected [32, 32, 1, 1]"],
        ),
        (
            "extra.diffusers.safetensors",
            "ae.diffusers.safetensors",
            Box::new(|t| {
                t.insert("encoder.down_blocks.0.resnets.0.norm3.weight".into(), HostTensor::from_f32(vec![16], vec![0.0; 16]));
            }),
            vec!["unexpected tensor 'encoder.down_blocks.0.resnets.0.norm3.weight'"],
        ),
        (
            "extra.bfl.safetensors",
            "ae.bfl.safetensors",
            Box::new(|t| {
                t.insert("decoder.up.2.block.0.conv1.bias".into(), HostTensor::from_f32(vec![16], vec![0.0; 16]));
            }),
            vec!["unexpected tensor 'decoder.up.2.block.0.conv1.bias'"],
        ),
        (
            "quant.diffusers.safetensors",
            "ae.diffusers.safetensors",
            Box::new(|t| {
                t.insert("quant_conv.weight".into(), HostTensor::from_f32(vec![8, 8, 1, 1], vec![0.0; 64]));
            }),
            vec!["'quant_conv.weight'", "quant convs"],
        ),
    ];
    for (name, src, edit, fragments) in cases {
        let path = edited(dir.path(), name, &golden(src), edit);
        let err = load_err(&path);
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        for f in fragments {
            assert!(err.contains(f), "{name}: '{err}' lacks '{f}'");
        }
    }
}

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn cli_encodes_and_decodes() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    let (w, h) = (40, 24);
    let data: Vec<f32> = (0..w * h * 3).map(|i| ((i * 37 + i / 120 * 11) % 256) as f32 / 255.0).collect();
    image::write_png(Path::new(&p("in.png")), &Image::new(w, h, 3, data.clone()), false).unwrap();

    // The weightless autoencoder round-trips 8-bit pixels exactly.
    assert_ok(&engine(&["ae", "encode", "--model", "pixel-shuffle:2", &p("in.png"), "-o", &p("ps.safetensors")]));
    let z = Checkpoint::open(Path::new(&p("ps.safetensors"))).unwrap().read("latent").unwrap();
    assert_eq!(z.shape, vec![1, 12, h / 2, w / 2]);
    assert_ok(&engine(&["ae", "decode", "--model", "pixel-shuffle:2", &p("ps.safetensors"), "-o", &p("ps.png")]));
    assert_eq!(image::read(Path::new(&p("ps.png"))).unwrap().data, data);

    // The golden KL autoencoder: the CLI latent is the library's.
    let model = golden("ae.diffusers.safetensors").display().to_string();
    let config = golden("config.json").display().to_string();
    let enc = ["ae", "encode", "--model", &model, "--config", &config];
    assert_ok(&engine(&[&enc[..], &[&p("in.png"), "-o", &p("kl.safetensors")]].concat()));
    let z = Checkpoint::open(Path::new(&p("kl.safetensors"))).unwrap().read("latent").unwrap();
    assert_eq!(z.shape, vec![1, 4, h / 2, w / 2]);
    let b = CpuBackend::new();
    let ae = FluxAe::load(&b, &golden("ae.diffusers.safetensors"), &params()).unwrap();
    let x: Vec<f32> = (0..3 * h * w).map(|i| data[(i % (h * w)) * 3 + i / (h * w)] * 2.0 - 1.0).collect();
    let want = b.download(&ae.encode(&b, &b.input(&HostTensor::from_f32(vec![1, 3, h, w], x)).unwrap()).unwrap()).unwrap();
    assert_eq!(z.to_f32(), want.to_f32());
    let dec = ["ae", "decode", "--model", &model, "--config", &config];
    assert_ok(&engine(&[&dec[..], &[&p("kl.safetensors"), "-o", &p("kl.png")]].concat()));
    let img = image::read(Path::new(&p("kl.png"))).unwrap();
    assert_eq!((img.width, img.height, img.channels), (w, h, 3));

    // Refusals: overwriting, a size the factor does not divide, a file without 'latent'.
    assert_fails_with(&engine(&[&enc[..], &[&p("in.png"), "-o", &p("kl.safetensors")]].concat()), &["kl.safetensors", "--overwrite"]);
    assert_ok(&engine(&[&enc[..], &[&p("in.png"), "-o", &p("kl.safetensors"), "--overwrite"]].concat()));
    image::write_png(Path::new(&p("odd.png")), &Image::new(41, 24, 3, vec![0.5; 41 * 24 * 3]), false).unwrap();
    assert_fails_with(
        &engine(&[&enc[..], &[&p("odd.png"), "-o", &p("odd.safetensors")]].concat()),
        &["odd.png", "41x24", "multiples of 2"],
    );
    assert_fails_with(
        &engine(&["ae", "decode", "--model", "pixel-shuffle:3", &p("ps.safetensors"), "-o", &p("x.png")]),
        &["ps.safetensors", "[1, 12, 12, 20]", "[1, 27, height, width]"],
    );
    assert_fails_with(
        &engine(&[&dec[..], &[&golden("io.safetensors").display().to_string(), "-o", &p("y.png")]].concat()),
        &["io.safetensors", "[2, 4, 12, 20]"],
    );
    assert_fails_with(
        &engine(&["ae", "encode", "--model", "pixel-shuffle:0", &p("in.png"), "-o", &p("z.safetensors")]),
        &["pixel-shuffle:0"],
    );
}
