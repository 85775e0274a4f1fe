//! LoRA adapters for FLUX in the three layouts found in the wild, turned into parts that each
//! update a row range of one BFL linear: `W[out_offset..out_offset+out_len] += scale * up @ down`
//! (plus `up_bias` on those rows).
//!
//! - diffusers/peft: `transformer.transformer_blocks.N.attn.to_q.lora_A.weight` / `lora_B`, names
//!   mapped through the same table as checkpoints (`keymap`), so split q/k/v(/proj_mlp) become
//!   row ranges of BFL's fused qkv / linear1, and `norm_out.linear` has its halves swapped.
//! - kohya: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `lora_up` / `alpha`.
//! - BFL: `double_blocks.0.img_attn.qkv.lora_A.weight` / `lora_B.weight` / `lora_B.bias`; BFL's
//!   control LoRAs also carry whole QK-norm scales, returned as `replacements`.
//!
//! Scale: a per-module `alpha` tensor gives alpha / rank; failing that, diffusers' saved peft
//! config (`lora_adapter_metadata` in the header) gives lora_alpha / r with its patterns applied
//! (alpha / sqrt(r) under rsLoRA); failing that, 1.0. Whether a target exists in the model and
//! its dims fit is the engine's check: it knows the config.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::keymap::{self, Kind, Place};
use crate::safetensors::{Checkpoint, OrderedMap};
use crate::tensor::HostTensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraLayout {
    Peft,
    Kohya,
    Bfl,
}

impl fmt::Display for LoraLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoraLayout::Peft => "diffusers/peft",
            LoraLayout::Kohya => "kohya",
            LoraLayout::Bfl => "BFL",
        })
    }
}

/// One low-rank update of a row range of one BFL linear.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPart {
    /// BFL linear path without `.weight`: `double_blocks.0.img_attn.qkv`.
    pub target: String,
    /// First output row of the target this part updates (to_k inside a fused qkv: hidden).
    pub out_offset: usize,
    /// A: [rank, in].
    pub down: HostTensor,
    /// B: [out_len, rank].
    pub up: HostTensor,
    /// [out_len], added to the same rows.
    pub up_bias: Option<HostTensor>,
    pub scale: f32,
    /// The module name in the file (key without the lora suffix), for messages.
    pub source: String,
}

impl LoraPart {
    pub fn rank(&self) -> usize {
        self.down.shape[0]
    }

    pub fn out_len(&self) -> usize {
        self.up.shape[0]
    }
}

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub path: PathBuf,
    pub layout: LoraLayout,
    pub parts: Vec<LoraPart>,
    /// Base tensors the adapter replaces outright, by internal (BFL) name: BFL control LoRAs
    /// carry new `*.norm.{query,key}_norm.scale` values. Empty for the other layouts.
    pub replacements: Vec<(String, HostTensor)>,
    /// Modules left out because the engine has nothing to apply them to: the text-encoder parts
    /// (`lora_te*`) of kohya adapters, since the engine's text embedding is fixed.
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// peft and BFL: `lora_A` / `lora_B`.
    AB,
    /// kohya: `lora_down` / `lora_up`.
    DownUp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Down,
    Up,
    UpBias,
    Alpha,
}

/// Tensor suffixes and what they hold; `alpha` belongs to both families.
const SUFFIXES: [(&str, Option<Family>, Role); 6] = [
    (".lora_A.weight", Some(Family::AB), Role::Down),
    (".lora_B.weight", Some(Family::AB), Role::Up),
    (".lora_B.bias", Some(Family::AB), Role::UpBias),
    (".lora_down.weight", Some(Family::DownUp), Role::Down),
    (".lora_up.weight", Some(Family::DownUp), Role::Up),
    (".alpha", None, Role::Alpha),
];

fn split_key(key: &str) -> Option<(&str, Option<Family>, Role)> {
    SUFFIXES.iter().find_map(|&(suffix, family, role)| Some((key.strip_suffix(suffix)?, family, role)))
}

