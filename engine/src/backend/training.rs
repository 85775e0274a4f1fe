//! The training math as backend ops, beside the model's backward ops (`backward.rs`): the flow
//! matching targets, the SFT loss, the Sobolev operator's energies and filters, S-DPO, the AMG
//! adversary's losses and the AS-DPO loser synthesis, and AdamW over device-resident master
//! weights and moments. With these a training step moves nothing between host and device but
//! the batch (images, t and the noise) and a few scalars per item (energies, the logged values).
//!
//! Conventions:
//! - Fields are f32 tensors `[B, C, H, W]` on a Sobolev operator's field grid (B items, or B
//!   preference pairs): the training math runs in f32 whatever the activation dtype, with
//!   energies and their derivatives in f64 (S-DPO multiplies energy differences by beta = 2000).
//!   `cast` moves between them and the model's activations.
//! - `t`, and every per-item coefficient, is a host slice with one value per item (the first
//!   dimension); a coefficient slice of length 1 applies to every item. They are a handful of
//!   scalars: a device backend uploads them with the call.
//! - Values that come back to the host (energies, norms, the S-DPO objective) are per item or
//!   per batch, never per element.
//!
//! The host functions of `losses`, `sobolev` and `adamw` are the CPU backend's implementation
//! and the reference of every other. The ops a device runs as fused kernels are required; the
//! rest have default bodies composed from the required ones (`axpby`, `dot_items`, the Sobolev
//! filters and energies), which a device backend inherits and the self-test checks against the
//! host functions on any backend, the CPU included (through a backend that keeps the defaults).

use super::adamw::AdamWConfig;
use super::backward::BackwardOps;
use super::losses::{FlowTarget, Hardness, LossGrad, MimicLoss, PairResiduals, SdpoStep, SynthesizedLoser};
use super::sobolev::{Filter, Sobolev};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

/// One parameter tensor of an AdamW step: its f32 master copy, its moments and its gradient, all
/// f32 and of one shape. `name` is for error messages.
pub struct AdamWTensor<'a, B: BackwardOps> {
    pub name: &'a str,
    pub param: &'a mut Tensor<B>,
    pub m: &'a mut Tensor<B>,
    pub v: &'a mut Tensor<B>,
    pub grad: &'a Tensor<B>,
}

pub trait TrainingOps: BackwardOps {
    /// Per item i (the first dimension): `out[i] = a[i] x[i] + b[i] y[i]`, for f32 fields of one
    /// shape. Each coefficient slice holds one value per item or one for all.
    fn axpby(&self, a: &[f32], x: &Tensor<Self>, b: &[f32], y: &Tensor<Self>) -> Result<Tensor<Self>>;

    /// Per item i: `sum x[i] y[i]` over its elements, accumulated in f64; f32 fields of one shape.
    fn dot_items(&self, x: &Tensor<Self>, y: &Tensor<Self>) -> Result<Vec<f64>>;

    /// `op.apply(r, filter)`: `IDCT(w . DCT(r))` with the spectral weights of `filter`.
    fn sobolev_filter(&self, op: &Sobolev, r: &Tensor<Self>, filter: Filter) -> Result<Tensor<Self>>;

    /// `op.energy(r)`: each field's Sobolev energy.
    fn sobolev_energy(&self, op: &Sobolev, r: &Tensor<Self>) -> Result<Vec<f64>>;

    /// `op.energy(r)` and `op.energy_grad(r)` together.
    fn sobolev_energy_grad(&self, op: &Sobolev, r: &Tensor<Self>) -> Result<(Vec<f64>, Tensor<Self>)>;

    /// `losses::sdpo_step`: the four energies of each pair, the objective and the gradients wrt
    /// the policy's residuals.
    fn sdpo_step(&self, op: &Sobolev, residuals: &PairResiduals<Tensor<Self>>, beta: f64) -> Result<SdpoStep<Tensor<Self>>>;

