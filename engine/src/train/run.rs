//! The SFT training run behind `engine train --stage sft`: data, the step loop, the JSONL log,
//! checkpoints and resume. The CLI only turns flags into a [`TrainConfig`].
//!
//! Determinism: every random draw of step k (which images, where to crop, the degradation, t and
//! eps) comes from seeds derived from (seed, k), so the data position and every RNG state of a
//! run are its step count; a checkpoint therefore holds the step, the LoRA master factors, the
//! optimiser state and the config, and a resumed run is bit-identical to an uninterrupted one.
//!
//! Checkpoints are `OUT/checkpoint.json`, written to a temporary file, fsynced and renamed over
//! the previous one (`loaders::atomic`), so a crash leaves the last complete checkpoint.

use super::adamw::{AdamW, AdamWConfig};
use super::sft::{encode_pairs, loss_operator, sft_step, step_seed, LoraTrainer};
use crate::backend::cpu::CpuBackend;
use crate::degrade::{crop, degrade};
use crate::model::weights::WeightLoader;
use crate::model::{Flux, FluxParams, LoraMode};
use crate::sr::model_dir::{zero_text, AeConfig, ConditioningMode, SrConfig, SrModel};
use anyhow::{bail, ensure, Context, Result};
use loaders::image::Image;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Everything that defines a run. Keys are the CLI's long flag names with `_` for `-`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// A model folder to fine-tune; None: a random base of `preset` from `init_seed`.
    pub base: Option<PathBuf>,
    pub preset: String,
    pub init_seed: u64,
    pub data: PathBuf,
    pub batch: usize,
    pub lr: f64,
    pub warmup: u64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub rank: usize,
    pub sobolev_s: f64,
    pub seed: u64,
    /// HQ crop side in pixels.
    pub crop: usize,
}

/// How far to run and where to write; these may change between a run and its resume.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub out: PathBuf,
    pub max_steps: u64,
    pub save_every: u64,
    pub resume: bool,
    pub log: Option<PathBuf>,
    /// Set (by a Ctrl-C handler) to stop after the current step, with a checkpoint.
    pub stop: Option<&'static AtomicBool>,
}

/// A checkpoint: the step reached and all the state needed to continue from it.
#[derive(Serialize, Deserialize)]
struct Checkpoint {
    config: TrainConfig,
    step: u64,
    optimizer: AdamW,
    params: BTreeMap<String, Vec<f32>>,
    shapes: BTreeMap<String, Vec<usize>>,
}

/// One line of the JSONL log.
#[derive(Serialize)]
struct LogLine {
    step: u64,
    loss: f64,
    grad_norm: f64,
    lr: f64,
    samples_per_s: f64,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.batch >= 1, "batch must be at least 1, got {}", self.batch);
        ensure!(self.rank >= 1, "rank must be at least 1, got {}", self.rank);
        ensure!(self.lr.is_finite() && self.lr > 0.0, "lr must be positive, got {}", self.lr);
        ensure!(self.sobolev_s.is_finite(), "sobolev_s must be finite, got {}", self.sobolev_s);
        ensure!(self.max_grad_norm > 0.0, "max_grad_norm must be positive, got {}", self.max_grad_norm);
        Ok(())
    }

    /// The first key whose value differs from `other`'s, with both values.
    pub fn first_difference(&self, other: &TrainConfig) -> Option<(String, String, String)> {
        let (a, b) = (serde_json::to_value(self).ok()?, serde_json::to_value(other).ok()?);
        let (a, b) = (a.as_object()?, b.as_object()?);
        a.iter().find(|(k, v)| b.get(*k) != Some(v)).map(|(k, v)| (k.clone(), v.to_string(), b[k].to_string()))
    }
}

/// The base model: a folder, or a random one of a preset shape with a pixel-shuffle(2)
/// autoencoder at x4 (no file at all).
fn base_model(b: &CpuBackend, c: &TrainConfig) -> Result<SrModel<CpuBackend>> {
    if let Some(dir) = &c.base {
        return Ok(SrModel::load(b, dir, &[], LoraMode::Unmerged)?.0);
    }
    let latent = 12;
    let transformer = FluxParams { in_channels: 8 * latent, out_channels: 4 * latent, ..FluxParams::preset(&c.preset)? };
    let config = SrConfig {
        scale: 4,
        conditioning: ConditioningMode::Concat,
        autoencoder: AeConfig::PixelShuffle { factor: 2 },
        transformer,
        steps: 28,
        guidance: 3.5,
        text_tokens: 1,
    };
    config.validate()?;
    let mut w = WeightLoader::random(b, c.init_seed);
    let flux = Flux::build(&config.transformer, &mut w)?;
    w.finish()?;
    let (txt, y) = zero_text(&config);
    Ok(SrModel { config, flux, ae: Box::new(crate::ae::PixelShuffle::new(2)), txt, y })
}