fn suffix(family: Family, role: Role) -> &'static str {
    let found = SUFFIXES.iter().find(|&&(_, f, r)| r == role && f.is_none_or(|f| f == family));
    found.expect("every family has down and up suffixes").0
}

/// Whether a key is a LoRA down/up tensor (used to refuse adapters given as a checkpoint).
pub(crate) fn is_lora_key(key: &str) -> bool {
    matches!(split_key(key), Some((_, Some(_), _)))
}

/// The keys found for one module.
#[derive(Default)]
struct Slots<'a> {
    down: Option<&'a str>,
    up: Option<&'a str>,
    up_bias: Option<&'a str>,
    alpha: Option<&'a str>,
}

impl<'a> Slots<'a> {
    fn any_key(&self) -> &'a str {
        [self.down, self.up, self.up_bias, self.alpha]
            .into_iter()
            .flatten()
            .next()
            .expect("a module exists because one of its keys was seen")
    }
}

impl LoraAdapter {
    /// `hidden_size` places split projections inside fused targets: diffusers' to_q/to_k/to_v/
    /// proj_mlp land at row offsets 0, h, 2h, 3h of qkv / linear1.
    pub fn open(path: &Path, hidden_size: usize) -> Result<LoraAdapter> {
        LoraAdapter::from_checkpoint(&Checkpoint::open(path)?, hidden_size)
    }

    pub fn from_checkpoint(ckpt: &Checkpoint, hidden_size: usize) -> Result<LoraAdapter> {
        let path = ckpt.path();
        if !ckpt.names().any(is_lora_key) {
            return LoraAdapter::replacements_only(ckpt);
        }
        let mut family: Option<(Family, &str)> = None;
        let mut others = Vec::new();
        let mut modules: BTreeMap<&str, Slots> = BTreeMap::new();
        for key in ckpt.names() {
            let Some((module, key_family, role)) = split_key(key) else {
                others.push(key);
                continue;
            };
            match (family, key_family) {
                (None, Some(f)) => family = Some((f, key)),
                (Some((f, first)), Some(g)) if f != g => {
                    return Err(Error::invalid(path, format!("mixes lora_A/lora_B and lora_down/lora_up keys ('{first}' and '{key}')")))
                }
                _ => {}
            }
            let slots = modules.entry(module).or_default();
            let slot = match role {
                Role::Down => &mut slots.down,
                Role::Up => &mut slots.up,
                Role::UpBias => &mut slots.up_bias,
                Role::Alpha => &mut slots.alpha,
            };
            *slot = Some(key);
        }
        let (family, _) = family.expect("a LoRA key was found above");
        let layout = match family {
            Family::DownUp => LoraLayout::Kohya,
            Family::AB => detect_ab(ckpt, &modules)?,
        };
        let skipped: Vec<String> = match layout {
            LoraLayout::Kohya => modules.keys().filter(|m| m.starts_with("lora_te")).map(|m| m.to_string()).collect(),
            LoraLayout::Peft | LoraLayout::Bfl => Vec::new(),
        };
        if skipped.len() == modules.len() {
            return Err(Error::invalid(
                path,
                format!("adapts only text encoders ('{}', ...); this engine runs none (its text embedding is fixed)", skipped[0]),
            ));
        }
        modules.retain(|m, _| !m.starts_with("lora_te") || layout != LoraLayout::Kohya);
        let config = match layout {
            LoraLayout::Peft => AdapterConfig::from_metadata(ckpt)?,
            LoraLayout::Kohya | LoraLayout::Bfl => None,
        };
        let reader = PartReader { ckpt, layout, family, config, hidden_size };
        let parts = modules.iter().map(|(module, slots)| reader.part(module, slots)).collect::<Result<Vec<_>>>()?;
        let replacements = others.into_iter().map(|key| replacement(ckpt, layout, key)).collect::<Result<Vec<_>>>()?;
        Ok(LoraAdapter { path: path.to_path_buf(), layout, parts, replacements, skipped })
    }

