//! Image quality metrics of a super-resolved image against its high-quality reference, as the
//! paper reports them: PSNR and SSIM on the Y channel, the log-spectral distance (LSD) of the
//! power spectra, and the radially averaged power spectrum behind the spectral-fidelity figure;
//! the learned perceptual distances LPIPS, ST-LPIPS and DISTS (`perceptual`, networks on the
//! engine's backends); the no-reference NIQE and BRISQUE (`niqe`, `brisque`) and the grid figure
//! (`grid`). The learned and NIQE/BRISQUE kinds need weights converted by
//! `tools/metric-weights.sh` (`weights`).
//!
//! Below, PSNR, SSIM and LSD:
//! Design decisions a reader would otherwise have to reverse-engineer:
//! - Everything works on the BT.601 luma as BasicSR computes it (`rgb2ycbcr(img, y_only=True)`
//!   on [0, 1] RGB), scaled by 255: Y*255 = 16 + 65.481 R + 128.553 G + 24.966 B, in [16, 235].
//!   Gray images are replicated to RGB first; alpha is ignored.
//! - No border is cropped (BasicSR's `crop_border = 0`).
//! - Arithmetic is f64 throughout, as numpy and scikit-image do; the reference values in
//!   `tests/golden/metrics/reference.json` come from scikit-image and numpy
//!   (`tools/metrics-goldens.py`) and agree to 1e-3.

pub mod brisque;
mod grid;
pub mod niqe;
pub mod perceptual;
mod spectrum;
mod ssim;
pub mod weights;

pub use grid::{grid_figure, grid_ratio, GRID_PERIODS};
pub use spectrum::{log_spectral_distance, power_spectrum, radial_power_spectrum, LSD_EPS};
pub use ssim::{ssim, SSIM_WINDOW};

use anyhow::{bail, Result};
use loaders::image::Image;

/// One channel of f64 samples, row-major `[height, width]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Plane {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f64>,
}

impl Plane {
    pub fn new(width: usize, height: usize, data: Vec<f64>) -> Self {
        assert_eq!(data.len(), width * height, "plane data does not match {width}x{height}");
        Plane { width, height, data }
    }

    fn same_size(&self, other: &Plane) -> bool {
        (self.width, self.height) == (other.width, other.height)
    }
}

/// The BT.601 luma of an image, times 255 (BasicSR's `rgb2ycbcr(img, y_only=True) * 255`).
pub fn y_channel(img: &Image) -> Plane {
    let rgb = img.to_rgb();
    let data = rgb.data.chunks_exact(3).map(|p| 16.0 + 65.481 * p[0] as f64 + 128.553 * p[1] as f64 + 24.966 * p[2] as f64).collect();
    Plane::new(rgb.width, rgb.height, data)
}

/// PSNR in dB of `a` against `b`, both on a 0..255 scale (`skimage.metrics.peak_signal_noise_ratio`
/// with `data_range=255`): `10 log10(255^2 / mse)`, infinite when the planes are identical.
///
/// Panics if the sizes differ.
pub fn psnr(a: &Plane, b: &Plane) -> f64 {
    assert!(a.same_size(b), "psnr of a {}x{} and a {}x{} plane", a.width, a.height, b.width, b.height);
    let mse = a.data.iter().zip(&b.data).map(|(x, y)| (x - y) * (x - y)).sum::<f64>() / a.data.len() as f64;
    10.0 * (255.0 * 255.0 / mse).log10()
}

/// The three scores of one super-resolved image against its reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// PSNR on Y, dB (infinite for identical images).
    pub psnr_y: f64,
    /// SSIM on Y.
    pub ssim_y: f64,
    /// Log-spectral distance of the Y power spectra, dB.
    pub lsd: f64,
}

/// Scores `sr` against `hq`. Sizes must match, and both sides must be at least the SSIM window.
pub fn evaluate(sr: &Image, hq: &Image) -> Result<Scores> {
    if (sr.width, sr.height) != (hq.width, hq.height) {
        bail!("sizes differ: {}x{} against {}x{}", sr.width, sr.height, hq.width, hq.height);
    }
    let (a, b) = (y_channel(sr), y_channel(hq));
    Ok(Scores { psnr_y: psnr(&a, &b), ssim_y: ssim(&a, &b)?, lsd: log_spectral_distance(&a, &b) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn y_spans_bt601_studio_range() {
        let img = Image::new(3, 1, 3, vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        let y = y_channel(&img);
        assert!((y.data[0] - 16.0).abs() < 1e-9);
        assert!((y.data[1] - 235.0).abs() < 1e-9);
        assert!((y.data[2] - (16.0 + 65.481)).abs() < 1e-5);
        let gray = Image::new(1, 1, 1, vec![1.0]);
        assert!((y_channel(&gray).data[0] - 235.0).abs() < 1e-9);
    }

    #[test]
    fn psnr_of_a_constant_offset() {
        let a = Plane::new(7, 5, (0..35).map(|i| (i * 7 % 200) as f64).collect());
        let b = Plane::new(7, 5, a.data.iter().map(|v| v + 3.0).collect());
        // mse = 9, so PSNR = 10 log10(255^2 / 9) = 20 log10(85).
        assert!((psnr(&a, &b) - 20.0 * 85f64.log10()).abs() < 1e-12);
        assert_eq!(psnr(&a, &a), f64::INFINITY);
    }

    #[test]
    fn evaluate_rejects_mismatched_sizes() {
        let a = Image::new(12, 12, 3, vec![0.5; 12 * 12 * 3]);
        let b = Image::new(12, 13, 3, vec![0.5; 12 * 13 * 3]);
        assert!(evaluate(&a, &b).unwrap_err().to_string().contains("12x12 against 12x13"));
        let s = evaluate(&a, &a).unwrap();
        assert_eq!(s.psnr_y, f64::INFINITY);
        assert!((s.ssim_y - 1.0).abs() < 1e-12 && s.lsd == 0.0);
    }
}
