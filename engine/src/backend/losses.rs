//! The training losses (design.md sections 5 and 7): flow matching (SFT), S-DPO, the AMG
//! adversary's mimic loss and the AS-DPO loser synthesis, as host functions over slices. They are
//! the CPU backend's implementation of `TrainingOps` and the reference every device
//! implementation is tested against; their result types, generic over the field (`Vec<f32>`
//! here, a device tensor there), are the trait's too.
//!
//! Conventions: fields are row-major f32 `[B, C, H, W]` (B items, or B preference pairs); `t` has
//! one value per item. Every loss is a mean over the batch, and every gradient already carries
//! the `1/B`. Losses, energies and derivatives wrt energies are f64: S-DPO multiplies energy
//! differences by beta = 2000, and those differences are small against the energies.

use super::sobolev::Sobolev;
use anyhow::{ensure, Result};

/// Diffusion-DPO's beta, the S-DPO default (design.md section 7).
pub const DEFAULT_BETA: f64 = 2000.0;

/// A point on the flow-matching path and the velocity the model should predict there.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowTarget<F = Vec<f32>> {
    /// `x_t = (1 - t) x0 + t eps`.
    pub x_t: F,
    /// `u = eps - x0`.
    pub velocity: F,
}

/// `x_t = (1 - t) x0 + t eps` and `u = eps - x0`, with `t[b]` for item b.
pub fn flow_target(x0: &[f32], eps: &[f32], t: &[f32]) -> Result<FlowTarget> {
    same_len("flow_target", ("x0", x0), ("eps", eps))?;
    let per_item = item_len("flow_target", x0.len(), t)?;
    let mut x_t = Vec::with_capacity(x0.len());
    for ((x0_item, eps_item), &ti) in x0.chunks(per_item).zip(eps.chunks(per_item)).zip(t) {
        x_t.extend(x0_item.iter().zip(eps_item).map(|(&x, &e)| (1.0 - ti) * x + ti * e));
    }
    let velocity = eps.iter().zip(x0).map(|(&e, &x)| e - x).collect();
    Ok(FlowTarget { x_t, velocity })
}

/// The clean estimate `x0_hat = x_t - t v`, with `t[b]` for item b.
pub fn clean_estimate(x_t: &[f32], v: &[f32], t: &[f32]) -> Result<Vec<f32>> {
    same_len("clean_estimate", ("x_t", x_t), ("v", v))?;
    let per_item = item_len("clean_estimate", x_t.len(), t)?;
    let mut x0 = Vec::with_capacity(x_t.len());
    for ((x_item, v_item), &ti) in x_t.chunks(per_item).zip(v.chunks(per_item)).zip(t) {
        x0.extend(x_item.iter().zip(v_item).map(|(&x, &vi)| x - ti * vi));
    }
    Ok(x0)
}

/// A batch-mean loss and its gradient wrt one input field.
#[derive(Clone, Debug, PartialEq)]
pub struct LossGrad<F = Vec<f32>> {
    pub loss: f64,
    pub grad: F,
}

/// The SFT loss `mean_b E(v_b - u_b)` and its gradient wrt v, `(1/B) (2/N) L (v - u)`.
/// With an operator of exponent 0 this is the plain MSE `mean((v - u)^2)`.
pub fn sft_loss(op: &Sobolev, v: &[f32], u: &[f32]) -> Result<LossGrad> {
    same_len("sft_loss", ("v", v), ("u", u))?;
    ensure!(!v.is_empty(), "sft_loss: the batch is empty");
    let residual: Vec<f32> = v.iter().zip(u).map(|(&a, &b)| a - b).collect();
    mean_energy(op, &residual, 1.0)
}

/// `weight mean_b E(r_b)` and its gradient wrt r.
fn mean_energy(op: &Sobolev, residual: &[f32], weight: f64) -> Result<LossGrad> {
    let energies = op.energy(residual)?;
    let batch = energies.len() as f64;
    let mut grad = op.energy_grad(residual)?;
    scale(&mut grad, (weight / batch) as f32);
    Ok(LossGrad { loss: weight * energies.iter().sum::<f64>() / batch, grad })
}

/// The four residual energies of one preference pair, `E(v(x_t) - u)` for the policy and the
/// reference on the winner and on the loser.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairEnergies {
    pub policy_winner: f64,
    pub reference_winner: f64,
    pub policy_loser: f64,
    pub reference_loser: f64,
}

impl PairEnergies {
    /// `dE = [E(r^w_theta) - E(r^w_ref)] - [E(r^l_theta) - E(r^l_ref)]`: negative when the policy
    /// fits the winner better, relative to the reference, than it fits the loser.
    pub fn delta(&self) -> f64 {
        (self.policy_winner - self.reference_winner) - (self.policy_loser - self.reference_loser)
    }
}

