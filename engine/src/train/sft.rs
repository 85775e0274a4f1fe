//! The SFT stage (design.md section 5): flow matching of the HQ latent conditioned on its LQ.
//!
//! A micro-batch: encode the samples as the upscaler does; draw t (logit-normal) and eps from the
//! run seed and the draw index; build `x_t = (1 - t) x0 + t eps` and `u = eps - x0`; run the
//! training forward on `x_t` concatenated with the LQ latent; take the loss `mean_b E(v - u)`
//! and its gradient on the latent grid; run the backward.

use super::batch::{draw_noise, encode_samples, forward_train, Batch};
use super::data::Sample;
use super::loss::{flow_target, sft_loss};
use super::params::Trainable;
use super::run::{MicroStep, StageStep, StepContext};
use super::sobolev::{Grid as FieldGrid, Sobolev};
use crate::backend::backward::BackwardOps;
use crate::sr::model_dir::{AeConfig, SrModel};
use anyhow::Result;

/// The loss operator of a model's latent grid: on the image grid for a pixel-shuffle
/// autoencoder (design.md section 6), on the latent grid otherwise. `s = 0` is the MSE.
pub fn loss_operator(model_ae: &AeConfig, latent: FieldGrid, s: f64) -> Result<Sobolev> {
    match model_ae {
        AeConfig::PixelShuffle { factor } => Sobolev::for_pixel_shuffle(latent, *factor, s),
        AeConfig::Flux { .. } => Sobolev::new(latent, s),
    }
}

/// `--stage sft`.
pub struct Sft {
    pub op: Sobolev,
}

impl<B: BackwardOps + 'static> StageStep<B> for Sft {
    fn micro_step(&mut self, cx: &mut StepContext<B>, samples: &[Sample]) -> Result<MicroStep> {
        let batch = encode_samples(cx.b, &cx.models.sr, samples)?;
        let (t, eps) = draw_noise(&cx.times, batch.items, batch.x0.len(), cx.run_seed, cx.draw);
        sft_micro_step(cx.b, &cx.models.sr, cx.trainable, &self.op, &batch, &t, &eps)
    }
}

