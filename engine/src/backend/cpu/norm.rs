//! Normalisations: LayerNorm (no affine) fused with adaLN modulation, and RMSNorm (per head on
//! queries and keys, per token in T5). Statistics accumulate in f64 so that the reference is not the
//! limiting factor when other backends are compared with it.

use rayon::prelude::*;

/// `out[b, l, :] = (1 + scale[b]) * LayerNorm(x[b, l, :]) + shift[b]` for x `[B, L, D]`.
pub fn layer_norm_modulate(out: &mut [f32], x: &[f32], shift: &[f32], scale: &[f32], tokens: usize, dim: usize, eps: f32) {
    out.par_chunks_mut(dim).zip(x.par_chunks(dim)).enumerate().for_each(|(row, (o, xr))| {
        let b = row / tokens;
        let (sh, sc) = (&shift[b * dim..(b + 1) * dim], &scale[b * dim..(b + 1) * dim]);
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for i in 0..dim {
            let n = ((xr[i] as f64 - mean) * inv) as f32;
            o[i] = (1.0 + sc[i]) * n + sh[i];
        }
    });
}

/// `out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight` for rows of `dim`.
pub fn rms_norm(out: &mut [f32], x: &[f32], weight: &[f32], dim: usize, eps: f32) {
    out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(o, xr)| {
        o.copy_from_slice(xr);
        rms_norm_in_place(o, weight, eps);
    });
}

/// `x * rsqrt(mean(x^2) + eps) * scale` in place over one head vector.
pub fn rms_norm_in_place(x: &mut [f32], scale: &[f32], eps: f32) {
    let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64;
    let r = (1.0 / (ms + eps as f64).sqrt()) as f32;
    for (v, s) in x.iter_mut().zip(scale) {
        *v = *v * r * s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modulated_layer_norm_has_closed_form_moments() {
        // With scale = s and shift = m, each output row has mean m and (population) std (1 + s).
        let (tokens, dim) = (3, 64);
        let x: Vec<f32> = (0..2 * tokens * dim).map(|i| ((i * 7919) % 113) as f32 * 0.37 - 11.0).collect();
        let shift = [vec![0.5f32; dim], vec![-2.0f32; dim]].concat();
        let scale = [vec![0.25f32; dim], vec![1.5f32; dim]].concat();
        let mut out = vec![f32::NAN; x.len()];
        layer_norm_modulate(&mut out, &x, &shift, &scale, tokens, dim, 0.0);
        for (row, o) in out.chunks(dim).enumerate() {
            let b = row / tokens;
            let mean = o.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
            let std = (o.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64).sqrt();
            assert!((mean - shift[b * dim] as f64).abs() < 1e-5, "row {row}: mean {mean}");
            assert!((std - (1.0 + scale[b * dim] as f64)).abs() < 1e-5, "row {row}: std {std}");
        }
    }

    #[test]
    fn rms_norm_gives_unit_rms_times_scale() {
        let mut x: Vec<f32> = (0..32).map(|i| i as f32 - 10.0).collect();
        let scale = vec![2.0f32; 32];
        rms_norm_in_place(&mut x, &scale, 0.0);
        let rms = (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 32.0).sqrt();
        assert!((rms - 2.0).abs() < 1e-6, "rms {rms}");
    }
}
