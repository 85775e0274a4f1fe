//! The training ops (`backend::training::TrainingOps`: the flow arithmetic, the Sobolev filters
//! and energies, S-DPO, the adversary's losses, the loser synthesis, AdamW) against their CPU
//! references, on seeded f32 fields whose sizes are not multiples of the kernels' tiles: odd
//! planes, a single-row plane, a PixelShuffle latent, the largest supported grid, tensors just
//! around the AdamW chunk. A backend that keeps the trait's composed defaults is checked on them
//! as much as on its kernels.

use super::{max_rel_err, Check, F32_TOLERANCE};
use crate::backend::adamw::AdamWConfig;
use crate::backend::cpu::CpuBackend;
use crate::backend::losses::{Hardness, PairResiduals, SdpoStep, DEFAULT_BETA};
use crate::backend::sobolev::{Filter, Grid, Sobolev, DEFAULT_EXPONENT};
use crate::backend::training::{AdamWTensor, TrainingOps};
use crate::backend::Backend;
use crate::sampler::gaussian_noise;
use crate::tensor::Tensor;
use anyhow::Result;
use loaders::{DType, HostTensor};

/// Relative error allowed for S-DPO's objective and gradients: the logit is (beta/2) dE with
/// beta = 2000, so the f32 rounding of the energies (about 1e-7 of an energy of order one) is
/// amplified a thousandfold before the sigmoid.
pub const SDPO_TOLERANCE: f64 = 1e-3;

/// The Sobolev operators checked: (items, field grid, PixelShuffle factor, exponent). The last
/// two are beyond the GPU's shared-memory DCT (128 a side): the MSE, and a pixel-shuffle latent
/// whose image grid is 140 x 132.
const SOBOLEV_CASES: [(usize, Grid, usize, f64); 6] = [
    (2, Grid { channels: 3, height: 17, width: 23 }, 1, DEFAULT_EXPONENT),
    (3, Grid { channels: 2, height: 1, width: 9 }, 1, DEFAULT_EXPONENT),
    (2, Grid { channels: 12, height: 5, width: 7 }, 2, DEFAULT_EXPONENT),
    (1, Grid { channels: 1, height: 128, width: 128 }, 1, DEFAULT_EXPONENT),
    (2, Grid { channels: 3, height: 144, width: 136 }, 1, 0.0),
    (1, Grid { channels: 12, height: 70, width: 66 }, 2, DEFAULT_EXPONENT),
];

fn host(values: Vec<f32>) -> HostTensor {
    HostTensor::from_f32(vec![values.len()], values)
}

fn host64(values: &[f64]) -> HostTensor {
    host(values.iter().map(|&v| v as f32).collect())
}

fn check(checks: &mut Vec<Check>, op: &str, shape: &str, tolerance: f64, candidate: HostTensor, reference: HostTensor) {
    checks.push(Check { op: op.into(), shape: shape.into(), max_rel_err: max_rel_err(&candidate, &reference), tolerance });
}

fn operator(grid: Grid, shuffle: usize, exponent: f64) -> Result<Sobolev> {
    if shuffle == 1 {
        Sobolev::new(grid, exponent)
    } else {
        Sobolev::for_pixel_shuffle(grid, shuffle, exponent)
    }
}

fn describe(items: usize, grid: Grid, shuffle: usize) -> String {
    format!("{items} x {grid}{}", if shuffle > 1 { format!(", pixel shuffle {shuffle}") } else { String::new() })
}

/// One f32 field batch `[items, C, H, W]`, the same values on both backends.
struct Field {
    values: HostTensor,
}

impl Field {
    fn random(items: usize, grid: Grid, seed: u64) -> Self {
        let values = gaussian_noise(items * grid.elements(), seed);
        Field { values: HostTensor::from_f32(vec![items, grid.channels, grid.height, grid.width], values) }
    }

    fn on<B: Backend>(&self, b: &B) -> Result<Tensor<B>> {
        b.upload(&self.values)
    }
}

/// `f` on the backend under test and on the CPU, its tensor outputs downloaded.
fn both<D: TrainingOps>(
    dut: &D,
    cpu: &CpuBackend,
    f: impl Fn(&dyn Fn(&Field) -> Result<Tensor<D>>, &D) -> Result<Tensor<D>>,
    g: impl Fn(&dyn Fn(&Field) -> Result<Tensor<CpuBackend>>, &CpuBackend) -> Result<Tensor<CpuBackend>>,
) -> Result<(HostTensor, HostTensor)> {
    let got = dut.download(&f(&|x: &Field| x.on(dut), dut)?)?;
    let want = cpu.download(&g(&|x: &Field| x.on(cpu), cpu)?)?;
    Ok((got, want))
}

