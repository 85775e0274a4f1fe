//! AdamW over named f32 parameter tensors (the trained master copies): its configuration and
//! state (what a checkpoint saves), and the host reference of one step, which is the CPU
//! backend's `TrainingOps::adamw_step` and the reference of the device kernel.
//!
//! Design decisions a reader would otherwise have to reverse-engineer:
//! - The parameters are the f32 master copies; the model's own factors are refreshed from them
//!   after each step, whatever precision the backend runs in.
//! - Clipping is on the global L2 norm over every gradient together (as `clip_grad_norm_`), and
//!   the reported grad norm is the one before clipping.
//! - Weight decay is decoupled (Loshchilov and Hutter): `p -= lr wd p` beside the Adam update,
//!   never folded into the gradient, and scaled by the same warmed-up learning rate.
//! - The learning rate warms up linearly: step k (counted from 1) uses `lr min(1, k / warmup)`;
//!   with `decay_steps` D it then follows a half cosine from `lr` at the warm-up's end to 0 at D.
//! - Arithmetic is f64 per element; the moments are stored in f32 so that a checkpoint is small
//!   and a resumed run reads back exactly what an uninterrupted one keeps.

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The optimiser's hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps over which the learning rate rises linearly to `lr`; 0 starts at `lr`.
    pub warmup_steps: u64,
    /// The step at which the cosine decay after warm-up reaches 0; 0 keeps `lr` constant.
    #[serde(default)]
    pub decay_steps: u64,
    /// The largest global gradient norm; gradients above it are scaled down to it. None: no clip.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 0,
            decay_steps: 0,
            max_grad_norm: Some(1.0),
        }
    }
}

impl AdamWConfig {
    /// The learning rate of step `k` (counted from 1): linear warm-up, then constant or a cosine
    /// decay.
    pub fn lr_at(&self, k: u64) -> f64 {
        let (warmup, decay) = (self.warmup_steps, self.decay_steps);
        if k < warmup {
            return self.lr * k as f64 / warmup as f64;
        }
        if decay == 0 {
            return self.lr;
        }
        let progress = ((k - warmup) as f64 / decay.saturating_sub(warmup).max(1) as f64).min(1.0);
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// The first and second moments of one parameter tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// Everything the optimiser carries from step to step: what a checkpoint saves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken so far.
    pub step: u64,
    pub moments: BTreeMap<String, Moments>,
}

/// What one step did, for the log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate this step used.
    pub lr: f64,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW { config, step: 0, moments: BTreeMap::new() }
    }

    /// The learning rate of step `k` (counted from 1), `AdamWConfig::lr_at`.
    pub fn lr_at(&self, k: u64) -> f64 {
        self.config.lr_at(k)
    }

    /// One update of every parameter in `params` from the gradient of the same name in `grads`.
    /// Both maps must have the same names and lengths; a parameter's moments start at zero.
    pub fn step(&mut self, params: &mut BTreeMap<String, Vec<f32>>, grads: &BTreeMap<String, Vec<f32>>) -> Result<StepStats> {
        ensure!(
            params.keys().eq(grads.keys()),
            "AdamW: parameters {:?} and gradients {:?} differ",
            params.keys().collect::<Vec<_>>(),
            grads.keys().collect::<Vec<_>>()
        );
        let grad_norm = global_norm(grads.values().map(Vec::as_slice))?;
        self.step += 1;
        let k = self.step;
        let lr = self.lr_at(k);
        for (name, p) in params.iter_mut() {
            let g = &grads[name];
            ensure!(g.len() == p.len(), "AdamW: '{name}' has {} values but its gradient {}", p.len(), g.len());
            let mom = self.moments.entry(name.clone()).or_insert_with(|| Moments { m: vec![0.0; p.len()], v: vec![0.0; p.len()] });
            ensure!(mom.m.len() == p.len(), "AdamW: '{name}' has {} values but its saved moments {}", p.len(), mom.m.len());
            update(&self.config, k, lr, grad_norm, p, &mut mom.m, &mut mom.v, g);
        }
        Ok(StepStats { grad_norm, lr })
    }

    /// The state as JSON (f32 and f64 values print in shortest round-trip form, so reading it
    /// back gives the same bits).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).context("AdamW: cannot serialise the state")
    }

    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).context("AdamW: the saved optimiser state does not parse")
    }
}

