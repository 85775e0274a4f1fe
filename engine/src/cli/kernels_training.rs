//! `engine kernels`' rows for the training kernels that are not model ops: the AdamW step, the
//! Sobolev energy and gradient, and S-DPO. All three are memory-bound; the bytes counted are the
//! minimal traffic of the fused step (each input read once, each output written once), so the
//! rate is comparable with the copy ceiling. They run through `TrainingOps` on the backend's own
//! buffers: the device kernels on a GPU, the host references they answer to on the CPU.

use anyhow::Result;
use engine::backend::adamw::AdamWConfig;
use engine::backend::losses::{PairResiduals, DEFAULT_BETA};
use engine::backend::sobolev::{Grid, Sobolev, DEFAULT_EXPONENT};
use engine::backend::training::{AdamWTensor, TrainingOps};
use engine::{Backend, Tensor};
use loaders::HostTensor;

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

fn field<B: Backend>(b: &B, shape: Vec<usize>, seed: u64) -> Result<Tensor<B>> {
    let n = shape.iter().product();
    b.upload(&HostTensor::from_f32(shape, engine::sampler::gaussian_noise(n, seed)))
}

/// The rows, timed through `TrainingOps` on the backend's own buffers.
pub fn training_rows<B: TrainingOps>(b: &B, full: bool, time: Timer) -> Result<Vec<TrainingRow>> {
    let z = Sizes::new(full);
    let mut state = Vec::with_capacity(z.tensors);
    for t in 0..z.tensors as u64 {
        let zeros = HostTensor::from_f32(vec![z.per_tensor], vec![0.0; z.per_tensor]);
        state.push([field(b, vec![z.per_tensor], t)?, b.upload(&zeros)?, b.upload(&zeros)?, field(b, vec![z.per_tensor], t)?]);
    }
    let config = AdamWConfig::default();
    let mut step = 0;
    let adamw = time(&mut || {
        step += 1;
        let mut tensors: Vec<AdamWTensor<B>> =
            state.iter_mut().map(|[param, m, v, grad]| AdamWTensor { name: "bench", param, m, v, grad: &*grad }).collect();
        b.adamw_step(&config, step, config.lr, &mut tensors).map(drop)
    })?;
    let op = Sobolev::new(z.grid, DEFAULT_EXPONENT)?;
    let shape = vec![z.pairs, z.grid.channels, z.grid.height, z.grid.width];
    let r = (0..4).map(|k| field(b, shape.clone(), 100 + k)).collect::<Result<Vec<_>>>()?;
    let energy = time(&mut || b.sobolev_energy_grad(&op, &r[0]).map(drop))?;
    let residuals = PairResiduals { policy_winner: &r[0], reference_winner: &r[1], policy_loser: &r[2], reference_loser: &r[3] };
    let sdpo = time(&mut || b.sdpo_step(&op, &residuals, DEFAULT_BETA).map(drop))?;
    Ok(vec![
        ("adamw step", z.adamw_shape(), adamw, z.adamw_bytes()),
        ("sobolev energy_grad", z.field_shape(), energy, z.energy_bytes()),
        ("sdpo", format!("{} pairs", z.field_shape()), sdpo, z.sdpo_bytes()),
    ])
}