/// Runs the same expression (over the fields' tensors on a backend `b`) on the backend under
/// test and on the CPU, and records the comparison of the tensors it returns.
macro_rules! compare {
    ($checks:expr, $dut:expr, $cpu:expr, $op:expr, $shape:expr, $tol:expr, |$b:ident, $on:ident| $body:expr) => {{
        let (got, want) = both($dut, $cpu, |$on, $b| $body, |$on, $b| $body)?;
        check($checks, $op, $shape, $tol, got, want);
    }};
}

/// Every training op of `dut` against the CPU reference.
pub fn training_checks<D: TrainingOps>(dut: &D, seed: u64) -> Result<Vec<Check>> {
    let cpu = &CpuBackend::new();
    let mut checks = Vec::new();
    let mut s = seed;
    let mut next = || {
        s += 1;
        s
    };

    // The flow arithmetic and the casts between fields and activations.
    let grid = Grid::new(3, 9, 7);
    let (x, y) = (Field::random(3, grid, next()), Field::random(3, grid, next()));
    let shape = describe(3, grid, 1);
    let t = [0.2f32, 0.55, 1.0];
    compare!(&mut checks, dut, cpu, "axpby", &shape, F32_TOLERANCE, |b, on| b.axpby(&[0.5, -1.0, 2.0], &on(&x)?, &[3.0], &on(&y)?));
    compare!(&mut checks, dut, cpu, "flow_target x_t", &shape, F32_TOLERANCE, |b, on| Ok(b.flow_target(&on(&x)?, &on(&y)?, &t)?.x_t));
    compare!(&mut checks, dut, cpu, "flow_target u", &shape, F32_TOLERANCE, |b, on| Ok(b.flow_target(&on(&x)?, &on(&y)?, &t)?.velocity));
    compare!(&mut checks, dut, cpu, "clean_estimate", &shape, F32_TOLERANCE, |b, on| b.clean_estimate(&on(&x)?, &on(&y)?, &t));
    compare!(&mut checks, dut, cpu, "cast f32 -> activations -> f32", &shape, super::BF16_OP_TOLERANCE, |b, on| {
        b.cast(&b.cast(&on(&x)?, b.activation_dtype())?, DType::F32)
    });
    let (got, want) = (dut.dot_items(&x.on(dut)?, &y.on(dut)?)?, cpu.dot_items(&x.on(cpu)?, &y.on(cpu)?)?);
    check(&mut checks, "dot_items", &shape, F32_TOLERANCE, host64(&got), host64(&want));

    for (items, grid, shuffle, exponent) in SOBOLEV_CASES {
        let op = operator(grid, shuffle, exponent)?;
        let shape = format!("{}, s = {exponent}", describe(items, grid, shuffle));
        let r = Field::random(items, grid, next());
        let (energy, grad) = dut.sobolev_energy_grad(&op, &r.on(dut)?)?;
        let (want_energy, want_grad) = cpu.sobolev_energy_grad(&op, &r.on(cpu)?)?;
        check(&mut checks, "sobolev energy_grad (energy)", &shape, F32_TOLERANCE, host64(&energy), host64(&want_energy));
        check(&mut checks, "sobolev energy_grad", &shape, F32_TOLERANCE, dut.download(&grad)?, cpu.download(&want_grad)?);
        let (energy, want) = (dut.sobolev_energy(&op, &r.on(dut)?)?, cpu.sobolev_energy(&op, &r.on(cpu)?)?);
        check(&mut checks, "sobolev energy", &shape, F32_TOLERANCE, host64(&energy), host64(&want));
        for filter in [Filter::Precision, Filter::Covariance, Filter::ColoredNoise] {
            compare!(&mut checks, dut, cpu, &format!("sobolev {}", filter.name()), &shape, F32_TOLERANCE, |b, on| {
                b.sobolev_filter(&op, &on(&r)?, filter)
            });
        }
    }

    // The SFT loss, the adversary's losses and the loser synthesis, on an odd grid and a
    // PixelShuffle latent.
    for (items, grid, shuffle) in [(3, Grid::new(2, 11, 6), 1), (2, Grid::new(12, 4, 5), 2)] {
        let op = operator(grid, shuffle, DEFAULT_EXPONENT)?;
        let shape = describe(items, grid, shuffle);
        let [a, b_, c] = [(); 3].map(|_| Field::random(items, grid, next()));
        let t: Vec<f32> = (0..items).map(|i| 0.15 + 0.7 * i as f32 / items as f32).collect();
        let (got, want) = (dut.sft_loss(&op, &a.on(dut)?, &b_.on(dut)?)?.loss, cpu.sft_loss(&op, &a.on(cpu)?, &b_.on(cpu)?)?.loss);
        check(&mut checks, "sft_loss", &shape, F32_TOLERANCE, host64(&[got]), host64(&[want]));
        compare!(&mut checks, dut, cpu, "sft_loss grad", &shape, F32_TOLERANCE, |b, on| Ok(b.sft_loss(&op, &on(&a)?, &on(&b_)?)?.grad));
        for weight in [0.0, 0.4] {
            let label = |what: &str| if weight == 0.0 { what.to_string() } else { format!("{what} (hardness)") };
            let (got, want) = (mimic_losses(dut, &op, [&a, &b_, &c], weight)?, mimic_losses(cpu, &op, [&a, &b_, &c], weight)?);
            check(&mut checks, &label("amg_mimic_loss"), &shape, F32_TOLERANCE, host64(&got), host64(&want));
            compare!(&mut checks, dut, cpu, &label("amg_mimic_loss grad"), &shape, F32_TOLERANCE, |b, on| {
                let r = on(&c)?;
                let hard = (weight > 0.0).then_some(Hardness { op: &op, weight, loser_residual: &r });
                Ok(b.amg_mimic_loss(&on(&a)?, &on(&b_)?, &r, hard)?.mimic.grad)
            });
        }
        compare!(&mut checks, dut, cpu, "amg_mimic_loss hardness grad", &shape, F32_TOLERANCE, |b, on| {
            let r = on(&c)?;
            let m = b.amg_mimic_loss(&on(&a)?, &on(&b_)?, &r, Some(Hardness { op: &op, weight: 0.4, loser_residual: &r }))?;
            m.hardness.map(|h| h.grad).ok_or_else(|| anyhow::anyhow!("no hardness term"))
        });
        // Radii that limit some items and leave others: the norms of these fields are about 1.
        let rho = cpu.sobolev_energy(&op, &a.on(cpu)?)?.iter().map(|e| e.sqrt()).sum::<f64>() / items as f64;
        compare!(&mut checks, dut, cpu, "limit_sobolev_norm", &shape, F32_TOLERANCE, |b, on| b.limit_sobolev_norm(&op, &on(&a)?, rho));
        compare!(&mut checks, dut, cpu, "limit_sobolev_norm_backward", &shape, F32_TOLERANCE, |b, on| {
            b.limit_sobolev_norm_backward(&op, &on(&a)?, &on(&b_)?, rho)
        });
        compare!(&mut checks, dut, cpu, "steepest_sobolev_deviation", &shape, F32_TOLERANCE, |b, on| {
            b.steepest_sobolev_deviation(&op, &on(&a)?, 0.3)
        });
        for (what, pick) in [("x0", 0), ("x_t", 1), ("u", 2)] {
            compare!(&mut checks, dut, cpu, &format!("synthesize_loser {what}"), &shape, F32_TOLERANCE, |b, on| {
                let l = b.synthesize_loser(&op, &on(&a)?, &on(&b_)?, &t, &on(&c)?, 0.5 * rho)?;
                Ok([l.x0, l.x_t, l.velocity].into_iter().nth(pick).expect("three fields"))
            });
        }
    }

    // The last case's image grid (132 x 140) is beyond the GPU's shared-memory DCT.
    for (pairs, grid, shuffle) in [(3, Grid::new(3, 12, 10), 1), (2, Grid::new(12, 6, 5), 2), (1, Grid::new(12, 66, 70), 2)] {
        let op = operator(grid, shuffle, DEFAULT_EXPONENT)?;
        let fields = sdpo_fields(grid, pairs, &mut next);
        let shape = format!("{pairs} pairs x {grid}{}", if shuffle > 1 { format!(", pixel shuffle {shuffle}") } else { String::new() });
        let run = |same: bool| -> Result<(SdpoStep<HostTensor>, SdpoStep<HostTensor>)> {
            Ok((sdpo_on(dut, &op, &fields, same)?, sdpo_on(cpu, &op, &fields, same)?))
        };
        let (got, want) = run(false)?;
        compare_sdpo(&mut checks, &shape, got, want);
        // The first step of Dual-LoRA: policy = reference gives dE = 0 and the loss ln 2 exactly.
        let (got, want) = run(true)?;
        compare_sdpo(&mut checks, &format!("{shape}, policy = reference"), got, want);
    }

    let sizes = [1usize, 3, 2047, 2048, 2049, 5000];
    for (clip, max_grad_norm) in [("clipped", Some(1.0)), ("unclipped", None)] {
        let config = AdamWConfig { lr: 1e-2, weight_decay: 0.05, warmup_steps: 2, max_grad_norm, ..AdamWConfig::default() };
        let params: Vec<Vec<f32>> = sizes.iter().map(|&n| gaussian_noise(n, next())).collect();
        let grads: Vec<Vec<Vec<f32>>> = (0..3).map(|_| sizes.iter().map(|&n| gaussian_noise(n, next())).collect()).collect();
        let (got, got_norms) = adamw_steps(dut, &config, &params, &grads)?;
        let (want, want_norms) = adamw_steps(cpu, &config, &params, &grads)?;
        let shape = format!("{sizes:?}, 3 steps, {clip}");
        for (k, what) in ["adamw params", "adamw m", "adamw v"].into_iter().enumerate() {
            check(&mut checks, what, &shape, F32_TOLERANCE, host(got[k].clone()), host(want[k].clone()));
        }
        check(&mut checks, "adamw grad_norm", &shape, F32_TOLERANCE, host64(&got_norms), host64(&want_norms));
    }
    Ok(checks)
}

