//! `TrainingOps` on the GPU: the flow arithmetic on f32 fields (`fields.rs`), the Sobolev
//! operator and the fused S-DPO step (`sobolev.rs`, tables uploaded once per operator), and
//! AdamW over device-resident master weights and moments (`optim.rs`). Only per-item scalars
//! cross to the host: energies, the S-DPO objective, the gradient norm. The composed ops (the
//! SFT loss, the adversary's losses, the loser synthesis) are the trait's defaults.

use super::optim::AdamWSlices;
use super::sobolev::{operator_key, CudaSobolev};
use super::{f32_of, fields, CudaBackend, CudaStorage, T};
use crate::backend::adamw::AdamWConfig;
use crate::backend::expect_shape;
use crate::backend::losses::{PairEnergies, PairResiduals, SdpoObjective, SdpoStep};
use crate::backend::profile::OpClass;
use crate::backend::sobolev::{Filter, Sobolev};
use crate::backend::training::{AdamWTensor, TrainingOps};
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use cudarc::driver::CudaSlice;
use std::sync::Arc;

impl CudaBackend {
    /// `op`'s tables on the device, uploaded at the first use of the operator.
    fn sobolev_tables(&self, op: &Sobolev) -> Result<Arc<CudaSobolev>> {
        let key = operator_key(op);
        if let Some(tables) = self.sobolev_tables.lock().unwrap().get(&key) {
            return Ok(tables.clone());
        }
        let tables = Arc::new(CudaSobolev::new(self, op)?);
        self.sobolev_tables.lock().unwrap().insert(key, tables.clone());
        Ok(tables)
    }
}

fn field(values: CudaSlice<f32>, like: &T) -> T {
    Tensor::from_storage(CudaStorage::F32(values), like.shape().to_vec())
}

fn f32_mut<'a>(op: &str, t: &'a mut T) -> Result<&'a mut CudaSlice<f32>> {
    match t.storage_mut() {
        CudaStorage::F32(s) => Ok(s),
        other => bail!("{op}: expected an f32 tensor, found {}", other.dtype()),
    }
}

impl TrainingOps for CudaBackend {
    fn axpby(&self, a: &[f32], x: &T, b: &[f32], y: &T) -> Result<T> {
        self.timed(OpClass::Training, || fields::axpby(self, a, x, b, y))
    }

    fn dot_items(&self, x: &T, y: &T) -> Result<Vec<f64>> {
        self.timed(OpClass::Training, || fields::dot_items(self, x, y))
    }

    fn sobolev_filter(&self, op: &Sobolev, r: &T, filter: Filter) -> Result<T> {
        self.timed(OpClass::Training, || Ok(field(self.sobolev_tables(op)?.filter(self, f32_of("sobolev_filter", "r", r)?, filter)?, r)))
    }

    fn sobolev_energy(&self, op: &Sobolev, r: &T) -> Result<Vec<f64>> {
        self.timed(OpClass::Training, || {
            let tables = self.sobolev_tables(op)?;
            let planes = tables.energy(self, f32_of("sobolev_energy", "r", r)?)?;
            tables.item_energies(self, &planes)
        })
    }

    fn sobolev_energy_grad(&self, op: &Sobolev, r: &T) -> Result<(Vec<f64>, T)> {
        self.timed(OpClass::Training, || {
            let tables = self.sobolev_tables(op)?;
            let energy = tables.energy_grad(self, f32_of("sobolev_energy_grad", "r", r)?)?;
            Ok((tables.item_energies(self, &energy.plane_energy)?, field(energy.grad, r)))
        })
    }

    fn sdpo_step(&self, op: &Sobolev, residuals: &PairResiduals<T>, beta: f64) -> Result<SdpoStep<T>> {
        self.timed(OpClass::Training, || {
            const OP: &str = "sdpo_step";
            let r = residuals;
            for (name, t) in
                [("reference_winner", r.reference_winner), ("policy_loser", r.policy_loser), ("reference_loser", r.reference_loser)]
            {
                expect_shape(name, OP, t.shape(), r.policy_winner.shape())?;
            }
            let fields = [
                f32_of(OP, "policy_winner", r.policy_winner)?,
                f32_of(OP, "reference_winner", r.reference_winner)?,
                f32_of(OP, "policy_loser", r.policy_loser)?,
                f32_of(OP, "reference_loser", r.reference_loser)?,
            ];
            let step = self.sobolev_tables(op)?.sdpo(self, fields, beta)?;
            let s = self.stream();
            let (pair_energy, summary, winner_energy_grad) =
                (s.clone_dtoh(&step.pair_energy)?, s.clone_dtoh(&step.summary)?, s.clone_dtoh(&step.winner_energy_grad)?);
            self.transfers.down(8 * (pair_energy.len() + summary.len() + winner_energy_grad.len()));
            let pairs = pair_energy.len() / 4;
            Ok(SdpoStep {
                energies: (0..pairs)
                    .map(|i| PairEnergies {
                        policy_winner: pair_energy[i],
                        reference_winner: pair_energy[pairs + i],
                        policy_loser: pair_energy[2 * pairs + i],
                        reference_loser: pair_energy[3 * pairs + i],
                    })
                    .collect(),
                objective: SdpoObjective { loss: summary[0], accuracy: summary[1], reward_margin: summary[2], winner_energy_grad },
                policy_winner_grad: field(step.policy_winner_grad, r.policy_winner),
                policy_loser_grad: field(step.policy_loser_grad, r.policy_loser),
            })
        })
    }

    fn adamw_step(&self, config: &AdamWConfig, k: u64, lr: f64, tensors: &mut [AdamWTensor<'_, Self>]) -> Result<f64> {
        self.timed(OpClass::Training, || {
            const OP: &str = "adamw_step";
            let mut slices = Vec::with_capacity(tensors.len());
            for t in tensors.iter_mut() {
                let grad = f32_of(OP, t.name, t.grad)?;
                slices.push(AdamWSlices { name: t.name, param: f32_mut(OP, t.param)?, m: f32_mut(OP, t.m)?, v: f32_mut(OP, t.v)?, grad });
            }
            let stats = self.adamw_kernels(&mut slices, config, k, lr)?;
            self.grad_norm(&stats)
        })
    }
}
