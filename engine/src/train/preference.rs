//! The preference stages, `dpo` and `asdpo` (design.md section 7): S-DPO of the policy against
//! the frozen reference on (winner, loser) pairs that share the condition, the noise and the time.
//! The winner is the HQ latent; the stages differ only in where the loser comes from ([`Losers`]).
//!
//! Dual LoRA: the base has the SFT adapter merged, the policy is that base plus the trained
//! adapter (B zero-initialised), and the reference is the same model without it
//! (`Trainable::Nothing`): one copy of the base weights, and at the first step the policy equals
//! the reference exactly (dE = 0, loss = ln 2).
//!
//! One micro-batch runs the policy's training forward on the 2P points `[x^w_t; x^l_t]`, the
//! reference's inference forward on the same points, the fused S-DPO step on the four residual
//! fields, and one backward of the policy, all on the device.

use super::batch::{draw_noise, encode_samples, item_noise, step_seed, stream, Batch, Latent};
use super::config::Negatives;
use super::data::Sample;
use super::stage::{MicroStep, StageStep, StepContext};
use crate::backend::losses::{FlowTarget, PairResiduals};
use crate::backend::sobolev::Sobolev;
use crate::backend::training::TrainingOps;
use crate::model::Trainable;
use crate::sampler::schedule;
use crate::tensor::Tensor;
use anyhow::{Context, Result};
use loaders::HostTensor;

/// Where a stage's losers come from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Losers {
    /// dpo: fixed negatives; `steps` Euler steps for the reference's own restorations.
    Fixed { negatives: Negatives, steps: usize },
    /// asdpo: `x^l_0 = x^w_t - t A_phi(x^w_t)`, its deviation from the winner limited to
    /// Sobolev norm `rho` (`TrainingOps::synthesize_loser`).
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

impl<B: TrainingOps + 'static> StageStep<B> for Preference {
    fn micro_step(&mut self, cx: &StepContext<B>, samples: &[Sample]) -> Result<MicroStep<B>> {
        let (b, op) = (cx.b, &self.op);
        let batch = encode_samples(b, cx.model, samples)?;
        let latent = batch.latent;
        let (t, eps) = draw_noise(b, &cx.times, latent, cx.share, cx.run_seed, cx.draw)?;
        let winner = b.flow_target(&batch.x0, &eps, &t)?;
        let mut metrics = Vec::new();
        let made: Tensor<B>;
        let loser_x0 = match self.losers {
            Losers::Fixed { negatives: Negatives::Triples, .. } => {
                batch.baseline.as_ref().context("--negatives triples: the samples have no baseline")?
            }
            Losers::Fixed { negatives: Negatives::Bicubic, .. } => &batch.cond_flow,
            Losers::Fixed { negatives: Negatives::Reference, steps } => {
                made = reference_samples(cx, &batch, steps, step_seed(cx.run_seed, cx.draw, stream::NEGATIVES))?;
                &made
            }
            Losers::Adversary { rho } => {
                let adversary = cx.adversary.context("asdpo: this run has no adversary")?;
                let velocity = cx.velocity(Trainable::Lora(adversary), latent, &winner.x_t, &batch.cond, &t)?;
                let loser = b.synthesize_loser(op, &batch.x0, &eps, &t, &velocity, rho)?;
                metrics.push(("adversary_deviation", mean(&loser.deviation_norm)));
                made = loser.x0;
                &made
            }
            Losers::ClosedForm { rho } => {
                let (_, g) = reference_residual_grad(cx, latent, &winner, &batch.cond, &t, |r| Ok(((), b.sobolev_energy_grad(op, r)?.1)))?;
                made = b.axpby(&[1.0], &batch.x0, &[1.0], &b.steepest_sobolev_deviation(op, &g, rho)?)?;
                &made
            }
        };
        let deviation = b.axpby(&[1.0], loser_x0, &[-1.0], &batch.x0)?;
        metrics.push(("loser_deviation", mean(&b.sobolev_energy(op, &deviation)?.into_iter().map(f64::sqrt).collect::<Vec<_>>())));
        let loser = b.flow_target(loser_x0, &eps, &t)?;
        let mut step = sdpo_micro_step(cx, op, self.beta, &batch, &t, &winner, &loser)?;
        step.metrics.extend(metrics);
        Ok(step)
    }
}

