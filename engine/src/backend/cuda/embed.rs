//! Launch for `cuda/embed.cu`.

use super::{bf16_tensor, elementwise_config, f32_of, i32_arg, CudaBackend, T};
use anyhow::{ensure, Result};
use cudarc::driver::PushKernelArg;

pub(super) fn timestep_embedding(b: &CudaBackend, t: &T, dim: usize, max_period: f32, time_factor: f32) -> Result<T> {
    let op = "timestep_embedding";
    ensure!(t.rank() == 1, "{op}: t has shape {:?}, expected [batch]", t.shape());
    let batch = t.dim(0);
    let mut out = b.alloc_bf16(batch * dim)?;
    let f = b.function("embed", "timestep_embedding_bf16")?;
    let (b32, d32) = (i32_arg(op, batch)?, i32_arg(op, dim)?);
    let neg_log = -(max_period as f64).ln() as f32;
    let mut l = b.stream().launch_builder(&f);
    l.arg(f32_of(op, "t (timesteps are uploaded in f32)", t)?).arg(&mut out).arg(&b32).arg(&d32).arg(&neg_log).arg(&time_factor);
    // SAFETY: t holds batch values, out batch * dim.
    unsafe { l.launch(elementwise_config(batch * dim)) }?;
    Ok(bf16_tensor(out, vec![batch, dim]))
}
