//! The `adversary` stage (design.md section 7, AMG "mimic"): trains A_phi = base + SFT LoRA +
//! its own LoRA to predict, at the HQ's flow point `x^w_t`, the velocity that leads to a
//! baseline's output for the same LQ: `|| A_phi(x^w_t, t, c) - (eps - x^b_0) ||^2`.
//!
//! The optional hardness term `lambda_E E(v_ref(x^l_t) - u^l)` rewards negatives that the
//! reference finds easy. The adversary reaches it through the AS-DPO synthesis
//! (`x^l_0 = x^w_0 + limit_rho(x^w_t - t A - x^w_0)`, re-projected with the same noise) and the
//! frozen reference, so its gradient is carried back exactly that way: through the reference's
//! backward ([`reference_residual_grad`]), the norm limit ([`limit_sobolev_norm_backward`]) and
//! `d x^l_0 / d A = -t`.

use super::batch::{draw_noise, encode_samples, forward_train};
use super::data::Sample;
use super::loss::{amg_mimic_loss, clean_estimate, flow_target, limit_sobolev_norm_backward, synthesize_loser, FlowTarget, Hardness};
use super::preference::{mean, reference_residual_grad};
use super::run::{MicroStep, StageStep, StepContext};
use super::sobolev::Sobolev;
use crate::backend::backward::BackwardOps;
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

