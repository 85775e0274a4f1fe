//! SSIM on one plane, Gaussian-weighted.
//!
//! The reference is scikit-image:
//! `structural_similarity(y1, y2, data_range=255, gaussian_weights=True, sigma=1.5,
//! use_sample_covariance=False)` on Y*255. It filters with an 11-tap Gaussian (sigma 1.5,
//! truncated at 3.5 sigma, normalised), mirrors the borders, and averages the SSIM map with 5
//! pixels cropped from each side. That crop is exactly the part of the map the mirrored borders
//! never reach, so we compute only it, by 'valid' filtering; it is also BasicSR's `_ssim`
//! (`cv2.getGaussianKernel(11, 1.5)`, `filter2D(...)[5:-5, 5:-5]`, mean of the map), so the two
//! references agree and so do we, to rounding. C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2.

use super::Plane;
use anyhow::{bail, Result};

/// Side of the Gaussian window; planes smaller than this have no SSIM (scikit-image refuses too).
pub const SSIM_WINDOW: usize = 11;
const SIGMA: f64 = 1.5;
const C1: f64 = (0.01 * 255.0) * (0.01 * 255.0);
const C2: f64 = (0.03 * 255.0) * (0.03 * 255.0);

/// Mean SSIM of `a` against `b` (0..255 scale). Panics if the sizes differ; an error if a side is
/// shorter than [`SSIM_WINDOW`].
pub fn ssim(a: &Plane, b: &Plane) -> Result<f64> {
    assert!(a.same_size(b), "ssim of a {}x{} and a {}x{} plane", a.width, a.height, b.width, b.height);
    if a.width < SSIM_WINDOW || a.height < SSIM_WINDOW {
        bail!("a {}x{} image is smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window", a.width, a.height);
    }
    let w = gaussian_window();
    let product = |f: fn(f64, f64) -> f64| Plane::new(a.width, a.height, a.data.iter().zip(&b.data).map(|(x, y)| f(*x, *y)).collect());
    let mu_a = filter_valid(a, &w);
    let mu_b = filter_valid(b, &w);
    let aa = filter_valid(&product(|x, _| x * x), &w);
    let bb = filter_valid(&product(|_, y| y * y), &w);
    let ab = filter_valid(&product(|x, y| x * y), &w);
    let n = mu_a.len();
    let total: f64 = (0..n)
        .map(|i| {
            let (ma, mb) = (mu_a[i], mu_b[i]);
            let (va, vb, cov) = (aa[i] - ma * ma, bb[i] - mb * mb, ab[i] - ma * mb);
            ((2.0 * ma * mb + C1) * (2.0 * cov + C2)) / ((ma * ma + mb * mb + C1) * (va + vb + C2))
        })
        .sum();
    Ok(total / n as f64)
}

/// The normalised 1-D Gaussian (scipy's `_gaussian_kernel1d`, radius `int(3.5 * 1.5 + 0.5)` = 5).
fn gaussian_window() -> [f64; SSIM_WINDOW] {
    let r = (SSIM_WINDOW / 2) as f64;
    let mut w = [0.0; SSIM_WINDOW];
    for (i, v) in w.iter_mut().enumerate() {
        let x = i as f64 - r;
        *v = (-0.5 * x * x / (SIGMA * SIGMA)).exp();
    }
    let sum: f64 = w.iter().sum();
    w.map(|v| v / sum)
}

/// Separable correlation with `w` in both directions, only where the window fits: the result is
/// `(height - 10) x (width - 10)`, row-major.
fn filter_valid(p: &Plane, w: &[f64; SSIM_WINDOW]) -> Vec<f64> {
    let (ow, oh) = (p.width + 1 - SSIM_WINDOW, p.height + 1 - SSIM_WINDOW);
    let mut rows = vec![0.0; p.height * ow];
    for y in 0..p.height {
        let line = &p.data[y * p.width..(y + 1) * p.width];
        for x in 0..ow {
            rows[y * ow + x] = line[x..x + SSIM_WINDOW].iter().zip(w).map(|(v, k)| v * k).sum();
        }
    }
    let mut out = vec![0.0; oh * ow];
    for y in 0..oh {
        for x in 0..ow {
            out[y * ow + x] = (0..SSIM_WINDOW).map(|k| rows[(y + k) * ow + x] * w[k]).sum();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: usize, h: usize) -> Plane {
        Plane::new(w, h, (0..w * h).map(|i| ((i % w) * 9 + (i / w) * 5) as f64 % 219.0 + 16.0).collect())
    }

    #[test]
    fn identical_planes_score_one() {
        let p = ramp(23, 17);
        assert!((ssim(&p, &p).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn constant_planes_follow_the_luminance_term() {
        // Flat planes have no variance: SSIM is (2 a b + C1) / (a^2 + b^2 + C1) exactly.
        let (a, b) = (Plane::new(12, 11, vec![100.0; 132]), Plane::new(12, 11, vec![120.0; 132]));
        let want = (2.0 * 100.0 * 120.0 + C1) / (100.0f64.powi(2) + 120.0f64.powi(2) + C1);
        assert!((ssim(&a, &b).unwrap() - want).abs() < 1e-12);
    }

    #[test]
    fn the_window_is_normalised_and_small_planes_are_refused() {
        assert!((gaussian_window().iter().sum::<f64>() - 1.0).abs() < 1e-15);
        let p = ramp(10, 40);
        assert!(ssim(&p, &p).unwrap_err().to_string().contains("10x40"));
    }
}
