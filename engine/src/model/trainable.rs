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
use std::collections::BTreeMap;

/// Unmerged LoRA deltas by token-path linear (BFL path, `double_blocks.0.img_attn.qkv`), applied
/// beside the model's own weights and its own unmerged deltas. Only token-path linears can carry
/// them: LoRA training holds the modulation path constant, so a delta there would get no
/// gradient.
pub struct Adapters<B: Backend> {
    deltas: BTreeMap<String, Vec<LoraDelta<B>>>,
}

impl<B: Backend> Adapters<B> {
    /// Deltas by target, each checked against `flux`'s token-path linears (the target exists,
    /// the shapes fit).
    pub fn new(flux: &Flux<B>, deltas: BTreeMap<String, Vec<LoraDelta<B>>>) -> Result<Self> {
        let dims: BTreeMap<&str, (usize, usize)> =
            params::token_path(flux).into_iter().map(|lin| (lin.name.as_str(), (lin.weight.dim(0), lin.weight.dim(1)))).collect();
        for (target, list) in &deltas {
            let Some(&(out_f, in_f)) = dims.get(target.as_str()) else {
                match params::linears(flux).iter().any(|lin| &lin.name == target) {
                    true => bail!(
                        "'{target}' is on the modulation path, which LoRA training holds constant: an adapter there cannot be trained \
                         (merge it into the base, or leave it out)"
                    ),
                    false => bail!("'{target}' is not a linear of this model"),
                }
            };
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
        Ok(Adapters { deltas })
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
}

/// The trainable set of one forward or backward (see the module docs).
pub enum Trainable<'a, B: Backend> {
    /// The model as loaded; a backward gives the gradient wrt the input latent only (the frozen
    /// reference's, which AS-DPO's closed form and the adversary's hardness term need).
    Nothing,
    /// Deltas beside the model's own weights on token-path linears: a trained adapter, whose
    /// gradients a backward gives, or a frozen variant's at inference.
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
    /// Whether the model's own weights are trained (full training keeps more activations).
    pub fn full(&self) -> bool {
        matches!(self, Trainable::Full)
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
