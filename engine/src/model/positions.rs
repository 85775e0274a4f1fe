//! Rotary position tables from FLUX's 3-axis position ids (BFL `EmbedND` / `rope`): axis `a`
//! owns `axes_dim[a] / 2` consecutive rotation pairs with frequencies `theta^(-2i / axes_dim[a])`.
//! Angles are computed in f64 and rounded once, as both references do.

use loaders::HostTensor;

/// ids `[B, L, n_axes]` -> `[B, L, sum(axes_dim) / 2, 2]` of (cos, sin).
pub fn rope_table(ids: &[f32], batch: usize, tokens: usize, axes_dim: &[usize], theta: f64) -> HostTensor {
    let n_axes = axes_dim.len();
    let pairs: usize = axes_dim.iter().sum::<usize>() / 2;
    let omegas: Vec<(usize, f64)> =
        axes_dim.iter().enumerate().flat_map(|(a, &d)| (0..d / 2).map(move |i| (a, 1.0 / theta.powf((2 * i) as f64 / d as f64)))).collect();
    let mut out = Vec::with_capacity(batch * tokens * pairs * 2);
    for pos in ids.chunks(n_axes).take(batch * tokens) {
        for &(a, omega) in &omegas {
            let angle = pos[a] as f64 * omega;
            out.push(angle.cos() as f32);
            out.push(angle.sin() as f32);
        }
    }
    HostTensor::from_f32(vec![batch, tokens, pairs, 2], out)
}

/// FLUX's image ids for a `rows x cols` grid of packed latent patches: (0, row, col), row-major.
pub fn image_ids(rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).flat_map(|i| [0.0, (i / cols) as f32, (i % cols) as f32]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_follows_the_formula_per_axis() {
        // Two tokens with distinct positions on every axis; axes_dim [2, 4, 2] -> 4 pairs.
        let ids = [1.0f32, 2.0, 3.0, -0.5, 7.25, 100.0];
        let t = rope_table(&ids, 1, 2, &[2, 4, 2], 10_000.0);
        assert_eq!(t.shape, vec![1, 2, 4, 2]);
        let v = t.to_f32();
        // (axis, omega) for each pair, written out by hand.
        let expect = [(0, 1.0), (1, 1.0), (1, 0.01), (2, 1.0)];
        for tok in 0..2 {
            for (p, &(a, w)) in expect.iter().enumerate() {
                let angle = ids[tok * 3 + a] as f64 * w;
                let i = (tok * 4 + p) * 2;
                assert!((v[i] as f64 - angle.cos()).abs() < 1e-7 && (v[i + 1] as f64 - angle.sin()).abs() < 1e-7, "token {tok} pair {p}");
            }
        }
    }

    #[test]
    fn image_ids_are_row_major() {
        assert_eq!(image_ids(2, 3)[3 * 4..3 * 5], [0.0, 1.0, 1.0]);
    }
}
