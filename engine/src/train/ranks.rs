//! What the ranks of a data-parallel run must agree on before they train: the settings that
//! define the run and the data they read. Every rank compares its own with rank 0's at start-up;
//! a difference stops every rank with one error naming the rank, the key and both values (or the
//! first file that differs).
//!
//! Everything else about ranks is the run loop's (`run.rs`): each draws its [`Share`] of every
//! micro-batch, the gradients and logged values are averaged over the ranks each step, and rank 0
//! alone writes the log, the adapter and the checkpoints.
//!
//! [`Share`]: super::batch::Share

use super::config::TrainConfig;
use super::run::RunOptions;
use crate::backend::device::Device;
use crate::world::{agree, World};
use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A rank's view of the run, as rank 0 sends it to the others.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub config: TrainConfig,
    pub max_steps: u64,
    pub save_every: u64,
    /// The checkpoint's step when resuming.
    pub resume_from: Option<u64>,
    pub device: String,
    /// The files the data folder holds, by their path below it, with their sizes.
    pub data: Vec<(String, u64)>,
}

impl Settings {
    pub fn of(c: &TrainConfig, opts: &RunOptions, device: Device, resume_from: Option<u64>) -> Self {
        Settings {
            config: c.clone(),
            max_steps: opts.max_steps,
            save_every: opts.save_every,
            resume_from,
            device: format!("{device:?}").to_lowercase(),
            data: listing(&c.data),
        }
    }

    /// The first difference from `root`'s (rank 0's) settings, as a sentence.
    pub fn first_difference(&self, root: &Settings) -> Option<String> {
        let differ = |key: &str, here: String, there: String| Some(format!("'{key}' is {here} here but {there} on rank 0"));
        if let Some((key, there, here)) = root.config.first_difference(&self.config) {
            return differ(&key, here, there);
        }
        let runs = [
            ("max_steps", self.max_steps.to_string(), root.max_steps.to_string()),
            ("save_every", self.save_every.to_string(), root.save_every.to_string()),
            ("resume from step", show(self.resume_from), show(root.resume_from)),
            ("device", self.device.clone(), root.device.clone()),
        ];
        if let Some((key, here, there)) = runs.into_iter().find(|(_, here, there)| here != there) {
            return differ(key, here, there);
        }
        let size_of = |list: &[(String, u64)], name: &str| list.iter().find(|(n, _)| n == name).map(|(_, size)| *size);
        let mut names: Vec<&String> = self.data.iter().chain(&root.data).map(|(name, _)| name).collect();
        names.sort();
        names.dedup();
        names.into_iter().find_map(|name| {
            let (here, there) = (size_of(&self.data, name), size_of(&root.data, name));
            let show = |size: Option<u64>| size.map_or("missing".to_string(), |s| format!("{s} bytes"));
            (here != there).then(|| format!("the data differ: {name} is {} here but {} on rank 0", show(here), show(there)))
        })
    }
}

fn show(step: Option<u64>) -> String {
    step.map_or("none (a fresh start)".into(), |s| s.to_string())
}

/// The image files below `dir`, by path, with their sizes; empty when `dir` cannot be listed
/// (opening the data reports that, on every rank).
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let Ok(inputs) = loaders::walk::collect_inputs(&[dir.to_path_buf()]) else { return Vec::new() };
    inputs
        .into_iter()
        .map(|input| {
            let size = std::fs::metadata(&input.path).map_or(0, |m| m.len());
            (input.relative.display().to_string(), size)
        })
        .collect()
}

/// Every rank's `mine` compared with rank 0's; an agreed error names the first rank that differs.
pub fn ensure_same_settings(world: &dyn World, mine: &Settings) -> Result<()> {
    if world.size() == 1 {
        return Ok(());
    }
    let mut bytes = match world.rank() {
        0 => serde_json::to_vec(mine)?,
        _ => Vec::new(),
    };
    world.broadcast(&mut bytes)?;
    let root: Settings = serde_json::from_slice(&bytes)?;
    let local = match mine.first_difference(&root) {
        None => Ok(()),
        Some(difference) => Err(anyhow!("its settings differ from rank 0's: {difference}; start every rank with the same ones")),
    };
    agree(world, local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::Stage;

    fn settings(dir: &Path) -> Settings {
        let c = TrainConfig { data: dir.to_path_buf(), ..TrainConfig::defaults(Stage::Sft) };
        let opts = RunOptions { out: "out".into(), max_steps: 10, save_every: 0, resume: false, log: None, stop: None };
        Settings::of(&c, &opts, Device::Cpu, None)
    }

    #[test]
    fn a_difference_names_the_key_or_the_file_and_both_values() {
        let dir = tempfile::tempdir().unwrap();
        let img = loaders::image::Image::new(4, 4, 3, vec![0.5; 48]);
        loaders::image::write_png(&dir.path().join("a.png"), &img, false).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        loaders::image::write_png(&dir.path().join("sub/b.png"), &img, false).unwrap();
        let root = settings(dir.path());
        assert_eq!(root.data.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a.png", "sub/b.png"]);
        assert_eq!(root.first_difference(&settings(dir.path())), None);

        let mut other = settings(dir.path());
        other.config.lr = 2e-4;
        other.max_steps = 11;
        assert_eq!(other.first_difference(&root).unwrap(), "'lr' is 0.0002 here but 0.0001 on rank 0");
        other.config.lr = root.config.lr;
        assert_eq!(other.first_difference(&root).unwrap(), "'max_steps' is 11 here but 10 on rank 0");
        other.max_steps = 10;
        other.resume_from = Some(4);
        assert_eq!(other.first_difference(&root).unwrap(), "'resume from step' is 4 here but none (a fresh start) on rank 0");
        other.resume_from = None;
        other.data[1].1 += 1;
        let size = root.data[1].1;
        assert_eq!(
            other.first_difference(&root).unwrap(),
            format!("the data differ: sub/b.png is {} bytes here but {size} bytes on rank 0", size + 1)
        );
        other.data.remove(0);
        assert_eq!(
            other.first_difference(&root).unwrap(),
            "the data differ: a.png is missing here but 44 bytes on rank 0".replace("44", &root.data[0].1.to_string())
        );
    }
}
