//! Training data: what `--data DIR` holds, and the samples of one micro-batch.
//!
//! DIR is either
//! - a folder of HQ images (walked recursively), each sample a random crop degraded on the fly
//!   (`engine::degrade`, seeded), or
//! - a prepared folder: `DIR/hq/NAME.png` and `DIR/lq/NAME.png` as `engine degrade` writes them,
//!   and for the stages that need a negative, `DIR/baseline/NAME.png`, a baseline upscaler's output
//!   for that LQ. Members are matched by their path below `hq/` without the extension (any image
//!   extension), the LQ is exactly 1/scale of the HQ and the baseline the HQ's size. A sample is
//!   a crop at the same place in all three (the LQ's at 1/scale, so the HQ crop's corner is on
//!   the scale's grid).
//!
//! Every draw comes from a seed, so a run's data are a function of (seed, draw index).

use super::batch::Share;
use crate::degrade::{crop, degrade, resize, Rgb};
use anyhow::{bail, ensure, Context, Result};
use loaders::image::Image;
use loaders::walk::collect_inputs;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One training sample: an HQ crop, its LQ, and the baseline's output for that LQ when the data
/// have one (prepared triples).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub hq: Image,
    pub lq: Image,
    pub baseline: Option<Image>,
}

/// Whether a stage reads `DIR/baseline/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Baselines {
    /// Not used.
    Ignore,
    /// Used when the folder has them.
    IfPresent,
    /// Needed; the string says by what, for the error.
    Required(&'static str),
}

/// A prepared (HQ, LQ, baseline) item, decoded.
pub struct Prepared {
    pub hq: Image,
    pub lq: Image,
    pub baseline: Option<Image>,
}

/// The images of `--data`, decoded once.
pub enum Dataset {
    /// HQ images, degraded on the fly.
    Degraded { images: Vec<Image> },
    /// Prepared pairs or triples.
    Prepared { items: Vec<Prepared> },
}

impl Dataset {
    /// Reads `dir` for crops of `crop` pixels at `scale`.
    pub fn open(dir: &Path, crop_side: usize, scale: usize, baselines: Baselines) -> Result<Self> {
        ensure!(dir.is_dir(), "{}: the training data folder does not exist", dir.display());
        if dir.join("hq").is_dir() {
            return Self::open_prepared(dir, crop_side, scale, baselines);
        }
        if let Baselines::Required(what) = baselines {
            bail!(
                "{}: {what} needs prepared triples, {} (HQ), {} (LQ) and {} (a baseline upscaler's outputs), matched by name",
                dir.display(),
                dir.join("hq").display(),
                dir.join("lq").display(),
                dir.join("baseline").display()
            );
        }
        let mut images = Vec::new();
        for input in collect_inputs(&[dir.to_path_buf()])? {
            let img = loaders::image::read(&input.path)?.to_rgb();
            ensure_fits(&input.path, &img, crop_side)?;
            images.push(img);
        }
        ensure!(!images.is_empty(), "{}: no images found", dir.display());
        Ok(Dataset::Degraded { images })
    }

