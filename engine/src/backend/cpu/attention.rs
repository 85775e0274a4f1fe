//! Softmax attention on the CPU, blocked over query rows so that memory stays O(block x L_k):
//! the L x L score matrix is never materialised. Each (batch, head, query block) is one rayon task
//! running two single-threaded GEMMs.

use super::matmul::{matmul, Rhs};
use rayon::prelude::*;

const QUERY_BLOCK: usize = 64;

/// q `[B, H, Lq, D]`, k and v `[B, H, Lk, D]` -> `[B, Lq, H * D]`: scores scaled by
/// `1/sqrt(D)`, or, when `biased` gives (bias `[H, Lq, Lk]` shared by the batch, scale), by that
/// scale with the bias added.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    biased: Option<(&[f32], f32)>,
    batch: usize,
    heads: usize,
    lq: usize,
    lk: usize,
    d: usize,
) -> Vec<f32> {
    let blocks = lq.div_ceil(QUERY_BLOCK);
    let scale = biased.map_or(1.0 / (d as f32).sqrt(), |(_, s)| s);
    let results: Vec<(usize, usize, usize, Vec<f32>)> = (0..batch * heads * blocks)
        .into_par_iter()
        .map(|task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let r0 = blk * QUERY_BLOCK;
            let rows = QUERY_BLOCK.min(lq - r0);
            let qb = &q[(bh * lq + r0) * d..(bh * lq + r0 + rows) * d];
            let kh = &k[bh * lk * d..(bh + 1) * lk * d];
            let vh = &v[bh * lk * d..(bh + 1) * lk * d];
            let mut scores = vec![0f32; rows * lk];
            matmul(&mut scores, qb, kh, rows, lk, d, Rhs::Transposed, false, false);
            for (i, row) in scores.chunks_mut(lk).enumerate() {
                row.iter_mut().for_each(|s| *s *= scale);
                if let Some((bias, _)) = biased {
                    let at = ((bh % heads) * lq + r0 + i) * lk;
                    row.iter_mut().zip(&bias[at..at + lk]).for_each(|(s, b)| *s += b);
                }
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let mut sum = 0f64;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s as f64;
                }
                let inv = (1.0 / sum) as f32;
                row.iter_mut().for_each(|s| *s *= inv);
            }
            let mut o = vec![0f32; rows * d];
            matmul(&mut o, &scores, vh, rows, d, lk, Rhs::Normal, false, false);
            (bh / heads, bh % heads, r0, o)
        })
        .collect();
    let mut out = vec![0f32; batch * lq * heads * d];
    for (b, h, r0, o) in results {
        for (i, row) in o.chunks(d).enumerate() {
            let dst = ((b * lq + r0 + i) * heads + h) * d;
            out[dst..dst + d].copy_from_slice(row);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Textbook attention in f64 with the full score matrix, plus `bias` [H, Lq, Lk].
    #[allow(clippy::too_many_arguments)]
    fn naive(q: &[f32], k: &[f32], v: &[f32], bias: &[f32], b: usize, h: usize, lq: usize, lk: usize, d: usize) -> Vec<f64> {
        let mut out = vec![0f64; b * lq * h * d];
        for bi in 0..b {
            for hi in 0..h {
                let base_q = (bi * h + hi) * lq * d;
                let base_k = (bi * h + hi) * lk * d;
                for i in 0..lq {
                    let s: Vec<f64> = (0..lk)
                        .map(|j| {
                            (0..d).map(|t| q[base_q + i * d + t] as f64 * k[base_k + j * d + t] as f64).sum::<f64>() / (d as f64).sqrt()
                                + bias[(hi * lq + i) * lk + j] as f64
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for t in 0..d {
                        out[((bi * lq + i) * h + hi) * d + t] = (0..lk).map(|j| e[j] / z * v[base_k + j * d + t] as f64).sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_attention_with_and_without_bias_across_block_tails() {
        let (b, h, d) = (2, 3, 16);
        for &(lq, lk) in &[(1, 1), (5, 9), (64, 64), (130, 70)] {
            let gen = |n: usize, seed: usize| -> Vec<f32> {
                (0..n).map(|i| (((i + seed) * 2654435761usize) % 1000) as f32 / 250.0 - 2.0).collect()
            };
            let q = gen(b * h * lq * d, 1);
            let k = gen(b * h * lk * d, 2);
            let v = gen(b * h * lk * d, 3);
            let got = attention(&q, &k, &v, None, b, h, lq, lk, d);
            let want = naive(&q, &k, &v, &vec![0.0; h * lq * lk], b, h, lq, lk, d);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()), "lq {lq} lk {lk} at {i}: {g} vs {w}");
            }
            // A bias per head and position, with a causal -inf mask where the keys reach that far.
            let bias: Vec<f32> = (0..h * lq * lk).map(|n| if n % lk > n / lk % lq { f32::NEG_INFINITY } else { gen(1, n)[0] }).collect();
            let got = attention(&q, &k, &v, Some((&bias, 1.0 / (d as f32).sqrt())), b, h, lq, lk, d);
            let want = naive(&q, &k, &v, &bias, b, h, lq, lk, d);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()), "biased, lq {lq} lk {lk} at {i}: {g} vs {w}");
            }
        }
    }
}