/// The S-DPO objective of a batch of P pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct SdpoObjective {
    /// `mean_i -log sigmoid(-(beta/2) dE_i) = mean_i softplus((beta/2) dE_i)`.
    pub loss: f64,
    /// Implicit accuracy: the share of pairs with `dE < 0`.
    pub accuracy: f64,
    /// Reward margin, `mean_i -(beta/2) dE_i`. As in Diffusion-DPO the implicit reward of a
    /// sample is `-(beta/2) [E(r_theta) - E(r_ref)]` (its timestep-count factor folded into
    /// beta), and the margin is the winner's reward minus the loser's: the logit that the loss
    /// pushes up, Diffusion-DPO's `inside_term`, averaged over pairs.
    pub reward_margin: f64,
    /// `d loss / d E(r^w_theta)` for each pair, `(beta/2) sigmoid((beta/2) dE_i) / P`. The loser's
    /// policy energy has the negative of it; the reference energies are frozen.
    pub winner_energy_grad: Vec<f64>,
}

/// S-DPO from the pairs' energies (design.md section 7), with the softplus and the sigmoid
/// evaluated so that neither overflows for any finite `beta dE`.
pub fn sdpo_objective(pairs: &[PairEnergies], beta: f64) -> Result<SdpoObjective> {
    ensure!(!pairs.is_empty(), "sdpo: the batch has no pairs");
    ensure!(beta.is_finite() && beta > 0.0, "sdpo: beta must be positive and finite, got {beta}");
    let count = pairs.len() as f64;
    let logits: Vec<f64> = pairs.iter().map(|pair| 0.5 * beta * pair.delta()).collect();
    Ok(SdpoObjective {
        loss: logits.iter().map(|&z| softplus(z)).sum::<f64>() / count,
        accuracy: pairs.iter().filter(|pair| pair.delta() < 0.0).count() as f64 / count,
        reward_margin: -logits.iter().sum::<f64>() / count,
        winner_energy_grad: logits.iter().map(|&z| 0.5 * beta * sigmoid(z) / count).collect(),
    })
}

/// The residual fields `r = v(x_t) - u` of a batch of pairs, each `[P, C, H, W]` on the
/// operator's field grid.
#[derive(Debug)]
pub struct PairResiduals<'a, F: ?Sized = [f32]> {
    pub policy_winner: &'a F,
    pub reference_winner: &'a F,
    pub policy_loser: &'a F,
    pub reference_loser: &'a F,
}

impl<F: ?Sized> Clone for PairResiduals<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F: ?Sized> Copy for PairResiduals<'_, F> {}

/// One S-DPO step: the objective and the gradients wrt the policy's residuals (equal to those wrt
/// the policy's velocity, `u` being data). The reference residuals get none.
#[derive(Clone, Debug, PartialEq)]
pub struct SdpoStep<F = Vec<f32>> {
    pub energies: Vec<PairEnergies>,
    pub objective: SdpoObjective,
    /// `a_i (2/N) L r^w_theta_i` with `a_i` = `objective.winner_energy_grad[i]`.
    pub policy_winner_grad: F,
    /// `-a_i (2/N) L r^l_theta_i`.
    pub policy_loser_grad: F,
}

/// S-DPO on residual fields: the four energies of each pair through `op`, the objective of
/// [`sdpo_objective`], and the chain rule through `dE/dr = (2/N) L r`.
pub fn sdpo_step(op: &Sobolev, residuals: &PairResiduals, beta: f64) -> Result<SdpoStep> {
    let r = residuals;
    for (name, field) in
        [("reference_winner", r.reference_winner), ("policy_loser", r.policy_loser), ("reference_loser", r.reference_loser)]
    {
        same_len("sdpo", ("policy_winner", r.policy_winner), (name, field))?;
    }
    let [policy_winner, reference_winner, policy_loser, reference_loser] =
        [r.policy_winner, r.reference_winner, r.policy_loser, r.reference_loser].map(|field| op.energy(field));
    let energies: Vec<PairEnergies> = (policy_winner?.into_iter().zip(reference_winner?))
        .zip(policy_loser?.into_iter().zip(reference_loser?))
        .map(|((policy_winner, reference_winner), (policy_loser, reference_loser))| PairEnergies {
            policy_winner,
            reference_winner,
            policy_loser,
            reference_loser,
        })
        .collect();
    let objective = sdpo_objective(&energies, beta)?;
    let mut policy_winner_grad = op.energy_grad(r.policy_winner)?;
    let mut policy_loser_grad = op.energy_grad(r.policy_loser)?;
    let per_pair = op.field_grid().elements();
    for ((winner, loser), &a) in
        policy_winner_grad.chunks_mut(per_pair).zip(policy_loser_grad.chunks_mut(per_pair)).zip(&objective.winner_energy_grad)
    {
        scale(winner, a as f32);
        scale(loser, -a as f32);
    }
    Ok(SdpoStep { energies, objective, policy_winner_grad, policy_loser_grad })
}

