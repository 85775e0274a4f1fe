//! One image through a super-resolution model: bicubic upsampling of the LQ to the output size,
//! encoding, tiled flow sampling conditioned on the encoded LQ, decoding (design.md section 4).

use super::colorfix::low_band;
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
    /// Gain on the fine detail of the result's difference from the bicubic upsample
    /// ([`amplify_detail`]); 1 leaves the result as sampled.
    pub detail: f32,
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
    /// sample, so the token grid averages out instead of adding up. Last, the fine detail of
    /// the mean is amplified by `opts.detail`.
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
        Ok(sums.into_iter().zip(&ups).map(|(data, up)| amplify_detail(Image::new(w, h, 3, data), up, opts.detail)).collect())
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
                // A shifted grid's padding adds up to a token along each axis: it must not split
                // an image that fits one tile into four.
                let side = *tile + usize::from(offset > 0);
                let times = schedule(opts.steps, grid.rows.min(side) * grid.cols.min(side));
                let attempt = euler_tiled(
                    vec![gaussian_noise(grid.len(), seed); ups.len()],
                    &cond_refs,
                    grid,
                    grid.features,
                    &times,
                    (side, (side / 4).max(1)),
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

/// Levels of the [1, 2, 1] wavelet whose low band [`amplify_detail`] keeps: dilations 1 and 2,
/// a blur of about 1.6 output pixels, under half a pixel of the LQ at x4.
pub const DETAIL_LEVELS: usize = 2;

/// `up + low(r) + gain * (r - low(r))` with `r = sr - up`, per colour channel, clipped to [0, 1]:
/// the finest detail that the result adds to the bicubic upsample `up`, scaled by `gain`. An
/// average of samples is a posterior-mean estimate, smoother than any image (its detail is the
/// samples' agreement only); a gain above 1 gives back some of the amplitude the averaging took,
/// at a small cost in PSNR (the README's table). Like guidance, it extrapolates from the
/// unconditional answer, here the bicubic upsample, towards the model's.
pub fn amplify_detail(mut sr: Image, up: &Image, gain: f32) -> Image {
    if gain == 1.0 {
        return sr;
    }
    let (w, h, c) = (sr.width, sr.height, sr.channels);
    for k in 0..c {
        let r: Vec<f32> = sr.data.iter().zip(&up.data).skip(k).step_by(c).map(|(s, u)| s - u).collect();
        let low = low_band(r.clone(), w, h, DETAIL_LEVELS);
        for (i, v) in sr.data.iter_mut().skip(k).step_by(c).enumerate() {
            *v = (up.data[i * c + k] + low[i] + gain * (r[i] - low[i])).clamp(0.0, 1.0);
        }
    }
    sr
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16 x 16 grey image plus `residual(x, y)` on every channel.
    fn image(residual: impl Fn(usize, usize) -> f32) -> Image {
        let n = 16;
        Image::new(n, n, 3, (0..n * n * 3).map(|i| 0.5 + residual(i / 3 % n, i / 3 / n)).collect())
    }

    #[test]
    fn detail_gain_scales_the_finest_band_and_keeps_the_coarse_one() {
        let up = image(|_, _| 0.0);
        // The checkerboard is the Nyquist frequency, which [1, 2, 1] / 4 removes entirely: away
        // from the replicated borders the low band of the residual is 0 and the gain applies whole.
        let checker = image(|x, y| if (x + y) % 2 == 0 { 0.1 } else { -0.1 });
        let sharpened = amplify_detail(checker.clone(), &up, 2.5);
        for y in 3..13 {
            for x in 3..13 {
                let (got, want) = (sharpened.data[(y * 16 + x) * 3], 0.5 + 2.5 * (checker.data[(y * 16 + x) * 3] - 0.5));
                assert!((got - want).abs() < 1e-6, "({x}, {y}): {got} against {want}");
            }
        }
        // A constant residual is all low band: no gain changes it.
        let offset = image(|_, _| 0.2);
        for gain in [0.0, 2.5] {
            assert!(amplify_detail(offset.clone(), &up, gain).data.iter().zip(&offset.data).all(|(a, b)| (a - b).abs() < 1e-6));
        }
        // Gain 1 is the identity, and the result stays in [0, 1].
        assert_eq!(amplify_detail(checker.clone(), &up, 1.0).data, checker.data);
        assert!(amplify_detail(checker.clone(), &up, 9.0).data.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}
