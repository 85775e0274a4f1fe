//! `TrainingKernels` on the GPU: host data uploaded, the kernels of `optim.rs` and `sobolev.rs`
//! run with fresh outputs NaN-poisoned while the self-test asks for it, results downloaded.

use super::optim::AdamWTensor;
use super::sobolev::CudaSobolev;
use super::CudaBackend;
use crate::train::adamw::{AdamW, Moments, StepStats};
use crate::train::kernels::TrainingKernels;
use crate::train::loss::{PairEnergies, PairResiduals, SdpoObjective, SdpoStep};
use crate::train::sobolev::{Filter, Sobolev};
use anyhow::{ensure, Result};
use cudarc::driver::CudaSlice;
use std::collections::BTreeMap;

impl CudaBackend {
    /// An f32 device buffer holding `values`, for the callers of the training kernels (master
    /// parameters, moments, residuals).
    pub fn upload_f32(&self, values: &[f32]) -> Result<CudaSlice<f32>> {
        Ok(self.stream().clone_htod(values)?)
    }
}

impl TrainingKernels for CudaBackend {
    fn sobolev_energy_grad(&self, op: &Sobolev, r: &[f32]) -> Result<(Vec<f64>, Vec<f32>)> {
        let device = CudaSobolev::new(self, op)?;
        let energy = device.energy_grad(self, &self.stream().clone_htod(r)?)?;
        Ok((device.item_energies(self, &energy.plane_energy)?, self.stream().clone_dtoh(&energy.grad)?))
    }

    fn sobolev_filter(&self, op: &Sobolev, r: &[f32], filter: Filter) -> Result<Vec<f32>> {
        let device = CudaSobolev::new(self, op)?;
        let out = device.filter(self, &self.stream().clone_htod(r)?, filter)?;
        Ok(self.stream().clone_dtoh(&out)?)
    }

    fn sdpo_step(&self, op: &Sobolev, residuals: &PairResiduals, beta: f64) -> Result<SdpoStep> {
        let device = CudaSobolev::new(self, op)?;
        let s = self.stream();
        let r = residuals;
        let fields = [r.policy_winner, r.reference_winner, r.policy_loser, r.reference_loser].map(|f| s.clone_htod(f));
        let [pw, rw, pl, rl] = fields;
        let step = device.sdpo(self, [&pw?, &rw?, &pl?, &rl?], beta)?;
        let pair_energy = s.clone_dtoh(&step.pair_energy)?;
        let pairs = pair_energy.len() / 4;
        let summary = s.clone_dtoh(&step.summary)?;
        Ok(SdpoStep {
            energies: (0..pairs)
                .map(|i| PairEnergies {
                    policy_winner: pair_energy[i],
                    reference_winner: pair_energy[pairs + i],
                    policy_loser: pair_energy[2 * pairs + i],
                    reference_loser: pair_energy[3 * pairs + i],
                })
                .collect(),
            objective: SdpoObjective {
                loss: summary[0],
                accuracy: summary[1],
                reward_margin: summary[2],
                winner_energy_grad: s.clone_dtoh(&step.winner_energy_grad)?,
            },
            policy_winner_grad: s.clone_dtoh(&step.policy_winner_grad)?,
            policy_loser_grad: s.clone_dtoh(&step.policy_loser_grad)?,
        })
    }

    /// The CPU step's bookkeeping (names, lengths, moments starting at zero, the step count and
    /// the warmed-up learning rate) around one device step of every tensor.
    fn adamw_step(
        &self,
        opt: &mut AdamW,
        params: &mut BTreeMap<String, Vec<f32>>,
        grads: &BTreeMap<String, Vec<f32>>,
    ) -> Result<StepStats> {
        ensure!(
            params.keys().eq(grads.keys()),
            "AdamW: parameters {:?} and gradients {:?} differ",
            params.keys().collect::<Vec<_>>(),
            grads.keys().collect::<Vec<_>>()
        );
        let s = self.stream();
        let mut device = Vec::with_capacity(params.len());
        for (name, p) in params.iter() {
            let zeros = || vec![0f32; p.len()];
            let (m, v) = opt.moments.get(name).map_or_else(|| (zeros(), zeros()), |mom| (mom.m.clone(), mom.v.clone()));
            device.push((s.clone_htod(p)?, s.clone_htod(&m)?, s.clone_htod(&v)?, s.clone_htod(&grads[name])?));
        }
        let (k, config) = (opt.step + 1, opt.config.clone());
        let lr = opt.lr_at(k);
        let mut tensors: Vec<AdamWTensor> =
            params.keys().zip(device.iter_mut()).map(|(name, (param, m, v, grad))| AdamWTensor { name, param, m, v, grad }).collect();
        let stats = self.adamw_step(&mut tensors, &config, k, lr)?;
        let grad_norm = self.grad_norm(&stats)?;
        for ((name, p), (param, m, v, _)) in params.iter_mut().zip(&device) {
            *p = s.clone_dtoh(param)?;
            opt.moments.insert(name.clone(), Moments { m: s.clone_dtoh(m)?, v: s.clone_dtoh(v)? });
        }
        opt.step = k;
        Ok(StepStats { grad_norm, lr })
    }
}
