//! Spatial rearrangements of channels-first images (nearest upsampling, pixel shuffle and its
//! inverse), the transpose that turns channel planes into tokens, and the latent's affine map.
//! All are pure index maps (copies), written as gathers over the output so that each output
//! element is computed once.

use rayon::prelude::*;

/// `[planes, H, W] -> [planes, 2H, 2W]`, each input sample repeated in a 2x2 block.
pub fn upsample_nearest2x(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; planes * 4 * h * w];
    out.par_chunks_mut(4 * h * w).zip(x.par_chunks(h * w)).for_each(|(o, p)| {
        for (oy, row) in o.chunks_mut(2 * w).enumerate() {
            let src = &p[(oy / 2) * w..(oy / 2 + 1) * w];
            for (ox, v) in row.iter_mut().enumerate() {
                *v = src[ox / 2];
            }
        }
    });
    out
}

/// `[outer, M, N] -> [outer, N, M]`.
pub fn transpose_last2(x: &[f32], outer: usize, m: usize, n: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), outer * m * n);
    let mut out = vec![0f32; outer * m * n];
    out.par_chunks_mut(m * n).zip(x.par_chunks(m * n)).for_each(|(o, xs)| {
        for (j, row) in o.chunks_mut(m).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                *v = xs[i * n + j];
            }
        }
    });
    out
}

/// Space-to-depth: `[B, C, H, W] -> [B, C f f, H / f, W / f]`,
/// `out[b, (c f + i) f + j, y, x] = in[b, c, y f + i, x f + j]`.
pub fn pixel_unshuffle(x: &[f32], batch: usize, c: usize, h: usize, w: usize, f: usize) -> Vec<f32> {
    let (oh, ow) = (h / f, w / f);
    let mut out = vec![0f32; batch * c * h * w];
    out.par_chunks_mut(oh * ow).enumerate().for_each(|(plane, o)| {
        let (b, oc) = (plane / (c * f * f), plane % (c * f * f));
        let (ci, i, j) = (oc / (f * f), oc / f % f, oc % f);
        let src = &x[(b * c + ci) * h * w..(b * c + ci + 1) * h * w];
        for (y, row) in o.chunks_mut(ow).enumerate() {
            for (xx, v) in row.iter_mut().enumerate() {
                *v = src[(y * f + i) * w + xx * f + j];
            }
        }
    });
    out
}

/// Depth-to-space: `[B, C f f, H, W] -> [B, C, H f, W f]`, the inverse of `pixel_unshuffle`.
pub fn pixel_shuffle(x: &[f32], batch: usize, c_in: usize, h: usize, w: usize, f: usize) -> Vec<f32> {
    let c = c_in / (f * f);
    let (oh, ow) = (h * f, w * f);
    let mut out = vec![0f32; batch * c_in * h * w];
    out.par_chunks_mut(oh * ow).enumerate().for_each(|(plane, o)| {
        let (b, ci) = (plane / c, plane % c);
        for (y, row) in o.chunks_mut(ow).enumerate() {
            for (xx, v) in row.iter_mut().enumerate() {
                let ic = (ci * f + y % f) * f + xx % f;
                *v = x[((b * c_in + ic) * h + y / f) * w + xx / f];
            }
        }
    });
    out
}

/// `x * scale + offset`.
pub fn affine(x: &[f32], scale: f32, offset: f32) -> Vec<f32> {
    x.par_iter().map(|&v| v * scale + offset).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.5 - 3.0).collect()
    }

    #[test]
    fn upsample_repeats_each_sample_in_a_2x2_block() {
        let (planes, h, w) = (3, 5, 7);
        let x = ramp(planes * h * w);
        let out = upsample_nearest2x(&x, planes, h, w);
        for p in 0..planes {
            for y in 0..2 * h {
                for xx in 0..2 * w {
                    assert_eq!(out[(p * 2 * h + y) * 2 * w + xx], x[(p * h + y / 2) * w + xx / 2]);
                }
            }
        }
    }

    #[test]
    fn transpose_swaps_the_last_two_dims() {
        let (outer, m, n) = (2, 3, 5);
        let x = ramp(outer * m * n);
        let t = transpose_last2(&x, outer, m, n);
        for o in 0..outer {
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(t[(o * n + j) * m + i], x[(o * m + i) * n + j]);
                }
            }
        }
        assert_eq!(transpose_last2(&t, outer, n, m), x);
    }

    #[test]
    fn pixel_unshuffle_follows_pytorch_indexing_and_shuffle_inverts_it() {
        let (b, c, h, w, f) = (2, 3, 6, 9, 3);
        let x = ramp(b * c * h * w);
        let d = pixel_unshuffle(&x, b, c, h, w, f);
        let (oh, ow) = (h / f, w / f);
        for bi in 0..b {
            for ci in 0..c {
                for y in 0..h {
                    for xx in 0..w {
                        let oc = (ci * f + y % f) * f + xx % f;
                        assert_eq!(d[((bi * c * f * f + oc) * oh + y / f) * ow + xx / f], x[((bi * c + ci) * h + y) * w + xx]);
                    }
                }
            }
        }
        assert_eq!(pixel_shuffle(&d, b, c * f * f, oh, ow, f), x);
    }
}
