//! A micro-batch as the transformer sees it, and the passes through the model that the stages
//! are made of.
//!
//! Layouts: the model reads and writes packed tokens `[n, L, F]` (FLUX's 2x2 packing of the latent
//! grid); the losses live on the latent grid `[n, C, H, W]` (their operator maps a pixel-shuffle
//! latent to the image grid itself). `Latent::to_grid` and `Latent::to_tokens` convert; the item
//! count of a buffer is its length over the values per item, so one layout serves the P items of a
//! batch and the 2P of an S-DPO pass (winners then losers).
//!
//! Seeds: every random draw of micro-batch `draw` (counted over the run, `step * grad_accum +
//! micro`) comes from [`step_seed`]`(run seed, draw, stream)`, so the state of a run is its step.

use super::data::Sample;
use super::loss::LogitNormal;
use super::sobolev::Grid as FieldGrid;
use crate::backend::backward::BackwardOps;
use crate::backend::Backend;
use crate::model::backward::{Checkpointing, FluxActs, FluxGrads};
use crate::model::flux::scalars;
use crate::model::positions::image_ids;
use crate::model::Conditioning;
use crate::sampler::gaussian_noise;
use crate::sr::model_dir::SrModel;
use crate::sr::packing::{pack, unpack};
use crate::sr::resample::resize;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use loaders::image::Image;
use loaders::HostTensor;

/// The random streams of a micro-batch.
pub mod stream {
    pub const TIME: u64 = 1;
    pub const NOISE: u64 = 2;
    pub const DATA: u64 = 3;
    /// The sampling noise of `--negatives reference` restorations.
    pub const NEGATIVES: u64 = 4;
}

/// The seed of one random stream of one draw: t and eps of draw k never depend on how the run
/// got to draw k.
pub fn step_seed(run_seed: u64, draw: u64, stream: u64) -> u64 {
    // SplitMix64 of the three, so that neighbouring draws get unrelated streams.
    let mut z = run_seed ^ draw.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The flow's noise draws of one micro-batch: t per item (from `times`) and eps over `values`.
pub fn draw_noise(times: &LogitNormal, items: usize, values: usize, run_seed: u64, draw: u64) -> (Vec<f32>, Vec<f32>) {
    let t = times.sample(items, step_seed(run_seed, draw, stream::TIME));
    let eps = gaussian_noise(values, step_seed(run_seed, draw, stream::NOISE));
    (t, eps)
}

/// The latent grid of one item `[C, H, W]`, and its packed tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latent(pub FieldGrid);

impl Latent {
    pub fn grid(&self) -> FieldGrid {
        self.0
    }

    pub fn tokens(&self) -> usize {
        (self.0.height / 2) * (self.0.width / 2)
    }

    pub fn features(&self) -> usize {
        4 * self.0.channels
    }

    fn items(&self, values: usize) -> Result<usize> {
        let per_item = self.0.elements();
        ensure!(values > 0 && values % per_item == 0, "{values} values are not a whole number of {} latents", self.0);
        Ok(values / per_item)
    }

    /// Packed tokens `[n, L, F]` -> the latent grid `[n, C, H, W]`.
    pub fn to_grid(&self, tokens: &[f32]) -> Result<Vec<f32>> {
        let n = self.items(tokens.len())?;
        let packed = HostTensor::from_f32(vec![n, self.tokens(), self.features()], tokens.to_vec());
        Ok(unpack(&packed, self.0.height, self.0.width)?.to_f32())
    }

    /// The latent grid `[n, C, H, W]` -> packed tokens `[n, L, F]`.
    pub fn to_tokens(&self, grid: &[f32]) -> Result<Vec<f32>> {
        let n = self.items(grid.len())?;
        let g = self.0;
        Ok(pack(&HostTensor::from_f32(vec![n, g.channels, g.height, g.width], grid.to_vec()))?.to_f32())
    }
}

/// A micro-batch of samples as packed `[B, L, F]` latents.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// The HQ images as the flow's data (`x0`, `SrConfig::flow` of their latents; the winners of
    /// a preference pair).
    pub x0: Vec<f32>,
    /// The encoded bicubic upsample of each LQ, on the same tokens: the model's condition.
    pub cond: Vec<f32>,
    /// The baseline outputs as the flow's data, when the samples have them.
    pub baseline: Option<Vec<f32>>,
    pub items: usize,
    pub latent: Latent,
}