/// The SFT loss of `batch` at times `t` and noise `eps`, and its gradients.
pub fn sft_micro_step<B: BackwardOps + 'static>(
    b: &B,
    model: &SrModel<B>,
    trainable: &dyn Trainable<B>,
    op: &Sobolev,
    batch: &Batch,
    t: &[f32],
    eps: &[f32],
) -> Result<MicroStep> {
    let target = flow_target(&batch.x0, eps, t)?;
    let pass = forward_train(b, model, batch.latent, &target.x_t, &batch.cond, t)?;
    let loss = sft_loss(op, &batch.latent.to_grid(&pass.velocity)?, &batch.latent.to_grid(&target.velocity)?)?;
    let grads = pass.backward(b, model, &batch.latent.to_tokens(&loss.grad)?)?;
    Ok(MicroStep { loss: loss.loss, grads: trainable.gradients(b, &grads.model)?, metrics: Vec::new() })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ae::PixelShuffle;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Backend;
    use crate::model::flux::scalars;
    use crate::model::weights::WeightLoader;
    use crate::model::{Flux, FluxParams};
    use crate::sr::model_dir::{zero_text, ConditioningMode, FlowData, Prediction, SrConfig};
    use crate::sr::resample::resize;
    use crate::train::adamw::{AdamW, AdamWConfig};
    use crate::train::batch::{conditioning, model_input};
    use crate::train::loss::LogitNormal;
    use crate::train::params::LoraParams;
    use loaders::image::Image;
    use loaders::HostTensor;

    pub(crate) const B: CpuBackend = CpuBackend;

    /// A flux-tiny x4 model with a pixel-shuffle(2) autoencoder and random weights.
    pub(crate) fn tiny_sr_model(seed: u64) -> SrModel<CpuBackend> {
        let latent = 12;
        let transformer = FluxParams { in_channels: 8 * latent, out_channels: 4 * latent, ..FluxParams::preset("flux-tiny").unwrap() };
        let config = SrConfig {
            scale: 4,
            conditioning: ConditioningMode::Concat,
            flow: FlowData::Latent,
            prediction: Prediction::Velocity,
            autoencoder: AeConfig::PixelShuffle { factor: 2 },
            transformer,
            steps: 4,
            average: 1,
            guidance: 3.5,
            text_tokens: 1,
        };
        config.validate().unwrap();
        let mut w = WeightLoader::random(&B, seed);
        let flux = Flux::build(&config.transformer, &mut w).unwrap();
        w.finish().unwrap();
        let (txt, y) = zero_text(&config);
        SrModel { config, flux, ae: Box::new(PixelShuffle::new(2)), ae_tiling: Default::default(), txt, y }
    }

    /// Smooth 32x32 test images and their 8x8 LQ by area averaging.
    pub(crate) fn samples(count: usize) -> Vec<Sample> {
        (0..count)
            .map(|k| {
                let f = |x: usize, y: usize, c: usize| {
                    let (x, y) = (x as f32 / 32.0, y as f32 / 32.0);
                    0.5 + 0.4 * ((3.0 + k as f32) * x + 2.0 * y + c as f32).sin() * (2.0 * y - x * k as f32).cos()
                };
                let hq: Vec<f32> = (0..32 * 32 * 3).map(|i| f((i / 3) % 32, i / 96, i % 3)).collect();
                let hq = Image::new(32, 32, 3, hq);
                let lq = resize(&hq, 8, 8);
                Sample { hq, lq, baseline: None }
            })
            .collect()
    }

    /// One optimiser step from a micro-step's gradients, the model refreshed.
    pub(crate) fn apply(model: &mut SrModel<CpuBackend>, params: &mut LoraParams, optimizer: &mut AdamW, micro: &MicroStep) {
        optimizer.step(&mut params.tensors.values, &micro.grads).unwrap();
        Trainable::<CpuBackend>::install(params, &B, &mut model.flux).unwrap();
    }

    #[test]
    fn the_first_loss_is_the_base_models_velocity_mse_and_training_lowers_it() {
        let mut model = tiny_sr_model(5);
        let batch = encode_samples(&B, &model, &samples(2)).unwrap();
        assert_eq!((batch.items, batch.latent.tokens(), batch.latent.features()), (2, 64, 48));
        let op = loss_operator(&model.config.autoencoder, batch.latent.grid(), 0.0).unwrap();

        // The base model's velocity error, by the inference forward and a plain mean of squares.
        let (t, eps) = draw_noise(&LogitNormal::default(), 2, batch.x0.len(), 9, 0);
        let x_t: Vec<f32> = (0..batch.x0.len())
            .map(|i| {
                let ti = t[i / (batch.x0.len() / 2)];
                (1.0 - ti) * batch.x0[i] + ti * eps[i]
            })
            .collect();
        let img = B.input(&HostTensor::from_f32(vec![2, 64, 96], model_input(&x_t, &batch.cond, 48))).unwrap();
        let c = conditioning(&B, &model, 2, batch.latent).unwrap();
        let v = model.flux.forward(&B, &img, &scalars(&B, &HostTensor::from_f32(vec![2], t)).unwrap(), &c).unwrap();
        let v = B.download(&v).unwrap().to_f32();
        let mse = v.iter().zip(&eps).zip(&batch.x0).map(|((&v, &e), &x)| ((v - (e - x)) as f64).powi(2)).sum::<f64>() / v.len() as f64;

        let mut params = LoraParams::new(&mut model.flux, 4, 1).unwrap();
        Trainable::<CpuBackend>::install(&params, &B, &mut model.flux).unwrap();
        let mut optimizer = AdamW::new(AdamWConfig { lr: 1e-2, warmup_steps: 0, ..AdamWConfig::default() });
        let mut losses = Vec::new();
        for step in 0..40 {
            let (t, eps) = draw_noise(&LogitNormal::default(), 2, batch.x0.len(), 9, step);
            let micro = sft_micro_step(&B, &model, &params, &op, &batch, &t, &eps).unwrap();
            losses.push(micro.loss);
            apply(&mut model, &mut params, &mut optimizer, &micro);
        }
        assert!((losses[0] - mse).abs() <= 1e-5 * mse, "first loss {} vs the base model's MSE {mse}", losses[0]);
        let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
        let (first, last) = (mean(&losses[..5]), mean(&losses[35..]));
        assert!(last < 0.6 * first, "loss {first} -> {last}: {losses:?}");
    }
}
