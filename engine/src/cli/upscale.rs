//! `engine upscale`: images or folders through a super-resolution model, into a mirrored tree.

use anyhow::{ensure, Result};
use engine::backend::device::Device;
use engine::model::LoraMode;
use engine::sr::colorfix::ColorFix;
use engine::sr::model_dir::{shipped_model_dir, SrConfig, SrModel};
use engine::sr::resample::resize;
use engine::sr::upscaler::UpscaleOptions;
use engine::{Backend, CpuBackend};
use indicatif::{ProgressBar, ProgressStyle};
use loaders::image::{self, Image, OutputFormat};
use loaders::walk::{collect_inputs, parse_shard, shard, Input};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Upscale images (PNG, JPEG, WebP; files or folders, walked recursively) with a super-resolution
/// model. The output tree mirrors the input folders. Alpha is upscaled (bicubic) beside the
/// colour, EXIF orientation is applied, ICC profiles, 16-bit depth and grayscale are kept.
/// A file that fails is reported and skipped; the exit code says whether any failed.
#[derive(clap::Args)]
pub struct Args {
    /// Input images or folders.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output folder.
    #[arg(short, long)]
    out: PathBuf,
    /// Model folder (model.json, transformer.safetensors, ...); default: the shipped model,
    /// models/asasr-cpu.
    #[arg(long, conflicts_with = "bicubic")]
    model: Option<PathBuf>,
    /// No model: write the bicubic enlargement by 4, the baseline of `engine eval` tables and
    /// of adversary triples (`engine train --stage adversary`).
    #[arg(long)]
    bicubic: bool,
    /// LoRA adapter for the transformer; repeat to stack several (merged at load).
    #[arg(long)]
    lora: Vec<PathBuf>,
    /// Sampling steps (default: the model's).
    #[arg(long)]
    steps: Option<usize>,
    /// Seed of the sampling noise: the same seed gives the same output.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Average N samples, from seeds SEED to SEED + N - 1: an estimate of the posterior mean
    /// (higher PSNR, less invented texture), N times the work (default: the model's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    average: Option<u32>,
    /// Average the samples on one token grid instead of grids shifted by fractions of a token
    /// (by default sample k of N is shifted k/N of a token, so token borders average out).
    #[arg(long)]
    no_shift: bool,
    /// Gain on the finest detail the model adds to the bicubic upsample, applied to the
    /// average: 1 leaves it as sampled, above 1 sharper and closer to the photographs' spectrum
    /// at a small PSNR cost (default: the model's when averaging several samples, whose mean is
    /// smoother than any one of them, else 1; the shipped model's 2.5 is measured in the README).
    #[arg(long, value_name = "GAIN", value_parser = parse_gain, allow_negative_numbers = true)]
    detail: Option<f32>,
    /// Tile side in output pixels; larger images run in overlapping, blended tiles. When the GPU
    /// runs out of memory the tile side is halved and the image retried.
    #[arg(long, default_value_t = 512)]
    tile: usize,
    /// Image pixels per tile side of the autoencoder's passes (FLUX's; 0: whole images).
    /// Default: the largest tile up to 384 whose planned memory fits --max-memory. A GPU out
    /// of memory halves it.
    #[arg(long, value_name = "PX")]
    ae_tile: Option<usize>,
    /// Memory budget in GB for the autoencoder's default tile (default: the GPU's free memory
    /// once the model is loaded, or the memory the CPU has available).
    #[arg(long, value_name = "GB")]
    max_memory: Option<f64>,
    /// Tiles per model call: the tiles of one image, and of up to this many consecutive
    /// inputs of the same size, go through the model together (GPU throughput). Results do
    /// not depend on it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Final scale relative to the input, resampled after the model (default: the model's).
    #[arg(long)]
    outscale: Option<f64>,
    /// Colour correction against the upsampled input: wavelet, adain or none.
    #[arg(long, default_value = "wavelet")]
    color_fix: ColorFix,
    /// Output format: png, or the input's own format.
    #[arg(long, value_enum, default_value = "png")]
    format: Format,
    /// Upscale only the i-th of every n inputs (`--shard 2/8`), to split a batch across machines.
    #[arg(long)]
    shard: Option<String>,
    /// Skip inputs whose output file exists.
    #[arg(long, conflicts_with = "overwrite")]
    skip_existing: bool,
    /// Replace existing output files.
    #[arg(long)]
    overwrite: bool,
    /// Where to run: auto (a CUDA GPU when usable, else the CPU), cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Png,
    Same,
}

