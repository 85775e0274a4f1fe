//! What defines a training run: [`TrainConfig`], its per-stage defaults and its checks. Keys are
//! the CLI's long flag names with `_` for `-`, so that a TOML config file, the checkpoint's saved
//! config and the command line all speak one vocabulary.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

use crate::backend::losses::DEFAULT_BETA;
use crate::backend::sobolev::DEFAULT_EXPONENT;

/// The training stages of design.md sections 5 to 7.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Supervised flow matching on (HQ, LQ) pairs.
    #[default]
    Sft,
    /// The AMG adversary A_phi: mimics a baseline upscaler's velocity on (HQ, LQ, baseline) triples.
    Adversary,
    /// S-DPO against fixed negatives (`Negatives`).
    Dpo,
    /// S-DPO against negatives synthesised by the adversary (or Proposition 1's closed form).
    Asdpo,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Sft => "sft",
            Stage::Adversary => "adversary",
            Stage::Dpo => "dpo",
            Stage::Asdpo => "asdpo",
        }
    }

    /// Whether the stage trains a new adapter on top of a frozen SFT adapter (design.md section 7:
    /// reference = base + SFT LoRA, policy and adversary = reference + their own LoRA).
    pub fn needs_sft_lora(self) -> bool {
        self != Stage::Sft
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the `dpo` stage's losers come from (design.md section 7, the paper's "DPO with
/// supervised data" ablation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Negatives {
    /// A baseline upscaler's output for the same LQ: `DATA/baseline/NAME.png` of a triples folder.
    Triples,
    /// The reference model's own few-step Euler restoration of the LQ (`negative_steps`, seeded).
    Reference,
    /// The bicubic upsample of the LQ (what the model is conditioned on).
    Bicubic,
}

/// Everything that defines a run: a resumed run must have the same values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub stage: Stage,
    /// A model folder to fine-tune; None: a random base of `preset` from `init_seed`.
    pub base: Option<PathBuf>,
    pub preset: String,
    pub init_seed: u64,
    /// A LoRA merged into the base before anything else (frozen): the SFT adapter under the
    /// adversary, dpo and asdpo stages, where the reference is base + this adapter.
    pub sft_lora: Option<PathBuf>,
    /// asdpo: the trained adversary's LoRA; A_phi = base + SFT LoRA + this adapter, frozen.
    pub adversary_lora: Option<PathBuf>,
    /// A folder of HQ images (degraded on the fly) or of prepared `hq/`, `lq/` (and `baseline/`).
    pub data: PathBuf,
    /// Samples (pairs, for dpo and asdpo) per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimiser step; their gradients are averaged.
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup: u64,
    /// The step where the learning rate's cosine decay after warm-up reaches 0; 0: constant.
    #[serde(default)]
    pub decay_steps: u64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub rank: usize,
    /// The Sobolev exponent s of the energies (design.md section 6); 0 is the MSE.
    pub sobolev_s: f64,
    pub seed: u64,
    /// HQ crop side in pixels.
    pub crop: usize,
    /// S-DPO's beta.
    pub beta: f64,
    /// The Sobolev trust-region radius of a synthesised loser's deviation, `||d||_H <= rho`.
    pub rho: f64,
    /// dpo: where the losers come from; None: triples when the data has `baseline/`, else reference.
    pub negatives: Option<Negatives>,
    /// Euler steps of the reference's restorations (`--negatives reference`).
    pub negative_steps: usize,
    /// asdpo: losers from Proposition 1's closed form instead of the adversary.
    pub closed_form: bool,
    /// adversary: `lambda_E` of the hardness term (0: none).
    pub hardness: f64,
    /// sft: train every weight of the transformer instead of a LoRA (a small model from
    /// scratch); a random base then starts adaLN-Zero (identity blocks, zero output).
    pub full: bool,
    /// HQ folders: crops from regions up to twice the side, area-reduced, in any of 8 orientations.
    #[serde(default)]
    pub augment: bool,
    /// The flow's t is `sigmoid(t_mean + t_std n)`, n standard normal (design.md: 0 and 1).
    pub t_mean: f64,
    pub t_std: f64,
    /// The fraction of samples at t = 1 exactly.
    #[serde(default)]
    pub t_one: f64,
}

/// The trust-region radius: a deviation of Sobolev norm 0.1 is, at s = 0, an RMS error of 0.1 on
/// the [-1, 1] scale (about 26 dB PSNR on [0, 1] images), the size of a decent x4 restoration's
/// error and far from the winner's own noise level: losers stay plausible (hard) negatives, not
/// obviously broken ones, while the S-DPO energy differences they cause stay well above f32 noise.
pub const DEFAULT_RHO: f64 = 0.1;

