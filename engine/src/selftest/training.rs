//! The training kernels that are not model ops (`train::kernels::TrainingKernels`: AdamW, the
//! Sobolev filters and energies, S-DPO) against their CPU references, on seeded inputs whose
//! sizes are not multiples of the kernels' tiles: odd planes, a single-row plane, a PixelShuffle
//! latent, the largest supported grid, tensors just around the AdamW chunk.

use super::{max_rel_err, Check, F32_TOLERANCE};
use crate::backend::cpu::CpuBackend;
use crate::sampler::gaussian_noise;
use crate::train::adamw::{AdamW, AdamWConfig};
use crate::train::kernels::TrainingKernels;
use crate::train::loss::{PairResiduals, SdpoStep, DEFAULT_BETA};
use crate::train::sobolev::{Filter, Grid, Sobolev, DEFAULT_EXPONENT};
use anyhow::Result;
use loaders::HostTensor;
use std::collections::BTreeMap;

/// Relative error allowed for S-DPO's objective and gradients: the logit is (beta/2) dE with
/// beta = 2000, so the f32 rounding of the energies (about 1e-7 of an energy of order one) is
/// amplified a thousandfold before the sigmoid.
pub const SDPO_TOLERANCE: f64 = 1e-3;

/// The Sobolev operators checked: (items, field grid, PixelShuffle factor).
const SOBOLEV_CASES: [(usize, Grid, usize); 4] = [
    (2, Grid { channels: 3, height: 17, width: 23 }, 1),
    (3, Grid { channels: 2, height: 1, width: 9 }, 1),
    (2, Grid { channels: 12, height: 5, width: 7 }, 2),
    (1, Grid { channels: 1, height: 128, width: 128 }, 1),
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

fn operator(grid: Grid, shuffle: usize) -> Result<Sobolev> {
    if shuffle == 1 {
        Sobolev::new(grid, DEFAULT_EXPONENT)
    } else {
        Sobolev::for_pixel_shuffle(grid, shuffle, DEFAULT_EXPONENT)
    }
}

/// Every training kernel of `dut` against the CPU reference.
pub fn training_checks<D: TrainingKernels>(dut: &D, seed: u64) -> Result<Vec<Check>> {
    let cpu = &CpuBackend::new();
    let mut checks = Vec::new();
    let mut s = seed;
    let mut next = || {
        s += 1;
        s
    };

    for (items, grid, shuffle) in SOBOLEV_CASES {
        let op = operator(grid, shuffle)?;
        let shape = format!("{items} x {grid}{}", if shuffle > 1 { format!(", pixel shuffle {shuffle}") } else { String::new() });
        let r = gaussian_noise(items * grid.elements(), next());
        let (energy, grad) = dut.sobolev_energy_grad(&op, &r)?;
        let (want_energy, want_grad) = cpu.sobolev_energy_grad(&op, &r)?;
        check(&mut checks, "sobolev energy", &shape, F32_TOLERANCE, host64(&energy), host64(&want_energy));
        check(&mut checks, "sobolev energy_grad", &shape, F32_TOLERANCE, host(grad), host(want_grad));
        for filter in [Filter::Precision, Filter::Covariance, Filter::ColoredNoise] {
            let (got, want) = (dut.sobolev_filter(&op, &r, filter)?, cpu.sobolev_filter(&op, &r, filter)?);
            check(&mut checks, &format!("sobolev {}", filter.name()), &shape, F32_TOLERANCE, host(got), host(want));
        }
    }

    for (pairs, grid, shuffle) in [(3, Grid::new(3, 12, 10), 1), (2, Grid::new(12, 6, 5), 2)] {
        let op = operator(grid, shuffle)?;
        let [policy_winner, reference_winner, policy_loser, reference_loser] = sdpo_fields(grid, pairs, &mut next);
        let shape = format!("{pairs} pairs x {grid}{}", if shuffle > 1 { format!(", pixel shuffle {shuffle}") } else { String::new() });
        let residuals = PairResiduals {
            policy_winner: &policy_winner,
            reference_winner: &reference_winner,
            policy_loser: &policy_loser,
            reference_loser: &reference_loser,
        };
        compare_sdpo(&mut checks, &shape, dut.sdpo_step(&op, &residuals, DEFAULT_BETA)?, cpu.sdpo_step(&op, &residuals, DEFAULT_BETA)?);
        // The first step of Dual-LoRA: policy = reference gives dE = 0 and the loss ln 2 exactly.
        let same = PairResiduals { policy_winner: &reference_winner, policy_loser: &reference_loser, ..residuals };
        compare_sdpo(
            &mut checks,
            &format!("{shape}, policy = reference"),
            dut.sdpo_step(&op, &same, DEFAULT_BETA)?,
            cpu.sdpo_step(&op, &same, DEFAULT_BETA)?,
        );
    }

    let sizes = [1usize, 3, 2047, 2048, 2049, 5000];
    for (clip, max_grad_norm) in [("clipped", Some(1.0)), ("unclipped", None)] {
        let config = AdamWConfig { lr: 1e-2, weight_decay: 0.05, warmup_steps: 2, max_grad_norm, ..AdamWConfig::default() };
        let params: BTreeMap<String, Vec<f32>> = sizes.iter().map(|&n| (format!("tensor{n}"), gaussian_noise(n, next()))).collect();
        let (mut got, mut want) = ((AdamW::new(config.clone()), params.clone()), (AdamW::new(config), params));
        let mut norms = (Vec::new(), Vec::new());
        // Three steps: the moments carried over, bias correction and warm-up all move.
        for _ in 0..3 {
            let grads: BTreeMap<String, Vec<f32>> = sizes.iter().map(|&n| (format!("tensor{n}"), gaussian_noise(n, next()))).collect();
            norms.0.push(dut.adamw_step(&mut got.0, &mut got.1, &grads)?.grad_norm);
            norms.1.push(cpu.adamw_step(&mut want.0, &mut want.1, &grads)?.grad_norm);
        }
        let shape = format!("{sizes:?}, 3 steps, {clip}");
        let all = |map: &BTreeMap<String, Vec<f32>>| host(map.values().flatten().copied().collect());
        let moments =
            |opt: &AdamW, first: bool| host(opt.moments.values().flat_map(|m| if first { &m.m } else { &m.v }).copied().collect());
        check(&mut checks, "adamw params", &shape, F32_TOLERANCE, all(&got.1), all(&want.1));
        check(&mut checks, "adamw m", &shape, F32_TOLERANCE, moments(&got.0, true), moments(&want.0, true));
        check(&mut checks, "adamw v", &shape, F32_TOLERANCE, moments(&got.0, false), moments(&want.0, false));
        check(&mut checks, "adamw grad_norm", &shape, F32_TOLERANCE, host64(&norms.0), host64(&norms.1));
    }
    Ok(checks)
}

/// The residuals `[policy winner, reference winner, policy loser, reference loser]` of `pairs`
/// pairs: the policy's a small step from the reference's, so that (beta/2) dE is of order one
/// and the sigmoid is neither saturated nor flat.
fn sdpo_fields(grid: Grid, pairs: usize, seeds: &mut impl FnMut() -> u64) -> [Vec<f32>; 4] {
    let n = pairs * grid.elements();
    let step = 0.3 / (grid.elements() as f32).sqrt();
    let (reference_winner, reference_loser) = (gaussian_noise(n, seeds()), gaussian_noise(n, seeds()));
    let mut moved = |base: &[f32]| base.iter().zip(gaussian_noise(n, seeds())).map(|(&b, d)| b + step * d).collect::<Vec<f32>>();
    let (policy_winner, policy_loser) = (moved(&reference_winner), moved(&reference_loser));
    [policy_winner, reference_winner, policy_loser, reference_loser]
}

fn compare_sdpo(checks: &mut Vec<Check>, shape: &str, got: SdpoStep, want: SdpoStep) {
    let energies = |step: &SdpoStep| {
        let values: Vec<f64> =
            step.energies.iter().flat_map(|e| [e.policy_winner, e.reference_winner, e.policy_loser, e.reference_loser]).collect();
        host64(&values)
    };
    let objective = |step: &SdpoStep| host64(&[step.objective.loss, step.objective.accuracy, step.objective.reward_margin]);
    check(checks, "sdpo energies", shape, F32_TOLERANCE, energies(&got), energies(&want));
    check(checks, "sdpo loss/accuracy/margin", shape, SDPO_TOLERANCE, objective(&got), objective(&want));
    let (a, b) = (host64(&got.objective.winner_energy_grad), host64(&want.objective.winner_energy_grad));
    check(checks, "sdpo dloss/dE", shape, SDPO_TOLERANCE, a, b);
    check(checks, "sdpo winner grad", shape, SDPO_TOLERANCE, host(got.policy_winner_grad), host(want.policy_winner_grad));
    check(checks, "sdpo loser grad", shape, SDPO_TOLERANCE, host(got.policy_loser_grad), host(want.policy_loser_grad));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::adamw::StepStats;

    /// The CPU reference with one planted bug per kernel family, each of the kind a GPU kernel
    /// makes: the Sobolev filters run with height and width swapped (an indexing bug), the S-DPO
    /// loser gradient leaves its last element unwritten (the poison), and every AdamW step is
    /// (1 - beta1) too short, as if step 1's first moment were not bias-corrected.
    struct Faulty;

    impl TrainingKernels for Faulty {
        fn sobolev_energy_grad(&self, op: &Sobolev, r: &[f32]) -> Result<(Vec<f64>, Vec<f32>)> {
            CpuBackend::new().sobolev_energy_grad(op, r)
        }

        fn sobolev_filter(&self, op: &Sobolev, r: &[f32], filter: Filter) -> Result<Vec<f32>> {
            let g = op.field_grid();
            let swapped = Sobolev::new(Grid::new(g.channels, g.width, g.height), op.exponent())?;
            swapped.apply(r, filter)
        }

        fn sdpo_step(&self, op: &Sobolev, residuals: &PairResiduals, beta: f64) -> Result<SdpoStep> {
            let mut step = CpuBackend::new().sdpo_step(op, residuals, beta)?;
            *step.policy_loser_grad.last_mut().unwrap() = f32::NAN;
            Ok(step)
        }

        fn adamw_step(
            &self,
            opt: &mut AdamW,
            params: &mut BTreeMap<String, Vec<f32>>,
            grads: &BTreeMap<String, Vec<f32>>,
        ) -> Result<StepStats> {
            let before = params.clone();
            let stats = opt.step(params, grads)?;
            for (p, old) in params.values_mut().zip(before.values()) {
                p.iter_mut().zip(old).for_each(|(new, &old)| *new = old + (*new - old) * (1.0 - opt.config.beta1 as f32));
            }
            Ok(stats)
        }
    }

    #[test]
    fn the_cpu_reference_passes_against_itself_exactly() {
        let checks = training_checks(&CpuBackend::new(), 3).unwrap();
        let table = super::super::render_table(&checks);
        assert!(checks.iter().all(|c| c.max_rel_err == 0.0), "{table}");
        let ops: std::collections::BTreeSet<&str> = checks.iter().map(|c| c.op.as_str()).collect();
        for op in ["sobolev energy", "sobolev energy_grad", "sobolev covariance", "sdpo loser grad", "adamw v", "adamw grad_norm"] {
            assert!(ops.contains(op), "{op} is never checked:\n{table}");
        }
    }

    #[test]
    fn each_planted_bug_fails_its_checks_and_only_those() {
        let checks = training_checks(&Faulty, 3).unwrap();
        let table = super::super::render_table(&checks);
        for c in &checks {
            // The swap is invisible on a square plane (128 x 128) and on a single row (1 x 9:
            // the same weights in the same order); the short step moves the parameters, not the
            // moments or the norm.
            let swap_visible = !c.shape.contains("128x128") && !c.shape.contains("2x1x9");
            let planted = (c.op.starts_with("sobolev ") && !c.op.starts_with("sobolev energy") && swap_visible)
                || c.op == "sdpo loser grad"
                || c.op == "adamw params";
            assert_eq!(c.passed(), !planted, "{}: {}\n{table}", c.op, c.shape);
        }
    }

    /// The S-DPO inputs are in the regime the check means to cover: logits of order one.
    #[test]
    fn sdpo_check_inputs_give_logits_of_order_one() {
        let grid = Grid::new(3, 12, 10);
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let mut seed = 0;
        let [pw, rw, pl, rl] = sdpo_fields(grid, 4, &mut || {
            seed += 1;
            seed
        });
        let residuals = PairResiduals { policy_winner: &pw, reference_winner: &rw, policy_loser: &pl, reference_loser: &rl };
        let step = crate::train::loss::sdpo_step(&op, &residuals, DEFAULT_BETA).unwrap();
        let logits: Vec<f64> = step.energies.iter().map(|e| 0.5 * DEFAULT_BETA * e.delta()).collect();
        assert!(logits.iter().all(|z| z.abs() < 10.0) && logits.iter().any(|z| z.abs() > 0.1), "logits {logits:?}");
    }
}