    /// A control LoRA cut down to its QK-norm scales (any subset of a control LoRA's keys loads):
    /// the layout is the names', BFL's `*.scale` or diffusers' `*.norm_q.weight`.
    fn replacements_only(ckpt: &Checkpoint) -> Result<LoraAdapter> {
        let path = ckpt.path();
        let names: Vec<&str> = ckpt.names().collect();
        let layout = if !names.is_empty() && names.iter().all(|k| norm_replacement(LoraLayout::Bfl, k).is_some()) {
            LoraLayout::Bfl
        } else if !names.is_empty() && names.iter().all(|k| norm_replacement(LoraLayout::Peft, k).is_some()) {
            LoraLayout::Peft
        } else {
            return Err(Error::invalid(
                path,
                "no LoRA tensors found (expected lora_A/lora_B or lora_down/lora_up keys, or a control LoRA's QK-norm scales)",
            ));
        };
        let replacements = names.into_iter().map(|key| replacement(ckpt, layout, key)).collect::<Result<Vec<_>>>()?;
        Ok(LoraAdapter { path: path.to_path_buf(), layout, parts: Vec::new(), replacements, skipped: Vec::new() })
    }

    /// The largest rank over the parts.
    pub fn rank(&self) -> usize {
        self.parts.iter().map(LoraPart::rank).max().unwrap_or(0)
    }

    /// Trainable parameters: every element of every down, up and bias.
    pub fn parameter_count(&self) -> usize {
        self.parts.iter().map(|p| p.down.len() + p.up.len() + p.up_bias.as_ref().map_or(0, HostTensor::len)).sum()
    }
}

/// A tensor that is not part of a low-rank pair. Control LoRAs ship new QK-norm scales beside
/// their pairs: BFL's (FLUX.1-Depth/Canny-dev-lora) as `*.norm.query_norm.scale`, diffusers' form
/// of them as `transformer.*.attn.norm_q.weight` (which `FluxLoraLoaderMixin` loads as full
/// replacements); anything else is a file we do not understand.
fn replacement(ckpt: &Checkpoint, layout: LoraLayout, key: &str) -> Result<(String, HostTensor)> {
    if let Some(internal) = norm_replacement(layout, key) {
        return Ok((internal, ckpt.read(key)?));
    }
    let norms = if layout == LoraLayout::Kohya { "" } else { ", or QK-norm scales" };
    Err(Error::invalid(
        ckpt.path(),
        format!("unexpected tensor '{key}' in a {layout} LoRA adapter (expected *.lora_A.weight, *.lora_B.weight/bias, *.lora_down.weight, *.lora_up.weight, *.alpha{norms})"),
    ))
}

/// The internal name of a QK-norm scale as a `layout` adapter spells it.
fn norm_replacement(layout: LoraLayout, key: &str) -> Option<String> {
    let name = keymap::strip_prefix(key);
    match layout {
        LoraLayout::Bfl => (keymap::is_bfl_param(name) && name.ends_with(".scale")).then(|| name.to_string()),
        LoraLayout::Peft => {
            let (module, param) = name.rsplit_once('.')?;
            let m = keymap::diffusers_module(module)?;
            (m.kind == Kind::Norm).then_some(())?;
            Some(format!("{}.{}", m.bfl, keymap::bfl_param(m.kind, param)?))
        }
        LoraLayout::Kohya => None,
    }
}

