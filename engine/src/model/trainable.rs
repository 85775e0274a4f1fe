//! What a forward adds to the model's own weights and what its backward differentiates: the
//! trainable set, passed to every call (`Flux::forward_train`, `Flux::backward`, the inference
//! forward) rather than kept in the model. One set of base weights then serves every variant a
//! training run needs: the policy (base + trained adapter), the frozen reference (the base
//! alone) and the AS-DPO adversary (base + the adversary's adapter), by passing a different set.

use super::layers::{Linear, LoraDelta};
use super::params;
use super::Flux;
use crate::backend::Backend;
use anyhow::{bail, ensure, Result};
use loaders::lora::LoraAdapter;
use std::collections::{BTreeMap, BTreeSet};

/// Unmerged LoRA deltas by token-path linear (BFL path, `double_blocks.0.img_attn.qkv`), applied
/// beside the model's own weights and its own unmerged deltas, and the token-path linears whose
/// own weight and bias train beside them (an imported model's widened `img_in`, whose new columns
/// a low-rank delta would learn poorly). Only token-path linears can be named: LoRA training
/// holds the modulation path constant, so a parameter there would get no gradient.
pub struct Adapters<B: Backend> {
    deltas: BTreeMap<String, Vec<LoraDelta<B>>>,
    own: BTreeSet<String>,
}

impl<B: Backend> Adapters<B> {
    /// Deltas by target, each checked against `flux`'s token-path linears (the target exists,
    /// the shapes fit).
    pub fn new(flux: &Flux<B>, deltas: BTreeMap<String, Vec<LoraDelta<B>>>) -> Result<Self> {
        for (target, list) in &deltas {
            let (out_f, in_f) = token_path_linear(flux, target, "an adapter")?;
            for d in list {
                let (rank, din, dout) = (d.down.dim(0), d.down.dim(1), d.up.dim(0));
                ensure!(
                    din == in_f && d.up.shape() == [dout, rank] && d.offset + dout <= out_f,
                    "an adapter on '{target}' (down {:?}, up {:?}, rows from {}) does not fit it [{out_f}, {in_f}]",
                    d.down.shape(),
                    d.up.shape(),
                    d.offset
                );
            }
        }
        Ok(Adapters { deltas, own: BTreeSet::new() })
    }

    /// These adapters with the linears `own` whose own weight and bias train beside them
    /// (token-path linears without a delta: a delta beside a trained weight adds nothing).
    pub fn with_own(self, flux: &Flux<B>, own: BTreeSet<String>) -> Result<Self> {
        for target in &own {
            token_path_linear(flux, target, "its own weight")?;
            ensure!(!self.deltas.contains_key(target), "'{target}' trains its own weight and an adapter: one or the other");
        }
        Ok(Adapters { own, ..self })
    }

    /// A LoRA file's parts as deltas on `flux` (uploaded with the backend's `input`, the
    /// activation dtype, as trained factors are).
    pub fn from_file(b: &B, flux: &Flux<B>, adapter: &LoraAdapter) -> Result<Self> {
        let name = adapter.path.display();
        ensure!(adapter.replacements.is_empty(), "{name}: replaces base tensors, which a frozen training variant cannot");
        let mut deltas: BTreeMap<String, Vec<LoraDelta<B>>> = BTreeMap::new();
        for part in &adapter.parts {
            deltas.entry(part.target.clone()).or_default().push(LoraDelta {
                down: b.input(&part.down)?,
                up: b.input(&part.up)?,
                up_bias: part.up_bias.as_ref().map(|t| b.input(t)).transpose()?,
                scale: part.scale,
                offset: part.out_offset,
            });
        }
        Self::new(flux, deltas).map_err(|e| anyhow::anyhow!("{name}: {e}"))
    }

    /// The deltas on the linear `name`, in the order they apply.
    pub fn on(&self, name: &str) -> &[LoraDelta<B>] {
        self.deltas.get(name).map_or(&[], Vec::as_slice)
    }

    /// The targets and their deltas.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Vec<LoraDelta<B>>)> {
        self.deltas.iter()
    }

    /// Whether the linear `name`'s own weight and bias train.
    pub fn trains_own(&self, name: &str) -> bool {
        self.own.contains(name)
    }
}

/// The shape `[out, in]` of the token-path linear `target` of `flux`, or why `what` cannot train
/// on it.
fn token_path_linear<B: Backend>(flux: &Flux<B>, target: &str, what: &str) -> Result<(usize, usize)> {
    if let Some(lin) = params::token_path(flux).into_iter().find(|lin| lin.name == target) {
        return Ok((lin.weight.dim(0), lin.weight.dim(1)));
    }
    match params::linears(flux).iter().any(|lin| lin.name == target) {
        true => bail!(
            "'{target}' is on the modulation path, which LoRA training holds constant: {what} there cannot be trained \
             (merge it into the base, or leave it out)"
        ),
        false => bail!("'{target}' is not a linear of this model"),
    }
}

/// The trainable set of one forward or backward (see the module docs).
pub enum Trainable<'a, B: Backend> {
    /// The model as loaded; a backward gives the gradient wrt the input latent only (the frozen
    /// reference's, which AS-DPO's closed form and the adversary's hardness term need).
    Nothing,
    /// Deltas beside the model's own weights on token-path linears: a trained adapter, whose
    /// gradients a backward gives (with those of the own weights the adapters name), or a frozen
    /// variant's at inference.
    Lora(&'a Adapters<B>),
    /// The model's own weights: every weight and bias of every linear, the vec path's included;
    /// the QK-norm scales stay frozen. The model must carry no unmerged adapter.
    Full,
}

impl<B: Backend> Clone for Trainable<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Trainable<'_, B> {}

impl<'a, B: Backend> Trainable<'a, B> {
    /// Whether every weight of the model trains, the vec path's included (full training keeps
    /// more activations).
    pub fn full(&self) -> bool {
        matches!(self, Trainable::Full)
    }

    /// Whether `lin`'s own weight and bias train: every linear's in full training, those the
    /// adapters name in LoRA training.
    pub fn trains_own(&self, lin: &Linear<B>) -> bool {
        match self {
            Trainable::Full => true,
            Trainable::Lora(adapters) => adapters.trains_own(&lin.name),
            Trainable::Nothing => false,
        }
    }

    /// The deltas this set adds on `lin`.
    pub fn deltas_on(&self, lin: &Linear<B>) -> &'a [LoraDelta<B>] {
        match self {
            Trainable::Lora(adapters) => adapters.on(&lin.name),
            Trainable::Nothing | Trainable::Full => &[],
        }
    }

    /// A name for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Trainable::Nothing => "Nothing",
            Trainable::Lora(_) => "Lora",
            Trainable::Full => "Full",
        }
    }

    /// Errors where this set cannot be trained on `flux`: full training of a model that carries
    /// unmerged adapters (an adapter on a linear whose base is trained adds nothing).
    pub fn check(&self, flux: &Flux<B>) -> Result<()> {
        if self.full() {
            if let Some(lin) = params::linears(flux).into_iter().find(|lin| !lin.lora.is_empty()) {
                bail!(
                    "'{}' carries an unmerged LoRA, which full training does not support: full training starts from a model \
                     without adapters (merge it into the weights, or leave it out)",
                    lin.name
                );
            }
        }
        Ok(())
    }
}
