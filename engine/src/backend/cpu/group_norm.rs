//! GroupNorm over channels-first tensors. A group of an NCHW tensor is `C / groups` whole channel
//! planes, contiguous in memory, so each (batch, group) is one slice and one rayon task. Statistics
//! accumulate in f64, as in norm.rs, so that the reference is not the limiting factor.

use rayon::prelude::*;

#[allow(clippy::too_many_arguments)]
/// x `[B, C, spatial]`: out = (x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c].
pub fn group_norm(out: &mut [f32], x: &[f32], channels: usize, spatial: usize, groups: usize, weight: &[f32], bias: &[f32], eps: f32) {
    let per_group = channels / groups * spatial;
    out.par_chunks_mut(per_group).zip(x.par_chunks(per_group)).enumerate().for_each(|(i, (o, xg))| {
        let n = xg.len() as f64;
        let mean = xg.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = xg.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps as f64).sqrt();
        let c0 = (i % groups) * (channels / groups);
        for (j, (op, xp)) in o.chunks_mut(spatial).zip(xg.chunks(spatial)).enumerate() {
            let (w, b) = (weight[c0 + j] as f64, bias[c0 + j] as f64);
            for (ov, &xv) in op.iter_mut().zip(xp) {
                *ov = ((xv as f64 - mean) * inv * w + b) as f32;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_group_norm() {
        for &(batch, channels, spatial, groups) in &[(2, 6, 35, 3), (1, 4, 1, 4), (3, 8, 13, 1), (2, 9, 7, 3)] {
            let x: Vec<f32> = (0..batch * channels * spatial).map(|i| ((i * 7919) % 113) as f32 * 0.37 - 11.0).collect();
            let w: Vec<f32> = (0..channels).map(|c| 0.5 + c as f32 * 0.1).collect();
            let b: Vec<f32> = (0..channels).map(|c| c as f32 * -0.2).collect();
            let mut out = vec![f32::NAN; x.len()];
            group_norm(&mut out, &x, channels, spatial, groups, &w, &b, 1e-6);
            let cg = channels / groups;
            for bi in 0..batch {
                for g in 0..groups {
                    // Independent gather by index arithmetic rather than by slicing.
                    let idx: Vec<usize> =
                        (g * cg..(g + 1) * cg).flat_map(|c| (0..spatial).map(move |s| (bi * channels + c) * spatial + s)).collect();
                    let n = idx.len() as f64;
                    let mean = idx.iter().map(|&i| x[i] as f64).sum::<f64>() / n;
                    let var = idx.iter().map(|&i| (x[i] as f64 - mean).powi(2)).sum::<f64>() / n;
                    for &i in &idx {
                        let c = i / spatial % channels;
                        let want = (x[i] as f64 - mean) / (var + 1e-6).sqrt() * w[c] as f64 + b[c] as f64;
                        assert!((out[i] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()), "at {i}: {} vs {want}", out[i]);
                    }
                }
            }
        }
    }
}
