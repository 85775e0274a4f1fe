//! The preference stages, `dpo` and `asdpo` (design.md section 7): S-DPO of the policy against
//! the frozen reference on (winner, loser) pairs that share the condition, the noise and the time.
//! The winner is the HQ latent; the stages differ only in where the loser comes from ([`Losers`]).
//!
//! Dual LoRA: the base has the SFT adapter merged, the policy is that base plus the trained
//! adapter (B zero-initialised), and the reference is the same model with the trained adapter
//! taken off for its forward (`Models::with(Variant::Reference, ..)`): one copy of the base
//! weights, and at the first step the policy equals the reference exactly (dE = 0, loss = ln 2).
//!
//! One micro-batch runs the policy's training forward on the 2P points `[x^w_t; x^l_t]`, the
//! reference's inference forward on the same points, [`sdpo_step`] on the four residual fields,
//! and one backward of the policy.

use super::batch::{draw_noise, encode_images, encode_samples, forward_train, step_seed, stream, velocity, Batch, Latent};
use super::config::Negatives;
use super::data::Sample;
use super::loss::{flow_target, sdpo_step, steepest_sobolev_deviation, synthesize_loser, FlowTarget, PairResiduals};
use super::params::{Models, Trainable, Variant};
use super::run::{MicroStep, StageStep, StepContext};
use super::sobolev::Sobolev;
use crate::backend::backward::BackwardOps;
use crate::sr::upscaler::UpscaleOptions;
use anyhow::{Context, Result};
use loaders::image::Image;

/// Where a stage's losers come from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Losers {
    /// dpo: fixed negatives; `steps` Euler steps for the reference's own restorations.
    Fixed { negatives: Negatives, steps: usize },
    /// asdpo: `x^l_0 = x^w_t - t A_phi(x^w_t)`, its deviation from the winner limited to
    /// Sobolev norm `rho` (`synthesize_loser`).
    Adversary { rho: f64 },
    /// asdpo `--closed-form`: Proposition 1's `x^l_0 = x^w_0 + delta*`, `||delta*||_H = rho`.
    ClosedForm { rho: f64 },
}

/// `--stage dpo` and `--stage asdpo`.
pub struct Preference {
    pub op: Sobolev,
    pub beta: f64,
    pub losers: Losers,
}

impl<B: BackwardOps + 'static> StageStep<B> for Preference {
    fn micro_step(&mut self, cx: &mut StepContext<B>, samples: &[Sample]) -> Result<MicroStep> {
        let (b, op) = (cx.b, &self.op);
        let batch = encode_samples(b, &cx.models.sr, samples)?;
        let latent = batch.latent;
        let (t, eps) = draw_noise(&cx.times, batch.items, batch.x0.len(), cx.run_seed, cx.draw);
        let winner = flow_target(&batch.x0, &eps, &t)?;
        let mut metrics = Vec::new();
        let loser_x0 = match self.losers {
            Losers::Fixed { negatives: Negatives::Triples, .. } => {
                batch.baseline.clone().context("--negatives triples: the samples have no baseline")?
            }
            Losers::Fixed { negatives: Negatives::Bicubic, .. } => cx.models.sr.config.flow.to_flow(&batch.cond, &batch.cond),
            Losers::Fixed { negatives: Negatives::Reference, steps } => {
                let seed = step_seed(cx.run_seed, cx.draw, stream::NEGATIVES);
                let restored = reference_restorations(b, cx.models, samples, steps, seed)?;
                let encoded = encode_images(b, &cx.models.sr, &restored.iter().collect::<Vec<_>>())?.0;
                cx.models.sr.config.flow.to_flow(&encoded, &batch.cond)
            }
            Losers::Adversary { rho } => {
                let adversary = cx.models.with(Variant::Adversary, |sr| velocity(b, sr, latent, &winner.x_t, &batch.cond, &t))?;
                let grid = |v: &[f32]| latent.to_grid(v);
                let loser = synthesize_loser(op, &grid(&batch.x0)?, &grid(&eps)?, &t, &grid(&adversary)?, rho)?;
                metrics.push(("adversary_deviation", mean(&loser.deviation_norm)));
                latent.to_tokens(&loser.x0)?
            }
            Losers::ClosedForm { rho } => {
                let (_, g) = reference_residual_grad(b, cx.models, latent, &winner, &batch.cond, &t, |r| Ok(((), op.energy_grad(r)?)))?;
                let delta = steepest_sobolev_deviation(op, &g, rho)?;
                let x0 = latent.to_grid(&batch.x0)?;
                latent.to_tokens(&x0.iter().zip(&delta).map(|(&x, &d)| x + d).collect::<Vec<_>>())?
            }
        };
        let deviation: Vec<f32> = loser_x0.iter().zip(&batch.x0).map(|(&l, &w)| l - w).collect();
        metrics.push(("loser_deviation", mean(&op.sobolev_norm(&latent.to_grid(&deviation)?)?)));
        let loser = flow_target(&loser_x0, &eps, &t)?;
        let mut step = sdpo_micro_step(b, cx.models, cx.trainable, op, self.beta, &batch, &t, &winner, &loser)?;
        step.metrics.extend(metrics);
        Ok(step)
    }
}

