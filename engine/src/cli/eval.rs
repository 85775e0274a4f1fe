//! `engine eval`: PSNR-Y, SSIM-Y and LSD of super-resolved images against their references, as a
//! table, optionally a CSV, and optionally the radially averaged power spectra as a line chart.

use anyhow::{anyhow, bail, Context, Result};
use engine::metrics::{self, Scores};
use engine::sr::resample::resize;
use loaders::image::Image;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Score super-resolved images against high-quality references, paired by file stem.
#[derive(clap::Args)]
pub struct Args {
    /// Directory of super-resolved images (PNG, JPEG, WebP).
    sr_dir: PathBuf,
    /// Directory of the high-quality references, same stems and sizes.
    hq_dir: PathBuf,
    /// Also write the table as CSV: `name,psnr_y,ssim_y,lsd`, one row per image, then `mean`.
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

pub fn run(a: Args) -> Result<()> {
    for out in [&a.csv, &a.plot].into_iter().flatten() {
        if !a.overwrite && out.exists() {
            bail!("{}: already exists (pass --overwrite to replace it)", out.display());
        }
    }
    let sr = images_by_stem(&a.sr_dir)?;
    let hq = images_by_stem(&a.hq_dir)?;
    let pairs: Vec<(&String, &PathBuf, &PathBuf)> = hq.iter().filter_map(|(stem, h)| sr.get(stem).map(|s| (stem, s, h))).collect();
    if pairs.is_empty() {
        bail!("no image in {} has a match (same file stem) in {}", a.hq_dir.display(), a.sr_dir.display());
    }
    let unmatched: Vec<String> = hq.iter().filter(|(stem, _)| !sr.contains_key(*stem)).map(|(_, p)| file_name(p)).collect();
    if !unmatched.is_empty() {
        eprintln!("warning: {} HQ image(s) in {} without an SR match: {}", unmatched.len(), a.hq_dir.display(), unmatched.join(", "));
    }

    let mut rows: Vec<(String, Scores)> = Vec::with_capacity(pairs.len());
    let mut first: Option<(Image, Image)> = None;
    for (stem, sr_path, hq_path) in pairs {
        let sr_img = loaders::image::read(sr_path)?;
        let hq_img = loaders::image::read(hq_path)?;
        if (sr_img.width, sr_img.height) != (hq_img.width, hq_img.height) {
            bail!(
                "size mismatch: {} is {}x{} but {} is {}x{}",
                sr_path.display(),
                sr_img.width,
                sr_img.height,
                hq_path.display(),
                hq_img.width,
                hq_img.height
            );
        }
        let scores = metrics::evaluate(&sr_img, &hq_img).with_context(|| format!("{} against {}", sr_path.display(), hq_path.display()))?;
        rows.push((stem.clone(), scores));
        if a.plot.is_some() && a.plot_stem.as_ref().map_or(first.is_none(), |want| want == stem) {
            first = Some((sr_img, hq_img));
        }
    }
    let n = rows.len() as f64;
    let mean = Scores {
        psnr_y: rows.iter().map(|r| r.1.psnr_y).sum::<f64>() / n,
        ssim_y: rows.iter().map(|r| r.1.ssim_y).sum::<f64>() / n,
        lsd: rows.iter().map(|r| r.1.lsd).sum::<f64>() / n,
    };
    rows.push(("mean".to_string(), mean));

    let width = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0).max(4);
    println!("{:<width$}  {:>8}  {:>7}  {:>8}", "name", "PSNR-Y", "SSIM-Y", "LSD");
    for (name, s) in &rows {
        println!("{name:<width$}  {:>8.3}  {:>7.4}  {:>8.3}", s.psnr_y, s.ssim_y, s.lsd);
    }

    if let Some(path) = &a.csv {
        loaders::atomic::write_atomic(path, a.overwrite, |out| {
            writeln!(out, "name,psnr_y,ssim_y,lsd")?;
            for (name, s) in &rows {
                writeln!(out, "{},{:.6},{:.6},{:.6}", csv_field(name), s.psnr_y, s.ssim_y, s.lsd)?;
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
    Ok(())
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
