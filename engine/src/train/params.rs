//! What a run trains and the frozen models it trains against.
//!
//! - [`TensorSet`]: the trained parameters as named f32 master tensors with their shapes; the
//!   optimiser and the checkpoint only ever see this.
//! - [`Trainable`]: how such a set reaches the model (`install`), how its gradients come out of a
//!   model backward (`gradients`) and what file a user gets (`export`). [`LoraParams`] is the
//!   LoRA kind; a full-parameter trainer plugs into the same loop with its own implementation.
//! - [`Models`]: the model under training (the policy, or the adversary being trained) and its
//!   frozen variants, sharing one set of base weights. The base already has the SFT adapter merged
//!   (`--sft-lora`), so the reference is the model with the trained adapters taken off, and the
//!   AS-DPO adversary A_phi is the model with the adversary's adapters in their place: a variant is
//!   a set of unmerged adapters swapped onto the token-path linears for the duration of a call.

use super::checkpoint::LORA_FILE;
use crate::backend::backward::BackwardOps;
use crate::backend::Backend;
use crate::model::backward::FluxGrads;
use crate::model::backward::Trainable as FluxTrainable;
use crate::model::layers::LoraDelta;
use crate::model::Flux;
use crate::sr::model_dir::{write_model_folder, SrConfig, SrModel};
use anyhow::{bail, ensure, Context, Result};
use loaders::lora::LoraAdapter;
use loaders::{DType, HostTensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Named f32 tensors and their shapes: the trained parameters' master copies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorSet {
    pub values: BTreeMap<String, Vec<f32>>,
    pub shapes: BTreeMap<String, Vec<usize>>,
}

impl TensorSet {
    pub fn insert(&mut self, name: String, shape: Vec<usize>, values: Vec<f32>) {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        self.shapes.insert(name.clone(), shape);
        self.values.insert(name, values);
    }

    /// Scalars in all tensors.
    pub fn count(&self) -> usize {
        self.values.values().map(Vec::len).sum()
    }

    /// A named tensor as a host tensor.
    pub fn host(&self, name: &str) -> Result<HostTensor> {
        let values = self.values.get(name).with_context(|| format!("no trained tensor '{name}'"))?;
        Ok(HostTensor::from_f32(self.shapes[name].clone(), values.clone()))
    }

    /// Errors unless `other` has the same names and shapes (a checkpoint against a fresh set).
    pub fn ensure_same_layout(&self, other: &TensorSet, what: &str) -> Result<()> {
        for (name, shape) in &self.shapes {
            match other.shapes.get(name) {
                Some(s) if s == shape => {}
                Some(s) => bail!("{what}: '{name}' has shape {s:?}, the model needs {shape:?}"),
                None => bail!("{what}: no tensor '{name}'"),
            }
        }
        if let Some(name) = other.shapes.keys().find(|n| !self.shapes.contains_key(*n)) {
            bail!("{what}: '{name}' is not trained by this model");
        }
        Ok(())
    }
}

/// Trained parameters as the training loop sees them.
pub trait Trainable<B: Backend> {
    /// The master tensors.
    fn tensors(&self) -> &TensorSet;
    fn tensors_mut(&mut self) -> &mut TensorSet;
    /// Puts the master tensors into the model (after each optimiser step and on resume).
    fn install(&self, b: &B, flux: &mut Flux<B>) -> Result<()>;
    /// The gradients of the master tensors, by the same names, from a model backward.
    fn gradients(&self, b: &B, grads: &FluxGrads<B>) -> Result<BTreeMap<String, Vec<f32>>>;
    /// Writes what a user loads into the folder `out`: `lora.safetensors` for a LoRA, a model
    /// folder for the whole model. Returns the path to name.
    fn export(&self, out: &Path) -> Result<PathBuf>;
}

pub fn down_name(target: &str) -> String {
    format!("{target}.lora_down")
}

pub fn up_name(target: &str) -> String {
    format!("{target}.lora_up")
}

/// One LoRA delta on every token-path linear (design.md section 7's targets, plus the input and
/// output projections): `{target}.lora_down` `[rank, in]` ~ N(0, 1/in) and `{target}.lora_up`
/// `[out, rank]` = 0, scale 1, so that a fresh adapter leaves the model unchanged.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraParams {
    pub tensors: TensorSet,
}