/// The mimic loss's total and mimic parts on `b` for the adversary, eps and loser residual
/// `[a, e, r]`, with the hardness term of `weight` unless it is 0.
fn mimic_losses<B: TrainingOps>(b: &B, op: &Sobolev, [a, e, r]: [&Field; 3], weight: f64) -> Result<[f64; 2]> {
    let r = r.on(b)?;
    let hard = (weight > 0.0).then_some(Hardness { op, weight, loser_residual: &r });
    let m = b.amg_mimic_loss(&a.on(b)?, &e.on(b)?, &r, hard)?;
    Ok([m.total, m.mimic.loss])
}

/// Three AdamW steps (the moments carried over, bias correction and warm-up all move) of f32
/// tensors on `b`; returns the parameters, first and second moments (all tensors concatenated)
/// and the norms.
fn adamw_steps<B: TrainingOps>(
    b: &B,
    config: &AdamWConfig,
    params: &[Vec<f32>],
    grads: &[Vec<Vec<f32>>],
) -> Result<([Vec<f32>; 3], Vec<f64>)> {
    let up = |v: &[f32]| b.upload(&HostTensor::from_f32(vec![v.len()], v.to_vec()));
    let mut p = params.iter().map(|v| up(v)).collect::<Result<Vec<_>>>()?;
    let mut m = params.iter().map(|v| up(&vec![0.0; v.len()])).collect::<Result<Vec<_>>>()?;
    let mut v = params.iter().map(|v| up(&vec![0.0; v.len()])).collect::<Result<Vec<_>>>()?;
    let mut norms = Vec::new();
    for (k, step) in grads.iter().enumerate() {
        let g = step.iter().map(|v| up(v)).collect::<Result<Vec<_>>>()?;
        let mut tensors: Vec<AdamWTensor<B>> = p
            .iter_mut()
            .zip(m.iter_mut())
            .zip(v.iter_mut())
            .zip(&g)
            .map(|(((param, m), v), grad)| AdamWTensor { name: "tensor", param, m, v, grad })
            .collect();
        let lr = config.lr * ((k + 1) as f64 / config.warmup_steps.max(1) as f64).min(1.0);
        norms.push(b.adamw_step(config, k as u64 + 1, lr, &mut tensors)?);
    }
    let all = |ts: &[Tensor<B>]| -> Result<Vec<f32>> {
        Ok(ts.iter().map(|t| b.download(t).map(|h| h.to_f32())).collect::<Result<Vec<_>>>()?.concat())
    };
    Ok(([all(&p)?, all(&m)?, all(&v)?], norms))
}

