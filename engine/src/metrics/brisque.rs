//! BRISQUE, the Blind/Referenceless Image Spatial Quality Evaluator (Mittal, Moorthy and Bovik
//! 2012), as OpenCV's `cv::quality::QualityBRISQUE` computes it with the LIVE model Debian's
//! opencv-data ships: 0 (best) to 100. No reference image is needed.
//!
//! OpenCV's steps, followed exactly:
//! - 8-bit gray by OpenCV's fixed-point BT.601 (`(4899 R + 9617 G + 1868 B + 8192) >> 14`), then
//!   f32 in [0, 1]; 16-bit inputs are first reduced to 8 bits as `cv2.imread` does by default;
//! - two scales, the image itself and one resized to `(W / 2, H / 2)` by OpenCV's bicubic
//!   (A = -0.75, no antialiasing: `sr::resample`'s taps);
//! - MSCN coefficients `(I - mu) / (sqrt(blur(I^2) - mu^2) + 1/255)`, the blur a 7x7 Gaussian
//!   (sigma 7/6) with replicated borders; where the variance rounds below zero the coefficient is
//!   NaN and the fits skip it (as OpenCV's do), so the blur follows OpenCV's order of operations;
//! - per scale 18 features: the asymmetric generalised Gaussian fit of the coefficients (shape,
//!   mean of the squared scales) and of their products with the neighbour to the right, below,
//!   below-right and above-right (zero past the border): shape, mean, left and right squared
//!   scales; the shape is the first minimum of OpenCV's walk up from 0.2 in steps of 0.001;
//! - the features scaled to [-1, 1] by the model's ranges, then its RBF epsilon-SVR, clamped to
//!   [0, 100].

use super::weights::MetricWeights;
use crate::sr::resample::{bicubic_taps, CUBIC_A};
use anyhow::{ensure, Result};
use loaders::image::Image;

const FEATURES: usize = 36;

/// A `[h, w]` f32 plane.
struct Plane {
    w: usize,
    h: usize,
    v: Vec<f32>,
}

impl Plane {
    /// A separable resampling: `xs[o]` and `ys[o]` list (input index, weight) for output index o,
    /// along x then along y, f32 sums.
    fn separable(&self, xs: &[Vec<(usize, f32)>], ys: &[Vec<(usize, f32)>]) -> Plane {
        let (ow, oh) = (xs.len(), ys.len());
        let mut rows = vec![0f32; ow * self.h];
        for y in 0..self.h {
            for (o, taps) in xs.iter().enumerate() {
                rows[y * ow + o] = taps.iter().map(|&(i, k)| k * self.v[y * self.w + i]).sum();
            }
        }
        let mut v = vec![0f32; ow * oh];
        for (o, taps) in ys.iter().enumerate() {
            for x in 0..ow {
                v[o * ow + x] = taps.iter().map(|&(i, k)| k * rows[i * ow + x]).sum();
            }
        }
        Plane { w: ow, h: oh, v }
    }

    /// OpenCV's `GaussianBlur(ksize 7x7, sigma 7/6, BORDER_REPLICATE)` on f32, in its order of
    /// operations (it matters: on flat areas the variance below is a difference of roundings):
    /// the row pass multiplies the first tap and fuses the other six in order (`RowVec_32f`),
    /// the column pass multiplies the centre and fuses the symmetric pairs' sums
    /// (`SymmColumnVec_32f`), each with fused multiply-adds as OpenCV's AVX2 code has them.
    fn gaussian_blur(&self) -> Plane {
        // getGaussianKernel(7, 7/6, CV_32F): exp in f64, stored as f32, normalised in f64
        let scale = -0.5 / (7.0f64 / 6.0).powi(2);
        let raw: Vec<f32> = (0..7).map(|i| ((i as f64 - 3.0).powi(2) * scale).exp() as f32).collect();
        let sum = 1.0 / raw.iter().map(|&v| v as f64).sum::<f64>();
        let k: Vec<f32> = raw.iter().map(|&v| (v as f64 * sum) as f32).collect();
        let (w, h) = (self.w, self.h);
        let clamp = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
        let mut rows = vec![0f32; w * h];
        for y in 0..h {
            let row = &self.v[y * w..(y + 1) * w];
            for x in 0..w {
                let at = |j: usize| row[clamp(x as isize + j as isize - 3, w)];
                rows[y * w + x] = (1..7).fold(k[0] * at(0), |acc, j| at(j).mul_add(k[j], acc));
            }
        }
        let mut v = vec![0f32; w * h];
        for y in 0..h {
            let at = |dy: isize, x: usize| rows[clamp(y as isize + dy, h) * w + x];
            for x in 0..w {
                v[y * w + x] = (1..4).fold(at(0, x) * k[3], |acc, j| (at(j, x) + at(-j, x)).mul_add(k[3 + j as usize], acc));
            }
        }
        Plane { w, h, v }
    }
}