impl LoraParams {
    /// Fresh adapters of `rank` for every token-path linear of `flux` (none may carry an
    /// unmerged adapter: the base's own adapters are merged at load), `down` drawn from `seed`.
    pub fn new<B: BackwardOps>(flux: &mut Flux<B>, rank: usize, seed: u64) -> Result<Self> {
        ensure!(rank >= 1, "the LoRA rank must be at least 1");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = TensorSet::default();
        for (target, lin) in flux.token_path_linears_mut() {
            ensure!(lin.lora.is_empty(), "'{target}' already carries a LoRA: training starts from a base without unmerged adapters");
            let (out_f, in_f) = (lin.weight.dim(0), lin.weight.dim(1));
            let std = 1.0 / (in_f as f32).sqrt();
            let down: Vec<f32> = (0..rank * in_f)
                .map(|_| {
                    let z: f32 = StandardNormal.sample(&mut rng);
                    std * z
                })
                .collect();
            tensors.insert(down_name(&target), vec![rank, in_f], down);
            tensors.insert(up_name(&target), vec![out_f, rank], vec![0.0; out_f * rank]);
        }
        Ok(LoraParams { tensors })
    }
}

impl<B: BackwardOps> Trainable<B> for LoraParams {
    fn tensors(&self) -> &TensorSet {
        &self.tensors
    }

    fn tensors_mut(&mut self) -> &mut TensorSet {
        &mut self.tensors
    }

    fn install(&self, b: &B, flux: &mut Flux<B>) -> Result<()> {
        for (target, lin) in flux.token_path_linears_mut() {
            let down = b.input(&self.tensors.host(&down_name(&target))?)?;
            let up = b.input(&self.tensors.host(&up_name(&target))?)?;
            lin.lora = vec![LoraDelta { down, up, up_bias: None, scale: 1.0, offset: 0 }];
        }
        Ok(())
    }

    fn gradients(&self, b: &B, grads: &FluxGrads<B>) -> Result<BTreeMap<String, Vec<f32>>> {
        let mut out = BTreeMap::new();
        for (target, deltas) in &grads.lora {
            ensure!(deltas.len() == 1, "'{target}' has {} adapters in the backward; training expects its own only", deltas.len());
            out.insert(down_name(target), b.download(&deltas[0].down)?.to_f32());
            out.insert(up_name(target), b.download(&deltas[0].up)?.to_f32());
        }
        ensure!(
            out.len() == self.tensors.values.len(),
            "the backward gave gradients for {} LoRA factors, {} are trained",
            out.len(),
            self.tensors.values.len()
        );
        Ok(out)
    }

    fn export(&self, out: &Path) -> Result<PathBuf> {
        let path = out.join(LORA_FILE);
        write_lora(&path, &self.tensors)?;
        Ok(path)
    }
}

/// Every weight and bias of every linear of the transformer (`Flux::base_parameters_mut`, under
/// their BFL keys), for training a small model from scratch (`--full`). The QK-norm scales stay
/// frozen (and at 1 in a random base); they are kept aside to write whole model folders.
pub struct FullParams {
    pub tensors: TensorSet,
    frozen: BTreeMap<String, HostTensor>,
    config: SrConfig,
}

impl FullParams {
    /// The model's own weights as the starting point; with `adaln_zero` (a random base) every
    /// modulation linear and the final projection start at zero, DiT's adaLN-Zero: each block is
    /// the identity and the model's output is zero until training opens the gates.
    pub fn new<B: BackwardOps>(b: &B, sr: &mut SrModel<B>, adaln_zero: bool) -> Result<Self> {
        let mut frozen = sr.flux.download_weights(b)?;
        let names: Vec<String> = sr.flux.base_parameters_mut().into_iter().map(|(name, _)| name).collect();
        let mut tensors = TensorSet::default();
        for name in names {
            let t = frozen.remove(&name).with_context(|| format!("no weight '{name}' in the model"))?;
            let mut values = t.to_f32();
            let modulation = ["_mod.lin.", "modulation.lin.", "adaLN_modulation."].iter().any(|m| name.contains(m));
            if adaln_zero && (modulation || name.starts_with("final_layer.linear.")) {
                values.fill(0.0);
            }
            tensors.insert(name, t.shape.clone(), values);
        }
        Ok(FullParams { tensors, frozen, config: sr.config.clone() })
    }
}

impl<B: BackwardOps> Trainable<B> for FullParams {
    fn tensors(&self) -> &TensorSet {
        &self.tensors
    }

