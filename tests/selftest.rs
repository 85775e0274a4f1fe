//! The self-test harness, checked on the CPU: it must pass the reference against itself, flag an
//! op whose results drift, flag an output element a kernel never writes (the NaN poison), and the
//! CLI must print its table and exit non-zero on failure or when no GPU exists. The same checks on
//! a real GPU live in `tests/gpu.rs`.

mod common;

use common::{assert_fails_with, engine, s};
use engine::backend::cpu::CpuBackend;
use engine::selftest::{model_check, op_checks};
use engine::{Backend, Tensor};
use loaders::{DType, HostData, HostTensor};
use std::sync::atomic::{AtomicBool, Ordering};

/// The CPU backend with two planted bugs: `silu` is 10% too large, and while poisoning is on
/// `gelu_tanh` leaves its first element unwritten (NaN).
#[derive(Default)]
struct Faulty {
    cpu: CpuBackend,
    poison: AtomicBool,
}

type T = Tensor<Faulty>;

fn wrap(t: Tensor<CpuBackend>) -> T {
    let shape = t.shape().to_vec();
    Tensor::from_storage(t.into_storage(), shape)
}

fn inner(t: &T) -> Tensor<CpuBackend> {
    Tensor::from_storage(t.storage().clone(), t.shape().to_vec())
}

/// Applies `f` to the first `n` elements.
fn edit(t: T, n: usize, f: impl Fn(f32) -> f32) -> T {
    let shape = t.shape().to_vec();
    let mut data = match t.into_storage() {
        HostData::F32(v) => v,
        _ => unreachable!("activations are f32 on the CPU"),
    };
    data.iter_mut().take(n).for_each(|v| *v = f(*v));
    Tensor::from_storage(HostData::F32(data), shape)
}

impl Backend for Faulty {
    type Storage = HostData;
    fn name(&self) -> String {
        "faulty cpu".into()
    }
    fn storage_dtype(s: &HostData) -> DType {
        CpuBackend::storage_dtype(s)
    }
    fn poison_outputs(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }
    fn upload(&self, t: &HostTensor) -> anyhow::Result<T> {
        self.cpu.upload(t).map(wrap)
    }
    fn input(&self, t: &HostTensor) -> anyhow::Result<T> {
        self.cpu.input(t).map(wrap)
    }
    fn download(&self, t: &T) -> anyhow::Result<HostTensor> {
        self.cpu.download(&inner(t))
    }
    fn linear(&self, x: &T, w: &T, bias: Option<&T>) -> anyhow::Result<T> {
        self.cpu.linear(&inner(x), &inner(w), bias.map(inner).as_ref()).map(wrap)
    }
    fn linear_gelu(&self, x: &T, w: &T, bias: Option<&T>) -> anyhow::Result<T> {
        self.cpu.linear_gelu(&inner(x), &inner(w), bias.map(inner).as_ref()).map(wrap)
    }
    fn lora_add(&self, y: T, x: &T, down: &T, up: &T, up_bias: Option<&T>, scale: f32, offset: usize) -> anyhow::Result<T> {
        self.cpu.lora_add(inner(&y), &inner(x), &inner(down), &inner(up), up_bias.map(inner).as_ref(), scale, offset).map(wrap)
    }
    fn layer_norm_modulate(&self, x: &T, shift: &T, scale: &T, eps: f32) -> anyhow::Result<T> {
        self.cpu.layer_norm_modulate(&inner(x), &inner(shift), &inner(scale), eps).map(wrap)
    }
    fn qk_norm_rope(&self, x: &T, heads: usize, q: &T, k: &T, pe: &T, eps: f32) -> anyhow::Result<[T; 3]> {
        let [a, b, c] = self.cpu.qk_norm_rope(&inner(x), heads, &inner(q), &inner(k), &inner(pe), eps)?;
        Ok([wrap(a), wrap(b), wrap(c)])
    }
    fn attention(&self, q: &T, k: &T, v: &T) -> anyhow::Result<T> {
        self.cpu.attention(&inner(q), &inner(k), &inner(v)).map(wrap)
    }
    fn gelu_tanh(&self, x: &T) -> anyhow::Result<T> {
        let y = wrap(self.cpu.gelu_tanh(&inner(x))?);
        Ok(if self.poison.load(Ordering::Relaxed) { edit(y, 1, |_| f32::NAN) } else { y })
    }
    fn silu(&self, x: &T) -> anyhow::Result<T> {
        Ok(edit(wrap(self.cpu.silu(&inner(x))?), usize::MAX, |v| v * 1.1))
    }
    fn add(&self, a: &T, b: &T) -> anyhow::Result<T> {
        self.cpu.add(&inner(a), &inner(b)).map(wrap)
    }
    fn gated_residual(&self, x: &T, gate: &T, y: &T) -> anyhow::Result<T> {
        self.cpu.gated_residual(&inner(x), &inner(gate), &inner(y)).map(wrap)
    }
    fn concat(&self, xs: &[&T], dim: usize) -> anyhow::Result<T> {
        let xs: Vec<_> = xs.iter().map(|x| inner(x)).collect();
        self.cpu.concat(&xs.iter().collect::<Vec<_>>(), dim).map(wrap)
    }
    fn narrow(&self, x: &T, dim: usize, start: usize, len: usize) -> anyhow::Result<T> {
        self.cpu.narrow(&inner(x), dim, start, len).map(wrap)
    }
    fn timestep_embedding(&self, t: &T, dim: usize, max_period: f32, time_factor: f32) -> anyhow::Result<T> {
        self.cpu.timestep_embedding(&inner(t), dim, max_period, time_factor).map(wrap)
    }
    fn conv2d(&self, x: &T, w: &T, bias: Option<&T>, stride: usize, pad: [usize; 4]) -> anyhow::Result<T> {
        self.cpu.conv2d(&inner(x), &inner(w), bias.map(inner).as_ref(), stride, pad).map(wrap)
    }
    fn group_norm(&self, x: &T, groups: usize, w: &T, b: &T, eps: f32) -> anyhow::Result<T> {
        self.cpu.group_norm(&inner(x), groups, &inner(w), &inner(b), eps).map(wrap)
    }
    fn upsample_nearest2x(&self, x: &T) -> anyhow::Result<T> {
        self.cpu.upsample_nearest2x(&inner(x)).map(wrap)
    }
    fn transpose_last2(&self, x: &T) -> anyhow::Result<T> {
        self.cpu.transpose_last2(&inner(x)).map(wrap)
    }
    fn pixel_unshuffle(&self, x: &T, f: usize) -> anyhow::Result<T> {
        self.cpu.pixel_unshuffle(&inner(x), f).map(wrap)
    }
    fn pixel_shuffle(&self, x: &T, f: usize) -> anyhow::Result<T> {
        self.cpu.pixel_shuffle(&inner(x), f).map(wrap)
    }
    fn affine(&self, x: &T, scale: f32, offset: f32) -> anyhow::Result<T> {
        self.cpu.affine(&inner(x), scale, offset).map(wrap)
    }
}

