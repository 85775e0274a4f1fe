//! The flow's timestep distribution in training (design.md section 5): logit-normal, with an
//! optional share of samples at t = 1 exactly.

use crate::backend::losses::sigmoid;
use crate::sampler::gaussian_noise;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The logit-normal timestep distribution, `t = sigmoid(mean + std n)` with `n ~ N(0, 1)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogitNormal {
    pub mean: f64,
    pub std: f64,
    /// The probability of t = 1 exactly instead (pure noise in, the posterior mean out: what
    /// one-step sampling evaluates, and a logit-normal never draws).
    pub one: f64,
}

impl Default for LogitNormal {
    /// Mean 0, std 1 (design.md section 5), never exactly 1.
    fn default() -> Self {
        LogitNormal { mean: 0.0, std: 1.0, one: 0.0 }
    }
}

impl LogitNormal {
    /// `count` times in [0, 1], reproducible from `seed` on every machine.
    pub fn sample(&self, count: usize, seed: u64) -> Vec<f32> {
        let mut t: Vec<f32> = gaussian_noise(count, seed).into_iter().map(|n| sigmoid(self.mean + self.std * n as f64) as f32).collect();
        if self.one > 0.0 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6F6E_6521);
            t.iter_mut().filter(|_| rng.random::<f64>() < self.one).for_each(|t| *t = 1.0);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logit_normal_times_are_seeded_and_have_normal_logits() {
        for (distribution, seed) in [(LogitNormal::default(), 60), (LogitNormal { mean: 1.0, std: 0.5, one: 0.0 }, 61)] {
            let times = distribution.sample(50_000, seed);
            assert_eq!(times, distribution.sample(50_000, seed));
            assert_ne!(times, distribution.sample(50_000, seed + 100));
            assert!(times.iter().all(|&t| t > 0.0 && t < 1.0));
            let logits: Vec<f64> = times.iter().map(|&t| (t as f64 / (1.0 - t as f64)).ln()).collect();
            let mean = logits.iter().sum::<f64>() / logits.len() as f64;
            let std = (logits.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / logits.len() as f64).sqrt();
            assert!((mean - distribution.mean).abs() < 0.02 && (std - distribution.std).abs() < 0.02, "mean {mean} std {std}");
        }
    }

    /// A quarter at exactly 1, the rest the same logit-normal as without.
    #[test]
    fn a_fraction_of_times_is_exactly_one() {
        let plain = LogitNormal { mean: 0.5, std: 1.0, one: 0.0 };
        let mixed = LogitNormal { one: 0.25, ..plain };
        let (a, b) = (plain.sample(40_000, 7), mixed.sample(40_000, 7));
        let ones = b.iter().filter(|&&t| t == 1.0).count() as f64 / b.len() as f64;
        assert!((ones - 0.25).abs() < 0.01, "{ones} at t = 1");
        assert!(a.iter().zip(&b).all(|(a, b)| a == b || *b == 1.0));
    }
}
