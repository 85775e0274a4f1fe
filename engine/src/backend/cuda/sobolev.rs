//! Launches for `cuda/sobolev.cu`: the Sobolev operator of a `backend::sobolev::Sobolev` on device
//! fields (filters, energies, the energy gradient) and the fused S-DPO loss of
//! `backend::losses::sdpo_step`. [`CudaSobolev`] uploads the operator's tables once; its methods take
//! and return device buffers and never wait for the GPU.

use super::{elementwise_config, i32_arg, CudaBackend};
use crate::backend::sobolev::{Filter, Grid, Sobolev};
use anyhow::{ensure, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

/// The largest height or width of the spectral grid: a plane and one intermediate sit in shared
/// memory, `2 H W` f32 = 128 KiB at 128 x 128, within every Ampere-or-newer GPU's opt-in limit.
pub const SOBOLEV_MAX_SIDE: usize = 128;
const SOBOLEV_THREADS: u32 = 256;
/// Static shared memory of `sobolev_apply` (its f64 reduction), beside the dynamic planes.
const SOBOLEV_STATIC_SMEM: usize = 8 * SOBOLEV_THREADS as usize / 32;
const SDPO_OBJECTIVE_THREADS: u32 = 256;
const FILTERS: [Filter; 4] = [Filter::Precision, Filter::Covariance, Filter::EnergyGrad, Filter::ColoredNoise];

/// Refuses spectral grids beyond the kernel's shared-memory design, naming the grid.
pub fn check_spectral_grid(grid: Grid) -> Result<()> {
    ensure!(
        grid.height <= SOBOLEV_MAX_SIDE && grid.width <= SOBOLEV_MAX_SIDE,
        "sobolev (cuda): the spectral grid {grid} is larger than {SOBOLEV_MAX_SIDE} a side, the most the shared-memory DCT holds"
    );
    Ok(())
}

/// Dynamic shared memory of `sobolev_apply` on `grid`: the plane and one intermediate.
fn plane_bytes(grid: Grid) -> usize {
    2 * grid.height * grid.width * size_of::<f32>()
}

/// `SobolevFields` of sobolev.cu: up to four inputs and their outputs, 0 for none.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SobolevFields {
    input: [u64; 4],
    output: [u64; 4],
}

// SAFETY: a repr(C) struct of device addresses, laid out as the kernel's pointer arrays.
unsafe impl DeviceRepr for SobolevFields {}

/// The per-plane energy sums `sum_pq lambda_pq R_cpq^2` of a batch (`[fields, B C]`, f64) and,
/// for the energy gradient, `(2/N) L r`.
pub struct SobolevEnergy {
    pub plane_energy: CudaSlice<f64>,
    pub grad: CudaSlice<f32>,
}

/// One S-DPO step on the device, the twin of `train::loss::SdpoStep`.
pub struct CudaSdpo {
    /// `[4, P]`: E(r^w_theta), E(r^w_ref), E(r^l_theta), E(r^l_ref) of each pair.
    pub pair_energy: CudaSlice<f64>,
    /// `[P]`: d loss / d E(r^w_theta) of each pair (the loser's policy energy has its negative).
    pub winner_energy_grad: CudaSlice<f64>,
    /// `[loss, accuracy, reward margin]`.
    pub summary: CudaSlice<f64>,
    pub policy_winner_grad: CudaSlice<f32>,
    pub policy_loser_grad: CudaSlice<f32>,
}

/// What identifies an operator's tables: its field and spectral grids, shuffle factor and
/// exponent (the bits), from which everything else is computed.
pub type OperatorKey = ([usize; 3], [usize; 3], usize, u64);

/// The key of `op`'s tables.
pub fn operator_key(op: &Sobolev) -> OperatorKey {
    let dims = |g: Grid| [g.channels, g.height, g.width];
    (dims(op.field_grid()), dims(op.spectral_grid()), op.shuffle_factor(), op.exponent().to_bits())
}

/// A [`Sobolev`] operator's tables on the device.
pub struct CudaSobolev {
    op: Sobolev,
    /// `D_H` `[H, H]`, `D_W` `[W, W]` and `D_W^T`, f32.
    dct_h: CudaSlice<f32>,
    dct_w: CudaSlice<f32>,
    dct_w_t: CudaSlice<f32>,
    /// The weights of each filter, in the order of `FILTERS`.
    weights: [CudaSlice<f32>; 4],
}

fn to_f32(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&v| v as f32).collect()
}

