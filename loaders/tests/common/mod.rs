//! Builds safetensors bytes by hand, independently of the crate's writer, so that reader tests
//! do not use the code under test as their own oracle.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

/// `u64` LE length + `header` + `data`, with no validation at all.
pub fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

pub fn f32_le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `base, base + 1, ...`: distinct values, so that any misplaced element shows.
pub fn iota(n: usize, base: f32) -> Vec<f32> {
    (0..n).map(|i| base + i as f32).collect()
}

/// A well-formed F32 file: tensors laid out in the given order, header by `format!`.
pub fn f32_file(tensors: &[(&str, &[usize], &[f32])], metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut entries = Vec::new();
    if !metadata.is_empty() {
        let pairs: Vec<String> = metadata.iter().map(|(k, v)| format!("{}:{}", json(k), json(v))).collect();
        entries.push(format!("\"__metadata__\":{{{}}}", pairs.join(",")));
    }
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "test bug: {name}");
        let start = data.len();
        data.extend(f32_le(values));
        entries.push(format!("{}:{{\"dtype\":\"F32\",\"shape\":{:?},\"data_offsets\":[{start},{}]}}", json(name), shape, data.len()));
    }
    raw(&format!("{{{}}}", entries.join(",")), &data)
}

fn json(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The error's message, asserting it is one line that starts with `path`.
pub fn message<T: std::fmt::Debug>(result: loaders::Result<T>, path: &str) -> String {
    let msg = result.expect_err("expected an error").to_string();
    assert!(msg.starts_with(&format!("{path}: ")), "message does not start with the path: {msg}");
    assert!(!msg.contains('\n'), "message is not one line: {msg}");
    msg
}
