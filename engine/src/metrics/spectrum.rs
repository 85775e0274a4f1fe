//! Power spectra of a plane: the log-spectral distance between two of them, and the radial
//! average drawn in the spectral-fidelity plot.
//!
//! The power spectrum is `P = |FFT2(y)|^2 / (H W)` on the 0..255 scale, unshifted, as numpy's
//! `np.abs(np.fft.fft2(y))**2 / y.size` computes it. The LSD is
//! `sqrt(mean over all H*W frequencies of (10 log10(P_a + eps) - 10 log10(P_b + eps))^2)` in dB,
//! with `eps` = [`LSD_EPS`] keeping exactly-zero bins finite; 8-bit quantisation alone puts about
//! 1/12 of power in every bin, so for real images `eps` changes nothing.

use super::Plane;
use rustfft::num_complex::Complex;
use rustfft::FftPlanner;

/// Added to every power before the logarithm.
pub const LSD_EPS: f64 = 1e-10;

/// `|FFT2(p)|^2 / (H W)`, row-major `[height, width]`, zero frequency at index 0.
pub fn power_spectrum(p: &Plane) -> Vec<f64> {
    let (w, h) = (p.width, p.height);
    let mut planner = FftPlanner::<f64>::new();
    let mut buf: Vec<Complex<f64>> = p.data.iter().map(|&v| Complex::new(v, 0.0)).collect();
    // Rows in place, then columns through a transposed copy.
    planner.plan_fft_forward(w).process(&mut buf);
    let mut cols = vec![Complex::new(0.0, 0.0); w * h];
    for y in 0..h {
        for x in 0..w {
            cols[x * h + y] = buf[y * w + x];
        }
    }
    planner.plan_fft_forward(h).process(&mut cols);
    let n = (w * h) as f64;
    let mut out = vec![0.0; w * h];
    for x in 0..w {
        for y in 0..h {
            out[y * w + x] = cols[x * h + y].norm_sqr() / n;
        }
    }
    out
}

/// Log-spectral distance in dB between the power spectra of `a` and `b`. Panics if the sizes differ.
pub fn log_spectral_distance(a: &Plane, b: &Plane) -> f64 {
    assert!(a.same_size(b), "lsd of a {}x{} and a {}x{} plane", a.width, a.height, b.width, b.height);
    let (pa, pb) = (power_spectrum(a), power_spectrum(b));
    let db = |v: f64| 10.0 * (v + LSD_EPS).log10();
    let sum: f64 = pa.iter().zip(&pb).map(|(x, y)| (db(*x) - db(*y)).powi(2)).sum();
    (sum / pa.len() as f64).sqrt()
}

/// Mean power per integer radius, out to the largest full circle: entry `r` averages the bins of
/// the centred spectrum whose distance from the zero frequency rounds to `r` (frequency-index
/// units, cycles per image side), for `r` up to `min(H, W) / 2`; the corners beyond are left out.
pub fn radial_power_spectrum(p: &Plane) -> Vec<f64> {
    let power = power_spectrum(p);
    let (w, h) = (p.width, p.height);
    // numpy's fftshift convention: index i is frequency i below the split, i - n above it.
    let signed = |i: usize, n: usize| if i < n - n / 2 { i as f64 } else { i as f64 - n as f64 };
    let bins = w.min(h) / 2 + 1;
    let (mut sum, mut count) = (vec![0.0; bins], vec![0usize; bins]);
    for y in 0..h {
        for x in 0..w {
            let r = signed(y, h).hypot(signed(x, w)).round() as usize;
            if r < bins {
                sum[r] += power[y * w + x];
                count[r] += 1;
            }
        }
    }
    sum.iter().zip(&count).map(|(s, c)| s / *c as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(w: usize, h: usize, seed: u64) -> Plane {
        let mut s = seed;
        let data = (0..w * h)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                16.0 + (s >> 40) as f64 / (1u64 << 24) as f64 * 219.0
            })
            .collect();
        Plane::new(w, h, data)
    }

    #[test]
    fn parseval_holds() {
        let p = noise(33, 47, 1);
        let energy: f64 = p.data.iter().map(|v| v * v).sum();
        assert!((power_spectrum(&p).iter().sum::<f64>() - energy).abs() < 1e-9 * energy);
    }

    #[test]
    fn lsd_of_identical_planes_is_zero() {
        let p = noise(20, 13, 2);
        assert_eq!(log_spectral_distance(&p, &p), 0.0);
    }

    #[test]
    fn lsd_of_a_scaled_plane_is_the_gain_in_db() {
        let p = noise(31, 24, 3);
        for a in [0.5, 2.0, 3.7] {
            let q = Plane::new(p.width, p.height, p.data.iter().map(|v| a * v).collect());
            let want = (10.0 * (a * a).log10()).abs();
            assert!((log_spectral_distance(&q, &p) - want).abs() < 1e-6, "a = {a}");
        }
    }

    #[test]
    fn radial_spectrum_of_a_cosine_peaks_at_its_frequency() {
        let (w, h) = (64, 48);
        for (kx, ky) in [(5usize, 0usize), (0, 7), (6, 8)] {
            let data = (0..w * h)
                .map(|i| {
                    let (x, y) = ((i % w) as f64, (i / w) as f64);
                    (2.0 * std::f64::consts::PI * (kx as f64 * x / w as f64 + ky as f64 * y / h as f64)).cos()
                })
                .collect();
            let radial = radial_power_spectrum(&Plane::new(w, h, data));
            let peak = radial.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            assert_eq!(peak, ((kx * kx + ky * ky) as f64).sqrt().round() as usize, "({kx}, {ky})");
        }
    }
}
