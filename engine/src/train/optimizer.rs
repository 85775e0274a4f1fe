//! AdamW over the device-resident masters: the moments live beside them on the device and the
//! step runs there (`TrainingOps::adamw_step`); only the gradient norm comes back. The host
//! `AdamW` (its configuration, step count and moments) is what a checkpoint holds: the state is
//! downloaded into it at save time and uploaded from it on resume.

use super::params::Masters;
use crate::backend::adamw::{AdamW, AdamWConfig, Moments, StepStats};
use crate::backend::training::{AdamWTensor, TrainingOps};
use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use loaders::HostTensor;

pub struct Optimizer<B: Backend> {
    pub config: AdamWConfig,
    /// Steps taken so far.
    pub step: u64,
    /// The first and second moments of each master, in the masters' order.
    m: Vec<Tensor<B>>,
    v: Vec<Tensor<B>>,
}

impl<B: TrainingOps> Optimizer<B> {
    /// The optimiser's state for `masters` on the device: `saved`'s (a resumed run), or zero
    /// moments at step 0.
    pub fn new(b: &B, masters: &Masters<B>, saved: &AdamW) -> Result<Self> {
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (name, t) in masters.names.iter().zip(&masters.tensors) {
            let shape = t.shape().to_vec();
            let n = t.elem_count();
            let (mi, vi) = match saved.moments.get(name) {
                Some(mom) => {
                    ensure!(mom.m.len() == n && mom.v.len() == n, "AdamW: '{name}' has {n} values but its saved moments {}", mom.m.len());
                    (mom.m.clone(), mom.v.clone())
                }
                None => (vec![0.0; n], vec![0.0; n]),
            };
            m.push(b.upload(&HostTensor::from_f32(shape.clone(), mi))?);
            v.push(b.upload(&HostTensor::from_f32(shape, vi))?);
        }
        Ok(Optimizer { config: saved.config.clone(), step: saved.step, m, v })
    }

    /// One step of every master from its gradient (in the masters' order).
    pub fn step(&mut self, b: &B, masters: &mut Masters<B>, grads: &[Tensor<B>]) -> Result<StepStats> {
        ensure!(grads.len() == masters.tensors.len(), "AdamW: {} gradients for {} parameters", grads.len(), masters.tensors.len());
        let k = self.step + 1;
        let lr = self.config.lr_at(k);
        let mut tensors: Vec<AdamWTensor<B>> = masters
            .names
            .iter()
            .zip(masters.tensors.iter_mut())
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .zip(grads)
            .map(|(((name, param), (m, v)), grad)| AdamWTensor { name, param, m, v, grad })
            .collect();
        let grad_norm = b.adamw_step(&self.config, k, lr, &mut tensors)?;
        self.step = k;
        Ok(StepStats { grad_norm, lr })
    }

    /// The state on the host, for a checkpoint.
    pub fn download(&self, b: &B, masters: &Masters<B>) -> Result<AdamW> {
        let mut state = AdamW { config: self.config.clone(), step: self.step, moments: Default::default() };
        for ((name, m), v) in masters.names.iter().zip(&self.m).zip(&self.v) {
            state.moments.insert(name.clone(), Moments { m: b.download(m)?.to_f32(), v: b.download(v)?.to_f32() });
        }
        Ok(state)
    }
}