    fn open_prepared(dir: &Path, crop_side: usize, scale: usize, baselines: Baselines) -> Result<Self> {
        let (hq_dir, lq_dir, baseline_dir) = (dir.join("hq"), dir.join("lq"), dir.join("baseline"));
        ensure!(
            lq_dir.is_dir(),
            "{}: missing (a prepared data folder holds hq/ and lq/, as `engine degrade` writes them)",
            lq_dir.display()
        );
        let use_baselines = match baselines {
            Baselines::Ignore => false,
            Baselines::IfPresent => baseline_dir.is_dir(),
            Baselines::Required(what) => {
                ensure!(
                    baseline_dir.is_dir(),
                    "{}: missing: {what} needs a baseline upscaler's output for every HQ image",
                    baseline_dir.display()
                );
                true
            }
        };
        let lq_files = by_stem(&lq_dir)?;
        let baseline_files = if use_baselines { by_stem(&baseline_dir)? } else { BTreeMap::new() };
        let mut items = Vec::new();
        for (stem, hq_path) in by_stem(&hq_dir)? {
            let member = |files: &BTreeMap<PathBuf, PathBuf>, folder: &Path| -> Result<Image> {
                let path = files.get(&stem).with_context(|| {
                    format!(
                        "{}: missing (no file of that name below {} for {})",
                        folder.join(&stem).with_extension("png").display(),
                        folder.display(),
                        hq_path.display()
                    )
                })?;
                Ok(loaders::image::read(path)?.to_rgb())
            };
            let hq = loaders::image::read(&hq_path)?.to_rgb();
            ensure_fits(&hq_path, &hq, crop_side)?;
            let lq = member(&lq_files, &lq_dir)?;
            ensure!(
                lq.width * scale == hq.width && lq.height * scale == hq.height,
                "{}: the LQ is {}x{}, but its HQ {} is {}x{}: the LQ must be exactly 1/{scale} of it",
                lq_files[&stem].display(),
                lq.width,
                lq.height,
                hq_path.display(),
                hq.width,
                hq.height
            );
            let baseline = if use_baselines {
                let img = member(&baseline_files, &baseline_dir)?;
                ensure!(
                    (img.width, img.height) == (hq.width, hq.height),
                    "{}: the baseline is {}x{}, but its HQ {} is {}x{}: they must be the same size",
                    baseline_files[&stem].display(),
                    img.width,
                    img.height,
                    hq_path.display(),
                    hq.width,
                    hq.height
                );
                Some(img)
            } else {
                None
            };
            items.push(Prepared { hq, lq, baseline });
        }
        ensure!(!items.is_empty(), "{}: no images found", hq_dir.display());
        Ok(Dataset::Prepared { items })
    }

    /// Whether the samples carry baselines.
    pub fn has_baselines(&self) -> bool {
        matches!(self, Dataset::Prepared { items } if items[0].baseline.is_some())
    }

    /// The samples `share` takes of a draw of `share.global` from `seed`: per sample an image, a
    /// crop position and (HQ folders) a degradation seed, all drawn for the whole draw, so that a
    /// rank's slice is exactly that part of one process's draw, and only the slice is cropped
    /// and degraded.
    /// With `augment`, an HQ folder's crops also come from a region up to twice the side, reduced
    /// to it by area averaging, in one of the 8 orientations of the square.
    pub fn draw(&self, share: Share, crop_side: usize, scale: usize, augment: bool, seed: u64) -> Result<Vec<Sample>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let picks: Vec<Pick> = (0..share.global).map(|_| self.pick(&mut rng, crop_side, scale, augment)).collect();
        picks[share.range()].iter().map(|pick| self.sample(pick, crop_side, scale)).collect()
    }

    /// One sample's random choices, in the order the draw has always made them.
    fn pick(&self, rng: &mut ChaCha8Rng, crop_side: usize, scale: usize, augment: bool) -> Pick {
        match self {
            Dataset::Degraded { images } => {
                let image = rng.random_range(0..images.len());
                let img = &images[image];
                let region = match augment {
                    true => rng.random_range(crop_side..=(2 * crop_side).min(img.width).min(img.height)),
                    false => crop_side,
                };
                let (x, y) = (rng.random_range(0..=img.width - region), rng.random_range(0..=img.height - region));
                let orientation = augment.then(|| rng.random_range(0..8));
                Pick { item: image, x, y, region, orientation, degradation: rng.random() }
            }
            Dataset::Prepared { items } => {
                let item = rng.random_range(0..items.len());
                let hq = &items[item].hq;
                // The corner on the scale's grid, so that the LQ crop is exactly 1/scale.
                let x = scale * rng.random_range(0..=(hq.width - crop_side) / scale);
                let y = scale * rng.random_range(0..=(hq.height - crop_side) / scale);
                Pick { item, x, y, region: crop_side, orientation: None, degradation: 0 }
            }
        }
    }

    /// The sample a pick describes: cropped, and degraded or cut from the prepared members.
    fn sample(&self, pick: &Pick, crop_side: usize, scale: usize) -> Result<Sample> {
        let Pick { item, x, y, region, orientation, degradation } = *pick;
        match self {
            Dataset::Degraded { images } => {
                let mut hq = crop(&images[item], x, y, region, region);
                if let Some(k) = orientation {
                    let reduced = resize::resize(&Rgb::from_image(&hq), crop_side, crop_side, resize::Mode::Area, None);
                    hq = orient(&reduced.into_image(), k);
                }
                let lq = degrade(&hq, scale, degradation)?;
                Ok(Sample { hq, lq, baseline: None })
            }
            Dataset::Prepared { items } => {
                let item = &items[item];
                let side = crop_side / scale;
                Ok(Sample {
                    hq: crop(&item.hq, x, y, crop_side, crop_side),
                    lq: crop(&item.lq, x / scale, y / scale, side, side),
                    baseline: item.baseline.as_ref().map(|b| crop(b, x, y, crop_side, crop_side)),
                })
            }
        }
    }
}

