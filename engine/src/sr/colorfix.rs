//! Colour correction of a super-resolved image against its low-quality input upsampled to the
//! same size (`--color-fix`), as StableSR, SeeSR and DiffBIR do against the colour drift of
//! diffusion sampling.
//!
//! - [`adain`]: each colour channel of the SR image shifted and scaled to the reference's mean
//!   and standard deviation (StableSR's `adaptive_instance_normalization`: unbiased variance plus
//!   1e-5 before the square root).
//! - [`wavelet`]: the SR image's high frequencies on the reference's low frequencies (StableSR's
//!   `wavelet_reconstruction`). The low band is `levels` passes of the 3x3 kernel
//!   `[[1,2,1],[2,4,2],[1,2,1]] / 16` at dilation `2^i`, borders replicated; the high band is
//!   what the passes removed. The sum of the high bands telescopes, so the result is
//!   `sr - low(sr) + low(reference)`.
//!
//! Only colour channels are corrected; alpha (the last of 2 or 4 channels) is the SR's.

use loaders::image::Image;

/// StableSR's default number of wavelet levels.
pub const WAVELET_LEVELS: usize = 5;

/// Added to the variance before the square root, as StableSR does.
const EPS: f64 = 1e-5;

/// The `--color-fix` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorFix {
    None,
    Wavelet,
    AdaIn,
}

impl std::str::FromStr for ColorFix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(ColorFix::None),
            "wavelet" => Ok(ColorFix::Wavelet),
            "adain" => Ok(ColorFix::AdaIn),
            _ => Err(format!("unknown colour fix `{s}`: expected wavelet, adain or none")),
        }
    }
}

impl ColorFix {
    /// `sr` corrected against `reference` (same size and channels).
    pub fn apply(self, sr: &Image, reference: &Image) -> Image {
        match self {
            ColorFix::None => sr.clone(),
            ColorFix::Wavelet => wavelet(sr, reference, WAVELET_LEVELS),
            ColorFix::AdaIn => adain(sr, reference),
        }
    }
}

fn color_channels(img: &Image) -> usize {
    if img.channels >= 3 {
        3
    } else {
        1
    }
}

fn check_same_shape(sr: &Image, reference: &Image) {
    assert_eq!(
        (sr.width, sr.height, sr.channels),
        (reference.width, reference.height, reference.channels),
        "colour fix needs the reference at the SR image's size and channels (width, height, channels)"
    );
}

/// One channel as a plane.
fn plane(img: &Image, k: usize) -> Vec<f32> {
    img.data.iter().skip(k).step_by(img.channels).copied().collect()
}

/// Mean and `sqrt(unbiased variance + EPS)` of a plane.
fn mean_std(p: &[f32]) -> (f64, f64) {
    let n = p.len() as f64;
    let mean = p.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = p.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, (var + EPS).sqrt())
}

/// `sr` with each colour channel's mean and standard deviation matched to `reference`'s.
/// Panics if the two differ in size or channels.
pub fn adain(sr: &Image, reference: &Image) -> Image {
    check_same_shape(sr, reference);
    let mut out = sr.clone();
    for k in 0..color_channels(sr) {
        let (m_sr, s_sr) = mean_std(&plane(sr, k));
        let (m_ref, s_ref) = mean_std(&plane(reference, k));
        for v in out.data.iter_mut().skip(k).step_by(sr.channels) {
            *v = ((*v as f64 - m_sr) / s_sr * s_ref + m_ref) as f32;
        }
    }
    out
}

/// One pass of `[1, 2, 1] / 4` along both axes at dilation `r`, borders replicated.
fn blur(p: &[f32], w: usize, h: usize, r: usize) -> Vec<f32> {
    let mut rows = vec![0f32; p.len()];
    for y in 0..h {
        let src = &p[y * w..(y + 1) * w];
        for x in 0..w {
            let (l, rr) = (x.saturating_sub(r), (x + r).min(w - 1));
            rows[y * w + x] = 0.25 * src[l] + 0.5 * src[x] + 0.25 * src[rr];
        }
    }
    let mut out = vec![0f32; p.len()];
    for y in 0..h {
        let (u, d) = (y.saturating_sub(r), (y + r).min(h - 1));
        for x in 0..w {
            out[y * w + x] = 0.25 * rows[u * w + x] + 0.5 * rows[y * w + x] + 0.25 * rows[d * w + x];
        }
    }
    out
}

/// The low band after `levels` passes at dilations 1, 2, 4, ...
pub fn low_band(mut p: Vec<f32>, w: usize, h: usize, levels: usize) -> Vec<f32> {
    for i in 0..levels {
        p = blur(&p, w, h, 1 << i);
    }
    p
}

