//! `engine ae encode|decode|compare`: an image through the autoencoder to a latent file and back,
//! in tiles on large images; and how far the tiles are from the whole-image pass.

use super::human_bytes;
use anyhow::{bail, ensure, Context, Result};
use engine::ae::tiled::seam_ratio;
use engine::ae::{load_autoencoder, Autoencoder, Estimate, Statistics, TileOptions, Tiled};
use engine::backend::device::Device;
use engine::Backend;
use indicatif::{ProgressBar, ProgressStyle};
use loaders::image::{self, Image};
use loaders::safetensors::{self, Checkpoint};
use loaders::HostTensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Encode an image to a latent, or decode a latent to an image, with an autoencoder. FLUX's
/// autoencoder runs large images in overlapping, blended tiles whose GroupNorms share the whole
/// image's statistics, so memory is set by the tile, not the image.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Image (PNG, JPEG, WebP) -> `latent` [1,C,H/f,W/f] f32 in a .safetensors file.
    Encode(Io),
    /// `latent` [1,C,h,w] from a .safetensors file -> PNG image.
    Decode(Io),
    /// Encode and decode an image whole and in tiles, and report the tiled results against the
    /// whole-image ones: PSNR, largest difference in 8-bit levels, and the seam figure.
    Compare(CompareArgs),
}

#[derive(clap::Args)]
struct Model {
    /// Autoencoder checkpoint (.safetensors, BFL or diffusers layout), or `pixel-shuffle:F`.
    #[arg(long)]
    model: String,
    /// JSON config with BFL AutoEncoderParams field names (omitted fields: FLUX's values).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where to run: auto (a CUDA GPU when usable, else the CPU), cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// Skip the mid-block attention (a test configuration, not FLUX's model): what remains of
    /// a tiled pass's difference from the whole image is the tiling's own.
    #[arg(long)]
    no_mid_attention: bool,
}

impl Model {
    fn load<B: Backend + 'static>(&self, b: &B) -> Result<Box<dyn Autoencoder<B>>> {
        load_autoencoder(b, &self.model, self.config.as_deref(), !self.no_mid_attention)
    }
}

#[derive(clap::Args)]
struct Io {
    #[command(flatten)]
    model: Model,
    #[command(flatten)]
    tiling: TileArgs,
    /// Input file.
    input: PathBuf,
    /// Output file.
    #[arg(short, long)]
    out: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    overwrite: bool,
}

#[derive(clap::Args)]
struct CompareArgs {
    #[command(flatten)]
    model: Model,
    #[command(flatten)]
    tiling: TileArgs,
    /// Image to encode (sides multiples of the autoencoder's factor).
    image: PathBuf,
}

/// How FLUX's autoencoder cuts large images (the weightless pixel shuffle always runs whole).
#[derive(clap::Args)]
pub struct TileArgs {
    /// Image pixels per tile side; 0: the whole image at once. Default: the largest of 384, 256,
    /// 192, ... whose planned activations fit the memory budget (the whole image when that
    /// tile with its context covers it).
    #[arg(long, value_name = "PX")]
    tile: Option<usize>,
    /// Memory budget in GB for the default tile (default: the GPU's free memory, or the memory
    /// the CPU has available).
    #[arg(long, value_name = "GB")]
    max_memory: Option<f64>,
    /// Pixels blended between neighbouring tiles (smooth window; at most half the tile).
    #[arg(long, value_name = "PX", default_value_t = TileOptions::default().overlap)]
    overlap: usize,
    /// Pixels of context computed around each tile and cropped off.
    #[arg(long, value_name = "PX", default_value_t = TileOptions::default().context)]
    context: usize,
    /// GroupNorm statistics of the tiles. matched: each tile normalised over itself, then
    /// brought to its level in the whole image as a first pass measured it (two passes);
    /// per-tile: each tile its own (one pass; tiles differ in colour and contrast); fixed: the
    /// whole image's, estimated as --estimate says and refined --refine times; exact: fixed,
    /// refined once per GroupNorm (slow; the tiles then equal the whole image but for the
    /// mid-block attention).
    #[arg(long, value_enum, default_value = "matched")]
    stats: StatsArg,
    /// Where fixed statistics start from: tiles (a pass over the tiles, each normalised over
    /// itself) or downsampled (one pass over the image shrunk to a tile).
    #[arg(long, value_enum, default_value = "tiles")]
    estimate: EstimateArg,
    /// Tiled passes refining fixed statistics.
    #[arg(long, value_name = "N", default_value_t = 0)]
    refine: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EstimateArg {
    Tiles,
    Downsampled,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StatsArg {
    Matched,
    PerTile,
    Fixed,
    Exact,
}

impl TileArgs {
    pub fn options(&self) -> Result<TileOptions> {
        let max_memory = max_memory_bytes(self.max_memory)?;
        let statistics = match self.stats {
            StatsArg::Matched => Statistics::Matched,
            StatsArg::Fixed => Statistics::Fixed {
                estimate: match self.estimate {
                    EstimateArg::Tiles => Estimate::Tiles,
                    EstimateArg::Downsampled => Estimate::Downsampled,
                },
                refinements: self.refine,
            },
            StatsArg::Exact => Statistics::Exact,
            StatsArg::PerTile => Statistics::PerTile,
        };
        Ok(TileOptions { tile: self.tile, overlap: self.overlap, context: self.context, statistics, max_memory })
    }
}

/// `--max-memory GB` in bytes, refused unless positive.
pub fn max_memory_bytes(gb: Option<f64>) -> Result<Option<u64>> {
    match gb {
        Some(gb) if !(gb.is_finite() && gb > 0.0) => bail!("--max-memory {gb}: must be a positive number of GB"),
        gb => Ok(gb.map(|gb| (gb * 1e9) as u64)),
    }
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        Command::Encode(io) => engine::on_backend!(io.model.device, b => encode(b, &io)),
        Command::Decode(io) => engine::on_backend!(io.model.device, b => decode(b, &io)),
        Command::Compare(c) => engine::on_backend!(c.model.device, b => compare(b, &c)),
    }
}

fn open<B: Backend + 'static>(b: &B, io: &Io) -> Result<Box<dyn Autoencoder<B>>> {
    if io.out.exists() && !io.overwrite {
        bail!("{}: output exists; pass --overwrite to replace it", io.out.display());
    }
    io.model.load(b)
}

