//! `TrainingOps` on the CPU: the host references of `losses`, `sobolev` and `adamw`, unchanged,
//! on the tensors' own f32 storage. Every op the trait composes for a device is overridden here
//! by its reference, so that the CPU is what the composed versions are checked against. The
//! transfer meter counts the per-item scalars that would cross to and from a device.

use super::{act, f32_tensor, timed, CpuBackend, T, TRANSFERS};
use crate::backend::adamw::{self, AdamWConfig};
use crate::backend::expect_shape;
use crate::backend::losses::{self, FlowTarget, Hardness, LossGrad, MimicLoss, PairResiduals, SdpoStep, SynthesizedLoser};
use crate::backend::profile::OpClass;
use crate::backend::sobolev::{Filter, Sobolev};
use crate::backend::training::{AdamWTensor, TrainingOps};
use anyhow::{bail, ensure, Result};
use loaders::HostData;
use rayon::prelude::*;

/// Per-item coefficients going up, f32 each.
fn scalars_up(n: usize) {
    TRANSFERS.up(4 * n);
}

/// Per-item results coming back, f64 each.
fn scalars_down(n: usize) {
    TRANSFERS.down(8 * n);
}

/// A field with another's shape.
fn like(values: Vec<f32>, x: &T) -> T {
    f32_tensor(values, x.shape().to_vec())
}

/// The items of a field (its first dimension) and the coefficient of item `i` from a slice of
/// one value per item or one for all.
fn coefficient<'a>(op: &str, what: &str, c: &'a [f32], items: usize) -> Result<impl Fn(usize) -> f32 + 'a> {
    ensure!(c.len() == 1 || c.len() == items, "{op}: {what} has {} coefficients for {items} items (one per item, or one for all)", c.len());
    Ok(move |i: usize| if c.len() == 1 { c[0] } else { c[i] })
}

fn f32_mut<'a>(op: &str, t: &'a mut T) -> Result<&'a mut [f32]> {
    match t.storage_mut() {
        HostData::F32(v) => Ok(v),
        _ => bail!("{op}: expected an f32 tensor"),
    }
}

fn same_shape(op: &str, (a_name, a): (&str, &T), (b_name, b): (&str, &T)) -> Result<()> {
    expect_shape(b_name, op, b.shape(), a.shape()).map_err(|e| anyhow::anyhow!("{e} (the shape of {a_name})"))
}

impl TrainingOps for CpuBackend {
    fn axpby(&self, a: &[f32], x: &T, b: &[f32], y: &T) -> Result<T> {
        timed(OpClass::Training, || {
            const OP: &str = "axpby";
            same_shape(OP, ("x", x), ("y", y))?;
            ensure!(x.rank() >= 1 && x.dim(0) > 0, "{OP}: x has shape {:?}, expected [items, ...]", x.shape());
            let items = x.dim(0);
            let (ca, cb) = (coefficient(OP, "a", a, items)?, coefficient(OP, "b", b, items)?);
            scalars_up(a.len() + b.len());
            let (xv, yv) = (act(OP, x)?, act(OP, y)?);
            let per_item = xv.len() / items;
            let mut out = vec![0f32; xv.len()];
            out.par_chunks_mut(per_item.max(1)).enumerate().for_each(|(i, o)| {
                let (ai, bi, range) = (ca(i), cb(i), i * per_item..(i + 1) * per_item);
                for ((o, &x), &y) in o.iter_mut().zip(&xv[range.clone()]).zip(&yv[range]) {
                    *o = ai * x + bi * y;
                }
            });
            Ok(like(out, x))
        })
    }

