//! Concatenation and slicing along one dimension of row-major data, as block copies: a tensor of
//! shape `[outer, dim, inner]` is `outer` runs of `dim * inner` contiguous elements.

/// Concatenates parts whose sizes along the concatenated dim are `sizes`.
pub fn concat(parts: &[&[f32]], sizes: &[usize], outer: usize, inner: usize) -> Vec<f32> {
    let total: usize = sizes.iter().sum();
    let mut out = Vec::with_capacity(outer * total * inner);
    for o in 0..outer {
        for (p, &s) in parts.iter().zip(sizes) {
            out.extend_from_slice(&p[o * s * inner..(o + 1) * s * inner]);
        }
    }
    out
}

/// The slice `start..start + len` of a dim of size `size`.
pub fn narrow(x: &[f32], size: usize, start: usize, len: usize, outer: usize, inner: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        let base = (o * size + start) * inner;
        out.extend_from_slice(&x[base..base + len * inner]);
    }
    out
}
