//! Training checkpoints: `OUT/checkpoint.safetensors`.
//!
//! Layout: one F32 tensor per trained parameter (`param/NAME`) and per AdamW moment
//! (`adam_m/NAME`, `adam_v/NAME`), raw little-endian bits, so that a resumed run reads back
//! exactly what an uninterrupted one holds. The header's `__metadata__` carries `format`, `step`,
//! `config` (the [`TrainConfig`] as JSON) and `optimizer` (AdamW's hyper-parameters and step count
//! as JSON; its moments are the tensors).
//!
//! Crash safety: a save writes `lora.safetensors`, then the checkpoint, each to a temporary file
//! beside it that is fsynced and renamed over the old file (`loaders::safetensors::write`). The
//! checkpoint is the commit: a resume reads nothing else, so a crash anywhere in a save leaves the
//! previous complete checkpoint to resume from (a newer or missing `lora.safetensors` is rewritten
//! by the next save). Leftover temporary files of an interrupted save are removed at the next start.

use super::config::TrainConfig;
use super::params::TensorSet;
use crate::backend::adamw::{AdamW, Moments};
use anyhow::{ensure, Context, Result};
use loaders::safetensors::Checkpoint as File;
use loaders::HostTensor;
use std::collections::BTreeMap;
use std::path::Path;

/// The checkpoint's file name inside the output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The exported adapter's file name inside the output folder.
pub const LORA_FILE: &str = "lora.safetensors";
/// What a full-parameter run exports: a model folder's files.
pub const MODEL_FILES: [&str; 2] = ["transformer.safetensors", "model.json"];
const FORMAT: &str = "asasr-train-checkpoint/1";

/// All the state needed to continue a run from `step`.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub config: TrainConfig,
    pub step: u64,
    /// The data-parallel ranks of the run: its global batch is `ranks * batch * grad_accum`.
    pub ranks: usize,
    pub params: TensorSet,
    pub optimizer: AdamW,
}

/// Writes `path` atomically.
pub fn save(path: &Path, config: &TrainConfig, step: u64, ranks: usize, params: &TensorSet, optimizer: &AdamW) -> Result<()> {
    let mut tensors: Vec<(String, HostTensor)> = Vec::new();
    for (name, values) in &params.values {
        let shape = params.shapes[name].clone();
        tensors.push((format!("param/{name}"), HostTensor::from_f32(shape.clone(), values.clone())));
        if let Some(m) = optimizer.moments.get(name) {
            tensors.push((format!("adam_m/{name}"), HostTensor::from_f32(shape.clone(), m.m.clone())));
            tensors.push((format!("adam_v/{name}"), HostTensor::from_f32(shape, m.v.clone())));
        }
    }
    let scalars = AdamW { moments: BTreeMap::new(), ..optimizer.clone() };
    let metadata = BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("step".to_string(), step.to_string()),
        ("ranks".to_string(), ranks.to_string()),
        ("config".to_string(), serde_json::to_string(config)?),
        ("optimizer".to_string(), scalars.to_json()?),
    ]);
    let list: Vec<(&str, &HostTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    loaders::safetensors::write(path, &list, &metadata, true)?;
    Ok(())
}

/// Reads a checkpoint written by [`save`].
pub fn load(path: &Path) -> Result<Checkpoint> {
    let file = File::open(path)?;
    let what = path.display();
    let meta = file.metadata();
    let get = |key: &str| meta.get(key).with_context(|| format!("{what}: not a training checkpoint (no '{key}' in its metadata)"));
    ensure!(get("format")? == FORMAT, "{what}: checkpoint format '{}', this engine reads '{FORMAT}'", get("format")?);
    let step: u64 = get("step")?.parse().with_context(|| format!("{what}: bad step"))?;
    let ranks: usize = match meta.get("ranks") {
        Some(r) => r.parse().ok().filter(|&r| r > 0).with_context(|| format!("{what}: bad rank count '{r}'"))?,
        None => 1,
    };
    let config: TrainConfig = serde_json::from_str(get("config")?).with_context(|| format!("{what}: bad config"))?;
    let mut optimizer = AdamW::from_json(get("optimizer")?).with_context(|| format!("{what}: bad optimizer state"))?;
    let mut params = TensorSet::default();
    let mut m = BTreeMap::new();
    let mut v = BTreeMap::new();
    for name in file.names() {
        let tensor = file.read(name)?;
        let (kind, param) = name.split_once('/').with_context(|| format!("{what}: unexpected tensor '{name}'"))?;
        match kind {
            "param" => params.insert(param.to_string(), tensor.shape.clone(), tensor.to_f32()),
            "adam_m" => drop(m.insert(param.to_string(), tensor.to_f32())),
            "adam_v" => drop(v.insert(param.to_string(), tensor.to_f32())),
            _ => anyhow::bail!("{what}: unexpected tensor '{name}'"),
        }
    }
    for (name, m) in m {
        let v = v.remove(&name).with_context(|| format!("{what}: 'adam_m/{name}' without 'adam_v/{name}'"))?;
        ensure!(params.values.contains_key(&name), "{what}: moments of '{name}', which is not a parameter");
        optimizer.moments.insert(name, Moments { m, v });
    }
    ensure!(v.is_empty(), "{what}: 'adam_v' without 'adam_m' moments");
    Ok(Checkpoint { config, step, ranks, params, optimizer })
}

/// Removes the temporary files that an interrupted save of `CHECKPOINT_FILE` or an export
/// (`LORA_FILE`, `MODEL_FILES`) left in `dir` (`loaders::atomic` names them `.NAME.PID.N.tmp`).
pub fn remove_leftovers(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = [CHECKPOINT_FILE, LORA_FILE].iter().chain(&MODEL_FILES).any(|f| name.starts_with(&format!(".{f}.")));
        if ours && name.ends_with(".tmp") {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("{}: cannot remove a leftover temporary file", entry.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::adamw::AdamWConfig;
    use crate::train::config::Stage;

    #[test]
    fn a_checkpoint_round_trips_bit_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut params = TensorSet::default();
        params.insert("a.lora_down".into(), vec![2, 3], vec![0.1, -0.2, 1e-30, f32::MIN_POSITIVE, 3.5, -0.0]);
        params.insert("a.lora_up".into(), vec![1, 2], vec![0.0, 7.25]);
        let mut optimizer = AdamW::new(AdamWConfig { lr: 3e-4, warmup_steps: 5, ..AdamWConfig::default() });
        let grads =
            BTreeMap::from([("a.lora_down".to_string(), vec![0.3, 0.1, -0.7, 1.0, 2.0, 1e-9]), ("a.lora_up".to_string(), vec![1.0, -1.0])]);
        optimizer.step(&mut params.values, &grads).unwrap();
        let config = TrainConfig { data: "d".into(), ..TrainConfig::defaults(Stage::Sft) };
        let path = dir.path().join(CHECKPOINT_FILE);
        save(&path, &config, 17, 3, &params, &optimizer).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back, Checkpoint { config, step: 17, ranks: 3, params, optimizer });

        std::fs::write(dir.path().join(".checkpoint.safetensors.1.0.tmp"), b"half").unwrap();
        std::fs::write(dir.path().join(".other.tmp"), b"not ours").unwrap();
        remove_leftovers(dir.path()).unwrap();
        assert!(!dir.path().join(".checkpoint.safetensors.1.0.tmp").exists());
        assert!(dir.path().join(".other.tmp").exists());
        assert!(load(&dir.path().join("missing.safetensors")).is_err());
    }
}