    /// One AdamW step of every tensor (`adamw::update`, clipping on the global norm over all of
    /// them) at step `k` (counted from 1) and learning rate `lr`; moments start at zero. Returns
    /// the global gradient norm before clipping; a norm that is not finite is an error and
    /// leaves the tensors as they were.
    fn adamw_step(&self, config: &AdamWConfig, k: u64, lr: f64, tensors: &mut [AdamWTensor<'_, Self>]) -> Result<f64>;

    /// `x[i]` scaled by `a[i]`.
    fn scale_items(&self, a: &[f32], x: &Tensor<Self>) -> Result<Tensor<Self>> {
        self.axpby(a, x, &[0.0], x)
    }

    /// `losses::flow_target`: `x_t = (1 - t) x0 + t eps` and `u = eps - x0`.
    fn flow_target(&self, x0: &Tensor<Self>, eps: &Tensor<Self>, t: &[f32]) -> Result<FlowTarget<Tensor<Self>>> {
        let one_minus_t: Vec<f32> = t.iter().map(|&t| 1.0 - t).collect();
        Ok(FlowTarget { x_t: self.axpby(&one_minus_t, x0, t, eps)?, velocity: self.axpby(&[1.0], eps, &[-1.0], x0)? })
    }

    /// `losses::clean_estimate`: `x0_hat = x_t - t v`.
    fn clean_estimate(&self, x_t: &Tensor<Self>, v: &Tensor<Self>, t: &[f32]) -> Result<Tensor<Self>> {
        self.axpby(&[1.0], x_t, &negated(t), v)
    }

    /// `losses::sft_loss`: `mean_b E(v_b - u_b)` and its gradient wrt v.
    fn sft_loss(&self, op: &Sobolev, v: &Tensor<Self>, u: &Tensor<Self>) -> Result<LossGrad<Tensor<Self>>> {
        let residual = self.axpby(&[1.0], v, &[-1.0], u)?;
        mean_energy(self, op, &residual, 1.0)
    }

    /// `losses::amg_mimic_loss`: `mean((A - (eps - x^b_0))^2)` and its gradient wrt A, plus the
    /// optional hardness term and its gradient wrt the loser residual.
    fn amg_mimic_loss(
        &self,
        adversary: &Tensor<Self>,
        eps: &Tensor<Self>,
        baseline_x0: &Tensor<Self>,
        hardness: Option<Hardness<Tensor<Self>>>,
    ) -> Result<MimicLoss<Tensor<Self>>> {
        let target = self.axpby(&[1.0], eps, &[-1.0], baseline_x0)?;
        let errors = self.axpby(&[1.0], adversary, &[-1.0], &target)?;
        let count = errors.elem_count() as f64;
        let mimic = LossGrad {
            loss: self.dot_items(&errors, &errors)?.iter().sum::<f64>() / count,
            grad: self.scale_items(&[(2.0 / count) as f32], &errors)?,
        };
        let hardness = match hardness {
            Some(term) => Some(mean_energy(self, term.op, term.loser_residual, term.weight)?),
            None => None,
        };
        let total = mimic.loss + hardness.as_ref().map_or(0.0, |term| term.loss);
        Ok(MimicLoss { total, mimic, hardness })
    }

    /// `losses::limit_sobolev_norm`: each field scaled down to Sobolev norm at most `rho`.
    fn limit_sobolev_norm(&self, op: &Sobolev, d: &Tensor<Self>, rho: f64) -> Result<Tensor<Self>> {
        ensure!(rho.is_finite() && rho >= 0.0, "limit_sobolev_norm: rho must be finite and non-negative, got {rho}");
        let factors: Vec<f32> = norms(self, op, d)?.into_iter().map(|norm| if norm > rho { (rho / norm) as f32 } else { 1.0 }).collect();
        self.scale_items(&factors, d)
    }

    /// `losses::limit_sobolev_norm_backward`: the gradient through `limit_sobolev_norm`.
    fn limit_sobolev_norm_backward(&self, op: &Sobolev, d: &Tensor<Self>, g: &Tensor<Self>, rho: f64) -> Result<Tensor<Self>> {
        let precision_d = self.sobolev_filter(op, d, Filter::Precision)?;
        let (d_dot_g, d_l_d) = (self.dot_items(d, g)?, self.dot_items(d, &precision_d)?);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for ((norm, d_dot_g), d_l_d) in norms(self, op, d)?.into_iter().zip(d_dot_g).zip(d_l_d) {
            // Outside the ball: (rho / n) (g - (d . g / d^T L d) L d).
            let (scale, along) = if norm > rho { (rho / norm, d_dot_g / d_l_d) } else { (1.0, 0.0) };
            a.push(scale as f32);
            b.push((-scale * along) as f32);
        }
        self.axpby(&a, g, &b, &precision_d)
    }

    /// `losses::synthesize_loser`: `x^l_0 = x^w_t - t A`, its deviation from the winner limited to
    /// Sobolev norm `rho`, re-projected with the winner's noise.
    fn synthesize_loser(
        &self,
        op: &Sobolev,
        winner_x0: &Tensor<Self>,
        eps: &Tensor<Self>,
        t: &[f32],
        adversary: &Tensor<Self>,
        rho: f64,
    ) -> Result<SynthesizedLoser<Tensor<Self>>> {
        let winner = self.flow_target(winner_x0, eps, t)?;
        let adversary_x0 = self.clean_estimate(&winner.x_t, adversary, t)?;
        let deviation = self.axpby(&[1.0], &adversary_x0, &[-1.0], winner_x0)?;
        let deviation_norm = norms(self, op, &deviation)?;
        let limited = self.limit_sobolev_norm(op, &deviation, rho)?;
        let x0 = self.axpby(&[1.0], winner_x0, &[1.0], &limited)?;
        let FlowTarget { x_t, velocity } = self.flow_target(&x0, eps, t)?;
        Ok(SynthesizedLoser { x0, x_t, velocity, deviation_norm })
    }

    /// `losses::steepest_sobolev_deviation`: Proposition 1's `-rho L^-1 g / ||L^-1 g||_H`.
    fn steepest_sobolev_deviation(&self, op: &Sobolev, g: &Tensor<Self>, rho: f64) -> Result<Tensor<Self>> {
        ensure!(rho.is_finite() && rho >= 0.0, "steepest_sobolev_deviation: rho must be finite and non-negative, got {rho}");
        let delta = self.sobolev_filter(op, g, Filter::Covariance)?;
        let factors: Vec<f32> =
            norms(self, op, &delta)?.into_iter().map(|norm| if norm > 0.0 { (-rho / norm) as f32 } else { 0.0 }).collect();
        self.scale_items(&factors, &delta)
    }
}

/// `weight mean_b E(r_b)` and its gradient wrt r.
fn mean_energy<B: TrainingOps>(b: &B, op: &Sobolev, residual: &Tensor<B>, weight: f64) -> Result<LossGrad<Tensor<B>>> {
    let (energies, grad) = b.sobolev_energy_grad(op, residual)?;
    let batch = energies.len() as f64;
    Ok(LossGrad { loss: weight * energies.iter().sum::<f64>() / batch, grad: b.scale_items(&[(weight / batch) as f32], &grad)? })
}

/// Each field's Sobolev norm, `sqrt(E)`.
fn norms<B: TrainingOps>(b: &B, op: &Sobolev, d: &Tensor<B>) -> Result<Vec<f64>> {
    Ok(b.sobolev_energy(op, d)?.into_iter().map(f64::sqrt).collect())
}

fn negated(t: &[f32]) -> Vec<f32> {
    t.iter().map(|&t| -t).collect()
}
