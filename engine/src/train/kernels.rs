//! The fused training kernels that are not model ops (AdamW, the Sobolev filters and energies,
//! S-DPO) as host-level operations with the signatures of their host references, so that the
//! self-test (`selftest::training_checks`) can run any implementation on the same inputs and
//! compare it with the CPU. The CPU backend implements them with `adamw`, `sobolev` and `loss`;
//! the CUDA backend uploads, runs its kernels and downloads.

use super::adamw::{AdamW, StepStats};
use super::loss::{sdpo_step, PairResiduals, SdpoStep};
use super::sobolev::{Filter, Sobolev};
use crate::backend::cpu::CpuBackend;
use anyhow::Result;
use std::collections::BTreeMap;

pub trait TrainingKernels {
    /// `op.energy(r)` and `op.energy_grad(r)` together.
    fn sobolev_energy_grad(&self, op: &Sobolev, r: &[f32]) -> Result<(Vec<f64>, Vec<f32>)>;

    /// `op.apply(r, filter)`.
    fn sobolev_filter(&self, op: &Sobolev, r: &[f32], filter: Filter) -> Result<Vec<f32>>;

    /// `loss::sdpo_step`.
    fn sdpo_step(&self, op: &Sobolev, residuals: &PairResiduals, beta: f64) -> Result<SdpoStep>;

    /// `opt.step(params, grads)`.
    fn adamw_step(&self, opt: &mut AdamW, params: &mut BTreeMap<String, Vec<f32>>, grads: &BTreeMap<String, Vec<f32>>)
        -> Result<StepStats>;
}

impl TrainingKernels for CpuBackend {
    fn sobolev_energy_grad(&self, op: &Sobolev, r: &[f32]) -> Result<(Vec<f64>, Vec<f32>)> {
        Ok((op.energy(r)?, op.energy_grad(r)?))
    }

    fn sobolev_filter(&self, op: &Sobolev, r: &[f32], filter: Filter) -> Result<Vec<f32>> {
        op.apply(r, filter)
    }

    fn sdpo_step(&self, op: &Sobolev, residuals: &PairResiduals, beta: f64) -> Result<SdpoStep> {
        sdpo_step(op, residuals, beta)
    }

    fn adamw_step(
        &self,
        opt: &mut AdamW,
        params: &mut BTreeMap<String, Vec<f32>>,
        grads: &BTreeMap<String, Vec<f32>>,
    ) -> Result<StepStats> {
        opt.step(params, grads)
    }
}
