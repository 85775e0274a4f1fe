//! One supervised fine-tuning step (design.md section 5): flow matching of the LoRA-adapted
//! transformer on (HQ latent, LQ conditioning) pairs, with the Sobolev energy as the loss.
//!
//! The step reads top to bottom: draw t (logit-normal) and eps (Gaussian) from seeds derived from
//! (run seed, step), so that a run is reproducible and a resumed run needs no RNG state beyond the
//! step; build `x_t = (1 - t) x0 + t eps` and `u = eps - x0`; run the training forward on `x_t`
//! concatenated with the LQ latent; take the loss and its gradient on the latent grid (the
//! operator maps a pixel-shuffle latent to the image grid itself); run the backward; update the
//! f32 master LoRA factors with AdamW and copy them into the model.
//!
//! The adapters are one delta per token-path linear, `down` ~ N(0, 1/in) and `up` = 0, scale 1:
//! the first step's model is the base model.

use super::adamw::{AdamW, StepStats};
use super::loss::{flow_target, sft_loss, LogitNormal};
use super::sobolev::{Grid as FieldGrid, Sobolev};
use crate::backend::backward::BackwardOps;
use crate::model::backward::Checkpointing;
use crate::model::flux::scalars;
use crate::model::layers::LoraDelta;
use crate::model::positions::image_ids;
use crate::model::{Conditioning, Flux};
use crate::sampler::gaussian_noise;
use crate::sr::model_dir::{AeConfig, SrModel};
use crate::sr::packing::{pack, unpack};
use crate::sr::resample::resize;
use anyhow::{ensure, Context, Result};
use loaders::image::Image;
use loaders::HostTensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::BTreeMap;

/// A batch of training pairs as the transformer sees them: packed `[B, L, F]` latents.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// The HQ latents (the flow's data end, `x0`).
    pub x0: Vec<f32>,
    /// The encoded bicubic upsample of each LQ, on the same tokens.
    pub cond: Vec<f32>,
    pub items: usize,
    /// The latent grid `[channels, height, width]` before packing.
    pub latent: FieldGrid,
}

impl Batch {
    pub fn tokens(&self) -> usize {
        (self.latent.height / 2) * (self.latent.width / 2)
    }

    pub fn features(&self) -> usize {
        4 * self.latent.channels
    }
}

/// Encodes (HQ, LQ) pairs as the upscaler does: the LQ upsampled bicubically to the HQ's size,
/// both in [-1, 1], through the autoencoder, packed 2x2. All HQ images must share one size, a
/// multiple of the model's token side.
pub fn encode_pairs<B: BackwardOps + 'static>(b: &B, model: &SrModel<B>, pairs: &[(Image, Image)]) -> Result<Batch> {
    ensure!(!pairs.is_empty(), "encode_pairs: no images");
    let (w, h) = (pairs[0].0.width, pairs[0].0.height);
    let unit = model.token_pixels();
    ensure!(w % unit == 0 && h % unit == 0, "training crops are {w}x{h}, but the model needs multiples of {unit} pixels");
    let mut hq_pixels = Vec::new();
    let mut lq_pixels = Vec::new();
    for (hq, lq) in pairs {
        ensure!((hq.width, hq.height) == (w, h), "training crops differ in size: {w}x{h} and {}x{}", hq.width, hq.height);
        hq_pixels.extend(planar(&hq.to_rgb()));
        lq_pixels.extend(planar(&resize(&lq.to_rgb(), w, h)));
    }
    let encode = |pixels: Vec<f32>| -> Result<HostTensor> {
        let image = b.input(&HostTensor::from_f32(vec![pairs.len(), 3, h, w], pixels))?;
        b.download(&model.ae.encode(b, &image)?)
    };
    let (hq_latent, lq_latent) = (encode(hq_pixels)?, encode(lq_pixels)?);
    let s = &hq_latent.shape;
    Ok(Batch {
        x0: pack(&hq_latent)?.to_f32(),
        cond: pack(&lq_latent)?.to_f32(),
        items: pairs.len(),
        latent: FieldGrid::new(s[1], s[2], s[3]),
    })
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