/// The global L2 norm of all the gradients together (computed in f64), or an error when it is
/// not finite: the loss diverged.
pub fn global_norm<'a>(grads: impl Iterator<Item = &'a [f32]>) -> Result<f64> {
    let grad_norm = grads.flatten().map(|&g| g as f64 * g as f64).sum::<f64>().sqrt();
    ensure!(grad_norm.is_finite(), "AdamW: the gradient norm is {grad_norm}: the loss diverged");
    Ok(grad_norm)
}

/// One parameter tensor's AdamW update at step `k` (counted from 1) and learning rate `lr`,
/// given the global gradient norm `grad_norm` that the clip scales by: the moments `m`, `v` and
/// the parameters `p` are updated in place from the gradient `g` (all of one length).
#[allow(clippy::too_many_arguments)]
pub fn update(c: &AdamWConfig, k: u64, lr: f64, grad_norm: f64, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
    let clip = match c.max_grad_norm {
        Some(max) if grad_norm > max => max / grad_norm,
        _ => 1.0,
    };
    let (bias1, bias2) = (1.0 - c.beta1.powi(k as i32), 1.0 - c.beta2.powi(k as i32));
    for i in 0..p.len() {
        let gi = g[i] as f64 * clip;
        let mi = c.beta1 * m[i] as f64 + (1.0 - c.beta1) * gi;
        let vi = c.beta2 * v[i] as f64 + (1.0 - c.beta2) * gi * gi;
        let (m_hat, v_hat) = (mi / bias1, vi / bias2);
        let pi = p[i] as f64;
        p[i] = (pi - lr * (m_hat / (v_hat.sqrt() + c.eps) + c.weight_decay * pi)) as f32;
        m[i] = mi as f32;
        v[i] = vi as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(name: &str, values: Vec<f32>) -> BTreeMap<String, Vec<f32>> {
        BTreeMap::from([(name.to_string(), values)])
    }

    fn close(a: f32, b: f64, what: &str) {
        assert!((a as f64 - b).abs() <= 1e-6 * b.abs().max(1e-3), "{what}: {a} vs expected {b}");
    }

    /// Three steps of a single scalar with gradients 0.5, -1.0, 2.0, written out from the update
    /// rule by hand: m_k = b1 m + (1-b1) g, v_k = b2 v + (1-b2) g^2,
    /// p -= lr_k (m_k/(1-b1^k) / (sqrt(v_k/(1-b2^k)) + eps) + wd p), lr_k = lr min(1, k/2).
    #[test]
    fn three_steps_follow_the_closed_form() {
        let config = AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.01,
            warmup_steps: 2,
            decay_steps: 0,
            max_grad_norm: None,
        };
        let mut opt = AdamW::new(config);
        let mut p = one("w", vec![1.0]);

        // Step 1: m = 0.05, v = 0.0025; m_hat = 0.5, v_hat = 0.25; update 0.5/0.5 = 1.
        // lr_1 = 0.05: p = 1 - 0.05 (1 + 0.01) = 0.9495.
        let s = opt.step(&mut p, &one("w", vec![0.5])).unwrap();
        assert_eq!((s.grad_norm, s.lr), (0.5, 0.05));
        close(p["w"][0], 0.9495, "step 1");

        // Step 2: m = 0.045 - 0.1 = -0.055, v = 0.002475 + 0.01 = 0.012475;
        // m_hat = -0.055/0.19, v_hat = 0.012475/0.0199; lr_2 = 0.1.
        let m_hat: f64 = -0.055 / 0.19;
        let v_hat: f64 = 0.012475 / 0.0199;
        let p2 = 0.9495f32 as f64;
        let expected2 = p2 - 0.1 * (m_hat / (v_hat.sqrt() + 1e-8) + 0.01 * p2);
        opt.step(&mut p, &one("w", vec![-1.0])).unwrap();
        close(p["w"][0], expected2, "step 2");

        // Step 3: m = -0.0495 + 0.2 = 0.1505, v = 0.01235025 + 0.04 = 0.05235025.
        let m_hat: f64 = 0.1505 / (1.0 - 0.729);
        let v_hat: f64 = 0.05235025 / (1.0 - 0.970299);
        let p3 = p["w"][0] as f64;
        let expected3 = p3 - 0.1 * (m_hat / (v_hat.sqrt() + 1e-8) + 0.01 * p3);
        opt.step(&mut p, &one("w", vec![2.0])).unwrap();
        close(p["w"][0], expected3, "step 3");
        assert_eq!(opt.step, 3);
    }

    /// Warm-up 4 then a cosine to 0 at step 12: lr/4 at step 1, lr at 4, lr (1 + cos(pi/4))/2
    /// at 6, lr/2 at 8, 0 at 12 and after.
    #[test]
    fn the_learning_rate_warms_up_then_follows_a_half_cosine() {
        let opt = AdamW::new(AdamWConfig { lr: 0.2, warmup_steps: 4, decay_steps: 12, ..AdamWConfig::default() });
        let expected = [(1, 0.05), (4, 0.2), (6, 0.1 * (1.0 + 0.5f64.sqrt())), (8, 0.1), (12, 0.0), (20, 0.0)];
        for (k, lr) in expected {
            assert!((opt.lr_at(k) - lr).abs() < 1e-12, "step {k}: {} vs {lr}", opt.lr_at(k));
        }
        let constant = AdamW::new(AdamWConfig { lr: 0.2, warmup_steps: 4, ..AdamWConfig::default() });
        assert_eq!(constant.lr_at(1000), 0.2);
    }

    /// Gradients (3, 4) over two tensors have norm 5; a clip at 1 scales them to (0.6, 0.8), and
    /// Adam's first step then moves each parameter by lr sign(g) whatever the scale.
    #[test]
    fn clipping_uses_the_global_norm_and_reports_it_unclipped() {
        let config = AdamWConfig { lr: 0.01, weight_decay: 0.0, max_grad_norm: Some(1.0), ..AdamWConfig::default() };
        let mut opt = AdamW::new(config);
        let mut p = BTreeMap::from([("a".to_string(), vec![0.0f32]), ("b".to_string(), vec![0.0f32])]);
        let g = BTreeMap::from([("a".to_string(), vec![3.0f32]), ("b".to_string(), vec![-4.0f32])]);
        let s = opt.step(&mut p, &g).unwrap();
        assert_eq!(s.grad_norm, 5.0);
        close(opt.moments["a"].m[0], 0.1 * 0.6, "clipped first moment of a");
        close(opt.moments["b"].m[0], -0.1 * 0.8, "clipped first moment of b");
        close(p["a"][0], -0.01, "a");
        close(p["b"][0], 0.01, "b");
    }

    #[test]
    fn the_state_round_trips_bit_exactly_and_mismatches_are_named() {
        let mut opt = AdamW::new(AdamWConfig::default());
        let mut p = one("lora.down", vec![0.1, -0.2, 0.3]);
        opt.step(&mut p, &one("lora.down", vec![0.12345679, -1e-7, 3.3])).unwrap();
        let back = AdamW::from_json(&opt.to_json().unwrap()).unwrap();
        assert_eq!(back, opt);
        let err = opt.step(&mut p, &one("other", vec![1.0, 2.0, 3.0])).unwrap_err();
        assert!(err.to_string().contains("other"), "{err}");
        let err = opt.step(&mut p, &one("lora.down", vec![f32::NAN, 0.0, 0.0])).unwrap_err();
        assert!(err.to_string().contains("diverged"), "{err}");
    }
}
