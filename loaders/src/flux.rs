//! FLUX transformer checkpoints in BFL's or diffusers' key layout, seen through one internal
//! naming: BFL's, so that model code looks tensors up by the names the reference code uses.
//!
//! The mapping is built at open from the header alone; `load` materialises one internal tensor at
//! a time (reading, fusing q/k/v, swapping halves) so that a 24 GB checkpoint never sits in
//! memory twice. Whether the tensors a model needs are all there, with the right shapes, is the
//! engine's question (it knows the config); this module only maps, and refuses what it cannot.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::keymap::{self, Place};
use crate::lora;
use crate::safetensors::{shape_fits, Checkpoint, FileDType};
use crate::shards::TensorFiles;
use crate::tensor::HostTensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Bfl,
    Diffusers,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Bfl => "BFL",
            Layout::Diffusers => "diffusers",
        })
    }
}

/// Where an internal tensor comes from in the file.
#[derive(Debug, Clone)]
enum Source {
    Key(String),
    /// Rows stacked in this order (diffusers' split q, k, v[, mlp]); `members` are the diffusers
    /// names relative to the block, for messages.
    Rows {
        keys: Vec<String>,
        members: &'static [&'static str],
    },
    SwapHalves(String),
}

#[derive(Debug, Clone)]
struct Entry {
    source: Source,
    shape: Vec<usize>,
    dtype: FileDType,
}

#[derive(Debug, Clone)]
pub struct FluxCheckpoint {
    ckpt: TensorFiles,
    layout: Layout,
    tensors: BTreeMap<String, Entry>,
}

impl FluxCheckpoint {
    /// Opens a file, a sharded checkpoint's index, or a folder holding one (`TensorFiles::open`).
    pub fn open(path: &Path) -> Result<FluxCheckpoint> {
        FluxCheckpoint::from_files(TensorFiles::open(path)?)
    }

    pub fn from_checkpoint(ckpt: Checkpoint) -> Result<FluxCheckpoint> {
        FluxCheckpoint::from_files(TensorFiles::single(ckpt))
    }

    /// Detects the layout and maps every tensor in the files to its internal name. Any tensor that
    /// maps to nothing is an error: silently ignoring it could hide a file for another model.
    pub fn from_files(ckpt: TensorFiles) -> Result<FluxCheckpoint> {
        let path = ckpt.path();
        if let Some(key) = ckpt.names().find(|k| lora::is_lora_key(k)) {
            return Err(Error::invalid(path, format!("holds LoRA tensors ('{key}'), not a transformer; pass it with --lora")));
        }
        let layout = detect(&ckpt)?;
        let tensors = match layout {
            Layout::Bfl => map_bfl(&ckpt)?,
            Layout::Diffusers => map_diffusers(&ckpt)?,
        };
        Ok(FluxCheckpoint { ckpt, layout, tensors })
    }