/// The mean of per-item values (for the log).
pub(super) fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The reference model's own `steps`-step restoration of each sample's LQ, at the HQ's size, the
/// i-th from noise seeded by `(seed, i)`.
fn reference_restorations<B: BackwardOps + 'static>(
    b: &B,
    models: &mut Models<B>,
    samples: &[Sample],
    steps: usize,
    seed: u64,
) -> Result<Vec<Image>> {
    models.with(Variant::Reference, |sr| {
        samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let opts =
                    UpscaleOptions { steps, seed: step_seed(seed, i as u64, 0), tile: s.hq.width.max(s.hq.height), batch: 1, average: 1 };
                sr.upscale(b, &s.lq, &opts, &mut |_, _| ())
            })
            .collect()
    })
}

/// A loss of the reference's residual `r = v_ref(x_t) - u` at the flow points `target` (a clean
/// latent x0 carried to t with eps), and its gradient wrt x0: `loss(r)` gives its value and
/// `dL/dr` on the latent grid, and since `r = v_ref((1 - t) x0 + t eps) - (eps - x0)`,
/// `dL/dx0 = (1 - t) J^T dL/dr + dL/dr`, J^T from the reference's backward (its input gradient).
/// Returns the value and `dL/dx0` on the latent grid.
#[allow(clippy::too_many_arguments)]
pub fn reference_residual_grad<B: BackwardOps + 'static, T>(
    b: &B,
    models: &mut Models<B>,
    latent: Latent,
    target: &FlowTarget,
    cond: &[f32],
    t: &[f32],
    loss: impl FnOnce(&[f32]) -> Result<(T, Vec<f32>)>,
) -> Result<(T, Vec<f32>)> {
    models.with(Variant::Reference, |sr| {
        let pass = forward_train(b, sr, latent, &target.x_t, cond, t)?;
        let residual: Vec<f32> = pass.velocity.iter().zip(&target.velocity).map(|(&v, &u)| v - u).collect();
        let (value, g_residual) = loss(&latent.to_grid(&residual)?)?;
        let grads = pass.backward(b, sr, &latent.to_tokens(&g_residual)?)?;
        let jt = latent.to_grid(&grads.x_t)?;
        let per_item = latent.grid().elements();
        let g = jt.iter().zip(&g_residual).enumerate().map(|(i, (&j, &r))| (1.0 - t[i / per_item]) * j + r).collect();
        Ok((value, g))
    })
}

