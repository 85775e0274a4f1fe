//! The `adversary` stage (design.md section 7, AMG "mimic"): trains A_phi = base + SFT LoRA +
//! its own LoRA to predict, at the HQ's flow point `x^w_t`, the velocity that leads to a
//! baseline's output for the same LQ: `|| A_phi(x^w_t, t, c) - (eps - x^b_0) ||^2`.
//!
//! The optional hardness term `lambda_E E(v_ref(x^l_t) - u^l)` rewards negatives that the
//! reference finds easy. The adversary reaches it through the AS-DPO synthesis
//! (`x^l_0 = x^w_0 + limit_rho(x^w_t - t A - x^w_0)`, re-projected with the same noise) and the
//! frozen reference, so its gradient is carried back exactly that way: through the reference's
//! backward ([`reference_residual_grad`]), the norm limit
//! (`TrainingOps::limit_sobolev_norm_backward`) and `d x^l_0 / d A = -t`.

use super::batch::{draw_noise, encode_samples};
use super::data::Sample;
use super::preference::{mean, reference_residual_grad};
use super::stage::{MicroStep, StageStep, StepContext};
use crate::backend::losses::{FlowTarget, Hardness};
use crate::backend::sobolev::Sobolev;
use crate::backend::training::TrainingOps;
use anyhow::{Context, Result};

/// `--stage adversary`.
pub struct AdversaryMimic {
    /// The operator of the hardness energy and of the loser's norm limit.
    pub op: Sobolev,
    /// `lambda_E`; 0 leaves the reference out entirely.
    pub hardness: f64,
    /// The synthesis' trust-region radius (for the hardness term).
    pub rho: f64,
}