/// The high frequencies of `sr` on the low frequencies of `reference` after `levels` wavelet
/// levels (StableSR uses [`WAVELET_LEVELS`]). Panics if the two differ in size or channels.
pub fn wavelet(sr: &Image, reference: &Image, levels: usize) -> Image {
    check_same_shape(sr, reference);
    let (w, h) = (sr.width, sr.height);
    let mut out = sr.clone();
    for k in 0..color_channels(sr) {
        let low_sr = low_band(plane(sr, k), w, h, levels);
        let low_ref = low_band(plane(reference, k), w, h, levels);
        for (i, v) in out.data.iter_mut().skip(k).step_by(sr.channels).enumerate() {
            *v = *v - low_sr[i] + low_ref[i];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [0, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect()
    }

    fn smooth(w: usize, h: usize, c: usize) -> Image {
        let data = (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| (0..c).map(move |k| (x, y, k))))
            .map(|(x, y, k)| 0.5 + 0.3 * ((x as f32 * 0.05 + k as f32).sin() * (y as f32 * 0.04 + 0.5 * k as f32).cos()))
            .collect();
        Image::new(w, h, c, data)
    }

    #[test]
    fn adain_gives_the_reference_mean_and_std_per_channel() {
        let (w, h) = (23, 17);
        let sr = Image::new(w, h, 4, noise(w * h * 4, 1).iter().map(|v| 0.2 + 0.3 * v).collect());
        let reference = Image::new(w, h, 4, noise(w * h * 4, 2).iter().map(|v| v * v).collect());
        let out = adain(&sr, &reference);
        for k in 0..3 {
            let (m, s) = mean_std(&plane(&out, k));
            let (m_ref, s_ref) = mean_std(&plane(&reference, k));
            // Exact up to StableSR's 1e-5 under the square roots.
            assert!((m - m_ref).abs() < 1e-4 && (s - s_ref).abs() < 1e-3, "channel {k}: {m} {s} vs {m_ref} {s_ref}");
        }
        assert_eq!(plane(&out, 3), plane(&sr, 3), "alpha is the SR's");
    }

    #[test]
    fn wavelet_of_the_reference_itself_is_the_reference() {
        let reference = Image::new(40, 30, 3, noise(40 * 30 * 3, 3));
        let out = wavelet(&reference, &reference, WAVELET_LEVELS);
        assert!(out.data.iter().zip(&reference.data).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn wavelet_removes_a_constant_offset() {
        let reference = smooth(50, 45, 3);
        let sr = Image::new(50, 45, 3, reference.data.iter().map(|v| v + 0.2).collect());
        let out = wavelet(&sr, &reference, WAVELET_LEVELS);
        assert!(out.data.iter().zip(&reference.data).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn wavelet_keeps_the_sr_high_frequencies() {
        let (w, h) = (80, 80);
        let reference = smooth(w, h, 3);
        let check = |x: usize, y: usize| if (x + y) % 2 == 0 { 0.1 } else { -0.1 };
        let mut sr = reference.clone();
        for y in 0..h {
            for x in 0..w {
                for k in 0..3 {
                    sr.data[(y * w + x) * 3 + k] += check(x, y) + 0.15; // detail plus a colour shift
                }
            }
        }
        let out = wavelet(&sr, &reference, WAVELET_LEVELS);
        let mut total = 0.0;
        for y in 0..h {
            for x in 0..w {
                for k in 0..3 {
                    let kept = out.data[(y * w + x) * 3 + k] - reference.data[(y * w + x) * 3 + k];
                    let err = (kept - check(x, y)).abs();
                    total += err;
                    // Away from the border the checkerboard passes untouched (the first pass
                    // cancels it exactly, the dilated ones cannot see it) and the shift is gone.
                    if (32..48).contains(&x) && (32..48).contains(&y) {
                        assert!(err < 1e-5, "({x}, {y}): {kept}");
                    }
                }
            }
        }
        let mean_err = total / (w * h * 3) as f32;
        assert!(mean_err < 0.01, "mean deviation from the checkerboard {mean_err}");
    }

    #[test]
    fn color_fix_parses_and_dispatches() {
        assert_eq!("Wavelet".parse::<ColorFix>(), Ok(ColorFix::Wavelet));
        assert_eq!("adain".parse::<ColorFix>(), Ok(ColorFix::AdaIn));
        assert_eq!("none".parse::<ColorFix>(), Ok(ColorFix::None));
        assert!("hist".parse::<ColorFix>().unwrap_err().contains("wavelet, adain or none"));
        let img = smooth(8, 8, 1);
        assert_eq!(ColorFix::None.apply(&img, &img), img);
    }
}