/// lora_A/lora_B files name modules either BFL's way or diffusers' way; the names decide.
fn detect_ab(ckpt: &Checkpoint, modules: &BTreeMap<&str, Slots>) -> Result<LoraLayout> {
    let first = |is: fn(&str) -> bool| modules.iter().find(|(m, _)| is(keymap::strip_prefix(m))).map(|(_, s)| s.any_key());
    let bfl = first(|m| keymap::bfl_module(m).is_some());
    let diffusers = first(|m| keymap::diffusers_module(m).is_some());
    match (bfl, diffusers) {
        (Some(a), Some(b)) => Err(Error::invalid(ckpt.path(), format!("mixes BFL ('{a}') and diffusers ('{b}') module names"))),
        (Some(_), None) => Ok(LoraLayout::Bfl),
        (None, Some(_)) => Ok(LoraLayout::Peft),
        (None, None) => {
            let key = modules.values().next().expect("at least one LoRA key was seen").any_key();
            Err(Error::invalid(ckpt.path(), format!("'{key}' adapts no FLUX transformer module (neither a BFL nor a diffusers name)")))
        }
    }
}

/// Where a module's update lands, or why it cannot.
fn target(layout: LoraLayout, module: &str) -> std::result::Result<(String, Place), String> {
    let not_flux = || format!("'{module}' is not a FLUX transformer module ({layout} layout)");
    let linear = |kind: Kind, bfl: String, place: Place| match kind {
        Kind::Linear => Ok((bfl, place)),
        Kind::Norm => Err(format!("'{module}' is a norm, not a linear layer; LoRA cannot adapt it")),
    };
    match layout {
        LoraLayout::Kohya => {
            let bfl = module.strip_prefix("lora_unet_").and_then(keymap::bfl_linear_from_flat).ok_or_else(not_flux)?;
            Ok((bfl, Place::Whole))
        }
        LoraLayout::Bfl => {
            let name = keymap::strip_prefix(module);
            let kind = keymap::bfl_module(name).ok_or_else(not_flux)?;
            linear(kind, name.to_string(), Place::Whole)
        }
        LoraLayout::Peft => {
            let m = keymap::diffusers_module(keymap::strip_prefix(module)).ok_or_else(not_flux)?;
            linear(m.kind, m.bfl, m.place)
        }
    }
}

struct PartReader<'a> {
    ckpt: &'a Checkpoint,
    layout: LoraLayout,
    family: Family,
    config: Option<AdapterConfig>,
    hidden_size: usize,
}

impl PartReader<'_> {
    fn part(&self, module: &str, slots: &Slots) -> Result<LoraPart> {
        let path = self.ckpt.path();
        let fail = |reason: String| Error::invalid(path, reason);
        let require = |slot: Option<&str>, role: Role| {
            slot.map(str::to_string)
                .ok_or_else(|| fail(format!("'{module}{}' is missing (found '{}')", suffix(self.family, role), slots.any_key())))
        };
        let down_key = require(slots.down, Role::Down)?;
        let up_key = require(slots.up, Role::Up)?;
        let (bfl, place) = target(self.layout, module).map_err(|reason| fail(format!("{reason} (key '{}')", slots.any_key())))?;

        let down = self.ckpt.read(&down_key)?;
        let mut up = self.ckpt.read(&up_key)?;
        let (rank, out_len) = match (&down.shape[..], &up.shape[..]) {
            (&[r, _], &[out, r2]) if r == r2 && r > 0 => (r, out),
            _ => {
                return Err(fail(format!(
                    "'{down_key}' is {:?} and '{up_key}' is {:?}; expected [rank, in] and [out, rank] with one non-zero rank",
                    down.shape, up.shape
                )))
            }
        };
        let mut up_bias = match slots.up_bias {
            Some(key) => {
                let bias = self.ckpt.read(key)?;
                if bias.shape != [out_len] {
                    return Err(fail(format!("'{key}' is {:?}; expected [{out_len}] to match '{up_key}'", bias.shape)));
                }
                Some(bias)
            }
            None => None,
        };
        let scale = match slots.alpha {
            Some(key) => self.alpha(key)? / rank as f32,
            None => match &self.config {
                Some(config) => {
                    config.scale(keymap::strip_prefix(module), rank).map_err(|reason| fail(format!("{reason} (key '{down_key}')")))?
                }
                None => 1.0,
            },
        };
        let out_offset = match place {
            Place::Whole => 0,
            Place::Rows { index, .. } => index
                .checked_mul(self.hidden_size)
                .ok_or_else(|| fail(format!("hidden size {} is too large to place '{module}'", self.hidden_size)))?,
            Place::SwapHalves => {
                let swapped = up.swap_row_halves() && up_bias.as_mut().is_none_or(HostTensor::swap_row_halves);
                if !swapped {
                    return Err(fail(format!("'{up_key}' has {out_len} rows; they must split into (scale, shift) halves")));
                }
                0
            }
        };
        Ok(LoraPart { target: bfl, out_offset, down, up, up_bias, scale, source: module.to_string() })
    }

    fn alpha(&self, key: &str) -> Result<f32> {
        let t = self.ckpt.read(key)?;
        match t.to_f32()[..] {
            [alpha] if alpha.is_finite() => Ok(alpha),
            [alpha] => Err(Error::invalid(self.ckpt.path(), format!("'{key}' is {alpha}; alpha must be finite"))),
            _ => Err(Error::invalid(self.ckpt.path(), format!("'{key}' has shape {:?}; alpha must be a scalar", t.shape))),
        }
    }
}