/// The loss operator of a model's latent grid: on the image grid for a pixel-shuffle
/// autoencoder (design.md section 6), on the latent grid otherwise. `s = 0` is the MSE.
pub fn loss_operator(model_ae: &AeConfig, latent: FieldGrid, s: f64) -> Result<Sobolev> {
    match model_ae {
        AeConfig::PixelShuffle { factor } => Sobolev::for_pixel_shuffle(latent, *factor, s),
        AeConfig::Flux { .. } => Sobolev::new(latent, s),
    }
}

/// The trained LoRA factors: f32 master copies by name (`{target}.lora_down` / `.lora_up`,
/// `target` the BFL path of the linear), their shapes, and the optimiser.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTrainer {
    pub params: BTreeMap<String, Vec<f32>>,
    pub shapes: BTreeMap<String, Vec<usize>>,
    pub optimizer: AdamW,
}

pub fn down_name(target: &str) -> String {
    format!("{target}.lora_down")
}

pub fn up_name(target: &str) -> String {
    format!("{target}.lora_up")
}

impl LoraTrainer {
    /// Fresh adapters of `rank` on every token-path linear of `flux` (none may carry one yet),
    /// `down` from `seed`, `up` zero, and attaches them to the model.
    pub fn attach<B: BackwardOps>(b: &B, flux: &mut Flux<B>, rank: usize, seed: u64, optimizer: AdamW) -> Result<Self> {
        ensure!(rank >= 1, "the LoRA rank must be at least 1");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = BTreeMap::new();
        let mut shapes = BTreeMap::new();
        for (target, lin) in flux.token_path_linears_mut() {
            ensure!(lin.lora.is_empty(), "'{target}' already carries a LoRA: training starts from a base without adapters");
            let (out_f, in_f) = (lin.weight.dim(0), lin.weight.dim(1));
            let std = 1.0 / (in_f as f32).sqrt();
            let down: Vec<f32> = (0..rank * in_f)
                .map(|_| {
                    let z: f32 = StandardNormal.sample(&mut rng);
                    std * z
                })
                .collect();
            shapes.insert(down_name(&target), vec![rank, in_f]);
            shapes.insert(up_name(&target), vec![out_f, rank]);
            params.insert(down_name(&target), down);
            params.insert(up_name(&target), vec![0.0; out_f * rank]);
        }
        let trainer = LoraTrainer { params, shapes, optimizer };
        trainer.attach_to(b, flux)?;
        Ok(trainer)
    }

    /// Sets the model's adapters to the master factors (adding them if absent).
    pub fn attach_to<B: BackwardOps>(&self, b: &B, flux: &mut Flux<B>) -> Result<()> {
        for (target, lin) in flux.token_path_linears_mut() {
            let tensor = |name: String| -> Result<_> {
                let values = self.params.get(&name).with_context(|| format!("no LoRA factor '{name}'"))?;
                b.input(&HostTensor::from_f32(self.shapes[&name].clone(), values.clone()))
            };
            let (down, up) = (tensor(down_name(&target))?, tensor(up_name(&target))?);
            lin.lora = vec![LoraDelta { down, up, up_bias: None, scale: 1.0, offset: 0 }];
        }
        Ok(())
    }
}

/// What one step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SftStepReport {
    pub loss: f64,
    pub stats: StepStats,
}