/// The residuals `[policy winner, reference winner, policy loser, reference loser]` of `pairs`
/// pairs: the policy's a small step from the reference's, so that (beta/2) dE is of order one
/// and the sigmoid is neither saturated nor flat.
pub(crate) fn sdpo_fields(grid: Grid, pairs: usize, seeds: &mut impl FnMut() -> u64) -> [HostTensor; 4] {
    let n = pairs * grid.elements();
    let step = 0.3 / (grid.elements() as f32).sqrt();
    let (reference_winner, reference_loser) = (gaussian_noise(n, seeds()), gaussian_noise(n, seeds()));
    let mut moved = |base: &[f32]| base.iter().zip(gaussian_noise(n, seeds())).map(|(&b, d)| b + step * d).collect::<Vec<f32>>();
    let (policy_winner, policy_loser) = (moved(&reference_winner), moved(&reference_loser));
    let shape = vec![pairs, grid.channels, grid.height, grid.width];
    [policy_winner, reference_winner, policy_loser, reference_loser].map(|v| HostTensor::from_f32(shape.clone(), v))
}

/// S-DPO of `fields` on `b` (with the policy's residuals replaced by the reference's when
/// `same`), its gradients downloaded.
fn sdpo_on<B: TrainingOps>(b: &B, op: &Sobolev, fields: &[HostTensor; 4], same: bool) -> Result<SdpoStep<HostTensor>> {
    let [pw, rw, pl, rl] = [&fields[0], &fields[1], &fields[2], &fields[3]].map(|f| b.upload(f));
    let (pw, rw, pl, rl) = (pw?, rw?, pl?, rl?);
    let residuals = match same {
        false => PairResiduals { policy_winner: &pw, reference_winner: &rw, policy_loser: &pl, reference_loser: &rl },
        true => PairResiduals { policy_winner: &rw, reference_winner: &rw, policy_loser: &rl, reference_loser: &rl },
    };
    let step = b.sdpo_step(op, &residuals, DEFAULT_BETA)?;
    Ok(SdpoStep {
        energies: step.energies,
        objective: step.objective,
        policy_winner_grad: b.download(&step.policy_winner_grad)?,
        policy_loser_grad: b.download(&step.policy_loser_grad)?,
    })
}

