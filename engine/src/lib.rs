//! ASASR super-resolution engine: tensors, backends, the FLUX transformer, and the CLI's commands.

pub mod backend;
pub mod model;
pub mod tensor;

pub use backend::cpu::CpuBackend;
pub use backend::Backend;
pub use tensor::Tensor;
