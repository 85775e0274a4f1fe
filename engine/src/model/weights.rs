//! Where a model's weights come from (a checkpoint in either key layout, or seeded random
//! initialisation), the checks that make loading strict (every tensor present, of the expected
//! shape, and none left unused), and LoRA adapters, attached unmerged or merged into the base.

use super::layers::{Linear, LoraDelta};
use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use loaders::flux::FluxCheckpoint;
use loaders::lora::{LoraAdapter, LoraPart};
use loaders::shards::TensorFiles;
use loaders::{DType, HostData, HostTensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::collections::{BTreeMap, BTreeSet};

/// A set of named tensors under internal (BFL) names.
pub trait WeightSource {
    /// Where the weights come from, for messages: a path and a layout.
    fn origin(&self) -> String;
    fn shapes(&self) -> BTreeMap<String, Vec<usize>>;
    fn load(&self, name: &str) -> Result<HostTensor>;
    /// The file key(s) behind an internal name, for messages.
    fn describe(&self, name: &str) -> String;
}

impl WeightSource for FluxCheckpoint {
    fn origin(&self) -> String {
        format!("{} ({} layout)", self.files().path().display(), self.layout())
    }

    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.names().filter_map(|n| Some((n.to_string(), self.shape(n)?))).collect()
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        Ok(FluxCheckpoint::load(self, name)?)
    }

    fn describe(&self, name: &str) -> String {
        self.source(name).unwrap_or_else(|| name.to_string())
    }
}

/// A transformer whose `img_in` takes `in_channels` inputs where the source stores fewer: the
/// new columns are zero (BFL's `optionally_expand_state_dict`, diffusers'
/// `_maybe_expand_transformer_param_shape_or_error_`), so that the widened model's output is the
/// source's whatever the extra channels hold: an imported FLUX.1 takes the LQ latent by channel
/// concatenation before any training has taught it to use it.
pub struct WidenedInput<'a> {
    pub source: &'a dyn WeightSource,
    pub in_channels: usize,
}

const IMG_IN: &str = "img_in.weight";

impl WeightSource for WidenedInput<'_> {
    fn origin(&self) -> String {
        format!("{} (img_in widened to {} inputs)", self.source.origin(), self.in_channels)
    }

    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let mut shapes = self.source.shapes();
        if let Some([_, inputs]) = shapes.get_mut(IMG_IN).map(Vec::as_mut_slice) {
            *inputs = self.in_channels;
        }
        shapes
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        let t = self.source.load(name)?;
        if name != IMG_IN {
            return Ok(t);
        }
        let &[out, stored] = t.shape.as_slice() else { bail!("{}: '{IMG_IN}' has shape {:?}, expected a matrix", self.origin(), t.shape) };
        ensure!(stored <= self.in_channels, "{}: '{IMG_IN}' already takes {stored} inputs", self.origin());
        Ok(pad_columns(&t, out, stored, self.in_channels))
    }

    fn describe(&self, name: &str) -> String {
        self.source.describe(name)
    }
}

/// `[rows, stored]` -> `[rows, width]` with zeros on the right, in `t`'s dtype.
fn pad_columns(t: &HostTensor, rows: usize, stored: usize, width: usize) -> HostTensor {
    let v = t.to_f32();
    let mut out = vec![0f32; rows * width];
    for (o, i) in out.chunks_mut(width).zip(v.chunks(stored)) {
        o[..stored].copy_from_slice(i);
    }
    HostTensor::from_f32(vec![rows, width], out).cast(t.dtype())
}

/// The input width `img_in` must have for `adapters`: a control LoRA's img_in pair takes the
/// widened input (128 for FLUX.1's Canny/Depth LoRAs) that the base (64) lacks.
pub fn adapter_input_width(adapters: &[LoraAdapter]) -> Option<usize> {
    adapters.iter().flat_map(|a| &a.parts).filter(|p| p.target == "img_in").filter_map(|p| p.down.shape.get(1).copied()).max()
}

impl WeightSource for TensorFiles {
    fn origin(&self) -> String {
        self.path().display().to_string()
    }

    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.names().filter_map(|n| Some((n.to_string(), self.info(n)?.shape.clone()))).collect()
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        Ok(self.read(name)?)
    }

    fn describe(&self, name: &str) -> String {
        name.to_string()
    }
}

/// How LoRA adapters are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoraMode {
    /// Folded into the base weights at load time: no cost per forward.
    Merged,
    /// Kept beside the base weights and applied as two small matmuls per forward.
    Unmerged,
}