/// A sample's random choices: which image or item, the crop's corner and region side, and for
/// HQ folders the orientation (with `augment`) and the degradation's seed.
#[derive(Clone, Copy, Debug)]
struct Pick {
    item: usize,
    x: usize,
    y: usize,
    region: usize,
    orientation: Option<u32>,
    degradation: u64,
}

/// A square image in orientation `k` of 8: `k & 1` mirrors left-right, `k & 2` mirrors
/// top-bottom, `k & 4` transposes.
fn orient(img: &Image, k: u32) -> Image {
    let (n, c) = (img.width, img.channels);
    let mut data = Vec::with_capacity(img.data.len());
    for y in 0..n {
        for x in 0..n {
            let (mut sx, mut sy) = if k & 4 != 0 { (y, x) } else { (x, y) };
            if k & 1 != 0 {
                sx = n - 1 - sx;
            }
            if k & 2 != 0 {
                sy = n - 1 - sy;
            }
            data.extend_from_slice(&img.data[(sy * n + sx) * c..(sy * n + sx + 1) * c]);
        }
    }
    Image::new(n, n, c, data)
}

fn ensure_fits(path: &Path, img: &Image, crop_side: usize) -> Result<()> {
    ensure!(
        img.width >= crop_side && img.height >= crop_side,
        "{}: {}x{} is smaller than the {crop_side}px crop",
        path.display(),
        img.width,
        img.height
    );
    Ok(())
}