/// OpenCV's AGGDfit: (left scale, right scale, shape).
fn aggd_fit(x: &[f32]) -> (f64, f64, f64) {
    let (mut pos, mut neg, mut pos_sq, mut neg_sq, mut abs_sum) = (0usize, 0usize, 0f64, 0f64, 0f64);
    for &v in x {
        let v = v as f64;
        if v > 0.0 {
            (pos, pos_sq, abs_sum) = (pos + 1, pos_sq + v * v, abs_sum + v);
        } else if v < 0.0 {
            (neg, neg_sq, abs_sum) = (neg + 1, neg_sq + v * v, abs_sum - v);
        }
    }
    let left = (neg_sq / neg as f64).sqrt();
    let right = (pos_sq / pos as f64).sqrt();
    let gamma_hat = left / right;
    let total = x.len() as f64;
    let r_hat = (abs_sum / total).powi(2) / ((neg_sq + pos_sq) / total);
    let r_norm = r_hat * (gamma_hat.powi(3) + 1.0) * (gamma_hat + 1.0) / (gamma_hat.powi(2) + 1.0).powi(2);
    // walk the shape up while the moment ratio gets closer (the step accumulates, as in OpenCV)
    let (mut best, mut best_diff, mut gam) = (0.0, 1e10, 0.2);
    while gam < 10.0 {
        let r = libm::tgamma(2.0 / gam).powi(2) / (libm::tgamma(1.0 / gam) * libm::tgamma(3.0 / gam));
        let diff = (r - r_norm).abs();
        if diff > best_diff {
            break;
        }
        (best_diff, best) = (diff, gam);
        gam += 0.001;
    }
    (left, right, best)
}

/// The 36 BRISQUE features of an image, before scaling.
pub fn features(img: &Image) -> Vec<f32> {
    let rgb = img.to_rgb();
    let u8_of = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u32;
    let gray: Vec<f32> = rgb
        .data
        .chunks_exact(3)
        .map(|p| {
            let y = (4899 * u8_of(p[0]) + 9617 * u8_of(p[1]) + 1868 * u8_of(p[2]) + 8192) >> 14;
            y as f32 * (1.0f64 / 255.0) as f32
        })
        .collect();
    let full = Plane { w: img.width, h: img.height, v: gray };
    let mut out = Vec::with_capacity(FEATURES);
    for scale in [1usize, 2] {
        let im = if scale == 1 {
            Plane { w: full.w, h: full.h, v: full.v.clone() }
        } else {
            let (ow, oh) = (full.w / 2, full.h / 2);
            let axis = |n_in: usize, n_out: usize| bicubic_taps(n_in, n_out, n_in as f64 / n_out as f64, CUBIC_A);
            full.separable(&axis(full.w, ow), &axis(full.h, oh))
        };
        let mu = im.gaussian_blur();
        let sq = Plane { w: im.w, h: im.h, v: im.v.iter().map(|v| v * v).collect() }.gaussian_blur();
        // A variance rounded below zero (flat areas) gives NaN, as cv::pow(x, 0.5) does; the
        // fits then leave those coefficients out.
        let mscn: Vec<f32> = (0..im.v.len())
            .map(|i| {
                let sigma = (sq.v[i] - mu.v[i] * mu.v[i]).sqrt() + (1.0f64 / 255.0) as f32;
                (im.v[i] - mu.v[i]) / sigma
            })
            .collect();
        let (l, r, g) = aggd_fit(&mscn);
        out.push(g as f32);
        out.push((l * l + r * r) as f32 / 2.0);
        for (dy, dx) in [(0isize, 1isize), (1, 0), (1, 1), (-1, 1)] {
            let products: Vec<f32> = (0..mscn.len())
                .map(|i| {
                    let (y, x) = ((i / im.w) as isize + dy, (i % im.w) as isize + dx);
                    let inside = y >= 0 && x >= 0 && (y as usize) < im.h && (x as usize) < im.w;
                    mscn[i] * if inside { mscn[y as usize * im.w + x as usize] } else { 0.0 }
                })
                .collect();
            let (l, r, g) = aggd_fit(&products);
            let constant = libm::tgamma(1.0 / g).sqrt() / libm::tgamma(3.0 / g).sqrt();
            let mean = (r - l) * (libm::tgamma(2.0 / g) / libm::tgamma(1.0 / g)) * constant;
            out.extend([g as f32, mean as f32, (l * l) as f32, (r * r) as f32]);
        }
    }
    out
}

