//! The FLUX sampling schedule (BFL `sampling.py`): `linspace(1, 0, n + 1)` shifted towards
//! t = 1 by an amount `mu` that grows linearly with the number of image tokens, so that larger
//! images spend more steps at high noise. Convention (design.md section 5): `x_t = (1 - t) x0 +
//! t eps`, the model predicts `eps - x0`, and Euler steps go from t = 1 to t = 0.

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// `mu` at 256 and at 4096 image tokens; linear in between and beyond.
const BASE_SHIFT: (f64, f64) = (256.0, 0.5);
const MAX_SHIFT: (f64, f64) = (4096.0, 1.15);

/// The shift for a sequence of `image_tokens` packed latent tokens.
pub fn mu(image_tokens: usize) -> f64 {
    let slope = (MAX_SHIFT.1 - BASE_SHIFT.1) / (MAX_SHIFT.0 - BASE_SHIFT.0);
    BASE_SHIFT.1 + slope * (image_tokens as f64 - BASE_SHIFT.0)
}

/// `e^mu / (e^mu + (1 / t - 1))`, with the endpoints exact.
pub fn time_shift(mu: f64, t: f64) -> f64 {
    if t <= 0.0 {
        0.0
    } else {
        mu.exp() / (mu.exp() + (1.0 / t - 1.0))
    }
}

/// `steps + 1` times from 1 down to 0.
pub fn schedule(steps: usize, image_tokens: usize) -> Vec<f32> {
    let m = mu(image_tokens);
    (0..=steps).map(|i| time_shift(m, 1.0 - i as f64 / steps as f64) as f32).collect()
}

/// Standard normal noise, reproducible from `seed` on every machine.
pub fn gaussian_noise(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_is_anchored_at_flux_values() {
        assert!((mu(256) - 0.5).abs() < 1e-12);
        assert!((mu(4096) - 1.15).abs() < 1e-12);
    }

    #[test]
    fn schedule_runs_from_one_to_zero_and_shifts_towards_noise() {
        let s = schedule(28, 4096);
        assert_eq!(s.len(), 29);
        assert_eq!((s[0], s[28]), (1.0, 0.0));
        assert!(s.windows(2).all(|w| w[0] > w[1]));
        // With mu > 0 every interior time lies above the unshifted linspace value.
        for (i, &t) in s.iter().enumerate().take(28).skip(1) {
            let plain = 1.0 - i as f32 / 28.0;
            assert!(t > plain, "step {i}: {t} <= {plain}");
        }
        // The midpoint maps to e^mu / (e^mu + 1), the logistic of mu.
        let mid = schedule(2, 4096)[1] as f64;
        assert!((mid - 1.0 / (1.0 + (-1.15f64).exp())).abs() < 1e-6);
    }

    #[test]
    fn noise_is_reproducible_and_standard() {
        let a = gaussian_noise(100_000, 3);
        assert_eq!(a, gaussian_noise(100_000, 3));
        assert_ne!(a, gaussian_noise(100_000, 4));
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.02, "mean {mean} var {var}");
    }
}
