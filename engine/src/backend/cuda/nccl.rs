//! GPU ranks average their gradients through NCCL, on the backend's stream: one communicator per
//! rank, bootstrapped as NCCL documents it (rank 0's `ncclGetUniqueId`, its 128 bytes broadcast
//! over the world, `ncclCommInitRank` on every rank).
//!
//! The gradients of a step go as one group of in-place `ncclAvg` all-reduces
//! (`ncclGroupStart`/`End`), which NCCL fuses into few kernels: the bucketing of the many small
//! tensors of a LoRA. They run after the step's backward: the backward returns its gradients at
//! its end (`model::backward`), so there is nothing earlier to overlap with; at LoRA's sizes the
//! all-reduce is a small share of a step (`engine bench --train` under mpirun measures it).
//!
//! libnccl is opened at run time like the other CUDA libraries; cudarc's loader panics when it is
//! missing, so it is probed first and a missing one is one error line.

use super::{without_panics, CudaBackend, CudaStorage};
use crate::backend::collective::{Alone, Collective, DataParallel};
use crate::backend::Backend;
use crate::tensor::Tensor;
use crate::world::{shared_id, watched, World};
use anyhow::{anyhow, bail, Result};
use cudarc::nccl::{group_end, group_start, result::NcclError, Comm, Id, ReduceOp};

/// `ENGINE_COLLECTIVE=nccl` makes even one rank reduce through NCCL: the device check's way to
/// run the NCCL path on a single GPU and compare it with the plain run.
const FORCE: &str = "ENGINE_COLLECTIVE";

impl DataParallel for CudaBackend {
    fn collective<'w>(&self, world: &'w dyn World) -> Result<Box<dyn Collective<Self> + 'w>> {
        let forced = std::env::var(FORCE).ok();
        match forced.as_deref() {
            None | Some("") | Some("auto") if world.size() == 1 => Ok(Box::new(Alone)),
            None | Some("") | Some("auto") | Some("nccl") => Ok(Box::new(Nccl::new(self, world)?)),
            Some(other) => bail!("{FORCE}={other}: expected auto or nccl"),
        }
    }
}

pub struct Nccl<'w> {
    comm: Comm,
    world: &'w dyn World,
}

impl<'w> Nccl<'w> {
    /// This rank's communicator; every rank of `world` must call it.
    pub fn new(b: &CudaBackend, world: &'w dyn World) -> Result<Self> {
        ensure_nccl()?;
        let id = shared_id(world, || {
            without_panics(|| {
                let id = Id::new().map_err(nccl_error("ncclGetUniqueId"))?;
                Ok(id.internal().map(|c| c as u8))
            })
        })?;
        let (rank, size) = (world.rank(), world.size());
        let stream = b.stream().clone();
        let comm = watched(
            world,
            || format!("NCCL's initialisation (ncclCommInitRank, rank {rank} of {size}) did not finish: a rank died or hangs"),
            || {
                without_panics(|| {
                    Comm::from_rank(stream, rank, size, Id::uninit(id.map(|c| c as _))).map_err(nccl_error("ncclCommInitRank"))
                })
            },
        )?;
        Ok(Nccl { comm, world })
    }
}

impl Collective<CudaBackend> for Nccl<'_> {
    fn name(&self) -> &'static str {
        "NCCL"
    }

    fn average(&self, b: &CudaBackend, tensors: &mut [Tensor<CudaBackend>]) -> Result<()> {
        group_start().map_err(nccl_error("ncclGroupStart"))?;
        let mut issued = Ok(());
        for t in tensors.iter_mut() {
            let dtype = t.dtype();
            let CudaStorage::F32(slice) = t.storage_mut() else {
                issued = Err(anyhow!("average over ranks: {dtype:?} tensors, f32 expected"));
                break;
            };
            if let Err(e) = self.comm.all_reduce_in_place(slice, &ReduceOp::Avg) {
                issued = Err(nccl_error("ncclAllReduce")(e));
                break;
            }
        }
        // The group is closed whatever happened inside it.
        group_end().map_err(nccl_error("ncclGroupEnd"))?;
        issued?;
        // The all-reduce waits on the device for every rank: a missing one shows here.
        watched(self.world, || "the gradients' NCCL all-reduce did not finish: a rank died or hangs".into(), || b.synchronize())
    }
}

/// Fails with one line when libnccl cannot be opened under the names cudarc tries.
fn ensure_nccl() -> Result<()> {
    // SAFETY: only tries to dlopen the library by its known names.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Ok(());
    }
    // NCCL's runtime packages (Debian's libnccl2, the nvidia-nccl wheels) install libnccl.so.2;
    // cudarc looks for libnccl.so, which the development package adds.
    // SAFETY: dlopen of a library name, closed again at once.
    let runtime_only = unsafe {
        let handle = libc::dlopen(c"libnccl.so.2".as_ptr(), libc::RTLD_LAZY);
        let found = !handle.is_null();
        if found {
            libc::dlclose(handle);
        }
        found
    };
    if runtime_only {
        bail!(
            "NCCL: libnccl.so.2 is installed but not libnccl.so, the name it is opened by: install the development \
             package (libnccl-dev), or put a link libnccl.so -> libnccl.so.2 in a folder on LD_LIBRARY_PATH"
        );
    }
    bail!(
        "NCCL not found (libnccl.so could not be loaded): GPU ranks average their gradients through NCCL; install it \
         (libnccl2 and libnccl-dev) or put its lib folder on LD_LIBRARY_PATH"
    )
}

fn nccl_error(call: &'static str) -> impl Fn(NcclError) -> anyhow::Error {
    move |e| anyhow!("{call} failed: {:?}", e.0)
}
