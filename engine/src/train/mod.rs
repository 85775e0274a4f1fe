//! Training (design.md sections 5 to 7): LoRA fine-tuning in four stages, SFT flow matching, the
//! AMG adversary, S-DPO against fixed negatives (`dpo`) and AS-DPO, all on one run loop. The
//! training math itself (losses, the Sobolev operator, AdamW) is the backend's
//! (`backend::training`), so that a step runs where the model runs.
//!
//! - `config`: what defines a run; `data`: what `--data` holds; `times`: the flow's t.
//! - `batch`: a micro-batch on the device as the flow sees it, and the model passes through it.
//! - `params`: the trained tensors (device masters, their host form); `optimizer`: AdamW over
//!   them; `checkpoint`: the checkpoint file.
//! - `stage`: what a stage's step gets and gives; `sft`, `adversary`, `preference` (dpo and
//!   asdpo): each stage's step function.
//! - `run`: the common loop around them; `ranks`: what the ranks of a data-parallel run must
//!   agree on.

pub mod adversary;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod optimizer;
pub mod params;
pub mod preference;
pub mod ranks;
pub mod run;
pub mod sft;
pub mod stage;
pub mod times;