/// One low-rank update to write: `W += up @ down` on the BFL linear `target` (scale 1), and
/// `b += up_bias` on its bias.
#[derive(Debug, Clone, Copy)]
pub struct AdapterPart<'a> {
    /// BFL linear path without `.weight`: `double_blocks.0.img_attn.qkv`, `img_in`.
    pub target: &'a str,
    /// A: [rank, in].
    pub down: &'a HostTensor,
    /// B: [out, rank], the target's rows in BFL order.
    pub up: &'a HostTensor,
    /// [out].
    pub up_bias: Option<&'a HostTensor>,
}

/// The pair that stores a full update `delta` [out, in] of a linear exactly, as a rank-`in`
/// LoRA: A = the identity [in, in], B = `delta`. BFL's control LoRAs store img_in so (rank 128
/// over 128 inputs), and diffusers loads it like any other pair.
pub fn full_rank_pair(delta: &HostTensor) -> (HostTensor, HostTensor) {
    let n = delta.shape.get(1).copied().unwrap_or(0);
    let identity = (0..n * n).map(|i| if i % (n + 1) == 0 { 1.0 } else { 0.0 }).collect();
    (HostTensor::from_f32(vec![n, n], identity).cast(delta.dtype()), delta.clone())
}

/// Writes adapters (atomically) in the layout diffusers' `FluxLoraLoaderMixin.load_lora_weights`
/// (FluxPipeline, FluxControlPipeline) reads, and this crate reads back as `LoraLayout::Peft`:
/// diffusers module names under `transformer.`, `lora_A.weight` [rank, in], `lora_B.weight`
/// [out, rank], no alpha (scale 1: `W + B A`, the convention diffusers applies to files without
/// one, mixed ranks included).
/// - A fused BFL linear is written as its diffusers members (q, k, v[, proj_mlp]), each with the
///   shared A and its rows of B; `final_layer.adaLN_modulation.1` with its halves swapped.
/// - A pair on `img_in` whose A takes more inputs than a base model's img_in (a widened model's)
///   makes FluxControlPipeline widen `x_embedder` with zero columns before loading, as for BFL's
///   control LoRAs; this crate's loader does the same.
/// - Biases: peft turns on `lora_B` biases for every module of an adapter as soon as one has
///   one, and leaves those absent from the file unset (meta tensors, diffusers 0.42.1); so when
///   any part has a bias, every module gets one, zeros where the part has none.
pub fn write_peft(path: &Path, parts: &[AdapterPart], overwrite: bool) -> Result<()> {
    let fail = |reason: String| Error::invalid(path, reason);
    let with_bias = parts.iter().any(|p| p.up_bias.is_some());
    let mut tensors: BTreeMap<String, HostTensor> = BTreeMap::new();
    for part in parts {
        let (rank, inputs, out) = match (&part.down.shape[..], &part.up.shape[..]) {
            (&[r, i], &[o, r2]) if r == r2 && r > 0 => (r, i, o),
            (down, up) => return Err(fail(format!("'{}': down {down:?} and up {up:?} are not [rank, in] and [out, rank]", part.target))),
        };
        if let Some(b) = part.up_bias.filter(|b| b.shape != [out]) {
            return Err(fail(format!("'{}': bias {:?} does not match up [{out}, {rank}]", part.target, b.shape)));
        }
        let members = keymap::diffusers_members(part.target)
            .filter(|_| keymap::bfl_module(part.target) == Some(Kind::Linear))
            .ok_or_else(|| fail(format!("'{}' is not a linear layer of FLUX", part.target)))?;
        let up = part.up.to_f32();
        let bias = part.up_bias.map_or_else(|| vec![0.0; out], HostTensor::to_f32);
        for (i, (module, place)) in members.iter().enumerate() {
            // Every member of a fused linear has `hidden` (= its input width) rows but the
            // last, which takes the rest (proj_mlp).
            let rows = match place {
                Place::Rows { .. } if i + 1 < members.len() => i * inputs..(i + 1) * inputs,
                Place::Rows { .. } => i * inputs..out,
                Place::Whole | Place::SwapHalves => 0..out,
            };
            if rows.is_empty() || rows.end > out {
                return Err(fail(format!("'{}' has {out} rows, too few to split into {} members of {inputs}", part.target, members.len())));
            }
            let mut b_rows = HostTensor::from_f32(vec![rows.len(), rank], up[rows.start * rank..rows.end * rank].to_vec());
            let mut b_bias = HostTensor::from_f32(vec![rows.len()], bias[rows.clone()].to_vec());
            if *place == Place::SwapHalves && !(b_rows.swap_row_halves() && b_bias.swap_row_halves()) {
                return Err(fail(format!("'{}' has {out} rows; they must split into (shift, scale) halves", part.target)));
            }
            let dtype = part.up.dtype();
            let key = |suffix: &str| format!("transformer.{module}.{suffix}");
            let duplicate = tensors.insert(key("lora_A.weight"), part.down.clone()).is_some();
            tensors.insert(key("lora_B.weight"), b_rows.cast(dtype));
            if with_bias {
                tensors.insert(key("lora_B.bias"), b_bias.cast(dtype));
            }
            if duplicate {
                return Err(fail(format!("'{}' is given twice", part.target)));
            }
        }
    }
    let list: Vec<(&str, &HostTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    crate::safetensors::write(path, &list, &BTreeMap::new(), overwrite)
}

/// The peft `LoraConfig` fields that decide the scale, from diffusers' `lora_adapter_metadata`.
#[derive(Debug)]
struct AdapterConfig {
    r: usize,
    alpha: f64,
    rank_pattern: Vec<(String, usize)>,
    alpha_pattern: Vec<(String, f64)>,
    rslora: bool,
}

const ADAPTER_METADATA: &str = "lora_adapter_metadata";

impl AdapterConfig {
    /// `None` when the file carries no config. diffusers writes either the bare config
    /// (`save_lora_adapter`) or one prefixed per component (`transformer.r`, from a pipeline's
    /// `save_lora_weights`); other components' fields are ignored.
    fn from_metadata(ckpt: &Checkpoint) -> Result<Option<AdapterConfig>> {
        let Some(text) = ckpt.metadata().get(ADAPTER_METADATA) else {
            return Ok(None);
        };
        let bad = |reason: String| Error::invalid(ckpt.path(), format!("__metadata__ '{ADAPTER_METADATA}': {reason}"));
        let fields: OrderedMap<&RawValue> = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        // peft's defaults, which is what diffusers would instantiate for absent fields.
        let mut config = AdapterConfig { r: 8, alpha: 8.0, rank_pattern: vec![], alpha_pattern: vec![], rslora: false };
        for (key, raw) in &fields.0 {
            let field = key.strip_prefix("transformer.").unwrap_or(key);
            let parse_err = |e: serde_json::Error| bad(format!("field '{key}': {e}"));
            match field {
                "r" => config.r = serde_json::from_str(raw.get()).map_err(parse_err)?,
                "lora_alpha" => config.alpha = serde_json::from_str(raw.get()).map_err(parse_err)?,
                "rank_pattern" => config.rank_pattern = patterns(raw).map_err(parse_err)?,
                "alpha_pattern" => config.alpha_pattern = patterns(raw).map_err(parse_err)?,
                "use_rslora" => config.rslora = serde_json::from_str(raw.get()).map_err(parse_err)?,
                "use_dora" if serde_json::from_str(raw.get()).map_err(parse_err)? => {
                    return Err(bad("DoRA adapters are not supported".into()));
                }
                _ => {}
            }
        }
        let named = config.rank_pattern.iter().map(|(p, _)| p).chain(config.alpha_pattern.iter().map(|(p, _)| p));
        if let Some(p) = named.into_iter().find(|p| !p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')) {
            return Err(bad(format!("pattern '{p}' is a regular expression; only module names are supported")));
        }
        if config.r == 0 || config.rank_pattern.iter().any(|(_, r)| *r == 0) {
            return Err(bad("a rank of 0".into()));
        }
        Ok(Some(config))
    }

    /// The scale of `module` (a diffusers module name) with `rank` rows in its lora_A.
    fn scale(&self, module: &str, rank: usize) -> std::result::Result<f32, String> {
        let r = pattern_value(&self.rank_pattern, module).copied().unwrap_or(self.r);
        if r != rank {
            return Err(format!("'{module}' has rank {rank} but {ADAPTER_METADATA} gives r = {r}"));
        }
        let alpha = pattern_value(&self.alpha_pattern, module).copied().unwrap_or(self.alpha);
        let r = r as f64;
        Ok((if self.rslora { alpha / r.sqrt() } else { alpha / r }) as f32)
    }
}

fn patterns<V: for<'de> serde::Deserialize<'de>>(raw: &RawValue) -> serde_json::Result<Vec<(String, V)>> {
    serde_json::from_str::<OrderedMap<V>>(raw.get()).map(|m| m.0)
}

/// peft's rule (`re.match(rf"(.*\.)?({pattern})$", module)`) for literal patterns: the pattern is
/// the module name or a dotted suffix of it. An exact name wins; otherwise the first in file order.
fn pattern_value<'a, V>(patterns: &'a [(String, V)], module: &str) -> Option<&'a V> {
    let exact = patterns.iter().find(|(p, _)| p == module);
    let suffix = || patterns.iter().find(|(p, _)| module.strip_suffix(p.as_str()).is_some_and(|head| head.ends_with('.')));
    exact.or_else(suffix).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_dotted_suffixes_only() {
        let p = vec![("to_q".to_string(), 1), ("transformer_blocks.0.attn.to_q".to_string(), 2), ("attn.to_k".to_string(), 3)];
        assert_eq!(pattern_value(&p, "transformer_blocks.0.attn.to_q"), Some(&2));
        assert_eq!(pattern_value(&p, "transformer_blocks.1.attn.to_q"), Some(&1));
        assert_eq!(pattern_value(&p, "single_transformer_blocks.1.attn.to_k"), Some(&3));
        assert_eq!(pattern_value(&p, "transformer_blocks.1.attn.add_to_q"), None);
        assert_eq!(pattern_value(&p, "transformer_blocks.1.attn.to_v"), None);
    }

    #[test]
    fn lora_keys_are_recognised_by_suffix() {
        assert!(is_lora_key("transformer.x_embedder.lora_A.weight"));
        assert!(is_lora_key("lora_unet_img_in.lora_up.weight"));
        assert!(!is_lora_key("lora_unet_img_in.alpha"));
        assert!(!is_lora_key("x_embedder.weight"));
    }
}