    pub fn files(&self) -> &TensorFiles {
        &self.ckpt
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Internal (BFL) names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The shape `load` will return (fused shapes for diffusers' split projections).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|e| e.shape.clone())
    }

    pub fn dtype(&self, name: &str) -> Option<FileDType> {
        self.tensors.get(name).map(|e| e.dtype)
    }

    /// The file key(s) behind an internal name, for diagnostics:
    /// `transformer_blocks.0.attn.to_q.weight + attn.to_k + attn.to_v`.
    pub fn source(&self, name: &str) -> Option<String> {
        Some(match &self.tensors.get(name)?.source {
            Source::Key(key) => key.clone(),
            Source::SwapHalves(key) => format!("{key} (halves swapped)"),
            Source::Rows { keys, members } => {
                let mut out = keys[0].clone();
                for member in &members[1..] {
                    out.push_str(" + ");
                    out.push_str(member);
                }
                out
            }
        })
    }

    /// Materialises one internal tensor in the file's dtype.
    pub fn load(&self, name: &str) -> Result<HostTensor> {
        let path = self.ckpt.path();
        let entry = self.tensors.get(name).ok_or_else(|| Error::invalid(path, format!("no tensor '{name}' ({} layout)", self.layout)))?;
        match &entry.source {
            Source::Key(key) => self.ckpt.read(key),
            Source::SwapHalves(key) => {
                let mut t = self.ckpt.read(key)?;
                let swapped = t.swap_row_halves();
                debug_assert!(swapped, "row parity is checked at open");
                Ok(t)
            }
            Source::Rows { keys, .. } => {
                let mut fused = self.ckpt.read(&keys[0])?;
                for key in &keys[1..] {
                    // Read and appended one at a time: the parts never all sit beside the result.
                    let part = self.ckpt.read(key)?;
                    let appended = fused.append_rows(&part);
                    debug_assert!(appended, "dtypes and trailing dims are checked at open");
                }
                Ok(fused)
            }
        }
    }
}

const BFL_MARKERS: [&str; 3] = ["double_blocks.", "single_blocks.", "img_in."];
const DIFFUSERS_MARKERS: [&str; 3] = ["transformer_blocks.", "single_transformer_blocks.", "x_embedder."];

fn detect(ckpt: &TensorFiles) -> Result<Layout> {
    let first_with = |markers: &[&str]| {
        ckpt.names().find(|k| {
            let k = keymap::strip_prefix(k);
            markers.iter().any(|m| k.starts_with(m))
        })
    };
    match (first_with(&BFL_MARKERS), first_with(&DIFFUSERS_MARKERS)) {
        (Some(bfl), Some(diffusers)) => Err(Error::invalid(
            ckpt.path(),
            format!("mixes BFL ('{bfl}') and diffusers ('{diffusers}') key layouts"),
        )),
        (Some(_), None) => Ok(Layout::Bfl),
        (None, Some(_)) => Ok(Layout::Diffusers),
        (None, None) => Err(Error::invalid(
            ckpt.path(),
            format!(
                "not a FLUX transformer: none of its {} tensors has a BFL key (double_blocks.*, single_blocks.*, img_in.*) or a diffusers key (transformer_blocks.*, single_transformer_blocks.*, x_embedder.*){}",
                ckpt.len(),
                ckpt.names().next().map(|k| format!("; first key '{k}'")).unwrap_or_default()
            ),
        )),
    }
}

fn unexpected(ckpt: &TensorFiles, key: &str, layout: Layout) -> Error {
    Error::invalid(ckpt.path(), format!("unexpected tensor '{key}' ({layout} layout)"))
}

/// Adds `internal` once; two file keys landing on one name (say `img_in.weight` beside
/// `model.diffusion_model.img_in.weight`) would make the choice arbitrary.
fn insert(ckpt: &TensorFiles, map: &mut BTreeMap<String, Entry>, internal: String, entry: Entry) -> Result<()> {
    if let Some(old) = map.get(&internal) {
        let keys = |e: &Entry| match &e.source {
            Source::Key(k) | Source::SwapHalves(k) => k.clone(),
            Source::Rows { keys, .. } => keys[0].clone(),
        };
        return Err(Error::invalid(ckpt.path(), format!("tensors '{}' and '{}' both map to '{internal}'", keys(old), keys(&entry))));
    }
    map.insert(internal, entry);
    Ok(())
}

fn map_bfl(ckpt: &TensorFiles) -> Result<BTreeMap<String, Entry>> {
    let mut map = BTreeMap::new();
    for key in ckpt.names() {
        let internal = keymap::strip_prefix(key);
        if !keymap::is_bfl_param(internal) {
            return Err(unexpected(ckpt, key, Layout::Bfl));
        }
        let info = ckpt.info(key).expect("names come from the checkpoint");
        let entry = Entry { source: Source::Key(key.to_string()), shape: info.shape.clone(), dtype: info.dtype };
        insert(ckpt, &mut map, internal.to_string(), entry)?;
    }
    Ok(map)
}

/// A fused BFL tensor being assembled from its diffusers members.
struct Group {
    members: &'static [&'static str],
    keys: Vec<Option<String>>,
    /// The file key up to the member name (`transformer.transformer_blocks.0.`) and the
    /// parameter (`weight`), to spell out the key of a member that is missing.
    stem: String,
    param: String,
}