impl TrainConfig {
    /// The defaults of `stage`. Only the Sobolev exponent depends on it: SFT keeps the plain MSE of
    /// flow matching, the preference stages use design.md's s = 1.5.
    pub fn defaults(stage: Stage) -> Self {
        TrainConfig {
            stage,
            base: None,
            preset: "flux-tiny".into(),
            init_seed: 0,
            sft_lora: None,
            adversary_lora: None,
            data: PathBuf::new(),
            batch: 4,
            grad_accum: 1,
            lr: 1e-4,
            warmup: 0,
            decay_steps: 0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            rank: 16,
            sobolev_s: if stage == Stage::Sft { 0.0 } else { DEFAULT_EXPONENT },
            seed: 0,
            crop: 64,
            beta: DEFAULT_BETA,
            rho: DEFAULT_RHO,
            negatives: None,
            negative_steps: 4,
            closed_form: false,
            hardness: 0.0,
            full: false,
            augment: false,
            t_mean: 0.0,
            t_std: 1.0,
            t_one: 0.0,
        }
    }

    /// Checks values on their own (what needs the model, such as the crop's divisibility, is
    /// checked when the model is loaded). The error names the offending key.
    pub fn check(&self) -> Result<(), KeyError> {
        let fail = |key: &'static str, message: String| Err(KeyError { key, message });
        let stage = self.stage;
        if self.data.as_os_str().is_empty() {
            return fail("data", "no training data given".into());
        }
        for (key, value) in [("batch", self.batch), ("grad_accum", self.grad_accum), ("rank", self.rank), ("crop", self.crop)] {
            if value < 1 {
                return fail(key, format!("must be at least 1, got {value}"));
            }
        }
        let positive = [("lr", self.lr), ("max_grad_norm", self.max_grad_norm), ("beta", self.beta), ("rho", self.rho)];
        for (key, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return fail(key, format!("must be positive and finite, got {value}"));
            }
        }
        for (key, value) in [("weight_decay", self.weight_decay), ("hardness", self.hardness)] {
            if !(value.is_finite() && value >= 0.0) {
                return fail(key, format!("must be finite and not negative, got {value}"));
            }
        }
        if !self.sobolev_s.is_finite() {
            return fail("sobolev_s", format!("must be finite, got {}", self.sobolev_s));
        }
        if self.decay_steps != 0 && self.decay_steps <= self.warmup {
            return fail(
                "decay_steps",
                format!("must come after the warm-up's {} steps (or be 0: no decay), got {}", self.warmup, self.decay_steps),
            );
        }
        if self.negative_steps < 1 {
            return fail("negative_steps", "must be at least 1".into());
        }
        if stage.needs_sft_lora() && self.sft_lora.is_none() && self.base.is_none() {
            return fail(
                "sft_lora",
                format!("--stage {stage} trains on top of the SFT model (the frozen reference): give its adapter, or its folder as --base"),
            );
        }
        if self.full && stage != Stage::Sft {
            return fail(
                "full",
                format!("only --stage sft trains the whole model; --stage {stage} trains a LoRA against the frozen reference"),
            );
        }
        if !self.t_mean.is_finite() {
            return fail("t_mean", format!("must be finite, got {}", self.t_mean));
        }
        if !(0.0..=1.0).contains(&self.t_one) {
            return fail("t_one", format!("must be a fraction between 0 and 1, got {}", self.t_one));
        }
        if !(self.t_std.is_finite() && self.t_std > 0.0) {
            return fail("t_std", format!("must be positive and finite, got {}", self.t_std));
        }
        if stage != Stage::Asdpo && self.adversary_lora.is_some() {
            return fail("adversary_lora", format!("only --stage asdpo uses the adversary, not --stage {stage}"));
        }
        if stage != Stage::Asdpo && self.closed_form {
            return fail("closed_form", format!("only --stage asdpo synthesises losers, not --stage {stage}"));
        }
        if stage == Stage::Asdpo && self.closed_form == self.adversary_lora.is_some() {
            let message = if self.closed_form {
                "the closed form replaces the adversary: give one or the other"
            } else {
                "asdpo needs the adversary's LoRA (or --closed-form for Proposition 1's losers)"
            };
            return fail("adversary_lora", message.into());
        }
        if stage != Stage::Adversary && self.hardness != 0.0 {
            return fail("hardness", format!("only --stage adversary has a hardness term, not --stage {stage}"));
        }
        if stage != Stage::Dpo && self.negatives.is_some() {
            return fail("negatives", format!("only --stage dpo takes fixed negatives, not --stage {stage}"));
        }
        Ok(())
    }

    /// [`TrainConfig::check`] with the key written as its flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.check().map_err(|e| anyhow::anyhow!("--{}: {}", flag(e.key), e.message))
    }

    /// The first key whose value differs from `other`'s, with both values: the stage if it
    /// differs (what makes the others differ), else the first in alphabetical order.
    pub fn first_difference(&self, other: &TrainConfig) -> Option<(String, String, String)> {
        let (a, b) = (serde_json::to_value(self).ok()?, serde_json::to_value(other).ok()?);
        let (a, b) = (a.as_object()?, b.as_object()?);
        let keys = std::iter::once("stage").chain(a.keys().map(String::as_str).filter(|k| *k != "stage"));
        keys.map(|k| (k, &a[k])).find(|(k, v)| b.get(*k) != Some(v)).map(|(k, v)| (k.to_string(), v.to_string(), b[k].to_string()))
    }
}