    fn dot_items(&self, x: &T, y: &T) -> Result<Vec<f64>> {
        timed(OpClass::Training, || {
            const OP: &str = "dot_items";
            same_shape(OP, ("x", x), ("y", y))?;
            ensure!(x.rank() >= 1 && x.dim(0) > 0, "{OP}: x has shape {:?}, expected [items, ...]", x.shape());
            let (xv, yv) = (act(OP, x)?, act(OP, y)?);
            let per_item = xv.len() / x.dim(0);
            scalars_down(x.dim(0));
            Ok(xv
                .chunks(per_item.max(1))
                .zip(yv.chunks(per_item.max(1)))
                .map(|(a, b)| a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum())
                .collect())
        })
    }

    fn sobolev_filter(&self, op: &Sobolev, r: &T, filter: Filter) -> Result<T> {
        timed(OpClass::Training, || Ok(like(op.apply(act("sobolev_filter", r)?, filter)?, r)))
    }

    fn sobolev_energy(&self, op: &Sobolev, r: &T) -> Result<Vec<f64>> {
        timed(OpClass::Training, || {
            let energies = op.energy(act("sobolev_energy", r)?)?;
            scalars_down(energies.len());
            Ok(energies)
        })
    }

    fn sobolev_energy_grad(&self, op: &Sobolev, r: &T) -> Result<(Vec<f64>, T)> {
        timed(OpClass::Training, || {
            let values = act("sobolev_energy_grad", r)?;
            let energies = op.energy(values)?;
            scalars_down(energies.len());
            Ok((energies, like(op.energy_grad(values)?, r)))
        })
    }

    fn sdpo_step(&self, op: &Sobolev, residuals: &PairResiduals<T>, beta: f64) -> Result<SdpoStep<T>> {
        timed(OpClass::Training, || {
            const OP: &str = "sdpo_step";
            let r = residuals;
            let host = PairResiduals {
                policy_winner: act(OP, r.policy_winner)?,
                reference_winner: act(OP, r.reference_winner)?,
                policy_loser: act(OP, r.policy_loser)?,
                reference_loser: act(OP, r.reference_loser)?,
            };
            let step = losses::sdpo_step(op, &host, beta)?;
            scalars_down(4 * step.energies.len() + 3);
            Ok(SdpoStep {
                energies: step.energies,
                objective: step.objective,
                policy_winner_grad: like(step.policy_winner_grad, r.policy_winner),
                policy_loser_grad: like(step.policy_loser_grad, r.policy_loser),
            })
        })
    }