enum Source<'a> {
    Weights(&'a dyn WeightSource),
    /// Deterministic per tensor name, so the result does not depend on load order.
    Random {
        seed: u64,
    },
    /// No data at all: the backend's placeholders of the right shapes, stored as `dtype`; with
    /// `against`, each name and shape is checked against that source's headers.
    ShapesOnly {
        dtype: DType,
        against: Option<&'a dyn WeightSource>,
    },
}

/// An adapter part waiting for its target linear.
struct PendingLora {
    adapter: String,
    part: LoraPart,
}

/// Builds model parameters one tensor at a time, checking each against the shape the model
/// expects, and tracks what was used so that leftovers are reported.
pub struct WeightLoader<'a, B: Backend> {
    backend: &'a B,
    source: Source<'a>,
    shapes: BTreeMap<String, Vec<usize>>,
    used: BTreeSet<String>,
    lora: BTreeMap<String, Vec<PendingLora>>,
    /// Base tensors replaced outright by an adapter (BFL control LoRAs' QK-norm scales).
    replacements: BTreeMap<String, (String, HostTensor)>,
    lora_mode: LoraMode,
    dtype: Option<DType>,
    /// Every tensor handed out, by name, when recording (to save what was built).
    recorded: Option<Vec<(String, HostTensor)>>,
}

impl<'a, B: Backend> WeightLoader<'a, B> {
    pub fn new(backend: &'a B, source: &'a dyn WeightSource) -> Self {
        let shapes = source.shapes();
        Self::with_source(backend, Source::Weights(source), shapes)
    }

    /// Random weights of the right shapes: linear weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2),
    /// norm scales 1. For tests and benchmarks; `seed` makes them reproducible.
    pub fn random(backend: &'a B, seed: u64) -> Self {
        Self::with_source(backend, Source::Random { seed }, BTreeMap::new())
    }

    /// Weights of the right shapes and no data (`Backend::placeholder`): a model to count FLOPs
    /// and plan memory on, at any size. `dtype` plays the file's dtype: the loader's dtype
    /// (`with_dtype`, the backend's `weight_dtype`) overrides it as for any source. LoRA adapters
    /// are not applied (attach `LoraDelta`s of placeholders to the built model).
    pub fn shapes_only(backend: &'a B, dtype: DType) -> Self {
        Self::with_source(backend, Source::ShapesOnly { dtype, against: None }, BTreeMap::new())
    }

    /// `shapes_only`, checking every tensor the model asks for against `source`'s names and
    /// shapes (and, at `finish`, that it holds nothing else) without reading any data: a
    /// 24 GB checkpoint verified from its headers.
    pub fn headers_of(backend: &'a B, source: &'a dyn WeightSource) -> Self {
        let shapes = source.shapes();
        Self::with_source(backend, Source::ShapesOnly { dtype: DType::BF16, against: Some(source) }, shapes)
    }

    fn with_source(backend: &'a B, source: Source<'a>, shapes: BTreeMap<String, Vec<usize>>) -> Self {
        WeightLoader {
            backend,
            source,
            shapes,
            used: BTreeSet::new(),
            lora: BTreeMap::new(),
            replacements: BTreeMap::new(),
            lora_mode: LoraMode::Merged,
            dtype: backend.weight_dtype(),
            recorded: None,
        }
    }

    /// Stores every weight as `dtype` (None: as the source has it). The default is the backend's
    /// `weight_dtype`.
    pub fn with_dtype(mut self, dtype: Option<DType>) -> Self {
        self.dtype = dtype;
        self
    }

    /// Keeps a copy of every base tensor handed out, with merged LoRA parts included, for
    /// `take_recorded` (to save random weights, or a model with its adapters merged).
    pub fn recording(mut self) -> Self {
        self.recorded = Some(Vec::new());
        self
    }

    /// The tensors handed out since `recording`, under their internal names.
    pub fn take_recorded(&mut self) -> Vec<(String, HostTensor)> {
        self.recorded.take().unwrap_or_default()
    }

    pub fn with_lora(mut self, adapters: Vec<LoraAdapter>, mode: LoraMode) -> Self {
        for a in adapters {
            let name = a.path.display().to_string();
            for part in a.parts {
                self.lora.entry(part.target.clone()).or_default().push(PendingLora { adapter: name.clone(), part });
            }
            for (target, t) in a.replacements {
                self.replacements.insert(target, (name.clone(), t));
            }
        }
        self.lora_mode = mode;
        self
    }

