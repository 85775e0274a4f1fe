//! Launches for `cuda/optim.cu`: one AdamW step over many f32 parameter tensors with clipping on
//! the global gradient norm, the device twin of `backend::adamw::update`. The caller keeps the
//! step count and the warmed-up learning rate (`AdamW::lr_at`); the device holds the tensors.

use super::CudaBackend;
use crate::backend::adamw::AdamWConfig;
use anyhow::{anyhow, ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

/// Elements per block of the partial-norm and update kernels; `ADAM_CHUNK` in optim.cu.
const ADAM_CHUNK: usize = 2048;
const ADAM_THREADS: u32 = 256;
const ADAM_FINALIZE_THREADS: u32 = 1024;

/// One parameter tensor of a step: its f32 master copy, its moments and its gradient, all of
/// one length. `name` is for error messages.
pub struct AdamWSlices<'a> {
    pub name: &'a str,
    pub param: &'a mut CudaSlice<f32>,
    pub m: &'a mut CudaSlice<f32>,
    pub v: &'a mut CudaSlice<f32>,
    pub grad: &'a CudaSlice<f32>,
}

/// The step's scalars in the layout of `AdamWScalars` in optim.cu: formed in f64 as the CPU forms
/// them, then rounded once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
struct AdamWScalars {
    lr: f32,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    inv_bias1: f32,
    inv_sqrt_bias2: f32,
    eps: f32,
    weight_decay: f32,
}

// SAFETY: a repr(C) struct of f32 fields, matching the kernel's parameter struct field by field.
unsafe impl DeviceRepr for AdamWScalars {}

impl AdamWScalars {
    /// Step `step` (counted from 1) at learning rate `lr`.
    fn new(config: &AdamWConfig, step: u64, lr: f64) -> Result<Self> {
        let k = i32::try_from(step).ok().filter(|&k| k >= 1).ok_or_else(|| anyhow!("adamw_step: step {step} is not in 1..=2^31-1"))?;
        ensure!(lr.is_finite() && lr >= 0.0, "adamw_step: learning rate {lr} is not finite and non-negative");
        for (name, beta) in [("beta1", config.beta1), ("beta2", config.beta2)] {
            ensure!((0.0..1.0).contains(&beta), "adamw_step: {name} = {beta} is outside [0, 1)");
        }
        Ok(AdamWScalars {
            lr: lr as f32,
            beta1: config.beta1 as f32,
            beta2: config.beta2 as f32,
            one_minus_beta1: (1.0 - config.beta1) as f32,
            one_minus_beta2: (1.0 - config.beta2) as f32,
            inv_bias1: (1.0 / (1.0 - config.beta1.powi(k))) as f32,
            inv_sqrt_bias2: (1.0 / (1.0 - config.beta2.powi(k)).sqrt()) as f32,
            eps: config.eps as f32,
            weight_decay: config.weight_decay as f32,
        })
    }
}

/// Blocks of each tensor as a prefix sum, `first[t]..first[t + 1]` for tensor t; the total last.
fn block_prefix(lengths: &[usize]) -> Vec<usize> {
    let mut first = Vec::with_capacity(lengths.len() + 1);
    let mut total = 0;
    first.push(0);
    for &n in lengths {
        total += n.div_ceil(ADAM_CHUNK);
        first.push(total);
    }
    first
}

