//! One image through a super-resolution model: bicubic upsampling of the LQ to the output size,
//! encoding, tiled flow sampling conditioned on the encoded LQ, decoding (design.md section 4).

use super::conditioning::Conditionings;
use super::model_dir::SrModel;
use super::packing::{pack, unpack};
use super::resample::resize;
use super::sample::{euler_tiled, Grid};
use crate::backend::error::DeviceOutOfMemory;
use crate::backend::Backend;
use crate::model::flux::scalars;
use crate::model::Trainable;
use crate::sampler::{gaussian_noise, schedule};
use anyhow::{ensure, Result};
use loaders::image::Image;
use loaders::HostTensor;

#[derive(Debug, Clone, Copy)]
pub struct UpscaleOptions {
    pub steps: usize,
    pub seed: u64,
    /// Tile side in output pixels; images up to this size run in one tile.
    pub tile: usize,
    /// Tiles per model call (of one image or of several of one size).
    pub batch: usize,
    /// Samples averaged per image, from seeds `seed`, `seed + 1`, ...: with more than one, an
    /// estimate of the posterior mean instead of one sample.
    pub average: usize,
    /// Averaged samples sit on token grids shifted by fractions of a token (`upscale_batch`).
    pub shift: bool,
}

impl<B: Backend + 'static> SrModel<B> {
    /// Output pixels per packed latent token along one side.
    pub fn token_pixels(&self) -> usize {
        2 * self.config.ae_factor()
    }

    /// Upscales the colour channels of `lq` by the model's scale. Calls `progress(step, steps)`.
    pub fn upscale(&self, b: &B, lq: &Image, opts: &UpscaleOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<Image> {
        Ok(self.upscale_batch(b, &[lq], opts, progress)?.remove(0))
    }

    /// Upscales images of one size together: the tiles of all of them go through the model
    /// `opts.batch` at a time. Each image gets the noise of `opts.seed`, so its result does not
    /// depend on the batch it ran in. Calls `progress(step, steps)`.
    ///
    /// With `opts.average` samples, sample `k` (seed `opts.seed + k`) runs on a token grid
    /// shifted by `k / average` of a token along both axes when `opts.shift` is set. Samples on
    /// one grid are averaged in the flow's space and decoded once; the grids' decodes are
    /// averaged in image space: each token's border then falls on a different pixel in each
    /// sample, so the token grid averages out instead of adding up.
    pub fn upscale_batch(
        &self,
        b: &B,
        lqs: &[&Image],
        opts: &UpscaleOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Image>> {
        ensure!(opts.steps >= 1, "steps must be at least 1");
        ensure!(!lqs.is_empty(), "upscale_batch: no images");
        let (lw, lh) = (lqs[0].width, lqs[0].height);
        ensure!(lqs.iter().all(|lq| (lq.width, lq.height) == (lw, lh)), "upscale_batch: the images differ in size");
        let (w, h) = (lw * self.config.scale, lh * self.config.scale);
        // The model sees the bicubic upsample.
        let ups: Vec<Image> = lqs.iter().map(|lq| resize(&lq.to_rgb(), w, h)).collect();
        let samples = opts.average.max(1);
        // The seeds of each grid offset, in the order of their first sample.
        let mut grids: Vec<(usize, Vec<u64>)> = Vec::new();
        for k in 0..samples {
            let offset = if opts.shift { k * self.token_pixels() / samples } else { 0 };
            let seed = opts.seed.wrapping_add(k as u64);
            match grids.iter_mut().find(|(o, _)| *o == offset) {
                Some((_, seeds)) => seeds.push(seed),
                None => grids.push((offset, vec![seed])),
            }
        }
        let conditionings = Conditionings::default();
        // A GPU too small for a tile gets tiles of half the side, for the rest of the run.
        let mut tile = opts.tile.div_ceil(self.token_pixels()).max(1);
        let mut sums = vec![vec![0f32; 3 * w * h]; lqs.len()];
        let mut done = 0;
        for (offset, seeds) in &grids {
            let images = self.sample_shifted(b, &ups, *offset, seeds, opts, &mut tile, &conditionings, &mut |s| {
                progress(done + s, samples * opts.steps)
            })?;
            done += seeds.len() * opts.steps;
            let weight = seeds.len() as f32 / samples as f32;
            for (sum, image) in sums.iter_mut().zip(images) {
                sum.iter_mut().zip(image.data).for_each(|(s, x)| *s += weight * x);
            }
        }
        Ok(sums.into_iter().map(|data| Image::new(w, h, 3, data)).collect())
    }

    /// The mean of the samples from `seeds` of each upsampled image `ups`, with the token grid
    /// starting `offset` pixels above and left of the image: the image is padded by edge
    /// replication, by `offset` at the top and left and to whole tokens at the bottom and right,
    /// encoded once, and the padding is cropped off the decoded mean. Calls `progress(step)`
    /// counting the steps of all seeds.
    #[allow(clippy::too_many_arguments)]
    fn sample_shifted(
        &self,
        b: &B,
        ups: &[Image],
        offset: usize,
        seeds: &[u64],
        opts: &UpscaleOptions,
        tile: &mut usize,
        conditionings: &Conditionings<B>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Image>> {
        let unit = self.token_pixels();
        let (w, h) = (ups[0].width, ups[0].height);
        let (wp, hp) = ((offset + w).div_ceil(unit) * unit, (offset + h).div_ceil(unit) * unit);
        let mut conds = Vec::with_capacity(ups.len());
        for up in ups {
            let padded = pad_edges(up, offset, wp, hp);
            conds.push(pack(&self.ae.encode_tiled(b, &to_tensor(&padded), &self.ae_tiling, &mut |_, _| ())?.output)?.to_f32());
        }
        let (lh, lw) = (hp / self.config.ae_factor(), wp / self.config.ae_factor());
        let features = conds[0].len() / ((lh / 2) * (lw / 2));
        let grid = Grid { rows: lh / 2, cols: lw / 2, features };

        let mut velocity = |img: &HostTensor, tile: (usize, usize), t: f32| -> Result<Vec<f32>> {
            let n = img.shape[0];
            let c = conditionings.get(b, self, n, tile)?;
            let timesteps = scalars(b, &HostTensor::from_f32(vec![n], vec![t; n]))?;
            let output = self.flux.forward(b, &b.input(img)?, &timesteps, &c, Trainable::Nothing)?;
            let x_t: Vec<f32> = img.to_f32().chunks(2 * features).flat_map(|token| token[..features].to_vec()).collect();
            Ok(self.config.prediction.velocity(b.download(&output)?.to_f32(), &x_t, &vec![t; n]))
        };
        let cond_refs: Vec<&[f32]> = conds.iter().map(|c| c.as_slice()).collect();
        let mut xs = vec![vec![0f32; grid.len()]; ups.len()];
        for (i, &seed) in seeds.iter().enumerate() {
            let sample = loop {
                let times = schedule(opts.steps, grid.rows.min(*tile) * grid.cols.min(*tile));
                let attempt = euler_tiled(
                    vec![gaussian_noise(grid.len(), seed); ups.len()],
                    &cond_refs,
                    grid,
                    grid.features,
                    &times,
                    (*tile, (*tile / 4).max(1)),
                    opts.batch,
                    &mut velocity,
                    &mut |s| progress(i * opts.steps + s),
                );
                match attempt {
                    Err(e) if *tile > 1 && e.chain().any(|c| c.is::<DeviceOutOfMemory>()) => *tile /= 2,
                    result => break result?,
                }
            };
            // The flow's data end is linear in the latent: the mean sample is the mean latent's.
            let weight = 1.0 / seeds.len() as f32;
            for (sum, x) in xs.iter_mut().zip(sample) {
                sum.iter_mut().zip(x).for_each(|(s, x)| *s += weight * x);
            }
        }
        // Each LQ latent is consumed by its own decode (the transformer's activations went with
        // the last step); the autoencoder halves its tile on a device out of memory.
        xs.into_iter()
            .zip(conds)
            .map(|(x, cond)| {
                let x = self.config.flow.to_latent(&x, &cond);
                drop(cond);
                let latent = unpack(&HostTensor::from_f32(vec![1, grid.rows * grid.cols, grid.features], x), lh, lw)?;
                let decoded = self.ae.decode_tiled(b, &latent, &self.ae_tiling, &mut |_, _| ())?.output;
                Ok(crop(&decoded, offset, w, h))
            })
            .collect()
    }
}

/// HWC [0, 1] -> `[1, 3, H, W]` in [-1, 1].
fn to_tensor(img: &Image) -> HostTensor {
    let (w, h) = (img.width, img.height);
    let mut out = vec![0f32; 3 * w * h];
    for (p, px) in img.data.chunks(3).enumerate() {
        for c in 0..3 {
            out[c * w * h + p] = px[c] * 2.0 - 1.0;
        }
    }
    HostTensor::from_f32(vec![1, 3, h, w], out)
}

/// `[1, 3, Hp, Wp]` in [-1, 1] -> the `w x h` pixels from (`offset`, `offset`) on, as HWC [0, 1].
fn crop(t: &HostTensor, offset: usize, w: usize, h: usize) -> Image {
    let (hp, wp) = (t.shape[2], t.shape[3]);
    let v = t.to_f32();
    let mut data = Vec::with_capacity(w * h * 3);
    for y in offset..offset + h {
        for x in offset..offset + w {
            for c in 0..3 {
                data.push((v[(c * hp + y) * wp + x].clamp(-1.0, 1.0) + 1.0) / 2.0);
            }
        }
    }
    Image::new(w, h, 3, data)
}

/// The `w x h` image holding `img` at (`offset`, `offset`), its first and last rows and columns
/// repeated into the margins.
fn pad_edges(img: &Image, offset: usize, w: usize, h: usize) -> Image {
    let c = img.channels;
    let mut data = Vec::with_capacity(w * h * c);
    for y in 0..h {
        let sy = y.saturating_sub(offset).min(img.height - 1);
        for x in 0..w {
            let sx = x.saturating_sub(offset).min(img.width - 1);
            data.extend_from_slice(&img.data[(sy * img.width + sx) * c..(sy * img.width + sx + 1) * c]);
        }
    }
    Image::new(w, h, c, data)
}
