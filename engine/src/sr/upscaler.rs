//! One image through a super-resolution model: bicubic upsampling of the LQ to the output size,
//! encoding, tiled flow sampling conditioned on the encoded LQ, decoding (design.md section 4).

use super::model_dir::SrModel;
use super::packing::{pack, unpack};
use super::resample::resize;
use super::sample::{euler_tiled, Grid};
use crate::backend::error::DeviceOutOfMemory;
use crate::backend::Backend;
use crate::model::flux::scalars;
use crate::model::Conditioning;
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
    pub fn upscale_batch(
        &self,
        b: &B,
        lqs: &[&Image],
        opts: &UpscaleOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Image>> {
        ensure!(opts.steps >= 1, "steps must be at least 1");
        ensure!(!lqs.is_empty(), "upscale_batch: no images");
        let (lw0, lh0) = (lqs[0].width, lqs[0].height);
        ensure!(lqs.iter().all(|lq| (lq.width, lq.height) == (lw0, lh0)), "upscale_batch: the images differ in size");
        let scale = self.config.scale;
        let (w, h) = (lw0 * scale, lh0 * scale);
        let unit = self.token_pixels();
        let (wp, hp) = (w.div_ceil(unit) * unit, h.div_ceil(unit) * unit);
        // The model sees the bicubic upsample; sides are padded by edge replication to whole
        // latent tokens, and the padding is cropped off the result.
        let mut conds = Vec::with_capacity(lqs.len());
        for lq in lqs {
            let up = pad_edges(&resize(&lq.to_rgb(), w, h), wp, hp);
            conds.push(pack(&self.ae.encode_tiled(b, &to_tensor(&up), &self.ae_tiling, &mut |_, _| ())?.output)?.to_f32());
        }
        let (lh, lw) = (hp / self.config.ae_factor(), wp / self.config.ae_factor());
        let features = conds[0].len() / ((lh / 2) * (lw / 2));
        let grid = Grid { rows: lh / 2, cols: lw / 2, features };

        let mut velocity = |img: &HostTensor, ids: &HostTensor, t: f32| -> Result<Vec<f32>> {
            let n = img.shape[0];
            let repeat = |x: &HostTensor| {
                let mut shape = x.shape.clone();
                shape[0] = n;
                HostTensor::from_f32(shape, x.to_f32().repeat(n))
            };
            let txt_ids = HostTensor::from_f32(vec![n, self.txt.shape[1], 3], vec![0.0; n * self.txt.shape[1] * 3]);
            let c = Conditioning {
                txt: b.input(&repeat(&self.txt))?,
                pe: self.flux.positions(b, &txt_ids, ids)?,
                y: b.input(&repeat(&self.y))?,
                guidance: match self.flux.params.guidance_embed {
                    true => Some(scalars(b, &HostTensor::from_f32(vec![n], vec![self.config.guidance; n]))?),
                    false => None,
                },
            };
            let output = self.flux.forward(b, &b.input(img)?, &scalars(b, &HostTensor::from_f32(vec![n], vec![t; n]))?, &c)?;
            let x_t: Vec<f32> = img.to_f32().chunks(2 * features).flat_map(|token| token[..features].to_vec()).collect();
            Ok(self.config.prediction.velocity(b.download(&output)?.to_f32(), &x_t, &vec![t; n]))
        };
        let cond_refs: Vec<&[f32]> = conds.iter().map(|c| c.as_slice()).collect();
        // Whole tokens covering the tile side (a 512-pixel tile takes a 512-pixel output in one
        // piece whatever the token size); a GPU too small for it gets tiles of half the side.
        let mut tile = opts.tile.div_ceil(unit).max(1);
        let total = opts.steps * opts.average.max(1);
        let mut xs = vec![vec![0f32; grid.len()]; lqs.len()];
        for k in 0..opts.average.max(1) {
            let seed = opts.seed.wrapping_add(k as u64);
            let sample = loop {
                let times = schedule(opts.steps, grid.rows.min(tile) * grid.cols.min(tile));
                let attempt = euler_tiled(
                    vec![gaussian_noise(grid.len(), seed); lqs.len()],
                    &cond_refs,
                    grid,
                    grid.features,
                    &times,
                    (tile, (tile / 4).max(1)),
                    opts.batch,
                    &mut velocity,
                    &mut |s| progress(k * opts.steps + s, total),
                );
                match attempt {
                    Err(e) if tile > 1 && e.chain().any(|c| c.is::<DeviceOutOfMemory>()) => tile /= 2,
                    result => break result?,
                }
            };
            let weight = 1.0 / opts.average.max(1) as f32;
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
                Ok(from_tensor(&decoded, w, h))
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

/// `[1, 3, Hp, Wp]` in [-1, 1] -> the top-left `w x h` as HWC [0, 1].
fn from_tensor(t: &HostTensor, w: usize, h: usize) -> Image {
    let (hp, wp) = (t.shape[2], t.shape[3]);
    let v = t.to_f32();
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                data.push((v[(c * hp + y) * wp + x].clamp(-1.0, 1.0) + 1.0) / 2.0);
            }
        }
    }
    Image::new(w, h, 3, data)
}

/// Extends an image to `w x h` by repeating its last row and column.
fn pad_edges(img: &Image, w: usize, h: usize) -> Image {
    let c = img.channels;
    let mut data = Vec::with_capacity(w * h * c);
    for y in 0..h {
        let sy = y.min(img.height - 1);
        for x in 0..w {
            let sx = x.min(img.width - 1);
            data.extend_from_slice(&img.data[(sy * img.width + sx) * c..(sy * img.width + sx + 1) * c]);
        }
    }
    Image::new(w, h, c, data)
}