/// The seed of one random stream of one step: t and eps of step k never depend on how the run
/// got to step k.
pub fn step_seed(run_seed: u64, step: u64, stream: u64) -> u64 {
    // SplitMix64 of the three, so that neighbouring steps get unrelated streams.
    let mut z = run_seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The noise draws of one step: t per item and eps over the batch's latents.
pub fn step_noise(batch: &Batch, run_seed: u64, step: u64) -> (Vec<f32>, Vec<f32>) {
    let t = LogitNormal::default().sample(batch.items, step_seed(run_seed, step, 1));
    let eps = gaussian_noise(batch.x0.len(), step_seed(run_seed, step, 2));
    (t, eps)
}

/// The transformer's conditioning for `items` copies of the model's fixed text on `batch`'s grid.
pub fn conditioning<B: BackwardOps + 'static>(b: &B, model: &SrModel<B>, batch: &Batch) -> Result<Conditioning<B>> {
    let n = batch.items;
    let repeat = |t: &HostTensor| -> HostTensor {
        let mut shape = t.shape.clone();
        shape[0] = n;
        HostTensor::from_f32(shape, t.to_f32().repeat(n))
    };
    let lt = model.txt.shape[1];
    let txt_ids = HostTensor::from_f32(vec![n, lt, 3], vec![0.0; n * lt * 3]);
    let ids = image_ids(batch.latent.height / 2, batch.latent.width / 2).repeat(n);
    let img_ids = HostTensor::from_f32(vec![n, batch.tokens(), 3], ids);
    let guidance = HostTensor::from_f32(vec![n], vec![model.config.guidance; n]);
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

/// One SFT step at step number `step` (counted from 0) of a run seeded with `run_seed`.
pub fn sft_step<B: BackwardOps + 'static>(
    b: &B,
    model: &mut SrModel<B>,
    trainer: &mut LoraTrainer,
    op: &Sobolev,
    batch: &Batch,
    run_seed: u64,
    step: u64,
) -> Result<SftStepReport> {
    let (items, tokens, features) = (batch.items, batch.tokens(), batch.features());
    let (t, eps) = step_noise(batch, run_seed, step);
    let target = flow_target(&batch.x0, &eps, &t)?;

    let shape = vec![items, tokens, 2 * features];
    let img = b.input(&HostTensor::from_f32(shape, model_input(&target.x_t, &batch.cond, features)))?;
    let timesteps = scalars(b, &HostTensor::from_f32(vec![items], t))?;
    let c = conditioning(b, model, batch)?;
    let (v, acts) = model.flux.forward_train(b, &img, &timesteps, &c, Checkpointing::Off)?;

    // The loss lives on the latent grid, the model's output on packed tokens.
    let (h, w) = (batch.latent.height, batch.latent.width);
    let on_grid = |packed: Vec<f32>| unpack(&HostTensor::from_f32(vec![items, tokens, features], packed), h, w).map(|t| t.to_f32());
    let loss = sft_loss(op, &on_grid(b.download(&v)?.to_f32())?, &on_grid(target.velocity)?)?;
    let g_out = pack(&HostTensor::from_f32(vec![items, batch.latent.channels, h, w], loss.grad))?;
    let grads = model.flux.backward(b, &img, &c, acts, &b.input(&g_out)?)?;

    let mut flat = BTreeMap::new();
    for (target, deltas) in &grads.lora {
        let g = deltas.first().with_context(|| format!("no LoRA gradient for '{target}'"))?;
        flat.insert(down_name(target), b.download(&g.down)?.to_f32());
        flat.insert(up_name(target), b.download(&g.up)?.to_f32());
    }
    let stats = trainer.optimizer.step(&mut trainer.params, &flat)?;
    trainer.attach_to(b, &mut model.flux)?;
    Ok(SftStepReport { loss: loss.loss, stats })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ae::PixelShuffle;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Backend;
    use crate::model::weights::WeightLoader;
    use crate::model::FluxParams;
    use crate::sr::model_dir::{zero_text, ConditioningMode, SrConfig};
    use crate::train::adamw::AdamWConfig;

    const B: CpuBackend = CpuBackend;

    /// A flux-tiny x4 model with a pixel-shuffle(2) autoencoder and random weights.
    pub(crate) fn tiny_sr_model(seed: u64) -> SrModel<CpuBackend> {
        let latent = 12;
        let transformer = FluxParams { in_channels: 8 * latent, out_channels: 4 * latent, ..FluxParams::preset("flux-tiny").unwrap() };
        let config = SrConfig {
            scale: 4,
            conditioning: ConditioningMode::Concat,
            autoencoder: AeConfig::PixelShuffle { factor: 2 },
            transformer,
            steps: 4,
            guidance: 3.5,
            text_tokens: 1,
        };
        config.validate().unwrap();
        let mut w = WeightLoader::random(&B, seed);
        let flux = Flux::build(&config.transformer, &mut w).unwrap();
        w.finish().unwrap();
        let (txt, y) = zero_text(&config);
        SrModel { config, flux, ae: Box::new(PixelShuffle::new(2)), txt, y }
    }

    /// Smooth 32x32 test images and their 8x8 LQ by area averaging.
    pub(crate) fn pairs(count: usize) -> Vec<(Image, Image)> {
        (0..count)
            .map(|k| {
                let f = |x: usize, y: usize, c: usize| {
                    let (x, y) = (x as f32 / 32.0, y as f32 / 32.0);
                    0.5 + 0.4 * ((3.0 + k as f32) * x + 2.0 * y + c as f32).sin() * (2.0 * y - x * k as f32).cos()
                };
                let hq: Vec<f32> = (0..32 * 32 * 3).map(|i| f((i / 3) % 32, i / 96, i % 3)).collect();
                let hq = Image::new(32, 32, 3, hq);
                let lq = resize(&hq, 8, 8);
                (hq, lq)
            })
            .collect()
    }

    #[test]
    fn the_first_loss_is_the_base_models_velocity_mse_and_training_lowers_it() {
        let mut model = tiny_sr_model(5);
        let batch = encode_pairs(&B, &model, &pairs(2)).unwrap();
        assert_eq!((batch.items, batch.tokens(), batch.features()), (2, 64, 48));
        let op = loss_operator(&model.config.autoencoder, batch.latent, 0.0).unwrap();

        // The base model's velocity error, by the inference forward and a plain mean of squares.
        let (t, eps) = step_noise(&batch, 9, 0);
        let x_t: Vec<f32> = (0..batch.x0.len())
            .map(|i| {
                let ti = t[i / (batch.x0.len() / 2)];
                (1.0 - ti) * batch.x0[i] + ti * eps[i]
            })
            .collect();
        let img = B.input(&HostTensor::from_f32(vec![2, 64, 96], model_input(&x_t, &batch.cond, 48))).unwrap();
        let c = conditioning(&B, &model, &batch).unwrap();
        let v = model.flux.forward(&B, &img, &scalars(&B, &HostTensor::from_f32(vec![2], t)).unwrap(), &c).unwrap();
        let v = B.download(&v).unwrap().to_f32();
        let mse = v.iter().zip(&eps).zip(&batch.x0).map(|((&v, &e), &x)| ((v - (e - x)) as f64).powi(2)).sum::<f64>() / v.len() as f64;

        let config = AdamWConfig { lr: 1e-2, warmup_steps: 0, ..AdamWConfig::default() };
        let mut trainer = LoraTrainer::attach(&B, &mut model.flux, 4, 1, AdamW::new(config)).unwrap();
        let mut losses = Vec::new();
        for step in 0..40 {
            losses.push(sft_step(&B, &mut model, &mut trainer, &op, &batch, 9, step).unwrap().loss);
        }
        assert!((losses[0] - mse).abs() <= 1e-5 * mse, "first loss {} vs the base model's MSE {mse}", losses[0]);
        let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
        let (first, last) = (mean(&losses[..5]), mean(&losses[35..]));
        assert!(last < 0.6 * first, "loss {first} -> {last}: {losses:?}");
    }
}