    /// Errors unless `src` holds `name` with exactly `shape`.
    fn check(&self, src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<()> {
        let found = self.shapes.get(name).ok_or_else(|| anyhow::anyhow!("{}: missing tensor '{}'", src.origin(), src.describe(name)))?;
        ensure!(found == shape, "{}: tensor '{}' has shape {found:?}, expected {shape:?}", src.origin(), src.describe(name));
        Ok(())
    }

    fn host(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = match &self.source {
            Source::Weights(src) => {
                self.check(*src, name, shape)?;
                src.load(name)?
            }
            Source::Random { seed } => random_tensor(name, shape, *seed),
            Source::ShapesOnly { .. } => bail!("'{name}': a shapes-only loader has no data to read"),
        };
        let t = match self.replacements.remove(name) {
            Some((adapter, r)) => {
                ensure!(r.shape == shape, "{adapter}: replacement for '{name}' has shape {:?}, expected {shape:?}", r.shape);
                r
            }
            None => t,
        };
        self.used.insert(name.to_string());
        Ok(match self.dtype {
            Some(d) => t.cast(d),
            None => t,
        })
    }

    fn record(&mut self, name: &str, t: &HostTensor) {
        if let Some(r) = &mut self.recorded {
            r.push((name.to_string(), t.clone()));
        }
    }

    /// A named tensor of exactly `shape`, kept on the host (an embedding table to gather rows of).
    pub fn host_tensor(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self.host(name, shape)?;
        self.record(name, &t);
        Ok(t)
    }

    /// Counts `name` as used without reading it: a tensor the model has no use for that a file
    /// may legitimately hold (a tied copy of an embedding, an integer position buffer).
    pub fn skip(&mut self, name: &str) {
        self.used.insert(name.to_string());
    }

    /// A named tensor of exactly `shape`.
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor<B>> {
        if let Source::ShapesOnly { dtype, against } = self.source {
            if let Some(src) = against {
                self.check(src, name, shape)?;
                self.used.insert(name.to_string());
            }
            return self.backend.placeholder(shape, self.dtype.unwrap_or(dtype));
        }
        let t = self.host(name, shape)?;
        self.record(name, &t);
        self.backend.upload(&t)
    }

    /// A linear layer `prefix.weight` `[out, in]` (+ `prefix.bias` `[out]`) with the LoRA parts
    /// that target it, merged or kept aside.
    pub fn linear(&mut self, prefix: &str, in_features: usize, out_features: usize, bias: bool) -> Result<Linear<B>> {
        if let Source::ShapesOnly { .. } = self.source {
            let weight = self.tensor(&format!("{prefix}.weight"), &[out_features, in_features])?;
            let bias = if bias { Some(self.tensor(&format!("{prefix}.bias"), &[out_features])?) } else { None };
            return Ok(Linear { name: prefix.to_string(), weight, bias, lora: Vec::new() });
        }
        let mut weight = self.host(&format!("{prefix}.weight"), &[out_features, in_features])?;
        let mut bias = if bias { Some(self.host(&format!("{prefix}.bias"), &[out_features])?) } else { None };
        let mut parts = self.lora.remove(prefix).unwrap_or_default();
        for p in &mut parts {
            let narrower = p.part.down.shape.get(1).is_some_and(|&din| din < in_features);
            if prefix == "img_in" && narrower && p.part.down.shape.len() == 2 {
                // An adapter trained on the unwidened base: its A sees only the base's inputs
                // (diffusers' `_maybe_expand_lora_state_dict` pads it the same way).
                let (rank, din) = (p.part.down.shape[0], p.part.down.shape[1]);
                p.part.down = pad_columns(&p.part.down, rank, din, in_features);
            }
            check_lora_fits(p, prefix, in_features, out_features)?;
        }
        let mut lora = Vec::new();
        match self.lora_mode {
            LoraMode::Merged => {
                for p in &parts {
                    merge_lora(&mut weight, &mut bias, &p.part, out_features);
                }
            }
            LoraMode::Unmerged => {
                for p in &parts {
                    let b = self.backend;
                    lora.push(LoraDelta {
                        down: b.upload(&p.part.down)?,
                        up: b.upload(&p.part.up)?,
                        up_bias: p.part.up_bias.as_ref().map(|t| b.upload(t)).transpose()?,
                        scale: p.part.scale,
                        offset: p.part.out_offset,
                    });
                }
            }
        }
        self.record(&format!("{prefix}.weight"), &weight);
        if let Some(bias) = &bias {
            self.record(&format!("{prefix}.bias"), bias);
        }
        let b = self.backend;
        Ok(Linear { name: prefix.to_string(), weight: b.upload(&weight)?, bias: bias.as_ref().map(|t| b.upload(t)).transpose()?, lora })
    }

    /// Errors on anything the model did not consume: checkpoint tensors the config does not use,
    /// and LoRA parts aimed at layers the model does not have.
    pub fn finish(self) -> Result<()> {
        if let Source::Weights(src) | Source::ShapesOnly { against: Some(src), .. } = &self.source {
            if let Some(name) = self.shapes.keys().find(|n| !self.used.contains(*n)) {
                let extra = self.shapes.keys().filter(|n| !self.used.contains(*n)).count();
                bail!(
                    "{}: unexpected tensor '{}' ({extra} unused in all): the checkpoint does not match the config",
                    src.origin(),
                    src.describe(name)
                );
            }
        }
        if let Some((name, (adapter, _))) = self.replacements.iter().next() {
            bail!("{adapter}: replaces '{name}', which this model does not have");
        }
        if let Some(p) = self.lora.values().flatten().next() {
            bail!("{}: '{}' targets '{}', which this model does not have", p.adapter, p.part.source, p.part.target);
        }
        Ok(())
    }
}

fn check_lora_fits(p: &PendingLora, target: &str, in_features: usize, out_features: usize) -> Result<()> {
    let (a, part) = (&p.adapter, &p.part);
    ensure!(
        part.down.shape.len() == 2 && part.up.shape.len() == 2,
        "{a}: '{}' down {:?} and up {:?} must be matrices",
        part.source,
        part.down.shape,
        part.up.shape
    );
    let (rank, din, dout) = (part.down.shape[0], part.down.shape[1], part.up.shape[0]);
    ensure!(din == in_features, "{a}: '{}' has {din} input features, but '{target}' takes {in_features}", part.source);
    ensure!(part.up.shape[1] == rank, "{a}: '{}' has down rank {rank} but up {:?}", part.source, part.up.shape);
    ensure!(
        part.out_offset + dout <= out_features,
        "{a}: '{}' updates rows {}..{} of '{target}', which has {out_features}",
        part.source,
        part.out_offset,
        part.out_offset + dout
    );
    if let Some(b) = &part.up_bias {
        ensure!(b.shape == [dout], "{a}: '{}' bias has shape {:?}, expected [{dout}]", part.source, b.shape);
    }
    Ok(())
}

/// `W[off.., :] += scale * up @ down` and `b[off..] += scale * up_bias`, in f32, stored back in
/// the weight's dtype.
fn merge_lora(weight: &mut HostTensor, bias: &mut Option<HostTensor>, part: &LoraPart, out_features: usize) {
    let (rank, in_f, out_len) = (part.down.shape[0], part.down.shape[1], part.up.shape[0]);
    let (down, up) = (part.down.to_f32(), part.up.to_f32());
    let mut w = weight.to_f32();
    for i in 0..out_len {
        let row = &mut w[(part.out_offset + i) * in_f..(part.out_offset + i + 1) * in_f];
        for r in 0..rank {
            let u = part.scale * up[i * rank + r];
            for (x, d) in row.iter_mut().zip(&down[r * in_f..(r + 1) * in_f]) {
                *x += u * d;
            }
        }
    }
    *weight = HostTensor::from_f32(weight.shape.clone(), w).cast(weight.dtype());
    if let Some(ub) = &part.up_bias {
        let dtype = bias.as_ref().map_or(weight.dtype(), |b| b.dtype());
        let mut b = bias.as_ref().map_or_else(|| vec![0f32; out_features], |b| b.to_f32());
        for (x, u) in b[part.out_offset..].iter_mut().zip(ub.to_f32()) {
            *x += part.scale * u;
        }
        *bias = Some(HostTensor::from_f32(vec![out_features], b).cast(dtype));
    }
}

fn random_tensor(name: &str, shape: &[usize], seed: u64) -> HostTensor {
    // FNV-1a of the name: a stable per-tensor stream independent of load order.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| (h ^ c as u64).wrapping_mul(0x1000_0000_01b3));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ h);
    let n: usize = shape.iter().product();
    let std = if name.ends_with(".scale") {
        0.0
    } else if name.ends_with(".bias") {
        0.02
    } else {
        1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt()
    };
    let mean = if name.ends_with(".scale") { 1.0 } else { 0.0 };
    let normal = Normal::new(mean, std).expect("finite std");
    HostTensor::new(shape.to_vec(), HostData::F32((0..n).map(|_| normal.sample(&mut rng)).collect()))
}
