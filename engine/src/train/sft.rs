//! The SFT stage (design.md section 5): flow matching of the HQ latent conditioned on its LQ.
//!
//! A micro-batch: encode the samples as the upscaler does; draw t (logit-normal) and eps from the
//! run seed and the draw index; build `x_t = (1 - t) x0 + t eps` and `u = eps - x0`; run the
//! training forward on `x_t` packed beside the LQ latent; take the loss `mean_b E(v - u)` and its
//! gradient on the latent grid; run the backward. All of it on the device.

use super::batch::{draw_noise, encode_samples, Batch};
use super::data::Sample;
use super::stage::{MicroStep, StageStep, StepContext};
use crate::backend::sobolev::{Grid as FieldGrid, Sobolev};
use crate::backend::training::TrainingOps;
use crate::sr::model_dir::AeConfig;
use crate::tensor::Tensor;
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

impl<B: TrainingOps + 'static> StageStep<B> for Sft {
    fn micro_step(&mut self, cx: &StepContext<B>, samples: &[Sample]) -> Result<MicroStep<B>> {
        let batch = encode_samples(cx.b, cx.model, samples)?;
        let (t, eps) = draw_noise(cx.b, &cx.times, batch.latent, cx.share, cx.run_seed, cx.draw)?;
        sft_micro_step(cx, &self.op, &batch, &t, &eps)
    }
}