/// The LIVE model: feature ranges and an RBF epsilon-SVR.
pub struct Brisque {
    range_min: Vec<f32>,
    range_max: Vec<f32>,
    support_vectors: Vec<f32>,
    alpha: Vec<f64>,
    rho: f64,
    gamma: f64,
}

impl Brisque {
    pub const FILE: &'static str = "brisque.safetensors";

    pub fn load(weights: &MetricWeights) -> Result<Self> {
        let ckpt = weights.open(Self::FILE)?;
        let path = ckpt.path().display().to_string();
        let read = |name: &str| ckpt.read_f64(name);
        let (range_shape, range) = read("range")?;
        ensure!(range_shape == [2, FEATURES], "{path}: range has shape {range_shape:?}, expected [2, {FEATURES}]");
        let (sv_shape, sv) = read("support_vectors")?;
        ensure!(sv_shape.len() == 2 && sv_shape[1] == FEATURES, "{path}: support_vectors has shape {sv_shape:?}, expected [n, {FEATURES}]");
        let (alpha_shape, alpha) = read("alpha")?;
        ensure!(alpha_shape == [sv_shape[0]], "{path}: alpha has shape {alpha_shape:?}, expected [{}]", sv_shape[0]);
        let scalar = |name: &str| -> Result<f64> {
            let (shape, v) = read(name)?;
            ensure!(shape == [1], "{path}: {name} has shape {shape:?}, expected [1]");
            Ok(v[0])
        };
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        Ok(Brisque {
            range_min: f32s(&range[..FEATURES]),
            range_max: f32s(&range[FEATURES..]),
            support_vectors: f32s(&sv),
            alpha,
            rho: scalar("rho")?,
            gamma: scalar("gamma")?,
        })
    }

    /// The model's score of the features, unclamped.
    fn predict(&self, features: &[f32]) -> f64 {
        let x: Vec<f32> = features
            .iter()
            .enumerate()
            .map(|(k, &v)| -1.0 + 2.0 * (v - self.range_min[k]) / (self.range_max[k] - self.range_min[k]))
            .collect();
        let kernel = |sv: &[f32]| (-self.gamma * sv.iter().zip(&x).map(|(&s, &v)| (s as f64 - v as f64).powi(2)).sum::<f64>()).exp();
        self.support_vectors.chunks_exact(FEATURES).zip(&self.alpha).map(|(sv, a)| a * kernel(sv)).sum::<f64>() - self.rho
    }

    pub fn score(&self, img: &Image) -> f64 {
        self.predict(&features(img)).clamp(0.0, 100.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggd_fit_of_a_gaussian_sample_finds_shape_two() {
        // A symmetric sample with the Gaussian's moment ratio E|x|^2 / E[x^2] = 2 / pi: half
        // the values +-a, half +-b with ((a + b) / 2)^2 / ((a^2 + b^2) / 2) = 2 / pi.
        let ratio = 2.0 / std::f64::consts::PI;
        // with a = 1: (1 + b)^2 / (2 (1 + b^2)) = ratio -> (1 - 2 ratio) b^2 + 2 b + (1 - 2 ratio) = 0
        let c = 1.0 - 2.0 * ratio;
        let b = (-2.0 - (4.0 - 4.0 * c * c).sqrt()) / (2.0 * c);
        let x: Vec<f32> = [1.0, -1.0, b, -b].iter().map(|&v| v as f32).collect();
        let (l, r, g) = aggd_fit(&x);
        assert!((l - r).abs() < 1e-6);
        assert!((g - 2.0).abs() < 2e-3, "shape {g}");
    }

    #[test]
    fn features_of_a_noise_image_are_finite() {
        let data: Vec<f32> = (0..40 * 30 * 3).map(|i| ((i * 7919) % 251) as f32 / 250.0).collect();
        let f = features(&Image::new(40, 30, 3, data));
        assert_eq!(f.len(), FEATURES);
        assert!(f.iter().all(|v| v.is_finite()), "{f:?}");
    }
}
