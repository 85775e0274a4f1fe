//! GroupNorm over channels-first tensors. A group of an NCHW tensor is `C / groups` whole channel
//! planes, contiguous in memory, so each (batch, group) is one slice and one rayon task. Statistics
//! accumulate in f64, as in norm.rs, so that the reference is not the limiting factor. The
//! normalisation is also split in two for tiled passes: the statistics of a window of the planes,
//! and the normalisation with statistics given (`Backend::group_norm_stats`, `group_norm_apply`).

use rayon::prelude::*;
use std::ops::Range;

/// Mean and biased variance (two passes, f64) of a group's `planes` of `width` columns over the
/// window `rows` x `cols`, visited in memory order.
fn moments(group: &[f32], plane: usize, width: usize, rows: &Range<usize>, cols: &Range<usize>) -> (f64, f64) {
    let window =
        || group.chunks(plane).flat_map(move |p| rows.clone().flat_map(move |y| p[y * width + cols.start..y * width + cols.end].iter()));
    let n = (group.len() / plane * rows.len() * cols.len()) as f64;
    let mean = window().map(|&v| v as f64).sum::<f64>() / n;
    let var = window().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var)
}

/// `out = (x - mean) * rstd * weight[c] + bias[c]` over one group, whose first channel is `c0`.
#[allow(clippy::too_many_arguments)]
fn normalise(out: &mut [f32], group: &[f32], spatial: usize, c0: usize, mean: f64, rstd: f64, weight: &[f32], bias: &[f32]) {
    for (j, (op, xp)) in out.chunks_mut(spatial).zip(group.chunks(spatial)).enumerate() {
        let (w, b) = (weight[c0 + j] as f64, bias[c0 + j] as f64);
        for (ov, &xv) in op.iter_mut().zip(xp) {
            *ov = ((xv as f64 - mean) * rstd * w + b) as f32;
        }
    }
}

/// x `[B, C, spatial]`: out = (x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c].
#[allow(clippy::too_many_arguments)]
pub fn group_norm(out: &mut [f32], x: &[f32], channels: usize, spatial: usize, groups: usize, weight: &[f32], bias: &[f32], eps: f32) {
    let per_group = channels / groups * spatial;
    out.par_chunks_mut(per_group).zip(x.par_chunks(per_group)).enumerate().for_each(|(i, (o, xg))| {
        let (mean, var) = moments(xg, spatial, spatial, &(0..1), &(0..spatial));
        normalise(o, xg, spatial, (i % groups) * (channels / groups), mean, 1.0 / (var + eps as f64).sqrt(), weight, bias);
    });
}

/// x `[B, C, height, width]` -> `[B, groups, 2]`: each group's (mean, biased variance) over rows
/// `rows` and columns `cols` of its channel planes.
pub fn group_norm_stats(
    x: &[f32],
    channels: usize,
    (height, width): (usize, usize),
    groups: usize,
    rows: Range<usize>,
    cols: Range<usize>,
) -> Vec<f32> {
    let per_group = channels / groups * height * width;
    x.par_chunks(per_group)
        .flat_map_iter(|xg| {
            let (mean, var) = moments(xg, height * width, width, &rows, &cols);
            [mean as f32, var as f32]
        })
        .collect()
}

/// x `[B, C, spatial]` with `stats` `[B, groups, 2]` of (mean, rstd): out = (x - mean) * rstd *
/// weight[c] + bias[c].
#[allow(clippy::too_many_arguments)]
pub fn group_norm_apply(
    out: &mut [f32],
    x: &[f32],
    channels: usize,
    spatial: usize,
    groups: usize,
    stats: &[f32],
    weight: &[f32],
    bias: &[f32],
) {
    let per_group = channels / groups * spatial;
    out.par_chunks_mut(per_group).zip(x.par_chunks(per_group)).enumerate().for_each(|(i, (o, xg))| {
        let (mean, rstd) = (stats[2 * i] as f64, stats[2 * i + 1] as f64);
        normalise(o, xg, spatial, (i % groups) * (channels / groups), mean, rstd, weight, bias);
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

    #[test]
    fn window_statistics_match_a_naive_gather_and_apply_reproduces_group_norm() {
        let (batch, channels, height, width, groups) = (2, 6, 7, 9, 3);
        let x: Vec<f32> = (0..batch * channels * height * width).map(|i| ((i * 7919) % 113) as f32 * 0.37 - 11.0).collect();
        let (rows, cols) = (2..6, 1..8);
        let stats = group_norm_stats(&x, channels, (height, width), groups, rows.clone(), cols.clone());
        assert_eq!(stats.len(), batch * groups * 2);
        let cg = channels / groups;
        for bi in 0..batch {
            for g in 0..groups {
                let mut vals = Vec::new();
                for c in g * cg..(g + 1) * cg {
                    for y in rows.clone() {
                        for xx in cols.clone() {
                            vals.push(x[((bi * channels + c) * height + y) * width + xx] as f64);
                        }
                    }
                }
                let n = vals.len() as f64;
                let mean = vals.iter().sum::<f64>() / n;
                let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                let k = 2 * (bi * groups + g);
                assert!((stats[k] as f64 - mean).abs() < 1e-5 * (1.0 + mean.abs()), "mean {} vs {mean}", stats[k]);
                assert!((stats[k + 1] as f64 - var).abs() < 1e-5 * var, "variance {} vs {var}", stats[k + 1]);
            }
        }

        // Whole-plane statistics, turned into (mean, rstd), normalise as group_norm does.
        let w: Vec<f32> = (0..channels).map(|c| 0.5 + c as f32 * 0.1).collect();
        let b: Vec<f32> = (0..channels).map(|c| c as f32 * -0.2).collect();
        let whole = group_norm_stats(&x, channels, (height, width), groups, 0..height, 0..width);
        let given: Vec<f32> = whole.chunks(2).flat_map(|s| [s[0], 1.0 / (s[1] + 1e-6).sqrt()]).collect();
        let (mut applied, mut reference) = (vec![f32::NAN; x.len()], vec![f32::NAN; x.len()]);
        group_norm_apply(&mut applied, &x, channels, height * width, groups, &given, &w, &b);
        group_norm(&mut reference, &x, channels, height * width, groups, &w, &b, 1e-6);
        for (a, r) in applied.iter().zip(&reference) {
            assert!((a - r).abs() < 1e-5 * (1.0 + r.abs()), "{a} vs {r}");
        }
    }
}
