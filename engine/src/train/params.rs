//! What a run trains.
//!
//! - [`TensorSet`]: the trained parameters as named f32 host tensors with their shapes: what a
//!   checkpoint holds, and what a run starts from.
//! - [`Masters`]: the same on the device, the f32 master copies the optimiser updates in place;
//!   they leave the device only when a checkpoint or an export is written.
//! - [`Trained`]: how masters reach the model (`refresh`: LoRA deltas in the activation dtype, or
//!   the model's own weights) and the trainable set its passes get, how their gradients come out
//!   of a model backward, and what file a user gets (`export`). [`LoraParams`] and
//!   [`FullParams`] are the two kinds.

use super::checkpoint::LORA_FILE;
use crate::backend::training::TrainingOps;
use crate::backend::Backend;
use crate::model::backward::FluxGrads;
use crate::model::layers::LoraDelta;
use crate::model::{params, Adapters, Flux, Trainable};
use crate::sr::model_dir::{write_model_folder, SrConfig, SrModel};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use loaders::{DType, HostTensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Named f32 tensors and their shapes: the trained parameters on the host.
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

/// The trained tensors' f32 master copies on the device, in the order of their names.
pub struct Masters<B: Backend> {
    pub names: Vec<String>,
    pub tensors: Vec<Tensor<B>>,
}

impl<B: Backend> Masters<B> {
    /// Uploads a host set (f32, kept exactly).
    pub fn upload(b: &B, set: &TensorSet) -> Result<Self> {
        let tensors = set.values.keys().map(|name| b.upload(&set.host(name)?)).collect::<Result<Vec<_>>>()?;
        Ok(Masters { names: set.values.keys().cloned().collect(), tensors })
    }

    /// Downloads the set (for a checkpoint or an export).
    pub fn download(&self, b: &B) -> Result<TensorSet> {
        let mut set = TensorSet::default();
        for (name, t) in self.names.iter().zip(&self.tensors) {
            set.insert(name.clone(), t.shape().to_vec(), b.download(t)?.to_f32());
        }
        Ok(set)
    }

    /// Scalars in all tensors.
    pub fn count(&self) -> usize {
        self.tensors.iter().map(Tensor::elem_count).sum()
    }

    /// The master named `name`.
    pub fn get(&self, name: &str) -> Result<&Tensor<B>> {
        let i = self.names.binary_search_by(|n| n.as_str().cmp(name)).map_err(|_| anyhow::anyhow!("no trained tensor '{name}'"))?;
        Ok(&self.tensors[i])
    }
}

/// Trained parameters as the training loop sees them.
pub trait Trained<B: TrainingOps> {
    fn masters(&self) -> &Masters<B>;
    fn masters_mut(&mut self) -> &mut Masters<B>;
    /// Makes what the model computes with from the masters (after each optimiser step and on
    /// resume): LoRA deltas, or the model's own weights, in the activation dtype.
    fn refresh(&mut self, b: &B, flux: &mut Flux<B>) -> Result<()>;
    /// The trainable set the model's passes get.
    fn trainable(&self) -> Trainable<'_, B>;
    /// The gradients of the masters, in their order, from a model backward.
    fn gradients(&self, grads: FluxGrads<B>) -> Result<Vec<Tensor<B>>>;
    /// Writes what a user loads into the folder `out`: `lora.safetensors` for a LoRA, a model
    /// folder for the whole model. Returns the path to name.
    fn export(&self, b: &B, out: &Path) -> Result<PathBuf>;
}

pub fn down_name(target: &str) -> String {
    format!("{target}.lora_down")
}

pub fn up_name(target: &str) -> String {
    format!("{target}.lora_up")
}

/// One LoRA delta on every token-path linear (design.md section 7's targets, plus the input and
/// output projections): `{target}.lora_down` `[rank, in]` and `{target}.lora_up` `[out, rank]`,
/// scale 1.
pub struct LoraParams<B: Backend> {
    masters: Masters<B>,
    adapters: Adapters<B>,
}

impl<B: TrainingOps> LoraParams<B> {
    /// Fresh factors of `rank` for every token-path linear of `flux` (none may carry an unmerged
    /// adapter: the base's own adapters are merged at load): `down` ~ N(0, 1/in) drawn from
    /// `seed`, `up` = 0, so that a fresh adapter leaves the model unchanged.
    pub fn init(flux: &Flux<B>, rank: usize, seed: u64) -> Result<TensorSet> {
        ensure!(rank >= 1, "the LoRA rank must be at least 1");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = TensorSet::default();
        for lin in params::token_path(flux) {
            ensure!(lin.lora.is_empty(), "'{}' already carries a LoRA: training starts from a base without unmerged adapters", lin.name);
            let (out_f, in_f) = (lin.weight.dim(0), lin.weight.dim(1));
            let std = 1.0 / (in_f as f32).sqrt();
            let down: Vec<f32> = (0..rank * in_f)
                .map(|_| {
                    let z: f32 = StandardNormal.sample(&mut rng);
                    std * z
                })
                .collect();
            tensors.insert(down_name(&lin.name), vec![rank, in_f], down);
            tensors.insert(up_name(&lin.name), vec![out_f, rank], vec![0.0; out_f * rank]);
        }
        Ok(tensors)
    }

    /// The factors `set` on the device, their deltas made for `flux`.
    pub fn new(b: &B, flux: &mut Flux<B>, set: &TensorSet) -> Result<Self> {
        let mut params = LoraParams { masters: Masters::upload(b, set)?, adapters: Adapters::new(flux, BTreeMap::new())? };
        params.refresh(b, flux)?;
        Ok(params)
    }
}

impl<B: TrainingOps> Trained<B> for LoraParams<B> {
    fn masters(&self) -> &Masters<B> {
        &self.masters
    }

    fn masters_mut(&mut self) -> &mut Masters<B> {
        &mut self.masters
    }

    fn refresh(&mut self, b: &B, flux: &mut Flux<B>) -> Result<()> {
        let dtype = b.activation_dtype();
        let mut deltas = BTreeMap::new();
        for name in &self.masters.names {
            let Some(target) = name.strip_suffix(".lora_down") else { continue };
            let (down, up) = (self.masters.get(name)?, self.masters.get(&up_name(target))?);
            let delta = LoraDelta { down: b.cast(down, dtype)?, up: b.cast(up, dtype)?, up_bias: None, scale: 1.0, offset: 0 };
            deltas.insert(target.to_string(), vec![delta]);
        }
        self.adapters = Adapters::new(flux, deltas)?;
        Ok(())
    }

    fn trainable(&self) -> Trainable<'_, B> {
        Trainable::Lora(&self.adapters)
    }

    fn gradients(&self, grads: FluxGrads<B>) -> Result<Vec<Tensor<B>>> {
        let mut by_name = BTreeMap::new();
        for (target, deltas) in grads.lora {
            let [g]: [_; 1] = deltas.try_into().map_err(|d: Vec<_>| {
                anyhow::anyhow!("'{target}' has {} adapters in the backward; training expects its own only", d.len())
            })?;
            by_name.insert(down_name(&target), g.down);
            by_name.insert(up_name(&target), g.up);
        }
        ensure!(
            by_name.keys().eq(self.masters.names.iter()),
            "the backward gave gradients for {} LoRA factors, {} are trained",
            by_name.len(),
            self.masters.names.len()
        );
        Ok(by_name.into_values().collect())
    }

    fn export(&self, b: &B, out: &Path) -> Result<PathBuf> {
        let path = out.join(LORA_FILE);
        write_lora(&path, &self.masters.download(b)?)?;
        Ok(path)
    }
}