impl<B: TrainingOps + 'static> StageStep<B> for AdversaryMimic {
    fn micro_step(&mut self, cx: &StepContext<B>, samples: &[Sample]) -> Result<MicroStep<B>> {
        let b = cx.b;
        let batch = encode_samples(b, cx.model, samples)?;
        let latent = batch.latent;
        let baseline = batch.baseline.as_ref().context("--stage adversary: the samples have no baseline")?;
        let (t, eps) = draw_noise(b, &cx.times, latent, cx.share, cx.run_seed, cx.draw)?;
        let winner = b.flow_target(&batch.x0, &eps, &t)?;
        let pass = cx.forward_train(cx.trained.trainable(), latent, &winner.x_t, &batch.cond, &t)?;
        let adversary = &pass.velocity;

        let mut metrics = Vec::new();
        let (loss, g_adversary) = if self.hardness == 0.0 {
            let mimic = b.amg_mimic_loss(adversary, &eps, baseline, None)?;
            metrics.push(("mimic", mimic.mimic.loss));
            (mimic.total, mimic.mimic.grad)
        } else {
            let loser = b.synthesize_loser(&self.op, &batch.x0, &eps, &t, adversary, self.rho)?;
            let loser_point = FlowTarget { x_t: loser.x_t, velocity: loser.velocity };
            let ((mimic, hardness, g_mimic), g_loser_x0) = reference_residual_grad(cx, latent, &loser_point, &batch.cond, &t, |r| {
                let hardness = Hardness { op: &self.op, weight: self.hardness, loser_residual: r };
                let m = b.amg_mimic_loss(adversary, &eps, baseline, Some(hardness))?;
                let h = m.hardness.context("the mimic loss dropped its hardness term")?;
                Ok(((m.mimic.loss, h.loss, m.mimic.grad), h.grad))
            })?;
            // x^l_0 = x^w_0 + limit(d), d = x^w_t - t A - x^w_0: dL/dA = -t limit'(d)^T dL/dx^l_0.
            let deviation = b.axpby(&[1.0], &b.clean_estimate(&winner.x_t, adversary, &t)?, &[-1.0], &batch.x0)?;
            let g_deviation = b.limit_sobolev_norm_backward(&self.op, &deviation, &g_loser_x0, self.rho)?;
            let minus_t: Vec<f32> = t.iter().map(|&t| -t).collect();
            let g = b.axpby(&[1.0], &g_mimic, &minus_t, &g_deviation)?;
            metrics.push(("mimic", mimic));
            metrics.push(("hardness", hardness));
            metrics.push(("adversary_deviation", mean(&loser.deviation_norm)));
            (mimic + hardness, g)
        };
        let grads = pass.backward(cx, &g_adversary)?;
        Ok(MicroStep { loss, grads: cx.trained.gradients(grads.model)?, metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sobolev::{Grid, DEFAULT_EXPONENT};
    use crate::backend::Backend;
    use crate::sampler::gaussian_noise;
    use crate::sr::resample::resize;
    use crate::train::params::{LoraParams, TensorSet};
    use crate::train::preference::tests::randomise;
    use crate::train::sft::loss_operator;
    use crate::train::sft::tests::{samples, tiny_sr_model, Fixture, B};

    /// The adversary's LoRA gradient, the hardness term's path through the synthesis and the
    /// reference included, against central differences of its loss along random directions in
    /// the adapter's parameters: with no loser limited (rho large) and with all limited.
    #[test]
    fn the_gradient_with_hardness_matches_differences_of_the_loss() {
        let mut model = tiny_sr_model(7);
        let mut set = LoraParams::init(&B, &model.flux, 2, 1, &Default::default()).unwrap();
        randomise(&mut set, 5, 0.5);
        let samples: Vec<Sample> = samples(2).into_iter().map(|s| Sample { baseline: Some(resize(&s.lq, 32, 32)), ..s }).collect();
        let op = || loss_operator(&model.config.autoencoder, Grid::new(12, 16, 16), DEFAULT_EXPONENT).unwrap();
        let ops = [op(), op()];
        let fixture = Fixture::new();
        for (rho, op) in [1e6, 1e-2].into_iter().zip(ops) {
            let mut stage = AdversaryMimic { op, hardness: 2.0, rho };
            // The loss, the logged values and the gradients at `values`.
            type At = (f64, Vec<(&'static str, f64)>, Vec<Vec<f32>>);
            let mut at = |values: &TensorSet| -> At {
                let params = LoraParams::new(&B, &mut model.flux, values).unwrap();
                let mut cx = fixture.context(&model, Some(&params));
                cx.run_seed = 3;
                cx.draw = 5;
                let step = stage.micro_step(&cx, &samples).unwrap();
                let grads = step.grads.iter().map(|g| B.download(g).unwrap().to_f32()).collect();
                (step.loss, step.metrics, grads)
            };
            let (loss, metrics, grads) = at(&set);
            let names = ["mimic", "hardness", "adversary_deviation"];
            assert_eq!(metrics.iter().map(|m| m.0).collect::<Vec<_>>(), names);
            assert!(metrics[1].1 > 0.0 && (loss - metrics[0].1 - metrics[1].1).abs() < 1e-12);
            let limited = metrics[2].1 > rho;
            assert_eq!(limited, rho < 1.0, "rho {rho}: deviation {}", metrics[2].1);
            for seed in 0..2 {
                let dir = gaussian_noise(set.count(), 40 + seed);
                let moved = |h: f64| {
                    let mut p = set.clone();
                    let mut k = 0;
                    for values in p.values.values_mut() {
                        let rms = (values.iter().map(|v| (v * v) as f64).sum::<f64>() / values.len() as f64).sqrt();
                        for v in values.iter_mut() {
                            *v = (*v as f64 + h * rms * dir[k] as f64) as f32;
                            k += 1;
                        }
                    }
                    p
                };
                let h = 0.02;
                let mut loss = |h: f64| at(&moved(h)).0;
                let numeric = (8.0 * (loss(h) - loss(-h)) - (loss(2.0 * h) - loss(-2.0 * h))) / (12.0 * h);
                // The same direction in units of each tensor's rms, dotted with the gradient.
                let unit = moved(1.0);
                let analytic: f64 = grads
                    .iter()
                    .zip(set.values.keys())
                    .map(|(g, name)| {
                        g.iter().zip(&unit.values[name]).zip(&set.values[name]).map(|((&g, &a), &b)| g as f64 * (a - b) as f64).sum::<f64>()
                    })
                    .sum();
                assert!((analytic - numeric).abs() <= 1e-2 * numeric.abs(), "rho {rho}, direction {seed}: {analytic} vs {numeric}");
            }
        }
    }
}