/// The SFT loss of `batch` at times `t` and noise `eps`, and the trained tensors' gradients.
pub fn sft_micro_step<B: TrainingOps + 'static>(
    cx: &StepContext<B>,
    op: &Sobolev,
    batch: &Batch<B>,
    t: &[f32],
    eps: &Tensor<B>,
) -> Result<MicroStep<B>> {
    let b = cx.b;
    let target = b.flow_target(&batch.x0, eps, t)?;
    let pass = cx.forward_train(cx.trained.trainable(), batch.latent, &target.x_t, &batch.cond, t)?;
    let loss = b.sft_loss(op, &pass.velocity, &target.velocity)?;
    let grads = pass.backward(cx, &loss.grad)?;
    Ok(MicroStep { loss: loss.loss, grads: cx.trained.gradients(grads.model)?, metrics: Vec::new() })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ae::PixelShuffle;
    use crate::backend::adamw::{AdamW, AdamWConfig};
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Backend;
    use crate::model::flux::scalars;
    use crate::model::weights::WeightLoader;
    use crate::model::{Flux, FluxParams, Trainable};
    use crate::sr::conditioning::Conditionings;
    use crate::sr::model_dir::{zero_text, ConditioningMode, FlowData, Prediction, SrConfig, SrModel};
    use crate::sr::packing::{pack, unpack};
    use crate::sr::resample::resize;
    use crate::train::batch::Share;
    use crate::train::optimizer::Optimizer;
    use crate::train::params::{LoraParams, Trained};
    use crate::train::times::LogitNormal;
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
            detail: 1.0,
            guidance: 3.5,
            text_tokens: 1,
            base: None,
            adapters: Vec::new(),
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

    /// The trained set of a test: nothing trained (the model as loaded).
    pub(crate) struct Untrained(crate::train::params::Masters<CpuBackend>);

    impl Trained<CpuBackend> for Untrained {
        fn masters(&self) -> &crate::train::params::Masters<CpuBackend> {
            &self.0
        }
        fn masters_mut(&mut self) -> &mut crate::train::params::Masters<CpuBackend> {
            &mut self.0
        }
        fn refresh(&mut self, _: &CpuBackend, _: &mut Flux<CpuBackend>) -> Result<()> {
            Ok(())
        }
        fn trainable(&self) -> Trainable<'_, CpuBackend> {
            Trainable::Nothing
        }
        fn gradients(&self, _: crate::model::backward::FluxGrads<CpuBackend>) -> Result<Vec<Tensor<CpuBackend>>> {
            Ok(Vec::new())
        }
        fn export(&self, _: &CpuBackend, out: &std::path::Path) -> Result<std::path::PathBuf> {
            Ok(out.to_path_buf())
        }
    }

    /// What a step context of a test borrows beside the model.
    pub(crate) struct Fixture {
        conditionings: Conditionings<CpuBackend>,
        untrained: Untrained,
    }

    impl Fixture {
        pub(crate) fn new() -> Self {
            Fixture {
                conditionings: Conditionings::default(),
                untrained: Untrained(crate::train::params::Masters { names: vec![], tensors: vec![] }),
            }
        }

        /// A step context over `model` that trains `trained` (nothing when None), at draw 0 of
        /// seed 9, of one process drawing micro-batches of two samples.
        pub(crate) fn context<'a>(
            &'a self,
            model: &'a SrModel<CpuBackend>,
            trained: Option<&'a dyn Trained<CpuBackend>>,
        ) -> StepContext<'a, CpuBackend> {
            let trained = trained.unwrap_or(&self.untrained);
            let (run_seed, draw, share, times) = (9, 0, Share::whole(2), LogitNormal::default());
            StepContext { b: &B, model, conditionings: &self.conditionings, trained, adversary: None, run_seed, draw, share, times }
        }
    }

    #[test]
    fn the_first_loss_is_the_base_models_velocity_mse_and_training_lowers_it() {
        let mut model = tiny_sr_model(5);
        let batch = encode_samples(&B, &model, &samples(2)).unwrap();
        assert_eq!((batch.items(), batch.latent.tokens(), batch.latent.features()), (2, 64, 48));
        let op = loss_operator(&model.config.autoencoder, batch.latent.grid(), 0.0).unwrap();
        let x0 = B.download(&batch.x0).unwrap();
        let cond = B.download(&batch.cond).unwrap().to_f32();

        // The base model's velocity error, by the inference forward on host-packed inputs and a
        // plain mean of squares.
        let (t, eps) = draw_noise(&B, &LogitNormal::default(), batch.latent, Share::whole(2), 9, 0).unwrap();
        let eps_host = B.download(&eps).unwrap();
        let per_item = x0.len() / 2;
        let x_t: Vec<f32> =
            (0..x0.len()).map(|i| (1.0 - t[i / per_item]) * x0.to_f32()[i] + t[i / per_item] * eps_host.to_f32()[i]).collect();
        let x_t_tokens = pack(&HostTensor::from_f32(x0.shape.clone(), x_t)).unwrap().to_f32();
        let input: Vec<f32> = x_t_tokens.chunks(48).zip(cond.chunks(48)).flat_map(|(x, c)| x.iter().chain(c).copied()).collect();
        let img = B.input(&HostTensor::from_f32(vec![2, 64, 96], input)).unwrap();
        let c = Conditionings::default().get(&B, &model, 2, batch.latent.token_grid()).unwrap();
        let v =
            model.flux.forward(&B, &img, &scalars(&B, &HostTensor::from_f32(vec![2], t.clone())).unwrap(), &c, Trainable::Nothing).unwrap();
        let v = unpack(&B.download(&v).unwrap(), 16, 16).unwrap().to_f32();
        let u: Vec<f32> = eps_host.to_f32().iter().zip(x0.to_f32()).map(|(e, x)| e - x).collect();
        let mse = v.iter().zip(&u).map(|(&v, &u)| ((v - u) as f64).powi(2)).sum::<f64>() / v.len() as f64;

        let set = LoraParams::init(&B, &model.flux, 4, 1, &Default::default()).unwrap();
        let mut params = LoraParams::new(&B, &mut model.flux, &set).unwrap();
        let mut optimizer =
            Optimizer::new(&B, params.masters(), &AdamW::new(AdamWConfig { lr: 1e-2, warmup_steps: 0, ..AdamWConfig::default() })).unwrap();
        let fixture = Fixture::new();
        let mut losses = Vec::new();
        for step in 0..40 {
            let micro = {
                let cx = fixture.context(&model, Some(&params));
                let (t, eps) = draw_noise(&B, &LogitNormal::default(), batch.latent, Share::whole(2), 9, step).unwrap();
                sft_micro_step(&cx, &op, &batch, &t, &eps).unwrap()
            };
            losses.push(micro.loss);
            optimizer.step(&B, params.masters_mut(), &micro.grads).unwrap();
            params.refresh(&B, &mut model.flux).unwrap();
        }
        assert!((losses[0] - mse).abs() <= 1e-5 * mse, "first loss {} vs the base model's MSE {mse}", losses[0]);
        let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
        let (first, last) = (mean(&losses[..5]), mean(&losses[35..]));
        assert!(last < 0.6 * first, "loss {first} -> {last}: {losses:?}");
    }
}
