//! The FLUX transformer (BFL `flux/model.py`): embeddings, double-stream blocks over separate
//! image and text streams, single-stream blocks over the joint sequence, and the final layer.

use super::backward::Checkpointing;
use super::config::{FluxParams, TIME_EMBED_DIM};
use super::layers::*;
use super::positions::{image_ids, rope_table};
use super::trainable::Trainable;
use super::weights::WeightLoader;
use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::{ensure, Context, Result};
use loaders::safetensors::Checkpoint;
use loaders::HostTensor;

pub struct Flux<B: Backend> {
    pub params: FluxParams,
    pub img_in: Linear<B>,
    pub time_in: MlpEmbedder<B>,
    pub vector_in: MlpEmbedder<B>,
    pub guidance_in: Option<MlpEmbedder<B>>,
    pub txt_in: Linear<B>,
    pub double_blocks: Vec<DoubleStreamBlock<B>>,
    pub single_blocks: Vec<SingleStreamBlock<B>>,
    pub final_layer: LastLayer<B>,
}

impl<B: Backend> Flux<B> {
    /// Builds the model from `w`, which checks every tensor's presence and shape.
    pub fn build(p: &FluxParams, w: &mut WeightLoader<'_, B>) -> Result<Self> {
        p.validate()?;
        let h = p.hidden_size;
        let (mlp, hd, heads) = (p.mlp_hidden(), p.head_dim(), p.num_heads);
        let embedder = |w: &mut WeightLoader<'_, B>, name: &str, input: usize| -> Result<MlpEmbedder<B>> {
            Ok(MlpEmbedder {
                in_layer: w.linear(&format!("{name}.in_layer"), input, h, true)?,
                out_layer: w.linear(&format!("{name}.out_layer"), h, h, true)?,
            })
        };
        let qk_norm = |w: &mut WeightLoader<'_, B>, prefix: &str| -> Result<QkNorm<B>> {
            Ok(QkNorm {
                query_norm: w.tensor(&format!("{prefix}.query_norm.scale"), &[hd])?,
                key_norm: w.tensor(&format!("{prefix}.key_norm.scale"), &[hd])?,
            })
        };
        let stream = |w: &mut WeightLoader<'_, B>, prefix: &str| -> Result<Stream<B>> {
            Ok(Stream {
                modulation: Modulation { lin: w.linear(&format!("{prefix}_mod.lin"), h, 6 * h, true)? },
                attn: SelfAttention {
                    qkv: w.linear(&format!("{prefix}_attn.qkv"), h, 3 * h, p.qkv_bias)?,
                    norm: qk_norm(w, &format!("{prefix}_attn.norm"))?,
                    proj: w.linear(&format!("{prefix}_attn.proj"), h, h, true)?,
                },
                mlp: Mlp {
                    fc1: w.linear(&format!("{prefix}_mlp.0"), h, mlp, true)?,
                    fc2: w.linear(&format!("{prefix}_mlp.2"), mlp, h, true)?,
                },
            })
        };
        Ok(Flux {
            img_in: w.linear("img_in", p.in_channels, h, true)?,
            time_in: embedder(w, "time_in", TIME_EMBED_DIM)?,
            vector_in: embedder(w, "vector_in", p.vec_in_dim)?,
            guidance_in: if p.guidance_embed { Some(embedder(w, "guidance_in", TIME_EMBED_DIM)?) } else { None },
            txt_in: w.linear("txt_in", p.context_in_dim, h, true)?,
            double_blocks: (0..p.depth)
                .map(|i| {
                    let pre = format!("double_blocks.{i}");
                    Ok(DoubleStreamBlock {
                        img: stream(w, &format!("{pre}.img"))?,
                        txt: stream(w, &format!("{pre}.txt"))?,
                        num_heads: heads,
                    })
                })
                .collect::<Result<_>>()?,
            single_blocks: (0..p.depth_single_blocks)
                .map(|i| {
                    let pre = format!("single_blocks.{i}");
                    Ok(SingleStreamBlock {
                        linear1: w.linear(&format!("{pre}.linear1"), h, 3 * h + mlp, p.qkv_bias)?,
                        linear2: w.linear(&format!("{pre}.linear2"), h + mlp, h, true)?,
                        norm: qk_norm(w, &format!("{pre}.norm"))?,
                        modulation: Modulation { lin: w.linear(&format!("{pre}.modulation.lin"), h, 3 * h, true)? },
                        num_heads: heads,
                    })
                })
                .collect::<Result<_>>()?,
            final_layer: LastLayer {
                ada_ln_modulation: w.linear("final_layer.adaLN_modulation.1", h, 2 * h, true)?,
                linear: w.linear("final_layer.linear", h, p.out_channels, true)?,
            },
            params: p.clone(),
        })
    }

    /// Rotary tables for the joint sequence `[txt; img]` from host ids `[B, L, 3]`.
    pub fn positions(&self, b: &B, txt_ids: &HostTensor, img_ids: &HostTensor) -> Result<Positions<B>> {
        let (batch, lt, li) = (txt_ids.shape[0], txt_ids.shape[1], img_ids.shape[1]);
        let p = &self.params;
        let txt = rope_table(&txt_ids.to_f32(), batch, lt, &p.axes_dim, p.theta);
        let img = rope_table(&img_ids.to_f32(), batch, li, &p.axes_dim, p.theta);
        let (txt, img) = (b.upload(&txt)?, b.upload(&img)?);
        Ok(Positions { joint: b.concat(&[&txt, &img], 1)?, txt, img })
    }

    /// One transformer evaluation: img `[B, L, in]` and timesteps `[B]` in [0, 1] (uploaded with
    /// [`scalars`]) under the conditioning `c`, with the deltas of `tr` (`Trainable::Nothing`: the
    /// model as loaded) -> velocity `[B, L, out]`.
    pub fn forward(&self, b: &B, img: &Tensor<B>, timesteps: &Tensor<B>, c: &Conditioning<B>, tr: Trainable<B>) -> Result<Tensor<B>> {
        Ok(self.run::<Inference>(b, img, timesteps, c, tr, Checkpointing::Off)?.0)
    }

    /// `forward`, keeping what `backward` needs to differentiate `tr` (every block's
    /// activations, or with `Checkpointing::PerBlock` only each block's input). The output
    /// equals `forward`'s.
    pub fn forward_train(
        &self,
        b: &B,
        img: &Tensor<B>,
        timesteps: &Tensor<B>,
        c: &Conditioning<B>,
        tr: Trainable<B>,
        checkpointing: Checkpointing,
    ) -> Result<(Tensor<B>, FluxActs<B>)> {
        tr.check(self)?;
        self.run::<Training>(b, img, timesteps, c, tr, checkpointing)
    }

    /// The forward (BFL `Flux.forward`), for inference and training alike: `K` decides what is
    /// kept, `checkpointing` whether the blocks keep their activations or only their inputs.
    fn run<K: Keep>(
        &self,
        b: &B,
        img: &Tensor<B>,
        timesteps: &Tensor<B>,
        c: &Conditioning<B>,
        tr: Trainable<B>,
        checkpointing: Checkpointing,
    ) -> Result<(Tensor<B>, FluxActs<B, K>)> {
        let embed_time = |t: &Tensor<B>| b.timestep_embedding(t, TIME_EMBED_DIM, 10_000.0, 1000.0);
        let t_emb = embed_time(timesteps)?;
        let (mut vec, time) = self.time_in.forward::<K>(b, &t_emb, tr)?;
        let guidance = match &self.guidance_in {
            Some(g_in) => {
                let g = c.guidance.as_ref().context("this model has a guidance embedding and needs a guidance value")?;
                let g_emb = embed_time(g)?;
                let (out, acts) = g_in.forward::<K>(b, &g_emb, tr)?;
                vec = b.add(&vec, &out)?;
                Some((g_emb, acts))
            }
            None => None,
        };
        let (vector_out, vector) = self.vector_in.forward::<K>(b, &c.y, tr)?;
        vec = b.add(&vec, &vector_out)?;
        let vec_silu = b.silu(&vec)?;
        let vec_acts = K::keep(tr.full().then(|| VecActs { time: (t_emb, time), guidance, vector, vec }));

        let mut img = self.img_in.forward(b, img, tr)?;
        let mut txt = self.txt_in.forward(b, &c.txt, tr)?;
        let mut double = Vec::with_capacity(self.double_blocks.len());
        for block in &self.double_blocks {
            let (img_out, txt_out, acts) = match checkpointing {
                Checkpointing::Off => {
                    let (i, t, acts) = block.forward::<K>(b, &img, &txt, &vec_silu, &c.pe, tr)?;
                    (i, t, Some(acts))
                }
                Checkpointing::PerBlock => {
                    let (i, t, _) = block.forward::<Inference>(b, &img, &txt, &vec_silu, &c.pe, tr)?;
                    (i, t, None)
                }
            };
            double.push(K::keep(DoubleStep { img, txt, acts }));
            (img, txt) = (img_out, txt_out);
        }
        let lt = txt.dim(1);
        let mut x = b.concat(&[&txt, &img], 1)?;
        drop((img, txt));
        let mut single = Vec::with_capacity(self.single_blocks.len());
        for block in &self.single_blocks {
            let (y, acts) = match checkpointing {
                Checkpointing::Off => {
                    let (y, acts) = block.forward::<K>(b, &x, &vec_silu, &c.pe, tr)?;
                    (y, Some(acts))
                }
                Checkpointing::PerBlock => (block.forward::<Inference>(b, &x, &vec_silu, &c.pe, tr)?.0, None),
            };
            single.push(K::keep(SingleStep { x, acts }));
            x = y;
        }
        let final_in = b.narrow(&x, 1, lt, x.dim(1) - lt)?;
        drop(x);
        let (out, last) = self.final_layer.forward::<K>(b, &final_in, &vec_silu, tr)?;
        let acts = FluxActs {
            trained: K::keep(tr.kind()),
            vec_silu: K::keep(vec_silu),
            vec: vec_acts,
            double,
            single,
            final_in: K::keep(final_in),
            last,
        };
        Ok((out, acts))
    }

    /// Validates host inputs against the model, runs one forward, returns `out` in f32.
    pub fn forward_host(&self, b: &B, inputs: &FluxInputs) -> Result<HostTensor> {
        inputs.validate(&self.params)?;
        let c = Conditioning::new(b, self, &inputs.txt, &inputs.y, inputs.guidance.as_ref(), &inputs.txt_ids, &inputs.img_ids)?;
        let out = self.forward(b, &b.input(&inputs.img)?, &scalars(b, &inputs.timesteps)?, &c, Trainable::Nothing)?;
        b.download(&out)
    }
}