    fn tensors_mut(&mut self) -> &mut TensorSet {
        &mut self.tensors
    }

    fn install(&self, b: &B, flux: &mut Flux<B>) -> Result<()> {
        flux.trainable = FluxTrainable::Full;
        for (name, tensor) in flux.base_parameters_mut() {
            *tensor = b.input(&self.tensors.host(&name)?)?;
        }
        Ok(())
    }

    fn gradients(&self, b: &B, grads: &FluxGrads<B>) -> Result<BTreeMap<String, Vec<f32>>> {
        let out: BTreeMap<String, Vec<f32>> =
            grads.base.iter().map(|(name, g)| Ok((name.clone(), b.download(g)?.to_f32()))).collect::<Result<_>>()?;
        ensure!(
            out.len() == self.tensors.values.len(),
            "the backward gave {} weight gradients, {} are trained",
            out.len(),
            self.tensors.values.len()
        );
        Ok(out)
    }

    fn export(&self, out: &Path) -> Result<PathBuf> {
        let mut all: Vec<(String, HostTensor)> = self.frozen.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
        for name in self.tensors.values.keys() {
            all.push((name.clone(), self.tensors.host(name)?));
        }
        let list: Vec<(&str, &HostTensor)> = all.iter().map(|(n, t)| (n.as_str(), t)).collect();
        write_model_folder(out, &self.config, &list, DType::F32, true)?;
        Ok(out.to_path_buf())
    }
}

/// Where one BFL token-path linear lives in diffusers' `FluxTransformer2DModel`: the modules
/// whose rows it stacks, `hidden` rows each but a trailing `proj_mlp`, which takes the rest.
fn diffusers_modules(target: &str) -> Result<Vec<String>> {
    let top = |m: &str| Ok(vec![m.to_string()]);
    match target {
        "img_in" => return top("x_embedder"),
        "txt_in" => return top("context_embedder"),
        "final_layer.linear" => return top("proj_out"),
        _ => {}
    }
    let parts: Vec<&str> = target.splitn(3, '.').collect();
    let [kind, index, name] = parts[..] else { bail!("no diffusers name for the linear '{target}'") };
    let members: &[&str] = match (kind, name) {
        ("double_blocks", "img_attn.qkv") => &["attn.to_q", "attn.to_k", "attn.to_v"],
        ("double_blocks", "txt_attn.qkv") => &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
        ("double_blocks", "img_attn.proj") => &["attn.to_out.0"],
        ("double_blocks", "txt_attn.proj") => &["attn.to_add_out"],
        ("double_blocks", "img_mlp.0") => &["ff.net.0.proj"],
        ("double_blocks", "img_mlp.2") => &["ff.net.2"],
        ("double_blocks", "txt_mlp.0") => &["ff_context.net.0.proj"],
        ("double_blocks", "txt_mlp.2") => &["ff_context.net.2"],
        ("single_blocks", "linear1") => &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
        ("single_blocks", "linear2") => &["proj_out"],
        _ => bail!("no diffusers name for the linear '{target}'"),
    };
    let block = if kind == "double_blocks" { "transformer_blocks" } else { "single_transformer_blocks" };
    Ok(members.iter().map(|m| format!("{block}.{index}.{m}")).collect())
}

/// The LoRA in the diffusers/peft layout (`transformer.<module>.lora_A.weight` / `lora_B`, no
/// alpha: scale 1), which `engine upscale --lora` reads. A fused BFL linear (qkv, linear1) becomes
/// one module per member, each with the whole `down` and its own rows of `up`: the same update.
pub fn write_lora(path: &Path, tensors: &TensorSet) -> Result<()> {
    let mut out = Vec::new();
    for (name, down) in &tensors.values {
        let Some(target) = name.strip_suffix(".lora_down") else { continue };
        let up_key = up_name(target);
        let (down_shape, up_shape, up) = (&tensors.shapes[name], &tensors.shapes[&up_key], &tensors.values[&up_key]);
        let (rank, hidden, out_rows) = (down_shape[0], down_shape[1], up_shape[0]);
        let modules = diffusers_modules(target)?;
        for (i, module) in modules.iter().enumerate() {
            // Every member has `hidden` rows except the last, which takes what is left.
            let first = i * hidden;
            let rows = if modules.len() == 1 {
                out_rows
            } else if i + 1 == modules.len() {
                out_rows - first
            } else {
                hidden
            };
            out.push((format!("transformer.{module}.lora_A.weight"), HostTensor::from_f32(vec![rank, hidden], down.clone())));
            let up_rows = up[first * rank..(first + rows) * rank].to_vec();
            out.push((format!("transformer.{module}.lora_B.weight"), HostTensor::from_f32(vec![rows, rank], up_rows)));
        }
    }
    let list: Vec<(&str, &HostTensor)> = out.iter().map(|(n, t)| (n.as_str(), t)).collect();
    loaders::safetensors::write(path, &list, &BTreeMap::new(), true)?;
    Ok(())
}

