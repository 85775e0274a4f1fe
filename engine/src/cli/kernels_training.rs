//! `engine kernels`' rows for the training kernels that are not model ops: the AdamW step, the
//! Sobolev energy and gradient, and S-DPO. All three are memory-bound; the bytes counted are the
//! minimal traffic of the fused step (each input read once, each output written once), so the
//! rate is comparable with the copy ceiling. On the GPU the device kernels are timed on device
//! buffers; on the CPU the host references they answer to.

use anyhow::Result;
use engine::backend::cuda::optim::AdamWTensor;
use engine::backend::cuda::sobolev::CudaSobolev;
use engine::backend::cuda::CudaBackend;
use engine::train::adamw::{AdamW, AdamWConfig};
use engine::train::kernels::TrainingKernels;
use engine::train::loss::{PairResiduals, DEFAULT_BETA};
use engine::train::sobolev::{Grid, Sobolev, DEFAULT_EXPONENT};
use engine::{Backend, CpuBackend};
use std::collections::BTreeMap;

/// One timed kernel: name, shape, median seconds, bytes moved.
pub type TrainingRow = (&'static str, String, f64, f64);

/// The problem sizes: LoRA parameters as (tensors, values each), and the S-DPO batch.
struct Sizes {
    tensors: usize,
    per_tensor: usize,
    pairs: usize,
    grid: Grid,
}

impl Sizes {
    /// Full: rank-8 LoRA on FLUX.1-dev (about 29.5M parameters, design.md section 7) in 608
    /// factors, and 8 pairs on the largest supported image grid. Small: a CPU-sized check.
    fn new(full: bool) -> Self {
        if full {
            Sizes { tensors: 608, per_tensor: 48_576, pairs: 8, grid: Grid::new(3, 128, 128) }
        } else {
            Sizes { tensors: 16, per_tensor: 4096, pairs: 2, grid: Grid::new(3, 32, 32) }
        }
    }

    fn adamw_shape(&self) -> String {
        format!("{} x {}", self.tensors, self.per_tensor)
    }

    fn field_shape(&self) -> String {
        format!("{} x {}", self.pairs, self.grid)
    }

    /// AdamW: the norm pass reads g; the update reads p, m, v, g and writes p, m, v.
    fn adamw_bytes(&self) -> f64 {
        (self.tensors * self.per_tensor * 4 * 8) as f64
    }

    /// Energy and gradient: the field read, the gradient written.
    fn energy_bytes(&self) -> f64 {
        (self.pairs * self.grid.elements() * 4 * 2) as f64
    }

    /// S-DPO: four residuals read, two gradients written.
    fn sdpo_bytes(&self) -> f64 {
        (self.pairs * self.grid.elements() * 4 * 6) as f64
    }
}

/// Times a closure: the median seconds of `engine kernels`' repetitions.
pub type Timer<'a> = &'a dyn Fn(&mut dyn FnMut() -> Result<()>) -> Result<f64>;

pub trait TrainingBench: Backend {
    fn training_rows(&self, full: bool, time: Timer) -> Result<Vec<TrainingRow>>;
}

fn noise(n: usize, seed: u64) -> Vec<f32> {
    engine::sampler::gaussian_noise(n, seed)
}

impl TrainingBench for CpuBackend {
    fn training_rows(&self, full: bool, time: Timer) -> Result<Vec<TrainingRow>> {
        let z = Sizes::new(full);
        let mut params: BTreeMap<String, Vec<f32>> = (0..z.tensors).map(|t| (format!("{t:04}"), noise(z.per_tensor, t as u64))).collect();
        let grads = params.clone();
        let mut opt = AdamW::new(AdamWConfig::default());
        let adamw = time(&mut || self.adamw_step(&mut opt, &mut params, &grads).map(drop))?;
        let op = Sobolev::new(z.grid, DEFAULT_EXPONENT)?;
        let n = z.pairs * z.grid.elements();
        let r: Vec<Vec<f32>> = (0..4).map(|k| noise(n, 100 + k)).collect();
        let energy = time(&mut || self.sobolev_energy_grad(&op, &r[0]).map(drop))?;
        let residuals = PairResiduals { policy_winner: &r[0], reference_winner: &r[1], policy_loser: &r[2], reference_loser: &r[3] };
        let sdpo = time(&mut || self.sdpo_step(&op, &residuals, DEFAULT_BETA).map(drop))?;
        Ok(rows(&z, adamw, energy, sdpo))
    }
}

impl TrainingBench for CudaBackend {
    fn training_rows(&self, full: bool, time: Timer) -> Result<Vec<TrainingRow>> {
        let z = Sizes::new(full);
        let mut buffers = Vec::with_capacity(z.tensors);
        for t in 0..z.tensors {
            let values = noise(z.per_tensor, t as u64);
            let zeros = vec![0f32; z.per_tensor];
            buffers.push([self.upload_f32(&values)?, self.upload_f32(&zeros)?, self.upload_f32(&zeros)?, self.upload_f32(&values)?]);
        }
        let config = AdamWConfig::default();
        let mut step = 0;
        let adamw = time(&mut || {
            step += 1;
            let mut tensors: Vec<AdamWTensor> =
                buffers.iter_mut().map(|[param, m, v, grad]| AdamWTensor { name: "bench", param, m, v, grad: &*grad }).collect();
            self.adamw_step(&mut tensors, &config, step, config.lr).map(drop)
        })?;
        let op = CudaSobolev::new(self, &Sobolev::new(z.grid, DEFAULT_EXPONENT)?)?;
        let n = z.pairs * z.grid.elements();
        let r = [0, 1, 2, 3].map(|k| self.upload_f32(&noise(n, 100 + k)));
        let [a, b, c, d] = r;
        let r = [a?, b?, c?, d?];
        let energy = time(&mut || op.energy_grad(self, &r[0]).map(drop))?;
        let sdpo = time(&mut || op.sdpo(self, [&r[0], &r[1], &r[2], &r[3]], DEFAULT_BETA).map(drop))?;
        Ok(rows(&z, adamw, energy, sdpo))
    }
}

fn rows(z: &Sizes, adamw: f64, energy: f64, sdpo: f64) -> Vec<TrainingRow> {
    vec![
        ("adamw step", z.adamw_shape(), adamw, z.adamw_bytes()),
        ("sobolev energy_grad", z.field_shape(), energy, z.energy_bytes()),
        ("sdpo", format!("{} pairs", z.field_shape()), sdpo, z.sdpo_bytes()),
    ]
}
