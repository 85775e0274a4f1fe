//! A micro-batch as the flow sees it, on the device, and the passes through the model that the
//! stages are made of.
//!
//! Layouts: the model reads and writes packed tokens `[n, L, F]` (FLUX's 2x2 packing of the
//! latent grid) in the activation dtype; the flow's arithmetic and the losses run on the latent
//! grid `[n, C, H, W]` in f32 (their operator maps a pixel-shuffle latent to the image grid
//! itself). A pass packs x_t beside the condition on the way in and unpacks the output on the way
//! out, so everything the stages touch is a grid field.
//!
//! Seeds: every random draw of micro-batch `draw` (counted over the run, `step * grad_accum +
//! micro`) comes from [`step_seed`]`(run seed, draw, stream)`, so the state of a run is its step.
//! The draws are made on the host (ChaCha8, the same on every machine) and go up with the batch.

use super::data::Sample;
use super::stage::StepContext;
use super::times::LogitNormal;
use crate::backend::sobolev::Grid as FieldGrid;
use crate::backend::training::TrainingOps;
use crate::backend::Backend;
use crate::model::backward::{Checkpointing, FluxGrads};
use crate::model::flux::{scalars, FluxActs};
use crate::model::{Conditioning, Trainable};
use crate::sampler::gaussian_noise;
use crate::sr::model_dir::{FlowData, Prediction, SrModel};
use crate::sr::packing::{pack_tensor, unpack_tensor};
use crate::sr::resample::resize;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use loaders::image::Image;
use loaders::{DType, HostTensor};
use std::rc::Rc;

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

/// The latent grid of one item `[C, H, W]`, and its packed tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latent(pub FieldGrid);

impl Latent {
    pub fn grid(&self) -> FieldGrid {
        self.0
    }

    /// The packed tokens' grid, (rows, columns).
    pub fn token_grid(&self) -> (usize, usize) {
        (self.0.height / 2, self.0.width / 2)
    }

    pub fn tokens(&self) -> usize {
        (self.0.height / 2) * (self.0.width / 2)
    }

    pub fn features(&self) -> usize {
        4 * self.0.channels
    }

    /// The shape of `items` fields on this grid.
    pub fn shape(&self, items: usize) -> Vec<usize> {
        vec![items, self.0.channels, self.0.height, self.0.width]
    }
}

/// The part of a micro-batch's draws that one rank takes: items `first..first + count` of the
/// `global` items that one process would draw (rank r of N ranks with a batch of b each: `r b ..
/// (r + 1) b` of `N b`). Every per-item draw is a function of the item's global index, so N ranks
/// train on exactly the samples, t and noise of one process with the N-times batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    pub first: usize,
    pub count: usize,
    pub global: usize,
}

impl Share {
    /// A whole draw of `count` items: one process.
    pub fn whole(count: usize) -> Self {
        Share { first: 0, count, global: count }
    }

    /// Rank `rank`'s share of `ranks` ranks with `batch` items each.
    pub fn of_rank(rank: usize, ranks: usize, batch: usize) -> Self {
        Share { first: rank * batch, count: batch, global: ranks * batch }
    }

    pub fn range(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.count
    }
}

/// The flow's noise draws of a share of one micro-batch: t per item (from `times`, drawn for the
/// whole micro-batch) and eps on each item's field of `latent` (each from its own seed, so that
/// a share costs only its own items), uploaded as an f32 field.
pub fn draw_noise<B: Backend>(
    b: &B,
    times: &LogitNormal,
    latent: Latent,
    share: Share,
    run_seed: u64,
    draw: u64,
) -> Result<(Vec<f32>, Tensor<B>)> {
    let t = times.sample(share.global, step_seed(run_seed, draw, stream::TIME))[share.range()].to_vec();
    let eps = item_noise(latent, share, step_seed(run_seed, draw, stream::NOISE));
    Ok((t, b.upload(&HostTensor::from_f32(latent.shape(share.count), eps))?))
}

/// Standard normal fields on `latent` for the items of `share`, item i's from `(seed, i)`.
pub fn item_noise(latent: Latent, share: Share, seed: u64) -> Vec<f32> {
    share.range().flat_map(|i| gaussian_noise(latent.grid().elements(), step_seed(seed, i as u64, 0))).collect()
}

