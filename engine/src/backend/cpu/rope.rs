//! Query/key preparation: head split, per-head RMSNorm and rotary embedding on interleaved pairs
//! (BFL's `apply_rope`: the pair (x0, x1) becomes (cos x0 - sin x1, sin x0 + cos x1)).

use super::norm::rms_norm_in_place;
use rayon::prelude::*;

/// Rotates consecutive pairs of `x` by the angles whose (cos, sin) are interleaved in `pe`.
pub fn rotate_pairs(x: &mut [f32], pe: &[f32]) {
    for (pair, cs) in x.chunks_exact_mut(2).zip(pe.chunks_exact(2)) {
        let (x0, x1) = (pair[0], pair[1]);
        let (c, s) = (cs[0], cs[1]);
        pair[0] = c * x0 - s * x1;
        pair[1] = s * x0 + c * x1;
    }
}

/// x `[B, L, W]` (W >= 3 H D) -> q, k, v `[B, H, L, D]`, q and k normalised and rotated.
/// `pe` is `[B, L, D / 2, 2]`.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope(
    x: &[f32],
    batch: usize,
    tokens: usize,
    width: usize,
    heads: usize,
    head_dim: usize,
    q_scale: &[f32],
    k_scale: &[f32],
    pe: &[f32],
    eps: f32,
) -> [Vec<f32>; 3] {
    let n = batch * heads * tokens * head_dim;
    let mut out = [vec![0f32; n], vec![0f32; n], vec![0f32; n]];
    for (which, dst) in out.iter_mut().enumerate() {
        // One chunk per (b, h): the [L, D] matrix of that head.
        dst.par_chunks_mut(tokens * head_dim).enumerate().for_each(|(bh, head)| {
            let (b, h) = (bh / heads, bh % heads);
            for l in 0..tokens {
                let src = (b * tokens + l) * width + (which * heads + h) * head_dim;
                let row = &mut head[l * head_dim..(l + 1) * head_dim];
                row.copy_from_slice(&x[src..src + head_dim]);
                if which < 2 {
                    rms_norm_in_place(row, if which == 0 { q_scale } else { k_scale }, eps);
                    let p = (b * tokens + l) * head_dim;
                    rotate_pairs(row, &pe[p..p + head_dim]);
                }
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_matches_complex_multiplication() {
        // (x0 + i x1) * e^{i a} is the rotation; check against the complex product.
        let a: [f64; 3] = [0.3, -2.0, 5.5];
        let mut x = [1.5f32, -0.5, 2.0, 0.25, -1.0, 3.0];
        let orig = x;
        let pe: Vec<f32> = a.iter().flat_map(|&t| [t.cos() as f32, t.sin() as f32]).collect();
        rotate_pairs(&mut x, &pe);
        for p in 0..3 {
            let (re, im) = (orig[2 * p] as f64, orig[2 * p + 1] as f64);
            let (c, s) = (a[p].cos(), a[p].sin());
            assert!((x[2 * p] as f64 - (re * c - im * s)).abs() < 1e-6);
            assert!((x[2 * p + 1] as f64 - (re * s + im * c)).abs() < 1e-6);
        }
    }

    #[test]
    fn rotation_preserves_dot_products_of_equal_positions() {
        // RoPE's defining property: <R(p) q, R(p) k> = <q, k>.
        let q: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
        let k: Vec<f32> = (0..8).map(|i| 1.0 - i as f32 * 0.2).collect();
        let pe: Vec<f32> = (0..4)
            .flat_map(|i| {
                let t = 0.7 * i as f64 + 0.1;
                [t.cos() as f32, t.sin() as f32]
            })
            .collect();
        let (mut qr, mut kr) = (q.clone(), k.clone());
        rotate_pairs(&mut qr, &pe);
        rotate_pairs(&mut kr, &pe);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum::<f64>();
        assert!((dot(&qr, &kr) - dot(&q, &k)).abs() < 1e-5);
    }
}