/// Encodes samples as the upscaler does: the LQ upsampled bicubically to the HQ's size, all
/// images in [-1, 1], through the autoencoder, packed 2x2. All HQ crops must share one size, a
/// multiple of the model's token side.
pub fn encode_samples<B: Backend + 'static>(b: &B, model: &SrModel<B>, samples: &[Sample]) -> Result<Batch> {
    ensure!(!samples.is_empty(), "encode_samples: no samples");
    let (w, h) = (samples[0].hq.width, samples[0].hq.height);
    let upsampled: Vec<Image> = samples.iter().map(|s| resize(&s.lq.to_rgb(), w, h)).collect();
    let (hq, latent) = encode_images(b, model, &samples.iter().map(|s| &s.hq).collect::<Vec<_>>())?;
    let (cond, _) = encode_images(b, model, &upsampled.iter().collect::<Vec<_>>())?;
    let flow = &model.config.flow;
    let x0 = flow.to_flow(&hq, &cond);
    let baseline = match samples.iter().map(|s| s.baseline.as_ref()).collect::<Option<Vec<_>>>() {
        Some(images) => Some(flow.to_flow(&encode_images(b, model, &images)?.0, &cond)),
        None => None,
    };
    Ok(Batch { x0, cond, baseline, items: samples.len(), latent })
}

/// Images of one size through the autoencoder, packed: `[n, L, F]` and the latent grid.
pub fn encode_images<B: Backend + 'static>(b: &B, model: &SrModel<B>, images: &[&Image]) -> Result<(Vec<f32>, Latent)> {
    let (w, h) = (images[0].width, images[0].height);
    let unit = model.token_pixels();
    ensure!(w % unit == 0 && h % unit == 0, "training crops are {w}x{h}, but the model needs multiples of {unit} pixels");
    let mut pixels = Vec::with_capacity(images.len() * 3 * w * h);
    for img in images {
        ensure!((img.width, img.height) == (w, h), "training crops differ in size: {w}x{h} and {}x{}", img.width, img.height);
        pixels.extend(planar(&img.to_rgb()));
    }
    let latent = b.download(&model.ae.encode(b, &b.input(&HostTensor::from_f32(vec![images.len(), 3, h, w], pixels))?)?)?;
    let s = &latent.shape;
    Ok((pack(&latent)?.to_f32(), Latent(FieldGrid::new(s[1], s[2], s[3]))))
}

/// HWC [0, 1] -> CHW [-1, 1].
fn planar(img: &Image) -> Vec<f32> {
    let plane = img.width * img.height;
    let mut out = vec![0f32; 3 * plane];
    for (p, px) in img.data.chunks(3).enumerate() {
        for c in 0..3 {
            out[c * plane + p] = px[c] * 2.0 - 1.0;
        }
    }
    out
}

/// The transformer's conditioning for `items` copies of the model's fixed text on `latent`'s grid.
pub fn conditioning<B: Backend + 'static>(b: &B, model: &SrModel<B>, items: usize, latent: Latent) -> Result<Conditioning<B>> {
    let repeat = |t: &HostTensor| -> HostTensor {
        let mut shape = t.shape.clone();
        shape[0] = items;
        HostTensor::from_f32(shape, t.to_f32().repeat(items))
    };
    let lt = model.txt.shape[1];
    let txt_ids = HostTensor::from_f32(vec![items, lt, 3], vec![0.0; items * lt * 3]);
    let grid = latent.grid();
    let ids = image_ids(grid.height / 2, grid.width / 2).repeat(items);
    let img_ids = HostTensor::from_f32(vec![items, latent.tokens(), 3], ids);
    let guidance = HostTensor::from_f32(vec![items], vec![model.config.guidance; items]);
    Ok(Conditioning {
        txt: b.input(&repeat(&model.txt))?,
        pe: model.flux.positions(b, &txt_ids, &img_ids)?,
        y: b.input(&repeat(&model.y))?,
        guidance: if model.flux.params.guidance_embed { Some(scalars(b, &guidance)?) } else { None },
    })
}