    fn adamw_step(&self, config: &AdamWConfig, k: u64, lr: f64, tensors: &mut [AdamWTensor<'_, Self>]) -> Result<f64> {
        timed(OpClass::Training, || {
            const OP: &str = "adamw_step";
            for t in tensors.iter() {
                for (what, x) in [("m", &*t.m), ("v", &*t.v), ("gradient", t.grad)] {
                    expect_shape(what, OP, x.shape(), t.param.shape()).map_err(|e| anyhow::anyhow!("'{}': {e}", t.name))?;
                }
            }
            let grads = tensors.iter().map(|t| act(OP, t.grad)).collect::<Result<Vec<_>>>()?;
            let grad_norm = adamw::global_norm(grads.iter().copied())?;
            scalars_down(1);
            for t in tensors.iter_mut() {
                let g = act(OP, t.grad)?;
                let (p, m, v) = (f32_mut(OP, t.param)?, f32_mut(OP, t.m)?, f32_mut(OP, t.v)?);
                adamw::update(config, k, lr, grad_norm, p, m, v, g);
            }
            Ok(grad_norm)
        })
    }

    fn flow_target(&self, x0: &T, eps: &T, t: &[f32]) -> Result<FlowTarget<T>> {
        timed(OpClass::Training, || {
            same_shape("flow_target", ("x0", x0), ("eps", eps))?;
            scalars_up(t.len());
            let f = losses::flow_target(act("flow_target", x0)?, act("flow_target", eps)?, t)?;
            Ok(FlowTarget { x_t: like(f.x_t, x0), velocity: like(f.velocity, x0) })
        })
    }

    fn clean_estimate(&self, x_t: &T, v: &T, t: &[f32]) -> Result<T> {
        timed(OpClass::Training, || {
            same_shape("clean_estimate", ("x_t", x_t), ("v", v))?;
            scalars_up(t.len());
            Ok(like(losses::clean_estimate(act("clean_estimate", x_t)?, act("clean_estimate", v)?, t)?, x_t))
        })
    }

    fn sft_loss(&self, op: &Sobolev, v: &T, u: &T) -> Result<LossGrad<T>> {
        timed(OpClass::Training, || {
            same_shape("sft_loss", ("v", v), ("u", u))?;
            let l = losses::sft_loss(op, act("sft_loss", v)?, act("sft_loss", u)?)?;
            scalars_down(1);
            Ok(LossGrad { loss: l.loss, grad: like(l.grad, v) })
        })
    }

    fn amg_mimic_loss(&self, adversary: &T, eps: &T, baseline_x0: &T, hardness: Option<Hardness<T>>) -> Result<MimicLoss<T>> {
        timed(OpClass::Training, || {
            const OP: &str = "amg_mimic_loss";
            same_shape(OP, ("adversary", adversary), ("eps", eps))?;
            same_shape(OP, ("adversary", adversary), ("baseline_x0", baseline_x0))?;
            let host_hardness = match &hardness {
                Some(h) => Some(Hardness { op: h.op, weight: h.weight, loser_residual: act(OP, h.loser_residual)? }),
                None => None,
            };
            let m = losses::amg_mimic_loss(act(OP, adversary)?, act(OP, eps)?, act(OP, baseline_x0)?, host_hardness)?;
            scalars_down(2);
            let hardness_grad = m.hardness.map(|h| LossGrad { loss: h.loss, grad: like(h.grad, adversary) });
            Ok(MimicLoss {
                total: m.total,
                mimic: LossGrad { loss: m.mimic.loss, grad: like(m.mimic.grad, adversary) },
                hardness: hardness_grad,
            })
        })
    }

    fn limit_sobolev_norm(&self, op: &Sobolev, d: &T, rho: f64) -> Result<T> {
        timed(OpClass::Training, || Ok(like(losses::limit_sobolev_norm(op, act("limit_sobolev_norm", d)?, rho)?, d)))
    }

    fn limit_sobolev_norm_backward(&self, op: &Sobolev, d: &T, g: &T, rho: f64) -> Result<T> {
        timed(OpClass::Training, || {
            const OP: &str = "limit_sobolev_norm_backward";
            same_shape(OP, ("d", d), ("g", g))?;
            Ok(like(losses::limit_sobolev_norm_backward(op, act(OP, d)?, act(OP, g)?, rho)?, d))
        })
    }

    fn synthesize_loser(&self, op: &Sobolev, winner_x0: &T, eps: &T, t: &[f32], adversary: &T, rho: f64) -> Result<SynthesizedLoser<T>> {
        timed(OpClass::Training, || {
            const OP: &str = "synthesize_loser";
            same_shape(OP, ("winner_x0", winner_x0), ("eps", eps))?;
            same_shape(OP, ("winner_x0", winner_x0), ("adversary", adversary))?;
            scalars_up(t.len());
            let l = losses::synthesize_loser(op, act(OP, winner_x0)?, act(OP, eps)?, t, act(OP, adversary)?, rho)?;
            scalars_down(l.deviation_norm.len());
            Ok(SynthesizedLoser {
                x0: like(l.x0, winner_x0),
                x_t: like(l.x_t, winner_x0),
                velocity: like(l.velocity, winner_x0),
                deviation_norm: l.deviation_norm,
            })
        })
    }

    fn steepest_sobolev_deviation(&self, op: &Sobolev, g: &T, rho: f64) -> Result<T> {
        timed(OpClass::Training, || Ok(like(losses::steepest_sobolev_deviation(op, act("steepest_sobolev_deviation", g)?, rho)?, g)))
    }
}
