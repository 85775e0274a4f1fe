//! Collectives over a backend's tensors: how data-parallel ranks average their gradients.
//!
//! Each backend that trains says how its ranks do it ([`DataParallel`]): the CPU's tensors are
//! host memory, reduced in place through the world's MPI all-reduce (`cpu/collective.rs`); a
//! GPU's are reduced on the device through NCCL (`cuda/nccl.rs`), bootstrapped over the world. One rank
//! alone reduces nothing ([`Alone`]).

use super::training::TrainingOps;
use super::Backend;
use crate::tensor::Tensor;
use crate::world::World;
use anyhow::Result;

pub trait Collective<B: Backend> {
    /// What reduces, for the log: "none", "MPI", "NCCL".
    fn name(&self) -> &'static str;

    /// Each tensor (f32, the same shapes on every rank) replaced on every rank by its mean over
    /// the ranks.
    fn average(&self, b: &B, tensors: &mut [Tensor<B>]) -> Result<()>;
}

/// A training backend's collective for the ranks of `world`.
pub trait DataParallel: TrainingOps {
    fn collective<'w>(&self, world: &'w dyn World) -> Result<Box<dyn Collective<Self> + 'w>>;
}

/// One rank: the mean over one is the tensor itself.
pub struct Alone;

impl<B: Backend> Collective<B> for Alone {
    fn name(&self) -> &'static str {
        "none"
    }

    fn average(&self, _: &B, _: &mut [Tensor<B>]) -> Result<()> {
        Ok(())
    }
}