impl CudaSobolev {
    pub fn new(b: &CudaBackend, op: &Sobolev) -> Result<Self> {
        let grid = op.spectral_grid();
        check_spectral_grid(grid)?;
        let limit = b.stream().context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
        ensure!(
            plane_bytes(grid) + SOBOLEV_STATIC_SMEM <= limit,
            "sobolev (cuda): the grid {grid} needs {} bytes of shared memory, this GPU allows {limit}",
            plane_bytes(grid) + SOBOLEV_STATIC_SMEM
        );
        let (h, w) = op.dct_matrices();
        let width = grid.width;
        let transposed: Vec<f64> = (0..width * width).map(|i| w[i % width * width + i / width]).collect();
        let stream = b.stream();
        let upload = |values: &[f64]| stream.clone_htod(&to_f32(values));
        Ok(CudaSobolev {
            op: op.clone(),
            dct_h: upload(h)?,
            dct_w: upload(w)?,
            dct_w_t: upload(&transposed)?,
            weights: [
                upload(&op.filter_weights(FILTERS[0]))?,
                upload(&op.filter_weights(FILTERS[1]))?,
                upload(&op.filter_weights(FILTERS[2]))?,
                upload(&op.filter_weights(FILTERS[3]))?,
            ],
        })
    }

    pub fn operator(&self) -> &Sobolev {
        &self.op
    }

    fn weights(&self, filter: Filter) -> &CudaSlice<f32> {
        &self.weights[FILTERS.iter().position(|&f| f == filter).unwrap()]
    }

    /// `IDCT(w . DCT(r))` with the weights of `filter`, for a batch `r` of fields on the operator's
    /// field grid.
    pub fn filter(&self, b: &CudaBackend, r: &CudaSlice<f32>, filter: Filter) -> Result<CudaSlice<f32>> {
        let batch = self.batch(filter.name(), r.len())?;
        let mut out = b.alloc::<f32>(r.len())?;
        self.apply(b, &[r], &mut [Some(&mut out)], filter, None, batch)?;
        Ok(out)
    }

    /// The energy of a batch as per-plane sums (see [`CudaSobolev::item_energies`]).
    pub fn energy(&self, b: &CudaBackend, r: &CudaSlice<f32>) -> Result<CudaSlice<f64>> {
        let batch = self.batch("energy", r.len())?;
        let mut plane_energy = b.alloc::<f64>(batch * self.op.spectral_grid().channels)?;
        self.apply(b, &[r], &mut [None], Filter::Precision, Some(&mut plane_energy), batch)?;
        Ok(plane_energy)
    }

    /// The energy of a batch as per-plane sums (see [`CudaSobolev::item_energies`]) and its
    /// gradient `(2/N) L r`.
    pub fn energy_grad(&self, b: &CudaBackend, r: &CudaSlice<f32>) -> Result<SobolevEnergy> {
        let batch = self.batch("energy_grad", r.len())?;
        let mut grad = b.alloc::<f32>(r.len())?;
        let mut plane_energy = b.alloc::<f64>(batch * self.op.spectral_grid().channels)?;
        self.apply(b, &[r], &mut [Some(&mut grad)], Filter::EnergyGrad, Some(&mut plane_energy), batch)?;
        Ok(SobolevEnergy { plane_energy, grad })
    }

    /// Each item's energy `E = (sum of its planes) / N` from the plane sums of one field batch;
    /// waits for the GPU.
    pub fn item_energies(&self, b: &CudaBackend, plane_energy: &CudaSlice<f64>) -> Result<Vec<f64>> {
        b.transfers.down(8 * plane_energy.len());
        let planes = b.stream().clone_dtoh(plane_energy)?;
        let n = self.op.field_grid().elements() as f64;
        Ok(planes.chunks(self.op.spectral_grid().channels).map(|item| item.iter().sum::<f64>() / n).collect())
    }

