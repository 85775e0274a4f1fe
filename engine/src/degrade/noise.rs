//! Additive noise as BasicSR's `random_add_gaussian_noise_pt` / `random_add_poisson_noise_pt`:
//! color noise, or with `gray_prob` one noise plane shared by the three channels, then clipping
//! to [0, 1].
//!
//! Poisson follows `generate_poisson_noise_pt`: the image is rounded to 8 bits, `vals` is the
//! number of distinct values rounded up to a power of two, the noise is
//! `(Poisson(img * vals) / vals - img) * scale`; the gray variant does the same on the
//! (rounded) luma `0.2989 R + 0.587 G + 0.114 B`.

use super::Rgb;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Poisson, StandardNormal};

/// One round's noise parameters (`gaussian_noise_prob`, `noise_range` in 8-bit levels,
/// `poisson_scale_range`, `gray_noise_prob`).
#[derive(Debug, Clone, Copy)]
pub struct NoiseParams {
    pub gaussian_prob: f64,
    pub sigma: [f64; 2],
    pub poisson_scale: [f64; 2],
    pub gray_prob: f64,
}

pub const NOISE1: NoiseParams = NoiseParams { gaussian_prob: 0.5, sigma: [1.0, 30.0], poisson_scale: [0.05, 3.0], gray_prob: 0.4 };
pub const NOISE2: NoiseParams = NoiseParams { gaussian_prob: 0.5, sigma: [1.0, 25.0], poisson_scale: [0.05, 2.5], gray_prob: 0.4 };

/// Gaussian or Poisson noise with random strength, color or gray, added and clipped.
pub fn random_noise(img: &Rgb, rng: &mut ChaCha8Rng, p: &NoiseParams) -> Rgb {
    let gaussian = rng.random::<f64>() < p.gaussian_prob;
    let strength = if gaussian { p.sigma } else { p.poisson_scale };
    let strength = strength[0] + (strength[1] - strength[0]) * rng.random::<f64>();
    let gray = rng.random::<f64>() < p.gray_prob;
    let noise = if gaussian { gaussian_noise(img, rng, strength, gray) } else { poisson_noise(img, rng, strength, gray) };
    add_clipped(img, &noise)
}

/// `img + noise` clipped to [0, 1].
pub fn add_clipped(img: &Rgb, noise: &[f32]) -> Rgb {
    Rgb { width: img.width, height: img.height, data: img.data.iter().zip(noise).map(|(v, n)| (v + n).clamp(0.0, 1.0)).collect() }
}

/// Zero-mean Gaussian noise with standard deviation `sigma / 255`; `gray`: one value per pixel.
pub fn gaussian_noise(img: &Rgb, rng: &mut ChaCha8Rng, sigma: f64, gray: bool) -> Vec<f32> {
    let s = (sigma / 255.0) as f32;
    let mut draw = || s * rng.sample::<f32, _>(StandardNormal);
    if gray {
        (0..img.width * img.height).flat_map(|_| [draw(); 3]).collect()
    } else {
        (0..img.data.len()).map(|_| draw()).collect()
    }
}

/// Poisson (shot) noise of BasicSR's `generate_poisson_noise_pt`, times `scale`.
pub fn poisson_noise(img: &Rgb, rng: &mut ChaCha8Rng, scale: f64, gray: bool) -> Vec<f32> {
    let planes: Vec<f32> =
        if gray { img.data.chunks_exact(3).map(|p| 0.2989 * p[0] + 0.587 * p[1] + 0.114 * p[2]).collect() } else { img.data.clone() };
    // Round to 8-bit levels and count the distinct ones.
    let levels: Vec<u8> = planes.iter().map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect();
    let mut seen = [false; 256];
    levels.iter().for_each(|&l| seen[l as usize] = true);
    let distinct = seen.iter().filter(|&&s| s).count().max(1);
    let vals = (distinct as f64).log2().ceil().exp2();
    // One distribution per level (lambda = level / 255 * vals); lambda 0 always gives 0.
    let dists: Vec<Option<Poisson<f64>>> = (0..256).map(|l| Poisson::new(l as f64 / 255.0 * vals).ok()).collect();
    let noise: Vec<f32> = levels
        .iter()
        .map(|&l| {
            let img_v = l as f64 / 255.0;
            let out = dists[l as usize].as_ref().map_or(0.0, |d| d.sample(rng)) / vals;
            ((out - img_v) * scale) as f32
        })
        .collect();
    if gray {
        noise.iter().flat_map(|&n| [n; 3]).collect()
    } else {
        noise
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn flat(v: f32) -> Rgb {
        Rgb { width: 200, height: 200, data: vec![v; 200 * 200 * 3] }
    }

    fn mean_std(x: &[f32]) -> (f64, f64) {
        let n = x.len() as f64;
        let m = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n;
        (m, var.sqrt())
    }

    #[test]
    fn gaussian_noise_has_the_asked_sigma() {
        let img = flat(0.5);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for (sigma, gray) in [(10.0, false), (25.0, true)] {
            let out = add_clipped(&img, &gaussian_noise(&img, &mut rng, sigma, gray));
            let diff: Vec<f32> = out.data.iter().map(|v| v - 0.5).collect();
            let (m, s) = mean_std(&diff);
            let want = sigma / 255.0;
            assert!(m.abs() < 0.05 * want, "mean {m}");
            assert!((s - want).abs() < 0.05 * want, "std {s} against {want}");
        }
    }

    #[test]
    fn gray_noise_is_equal_across_channels() {
        let img = Rgb { width: 32, height: 32, data: (0..32 * 32 * 3).map(|i| (i % 251) as f32 / 250.0).collect() };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for noise in [gaussian_noise(&img, &mut rng, 20.0, true), poisson_noise(&img, &mut rng, 2.0, true)] {
            assert!(noise.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
            assert!(noise.iter().any(|&n| n != 0.0));
        }
        let color = gaussian_noise(&img, &mut rng, 20.0, false);
        assert!(color.chunks(3).any(|p| p[0] != p[1]));
    }

    #[test]
    fn poisson_noise_follows_the_shot_noise_law() {
        // A flat image has one distinct value, so vals = 1: the noise is (Poisson(v) - v) * scale,
        // mean 0 and standard deviation sqrt(v) * scale.
        let v = 0.6f32;
        let img = flat(v);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let level = (v * 255.0).round() / 255.0;
        let (m, s) = mean_std(&poisson_noise(&img, &mut rng, 0.5, false));
        let want = (level as f64).sqrt() * 0.5;
        assert!(m.abs() < 0.05 * want, "mean {m}");
        assert!((s - want).abs() < 0.05 * want, "std {s} against {want}");
    }
}