impl<B: BackwardOps + 'static> StageStep<B> for AdversaryMimic {
    fn micro_step(&mut self, cx: &mut StepContext<B>, samples: &[Sample]) -> Result<MicroStep> {
        let b = cx.b;
        let batch = encode_samples(b, &cx.models.sr, samples)?;
        let latent = batch.latent;
        let baseline = batch.baseline.as_ref().context("--stage adversary: the samples have no baseline")?;
        let (t, eps) = draw_noise(&cx.times, batch.items, batch.x0.len(), cx.run_seed, cx.draw);
        let winner = flow_target(&batch.x0, &eps, &t)?;
        let pass = forward_train(b, &cx.models.sr, latent, &winner.x_t, &batch.cond, &t)?;
        let grid = |v: &[f32]| latent.to_grid(v);
        let (adversary, eps_grid, baseline) = (grid(&pass.velocity)?, grid(&eps)?, grid(baseline)?);

        let mut metrics = Vec::new();
        let (loss, g_adversary) = if self.hardness == 0.0 {
            let mimic = amg_mimic_loss(&adversary, &eps_grid, &baseline, None)?;
            metrics.push(("mimic", mimic.mimic.loss));
            (mimic.total, mimic.mimic.grad)
        } else {
            let (x0, x_t) = (grid(&batch.x0)?, grid(&winner.x_t)?);
            let loser = synthesize_loser(&self.op, &x0, &eps_grid, &t, &adversary, self.rho)?;
            let loser_tokens = FlowTarget { x_t: latent.to_tokens(&loser.x_t)?, velocity: latent.to_tokens(&loser.velocity)? };
            let (mimic, g_loser_x0) = reference_residual_grad(b, cx.models, latent, &loser_tokens, &batch.cond, &t, |r| {
                let hardness = Hardness { op: &self.op, weight: self.hardness, loser_residual: r };
                let mimic = amg_mimic_loss(&adversary, &eps_grid, &baseline, Some(hardness))?;
                let g = mimic.hardness.as_ref().map(|h| h.grad.clone()).unwrap_or_default();
                Ok((mimic, g))
            })?;
            // x^l_0 = x^w_0 + limit(d), d = x^w_t - t A - x^w_0: dL/dA = -t limit'(d)^T dL/dx^l_0.
            let deviation: Vec<f32> = clean_estimate(&x_t, &adversary, &t)?.iter().zip(&x0).map(|(&l, &w)| l - w).collect();
            let g_deviation = limit_sobolev_norm_backward(&self.op, &deviation, &g_loser_x0, self.rho)?;
            let per_item = latent.grid().elements();
            let g: Vec<f32> = mimic.mimic.grad.iter().zip(&g_deviation).enumerate().map(|(i, (&m, &d))| m - t[i / per_item] * d).collect();
            metrics.push(("mimic", mimic.mimic.loss));
            metrics.push(("hardness", mimic.hardness.as_ref().map_or(0.0, |h| h.loss)));
            metrics.push(("adversary_deviation", mean(&loser.deviation_norm)));
            (mimic.total, g)
        };
        let grads = pass.backward(b, &cx.models.sr, &latent.to_tokens(&g_adversary)?)?;
        Ok(MicroStep { loss, grads: cx.trainable.gradients(b, &grads.model)?, metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::sampler::gaussian_noise;
    use crate::sr::resample::resize;
    use crate::train::loss::LogitNormal;
    use crate::train::params::{LoraParams, Models, Trainable};
    use crate::train::preference::tests::randomise;
    use crate::train::sft::loss_operator;
    use crate::train::sft::tests::{samples, tiny_sr_model, B};
    use crate::train::sobolev::DEFAULT_EXPONENT;

    /// The adversary's LoRA gradient, the hardness term's path through the synthesis and the
    /// reference included, against central differences of its loss along random directions in
    /// the adapter's parameters: with no loser limited (rho large) and with all limited.
    #[test]
    fn the_gradient_with_hardness_matches_differences_of_the_loss() {
        let mut models = Models::new(tiny_sr_model(7));
        let mut params = LoraParams::new(&mut models.sr.flux, 2, 1).unwrap();
        randomise(&mut params, 5, 0.5);
        let samples: Vec<Sample> = samples(2).into_iter().map(|s| Sample { baseline: Some(resize(&s.lq, 32, 32)), ..s }).collect();
        let op = |_| loss_operator(&models.sr.config.autoencoder, crate::train::sobolev::Grid::new(12, 16, 16), DEFAULT_EXPONENT).unwrap();
        let ops = [op(()), op(())];
        for (rho, op) in [1e6, 1e-2].into_iter().zip(ops) {
            let mut stage = AdversaryMimic { op, hardness: 2.0, rho };
            let mut at = |values: &LoraParams| -> MicroStep {
                Trainable::<CpuBackend>::install(values, &B, &mut models.sr.flux).unwrap();
                let mut cx =
                    StepContext { b: &B, models: &mut models, trainable: values, run_seed: 3, draw: 5, times: LogitNormal::default() };
                stage.micro_step(&mut cx, &samples).unwrap()
            };
            let step = at(&params);
            let names = ["mimic", "hardness", "adversary_deviation"];
            assert_eq!(step.metrics.iter().map(|m| m.0).collect::<Vec<_>>(), names);
            assert!(step.metrics[1].1 > 0.0 && (step.loss - step.metrics[0].1 - step.metrics[1].1).abs() < 1e-12);
            let limited = step.metrics[2].1 > rho;
            assert_eq!(limited, rho < 1.0, "rho {rho}: deviation {}", step.metrics[2].1);
            for seed in 0..2 {
                let dir = gaussian_noise(params.tensors.count(), 40 + seed);
                let moved = |h: f64| {
                    let mut p = params.clone();
                    let mut k = 0;
                    for values in p.tensors.values.values_mut() {
                        let rms = (values.iter().map(|v| (v * v) as f64).sum::<f64>() / values.len() as f64).sqrt();
                        for v in values.iter_mut() {
                            *v = (*v as f64 + h * rms * dir[k] as f64) as f32;
                            k += 1;
                        }
                    }
                    p
                };
                let h = 0.02;
                let mut loss = |h: f64| at(&moved(h)).loss;
                let numeric = (8.0 * (loss(h) - loss(-h)) - (loss(2.0 * h) - loss(-2.0 * h))) / (12.0 * h);
                // The same direction in units of each tensor's rms, dotted with the gradient.
                let unit = moved(1.0);
                let analytic: f64 = step
                    .grads
                    .iter()
                    .map(|(name, g)| {
                        g.iter()
                            .zip(&unit.tensors.values[name])
                            .zip(&params.tensors.values[name])
                            .map(|((&g, &a), &b)| g as f64 * (a - b) as f64)
                            .sum::<f64>()
                    })
                    .sum();
                assert!((analytic - numeric).abs() <= 1e-2 * numeric.abs(), "rho {rho}, direction {seed}: {analytic} vs {numeric}");
            }
        }
    }
}