/// The optional hardness term of the AMG mimic loss, `weight mean_b E(v_ref(x^l_t) - u^l)`:
/// it favours negatives that the reference finds easy.
#[derive(Debug)]
pub struct Hardness<'a, F: ?Sized = [f32]> {
    pub op: &'a Sobolev,
    /// `lambda_E`.
    pub weight: f64,
    /// `v_ref(x^l_t) - u^l`, `[B, C, H, W]`.
    pub loser_residual: &'a F,
}

impl<F: ?Sized> Clone for Hardness<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F: ?Sized> Copy for Hardness<'_, F> {}

/// The AMG mimic loss and its parts.
#[derive(Clone, Debug, PartialEq)]
pub struct MimicLoss<F = Vec<f32>> {
    /// `mimic.loss` plus `hardness.loss` when present.
    pub total: f64,
    /// `mean((A_phi(x^w_t) - (eps - x^b_0))^2)` over all values, and its gradient wrt the
    /// adversary's output, `2 (A - (eps - x^b_0)) / (B N)`.
    pub mimic: LossGrad<F>,
    /// The hardness term and its gradient wrt the loser residual, `lambda_E (2/N) L r^l / B`. The
    /// adversary reaches this term only through `x^l_t` and `u^l` (the synthesis, then the frozen
    /// reference), so the trainer carries this gradient back through `v_ref` and the synthesis.
    pub hardness: Option<LossGrad<F>>,
}

/// AMG training ("mimic", design.md section 7): `|| A_phi(x^w_t, t, c) - (eps - x^b_0) ||^2` as a
/// mean over all values, plus the optional [`Hardness`] term.
pub fn amg_mimic_loss(adversary: &[f32], eps: &[f32], baseline_x0: &[f32], hardness: Option<Hardness>) -> Result<MimicLoss> {
    same_len("amg_mimic_loss", ("adversary", adversary), ("eps", eps))?;
    same_len("amg_mimic_loss", ("adversary", adversary), ("baseline_x0", baseline_x0))?;
    ensure!(!adversary.is_empty(), "amg_mimic_loss: the batch is empty");
    let count = adversary.len() as f64;
    let errors: Vec<f32> = adversary.iter().zip(eps.iter().zip(baseline_x0)).map(|(&a, (&e, &xb))| a - (e - xb)).collect();
    let mimic = LossGrad {
        loss: errors.iter().map(|&e| (e as f64).powi(2)).sum::<f64>() / count,
        grad: errors.iter().map(|&e| (2.0 * e as f64 / count) as f32).collect(),
    };
    let hardness = match hardness {
        Some(term) => {
            same_len("amg_mimic_loss", ("adversary", adversary), ("loser_residual", term.loser_residual))?;
            Some(mean_energy(term.op, term.loser_residual, term.weight)?)
        }
        None => None,
    };
    let total = mimic.loss + hardness.as_ref().map_or(0.0, |term| term.loss);
    Ok(MimicLoss { total, mimic, hardness })
}

/// Scales each field of `d` down to Sobolev norm at most `rho` (to within f32 rounding of the
/// scaled values): `d_b min(1, rho / ||d_b||_H)`. Fields already inside the ball come back unchanged.
pub fn limit_sobolev_norm(op: &Sobolev, d: &[f32], rho: f64) -> Result<Vec<f32>> {
    ensure!(rho.is_finite() && rho >= 0.0, "limit_sobolev_norm: rho must be finite and non-negative, got {rho}");
    let norms = op.sobolev_norm(d)?;
    let mut limited = d.to_vec();
    for (field, norm) in limited.chunks_mut(op.field_grid().elements()).zip(norms) {
        if norm > rho {
            scale(field, (rho / norm) as f32);
        }
    }
    Ok(limited)
}

/// The gradient through [`limit_sobolev_norm`]: `g` is d loss / d(limited d), the result
/// d loss / d d, per field. Inside the ball the limit is the identity; outside it it is
/// `y = rho d / n`, `n = ||d||_H = sqrt(d^T L d / N)`, whose Jacobian is symmetric about `L`:
/// `J^T g = (rho / n) (g - (d . g / d^T L d) L d)`.
pub fn limit_sobolev_norm_backward(op: &Sobolev, d: &[f32], g: &[f32], rho: f64) -> Result<Vec<f32>> {
    same_len("limit_sobolev_norm_backward", ("d", d), ("g", g))?;
    let norms = op.sobolev_norm(d)?;
    let precision_d = op.precision(d)?;
    let per_field = op.field_grid().elements();
    let mut out = g.to_vec();
    for (((field, d), ld), norm) in out.chunks_mut(per_field).zip(d.chunks(per_field)).zip(precision_d.chunks(per_field)).zip(norms) {
        if norm <= rho {
            continue;
        }
        let d_dot_g: f64 = d.iter().zip(field.iter()).map(|(&a, &b)| a as f64 * b as f64).sum();
        let d_l_d: f64 = d.iter().zip(ld).map(|(&a, &b)| a as f64 * b as f64).sum();
        let (scale, along) = (rho / norm, d_dot_g / d_l_d);
        for (gi, &ldi) in field.iter_mut().zip(ld) {
            *gi = (scale * (*gi as f64 - along * ldi as f64)) as f32;
        }
    }
    Ok(out)
}