/// The transformer's input: each token's `x_t` features followed by its LQ features.
pub fn model_input(x_t: &[f32], cond: &[f32], features: usize) -> Vec<f32> {
    x_t.chunks(features).zip(cond.chunks(features)).flat_map(|(x, c)| x.iter().chain(c).copied()).collect()
}

/// The model's inputs for `x_t` (packed, one time per item) conditioned on `cond`.
struct Inputs<B: Backend> {
    img: Tensor<B>,
    timesteps: Tensor<B>,
    c: Conditioning<B>,
}

fn inputs<B: Backend + 'static>(b: &B, model: &SrModel<B>, latent: Latent, x_t: &[f32], cond: &[f32], t: &[f32]) -> Result<Inputs<B>> {
    let items = t.len();
    let (tokens, features) = (latent.tokens(), latent.features());
    ensure!(
        x_t.len() == items * tokens * features && cond.len() == x_t.len(),
        "model pass: {} x_t and {} condition values for {items} items of {tokens} x {features}",
        x_t.len(),
        cond.len()
    );
    let img = b.input(&HostTensor::from_f32(vec![items, tokens, 2 * features], model_input(x_t, cond, features)))?;
    let timesteps = scalars(b, &HostTensor::from_f32(vec![items], t.to_vec()))?;
    Ok(Inputs { img, timesteps, c: conditioning(b, model, items, latent)? })
}

/// The model's velocity at `x_t` (packed), without keeping anything for a backward.
pub fn velocity<B: Backend + 'static>(b: &B, model: &SrModel<B>, latent: Latent, x_t: &[f32], cond: &[f32], t: &[f32]) -> Result<Vec<f32>> {
    let i = inputs(b, model, latent, x_t, cond, t)?;
    let output = b.download(&model.flux.forward(b, &i.img, &i.timesteps, &i.c)?)?.to_f32();
    Ok(model.config.prediction.velocity(output, x_t, t))
}

/// A forward pass kept for its backward.
pub struct TrainPass<B: Backend> {
    inputs: Inputs<B>,
    acts: FluxActs<B>,
    latent: Latent,
    t: Vec<f32>,
    /// The velocity, packed like `x_t`.
    pub velocity: Vec<f32>,
}

/// The gradients of one backward, as the trainer needs them.
pub struct PassGrads<B: Backend> {
    /// Everything the model's backward returns (the adapters' gradients among them).
    pub model: FluxGrads<B>,
    /// d loss / d x_t, packed like `x_t`: the first half of the features of each input token.
    pub x_t: Vec<f32>,
}

/// [`velocity`], keeping what the backward needs.
pub fn forward_train<B: BackwardOps + 'static>(
    b: &B,
    model: &SrModel<B>,
    latent: Latent,
    x_t: &[f32],
    cond: &[f32],
    t: &[f32],
) -> Result<TrainPass<B>> {
    let inputs = inputs(b, model, latent, x_t, cond, t)?;
    let (output, acts) = model.flux.forward_train(b, &inputs.img, &inputs.timesteps, &inputs.c, Checkpointing::Off)?;
    let velocity = model.config.prediction.velocity(b.download(&output)?.to_f32(), x_t, t);
    Ok(TrainPass { velocity, inputs, acts, latent, t: t.to_vec() })
}

