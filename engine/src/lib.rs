//! ASASR super-resolution engine: tensors, backends, the FLUX transformer, and the CLI's commands.

pub mod ae;
pub mod backend;
pub mod degrade;
pub mod metrics;
pub mod model;
pub mod sampler;
pub mod sr;
pub mod tensor;

pub use backend::cpu::CpuBackend;
pub use backend::Backend;
pub use tensor::Tensor;