/// A micro-batch of samples on the device.
pub struct Batch<B: Backend> {
    /// The HQ images as the flow's data (`x0`, `SrConfig::flow` of their latents; the winners of a
    /// preference pair), on the latent grid, f32.
    pub x0: Tensor<B>,
    /// The condition: the encoded bicubic upsample of each LQ, packed `[n, L, F]` in the
    /// activation dtype, as the model reads it beside x_t.
    pub cond: Tensor<B>,
    /// The condition's flow data (`SrConfig::flow` of the condition itself) on the latent grid,
    /// f32: the bicubic negatives.
    pub cond_flow: Tensor<B>,
    /// The baseline outputs as the flow's data, when the samples have them.
    pub baseline: Option<Tensor<B>>,
    pub latent: Latent,
}

impl<B: Backend> Batch<B> {
    pub fn items(&self) -> usize {
        self.x0.dim(0)
    }
}

/// Encodes samples as the upscaler does: the LQ upsampled bicubically to the HQ's size, all
/// images in [-1, 1], through the autoencoder; the HQ's and the baselines' latents as the flow's
/// data under the condition. All HQ crops must share one size, a multiple of the model's token
/// side.
pub fn encode_samples<B: TrainingOps + 'static>(b: &B, model: &SrModel<B>, samples: &[Sample]) -> Result<Batch<B>> {
    ensure!(!samples.is_empty(), "encode_samples: no samples");
    let (w, h) = (samples[0].hq.width, samples[0].hq.height);
    let upsampled: Vec<Image> = samples.iter().map(|s| resize(&s.lq.to_rgb(), w, h)).collect();
    let cond = encode_images(b, model, &upsampled.iter().collect::<Vec<_>>())?;
    let latent = Latent(FieldGrid::new(cond.dim(1), cond.dim(2), cond.dim(3)));
    let cond_grid = b.cast(&cond, DType::F32)?;
    let flow = &model.config.flow;
    let as_flow = |images: &[&Image]| -> Result<Tensor<B>> {
        let latent = b.cast(&encode_images(b, model, images)?, DType::F32)?;
        flow_data(b, flow, &latent, &cond_grid)
    };
    let x0 = as_flow(&samples.iter().map(|s| &s.hq).collect::<Vec<_>>())?;
    let baseline = match samples.iter().map(|s| s.baseline.as_ref()).collect::<Option<Vec<_>>>() {
        Some(images) => Some(as_flow(&images)?),
        None => None,
    };
    let cond_flow = flow_data(b, flow, &cond_grid, &cond_grid)?;
    Ok(Batch { x0, cond: pack_tensor(b, &cond)?, cond_flow, baseline, latent })
}

/// `FlowData::to_flow` on the device (f32 fields): the latent itself, or `scale * (latent - cond)`.
fn flow_data<B: TrainingOps>(b: &B, flow: &FlowData, latent: &Tensor<B>, cond: &Tensor<B>) -> Result<Tensor<B>> {
    match *flow {
        FlowData::Latent => b.cast(latent, DType::F32),
        FlowData::Residual { scale } => b.scale_items(&[scale], &b.axpby(&[1.0], latent, &[-1.0], cond)?),
    }
}

/// Images of one size through the autoencoder: the latents `[n, C, H, W]` in the activation dtype.
pub fn encode_images<B: Backend + 'static>(b: &B, model: &SrModel<B>, images: &[&Image]) -> Result<Tensor<B>> {
    let (w, h) = (images[0].width, images[0].height);
    let unit = model.token_pixels();
    ensure!(w % unit == 0 && h % unit == 0, "training crops are {w}x{h}, but the model needs multiples of {unit} pixels");
    let mut pixels = Vec::with_capacity(images.len() * 3 * w * h);
    for img in images {
        ensure!((img.width, img.height) == (w, h), "training crops differ in size: {w}x{h} and {}x{}", img.width, img.height);
        pixels.extend(planar(&img.to_rgb()));
    }
    model.ae.encode(b, &b.input(&HostTensor::from_f32(vec![images.len(), 3, h, w], pixels))?)
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

/// `Prediction::T_MIN`'s divisor of each item's velocity, as its reciprocal.
fn inverse_divisors(t: &[f32]) -> Vec<f32> {
    t.iter().map(|&t| 1.0 / t.max(Prediction::T_MIN)).collect()
}

/// The model's inputs for `x_t` (on the grid) at times `t` under the packed condition `cond`.
struct Inputs<B: Backend> {
    img: Tensor<B>,
    timesteps: Tensor<B>,
    c: Rc<Conditioning<B>>,
    t: Vec<f32>,
}