/// A double block's inputs, and its activations unless they are recomputed.
pub(super) struct DoubleStep<B: Backend, K: Keep> {
    pub(super) img: Tensor<B>,
    pub(super) txt: Tensor<B>,
    pub(super) acts: Option<DoubleStreamActs<B, K>>,
}

/// A single block's input, and its activations unless they are recomputed.
pub(super) struct SingleStep<B: Backend, K: Keep> {
    pub(super) x: Tensor<B>,
    pub(super) acts: Option<SingleStreamActs<B, K>>,
}

/// Full training: the vec path's activations. vector_in's input is the conditioning's `y`, which
/// `backward` is given again.
pub(super) struct VecActs<B: Backend, K: Keep> {
    /// The timesteps' sinusoidal embedding (time_in's input) and time_in's activations.
    pub(super) time: (Tensor<B>, MlpEmbedderActs<B, K>),
    /// The same for the guidance value and guidance_in.
    pub(super) guidance: Option<(Tensor<B>, MlpEmbedderActs<B, K>)>,
    pub(super) vector: MlpEmbedderActs<B, K>,
    /// The sum of the embeddings, before SiLU.
    pub(super) vec: Tensor<B>,
}

/// What `Flux::backward` needs beside the model's inputs, kept by `forward_train`.
pub struct FluxActs<B: Backend, K: Keep = Training> {
    /// The kind of trainable set the activations were kept for: `backward` checks that it is
    /// given the same.
    pub(super) trained: K::Kept<&'static str>,
    pub(super) vec_silu: K::Kept<Tensor<B>>,
    /// Full training only.
    pub(super) vec: K::Kept<Option<VecActs<B, K>>>,
    pub(super) double: Vec<K::Kept<DoubleStep<B, K>>>,
    pub(super) single: Vec<K::Kept<SingleStep<B, K>>>,
    /// The image rows of the last single block's output: the final layer's input.
    pub(super) final_in: K::Kept<Tensor<B>>,
    pub(super) last: LastLayerActs<B, K>,
}

