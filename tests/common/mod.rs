//! Helpers shared by the integration tests (each test file is its own crate and uses a subset).
#![allow(dead_code)]

pub mod hooked;
pub mod metric_weights;

use loaders::safetensors::{self, Checkpoint};
use loaders::HostTensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the `engine` binary built for these tests.
pub fn engine(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_engine")).args(args).output().expect("engine runs")
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Asserts a failure reported as exactly one `error:` line containing every fragment, and no panic.
pub fn assert_fails_with(out: &Output, fragments: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for f in fragments {
        assert!(stderr.contains(f), "stderr lacks '{f}': {stderr}");
    }
}

/// Largest absolute difference relative to the reference's largest magnitude.
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "sizes differ");
    let scale = want.iter().fold(0f64, |m, &w| m.max((w as f64).abs()));
    let diff = got.iter().zip(want).fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    assert!(scale > 0.0, "reference is all zeros");
    diff / scale
}

/// Writes a copy of the safetensors file `src` into `dir/name`, its tensors edited by `edit`.
pub fn edited(dir: &Path, name: &str, src: &Path, edit: impl FnOnce(&mut BTreeMap<String, HostTensor>)) -> PathBuf {
    let ckpt = Checkpoint::open(src).unwrap();
    let mut tensors: BTreeMap<String, HostTensor> = ckpt.names().map(|n| (n.to_string(), ckpt.read(n).unwrap())).collect();
    edit(&mut tensors);
    let path = dir.join(name);
    let list: Vec<(&str, &HostTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    safetensors::write(&path, &list, &BTreeMap::new(), false).unwrap();
    path
}
