//! The CPU's gradients averaged over ranks: its tensors are host memory, summed in place by the
//! world's all-reduce (MPI's) and divided by the rank count.

use super::CpuBackend;
use crate::backend::collective::{Alone, Collective, DataParallel};
use crate::tensor::Tensor;
use crate::world::World;
use anyhow::{bail, Result};
use loaders::HostData;

impl DataParallel for CpuBackend {
    fn collective<'w>(&self, world: &'w dyn World) -> Result<Box<dyn Collective<Self> + 'w>> {
        Ok(match world.size() {
            1 => Box::new(Alone),
            _ => Box::new(HostSum { world }),
        })
    }
}

pub struct HostSum<'w> {
    world: &'w dyn World,
}

impl Collective<CpuBackend> for HostSum<'_> {
    fn name(&self) -> &'static str {
        "MPI"
    }

    fn average(&self, _: &CpuBackend, tensors: &mut [Tensor<CpuBackend>]) -> Result<()> {
        let scale = 1.0 / self.world.size() as f32;
        for t in tensors.iter_mut() {
            let dtype = t.dtype();
            let HostData::F32(values) = t.storage_mut() else { bail!("average over ranks: {dtype:?} tensors, f32 expected") };
            self.world.sum_f32(values)?;
            values.iter_mut().for_each(|v| *v *= scale);
        }
        Ok(())
    }
}