fn map_diffusers(ckpt: &TensorFiles) -> Result<BTreeMap<String, Entry>> {
    let path = ckpt.path();
    let mut map = BTreeMap::new();
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for key in ckpt.names() {
        let name = keymap::strip_prefix(key);
        let resolved = name.rsplit_once('.').and_then(|(module, param)| {
            let m = keymap::diffusers_module(module)?;
            Some((keymap::bfl_param(m.kind, param)?, m, param))
        });
        let Some((bfl_param, m, param)) = resolved else {
            return Err(unexpected(ckpt, key, Layout::Diffusers));
        };
        let internal = format!("{}.{bfl_param}", m.bfl);
        let info = ckpt.info(key).expect("names come from the checkpoint");
        match m.place {
            Place::Whole => {
                let entry = Entry { source: Source::Key(key.to_string()), shape: info.shape.clone(), dtype: info.dtype };
                insert(ckpt, &mut map, internal, entry)?;
            }
            Place::SwapHalves => {
                if info.shape.first().is_none_or(|rows| rows % 2 != 0) {
                    return Err(Error::invalid(
                        path,
                        format!("'{key}' has shape {:?}; its rows must split into (scale, shift) halves", info.shape),
                    ));
                }
                let entry = Entry { source: Source::SwapHalves(key.to_string()), shape: info.shape.clone(), dtype: info.dtype };
                insert(ckpt, &mut map, internal, entry)?;
            }
            Place::Rows { index, group } => {
                let stem_len = key.len() - m.member.len() - 1 - param.len();
                let g = groups.entry(internal.clone()).or_insert_with(|| Group {
                    members: group,
                    keys: vec![None; group.len()],
                    stem: key[..stem_len].to_string(),
                    param: param.to_string(),
                });
                if let Some(other) = g.keys[index].replace(key.to_string()) {
                    return Err(Error::invalid(path, format!("tensors '{other}' and '{key}' both map to '{internal}'")));
                }
            }
        }
    }
    for (internal, group) in groups {
        let entry = fuse(ckpt, &internal, group)?;
        insert(ckpt, &mut map, internal, entry)?;
    }
    Ok(map)
}

/// Checks that a group's members are all present and stack: same dtype, same trailing dims.
fn fuse(ckpt: &TensorFiles, internal: &str, group: Group) -> Result<Entry> {
    let path = ckpt.path();
    let present = group.keys.iter().flatten().next().expect("a group exists because one member was seen");
    let mut keys = Vec::with_capacity(group.keys.len());
    for (member, key) in group.members.iter().zip(&group.keys) {
        match key {
            Some(k) => keys.push(k.clone()),
            None => {
                return Err(Error::invalid(
                    path,
                    format!("'{}{member}.{}' is missing; '{internal}' is fused from it and '{present}'", group.stem, group.param),
                ))
            }
        }
    }
    let first = ckpt.info(&keys[0]).expect("names come from the checkpoint");
    let mut shape = first.shape.clone();
    for key in &keys[1..] {
        let info = ckpt.info(key).expect("names come from the checkpoint");
        let stacks = !shape.is_empty() && info.shape.get(1..) == Some(&shape[1..]) && info.dtype == first.dtype;
        let rows = match (shape.first(), info.shape.first()) {
            (Some(a), Some(b)) if stacks => a.checked_add(*b),
            _ => None,
        };
        match rows {
            Some(rows) => shape[0] = rows,
            _ => {
                return Err(Error::invalid(
                    path,
                    format!(
                        "cannot fuse '{}' ({} {:?}) and '{key}' ({} {:?}) into '{internal}': dtypes and all dims but the first must agree",
                        keys[0], first.dtype, first.shape, info.dtype, info.shape
                    ),
                ))
            }
        }
    }
    if !shape_fits(&shape) {
        return Err(Error::invalid(path, format!("'{internal}' would have shape {shape:?}, too large to address")));
    }
    Ok(Entry { source: Source::Rows { keys, members: group.members }, shape, dtype: first.dtype })
}