impl<B: BackwardOps + 'static> TrainPass<B> {
    /// The backward of a loss whose gradient wrt the velocity is `g_velocity` (packed). `model`
    /// must carry the adapters the forward ran with.
    pub fn backward(self, b: &B, model: &SrModel<B>, g_velocity: &[f32]) -> Result<PassGrads<B>> {
        ensure!(g_velocity.len() == self.velocity.len(), "backward: {} gradient values for {}", g_velocity.len(), self.velocity.len());
        let (tokens, features) = (self.latent.tokens(), self.latent.features());
        let shape = vec![self.velocity.len() / (tokens * features), tokens, features];
        let (g_output, g_x_direct) = model.config.prediction.backward(g_velocity, &self.t);
        let g = b.input(&HostTensor::from_f32(shape, g_output))?;
        let grads = model.flux.backward(b, &self.inputs.img, &self.inputs.c, self.acts, &g)?;
        let g_img = b.download(&grads.img)?.to_f32();
        let mut x_t: Vec<f32> = g_img.chunks(2 * features).flat_map(|token| token[..features].iter().copied()).collect();
        if let Some(direct) = g_x_direct {
            x_t.iter_mut().zip(direct).for_each(|(g, d)| *g += d);
        }
        Ok(PassGrads { model: grads, x_t })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sr::model_dir::{FlowData, Prediction};
    use crate::train::sft::tests::{samples, tiny_sr_model, B};

    /// Pixel-shuffle and packing only move pixels, so a residual flow's data has the energy of
    /// `scale * (HQ - bicubic)` computed on the images themselves.
    #[test]
    fn a_residual_flow_learns_scale_times_what_bicubic_misses() {
        let mut model = tiny_sr_model(1);
        let scale = 4.0;
        model.config.flow = FlowData::Residual { scale };
        let samples = samples(2);
        let batch = encode_samples(&B, &model, &samples).unwrap();
        let mut want = 0f64;
        for s in &samples {
            let up = resize(&s.lq, s.hq.width, s.hq.height);
            want += s.hq.data.iter().zip(&up.data).map(|(h, u)| (scale as f64 * 2.0 * (h - u) as f64).powi(2)).sum::<f64>();
        }
        let got: f64 = batch.x0.iter().map(|&x| (x as f64).powi(2)).sum();
        assert!(want > 1.0 && (got - want).abs() < 1e-4 * want, "energy {got}, expected {want}");
        // The condition itself is the flow's zero.
        assert!(FlowData::Residual { scale }.to_flow(&batch.cond, &batch.cond).iter().all(|&x| x == 0.0));
    }

    /// d loss / d x_t of a pass agrees with central differences of `velocity` for both kinds of
    /// output, the data prediction's direct dependence on x_t included (t = 0.02 is below T_MIN).
    #[test]
    fn the_x_t_gradient_matches_finite_differences() {
        for prediction in [Prediction::Velocity, Prediction::Data] {
            let mut model = tiny_sr_model(3);
            model.config.prediction = prediction;
            let batch = encode_samples(&B, &model, &samples(2)).unwrap();
            let t = [0.7f32, 0.02];
            let x_t = gaussian_noise(batch.x0.len(), 4);
            let weights = gaussian_noise(batch.x0.len(), 5);
            let loss = |x: &[f32]| -> f64 {
                let v = velocity(&B, &model, batch.latent, x, &batch.cond, &t).unwrap();
                v.iter().zip(&weights).map(|(&v, &w)| v as f64 * w as f64).sum()
            };
            let pass = forward_train(&B, &model, batch.latent, &x_t, &batch.cond, &t).unwrap();
            let grads = pass.backward(&B, &model, &weights).unwrap();
            let h = 1e-2f32;
            let half = x_t.len() / 2;
            for i in [0, 17, half + 5, x_t.len() - 1] {
                let (mut up, mut down) = (x_t.clone(), x_t.clone());
                up[i] += h;
                down[i] -= h;
                let fd = (loss(&up) - loss(&down)) / (2.0 * h as f64);
                let got = grads.x_t[i] as f64;
                assert!((got - fd).abs() < 2e-2 * fd.abs().max(1.0), "{prediction:?} x_t[{i}]: {got} vs {fd}");
            }
        }
    }
}
