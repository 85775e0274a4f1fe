//! The run loop's interface to the stages: what a stage's step is given ([`StepContext`]) and
//! what it returns ([`MicroStep`]), and the model passes a step is made of (`batch.rs`).

use super::batch::Share;
use super::data::Sample;
use super::params::Trained;
use super::times::LogitNormal;
use crate::backend::training::TrainingOps;
use crate::backend::Backend;
use crate::model::Adapters;
use crate::sr::conditioning::Conditionings;
use crate::sr::model_dir::SrModel;
use crate::tensor::Tensor;
use anyhow::Result;

/// What a stage's step gets besides its samples.
pub struct StepContext<'a, B: TrainingOps> {
    pub b: &'a B,
    /// The model under training: the base with the SFT adapter merged, and in full training its
    /// trained weights in place.
    pub model: &'a SrModel<B>,
    /// The conditionings of the model's fixed text, built once for the run.
    pub conditionings: &'a Conditionings<B>,
    /// What the run trains: the adapters of the policy (or of the adversary, in its own stage), or
    /// the whole model. The reference is the model without them (`Trainable::Nothing`).
    pub trained: &'a dyn Trained<B>,
    /// The frozen AS-DPO adversary's adapters (base + SFT LoRA + these is A_phi), when the run has
    /// one.
    pub adversary: Option<&'a Adapters<B>>,
    pub run_seed: u64,
    /// The micro-batch's index over the run, `step * grad_accum + micro`: the seed of its draws.
    pub draw: u64,
    /// Which items of the micro-batch's draws this rank takes (all of them for one process).
    pub share: Share,
    /// The distribution of the flow's t.
    pub times: LogitNormal,
}

/// One micro-batch's result.
pub struct MicroStep<B: Backend> {
    pub loss: f64,
    /// The gradients of the trained tensors, on the device, in the order of `Trained::masters`.
    pub grads: Vec<Tensor<B>>,
    /// Stage-specific values for the log (`implicit_acc`, `reward_margin`, ...).
    pub metrics: Vec<(&'static str, f64)>,
}

/// A stage: the loss and the gradients of one micro-batch.
pub trait StageStep<B: TrainingOps> {
    fn micro_step(&mut self, cx: &StepContext<B>, samples: &[Sample]) -> Result<MicroStep<B>>;
}
