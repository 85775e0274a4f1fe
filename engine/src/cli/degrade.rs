//! `engine degrade`: training pairs from high-quality images, through Real-ESRGAN's second-order
//! degradation (`engine::degrade`). Every image gets its own seed, derived from `--seed` and its
//! path relative to HQ_DIR, so adding or removing images leaves the others' LQ bytes unchanged.

use anyhow::{bail, Context, Result};
use engine::degrade;
use loaders::image::Image;
use loaders::walk::collect_inputs;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Degrade high-quality images into (HQ, LQ) training pairs.
#[derive(clap::Args)]
pub struct Args {
    /// Directory of high-quality images (PNG, JPEG, WebP), searched recursively.
    hq_dir: PathBuf,
    /// Where the pairs go: OUT/hq/NAME.png and OUT/lq/NAME.png, subfolders mirrored.
    #[arg(short, long, value_name = "PAIRS_DIR")]
    output: PathBuf,
    /// Seed of the degradations; the same seed gives byte-identical LQ files.
    #[arg(long)]
    seed: u64,
    /// Reduction factor: the LQ is exactly 1/scale of the HQ (cropped to a multiple of it).
    #[arg(long, default_value_t = 4)]
    scale: usize,
    /// First crop every HQ to its centre NxN; smaller images are skipped with a warning.
    #[arg(long, value_name = "N")]
    crop: Option<usize>,
    /// Replace existing pairs.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.scale == 0 {
        bail!("--scale must be at least 1");
    }
    if a.crop == Some(0) {
        bail!("--crop must be at least 1");
    }
    let sources: Vec<PathBuf> = collect_inputs(std::slice::from_ref(&a.hq_dir))?.into_iter().map(|i| i.relative).collect();
    if sources.is_empty() {
        bail!("{}: no PNG, JPEG or WebP image in the directory or below it", a.hq_dir.display());
    }
    // NAME.png for every source; two sources with one name would overwrite each other.
    let mut names: BTreeMap<PathBuf, &PathBuf> = BTreeMap::new();
    for rel in &sources {
        if let Some(other) = names.insert(rel.with_extension("png"), rel) {
            bail!("{} and {} would both be written as {}: rename one", other.display(), rel.display(), rel.with_extension("png").display());
        }
    }
    let (hq_out, lq_out) = (a.output.join("hq"), a.output.join("lq"));
    if !a.overwrite {
        for name in names.keys() {
            for out in [hq_out.join(name), lq_out.join(name)] {
                if out.exists() {
                    bail!("{}: already exists (pass --overwrite to replace it)", out.display());
                }
            }
        }
    }

    let (mut written, mut skipped) = (0usize, 0usize);
    let mut failed: Vec<String> = Vec::new();
    for rel in &sources {
        let name = rel.with_extension("png");
        let path = a.hq_dir.join(rel);
        match pair(&a, &path, rel) {
            Ok(Some((hq, lq))) => {
                let write = |dir: &Path, img: &Image| -> Result<()> {
                    let out = dir.join(&name);
                    if let Some(parent) = out.parent() {
                        std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create the directory", parent.display()))?;
                    }
                    Ok(loaders::image::write_png(&out, img, a.overwrite)?)
                };
                match write(&hq_out, &hq).and_then(|()| write(&lq_out, &lq)) {
                    Ok(()) => {
                        written += 1;
                        println!("{}  {}x{} -> {}x{}", rel.display(), hq.width, hq.height, lq.width, lq.height);
                    }
                    Err(e) => {
                        println!("{}  failed", rel.display());
                        failed.push(format!("{e:#}"));
                    }
                }
            }
            Ok(None) => skipped += 1,
            Err(e) => {
                println!("{}  failed", rel.display());
                failed.push(format!("{e:#}"));
            }
        }
    }
    println!(
        "{written} pair(s) written to {} (seed {}, scale {}), {skipped} skipped, {} failed",
        a.output.display(),
        a.seed,
        a.scale,
        failed.len()
    );
    if !failed.is_empty() {
        bail!("{} of {} image(s) failed: {}", failed.len(), sources.len(), failed.join("; "));
    }
    Ok(())
}

/// The (HQ, LQ) pair of one source, or `None` (with a warning) when it is too small.
fn pair(a: &Args, path: &Path, rel: &Path) -> Result<Option<(Image, Image)>> {
    let mut hq = loaders::image::read(path)?.to_rgb();
    if let Some(n) = a.crop {
        if hq.width < n || hq.height < n {
            eprintln!("warning: {}: {}x{} is smaller than --crop {n}, skipped", path.display(), hq.width, hq.height);
            return Ok(None);
        }
        hq = degrade::crop(&hq, (hq.width - n) / 2, (hq.height - n) / 2, n, n);
    }
    if hq.width < a.scale || hq.height < a.scale {
        eprintln!("warning: {}: {}x{} is smaller than --scale {}, skipped", path.display(), hq.width, hq.height, a.scale);
        return Ok(None);
    }
    let hq = degrade::crop_to_multiple(&hq, a.scale);
    let lq = degrade::degrade(&hq, a.scale, image_seed(a.seed, rel)).with_context(|| path.display().to_string())?;
    // The LQ carries the HQ's metadata (colour profile), but 8-bit samples.
    let mut lq_img = hq.clone();
    (lq_img.width, lq_img.height, lq_img.channels, lq_img.data, lq_img.sixteen_bit) = (lq.width, lq.height, 3, lq.data, false);
    Ok(Some((hq, lq_img)))
}

/// The seed of one image: `seed` mixed with the FNV-1a hash of its relative path ('/'-separated,
/// so the same on every platform) through SplitMix64.
fn image_seed(seed: u64, rel: &Path) -> u64 {
    let key: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let hash = key.join("/").bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    splitmix64(seed ^ splitmix64(hash))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
