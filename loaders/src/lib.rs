//! Everything that reads or writes model files: safetensors through mmap, FLUX's two key
//! layouts mapped onto one internal (BFL) naming, and LoRA adapters in the layouts found in the
//! wild. Knows nothing of the engine; every error names the file and the key it is about.

pub mod ae;
pub mod atomic;
pub mod error;
pub mod fingerprint;
pub mod flux;
pub mod image;
mod keymap;
pub mod lora;
pub mod safetensors;
pub mod shards;
pub mod tensor;
pub mod walk;

pub use error::{Error, Result};
pub use tensor::{DType, HostData, HostTensor};
