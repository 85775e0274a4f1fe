//! ASASR super-resolution engine: tensors, backends, the FLUX transformer, and the CLI's commands.

pub mod ae;
pub mod backend;
pub mod degrade;
pub mod metrics;
pub mod model;
pub mod perf;
pub mod sampler;
pub mod selftest;
pub mod sr;
pub mod tensor;
pub mod text;
pub mod train;
pub mod world;

pub use backend::cpu::CpuBackend;
pub use backend::Backend;
pub use tensor::Tensor;