/// The HQ images of a folder (walked recursively), decoded once.
fn read_images(dir: &Path, crop_side: usize) -> Result<Vec<Image>> {
    let inputs = loaders::walk::collect_inputs(&[dir.to_path_buf()])?;
    let mut images = Vec::new();
    for input in inputs {
        let img = loaders::image::read(&input.path)?.to_rgb();
        ensure!(
            img.width >= crop_side && img.height >= crop_side,
            "{}: {}x{} is smaller than the {crop_side}px crop",
            input.path.display(),
            img.width,
            img.height
        );
        images.push(img);
    }
    ensure!(!images.is_empty(), "{}: no images found", dir.display());
    Ok(images)
}

/// The (HQ crop, LQ) pairs of step `step`: an image, a crop position and a degradation seed per
/// item, all from (seed, step).
fn step_pairs(images: &[Image], c: &TrainConfig, scale: usize, step: u64) -> Result<Vec<(Image, Image)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(step_seed(c.seed, step, 3));
    (0..c.batch)
        .map(|_| {
            let img = &images[rng.random_range(0..images.len())];
            let (x, y) = (rng.random_range(0..=img.width - c.crop), rng.random_range(0..=img.height - c.crop));
            let hq = crop(img, x, y, c.crop, c.crop);
            let lq = degrade(&hq, scale, rng.random())?;
            Ok((hq, lq))
        })
        .collect()
}