impl<'a, B: TrainingOps + 'static> StepContext<'a, B> {
    fn inputs(&self, latent: Latent, x_t: &Tensor<B>, cond: &Tensor<B>, t: &[f32]) -> Result<Inputs<B>> {
        let b = self.b;
        let items = t.len();
        ensure!(
            x_t.shape() == latent.shape(items).as_slice() && cond.shape() == [items, latent.tokens(), latent.features()],
            "model pass: x_t {:?} and condition {:?} for {items} items of {}",
            x_t.shape(),
            cond.shape(),
            latent.grid()
        );
        let tokens = pack_tensor(b, &b.cast(x_t, b.activation_dtype())?)?;
        Ok(Inputs {
            img: b.concat(&[&tokens, cond], 2)?,
            timesteps: scalars(b, &HostTensor::from_f32(vec![items], t.to_vec()))?,
            c: self.conditionings.get(b, self.model, items, latent.token_grid())?,
            t: t.to_vec(),
        })
    }

    /// The transformer's output as the flow's velocity on the grid, f32.
    fn velocity_of(&self, latent: Latent, output: &Tensor<B>, x_t: &Tensor<B>, t: &[f32]) -> Result<Tensor<B>> {
        let b = self.b;
        let grid = latent.grid();
        let output = b.cast(&unpack_tensor(b, output, grid.height, grid.width)?, DType::F32)?;
        match self.model.config.prediction {
            Prediction::Velocity => Ok(output),
            // (x_t - x0) / max(t, T_MIN).
            Prediction::Data => b.scale_items(&inverse_divisors(t), &b.axpby(&[1.0], x_t, &[-1.0], &output)?),
        }
    }

    /// The model's velocity at `x_t` (on the grid, f32) with the deltas of `tr`, without keeping
    /// anything for a backward.
    pub fn velocity(&self, tr: Trainable<B>, latent: Latent, x_t: &Tensor<B>, cond: &Tensor<B>, t: &[f32]) -> Result<Tensor<B>> {
        let i = self.inputs(latent, x_t, cond, t)?;
        let output = self.model.flux.forward(self.b, &i.img, &i.timesteps, &i.c, tr)?;
        self.velocity_of(latent, &output, x_t, t)
    }

    /// [`StepContext::velocity`], keeping what the backward of `tr` needs.
    pub fn forward_train(
        &self,
        tr: Trainable<'a, B>,
        latent: Latent,
        x_t: &Tensor<B>,
        cond: &Tensor<B>,
        t: &[f32],
    ) -> Result<TrainPass<'a, B>> {
        let inputs = self.inputs(latent, x_t, cond, t)?;
        let (output, acts) = self.model.flux.forward_train(self.b, &inputs.img, &inputs.timesteps, &inputs.c, tr, Checkpointing::Off)?;
        let velocity = self.velocity_of(latent, &output, x_t, t)?;
        Ok(TrainPass { tr, inputs, acts, latent, velocity })
    }
}

/// A forward pass kept for its backward.
pub struct TrainPass<'a, B: TrainingOps> {
    tr: Trainable<'a, B>,
    inputs: Inputs<B>,
    acts: FluxActs<B>,
    latent: Latent,
    /// The velocity on the grid, f32.
    pub velocity: Tensor<B>,
}

/// The gradients of one backward, as the trainer needs them.
pub struct PassGrads<B: Backend> {
    /// Everything the model's backward returns (the trained tensors' gradients among them).
    pub model: FluxGrads<B>,
    /// d loss / d x_t on the grid, f32: through the model's input (the first half of each input
    /// token's features) and, for a data prediction, the velocity's direct dependence on x_t.
    pub x_t: Tensor<B>,
}

