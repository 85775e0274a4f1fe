//! The folder of the metrics' weights that `tools/metric-weights.sh` fills: safetensors files
//! converted from the packages that ship them, plus its manifest.json. Nothing is downloaded
//! at run time; a metric whose file is missing says which file and how to get it.

use anyhow::{bail, Context, Result};
use loaders::safetensors::Checkpoint;
use loaders::HostTensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct MetricWeights {
    dir: PathBuf,
}

impl MetricWeights {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        MetricWeights { dir: dir.into() }
    }

    /// Where `tools/metric-weights.sh` puts them by default:
    /// `$XDG_DATA_HOME/asasr-engine/metric-weights`, else `~/.local/share/asasr-engine/metric-weights`.
    pub fn default_dir() -> Option<PathBuf> {
        let data = match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".local/share"),
        };
        Some(data.join("asasr-engine").join("metric-weights"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn has(&self, file: &str) -> bool {
        self.dir.join(file).is_file()
    }

    /// Opens one of the files, or says how to make it.
    pub fn open(&self, file: &str) -> Result<Checkpoint> {
        let path = self.dir.join(file);
        if !path.is_file() {
            bail!(
                "{}: not found; `bash tools/metric-weights.sh {}` installs it (see its manifest.json)",
                path.display(),
                self.dir.display()
            );
        }
        Checkpoint::open(&path).with_context(|| format!("{}: cannot read the metric weights", path.display()))
    }

    /// Every tensor of `files`, by name; a name in two files is an error.
    pub fn tensors(&self, files: &[&str]) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        for file in files {
            let ckpt = self.open(file)?;
            for name in ckpt.names().map(str::to_string).collect::<Vec<_>>() {
                let t = ckpt.read(&name)?;
                if out.insert(name.clone(), t).is_some() {
                    bail!("{}: tensor '{name}' is also in another of {files:?}", ckpt.path().display());
                }
            }
        }
        Ok(out)
    }
}