    /// S-DPO (design.md section 7) on the residuals `[policy winner, reference winner, policy
    /// loser, reference loser]`, each `[P, ...]` on the field grid: the four energies and the
    /// policy gradients in one launch, the objective in a second, the gradients' per-pair scale
    /// in a third.
    pub fn sdpo(&self, b: &CudaBackend, residuals: [&CudaSlice<f32>; 4], beta: f64) -> Result<CudaSdpo> {
        ensure!(beta.is_finite() && beta > 0.0, "sdpo: beta must be positive and finite, got {beta}");
        let len = residuals[0].len();
        for (name, r) in ["reference_winner", "policy_loser", "reference_loser"].iter().zip(&residuals[1..]) {
            ensure!(r.len() == len, "sdpo: policy_winner has {len} values but {name} has {}", r.len());
        }
        let pairs = self.batch("sdpo", len)?;
        let channels = self.op.spectral_grid().channels;
        let mut winner_grad = b.alloc::<f32>(len)?;
        let mut loser_grad = b.alloc::<f32>(len)?;
        let mut plane_energy = b.alloc::<f64>(4 * pairs * channels)?;
        self.apply(
            b,
            &residuals,
            &mut [Some(&mut winner_grad), None, Some(&mut loser_grad), None],
            Filter::EnergyGrad,
            Some(&mut plane_energy),
            pairs,
        )?;

        let mut pair_energy = b.alloc::<f64>(4 * pairs)?;
        let mut winner_energy_grad = b.alloc::<f64>(pairs)?;
        let mut summary = b.alloc::<f64>(3)?;
        let (p32, c32) = (i32_arg("sdpo", pairs)?, i32_arg("sdpo", channels)?);
        let n = self.op.field_grid().elements() as f64;
        let f = b.function("sobolev", "sdpo_objective")?;
        let mut l = b.stream().launch_builder(&f);
        l.arg(&plane_energy).arg(&p32).arg(&c32).arg(&n).arg(&beta).arg(&mut pair_energy).arg(&mut winner_energy_grad).arg(&mut summary);
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (SDPO_OBJECTIVE_THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: plane_energy holds 4 P C sums, pair_energy 4 P, winner_energy_grad P, summary 3.
        unsafe { l.launch(one) }?;

        let (per_pair, total) = (i32_arg("sdpo", len / pairs)?, i32_arg("sdpo", len)?);
        let f = b.function("sobolev", "sdpo_scale_grads")?;
        let mut l = b.stream().launch_builder(&f);
        l.arg(&mut winner_grad).arg(&mut loser_grad).arg(&winner_energy_grad).arg(&per_pair).arg(&total);
        // SAFETY: both gradients hold P per_pair values, winner_energy_grad P.
        unsafe { l.launch(elementwise_config(len)) }?;
        Ok(CudaSdpo { pair_energy, winner_energy_grad, summary, policy_winner_grad: winner_grad, policy_loser_grad: loser_grad })
    }

    /// The number of fields in `len` values, or an error naming the op and the grid.
    fn batch(&self, what: &str, len: usize) -> Result<usize> {
        let n = self.op.field_grid().elements();
        ensure!(
            len > 0 && len % n == 0,
            "sobolev {what} (cuda): {len} values are not a whole, non-zero number of {} fields ({n} values each)",
            self.op.field_grid()
        );
        Ok(len / n)
    }

    /// One `sobolev_apply` launch over `inputs` (each `batch` fields): the output of field k, when
    /// given, is `IDCT(w . DCT(input k))` with the weights of `filter`; with `plane_energy`, the
    /// energy sums of every plane of every field, `[fields, batch C]`.
    fn apply(
        &self,
        b: &CudaBackend,
        inputs: &[&CudaSlice<f32>],
        outputs: &mut [Option<&mut CudaSlice<f32>>],
        filter: Filter,
        plane_energy: Option<&mut CudaSlice<f64>>,
        batch: usize,
    ) -> Result<()> {
        let grid = self.op.spectral_grid();
        let planes = batch * grid.channels;
        let stream = b.stream();
        let mut fields = SobolevFields::default();
        // The guards only order work across streams; this backend runs on one stream, so the
        // raw addresses stay valid for the launch below.
        for (k, input) in inputs.iter().enumerate() {
            fields.input[k] = input.device_ptr(stream).0;
        }
        for (k, output) in outputs.iter_mut().enumerate() {
            if let Some(out) = output {
                fields.output[k] = out.device_ptr_mut(stream).0;
            }
        }
        let energy_weights = if plane_energy.is_some() { self.weights(Filter::Precision).device_ptr(stream).0 } else { 0 };
        let out_weights = self.weights(filter).device_ptr(stream).0;
        let energy_ptr = plane_energy.map_or(0, |e| e.device_ptr_mut(stream).0);
        let (p32, c32) = (i32_arg("sobolev", planes)?, i32_arg("sobolev", grid.channels)?);
        let (h32, w32, f32_) = (grid.height as i32, grid.width as i32, self.op.shuffle_factor() as i32);
        let bytes = plane_bytes(grid);
        let f = b.function("sobolev", "sobolev_apply")?;
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)?;
        let mut l = stream.launch_builder(&f);
        l.arg(&fields).arg(&self.dct_h).arg(&self.dct_w).arg(&self.dct_w_t).arg(&energy_weights).arg(&out_weights).arg(&energy_ptr);
        l.arg(&p32).arg(&c32).arg(&h32).arg(&w32).arg(&f32_);
        let cfg = LaunchConfig {
            grid_dim: (planes as u32, inputs.len() as u32, 1),
            block_dim: (SOBOLEV_THREADS, 1, 1),
            shared_mem_bytes: bytes as u32,
        };
        // SAFETY: every input and output holds `batch` whole fields (checked by the callers), the
        // tables match the spectral grid, plane_energy holds one sum per (field, plane); each
        // output element is written by exactly one thread.
        unsafe { l.launch(cfg) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_beyond_the_shared_memory_design_are_refused_by_name() {
        assert!(check_spectral_grid(Grid::new(3, 128, 128)).is_ok());
        assert!(check_spectral_grid(Grid::new(3, 1, 7)).is_ok());
        let message = check_spectral_grid(Grid::new(3, 129, 64)).unwrap_err().to_string();
        assert!(message.contains("3x129x64") && message.contains("128"), "{message}");
        assert!(check_spectral_grid(Grid::new(1, 16, 512)).is_err());
        assert_eq!(plane_bytes(Grid::new(3, 128, 128)), 128 * 1024);
    }
}