/// The mean of per-item values (for the log).
pub(super) fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// `--negatives reference`: the reference model's own `steps`-step sample of each item's flow
/// data, integrated on the device from noise seeded by `(seed, i)` for item i.
fn reference_samples<B: TrainingOps + 'static>(cx: &StepContext<B>, batch: &Batch<B>, steps: usize, seed: u64) -> Result<Tensor<B>> {
    let (b, latent, items) = (cx.b, batch.latent, batch.items());
    let mut x = b.upload(&HostTensor::from_f32(latent.shape(items), item_noise(latent, cx.share, seed)))?;
    for pair in schedule(steps, latent.tokens()).windows(2) {
        let v = cx.velocity(Trainable::Nothing, latent, &x, &batch.cond, &vec![pair[0]; items])?;
        x = b.axpby(&[1.0], &x, &[pair[1] - pair[0]], &v)?;
    }
    Ok(x)
}

/// A loss of the reference's residual `r = v_ref(x_t) - u` at the flow points `target` (a clean
/// latent x0 carried to t with eps), and its gradient wrt x0: `loss(r)` gives its value and
/// `dL/dr`, and since `r = v_ref((1 - t) x0 + t eps) - (eps - x0)`,
/// `dL/dx0 = (1 - t) J^T dL/dr + dL/dr`, J^T from the reference's backward (its input gradient).
/// Returns the value and `dL/dx0` on the latent grid.
pub fn reference_residual_grad<B: TrainingOps + 'static, T>(
    cx: &StepContext<B>,
    latent: Latent,
    target: &FlowTarget<Tensor<B>>,
    cond: &Tensor<B>,
    t: &[f32],
    loss: impl FnOnce(&Tensor<B>) -> Result<(T, Tensor<B>)>,
) -> Result<(T, Tensor<B>)> {
    let b = cx.b;
    let pass = cx.forward_train(Trainable::Nothing, latent, &target.x_t, cond, t)?;
    let residual = b.axpby(&[1.0], &pass.velocity, &[-1.0], &target.velocity)?;
    let (value, g_residual) = loss(&residual)?;
    let grads = pass.backward(cx, &g_residual)?;
    let one_minus_t: Vec<f32> = t.iter().map(|&t| 1.0 - t).collect();
    Ok((value, b.axpby(&one_minus_t, &grads.x_t, &[1.0], &g_residual)?))
}