impl<B: TrainingOps + 'static> TrainPass<'_, B> {
    /// The backward of a loss whose gradient wrt the velocity is `g_velocity` (on the grid, f32).
    pub fn backward(self, cx: &StepContext<B>, g_velocity: &Tensor<B>) -> Result<PassGrads<B>> {
        let b = cx.b;
        ensure!(
            g_velocity.shape() == self.velocity.shape(),
            "backward: gradient {:?} for a velocity {:?}",
            g_velocity.shape(),
            self.velocity.shape()
        );
        let (g_output, g_x_direct) = match cx.model.config.prediction {
            Prediction::Velocity => (None, None),
            // v = (x_t - x0) / d: g_x0 = -g / d, and x_t's direct share is g / d.
            Prediction::Data => {
                let g_x = b.scale_items(&inverse_divisors(&self.inputs.t), g_velocity)?;
                (Some(b.scale_items(&[-1.0], &g_x)?), Some(g_x))
            }
        };
        let g_output = pack_tensor(b, &b.cast(g_output.as_ref().unwrap_or(g_velocity), b.activation_dtype())?)?;
        let model = cx.model.flux.backward(b, &self.inputs.img, &self.inputs.c, self.tr, self.acts, &g_output)?;
        let grid = self.latent.grid();
        let g_tokens = b.narrow(&model.img, 2, 0, self.latent.features())?;
        let x_t = b.cast(&unpack_tensor(b, &g_tokens, grid.height, grid.width)?, DType::F32)?;
        let x_t = match g_x_direct {
            Some(direct) => b.axpby(&[1.0], &x_t, &[1.0], &direct)?,
            None => x_t,
        };
        Ok(PassGrads { model, x_t })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sr::model_dir::{FlowData, Prediction};
    use crate::train::sft::tests::{samples, tiny_sr_model, Fixture, B};

    fn values(t: &Tensor<crate::CpuBackend>) -> Vec<f32> {
        B.download(t).unwrap().to_f32()
    }

    /// A rank's t and eps are its slice of one process's draws of the whole micro-batch.
    #[test]
    fn a_share_of_the_noise_is_its_slice_of_the_whole() {
        let latent = Latent(FieldGrid::new(3, 4, 4));
        let n = latent.grid().elements();
        let times = LogitNormal { one: 0.3, ..LogitNormal::default() };
        let (t, eps) = draw_noise(&B, &times, latent, Share::whole(6), 5, 2).unwrap();
        let eps = values(&eps);
        for rank in 0..3 {
            let (t_share, eps_share) = draw_noise(&B, &times, latent, Share::of_rank(rank, 3, 2), 5, 2).unwrap();
            assert_eq!(t_share, t[2 * rank..2 * rank + 2], "rank {rank}");
            assert_eq!(values(&eps_share), eps[2 * rank * n..(2 * rank + 2) * n], "rank {rank}");
        }
        assert_ne!(eps[..n], eps[n..2 * n]);
    }

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
        let got: f64 = values(&batch.x0).iter().map(|&x| (x as f64).powi(2)).sum();
        assert!(want > 1.0 && (got - want).abs() < 1e-4 * want, "energy {got}, expected {want}");
        // The condition itself is the flow's zero.
        assert!(values(&batch.cond_flow).iter().all(|&x| x == 0.0));
    }

    /// d loss / d x_t of a pass agrees with central differences of `velocity` for both kinds of
    /// output, the data prediction's direct dependence on x_t included (t = 0.02 is below T_MIN).
    #[test]
    fn the_x_t_gradient_matches_finite_differences() {
        for prediction in [Prediction::Velocity, Prediction::Data] {
            let mut model = tiny_sr_model(3);
            model.config.prediction = prediction;
            let batch = encode_samples(&B, &model, &samples(2)).unwrap();
            let fixture = Fixture::new();
            let cx = fixture.context(&model, None);
            let t = [0.7f32, 0.02];
            let shape = batch.latent.shape(2);
            let n = batch.latent.grid().elements() * 2;
            let field = |v: Vec<f32>| B.upload(&HostTensor::from_f32(shape.clone(), v)).unwrap();
            let x_t = gaussian_noise(n, 4);
            let weights = gaussian_noise(n, 5);
            let loss = |x: &[f32]| -> f64 {
                let v = values(&cx.velocity(Trainable::Nothing, batch.latent, &field(x.to_vec()), &batch.cond, &t).unwrap());
                v.iter().zip(&weights).map(|(&v, &w)| v as f64 * w as f64).sum()
            };
            let pass = cx.forward_train(Trainable::Nothing, batch.latent, &field(x_t.clone()), &batch.cond, &t).unwrap();
            let grads = values(&pass.backward(&cx, &field(weights.clone())).unwrap().x_t);
            let h = 1e-2f32;
            for i in [0, 17, n / 2 + 5, n - 1] {
                let (mut up, mut down) = (x_t.clone(), x_t.clone());
                up[i] += h;
                down[i] -= h;
                let fd = (loss(&up) - loss(&down)) / (2.0 * h as f64);
                let got = grads[i] as f64;
                assert!((got - fd).abs() < 2e-2 * fd.abs().max(1.0), "{prediction:?} x_t[{i}]: {got} vs {fd}");
            }
        }
    }
}
