//! Several safetensors files read as one set of tensors: the sharded checkpoints diffusers and
//! transformers write (`diffusion_pytorch_model.safetensors.index.json` or
//! `model.safetensors.index.json` beside `*-0000N-of-0000M.safetensors`), a folder holding one,
//! or a single file.
//!
//! Every shard is mapped and its header validated at open (`Checkpoint::open`); tensor data is
//! touched only by `read`, one tensor at a time. The index is checked against the shards' own
//! headers: a shard it names must exist, hold what it says and nothing it does not, so that a
//! half-downloaded model fails at open naming the file that is missing, not halfway through a load.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::safetensors::{Checkpoint, OrderedMap, TensorInfo};
use crate::tensor::HostTensor;

/// The index names diffusers and transformers give a sharded checkpoint, in the order a folder
/// is searched for one.
pub const INDEX_NAMES: [&str; 2] = ["diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"];

/// The single-file names diffusers and transformers give an unsharded checkpoint.
pub const SINGLE_NAMES: [&str; 2] = ["diffusion_pytorch_model.safetensors", "model.safetensors"];

/// Tensors spread over one or more safetensors files.
#[derive(Debug, Clone)]
pub struct TensorFiles {
    /// What was opened: a file, an index or a folder (for messages).
    path: PathBuf,
    files: Vec<Checkpoint>,
    /// Tensor name -> position in `files`.
    home: BTreeMap<String, usize>,
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: OrderedMap<String>,
}

impl TensorFiles {
    /// Opens a `.safetensors` file, a `*.safetensors.index.json` with its shards, or a folder
    /// holding one of these (an index first, else a single `*.safetensors` file).
    pub fn open(path: &Path) -> Result<TensorFiles> {
        if path.is_dir() {
            return TensorFiles::open(&find_in_folder(path)?);
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.ends_with(".index.json") {
            return TensorFiles::open_index(path);
        }
        Ok(TensorFiles::single(Checkpoint::open(path)?))
    }

    /// One file already open.
    pub fn single(ckpt: Checkpoint) -> TensorFiles {
        let home = ckpt.names().map(|n| (n.to_string(), 0)).collect();
        TensorFiles { path: ckpt.path().to_path_buf(), files: vec![ckpt], home }
    }

    /// The shards listed by path (a model folder's record of its base), read as one set; a name
    /// held by two of them is an error. `path` stands for the set in messages.
    pub fn from_files(path: &Path, files: &[PathBuf]) -> Result<TensorFiles> {
        let files = files.iter().map(|f| Checkpoint::open(f)).collect::<Result<Vec<_>>>()?;
        TensorFiles::assemble(path.to_path_buf(), files)
    }

    fn assemble(path: PathBuf, files: Vec<Checkpoint>) -> Result<TensorFiles> {
        if files.is_empty() {
            return Err(Error::invalid(&path, "names no safetensors files"));
        }
        let mut home = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.names() {
                if let Some(j) = home.insert(name.to_string(), i) {
                    return Err(Error::invalid(
                        &path,
                        format!("tensor '{name}' is in both {} and {}", files[j].path().display(), f.path().display()),
                    ));
                }
            }
        }
        Ok(TensorFiles { path, files, home })
    }

    fn open_index(path: &Path) -> Result<TensorFiles> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "read", e))?;
        let index: Index = serde_json::from_str(&text).map_err(|e| Error::invalid(path, format!("not a sharded-checkpoint index: {e}")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        // Each shard once, in file-name order (00001-of-N first).
        let mut shards: Vec<String> = Vec::new();
        let mut listed: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (tensor, shard) in &index.weight_map.0 {
            if Path::new(shard).file_name().map(|n| n.to_string_lossy()) != Some(shard.as_str().into()) {
                return Err(Error::invalid(path, format!("shard '{shard}' of '{tensor}' is not a file name in the index's folder")));
            }
            if !listed.contains_key(shard.as_str()) {
                shards.push(shard.clone());
            }
            listed.entry(shard).or_default().insert(tensor);
        }
        shards.sort();
        let mut files = Vec::with_capacity(shards.len());
        for shard in &shards {
            let file = dir.join(shard);
            if !file.is_file() {
                return Err(Error::invalid(
                    path,
                    format!(
                        "shard '{shard}' is missing ({} tensors are listed in it; expected {})",
                        listed[shard.as_str()].len(),
                        file.display()
                    ),
                ));
            }
            let ckpt = Checkpoint::open(&file)?;
            let want = &listed[shard.as_str()];
            if let Some(name) = want.iter().find(|n| ckpt.info(n).is_none()) {
                return Err(Error::invalid(path, format!("'{name}' is listed in shard '{shard}', which does not hold it")));
            }
            if let Some(name) = ckpt.names().find(|n| !want.contains(n)) {
                return Err(Error::invalid(path, format!("shard '{shard}' holds '{name}', which the index does not list there")));
            }
            files.push(ckpt);
        }
        TensorFiles::assemble(path.to_path_buf(), files)
    }

    /// What was opened, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The files; a sharded checkpoint's in file-name order.
    pub fn files(&self) -> &[Checkpoint] {
        &self.files
    }

    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.home.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.home.len()
    }

    pub fn is_empty(&self) -> bool {
        self.home.is_empty()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.files[*self.home.get(name)?].info(name)
    }

    /// Bytes of all files together.
    pub fn file_size(&self) -> u64 {
        self.files.iter().map(Checkpoint::file_size).sum()
    }

    /// Copies one tensor out of the file that holds it (see `Checkpoint::read`).
    pub fn read(&self, name: &str) -> Result<HostTensor> {
        match self.home.get(name) {
            Some(&i) => self.files[i].read(name),
            None => Err(Error::invalid(&self.path, format!("no tensor named '{name}'"))),
        }
    }
}

/// The checkpoint inside a folder: an index of a known name, else the only index, else a single
/// file of a known name, else the only `*.safetensors`.
fn find_in_folder(dir: &Path) -> Result<PathBuf> {
    if dir.join("model_index.json").is_file() {
        return Err(Error::invalid(
            dir,
            "is a diffusers pipeline folder, not one model; name its transformer/ subfolder, or turn it into a model with `engine model import`",
        ));
    }
    for name in INDEX_NAMES.iter().chain(&SINGLE_NAMES) {
        if dir.join(name).is_file() {
            return Ok(dir.join(name));
        }
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "list", e))?;
    let mut names: Vec<String> = entries.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect();
    names.sort();
    for suffix in [".safetensors.index.json", ".safetensors"] {
        let found: Vec<&String> = names.iter().filter(|n| n.ends_with(suffix)).collect();
        match found[..] {
            [one] => return Ok(dir.join(one)),
            [] => {}
            _ => {
                return Err(Error::invalid(
                    dir,
                    format!(
                        "holds several *{suffix} files ({}); name one",
                        found.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                ))
            }
        }
    }
    Err(Error::invalid(dir, "holds no *.safetensors file or *.safetensors.index.json"))
}