/// A bar over the tiles of a pass, hidden when stderr is not a terminal.
fn tile_bar(what: &str) -> (ProgressBar, impl FnMut(usize, usize)) {
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}} tiles {{elapsed}}")).expect("valid template"));
    let progress = {
        let bar = bar.clone();
        move |done: usize, total: usize| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    };
    (bar, progress)
}

/// Reads an image as `[1, 3, H, W]` in [-1, 1], its sides checked against the factor `f`.
fn read_image(path: &Path, f: usize) -> Result<HostTensor> {
    let img = image::read(path)?.to_rgb();
    ensure!(
        img.width % f == 0 && img.height % f == 0,
        "{}: image is {}x{} (width x height); both sides must be multiples of {f}, the autoencoder's downscale factor",
        path.display(),
        img.width,
        img.height
    );
    Ok(to_nchw(&img))
}

/// How a tiled pass ran, for the result line: tiles, passes, time and the process's peak memory.
fn how(t: &Tiled, seconds: f64) -> String {
    let tiles = match t.tile {
        Some(px) => format!("{} tiles of {px} px, {} pass{}", t.tiles, t.passes, if t.passes == 1 { "" } else { "es" }),
        None => "whole image".into(),
    };
    let peak = peak_resident_memory().map_or(String::new(), |b| format!(", peak resident memory {}", human_bytes(b)));
    format!("{tiles}, {seconds:.1} s{peak}")
}

fn encode<B: Backend + 'static>(b: &B, io: &Io) -> Result<()> {
    let ae = open(b, io)?;
    let opts = io.tiling.options()?;
    let x = read_image(&io.input, ae.downscale())?;
    let (bar, mut progress) = tile_bar("encode");
    let t0 = Instant::now();
    let tiled = ae.encode_tiled(b, &x, &opts, &mut progress)?;
    bar.finish_and_clear();
    safetensors::write(&io.out, &[("latent", &tiled.output)], &BTreeMap::new(), io.overwrite)?;
    println!("latent  {:?} f32 -> {} ({})", tiled.output.shape, io.out.display(), how(&tiled, t0.elapsed().as_secs_f64()));
    Ok(())
}

fn decode<B: Backend + 'static>(b: &B, io: &Io) -> Result<()> {
    let ae = open(b, io)?;
    let opts = io.tiling.options()?;
    let latent = read_latent(&io.input)?;
    let c = ae.latent_channels();
    ensure!(
        latent.shape.len() == 4 && latent.shape[0] == 1 && latent.shape[1] == c,
        "{}: 'latent' has shape {:?}, expected [1, {c}, height, width]",
        io.input.display(),
        latent.shape
    );
    let (bar, mut progress) = tile_bar("decode");
    let t0 = Instant::now();
    let tiled = ae.decode_tiled(b, &latent, &opts, &mut progress)?;
    bar.finish_and_clear();
    let img = from_nchw(&tiled.output);
    image::write_png(&io.out, &img, io.overwrite)?;
    println!("image   {}x{} -> {} ({})", img.width, img.height, io.out.display(), how(&tiled, t0.elapsed().as_secs_f64()));
    Ok(())
}