/// One S-DPO micro-batch on given pairs: the objective and the policy's gradients. `winner` and
/// `loser` are the flow points of `batch`'s items at times `t` (packed).
#[allow(clippy::too_many_arguments)]
pub fn sdpo_micro_step<B: BackwardOps + 'static>(
    b: &B,
    models: &mut Models<B>,
    trainable: &dyn Trainable<B>,
    op: &Sobolev,
    beta: f64,
    batch: &Batch,
    t: &[f32],
    winner: &FlowTarget,
    loser: &FlowTarget,
) -> Result<MicroStep> {
    let latent = batch.latent;
    let x_t = [winner.x_t.as_slice(), &loser.x_t].concat();
    let u = [winner.velocity.as_slice(), &loser.velocity].concat();
    let cond = batch.cond.repeat(2);
    let times = [t, t].concat();
    let pass = forward_train(b, &models.sr, latent, &x_t, &cond, &times)?;
    let reference = models.with(Variant::Reference, |sr| velocity(b, sr, latent, &x_t, &cond, &times))?;
    let residual = |v: &[f32]| latent.to_grid(&v.iter().zip(&u).map(|(&v, &u)| v - u).collect::<Vec<_>>());
    let (policy, reference) = (residual(&pass.velocity)?, residual(&reference)?);
    let half = policy.len() / 2;
    let pairs = PairResiduals {
        policy_winner: &policy[..half],
        reference_winner: &reference[..half],
        policy_loser: &policy[half..],
        reference_loser: &reference[half..],
    };
    let sdpo = sdpo_step(op, &pairs, beta)?;
    let g = latent.to_tokens(&[sdpo.policy_winner_grad, sdpo.policy_loser_grad].concat())?;
    let grads = pass.backward(b, &models.sr, &g)?;
    Ok(MicroStep {
        loss: sdpo.objective.loss,
        grads: trainable.gradients(b, &grads.model)?,
        metrics: vec![("implicit_acc", sdpo.objective.accuracy), ("reward_margin", sdpo.objective.reward_margin)],
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::sampler::gaussian_noise;
    use crate::train::loss::DEFAULT_BETA;
    use crate::train::params::LoraParams;
    use crate::train::sft::loss_operator;
    use crate::train::sft::tests::{samples, tiny_sr_model, B};
    use crate::train::sobolev::DEFAULT_EXPONENT;

    /// Every factor ~ N(0, scale^2 / fan-in): the policy differs from the reference.
    pub(crate) fn randomise(params: &mut LoraParams, seed: u64, scale: f32) {
        let noise = gaussian_noise(params.tensors.count(), seed);
        let mut k = 0;
        for (name, values) in params.tensors.values.iter_mut() {
            let fan = params.tensors.shapes[name][1] as f32;
            for v in values.iter_mut() {
                *v = scale * noise[k] / fan.sqrt();
                k += 1;
            }
        }
    }

    /// `((1 - t) x0 + t eps, eps - x0)` per item, written out here.
    fn flow_point(x0: &[f32], eps: &[f32], t: &[f32]) -> FlowTarget {
        let per_item = x0.len() / t.len();
        FlowTarget {
            x_t: (0..x0.len()).map(|i| (1.0 - t[i / per_item]) * x0[i] + t[i / per_item] * eps[i]).collect(),
            velocity: (0..x0.len()).map(|i| eps[i] - x0[i]).collect(),
        }
    }

    /// Three pairs at set times, the policy a random adapter on the base, the loser the bicubic
    /// upsample; Diffusion-DPO from the velocities of the policy and of a separately built base.
    #[test]
    fn at_exponent_zero_the_dpo_loss_is_diffusion_dpo_from_plain_mses() {
        let mut models = Models::new(tiny_sr_model(5));
        let mut params = LoraParams::new(&mut models.sr.flux, 2, 1).unwrap();
        randomise(&mut params, 2, 0.3);
        Trainable::<CpuBackend>::install(&params, &B, &mut models.sr.flux).unwrap();
        let batch = encode_samples(&B, &models.sr, &samples(3)).unwrap();
        let latent = batch.latent;
        let t = [0.2f32, 0.55, 0.9];
        let eps = gaussian_noise(batch.x0.len(), 4);
        let (winner, loser) = (flow_point(&batch.x0, &eps, &t), flow_point(&batch.cond, &eps, &t));
        let beta = 500.0;

        let points = [winner.x_t.as_slice(), &loser.x_t].concat();
        let (cond, times) = (batch.cond.repeat(2), [t, t].concat());
        let policy = velocity(&B, &models.sr, latent, &points, &cond, &times).unwrap();
        let reference = velocity(&B, &tiny_sr_model(5), latent, &points, &cond, &times).unwrap();
        let targets = [winner.velocity.as_slice(), &loser.velocity].concat();
        let per_item = batch.x0.len() / 3;
        // The mean squared error of item i of the 2P points (winners first).
        let mse = |v: &[f32], i: usize| -> f64 {
            let range = i * per_item..(i + 1) * per_item;
            v[range.clone()].iter().zip(&targets[range]).map(|(&v, &u)| ((v - u) as f64).powi(2)).sum::<f64>() / per_item as f64
        };
        let mut want = 0.0;
        for i in 0..3 {
            let winner_term = mse(&policy, i) - mse(&reference, i);
            let loser_term = mse(&policy, 3 + i) - mse(&reference, 3 + i);
            let inside = -0.5 * beta * (winner_term - loser_term);
            want += -(1.0 / (1.0 + (-inside).exp())).ln() / 3.0;
        }

        let op = loss_operator(&models.sr.config.autoencoder, latent.grid(), 0.0).unwrap();
        let got = sdpo_micro_step(&B, &mut models, &params, &op, beta, &batch, &t, &winner, &loser).unwrap();
        assert!((got.loss - want).abs() <= 1e-9 * want, "S-DPO at s = 0: {} vs Diffusion-DPO {want}", got.loss);
        assert!((want - std::f64::consts::LN_2).abs() > 1e-3, "the policy differs from the reference: {want}");
        // The adapters are back in place after the reference's pass.
        assert_eq!(velocity(&B, &models.sr, latent, &points, &cond, &times).unwrap(), policy);

        // At s = 1.5 the energies weigh frequencies: a different loss.
        let sobolev = loss_operator(&models.sr.config.autoencoder, latent.grid(), DEFAULT_EXPONENT).unwrap();
        let other = sdpo_micro_step(&B, &mut models, &params, &sobolev, DEFAULT_BETA, &batch, &t, &winner, &loser).unwrap();
        assert!((other.loss - got.loss).abs() > 1e-6);
    }

    /// `reference_residual_grad`'s gradient wrt the clean latent against central differences of
    /// the reference's mean residual energy along random directions.
    #[test]
    fn the_reference_energy_gradient_wrt_the_clean_latent_matches_differences() {
        let mut models = Models::new(tiny_sr_model(6));
        let mut params = LoraParams::new(&mut models.sr.flux, 2, 1).unwrap();
        // The trained adapter must not leak into the reference.
        randomise(&mut params, 3, 1.0);
        Trainable::<CpuBackend>::install(&params, &B, &mut models.sr.flux).unwrap();
        let batch = encode_samples(&B, &models.sr, &samples(2)).unwrap();
        let latent = batch.latent;
        let t = [0.3f32, 0.75];
        let eps = gaussian_noise(batch.x0.len(), 8);
        let op = loss_operator(&models.sr.config.autoencoder, latent.grid(), DEFAULT_EXPONENT).unwrap();
        let energy = |r: &[f32]| -> Result<(f64, Vec<f32>)> {
            let e = op.energy(r)?;
            let mut g = op.energy_grad(r)?;
            g.iter_mut().for_each(|v| *v /= 2.0);
            Ok((e.iter().sum::<f64>() / 2.0, g))
        };
        let base = tiny_sr_model(6);
        let at = |x0: &[f32]| -> f64 {
            let p = flow_point(x0, &eps, &t);
            let v = velocity(&B, &base, latent, &p.x_t, &batch.cond, &t).unwrap();
            let r: Vec<f32> = v.iter().zip(&p.velocity).map(|(&v, &u)| v - u).collect();
            energy(&latent.to_grid(&r).unwrap()).unwrap().0
        };
        let (value, grad) =
            reference_residual_grad(&B, &mut models, latent, &flow_point(&batch.x0, &eps, &t), &batch.cond, &t, energy).unwrap();
        assert_eq!(value, at(&batch.x0));
        let x0 = latent.to_grid(&batch.x0).unwrap();
        for seed in 0..3 {
            let dir = gaussian_noise(x0.len(), 100 + seed);
            let moved = |h: f64| {
                at(&latent.to_tokens(&x0.iter().zip(&dir).map(|(&x, &d)| (x as f64 + h * d as f64) as f32).collect::<Vec<_>>()).unwrap())
            };
            let h = 0.02;
            let numeric = (8.0 * (moved(h) - moved(-h)) - (moved(2.0 * h) - moved(-2.0 * h))) / (12.0 * h);
            let analytic: f64 = grad.iter().zip(&dir).map(|(&g, &d)| g as f64 * d as f64).sum();
            assert!((analytic - numeric).abs() <= 1e-2 * numeric.abs(), "direction {seed}: {analytic} vs {numeric}");
        }
    }
}