/// A loser synthesised by the adversary (AS-DPO), on the winner's noise and time.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthesizedLoser<F = Vec<f32>> {
    /// `x^l_0 = x^w_0 + d`, with `d` limited to Sobolev norm rho.
    pub x0: F,
    /// `x^l_t = (1 - t) x^l_0 + t eps`, the same `eps` and `t` as the winner.
    pub x_t: F,
    /// `u^l = eps - x^l_0`.
    pub velocity: F,
    /// `||x^w_t - t A - x^w_0||_H` per item, before the limit (for the training log).
    pub deviation_norm: Vec<f64>,
}

/// AS-DPO synthesis (design.md section 7): `x^l_0 = x^w_t - t A_phi(x^w_t, t, c)`, its deviation
/// `d = x^l_0 - x^w_0` scaled down to `||d||_H <= rho`, then re-projected with the same noise.
/// `adversary` is `A_phi` evaluated at the `x^w_t` that [`flow_target`] gives for `winner_x0`,
/// `eps` and `t`.
pub fn synthesize_loser(op: &Sobolev, winner_x0: &[f32], eps: &[f32], t: &[f32], adversary: &[f32], rho: f64) -> Result<SynthesizedLoser> {
    let winner = flow_target(winner_x0, eps, t)?;
    let adversary_x0 = clean_estimate(&winner.x_t, adversary, t)?;
    let deviation: Vec<f32> = adversary_x0.iter().zip(winner_x0).map(|(&l, &w)| l - w).collect();
    let deviation_norm = op.sobolev_norm(&deviation)?;
    let limited = limit_sobolev_norm(op, &deviation, rho)?;
    let x0: Vec<f32> = winner_x0.iter().zip(&limited).map(|(&w, &d)| w + d).collect();
    let FlowTarget { x_t, velocity } = flow_target(&x0, eps, t)?;
    Ok(SynthesizedLoser { x0, x_t, velocity, deviation_norm })
}

/// Proposition 1: among deviations of Sobolev norm `rho`, the one that most decreases the
/// linearised energy `<g, delta>` is `delta* = -rho L^-1 g / ||L^-1 g||_H`, per item, with `g`
/// the Euclidean gradient of the reference's residual energy at `x^w_t`. An item with `g = 0` has
/// no descent direction and gets `delta = 0`.
pub fn steepest_sobolev_deviation(op: &Sobolev, g: &[f32], rho: f64) -> Result<Vec<f32>> {
    ensure!(rho.is_finite() && rho >= 0.0, "steepest_sobolev_deviation: rho must be finite and non-negative, got {rho}");
    let mut delta = op.covariance(g)?;
    let norms = op.sobolev_norm(&delta)?;
    for (field, norm) in delta.chunks_mut(op.field_grid().elements()).zip(norms) {
        scale(field, if norm > 0.0 { (-rho / norm) as f32 } else { 0.0 });
    }
    Ok(delta)
}

/// `ln(1 + e^z)` without overflow: `max(z, 0) + ln(1 + e^-|z|)`.
fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

/// `1 / (1 + e^-z)`, exponentiating only non-positive numbers.
pub(crate) fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

fn scale(values: &mut [f32], factor: f32) {
    values.iter_mut().for_each(|v| *v *= factor);
}

fn same_len(what: &str, (a_name, a): (&str, &[f32]), (b_name, b): (&str, &[f32])) -> Result<()> {
    ensure!(a.len() == b.len(), "{what}: {a_name} has {} values but {b_name} has {}", a.len(), b.len());
    Ok(())
}