/// What stays fixed over the steps of a sampling run: text tokens `[B, Lt, ctx]`, rotary
/// positions, the pooled vector `[B, vec]` and the guidance value `[B]` of distilled models.
pub struct Conditioning<B: Backend> {
    pub txt: Tensor<B>,
    pub pe: Positions<B>,
    pub y: Tensor<B>,
    pub guidance: Option<Tensor<B>>,
}

impl<B: Backend> Conditioning<B> {
    /// The conditioning of BFL's forward arguments: `txt` `[B, Lt, ctx]`, `y` `[B, vec]`, the
    /// guidance `[B]` of a distilled model (ignored by one without a guidance embedding), and
    /// the position ids `txt_ids` `[B, Lt, 3]`, `img_ids` `[B, L, 3]` of the rotary tables.
    pub fn new(
        b: &B,
        flux: &Flux<B>,
        txt: &HostTensor,
        y: &HostTensor,
        guidance: Option<&HostTensor>,
        txt_ids: &HostTensor,
        img_ids: &HostTensor,
    ) -> Result<Self> {
        Ok(Conditioning {
            txt: b.input(txt)?,
            pe: flux.positions(b, txt_ids, img_ids)?,
            y: b.input(y)?,
            guidance: match flux.params.guidance_embed {
                true => Some(scalars(b, guidance.context("this model has a guidance embedding and needs a guidance value")?)?),
                false => None,
            },
        })
    }
}