/// Unmerged adapters by token-path linear: one model variant's difference from the shared base.
pub struct Adapters<B: Backend>(BTreeMap<String, Vec<LoraDelta<B>>>);

impl<B: BackwardOps> Adapters<B> {
    /// No adapters: the base itself.
    pub fn none() -> Self {
        Adapters(BTreeMap::new())
    }

    /// A LoRA file's parts as unmerged deltas on `flux`'s token-path linears, checked against
    /// their shapes. Only token-path linears can carry a variant's adapter (the backward holds the
    /// modulation path constant).
    pub fn from_adapter(b: &B, flux: &mut Flux<B>, adapter: &LoraAdapter) -> Result<Self> {
        let name = adapter.path.display();
        ensure!(adapter.replacements.is_empty(), "{name}: replaces base tensors, which a frozen training variant cannot");
        let mut dims: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (target, lin) in flux.token_path_linears_mut() {
            dims.insert(target, (lin.weight.dim(0), lin.weight.dim(1)));
        }
        let mut deltas: BTreeMap<String, Vec<LoraDelta<B>>> = BTreeMap::new();
        for part in &adapter.parts {
            let Some(&(out_f, in_f)) = dims.get(&part.target) else {
                bail!("{name}: '{}' targets '{}', which is not a token-path linear of this model", part.source, part.target)
            };
            let (rank, din, dout) = (part.rank(), part.down.shape[1], part.out_len());
            ensure!(
                din == in_f && part.up.shape == [dout, rank] && part.out_offset + dout <= out_f,
                "{name}: '{}' (down {:?}, up {:?}, rows from {}) does not fit '{}' [{out_f}, {in_f}]",
                part.source,
                part.down.shape,
                part.up.shape,
                part.out_offset,
                part.target
            );
            deltas.entry(part.target.clone()).or_default().push(LoraDelta {
                down: b.input(&part.down)?,
                up: b.input(&part.up)?,
                up_bias: part.up_bias.as_ref().map(|t| b.input(t)).transpose()?,
                scale: part.scale,
                offset: part.out_offset,
            });
        }
        Ok(Adapters(deltas))
    }

    /// Exchanges these adapters with the ones on the model's token-path linears.
    fn swap(&mut self, flux: &mut Flux<B>) {
        for (target, lin) in flux.token_path_linears_mut() {
            std::mem::swap(&mut lin.lora, self.0.entry(target).or_default());
        }
    }
}

/// The frozen variants of the model under training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    /// Base + SFT LoRA: the DPO reference (and the adversary's hardness judge).
    Reference,
    /// Base + SFT LoRA + the adversary's LoRA: A_phi of AS-DPO.
    Adversary,
}

/// The model under training (its trained adapters installed) and its frozen variants.
pub struct Models<B: Backend> {
    pub sr: SrModel<B>,
    variants: BTreeMap<Variant, Adapters<B>>,
}

impl<B: BackwardOps> Models<B> {
    /// `sr` with the reference variant (no adapters beyond what its base has merged).
    pub fn new(sr: SrModel<B>) -> Self {
        Models { sr, variants: BTreeMap::from([(Variant::Reference, Adapters::none())]) }
    }

    pub fn add_variant(&mut self, variant: Variant, adapters: Adapters<B>) {
        self.variants.insert(variant, adapters);
    }

    /// Runs `f` on the model as `variant`: that variant's adapters replace the trained ones for
    /// the call, which are back in place afterwards (also when `f` fails).
    pub fn with<R>(&mut self, variant: Variant, f: impl FnOnce(&SrModel<B>) -> Result<R>) -> Result<R> {
        let adapters = self.variants.get_mut(&variant).with_context(|| format!("this run has no {variant:?} model"))?;
        adapters.swap(&mut self.sr.flux);
        let result = f(&self.sr);
        adapters.swap(&mut self.sr.flux);
        result
    }
}