fn compare_sdpo(checks: &mut Vec<Check>, shape: &str, got: SdpoStep<HostTensor>, want: SdpoStep<HostTensor>) {
    let energies = |step: &SdpoStep<HostTensor>| {
        let values: Vec<f64> =
            step.energies.iter().flat_map(|e| [e.policy_winner, e.reference_winner, e.policy_loser, e.reference_loser]).collect();
        host64(&values)
    };
    let objective = |step: &SdpoStep<HostTensor>| host64(&[step.objective.loss, step.objective.accuracy, step.objective.reward_margin]);
    check(checks, "sdpo energies", shape, F32_TOLERANCE, energies(&got), energies(&want));
    check(checks, "sdpo loss/accuracy/margin", shape, SDPO_TOLERANCE, objective(&got), objective(&want));
    let (a, b) = (host64(&got.objective.winner_energy_grad), host64(&want.objective.winner_energy_grad));
    check(checks, "sdpo dloss/dE", shape, SDPO_TOLERANCE, a, b);
    check(checks, "sdpo winner grad", shape, SDPO_TOLERANCE, got.policy_winner_grad, want.policy_winner_grad);
    check(checks, "sdpo loser grad", shape, SDPO_TOLERANCE, got.policy_loser_grad, want.policy_loser_grad);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_reference_passes_against_itself_exactly() {
        let checks = training_checks(&CpuBackend::new(), 3).unwrap();
        let table = super::super::render_table(&checks);
        assert!(checks.iter().all(|c| c.max_rel_err == 0.0), "{table}");
        let ops: std::collections::BTreeSet<&str> = checks.iter().map(|c| c.op.as_str()).collect();
        for op in [
            "axpby",
            "dot_items",
            "flow_target x_t",
            "sobolev energy",
            "sobolev energy_grad",
            "sobolev covariance",
            "sft_loss grad",
            "amg_mimic_loss hardness grad",
            "limit_sobolev_norm_backward",
            "synthesize_loser u",
            "steepest_sobolev_deviation",
            "sdpo loser grad",
            "adamw v",
            "adamw grad_norm",
        ] {
            assert!(ops.contains(op), "{op} is never checked:\n{table}");
        }
    }

    /// The S-DPO inputs are in the regime the check means to cover: logits of order one.
    #[test]
    fn sdpo_check_inputs_give_logits_of_order_one() {
        let grid = Grid::new(3, 12, 10);
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let mut seed = 0;
        let fields = sdpo_fields(grid, 4, &mut || {
            seed += 1;
            seed
        });
        let step = sdpo_on(&CpuBackend::new(), &op, &fields, false).unwrap();
        let logits: Vec<f64> = step.energies.iter().map(|e| 0.5 * DEFAULT_BETA * e.delta()).collect();
        assert!(logits.iter().all(|z| z.abs() < 10.0) && logits.iter().any(|z| z.abs() > 0.1), "logits {logits:?}");
    }
}