/// PSNR (dB) and the largest difference of two images in 8-bit levels, as PNG files store them.
fn levels_psnr(a: &HostTensor, b: &HostTensor) -> (f64, u8) {
    let level = |v: f32| ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round();
    let (mut sq, mut worst) = (0f64, 0f32);
    let (a, b) = (a.to_f32(), b.to_f32());
    for (x, y) in a.iter().zip(&b) {
        let d = level(*x) - level(*y);
        sq += (d * d) as f64;
        worst = worst.max(d.abs());
    }
    let mse = sq / a.len() as f64;
    (if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() }, worst as u8)
}

fn compare<B: Backend + 'static>(b: &B, c: &CompareArgs) -> Result<()> {
    ensure!(
        !c.model.model.starts_with("pixel-shuffle:"),
        "--model {}: the pixel shuffle runs whole, there is no tiling to compare",
        c.model.model
    );
    let ae = c.model.load(b)?;
    let opts = c.tiling.options()?;
    let x = read_image(&c.image, ae.downscale())?;
    let whole = TileOptions { tile: Some(0), ..opts };
    let (bar, mut progress) = tile_bar("compare");
    let latent = ae.encode_tiled(b, &x, &whole, &mut progress)?.output;
    let reference = ae.decode_tiled(b, &latent, &whole, &mut progress)?.output;
    let tiled_latent = ae.encode_tiled(b, &x, &opts, &mut progress)?;
    let through_whole = ae.decode_tiled(b, &tiled_latent.output, &whole, &mut progress)?.output;
    let tiled = ae.decode_tiled(b, &latent, &opts, &mut progress)?;
    bar.finish_and_clear();

    let attention = if c.model.no_mid_attention { "mid-block attention off" } else { "mid-block attention per tile" };
    let stats = match opts.statistics {
        Statistics::PerTile => "per-tile statistics".to_string(),
        Statistics::Matched => "matched statistics".to_string(),
        Statistics::Fixed { estimate, refinements } => format!("fixed statistics from {estimate:?}, {refinements} refinement(s)"),
        Statistics::Exact => "exact fixed statistics".to_string(),
    };
    println!(
        "{}  {}x{}, {stats}, context {} px, overlap {} px, {attention}",
        c.image.display(),
        x.shape[3],
        x.shape[2],
        opts.context,
        opts.overlap
    );
    for (what, t, result) in [("encode", &tiled_latent, &through_whole), ("decode", &tiled, &tiled.output)] {
        let (psnr, worst) = levels_psnr(result, &reference);
        let tiles = t.tile.map_or("whole image".into(), |px| format!("{} tiles of {px} px", t.tiles));
        // The encoder's seams lie in the latent; the decoded image shows them at f times.
        let f = ae.downscale();
        let (rows, cols) = match what {
            "encode" => (scaled(&t.seams.0, f), scaled(&t.seams.1, f)),
            _ => t.seams.clone(),
        };
        let (seams, baseline) = (seam_ratio(result, &rows, &cols, f), seam_ratio(&reference, &rows, &cols, f));
        println!("  {what}  {tiles}: PSNR {psnr:.2} dB against the whole image, largest difference {worst} levels, seam figure {seams:.3} (whole image on the same lines {baseline:.3})");
    }
    println!("  (encode: the tiled latent decoded whole, against the whole latent decoded whole)");
    Ok(())
}

fn scaled(lines: &[usize], f: usize) -> Vec<usize> {
    lines.iter().map(|l| l * f).collect()
}

/// The peak resident memory of this process (Linux's VmHWM), None where unknown.
pub fn peak_resident_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
    Some(kib * 1024)
}

fn read_latent(path: &Path) -> Result<HostTensor> {
    let ckpt = Checkpoint::open(path)?;
    ensure!(ckpt.info("latent").is_some(), "{}: no tensor 'latent'", path.display());
    ckpt.read("latent").with_context(|| format!("{}: reading 'latent'", path.display()))
}

/// `[H, W, 3]` in [0, 1] -> `[1, 3, H, W]` in [-1, 1] (`x * 2 - 1`, i.e. `x / 127.5 - 1` on 8-bit data).
fn to_nchw(img: &Image) -> HostTensor {
    let (h, w) = (img.height, img.width);
    let mut data = vec![0f32; 3 * h * w];
    for (p, px) in img.data.chunks(3).enumerate() {
        for c in 0..3 {
            data[c * h * w + p] = px[c] * 2.0 - 1.0;
        }
    }
    HostTensor::from_f32(vec![1, 3, h, w], data)
}

/// `[1, 3, H, W]` -> RGB image; `write_png` then stores `round((clamp(x, -1, 1) + 1) * 127.5)`.
fn from_nchw(t: &HostTensor) -> Image {
    let (h, w) = (t.shape[2], t.shape[3]);
    let v = t.to_f32();
    let mut data = vec![0f32; 3 * h * w];
    for p in 0..h * w {
        for c in 0..3 {
            data[p * 3 + c] = (v[c * h * w + p].clamp(-1.0, 1.0) + 1.0) * 0.5;
        }
    }
    Image::new(w, h, 3, data)
}