/// The values per item when `len` values hold one item per time in `t`.
fn item_len(what: &str, len: usize, t: &[f32]) -> Result<usize> {
    ensure!(len > 0 && !t.is_empty() && len % t.len() == 0, "{what}: {len} values do not split into {} items, one per time t", t.len());
    Ok(len / t.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sobolev::{Grid, DEFAULT_EXPONENT};
    use crate::sampler::gaussian_noise;
    use std::f64::consts::LN_2;

    fn random_fields(len: usize, seed: u64) -> Vec<f32> {
        gaussian_noise(len, seed)
    }

    fn mean_square(values: impl Iterator<Item = f64>) -> f64 {
        let (sum, count) = values.fold((0f64, 0usize), |(s, c), v| (s + v * v, c + 1));
        sum / count as f64
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    fn max_abs(a: &[f32]) -> f64 {
        a.iter().fold(0f64, |m, &v| m.max((v as f64).abs()))
    }

    /// `a + scale b`.
    fn add_scaled(a: &[f32], b: &[f32], scale: f32) -> Vec<f32> {
        a.iter().zip(b).map(|(&x, &y)| x + scale * y).collect()
    }

    /// `(f(x + h e_i) - f(x - h e_i)) / (actual step)`, the step taken in f32.
    fn central_difference(x: &[f32], index: usize, h: f32, f: impl Fn(&[f32]) -> f64) -> f64 {
        let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
        plus[index] += h;
        minus[index] -= h;
        (f(&plus) - f(&minus)) / (plus[index] as f64 - minus[index] as f64)
    }

    #[test]
    fn flow_target_follows_the_path_and_the_clean_estimate_inverts_it() {
        let (x0, eps) = (random_fields(12, 1), random_fields(12, 2));
        let t = [0.25f32, 0.9];
        let target = flow_target(&x0, &eps, &t).unwrap();
        for i in 0..12 {
            let ti = t[i / 6] as f64;
            let want = (1.0 - ti) * x0[i] as f64 + ti * eps[i] as f64;
            assert!((target.x_t[i] as f64 - want).abs() < 1e-6, "x_t[{i}]");
            assert_eq!(target.velocity[i], eps[i] - x0[i]);
        }
        let back = clean_estimate(&target.x_t, &target.velocity, &t).unwrap();
        assert!(back.iter().zip(&x0).all(|(a, b)| (a - b).abs() < 1e-5));
        let ends = flow_target(&x0, &eps, &[0.0, 1.0]).unwrap();
        assert_eq!((&ends.x_t[..6], &ends.x_t[6..]), (&x0[..6], &eps[6..]));
    }

    #[test]
    fn sft_loss_is_the_mse_at_exponent_zero_and_its_gradient_matches_differences() {
        let grid = Grid::new(2, 4, 5);
        let (v, u) = (random_fields(3 * grid.elements(), 3), random_fields(3 * grid.elements(), 4));
        let euclidean = sft_loss(&Sobolev::new(grid, 0.0).unwrap(), &v, &u).unwrap();
        let mse = mean_square(v.iter().zip(&u).map(|(&a, &b)| a as f64 - b as f64));
        assert!((euclidean.loss - mse).abs() <= 1e-6 * mse, "loss {} mse {mse}", euclidean.loss);
        for (i, g) in euclidean.grad.iter().enumerate() {
            let want = 2.0 * (v[i] as f64 - u[i] as f64) / v.len() as f64;
            assert!((*g as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3), "grad[{i}] {g} vs {want}");
        }
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let sobolev = sft_loss(&op, &v, &u).unwrap();
        for index in (0..v.len()).step_by(5) {
            let numeric = central_difference(&v, index, 1e-2, |v| sft_loss(&op, v, &u).unwrap().loss);
            assert!((numeric - sobolev.grad[index] as f64).abs() <= 1e-5 * max_abs(&sobolev.grad), "index {index}");
        }
    }

    /// Residuals of `pairs` pairs where the policy is the reference moved by `step` white noise,
    /// so that `(beta/2) dE` is of order one at the default beta.
    fn pair_residuals(grid: Grid, pairs: usize, step: f32) -> [Vec<f32>; 4] {
        let n = pairs * grid.elements();
        let (reference_winner, reference_loser) = (random_fields(n, 10), random_fields(n, 11));
        let policy_winner = add_scaled(&reference_winner, &random_fields(n, 12), step);
        let policy_loser = add_scaled(&reference_loser, &random_fields(n, 13), step);
        [policy_winner, reference_winner, policy_loser, reference_loser]
    }

    fn residuals(fields: &[Vec<f32>; 4]) -> PairResiduals<'_> {
        PairResiduals { policy_winner: &fields[0], reference_winner: &fields[1], policy_loser: &fields[2], reference_loser: &fields[3] }
    }

    #[test]
    fn sdpo_with_the_policy_equal_to_the_reference_is_ln_2() {
        let grid = Grid::new(3, 4, 4);
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let (winner, loser) = (random_fields(2 * grid.elements(), 5), random_fields(2 * grid.elements(), 6));
        let pairs: PairResiduals =
            PairResiduals { policy_winner: &winner, reference_winner: &winner, policy_loser: &loser, reference_loser: &loser };
        let step = sdpo_step(&op, &pairs, DEFAULT_BETA).unwrap();
        assert_eq!(step.objective.loss, LN_2);
        assert_eq!((step.objective.accuracy, step.objective.reward_margin), (0.0, 0.0));
        // sigmoid(0) = 1/2: each pair's winner energy pulls with beta/4, shared over 2 pairs.
        assert_eq!(step.objective.winner_energy_grad, vec![DEFAULT_BETA / 8.0; 2]);
    }

    #[test]
    fn sdpo_at_exponent_zero_is_diffusion_dpo() {
        let (grid, pairs) = (Grid::new(3, 4, 4), 8);
        let fields = pair_residuals(grid, pairs, 0.01);
        let step = sdpo_step(&Sobolev::new(grid, 0.0).unwrap(), &residuals(&fields), DEFAULT_BETA).unwrap();
        // Diffusion-DPO, written from per-pair MSEs of model and reference predictions.
        let n = grid.elements();
        let mse = |field: &[f32], pair: usize| mean_square(field[pair * n..(pair + 1) * n].iter().map(|&v| v as f64));
        let inside: Vec<f64> = (0..pairs)
            .map(|i| {
                let model_diff = mse(&fields[0], i) - mse(&fields[2], i);
                let ref_diff = mse(&fields[1], i) - mse(&fields[3], i);
                -0.5 * DEFAULT_BETA * (model_diff - ref_diff)
            })
            .collect();
        let loss = inside.iter().map(|&z| -(1.0 / (1.0 + (-z).exp())).ln()).sum::<f64>() / pairs as f64;
        let accuracy = inside.iter().filter(|&&z| z > 0.0).count() as f64 / pairs as f64;
        let margin = inside.iter().sum::<f64>() / pairs as f64;
        assert!(accuracy > 0.0 && accuracy < 1.0, "the pairs should disagree, accuracy {accuracy}");
        assert!((step.objective.loss - loss).abs() < 1e-9, "S-DPO {} Diffusion-DPO {loss}", step.objective.loss);
        assert_eq!(step.objective.accuracy, accuracy);
        assert!((step.objective.reward_margin - margin).abs() < 1e-9);
    }

    #[test]
    fn sdpo_gradients_match_central_differences() {
        let (grid, pairs) = (Grid::new(2, 3, 4), 3);
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let fields = pair_residuals(grid, pairs, 0.003);
        let step = sdpo_step(&op, &residuals(&fields), DEFAULT_BETA).unwrap();
        let logits: Vec<f64> = step.energies.iter().map(|e| 0.5 * DEFAULT_BETA * e.delta()).collect();
        assert!(logits.iter().all(|z| z.abs() < 10.0), "logits {logits:?} saturate: the test would not see the sigmoid");
        for (slot, grad) in [(0, &step.policy_winner_grad), (2, &step.policy_loser_grad)] {
            for index in (0..grad.len()).step_by(5) {
                let numeric = central_difference(&fields[slot], index, 1e-4, |field| {
                    let mut moved = fields.clone();
                    moved[slot] = field.to_vec();
                    sdpo_step(&op, &residuals(&moved), DEFAULT_BETA).unwrap().objective.loss
                });
                let analytic = grad[index] as f64;
                assert!((numeric - analytic).abs() <= 1e-3 * max_abs(grad), "field {slot} index {index}: {numeric} vs {analytic}");
            }
        }
    }

    #[test]
    fn sdpo_is_stable_when_beta_de_is_ten_thousand() {
        let worse = PairEnergies { policy_winner: 7.0, reference_winner: 2.0, policy_loser: 1.0, reference_loser: 1.0 };
        let better = PairEnergies { policy_winner: 2.0, reference_winner: 7.0, ..worse };
        assert_eq!((DEFAULT_BETA * worse.delta(), DEFAULT_BETA * better.delta()), (1e4, -1e4));
        let wrong = sdpo_objective(&[worse], DEFAULT_BETA).unwrap();
        assert_eq!((wrong.loss, wrong.winner_energy_grad[0], wrong.accuracy), (5000.0, DEFAULT_BETA / 2.0, 0.0));
        let right = sdpo_objective(&[better], DEFAULT_BETA).unwrap();
        assert!(right.loss >= 0.0 && right.loss < 1e-300 && right.winner_energy_grad[0] < 1e-300, "{right:?}");
        let both = sdpo_objective(&[worse, better], DEFAULT_BETA).unwrap();
        assert_eq!((both.loss, both.accuracy, both.reward_margin), (2500.0, 0.5, 0.0));
    }

    #[test]
    fn proposition_one_deviation_has_norm_rho_and_beats_every_feasible_one() {
        let grid = Grid::new(2, 6, 5);
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let (n, rho) = (grid.elements(), 0.3);
        let g = random_fields(2 * n, 20);
        let best = steepest_sobolev_deviation(&op, &g, rho).unwrap();
        for norm in op.sobolev_norm(&best).unwrap() {
            assert!((norm - rho).abs() <= 1e-6 * rho, "norm {norm}");
        }
        let on_sphere = |d: &[f32]| {
            let norm = op.sobolev_norm(d).unwrap()[0];
            d.iter().map(|&v| (v as f64 * rho / norm) as f32).collect::<Vec<f32>>()
        };
        for item in 0..2 {
            let (g, best) = (&g[item * n..(item + 1) * n], &best[item * n..(item + 1) * n]);
            let best_decrease = dot(g, best);
            assert!(best_decrease < 0.0);
            let mut candidates: Vec<Vec<f32>> = vec![g.iter().map(|v| -v).collect()];
            for seed in 0..200 {
                let noise = random_fields(n, 100 + seed);
                candidates.push(noise.clone());
                candidates.push(add_scaled(best, &noise, 0.01));
            }
            for (k, candidate) in candidates.iter().enumerate() {
                let decrease = dot(g, &on_sphere(candidate));
                assert!(best_decrease <= decrease + 1e-6 * best_decrease.abs(), "candidate {k}: {decrease} < {best_decrease}");
            }
            // Plain gradient descent is a feasible direction, but not the steepest in this norm.
            assert!(best_decrease < 1.01 * dot(g, &on_sphere(&candidates[0])));
        }
        assert_eq!(steepest_sobolev_deviation(&op, &vec![0.0; n], rho).unwrap(), vec![0.0; n]);
    }

    #[test]
    fn limiting_the_deviation_caps_large_ones_and_keeps_small_ones() {
        let grid = Grid::new(2, 4, 4);
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let (n, rho) = (grid.elements(), 0.2);
        let mut d = random_fields(2 * n, 30);
        let small_norm = op.sobolev_norm(&d[n..]).unwrap()[0];
        scale(&mut d[n..], (0.5 * rho / small_norm) as f32);
        assert!(op.sobolev_norm(&d).unwrap()[0] > rho);
        let limited = limit_sobolev_norm(&op, &d, rho).unwrap();
        let norms = op.sobolev_norm(&limited).unwrap();
        assert!(norms[0] <= rho * (1.0 + 1e-6) && norms[0] >= rho * (1.0 - 1e-6), "capped norm {}", norms[0]);
        let ratio = limited[0] / d[0];
        assert!(limited[..n].iter().zip(&d[..n]).all(|(l, x)| (l - ratio * x).abs() <= 1e-6 * x.abs().max(1.0)), "direction kept");
        assert_eq!(&limited[n..], &d[n..]);
        assert!(limit_sobolev_norm(&op, &d, -1.0).is_err());
    }

    #[test]
    fn the_synthesised_loser_is_limited_and_reprojected_with_the_winners_noise() {
        let grid = Grid::new(2, 4, 4);
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let n = 2 * grid.elements();
        let (x_w0, eps, t) = (random_fields(n, 40), random_fields(n, 41), [0.3f32, 0.8]);
        let winner = flow_target(&x_w0, &eps, &t).unwrap();
        let adversary = add_scaled(&winner.velocity, &random_fields(n, 42), 0.5);
        for rho in [1e3, 0.05] {
            let loser = synthesize_loser(&op, &x_w0, &eps, &t, &adversary, rho).unwrap();
            let deviation: Vec<f32> = loser.x0.iter().zip(&x_w0).map(|(l, w)| l - w).collect();
            for (i, (&norm_before, norm)) in loser.deviation_norm.iter().zip(op.sobolev_norm(&deviation).unwrap()).enumerate() {
                assert!(norm <= rho.min(norm_before) * (1.0 + 1e-5), "rho {rho} item {i}: norm {norm}, before {norm_before}");
            }
            for i in 0..n {
                let ti = t[i / grid.elements()];
                if rho > 1.0 {
                    assert!((loser.x0[i] - (winner.x_t[i] - ti * adversary[i])).abs() < 1e-5, "unlimited x^l_0[{i}]");
                }
                assert!((loser.x_t[i] - ((1.0 - ti) * loser.x0[i] + ti * eps[i])).abs() < 1e-5, "x^l_t[{i}]");
                assert_eq!(loser.velocity[i], eps[i] - loser.x0[i]);
            }
        }
        // An adversary that predicts the winner's own velocity reproduces the winner.
        let exact = synthesize_loser(&op, &x_w0, &eps, &t, &winner.velocity, 1.0).unwrap();
        assert!(exact.x0.iter().zip(&x_w0).all(|(l, w)| (l - w).abs() < 1e-5));
        assert!(exact.deviation_norm.iter().all(|&norm| norm < 1e-5));
    }

    #[test]
    fn the_limits_gradient_matches_differences_inside_and_outside_the_ball() {
        let grid = Grid::new(2, 4, 6);
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let n = 2 * grid.elements();
        let (mut d, weights) = (random_fields(n, 70), random_fields(n, 71));
        // The first field outside the ball, the second (half as large) inside it.
        d[grid.elements()..].iter_mut().for_each(|v| *v *= 0.5);
        let norms = op.sobolev_norm(&d).unwrap();
        let rho = 0.75 * norms[0];
        assert!(norms[1] < 0.9 * rho, "{norms:?}");
        let loss = |d: &[f32]| dot(&limit_sobolev_norm(&op, d, rho).unwrap(), &weights);
        let grad = limit_sobolev_norm_backward(&op, &d, &weights, rho).unwrap();
        assert_eq!(&grad[grid.elements()..], &weights[grid.elements()..]);
        for index in (0..n).step_by(3) {
            let numeric = central_difference(&d, index, 1e-2, loss);
            assert!((numeric - grad[index] as f64).abs() <= 2e-3 * max_abs(&grad), "index {index}: {numeric} vs {}", grad[index]);
        }
    }

    #[test]
    fn mimic_loss_and_its_gradients() {
        let grid = Grid::new(2, 3, 4);
        let n = 2 * grid.elements();
        let (adversary, eps, baseline) = (random_fields(n, 50), random_fields(n, 51), random_fields(n, 52));
        let plain = amg_mimic_loss(&adversary, &eps, &baseline, None).unwrap();
        let want = mean_square((0..n).map(|i| adversary[i] as f64 - (eps[i] as f64 - baseline[i] as f64)));
        assert!((plain.mimic.loss - want).abs() <= 1e-6 * want && plain.total == plain.mimic.loss && plain.hardness.is_none());
        for index in (0..n).step_by(5) {
            let numeric = central_difference(&adversary, index, 1e-2, |a| amg_mimic_loss(a, &eps, &baseline, None).unwrap().total);
            assert!((numeric - plain.mimic.grad[index] as f64).abs() <= 1e-5 * max_abs(&plain.mimic.grad), "adversary index {index}");
        }

        let residual = random_fields(n, 53);
        let euclidean = Sobolev::new(grid, 0.0).unwrap();
        let hard: Hardness = Hardness { op: &euclidean, weight: 0.3, loser_residual: &residual };
        let with_mse = amg_mimic_loss(&adversary, &eps, &baseline, Some(hard)).unwrap();
        let hardness = with_mse.hardness.as_ref().unwrap().loss;
        let want = 0.3 * mean_square(residual.iter().map(|&v| v as f64));
        assert!((hardness - want).abs() <= 1e-9 * want && (with_mse.total - (plain.total + hardness)).abs() < 1e-12);

        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let total = |r: &[f32]| {
            let hard = Hardness { op: &op, weight: 0.3, loser_residual: r };
            amg_mimic_loss(&adversary, &eps, &baseline, Some(hard)).unwrap().total
        };
        let grad = amg_mimic_loss(&adversary, &eps, &baseline, Some(Hardness { op: &op, weight: 0.3, loser_residual: &residual }))
            .unwrap()
            .hardness
            .unwrap()
            .grad;
        for index in (0..n).step_by(5) {
            let numeric = central_difference(&residual, index, 1e-2, total);
            assert!((numeric - grad[index] as f64).abs() <= 1e-5 * max_abs(&grad), "residual index {index}");
        }
    }

    #[test]
    fn mismatched_shapes_are_errors_that_name_the_inputs() {
        let grid = Grid::new(2, 3, 4);
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let (full, short) = (vec![0f32; 2 * grid.elements()], vec![0f32; grid.elements()]);
        let pairs: PairResiduals =
            PairResiduals { policy_winner: &full, reference_winner: &full, policy_loser: &short, reference_loser: &full };
        let message = sdpo_step(&op, &pairs, DEFAULT_BETA).unwrap_err().to_string();
        assert!(message.contains("policy_loser") && message.contains("24") && message.contains("48"), "{message}");
        assert!(flow_target(&full, &short, &[0.5]).is_err());
        assert!(flow_target(&full, &full, &[0.5; 5]).is_err());
        assert!(clean_estimate(&full, &full, &[]).is_err());
        assert!(sft_loss(&op, &full[..7], &full[..7]).is_err());
        assert!(amg_mimic_loss(&full, &full, &short, None).is_err());
        assert!(sdpo_objective(&[], DEFAULT_BETA).is_err());
        let energies = PairEnergies { policy_winner: 1.0, reference_winner: 1.0, policy_loser: 1.0, reference_loser: 1.0 };
        assert!(sdpo_objective(&[energies], 0.0).is_err());
    }
}