/// BFL's forward arguments, by name, as host tensors.
#[derive(Debug, Clone)]
pub struct FluxInputs {
    pub img: HostTensor,
    pub img_ids: HostTensor,
    pub txt: HostTensor,
    pub txt_ids: HostTensor,
    pub timesteps: HostTensor,
    pub y: HostTensor,
    pub guidance: Option<HostTensor>,
}

impl FluxInputs {
    pub const REQUIRED: [&'static str; 6] = ["img", "img_ids", "txt", "txt_ids", "timesteps", "y"];

    /// Reads the inputs from a safetensors file, naming the file and key on any problem.
    pub fn read(ckpt: &Checkpoint) -> Result<Self> {
        let path = ckpt.path().display().to_string();
        for name in ckpt.names() {
            ensure!(
                Self::REQUIRED.contains(&name) || name == "guidance",
                "{path}: unexpected tensor '{name}' (inputs are {} and optional guidance)",
                Self::REQUIRED.join(", ")
            );
        }
        let get = |name: &str| -> Result<HostTensor> {
            ensure!(ckpt.info(name).is_some(), "{path}: missing input tensor '{name}'");
            Ok(ckpt.read(name)?)
        };
        Ok(FluxInputs {
            img: get("img")?,
            img_ids: get("img_ids")?,
            txt: get("txt")?,
            txt_ids: get("txt_ids")?,
            timesteps: get("timesteps")?,
            y: get("y")?,
            guidance: ckpt.info("guidance").map(|_| get("guidance")).transpose()?,
        })
    }

    /// Seeded Gaussian inputs for a `rows x cols` grid of packed latent patches and `txt_tokens`
    /// text tokens (t = 0.7, guidance 3.5): for benchmarks and backend comparisons.
    pub fn random(p: &FluxParams, batch: usize, (rows, cols): (usize, usize), txt_tokens: usize, seed: u64) -> Self {
        let l = rows * cols;
        let noise = |shape: Vec<usize>, k: u64| {
            let n = shape.iter().product();
            HostTensor::from_f32(shape, crate::sampler::gaussian_noise(n, seed.wrapping_mul(31).wrapping_add(k)))
        };
        let per_sample = |v: f32| HostTensor::from_f32(vec![batch], vec![v; batch]);
        FluxInputs {
            img: noise(vec![batch, l, p.in_channels], 0),
            img_ids: HostTensor::from_f32(vec![batch, l, 3], image_ids(rows, cols).repeat(batch)),
            txt: noise(vec![batch, txt_tokens, p.context_in_dim], 1),
            txt_ids: HostTensor::from_f32(vec![batch, txt_tokens, 3], vec![0.0; batch * txt_tokens * 3]),
            timesteps: per_sample(0.7),
            y: noise(vec![batch, p.vec_in_dim], 2),
            guidance: p.guidance_embed.then(|| per_sample(3.5)),
        }
    }

    /// Checks every input's shape against the model; errors name the input, expected and found.
    pub fn validate(&self, p: &FluxParams) -> Result<()> {
        let rank = |name: &str, t: &HostTensor, r: usize, what: &str| -> Result<()> {
            ensure!(t.shape.len() == r, "input '{name}' has shape {:?}, expected {what}", t.shape);
            Ok(())
        };
        rank("img", &self.img, 3, "[batch, tokens, in_channels]")?;
        rank("txt", &self.txt, 3, "[batch, txt_tokens, context_in_dim]")?;
        let (batch, l, lt) = (self.img.shape[0], self.img.shape[1], self.txt.shape[1]);
        ensure!(batch > 0 && l > 0, "input 'img' has shape {:?}: needs at least one sample and one token", self.img.shape);
        let n_axes = p.axes_dim.len();
        let expect: [(&str, Option<&HostTensor>, Vec<usize>); 7] = [
            ("img", Some(&self.img), vec![batch, l, p.in_channels]),
            ("img_ids", Some(&self.img_ids), vec![batch, l, n_axes]),
            ("txt", Some(&self.txt), vec![batch, lt, p.context_in_dim]),
            ("txt_ids", Some(&self.txt_ids), vec![batch, lt, n_axes]),
            ("timesteps", Some(&self.timesteps), vec![batch]),
            ("y", Some(&self.y), vec![batch, p.vec_in_dim]),
            ("guidance", self.guidance.as_ref(), vec![batch]),
        ];
        for (name, t, shape) in expect {
            if let Some(t) = t {
                ensure!(t.shape == shape, "input '{name}' has shape {:?}, the model expects {shape:?}", t.shape);
                ensure!(t.to_f32().iter().all(|v| v.is_finite()), "input '{name}' contains NaN or infinite values");
            }
        }
        match (&self.guidance, p.guidance_embed) {
            (None, true) => anyhow::bail!("input 'guidance' [batch] is missing: this model has a guidance embedding"),
            (Some(_), false) => anyhow::bail!("input 'guidance' given, but this model has no guidance embedding (guidance_embed = false)"),
            _ => Ok(()),
        }
    }
}

/// Per-sample scalars (timesteps, guidance) go up in f32 whatever the activation dtype: in bf16,
/// t * 1000 inside the timestep embedding would be off by whole radians.
pub fn scalars<B: Backend>(b: &B, t: &HostTensor) -> Result<Tensor<B>> {
    b.upload(&HostTensor::from_f32(t.shape.clone(), t.to_f32()))
}