/// The images below `dir` by their relative path without the extension.
fn by_stem(dir: &Path) -> Result<BTreeMap<PathBuf, PathBuf>> {
    let mut out = BTreeMap::new();
    for input in collect_inputs(&[dir.to_path_buf()])? {
        let stem = input.relative.with_extension("");
        if let Some(other) = out.insert(stem, input.path.clone()) {
            bail!("{} and {}: two images of one name; keep one", other.display(), input.path.display());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: usize, h: usize, k: usize) -> Image {
        Image::new(w, h, 3, (0..w * h * 3).map(|i| ((i * (7 + k)) % 31) as f32 / 30.0).collect())
    }

    fn write(path: &Path, img: &Image) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        loaders::image::write_png(path, img, true).unwrap();
    }

    /// Prepared crops sit at the same place in all three members; errors name the file.
    #[test]
    fn prepared_triples_crop_together_and_name_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // The LQ is the HQ's top-left pixel of each 4x4 block, so a matching crop is checkable.
        let hq = image(48, 40, 1);
        let lq = Image::new(12, 10, 3, (0..12 * 10 * 3).map(|i| hq.data[((i / 3 / 12) * 4 * 48 + (i / 3 % 12) * 4) * 3 + i % 3]).collect());
        let baseline = image(48, 40, 2);
        write(&d.join("hq/sub/a.png"), &hq);
        write(&d.join("lq/sub/a.png"), &lq);
        write(&d.join("baseline/sub/a.png"), &baseline);
        // As read back (8 bits per channel).
        let read = |p: &str| loaders::image::read(&d.join(p)).unwrap().to_rgb();
        let (hq, lq, baseline) = (read("hq/sub/a.png"), read("lq/sub/a.png"), read("baseline/sub/a.png"));

        let data = Dataset::open(d, 16, 4, Baselines::Required("the adversary")).unwrap();
        assert!(data.has_baselines());
        for s in data.draw(Share::whole(6), 16, 4, false, 3).unwrap() {
            let b = s.baseline.as_ref().unwrap();
            // Find the crop's corner from the HQ, then check the LQ and the baseline against it.
            let corner =
                (0..=32).step_by(4).flat_map(|x| (0..=24).step_by(4).map(move |y| (x, y))).find(|&(x, y)| crop(&hq, x, y, 16, 16) == s.hq);
            let (x, y) = corner.expect("the HQ crop is on the scale's grid");
            assert_eq!(s.lq, crop(&lq, x / 4, y / 4, 4, 4));
            assert_eq!(*b, crop(&baseline, x, y, 16, 16));
        }
        assert_eq!(data.draw(Share::whole(3), 16, 4, false, 9).unwrap(), data.draw(Share::whole(3), 16, 4, false, 9).unwrap());
        assert!(!Dataset::open(d, 16, 4, Baselines::Ignore).unwrap().has_baselines());

        write(&d.join("hq/b.png"), &image(48, 40, 3));
        let err = Dataset::open(d, 16, 4, Baselines::Ignore).err().unwrap().to_string();
        assert!(err.contains("lq/b.png") && err.contains("missing"), "{err}");
        write(&d.join("lq/b.png"), &image(12, 11, 3));
        let err = Dataset::open(d, 16, 4, Baselines::Ignore).err().unwrap().to_string();
        assert!(err.contains("lq/b.png") && err.contains("1/4"), "{err}");
        write(&d.join("lq/b.png"), &image(12, 10, 3));
        let err = Dataset::open(d, 16, 4, Baselines::IfPresent).err().unwrap().to_string();
        assert!(err.contains("baseline/b.png"), "{err}");
        write(&d.join("baseline/b.png"), &image(40, 40, 3));
        let err = Dataset::open(d, 16, 4, Baselines::IfPresent).err().unwrap().to_string();
        assert!(err.contains("baseline/b.png") && err.contains("same size"), "{err}");
        std::fs::remove_dir_all(d.join("baseline")).unwrap();
        let err = Dataset::open(d, 16, 4, Baselines::Required("the adversary")).err().unwrap().to_string();
        assert!(err.contains("baseline") && err.contains("the adversary"), "{err}");
        let err = Dataset::open(d, 64, 4, Baselines::Ignore).err().unwrap().to_string();
        assert!(err.contains("hq/b.png") && err.contains("64px"), "{err}");
    }

    /// A rank's share of a draw is exactly its slice of the whole draw, augmented or not, from
    /// HQ folders and prepared pairs alike.
    #[test]
    fn a_share_is_its_slice_of_the_whole_draw() {
        let dir = tempfile::tempdir().unwrap();
        let hq = image(48, 40, 1);
        write(&dir.path().join("hq/a.png"), &hq);
        write(&dir.path().join("lq/a.png"), &image(12, 10, 2));
        write(&dir.path().join("hq/b.png"), &image(32, 36, 3));
        write(&dir.path().join("lq/b.png"), &image(8, 9, 4));
        let prepared = Dataset::open(dir.path(), 16, 4, Baselines::Ignore).unwrap();
        let degraded = Dataset::Degraded { images: vec![hq, image(40, 36, 5)] };
        for (data, augment) in [(&degraded, false), (&degraded, true), (&prepared, false)] {
            let whole = data.draw(Share::whole(6), 16, 4, augment, 5).unwrap();
            for rank in 0..3 {
                let share = Share::of_rank(rank, 3, 2);
                assert_eq!(data.draw(share, 16, 4, augment, 5).unwrap(), whole[2 * rank..2 * rank + 2], "rank {rank}, augment {augment}");
            }
            assert_ne!(whole[0], whole[1]);
        }
    }

    /// The 8 orientations of an image whose pixels are all distinct are 8 different images, each
    /// a permutation of the same pixels; an augmented draw keeps the crop's size.
    #[test]
    fn the_eight_orientations_are_distinct_permutations() {
        let img = Image::new(3, 3, 1, (0..9).map(|v| v as f32 / 8.0).collect());
        let mut seen: Vec<Vec<f32>> = (0..8).map(|k| orient(&img, k).data).collect();
        for o in &seen {
            let mut sorted = o.clone();
            sorted.sort_by(f32::total_cmp);
            assert_eq!(sorted, img.data);
        }
        assert_eq!(orient(&img, 5).data, [2.0, 5.0, 8.0, 1.0, 4.0, 7.0, 0.0, 3.0, 6.0].map(|v| v / 8.0));
        seen.sort_by(|a, b| a.iter().zip(b).map(|(x, y)| x.total_cmp(y)).find(|o| o.is_ne()).unwrap_or(std::cmp::Ordering::Equal));
        seen.dedup();
        assert_eq!(seen.len(), 8);
        let data = Dataset::Degraded { images: vec![image(40, 36, 1)] };
        for s in data.draw(Share::whole(5), 16, 4, true, 2).unwrap() {
            assert_eq!((s.hq.width, s.hq.height, s.lq.width), (16, 16, 4));
        }
    }
}