#[test]
fn every_op_is_checked_and_exactly_the_faulty_ones_fail() {
    let checks = op_checks(&Faulty::default(), 7).unwrap();
    let ops: std::collections::BTreeSet<&str> = checks.iter().map(|c| c.op.split('[').next().unwrap().trim()).collect();
    for op in [
        "linear",
        "linear_gelu",
        "lora_add",
        "layer_norm_modulate",
        "qk_norm_rope",
        "attention",
        "gelu_tanh",
        "silu",
        "add",
        "gated_residual",
        "concat",
        "narrow",
        "timestep_embedding",
        "conv2d",
        "group_norm",
        "upsample_nearest2x",
        "transpose_last2",
        "pixel_unshuffle",
        "pixel_shuffle",
        "affine",
    ] {
        assert!(ops.contains(op), "no check covers {op}");
    }
    let failed: std::collections::BTreeSet<&str> = checks.iter().filter(|c| !c.passed()).map(|c| c.op.as_str()).collect();
    assert_eq!(failed, ["gelu_tanh", "silu"].into_iter().collect(), "{}", engine::selftest::render_table(&checks));
    let gelu = checks.iter().find(|c| c.op == "gelu_tanh").unwrap();
    assert!(gelu.max_rel_err.is_infinite(), "the unwritten element must read as NaN");
}

#[test]
fn a_faulty_op_inside_the_model_fails_the_forward_check() {
    // flux-tiny's modulation goes through SiLU: its 10% error reaches the output.
    let c = model_check(&Faulty::default(), "flux-tiny", (4, 4), 3).unwrap();
    assert!(!c.passed(), "{c:?}");
    let c = model_check(&CpuBackend::new(), "flux-tiny", (4, 4), 3).unwrap();
    assert!(c.passed() && c.max_rel_err == 0.0, "{c:?}");
}

#[test]
fn cli_selftest_on_the_cpu_prints_the_table_and_passes() {
    let out = engine(&["selftest", "--device", "cpu"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().next().unwrap().starts_with("device  cpu"), "{stdout}");
    for op in ["attention", "qk_norm_rope", "conv2d", "forward flux-tiny", "forward flux-small"] {
        assert!(stdout.lines().any(|l| l.starts_with(op) && l.ends_with("pass")), "{op} missing: {stdout}");
    }
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

#[test]
fn asking_for_cuda_without_a_gpu_is_one_clear_line() {
    if engine::backend::cuda::driver_present() {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    assert_fails_with(&engine(&["selftest"]), &["--device cuda", "no CUDA driver"]);
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/guidance-b2");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let (model, inputs) = (golden.join("transformer.bfl.safetensors"), golden.join("inputs.safetensors"));
    let forward = engine(&["forward", "--device", "cuda", "--model", s(&model), "--inputs", s(&inputs), "--out", s(&out)]);
    assert_fails_with(&forward, &["--device cuda", "no CUDA driver"]);
    assert!(!out.exists());
    // auto falls back to the CPU.
    let auto = engine(&["forward", "--device", "auto", "--model", s(&model), "--inputs", s(&inputs), "--out", s(&out)]);
    assert!(auto.status.success() && String::from_utf8_lossy(&auto.stdout).contains("device  cpu"));
}