/// A bad value, by key.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyError {
    pub key: &'static str,
    pub message: String,
}

/// The flag of a key: `grad_accum` -> `grad-accum`.
pub fn flag(key: &str) -> String {
    key.replace('_', "-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(stage: Stage) -> TrainConfig {
        TrainConfig { data: "data".into(), sft_lora: Some("sft.safetensors".into()), ..TrainConfig::defaults(stage) }
    }

    #[test]
    fn stage_requirements_are_named_by_key() {
        let key = |c: TrainConfig| c.check().err().map(|e| e.key);
        assert_eq!(key(config(Stage::Sft)), None);
        assert_eq!(key(config(Stage::Dpo)), None);
        assert_eq!(key(TrainConfig { t_one: 1.5, ..config(Stage::Sft) }), Some("t_one"));
        assert_eq!(key(TrainConfig { t_one: 0.25, ..config(Stage::Sft) }), None);
        assert_eq!(key(TrainConfig { warmup: 10, decay_steps: 10, ..config(Stage::Sft) }), Some("decay_steps"));
        assert_eq!(key(TrainConfig { warmup: 10, decay_steps: 11, ..config(Stage::Sft) }), None);
        assert_eq!(key(TrainConfig { sft_lora: None, ..config(Stage::Dpo) }), Some("sft_lora"));
        assert_eq!(key(TrainConfig { sft_lora: None, base: Some("model".into()), ..config(Stage::Dpo) }), None);
        assert_eq!(key(TrainConfig { full: true, ..config(Stage::Sft) }), None);
        assert_eq!(key(TrainConfig { full: true, ..config(Stage::Dpo) }), Some("full"));
        assert_eq!(key(TrainConfig { t_std: 0.0, ..config(Stage::Sft) }), Some("t_std"));
        assert_eq!(key(config(Stage::Asdpo)), Some("adversary_lora"));
        assert_eq!(key(TrainConfig { closed_form: true, ..config(Stage::Asdpo) }), None);
        assert_eq!(key(TrainConfig { adversary_lora: Some("a".into()), ..config(Stage::Asdpo) }), None);
        assert_eq!(
            key(TrainConfig { closed_form: true, adversary_lora: Some("a".into()), ..config(Stage::Asdpo) }),
            Some("adversary_lora")
        );
        assert_eq!(key(TrainConfig { closed_form: true, ..config(Stage::Dpo) }), Some("closed_form"));
        assert_eq!(key(TrainConfig { hardness: 0.5, ..config(Stage::Dpo) }), Some("hardness"));
        assert_eq!(key(TrainConfig { hardness: 0.5, ..config(Stage::Adversary) }), None);
        assert_eq!(key(TrainConfig { negatives: Some(Negatives::Bicubic), closed_form: true, ..config(Stage::Asdpo) }), Some("negatives"));
        assert_eq!(key(TrainConfig { grad_accum: 0, ..config(Stage::Sft) }), Some("grad_accum"));
        assert_eq!(key(TrainConfig { rho: 0.0, ..config(Stage::Dpo) }), Some("rho"));
        assert_eq!(key(TrainConfig { data: PathBuf::new(), ..config(Stage::Sft) }), Some("data"));
        let err = TrainConfig { grad_accum: 0, ..config(Stage::Sft) }.validate().unwrap_err().to_string();
        assert!(err.starts_with("--grad-accum:"), "{err}");
    }

    #[test]
    fn differences_name_the_key_including_the_stage() {
        let (a, b) = (config(Stage::Dpo), config(Stage::Asdpo));
        assert_eq!(a.first_difference(&b).unwrap().0, "stage");
        let (a, b) = (config(Stage::Sft), TrainConfig { sft_lora: None, ..config(Stage::Adversary) });
        assert_eq!(a.first_difference(&b).unwrap(), ("stage".into(), "\"sft\"".into(), "\"adversary\"".into()));
        let b = TrainConfig { rank: 3, seed: 9, ..a.clone() };
        assert_eq!(a.first_difference(&b).unwrap(), ("rank".into(), "16".into(), "3".into()));
        assert_eq!(a.first_difference(&a.clone()), None);
    }
}