impl CudaBackend {
    /// One AdamW step (step `step`, counted from 1, at learning rate `lr`) of every tensor, with
    /// the gradients scaled by `max_grad_norm / norm` when their global norm exceeds it. Returns
    /// the device pair `[norm before clipping, clip factor]` without waiting for it; read the norm
    /// with [`CudaBackend::grad_norm`]. A non-finite norm leaves every tensor untouched.
    pub fn adamw_kernels(&self, tensors: &mut [AdamWSlices<'_>], config: &AdamWConfig, step: u64, lr: f64) -> Result<CudaSlice<f64>> {
        let scalars = AdamWScalars::new(config, step, lr)?;
        // The kernel reads a negative bound as "no clipping".
        let max_norm = config.max_grad_norm.unwrap_or(-1.0);
        ensure!(config.max_grad_norm.is_none_or(|m| m >= 0.0), "adamw_step: max_grad_norm {max_norm} is negative");
        ensure!(!tensors.is_empty(), "adamw_step: no tensors");
        let mut lengths = Vec::with_capacity(tensors.len());
        for t in tensors.iter() {
            let n = t.param.len();
            ensure!(
                t.m.len() == n && t.v.len() == n && t.grad.len() == n,
                "adamw_step: '{}' has {n} values but moments {} and {} and gradient {}",
                t.name,
                t.m.len(),
                t.v.len(),
                t.grad.len()
            );
            lengths.push(n);
        }
        let first = block_prefix(&lengths);
        let blocks = *first.last().unwrap();
        let blocks32 = i32::try_from(blocks).map_err(|_| anyhow!("adamw_step: {blocks} blocks exceed the kernels' 32-bit indexing"))?;
        let tensors32 = i32::try_from(tensors.len()).map_err(|_| anyhow!("adamw_step: {} tensors are too many", tensors.len()))?;
        let first32: Vec<i32> = first.iter().map(|&b| b as i32).collect();
        let sizes: Vec<i64> = lengths.iter().map(|&n| n as i64).collect();
        let stream = self.stream();
        let mut table = Vec::with_capacity(4 * tensors.len());
        for t in tensors.iter_mut() {
            // The guards only order work across streams; this backend runs on one stream, so the
            // raw addresses stay valid for the launches below, which borrow nothing.
            table.push(t.param.device_ptr_mut(stream).0);
            table.push(t.m.device_ptr_mut(stream).0);
            table.push(t.v.device_ptr_mut(stream).0);
            table.push(t.grad.device_ptr(stream).0);
        }
        self.transfers.up(8 * table.len() + 8 * sizes.len() + 4 * first32.len());
        let (table, sizes, first32) = (stream.clone_htod(&table)?, stream.clone_htod(&sizes)?, stream.clone_htod(&first32)?);
        let mut partial = self.alloc::<f64>(blocks)?;
        let mut stats = self.alloc::<f64>(2)?;
        let per_chunk = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (ADAM_THREADS, 1, 1), shared_mem_bytes: 0 };

        if blocks > 0 {
            let f = self.function("optim", "adamw_grad_sq_partial")?;
            let mut l = stream.launch_builder(&f);
            l.arg(&table).arg(&sizes).arg(&first32).arg(&tensors32).arg(&mut partial);
            // SAFETY: the table holds 4 live f32 buffers per tensor of sizes[t] elements; block b
            // reads only its tensor's chunk; partial holds one value per block.
            unsafe { l.launch(per_chunk) }?;
        }
        let f = self.function("optim", "adamw_grad_norm_finalize")?;
        let mut l = stream.launch_builder(&f);
        l.arg(&partial).arg(&blocks32).arg(&max_norm).arg(&mut stats);
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (ADAM_FINALIZE_THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: partial holds `blocks` values, stats 2.
        unsafe { l.launch(one) }?;
        if blocks > 0 {
            let f = self.function("optim", "adamw_update")?;
            let mut l = stream.launch_builder(&f);
            l.arg(&table).arg(&sizes).arg(&first32).arg(&tensors32).arg(&stats).arg(&scalars);
            // SAFETY: as the partial launch; each element of each tensor is updated by one thread.
            unsafe { l.launch(per_chunk) }?;
        }
        Ok(stats)
    }

    /// The gradient norm (before clipping) of a finished [`CudaBackend::adamw_kernels`]; waits for
    /// it. Fails, as the CPU's step does, when the norm is not finite (the step then changed
    /// nothing).
    pub fn grad_norm(&self, stats: &CudaSlice<f64>) -> Result<f64> {
        self.transfers.down(8);
        let norm = self.stream().clone_dtoh(stats)?[0];
        ensure!(norm.is_finite(), "AdamW: the gradient norm is {norm}: the loss diverged");
        Ok(norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_each_tensor_and_empty_tensors_take_none() {
        assert_eq!(block_prefix(&[1, 2048, 2049, 0, 5000]), vec![0, 1, 2, 4, 4, 7]);
    }

    #[test]
    fn scalars_are_the_cpu_step_in_f32_and_bad_steps_are_refused() {
        let config = AdamWConfig { beta1: 0.9, beta2: 0.99, weight_decay: 0.01, ..AdamWConfig::default() };
        let s = AdamWScalars::new(&config, 2, 0.1).unwrap();
        assert_eq!((s.lr, s.one_minus_beta1, s.weight_decay), (0.1, 0.1f64 as f32, 0.01));
        assert_eq!(s.inv_bias1, (1.0 / 0.19f64) as f32);
        assert_eq!(s.inv_sqrt_bias2, (1.0 / (1.0 - 0.99f64 * 0.99).sqrt()) as f32);
        let err = AdamWScalars::new(&config, 0, 0.1).unwrap_err().to_string();
        assert!(err.contains("adamw_step") && err.contains("step 0"), "{err}");
        assert!(AdamWScalars::new(&config, 1, f64::NAN).is_err());
        assert!(AdamWScalars::new(&AdamWConfig { beta2: 1.0, ..config }, 1, 0.1).is_err());
    }
}
