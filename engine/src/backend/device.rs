//! Choosing the backend at run time (`--device cpu|cuda|auto`). Model code is generic over the
//! `Backend` trait; `on_backend!` instantiates a job for whichever backend was opened, so no
//! model or command code ever asks which one it runs on.

use super::cpu::CpuBackend;
use super::cuda::{gpu_count, CudaBackend};
use crate::world::{gpu_of, World};
use anyhow::{Context, Result};

/// Where to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// A CUDA GPU when one is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// GPU 0 through CUDA; fails with one line when there is none.
    Cuda,
}

/// An opened backend.
pub enum Opened {
    Cpu(CpuBackend),
    Cuda(Box<CudaBackend>),
}

impl Device {
    pub fn open(self) -> Result<Opened> {
        self.open_gpu(0)
    }

    /// `open` for a rank of `world`: a GPU takes the GPU of the rank's place on its node.
    pub fn open_for_rank(self, world: &dyn World) -> Result<Opened> {
        if self == Device::Cpu || world.size() == 1 {
            return self.open();
        }
        let gpus = gpu_count();
        if gpus > 0 && world.local_size() > gpus && world.local_rank() == 0 {
            eprintln!("warning: {} ranks on this node share its {gpus} GPU(s)", world.local_size());
        }
        self.open_gpu(gpu_of(world.local_rank(), gpus))
    }

    fn open_gpu(self, ordinal: usize) -> Result<Opened> {
        match self {
            Device::Cpu => Ok(Opened::Cpu(CpuBackend::new())),
            Device::Cuda => Ok(Opened::Cuda(Box::new(CudaBackend::new(ordinal).context("--device cuda")?))),
            Device::Auto => Ok(match CudaBackend::new(ordinal) {
                Ok(b) => Opened::Cuda(Box::new(b)),
                Err(e) => {
                    // Without a driver the CPU is expected; with one, a GPU that cannot be used
                    // is news the user should not have to infer from the speed.
                    if super::cuda::driver_present() {
                        eprintln!("warning: running on the CPU: the GPU is not usable ({e:#})");
                    }
                    Opened::Cpu(CpuBackend::new())
                }
            }),
        }
    }
}

/// `on_backend!(device, b => expr)`: opens `device` and evaluates `expr` with `b` bound to
/// `&CpuBackend` or `&CudaBackend` (the expression is compiled once per backend).
#[macro_export]
macro_rules! on_backend {
    ($device:expr, $b:ident => $body:expr) => {
        $crate::on_opened!($crate::backend::device::Device::open($device)?, $b => $body)
    };
}

/// `on_opened!(opened, b => expr)`: `on_backend!` for a backend already opened.
#[macro_export]
macro_rules! on_opened {
    ($opened:expr, $b:ident => $body:expr) => {
        match $opened {
            $crate::backend::device::Opened::Cpu(backend) => {
                let $b = &backend;
                $body
            }
            $crate::backend::device::Opened::Cuda(backend) => {
                let $b = &*backend;
                $body
            }
        }
    };
}