/// Every weight and bias of every linear of the transformer (`params::base_parameters_mut`,
/// under their BFL keys), for training a small model from scratch (`--full`). The QK-norm scales
/// stay frozen (and at 1 in a random base); they are kept aside to write whole model folders.
pub struct FullParams<B: Backend> {
    masters: Masters<B>,
    frozen: BTreeMap<String, HostTensor>,
    config: SrConfig,
}

impl<B: TrainingOps> FullParams<B> {
    /// The model's own weights as the starting point; with `adaln_zero` (a random base) every
    /// modulation linear and the final projection start at zero, DiT's adaLN-Zero: each block is
    /// the identity and the model's output is zero until training opens the gates. Returns the
    /// trained set and the frozen tensors.
    pub fn init(b: &B, sr: &mut SrModel<B>, adaln_zero: bool) -> Result<(TensorSet, BTreeMap<String, HostTensor>)> {
        let mut frozen = params::download_weights(b, &sr.flux)?;
        let names: Vec<String> = params::base_parameters_mut(&mut sr.flux).into_iter().map(|(name, _)| name).collect();
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
        Ok((tensors, frozen))
    }

    /// The weights `set` on the device, put in place in `sr`'s transformer.
    pub fn new(b: &B, sr: &mut SrModel<B>, set: &TensorSet, frozen: BTreeMap<String, HostTensor>) -> Result<Self> {
        let mut params = FullParams { masters: Masters::upload(b, set)?, frozen, config: sr.config.clone() };
        params.refresh(b, &mut sr.flux)?;
        Ok(params)
    }
}

impl<B: TrainingOps> Trained<B> for FullParams<B> {
    fn masters(&self) -> &Masters<B> {
        &self.masters
    }

    fn masters_mut(&mut self) -> &mut Masters<B> {
        &mut self.masters
    }

    fn refresh(&mut self, b: &B, flux: &mut Flux<B>) -> Result<()> {
        for (name, tensor) in params::base_parameters_mut(flux) {
            *tensor = b.cast(self.masters.get(&name)?, b.activation_dtype())?;
        }
        Ok(())
    }

    fn trainable(&self) -> Trainable<'_, B> {
        Trainable::Full
    }

    fn gradients(&self, grads: FluxGrads<B>) -> Result<Vec<Tensor<B>>> {
        ensure!(
            grads.base.keys().eq(self.masters.names.iter()),
            "the backward gave {} weight gradients, {} are trained",
            grads.base.len(),
            self.masters.names.len()
        );
        Ok(grads.base.into_values().collect())
    }

    fn export(&self, b: &B, out: &Path) -> Result<PathBuf> {
        let trained = self.masters.download(b)?;
        let mut all: Vec<(String, HostTensor)> = self.frozen.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
        for name in trained.values.keys() {
            all.push((name.clone(), trained.host(name)?));
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