pub fn run(a: Args) -> Result<()> {
    let mut inputs = collect_inputs(&a.inputs)?;
    if let Some(spec) = &a.shard {
        let (i, n) = parse_shard(spec)?;
        inputs = shard(inputs, i, n);
    }
    ensure!(!inputs.is_empty(), "no images found in {}", a.inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    if let Some(s) = a.outscale {
        ensure!(s.is_finite() && s > 0.0, "--outscale must be a positive number, got {s}");
    }

    if a.bicubic {
        ensure!(a.lora.is_empty(), "--lora needs a model; --bicubic runs none");
        return upscale_all(&CpuBackend::new(), &Upscaler::Bicubic, &inputs, &a);
    }
    let model_dir = &match &a.model {
        Some(dir) => dir.clone(),
        None => {
            eprintln!("note: the shipped model is small and trained on the CPU: by default it returns the mean of 4 one-step estimates with its finest detail amplified (--detail 2.5), above bicubic on every measure and far below Real-ESRGAN x4plus; --detail 1 gives the plain mean (a little more PSNR), --steps 4 --average 1 sharper but less faithful samples (README, *Shipped model*)");
            shipped_model_dir()?
        }
    };
    engine::on_backend!(a.device, b => {
        let loras: Vec<&Path> = a.lora.iter().map(|p| p.as_path()).collect();
        let (mut model, warnings) = SrModel::load(b, model_dir, &loras, LoraMode::Merged)?;
        model.ae_tiling.tile = a.ae_tile;
        model.ae_tiling.max_memory = super::ae::max_memory_bytes(a.max_memory)?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        let (steps, average, detail) = sampling(&a, &model.config);
        let samples = if average > 1 { format!(", mean of {average} samples") } else { String::new() };
        let detail = if detail != 1.0 { format!(", detail gain {detail}") } else { String::new() };
        eprintln!("model {} on {}, {steps} steps{samples}{detail}, x{}", model_dir.display(), b.name(), model.config.scale);
        upscale_all(b, &Upscaler::Model(&model), &inputs, &a)
    })
}

/// What turns an LQ image into its enlargement.
enum Upscaler<'a, B: Backend> {
    Model(&'a SrModel<B>),
    Bicubic,
}

impl<B: Backend + 'static> Upscaler<'_, B> {
    fn scale(&self) -> usize {
        match self {
            Upscaler::Model(m) => m.config.scale,
            Upscaler::Bicubic => 4,
        }
    }

    fn upscale_batch(&self, b: &B, lqs: &[&Image], opts: &UpscaleOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<Image>> {
        match self {
            Upscaler::Model(m) => m.upscale_batch(b, lqs, opts, progress),
            Upscaler::Bicubic => Ok(lqs.iter().map(|lq| resize(&lq.to_rgb(), lq.width * 4, lq.height * 4)).collect()),
        }
    }
}

fn upscale_all<B: Backend + 'static>(b: &B, upscaler: &Upscaler<'_, B>, inputs: &[Input], a: &Args) -> Result<()> {
    let (steps, average, detail) = match upscaler {
        Upscaler::Model(m) => sampling(a, &m.config),
        Upscaler::Bicubic => (1, 1, 1.0),
    };
    let opts = UpscaleOptions { steps, seed: a.seed, tile: a.tile, batch: a.batch as usize, average, shift: !a.no_shift, detail };
    ensure!(opts.steps >= 1, "--steps must be at least 1");

    let bar = ProgressBar::new(inputs.len() as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"));
    // The bar hides itself when stderr is not a terminal; the per-image lines must not.
    let say = |line: String| if bar.is_hidden() { eprintln!("{line}") } else { bar.println(line) };
    let (mut failures, mut skipped) = (Vec::new(), 0);
    for chunk in inputs.chunks(opts.batch) {
        // Read the chunk, then run its images of one size together.
        let mut ready: Vec<Job> = Vec::new();
        for input in chunk {
            let format = match a.format {
                Format::Png => OutputFormat::Png,
                Format::Same => OutputFormat::for_input(&input.path),
            };
            let out = a.out.join(&input.relative).with_extension(format.extension());
            let read = if out.exists() && a.skip_existing {
                say(format!("{}  skipped (exists)", input.relative.display()));
                skipped += 1;
                bar.inc(1);
                continue;
            } else if out.exists() && !a.overwrite {
                Err(anyhow::anyhow!("{}: exists; pass --overwrite to replace it or --skip-existing to keep it", out.display()))
            } else {
                image::read(&input.path).map_err(anyhow::Error::from)
            };
            match read {
                Ok(lq) => ready.push(Job { input, out, format, lq }),
                Err(e) => {
                    say(format!("{}  failed", input.relative.display()));
                    failures.push(format!("{e:#}"));
                    bar.inc(1);
                }
            }
        }
        while let Some(first) = ready.first() {
            let size = (first.lq.width, first.lq.height);
            let (group, rest): (Vec<Job>, Vec<Job>) = ready.into_iter().partition(|j| (j.lq.width, j.lq.height) == size);
            ready = rest;
            bar.set_message(group.iter().map(|j| j.input.relative.display().to_string()).collect::<Vec<_>>().join(", "));
            let t0 = Instant::now();
            let mut step_times = Vec::with_capacity(opts.steps);
            let lqs: Vec<&Image> = group.iter().map(|j| &j.lq).collect();
            let results = upscaler.upscale_batch(b, &lqs, &opts, &mut |_, _| step_times.push(Instant::now()));
            // Time per image and per sampling step (from the first step's end to the last's).
            let per_image = t0.elapsed().as_secs_f64() / group.len() as f64;
            let per_step = match (step_times.first(), step_times.last()) {
                (Some(first), Some(last)) if step_times.len() > 1 => {
                    format!(" ({:.2} s/step)", (*last - *first).as_secs_f64() / (step_times.len() - 1) as f64)
                }
                _ => String::new(),
            };
            let together = if group.len() > 1 { format!(", {} together", group.len()) } else { String::new() };
            let results: Vec<Result<Image>> = match results {
                Ok(images) => images.into_iter().map(Ok).collect(),
                Err(e) => group.iter().map(|_| Err(anyhow::anyhow!("{e:#}"))).collect(),
            };
            for (job, sr) in group.iter().zip(results) {
                match sr.and_then(|sr| finish(job, sr, a, upscaler.scale())) {
                    Ok((w, h)) => say(format!("{}  -> {w}x{h}  {per_image:.1} s{per_step}{together}", job.input.relative.display())),
                    Err(e) => {
                        say(format!("{}  failed", job.input.relative.display()));
                        failures.push(format!("{}: {e:#}", job.input.path.display()));
                    }
                }
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let done = inputs.len() - failures.len() - skipped;
    eprintln!("{done} of {} image(s) upscaled into {} ({skipped} skipped, {} failed)", inputs.len(), a.out.display(), failures.len());
    ensure!(failures.is_empty(), "{} of {} image(s) failed: {}", failures.len(), inputs.len(), failures.join("; "));
    Ok(())
}

/// An input ready for the model.
struct Job<'a> {
    input: &'a Input,
    out: PathBuf,
    format: OutputFormat,
    lq: Image,
}

/// Colour fix, the input's mode, `--outscale`, and the atomic write of one model output.
fn finish(job: &Job, sr: Image, a: &Args, scale: usize) -> Result<(usize, usize)> {
    let lq = &job.lq;
    let (w, h) = (lq.width * scale, lq.height * scale);
    let sr = a.color_fix.apply(&sr, &resize(&lq.to_rgb(), w, h));
    let mut result = restore_mode(lq, sr, w, h);
    if let Some(s) = a.outscale {
        let (ow, oh) = (((lq.width as f64 * s).round() as usize).max(1), ((lq.height as f64 * s).round() as usize).max(1));
        if (ow, oh) != (w, h) {
            result = resize(&result, ow, oh);
        }
    }
    if let Some(dir) = job.out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: cannot create folder: {e}", dir.display()))?;
    }
    image::write(&job.out, &result, job.format, a.overwrite)?;
    Ok((result.width, result.height))
}

/// Gives the RGB result the input's mode back: gray stays gray (BT.601 luma), alpha is the
/// input's alpha upscaled bicubically, depth and ICC profile are the input's.
fn restore_mode(lq: &Image, sr: Image, w: usize, h: usize) -> Image {
    let gray = lq.channels <= 2;
    let alpha = lq.has_alpha().then(|| {
        let a: Vec<f32> = lq.data.chunks(lq.channels).map(|px| px[lq.channels - 1]).collect();
        resize(&Image::new(lq.width, lq.height, 1, a), w, h).data
    });
    let color = if gray { 1 } else { 3 };
    let channels = color + alpha.is_some() as usize;
    let mut data = Vec::with_capacity(w * h * channels);
    for (p, px) in sr.data.chunks(3).enumerate() {
        if gray {
            data.push(0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2]);
        } else {
            data.extend_from_slice(px);
        }
        if let Some(a) = &alpha {
            data.push(a[p].clamp(0.0, 1.0));
        }
    }
    let mut img = Image::new(w, h, channels, data);
    img.sixteen_bit = lq.sixteen_bit;
    img.icc = lq.icc.clone();
    img
}

/// Steps, samples averaged and detail gain: the user's, else the model's.
fn sampling(a: &Args, config: &SrConfig) -> (usize, usize, f32) {
    let average = a.average.map_or(config.average, |n| n as usize);
    // The model's gain makes up for what averaging takes; one sample keeps its detail.
    let detail = a.detail.unwrap_or(if average > 1 { config.detail } else { 1.0 });
    (a.steps.unwrap_or(config.steps), average, detail)
}

pub(crate) fn parse_gain(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(g) if g.is_finite() && g >= 0.0 => Ok(g),
        _ => Err(format!("expected a gain of 0 or more, not {s:?}")),
    }
}