/// Runs (or resumes) SFT to `opts.max_steps`. Calls `progress(step, max_steps, loss)`.
pub fn train_sft(c: &TrainConfig, opts: &RunOptions, progress: &mut dyn FnMut(u64, u64, f64)) -> Result<()> {
    c.validate()?;
    let b = CpuBackend::new();
    let mut model = base_model(&b, c)?;
    let scale = model.config.scale;
    let unit = model.token_pixels();
    ensure!(
        c.crop % scale == 0 && c.crop % unit == 0 && c.crop > 0,
        "crop is {}px, but this model needs a multiple of its scale {scale} and of its {unit}px tokens",
        c.crop
    );
    let images = read_images(&c.data, c.crop)?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("{}: cannot create folder", opts.out.display()))?;
    let checkpoint_path = opts.out.join("checkpoint.json");

    let optimizer = AdamW::new(AdamWConfig {
        lr: c.lr,
        warmup_steps: c.warmup,
        weight_decay: c.weight_decay,
        max_grad_norm: Some(c.max_grad_norm),
        ..AdamWConfig::default()
    });
    let mut trainer = LoraTrainer::attach(&b, &mut model.flux, c.rank, step_seed(c.seed, 0, 0), optimizer)?;
    let mut step = 0;
    if opts.resume {
        let text =
            std::fs::read_to_string(&checkpoint_path).with_context(|| format!("--resume: cannot read {}", checkpoint_path.display()))?;
        let saved: Checkpoint =
            serde_json::from_str(&text).with_context(|| format!("{}: not a training checkpoint", checkpoint_path.display()))?;
        if let Some((key, was, now)) = saved.config.first_difference(c) {
            bail!("--resume: '{key}' was {was} in {} but is {now} now; resume with the same value", checkpoint_path.display());
        }
        trainer = LoraTrainer { params: saved.params, shapes: saved.shapes, optimizer: saved.optimizer };
        trainer.attach_to(&b, &mut model.flux)?;
        step = saved.step;
    }

    let mut log = match &opts.log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(opts.resume)
                .write(true)
                .truncate(!opts.resume)
                .open(p)
                .with_context(|| format!("{}: cannot open the log", p.display()))?,
        ),
        None => None,
    };
    let save = |step: u64, trainer: &LoraTrainer| -> Result<()> {
        let ck = Checkpoint {
            config: c.clone(),
            step,
            optimizer: trainer.optimizer.clone(),
            params: trainer.params.clone(),
            shapes: trainer.shapes.clone(),
        };
        let text = serde_json::to_string(&ck)?;
        loaders::atomic::write_atomic(&checkpoint_path, true, |f| f.write_all(text.as_bytes()))?;
        write_lora(&opts.out.join("lora.safetensors"), trainer)
    };

    while step < opts.max_steps {
        let started = Instant::now();
        let batch = encode_pairs(&b, &model, &step_pairs(&images, c, scale, step)?)?;
        let op = loss_operator(&model.config.autoencoder, batch.latent, c.sobolev_s)?;
        let report = sft_step(&b, &mut model, &mut trainer, &op, &batch, c.seed, step)?;
        step += 1;
        let line = LogLine {
            step,
            loss: report.loss,
            grad_norm: report.stats.grad_norm,
            lr: report.stats.lr,
            samples_per_s: c.batch as f64 / started.elapsed().as_secs_f64(),
        };
        if let Some(f) = log.as_mut() {
            writeln!(f, "{}", serde_json::to_string(&line)?).context("cannot write the log")?;
        }
        progress(step, opts.max_steps, report.loss);
        if opts.save_every > 0 && step % opts.save_every == 0 {
            save(step, &trainer)?;
        }
        if opts.stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            save(step, &trainer)?;
            bail!("interrupted after step {step}: the checkpoint in {} is saved; --resume continues from it", opts.out.display());
        }
    }
    save(step, &trainer)
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
fn write_lora(path: &Path, trainer: &LoraTrainer) -> Result<()> {
    let mut tensors = Vec::new();
    for (name, down) in &trainer.params {
        let Some(target) = name.strip_suffix(".lora_down") else { continue };
        let up_key = super::sft::up_name(target);
        let (down_shape, up_shape, up) = (&trainer.shapes[name], &trainer.shapes[&up_key], &trainer.params[&up_key]);
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
            tensors.push((format!("transformer.{module}.lora_A.weight"), loaders::HostTensor::from_f32(vec![rank, hidden], down.clone())));
            let up_rows = up[first * rank..(first + rows) * rank].to_vec();
            tensors.push((format!("transformer.{module}.lora_B.weight"), loaders::HostTensor::from_f32(vec![rows, rank], up_rows)));
        }
    }
    let list: Vec<(&str, &loaders::HostTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    loaders::safetensors::write(path, &list, &BTreeMap::new(), true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::sft::tests::pairs;

    fn setup(dir: &Path) -> TrainConfig {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        for (i, (hq, _)) in pairs(2).iter().enumerate() {
            loaders::image::write_png(&data.join(format!("{i}.png")), hq, true).unwrap();
        }
        TrainConfig {
            base: None,
            preset: "flux-tiny".into(),
            init_seed: 3,
            data,
            batch: 2,
            lr: 1e-3,
            warmup: 2,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            rank: 2,
            sobolev_s: 0.5,
            seed: 7,
            crop: 32,
        }
    }

    fn losses(log: &Path) -> Vec<f64> {
        std::fs::read_to_string(log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
            .collect()
    }

    #[test]
    fn a_resumed_run_is_bit_identical_and_a_changed_config_is_refused() {
        let dir = std::env::temp_dir().join(format!("engine-train-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = setup(&dir);
        let run = |out: &str, max_steps: u64, resume: bool, c: &TrainConfig| {
            let opts = RunOptions {
                out: dir.join(out),
                max_steps,
                save_every: 0,
                resume,
                log: Some(dir.join(format!("{out}.jsonl"))),
                stop: None,
            };
            train_sft(c, &opts, &mut |_, _, _| ())
        };
        run("straight", 6, false, &c).unwrap();
        run("split", 3, false, &c).unwrap();
        run("split", 6, true, &c).unwrap();
        let read = |p: &str| std::fs::read(dir.join(p)).unwrap();
        assert_eq!(read("straight/lora.safetensors"), read("split/lora.safetensors"));
        assert_eq!(losses(&dir.join("straight.jsonl")), losses(&dir.join("split.jsonl")));
        assert_eq!(losses(&dir.join("split.jsonl")).len(), 6);
        let (a, b) = (read("straight/checkpoint.json"), read("split/checkpoint.json"));
        assert_eq!(a, b, "optimiser state and step");

        let changed = TrainConfig { lr: 2e-3, ..c.clone() };
        let err = run("split", 8, true, &changed).unwrap_err();
        assert!(err.to_string().contains("'lr'"), "{err}");

        // The written adapter loads as a LoRA on the model.
        // The written adapter reads back, in the diffusers/peft layout, as the trained factors:
        // fused qkv and linear1 split into one part per member (3 + 3 + 4 more than 13 linears).
        let adapter = loaders::lora::LoraAdapter::open(&dir.join("straight/lora.safetensors"), 64).unwrap();
        assert_eq!(adapter.layout, loaders::lora::LoraLayout::Peft);
        assert_eq!(adapter.parts.len(), 13 + 2 + 2 + 3);
        let saved: Checkpoint = serde_json::from_str(&String::from_utf8(a).unwrap()).unwrap();
        for part in &adapter.parts {
            let (down, up) =
                (&saved.params[&super::super::sft::down_name(&part.target)], &saved.params[&super::super::sft::up_name(&part.target)]);
            let rank = part.rank();
            assert_eq!(&part.down.to_f32(), down, "{}", part.source);
            assert_eq!(part.up.to_f32(), up[part.out_offset * rank..(part.out_offset + part.out_len()) * rank], "{}", part.source);
            assert_eq!(part.scale, 1.0);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A stop request ends the run after the current step with a checkpoint that resumes.
    #[test]
    fn a_stop_request_saves_a_checkpoint_that_resumes() {
        static STOP: AtomicBool = AtomicBool::new(true);
        let dir = std::env::temp_dir().join(format!("engine-train-stop-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = setup(&dir);
        let opts = RunOptions { out: dir.join("out"), max_steps: 4, save_every: 0, resume: false, log: None, stop: Some(&STOP) };
        let err = train_sft(&c, &opts, &mut |_, _, _| ()).unwrap_err();
        assert!(err.to_string().contains("interrupted after step 1"), "{err}");
        let saved: Checkpoint = serde_json::from_str(&std::fs::read_to_string(dir.join("out/checkpoint.json")).unwrap()).unwrap();
        assert_eq!(saved.step, 1);
        train_sft(&c, &RunOptions { resume: true, stop: None, ..opts }, &mut |_, _, _| ()).unwrap();
        let saved: Checkpoint = serde_json::from_str(&std::fs::read_to_string(dir.join("out/checkpoint.json")).unwrap()).unwrap();
        assert_eq!(saved.step, 4);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
