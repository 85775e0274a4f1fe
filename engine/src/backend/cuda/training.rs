//! `TrainingOps` on the GPU: the flow arithmetic on f32 fields (`fields.rs`), the Sobolev
//! operator and the fused S-DPO step (`sobolev.rs`, tables uploaded once per operator), and
//! AdamW over device-resident master weights and moments (`optim.rs`). Only per-item scalars
//! cross to the host: energies, the S-DPO objective, the gradient norm. The composed ops (the
//! SFT loss, the adversary's losses, the loser synthesis) are the trait's defaults.
//!
//! The shared-memory DCT holds spectral grids up to `SOBOLEV_MAX_SIDE` a side. Beyond it (the
//! image grid of a pixel-shuffle model's large crops), an operator of exponent 0 is the plain
//! MSE and needs no DCT (its weights are all one: the energy is `mean(r^2)`, the filters scale
//! `r`); any other runs on the host reference, the fields going down and the results up: a host
//! round trip per call, the one exception to a device-resident step.

use super::optim::AdamWSlices;
use super::sobolev::{operator_key, CudaSobolev, SOBOLEV_MAX_SIDE};
use super::{f32_of, fields, CudaBackend, CudaStorage, T};
use crate::backend::adamw::AdamWConfig;
use crate::backend::cpu::CpuBackend;
use crate::backend::expect_shape;
use crate::backend::losses::{PairEnergies, PairResiduals, SdpoObjective, SdpoStep};
use crate::backend::profile::OpClass;
use crate::backend::sobolev::{Filter, Sobolev};
use crate::backend::training::{AdamWTensor, TrainingOps};
use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use cudarc::driver::CudaSlice;
use loaders::{DType, HostTensor};
use std::sync::Arc;

/// Where an operator's work runs (see the module docs).
enum Route {
    /// The shared-memory kernels.
    Kernels,
    /// Exponent 0 beyond the kernels' grid: every weight is one.
    Euclidean,
    /// The host reference.
    Host,
}

fn route(op: &Sobolev) -> Route {
    let grid = op.spectral_grid();
    if grid.height <= SOBOLEV_MAX_SIDE && grid.width <= SOBOLEV_MAX_SIDE {
        Route::Kernels
    } else if op.exponent() == 0.0 {
        Route::Euclidean
    } else {
        Route::Host
    }
}

impl CudaBackend {
    /// An f32 field's values on the host (the host route of the Sobolev operator).
    fn field_on_host(&self, r: &T) -> Result<Vec<f32>> {
        f32_of("sobolev (host route)", "field", r)?;
        Ok(self.download(r)?.to_f32())
    }

    /// S-DPO through the host reference: the residuals go down, the gradients come up.
    fn sdpo_on_host(&self, op: &Sobolev, r: &PairResiduals<T>, beta: f64) -> Result<SdpoStep<T>> {
        let cpu = CpuBackend::new();
        let on_cpu = |t: &T| -> Result<Tensor<CpuBackend>> { cpu.upload(&self.download(t)?.cast(DType::F32)) };
        let [pw, rw, pl, rl] = [r.policy_winner, r.reference_winner, r.policy_loser, r.reference_loser].map(on_cpu);
        let (pw, rw, pl, rl) = (pw?, rw?, pl?, rl?);
        let step =
            cpu.sdpo_step(op, &PairResiduals { policy_winner: &pw, reference_winner: &rw, policy_loser: &pl, reference_loser: &rl }, beta)?;
        let up = |t: &Tensor<CpuBackend>| -> Result<T> { self.upload(&cpu.download(t)?) };
        Ok(SdpoStep {
            policy_winner_grad: up(&step.policy_winner_grad)?,
            policy_loser_grad: up(&step.policy_loser_grad)?,
            energies: step.energies,
            objective: step.objective,
        })
    }

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
        self.timed(OpClass::Training, || match route(op) {
            Route::Kernels => Ok(field(self.sobolev_tables(op)?.filter(self, f32_of("sobolev_filter", "r", r)?, filter)?, r)),
            Route::Euclidean => self.scale_items(&[op.filter_weights(filter)[0] as f32], r),
            Route::Host => self.upload(&HostTensor::from_f32(r.shape().to_vec(), op.apply(&self.field_on_host(r)?, filter)?)),
        })
    }

    fn sobolev_energy(&self, op: &Sobolev, r: &T) -> Result<Vec<f64>> {
        self.timed(OpClass::Training, || match route(op) {
            Route::Kernels => {
                let tables = self.sobolev_tables(op)?;
                let planes = tables.energy(self, f32_of("sobolev_energy", "r", r)?)?;
                tables.item_energies(self, &planes)
            }
            Route::Euclidean => Ok(self.dot_items(r, r)?.into_iter().map(|e| e / op.field_grid().elements() as f64).collect()),
            Route::Host => op.energy(&self.field_on_host(r)?),
        })
    }

    fn sobolev_energy_grad(&self, op: &Sobolev, r: &T) -> Result<(Vec<f64>, T)> {
        self.timed(OpClass::Training, || match route(op) {
            Route::Kernels => {
                let tables = self.sobolev_tables(op)?;
                let energy = tables.energy_grad(self, f32_of("sobolev_energy_grad", "r", r)?)?;
                Ok((tables.item_energies(self, &energy.plane_energy)?, field(energy.grad, r)))
            }
            Route::Euclidean | Route::Host => Ok((self.sobolev_energy(op, r)?, self.sobolev_filter(op, r, Filter::EnergyGrad)?)),
        })
    }

    fn sdpo_step(&self, op: &Sobolev, residuals: &PairResiduals<T>, beta: f64) -> Result<SdpoStep<T>> {
        if !matches!(route(op), Route::Kernels) {
            return self.sdpo_on_host(op, residuals, beta);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sobolev::Grid;

    #[test]
    fn operators_beyond_the_kernels_grid_take_the_euclidean_or_the_host_route() {
        let kind = |op: Sobolev| match route(&op) {
            Route::Kernels => "kernels",
            Route::Euclidean => "euclidean",
            Route::Host => "host",
        };
        assert_eq!(kind(Sobolev::new(Grid::new(16, 128, 128), 1.5).unwrap()), "kernels");
        assert_eq!(kind(Sobolev::new(Grid::new(3, 129, 64), 0.0).unwrap()), "euclidean");
        assert_eq!(kind(Sobolev::new(Grid::new(3, 129, 64), 1.5).unwrap()), "host");
        // A pixel-shuffle latent of 32 x 32 cells is a 192 x 192 image grid.
        assert_eq!(kind(Sobolev::for_pixel_shuffle(Grid::new(108, 32, 32), 6, 1.5).unwrap()), "host");
        // At exponent 0 every filter weight is one value: the Euclidean route scales by it.
        let op = Sobolev::new(Grid::new(3, 129, 64), 0.0).unwrap();
        for filter in [Filter::Precision, Filter::Covariance, Filter::EnergyGrad, Filter::ColoredNoise] {
            let w = op.filter_weights(filter);
            assert!(w.iter().all(|&x| x == w[0]), "{filter:?}");
        }
    }
}
