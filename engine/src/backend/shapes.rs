//! Shape rules shared by the backends, so that every backend accepts and rejects the same
//! operands with the same message.

use anyhow::{ensure, Result};

/// Splits a shape around `dim` into (outer, inner) element counts: a row-major tensor is then
/// `outer` runs of `shape[dim] * inner` contiguous elements.
pub fn outer_inner(shape: &[usize], dim: usize) -> (usize, usize) {
    (shape[..dim].iter().product(), shape[dim + 1..].iter().product())
}

/// The result shape of concatenating `shapes` along `dim`.
pub fn concat(shapes: &[&[usize]], dim: usize) -> Result<Vec<usize>> {
    ensure!(!shapes.is_empty(), "concat: no tensors");
    let first = shapes[0];
    ensure!(dim < first.len(), "concat: dim {dim} out of range for {first:?}");
    for s in shapes {
        ensure!(
            s.len() == first.len() && s.iter().zip(first).enumerate().all(|(i, (a, b))| i == dim || a == b),
            "concat along {dim}: shapes {first:?} and {s:?} disagree"
        );
    }
    let mut out = first.to_vec();
    out[dim] = shapes.iter().map(|s| s[dim]).sum();
    Ok(out)
}

/// The result shape of `narrow(dim, start, len)`.
pub fn narrow(shape: &[usize], dim: usize, start: usize, len: usize) -> Result<Vec<usize>> {
    ensure!(dim < shape.len() && start + len <= shape[dim], "narrow: {start}..{} out of range for dim {dim} of {shape:?}", start + len);
    let mut out = shape.to_vec();
    out[dim] = len;
    Ok(out)
}

/// The result shape of swapping the last two dims.
pub fn transpose_last2(shape: &[usize]) -> Result<Vec<usize>> {
    ensure!(shape.len() >= 2, "transpose_last2: input has shape {shape:?}, expected at least 2 dims");
    let mut out = shape.to_vec();
    let r = out.len();
    out.swap(r - 2, r - 1);
    Ok(out)
}
