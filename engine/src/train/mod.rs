//! Training (design.md sections 5 to 7): the host reference for the Sobolev operator and the
//! losses of the three stages (SFT flow matching, the AMG adversary, S-DPO / AS-DPO). Everything
//! here is plain f32-in / f64-accumulate code over slices; the GPU kernels answer to it.

pub mod adamw;
pub mod loss;
pub mod run;
pub mod sft;
pub mod sobolev;