/// One S-DPO micro-batch on given pairs: the objective and the policy's gradients. `winner` and
/// `loser` are the flow points of `batch`'s items at times `t`.
pub fn sdpo_micro_step<B: TrainingOps + 'static>(
    cx: &StepContext<B>,
    op: &Sobolev,
    beta: f64,
    batch: &Batch<B>,
    t: &[f32],
    winner: &FlowTarget<Tensor<B>>,
    loser: &FlowTarget<Tensor<B>>,
) -> Result<MicroStep<B>> {
    let (b, latent, items) = (cx.b, batch.latent, batch.items());
    let x_t = b.concat(&[&winner.x_t, &loser.x_t], 0)?;
    let u = b.concat(&[&winner.velocity, &loser.velocity], 0)?;
    let cond = b.concat(&[&batch.cond, &batch.cond], 0)?;
    let times = [t, t].concat();
    let pass = cx.forward_train(cx.trained.trainable(), latent, &x_t, &cond, &times)?;
    let reference = cx.velocity(Trainable::Nothing, latent, &x_t, &cond, &times)?;
    let residual = |v: &Tensor<B>| b.axpby(&[1.0], v, &[-1.0], &u);
    let (policy, reference) = (residual(&pass.velocity)?, residual(&reference)?);
    let half = |r: &Tensor<B>, start: usize| b.narrow(r, 0, start, items);
    let (pw, pl, rw, rl) = (half(&policy, 0)?, half(&policy, items)?, half(&reference, 0)?, half(&reference, items)?);
    let pairs = PairResiduals { policy_winner: &pw, reference_winner: &rw, policy_loser: &pl, reference_loser: &rl };
    let sdpo = b.sdpo_step(op, &pairs, beta)?;
    let g = b.concat(&[&sdpo.policy_winner_grad, &sdpo.policy_loser_grad], 0)?;
    let grads = pass.backward(cx, &g)?;
    Ok(MicroStep {
        loss: sdpo.objective.loss,
        grads: cx.trained.gradients(grads.model)?,
        metrics: vec![("implicit_acc", sdpo.objective.accuracy), ("reward_margin", sdpo.objective.reward_margin)],
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::losses::DEFAULT_BETA;
    use crate::backend::sobolev::DEFAULT_EXPONENT;
    use crate::backend::Backend;
    use crate::sampler::gaussian_noise;
    use crate::train::params::{LoraParams, TensorSet, Trained};
    use crate::train::sft::loss_operator;
    use crate::train::sft::tests::{samples, tiny_sr_model, Fixture, B};

    /// Every factor ~ N(0, scale^2 / fan-in): the policy differs from the reference.
    pub(crate) fn randomise(set: &mut TensorSet, seed: u64, scale: f32) {
        let noise = gaussian_noise(set.count(), seed);
        let mut k = 0;
        for (name, values) in set.values.iter_mut() {
            let fan = set.shapes[name][1] as f32;
            for v in values.iter_mut() {
                *v = scale * noise[k] / fan.sqrt();
                k += 1;
            }
        }
    }

    fn values(t: &Tensor<CpuBackend>) -> Vec<f32> {
        B.download(t).unwrap().to_f32()
    }

    fn field(values: Vec<f32>, like: &Tensor<CpuBackend>) -> Tensor<CpuBackend> {
        B.upload(&HostTensor::from_f32(like.shape().to_vec(), values)).unwrap()
    }

    /// `((1 - t) x0 + t eps, eps - x0)` per item, written out here.
    fn flow_point(x0: &[f32], eps: &[f32], t: &[f32], like: &Tensor<CpuBackend>) -> FlowTarget<Tensor<CpuBackend>> {
        let per_item = x0.len() / t.len();
        FlowTarget {
            x_t: field((0..x0.len()).map(|i| (1.0 - t[i / per_item]) * x0[i] + t[i / per_item] * eps[i]).collect(), like),
            velocity: field((0..x0.len()).map(|i| eps[i] - x0[i]).collect(), like),
        }
    }

    /// Three pairs at set times, the policy a random adapter on the base, the loser the bicubic
    /// upsample; Diffusion-DPO from the velocities of the policy and of a separately built base.
    #[test]
    fn at_exponent_zero_the_dpo_loss_is_diffusion_dpo_from_plain_mses() {
        let mut model = tiny_sr_model(5);
        let mut set = LoraParams::init(&B, &model.flux, 2, 1, &Default::default()).unwrap();
        randomise(&mut set, 2, 0.3);
        let params = LoraParams::new(&B, &mut model.flux, &set).unwrap();
        let batch = encode_samples(&B, &model, &samples(3)).unwrap();
        let latent = batch.latent;
        let t = [0.2f32, 0.55, 0.9];
        let (x0, cond) = (values(&batch.x0), values(&batch.cond_flow));
        let eps = gaussian_noise(x0.len(), 4);
        let (winner, loser) = (flow_point(&x0, &eps, &t, &batch.x0), flow_point(&cond, &eps, &t, &batch.x0));
        let beta = 500.0;

        let fixture = Fixture::new();
        let cx = fixture.context(&model, Some(&params));
        let points = B.concat(&[&winner.x_t, &loser.x_t], 0).unwrap();
        let cond2 = B.concat(&[&batch.cond, &batch.cond], 0).unwrap();
        let times = [t, t].concat();
        let policy = values(&cx.velocity(params.trainable(), latent, &points, &cond2, &times).unwrap());
        let base = tiny_sr_model(5);
        let reference = values(&fixture.context(&base, None).velocity(Trainable::Nothing, latent, &points, &cond2, &times).unwrap());
        let targets = [values(&winner.velocity), values(&loser.velocity)].concat();
        let per_item = x0.len() / 3;
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

        let op = loss_operator(&model.config.autoencoder, latent.grid(), 0.0).unwrap();
        let got = sdpo_micro_step(&cx, &op, beta, &batch, &t, &winner, &loser).unwrap();
        assert!((got.loss - want).abs() <= 1e-9 * want, "S-DPO at s = 0: {} vs Diffusion-DPO {want}", got.loss);
        assert!((want - std::f64::consts::LN_2).abs() > 1e-3, "the policy differs from the reference: {want}");

        // At s = 1.5 the energies weigh frequencies: a different loss.
        let sobolev = loss_operator(&model.config.autoencoder, latent.grid(), DEFAULT_EXPONENT).unwrap();
        let other = sdpo_micro_step(&cx, &sobolev, DEFAULT_BETA, &batch, &t, &winner, &loser).unwrap();
        assert!((other.loss - got.loss).abs() > 1e-6);
    }

    /// `reference_residual_grad`'s gradient wrt the clean latent against central differences of
    /// the reference's mean residual energy along random directions.
    #[test]
    fn the_reference_energy_gradient_wrt_the_clean_latent_matches_differences() {
        let mut model = tiny_sr_model(6);
        let mut set = LoraParams::init(&B, &model.flux, 2, 1, &Default::default()).unwrap();
        // The trained adapter must not leak into the reference.
        randomise(&mut set, 3, 1.0);
        let params = LoraParams::new(&B, &mut model.flux, &set).unwrap();
        let batch = encode_samples(&B, &model, &samples(2)).unwrap();
        let latent = batch.latent;
        let t = [0.3f32, 0.75];
        let x0 = values(&batch.x0);
        let eps = gaussian_noise(x0.len(), 8);
        let op = loss_operator(&model.config.autoencoder, latent.grid(), DEFAULT_EXPONENT).unwrap();
        let energy = |r: &Tensor<CpuBackend>| -> Result<(f64, Tensor<CpuBackend>)> {
            let (e, g) = B.sobolev_energy_grad(&op, r)?;
            Ok((e.iter().sum::<f64>() / 2.0, B.scale_items(&[0.5], &g)?))
        };
        let base = tiny_sr_model(6);
        let fixture = Fixture::new();
        let at = |x0: &[f32]| -> f64 {
            let p = flow_point(x0, &eps, &t, &batch.x0);
            let cx = fixture.context(&base, None);
            let v = cx.velocity(Trainable::Nothing, latent, &p.x_t, &batch.cond, &t).unwrap();
            energy(&B.axpby(&[1.0], &v, &[-1.0], &p.velocity).unwrap()).unwrap().0
        };
        let cx = fixture.context(&model, Some(&params));
        let (value, grad) = reference_residual_grad(&cx, latent, &flow_point(&x0, &eps, &t, &batch.x0), &batch.cond, &t, energy).unwrap();
        assert_eq!(value, at(&x0));
        let grad = values(&grad);
        for seed in 0..3 {
            let dir = gaussian_noise(x0.len(), 100 + seed);
            let moved = |h: f64| at(&x0.iter().zip(&dir).map(|(&x, &d)| (x as f64 + h * d as f64) as f32).collect::<Vec<_>>());
            let h = 0.02;
            let numeric = (8.0 * (moved(h) - moved(-h)) - (moved(2.0 * h) - moved(-2.0 * h))) / (12.0 * h);
            let analytic: f64 = grad.iter().zip(&dir).map(|(&g, &d)| g as f64 * d as f64).sum();
            assert!((analytic - numeric).abs() <= 1e-2 * numeric.abs(), "direction {seed}: {analytic} vs {numeric}");
        }
    }
}
