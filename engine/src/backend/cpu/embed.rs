//! Sinusoidal timestep embedding, computed in f32 step by step as PyTorch does (BFL's
//! `timestep_embedding` and diffusers' `get_timestep_embedding` agree): rounding the frequencies
//! and arguments the same way keeps the embedding of t * 1000 within an ulp of theirs.

/// `[B] -> [B, dim]`, `cat(cos(t f), sin(t f))`, f_i = exp(-ln(max_period) i / (dim / 2)).
pub fn timestep_embedding(t: &[f32], dim: usize, max_period: f32, time_factor: f32) -> Vec<f32> {
    let half = dim / 2;
    let neg_log = -(max_period as f64).ln() as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (neg_log * i as f32 / half as f32).exp()).collect();
    let mut out = vec![0f32; t.len() * dim];
    for (row, &tb) in out.chunks_mut(dim).zip(t) {
        let ts = tb * time_factor;
        for i in 0..half {
            let arg = ts * freqs[i];
            row[i] = arg.cos();
            row[half + i] = arg.sin();
        }
        // An odd dim leaves the last column zero, as both references pad.
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_matches_the_formula_in_f64() {
        let t = [0.0f32, 0.25, 1.0];
        let e = timestep_embedding(&t, 8, 10_000.0, 1000.0);
        for (b, &tb) in t.iter().enumerate() {
            for i in 0..4 {
                let arg = tb as f64 * 1000.0 * (-(10_000f64).ln() * i as f64 / 4.0).exp();
                assert!((e[b * 8 + i] as f64 - arg.cos()).abs() < 2e-4, "cos t={tb} i={i}");
                assert!((e[b * 8 + 4 + i] as f64 - arg.sin()).abs() < 2e-4, "sin t={tb} i={i}");
            }
        }
    }
}
