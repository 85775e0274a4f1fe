//! Training (design.md sections 5 to 7): LoRA fine-tuning in four stages, SFT flow matching, the
//! AMG adversary, S-DPO against fixed negatives (`dpo`) and AS-DPO, all on one run loop.
//!
//! - `loss`, `sobolev`, `adamw`: the host reference of the losses, the Sobolev operator and the
//!   optimiser (plain f32-in / f64-accumulate code over slices; the GPU kernels answer to it).
//! - `kernels`: those references and their GPU kernels behind one host-level trait, for the
//!   self-test.
//! - `config`: what defines a run; `data`: what `--data` holds; `batch`: a micro-batch as the
//!   transformer sees it and the passes through it; `params`: the trained tensors and the frozen
//!   model variants; `checkpoint`: the checkpoint file.
//! - `sft`, `adversary`, `preference` (dpo and asdpo): each stage's step function.
//! - `run`: the common loop around them.

pub mod adamw;
pub mod adversary;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod kernels;
pub mod loss;
pub mod params;
pub mod preference;
pub mod run;
pub mod sft;
pub mod sobolev;
