//! The CPU backend with faults planted on request: the self-test must catch them, and callers
//! must survive a device running out of memory.

use engine::backend::adamw::AdamWConfig;
use engine::backend::backward::{BackwardOps, LoraAddGrads};
use engine::backend::cpu::CpuBackend;
use engine::backend::error::DeviceOutOfMemory;
use engine::backend::losses::{PairResiduals, SdpoStep};
use engine::backend::sobolev::{Filter, Grid, Sobolev};
use engine::backend::training::{AdamWTensor, TrainingOps};
use engine::{Backend, Tensor};
use loaders::{DType, HostData, HostTensor};
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Hooked {
    pub cpu: CpuBackend,
    pub poison: AtomicBool,
    /// Every `silu` output multiplied by this.
    pub silu_scale: f32,
    /// While poisoning is on, `gelu_tanh` leaves its first element unwritten (NaN).
    pub gelu_skips_first_when_poisoned: bool,
    /// `attention` over more query tokens than this fails as a GPU out of memory would.
    pub attention_token_limit: usize,
    /// Attention kernels to choose between (`BackwardOps::attention_kernels`) and the factor each
    /// multiplies its output by.
    pub attention_kernels: Vec<(&'static str, f32)>,
    /// Attention backward kernels to choose between (`BackwardOps::attention_backward_kernels`)
    /// and the factor each scales the CPU's gradients by (1.0: a right kernel).
    pub attention_backward_kernels: Vec<(&'static str, f32)>,
    /// The Sobolev filters run with height and width swapped (an indexing bug).
    pub sobolev_swaps_axes: bool,
    /// The S-DPO loser gradient leaves its last element unwritten (NaN).
    pub sdpo_skips_last: bool,
    /// Every AdamW update is (1 - beta1) too short, as if step 1's first moment were not
    /// bias-corrected.
    pub adamw_short_step: bool,
}

impl Default for Hooked {
    fn default() -> Self {
        Hooked {
            cpu: CpuBackend::new(),
            poison: AtomicBool::new(false),
            silu_scale: 1.0,
            gelu_skips_first_when_poisoned: false,
            attention_token_limit: usize::MAX,
            attention_kernels: Vec::new(),
            attention_backward_kernels: Vec::new(),
            sobolev_swaps_axes: false,
            sdpo_skips_last: false,
            adamw_short_step: false,
        }
    }
}

type T = Tensor<Hooked>;

fn wrap(t: Tensor<CpuBackend>) -> T {
    let shape = t.shape().to_vec();
    Tensor::from_storage(t.into_storage(), shape)
}

fn inner(t: &T) -> Tensor<CpuBackend> {
    Tensor::from_storage(t.storage().clone(), t.shape().to_vec())
}

/// The last element of `t`'s `n` set to NaN.
fn edit_last(t: T, n: usize) -> T {
    let shape = t.shape().to_vec();
    let mut data = match t.into_storage() {
        HostData::F32(v) => v,
        _ => unreachable!("activations are f32 on the CPU"),
    };
    data[n - 1] = f32::NAN;
    Tensor::from_storage(HostData::F32(data), shape)
}

/// Applies `f` to the first `n` elements.
fn edit(t: T, n: usize, f: impl Fn(f32) -> f32) -> T {
    let shape = t.shape().to_vec();
    let mut data = match t.into_storage() {
        HostData::F32(v) => v,
        _ => unreachable!("activations are f32 on the CPU"),
    };
    data.iter_mut().take(n).for_each(|v| *v = f(*v));
    Tensor::from_storage(HostData::F32(data), shape)
}

impl Backend for Hooked {
    type Storage = HostData;
    fn name(&self) -> String {
        "cpu with planted faults".into()
    }
    fn storage_dtype(s: &HostData) -> DType {
        CpuBackend::storage_dtype(s)
    }
    fn activation_dtype(&self) -> DType {
        self.cpu.activation_dtype()
    }
    fn zeros(&self, shape: &[usize]) -> anyhow::Result<T> {
        self.cpu.zeros(shape).map(wrap)
    }
    fn cast(&self, x: &T, dtype: DType) -> anyhow::Result<T> {
        self.cpu.cast(&inner(x), dtype).map(wrap)
    }
    fn poison_outputs(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }
    fn upload(&self, t: &HostTensor) -> anyhow::Result<T> {
        self.cpu.upload(t).map(wrap)
    }
    fn input(&self, t: &HostTensor) -> anyhow::Result<T> {
        self.cpu.input(t).map(wrap)
    }
    fn download(&self, t: &T) -> anyhow::Result<HostTensor> {
        self.cpu.download(&inner(t))
    }
    fn linear(&self, x: &T, w: &T, bias: Option<&T>) -> anyhow::Result<T> {
        self.cpu.linear(&inner(x), &inner(w), bias.map(inner).as_ref()).map(wrap)
    }
    fn linear_gelu(&self, x: &T, w: &T, bias: Option<&T>) -> anyhow::Result<T> {
        self.cpu.linear_gelu(&inner(x), &inner(w), bias.map(inner).as_ref()).map(wrap)
    }
    fn lora_add(&self, y: T, x: &T, down: &T, up: &T, up_bias: Option<&T>, scale: f32, offset: usize) -> anyhow::Result<T> {
        self.cpu.lora_add(inner(&y), &inner(x), &inner(down), &inner(up), up_bias.map(inner).as_ref(), scale, offset).map(wrap)
    }
    fn layer_norm_modulate(&self, x: &T, shift: &T, scale: &T, eps: f32) -> anyhow::Result<T> {
        self.cpu.layer_norm_modulate(&inner(x), &inner(shift), &inner(scale), eps).map(wrap)
    }
    fn qk_norm_rope(&self, x: &T, heads: usize, q: &T, k: &T, pe: &T, eps: f32) -> anyhow::Result<[T; 3]> {
        let [a, b, c] = self.cpu.qk_norm_rope(&inner(x), heads, &inner(q), &inner(k), &inner(pe), eps)?;
        Ok([wrap(a), wrap(b), wrap(c)])
    }
    fn attention(&self, q: &T, k: &T, v: &T) -> anyhow::Result<T> {
        if q.dim(2) > self.attention_token_limit {
            return Err(DeviceOutOfMemory { bytes: q.dim(2) * k.dim(2) * 4 }.into());
        }
        self.cpu.attention(&inner(q), &inner(k), &inner(v)).map(wrap)
    }
    fn attention_bias(&self, q: &T, k: &T, v: &T, bias: &T, scale: f32) -> anyhow::Result<T> {
        self.cpu.attention_bias(&inner(q), &inner(k), &inner(v), &inner(bias), scale).map(wrap)
    }
    fn rms_norm(&self, x: &T, weight: &T, eps: f32) -> anyhow::Result<T> {
        self.cpu.rms_norm(&inner(x), &inner(weight), eps).map(wrap)
    }
    fn mul(&self, a: &T, b: &T) -> anyhow::Result<T> {
        self.cpu.mul(&inner(a), &inner(b)).map(wrap)
    }
    fn attention_with_lse(&self, q: &T, k: &T, v: &T) -> anyhow::Result<(T, T)> {
        let (out, lse) = self.cpu.attention_with_lse(&inner(q), &inner(k), &inner(v))?;
        Ok((wrap(out), wrap(lse)))
    }
    fn gelu_tanh(&self, x: &T) -> anyhow::Result<T> {
        let y = wrap(self.cpu.gelu_tanh(&inner(x))?);
        Ok(if self.gelu_skips_first_when_poisoned && self.poison.load(Ordering::Relaxed) { edit(y, 1, |_| f32::NAN) } else { y })
    }
    fn silu(&self, x: &T) -> anyhow::Result<T> {
        Ok(edit(wrap(self.cpu.silu(&inner(x))?), usize::MAX, |v| v * self.silu_scale))
    }
    fn add(&self, a: &T, b: &T) -> anyhow::Result<T> {
        self.cpu.add(&inner(a), &inner(b)).map(wrap)
    }
    fn gated_residual(&self, x: &T, gate: &T, y: &T) -> anyhow::Result<T> {
        self.cpu.gated_residual(&inner(x), &inner(gate), &inner(y)).map(wrap)
    }
    fn concat(&self, xs: &[&T], dim: usize) -> anyhow::Result<T> {
        let xs: Vec<_> = xs.iter().map(|x| inner(x)).collect();
        self.cpu.concat(&xs.iter().collect::<Vec<_>>(), dim).map(wrap)
    }
    fn narrow(&self, x: &T, dim: usize, start: usize, len: usize) -> anyhow::Result<T> {
        self.cpu.narrow(&inner(x), dim, start, len).map(wrap)
    }
    fn timestep_embedding(&self, t: &T, dim: usize, max_period: f32, time_factor: f32) -> anyhow::Result<T> {
        self.cpu.timestep_embedding(&inner(t), dim, max_period, time_factor).map(wrap)
    }
    fn conv2d(&self, x: &T, w: &T, bias: Option<&T>, stride: usize, pad: [usize; 4]) -> anyhow::Result<T> {
        self.cpu.conv2d(&inner(x), &inner(w), bias.map(inner).as_ref(), stride, pad).map(wrap)
    }
    fn group_norm(&self, x: &T, groups: usize, w: &T, b: &T, eps: f32) -> anyhow::Result<T> {
        self.cpu.group_norm(&inner(x), groups, &inner(w), &inner(b), eps).map(wrap)
    }
    fn upsample_nearest2x(&self, x: &T) -> anyhow::Result<T> {
        self.cpu.upsample_nearest2x(&inner(x)).map(wrap)
    }
    fn transpose_last2(&self, x: &T) -> anyhow::Result<T> {
        self.cpu.transpose_last2(&inner(x)).map(wrap)
    }
    fn pixel_unshuffle(&self, x: &T, f: usize) -> anyhow::Result<T> {
        self.cpu.pixel_unshuffle(&inner(x), f).map(wrap)
    }
    fn pixel_shuffle(&self, x: &T, f: usize) -> anyhow::Result<T> {
        self.cpu.pixel_shuffle(&inner(x), f).map(wrap)
    }
    fn affine(&self, x: &T, scale: f32, offset: f32) -> anyhow::Result<T> {
        self.cpu.affine(&inner(x), scale, offset).map(wrap)
    }
    fn relu(&self, x: &T) -> anyhow::Result<T> {
        self.cpu.relu(&inner(x)).map(wrap)
    }
    fn max_pool2d(&self, x: &T, kernel: usize, stride: usize) -> anyhow::Result<T> {
        self.cpu.max_pool2d(&inner(x), kernel, stride).map(wrap)
    }
    fn blur_pool2d(&self, x: &T, filter: &T, stride: usize, pad: [usize; 4]) -> anyhow::Result<T> {
        self.cpu.blur_pool2d(&inner(x), &inner(filter), stride, pad).map(wrap)
    }
    fn l2_pool2d(&self, x: &T, filter: &T, stride: usize, pad: [usize; 4]) -> anyhow::Result<T> {
        self.cpu.l2_pool2d(&inner(x), &inner(filter), stride, pad).map(wrap)
    }
}

/// The backward ops are the CPU's; only the choice of attention kernels (forward and backward) is
/// planted.
impl BackwardOps for Hooked {
    fn linear_backward_input(&self, gy: &T, w: &T) -> anyhow::Result<T> {
        self.cpu.linear_backward_input(&inner(gy), &inner(w)).map(wrap)
    }
    fn linear_backward_params(&self, gy: &T, x: &T) -> anyhow::Result<(T, T)> {
        let (w, b) = self.cpu.linear_backward_params(&inner(gy), &inner(x))?;
        Ok((wrap(w), wrap(b)))
    }
    fn lora_backward(&self, gx: T, gy: &T, x: &T, down: &T, up: &T, scale: f32, offset: usize) -> anyhow::Result<LoraAddGrads<Self>> {
        let g = self.cpu.lora_backward(inner(&gx), &inner(gy), &inner(x), &inner(down), &inner(up), scale, offset)?;
        Ok(LoraAddGrads { gx: wrap(g.gx), down: wrap(g.down), up: wrap(g.up) })
    }
    fn gelu_tanh_backward(&self, x_pre: &T, gy: &T) -> anyhow::Result<T> {
        self.cpu.gelu_tanh_backward(&inner(x_pre), &inner(gy)).map(wrap)
    }
    fn layer_norm_modulate_backward(&self, x: &T, scale: &T, gy: &T, eps: f32) -> anyhow::Result<T> {
        self.cpu.layer_norm_modulate_backward(&inner(x), &inner(scale), &inner(gy), eps).map(wrap)
    }
    fn layer_norm_modulate_backward_shift_scale(&self, x: &T, gy: &T, eps: f32) -> anyhow::Result<(T, T)> {
        let (shift, scale) = self.cpu.layer_norm_modulate_backward_shift_scale(&inner(x), &inner(gy), eps)?;
        Ok((wrap(shift), wrap(scale)))
    }
    fn qk_norm_rope_backward(
        &self,
        x: &T,
        heads: usize,
        q_scale: &T,
        k_scale: &T,
        pe: &T,
        eps: f32,
        g_qkv: [&T; 3],
        tail: Option<&T>,
    ) -> anyhow::Result<T> {
        let g = g_qkv.map(inner);
        let tail = tail.map(inner);
        self.cpu
            .qk_norm_rope_backward(
                &inner(x),
                heads,
                &inner(q_scale),
                &inner(k_scale),
                &inner(pe),
                eps,
                [&g[0], &g[1], &g[2]],
                tail.as_ref(),
            )
            .map(wrap)
    }
    fn attention_backward(&self, q: &T, k: &T, v: &T, out: &T, lse: &T, g_out: &T) -> anyhow::Result<[T; 3]> {
        let [gq, gk, gv] = self.cpu.attention_backward(&inner(q), &inner(k), &inner(v), &inner(out), &inner(lse), &inner(g_out))?;
        Ok([wrap(gq), wrap(gk), wrap(gv)])
    }
    fn gated_residual_backward(&self, gy: &T, gate: &T) -> anyhow::Result<T> {
        self.cpu.gated_residual_backward(&inner(gy), &inner(gate)).map(wrap)
    }
    fn gated_residual_backward_gate(&self, gy: &T, y: &T) -> anyhow::Result<T> {
        self.cpu.gated_residual_backward_gate(&inner(gy), &inner(y)).map(wrap)
    }
    fn silu_backward(&self, x: &T, gy: &T) -> anyhow::Result<T> {
        self.cpu.silu_backward(&inner(x), &inner(gy)).map(wrap)
    }
    fn attention_kernels(&self) -> Vec<&'static str> {
        self.attention_kernels.iter().map(|(name, _)| *name).collect()
    }
    fn attention_with_lse_using(&self, kernel: &str, q: &T, k: &T, v: &T) -> anyhow::Result<(T, T)> {
        let &(_, factor) = self.attention_kernels.iter().find(|(name, _)| *name == kernel).expect("a planted kernel");
        let (out, lse) = self.attention_with_lse(q, k, v)?;
        Ok((edit(out, usize::MAX, |x| x * factor), lse))
    }
    fn attention_backward_kernels(&self) -> Vec<&'static str> {
        self.attention_backward_kernels.iter().map(|(name, _)| *name).collect()
    }
    fn attention_backward_using(&self, kernel: &str, q: &T, k: &T, v: &T, out: &T, lse: &T, g_out: &T) -> anyhow::Result<[T; 3]> {
        let &(_, factor) = self.attention_backward_kernels.iter().find(|(name, _)| *name == kernel).expect("a planted kernel");
        Ok(self.attention_backward(q, k, v, out, lse, g_out)?.map(|g| edit(g, usize::MAX, |x| x * factor)))
    }
}

/// The training ops the CPU runs as host references are forwarded; every op the trait composes
/// from them keeps its default body, so that the self-test checks the composed versions (what a
/// GPU runs) against the references on the CPU.
impl TrainingOps for Hooked {
    fn axpby(&self, a: &[f32], x: &T, b: &[f32], y: &T) -> anyhow::Result<T> {
        self.cpu.axpby(a, &inner(x), b, &inner(y)).map(wrap)
    }
    fn dot_items(&self, x: &T, y: &T) -> anyhow::Result<Vec<f64>> {
        self.cpu.dot_items(&inner(x), &inner(y))
    }
    fn sobolev_filter(&self, op: &Sobolev, r: &T, filter: Filter) -> anyhow::Result<T> {
        if self.sobolev_swaps_axes {
            let g = op.field_grid();
            let swapped = Sobolev::new(Grid::new(g.channels, g.width, g.height), op.exponent())?;
            return self.cpu.sobolev_filter(&swapped, &inner(r), filter).map(wrap);
        }
        self.cpu.sobolev_filter(op, &inner(r), filter).map(wrap)
    }
    fn sobolev_energy(&self, op: &Sobolev, r: &T) -> anyhow::Result<Vec<f64>> {
        self.cpu.sobolev_energy(op, &inner(r))
    }
    fn sobolev_energy_grad(&self, op: &Sobolev, r: &T) -> anyhow::Result<(Vec<f64>, T)> {
        let (energies, grad) = self.cpu.sobolev_energy_grad(op, &inner(r))?;
        Ok((energies, wrap(grad)))
    }
    fn sdpo_step(&self, op: &Sobolev, r: &PairResiduals<T>, beta: f64) -> anyhow::Result<SdpoStep<T>> {
        let [pw, rw, pl, rl] = [r.policy_winner, r.reference_winner, r.policy_loser, r.reference_loser].map(inner);
        let residuals = PairResiduals { policy_winner: &pw, reference_winner: &rw, policy_loser: &pl, reference_loser: &rl };
        let step = self.cpu.sdpo_step(op, &residuals, beta)?;
        let loser = wrap(step.policy_loser_grad);
        let n = loser.elem_count();
        Ok(SdpoStep {
            energies: step.energies,
            objective: step.objective,
            policy_winner_grad: wrap(step.policy_winner_grad),
            policy_loser_grad: if self.sdpo_skips_last { edit_last(loser, n) } else { loser },
        })
    }
    fn adamw_step(&self, config: &AdamWConfig, k: u64, lr: f64, tensors: &mut [AdamWTensor<'_, Self>]) -> anyhow::Result<f64> {
        let mut state: Vec<[Tensor<CpuBackend>; 4]> =
            tensors.iter().map(|t| [inner(t.param), inner(t.m), inner(t.v), inner(t.grad)]).collect();
        let mut cpu_tensors: Vec<AdamWTensor<CpuBackend>> =
            state.iter_mut().zip(tensors.iter()).map(|([p, m, v, g], t)| AdamWTensor { name: t.name, param: p, m, v, grad: &*g }).collect();
        let before: Vec<Vec<f32>> = cpu_tensors.iter().map(|t| self.cpu.download(t.param).unwrap().to_f32()).collect();
        let norm = self.cpu.adamw_step(config, k, lr, &mut cpu_tensors)?;
        for ((t, [p, m, v, _]), old) in tensors.iter_mut().zip(state).zip(before) {
            let p = match self.adamw_short_step {
                true => {
                    let short: Vec<f32> = self
                        .cpu
                        .download(&p)?
                        .to_f32()
                        .iter()
                        .zip(&old)
                        .map(|(new, old)| old + (new - old) * (1.0 - config.beta1 as f32))
                        .collect();
                    self.cpu.upload(&HostTensor::from_f32(p.shape().to_vec(), short))?
                }
                false => p,
            };
            (*t.param, *t.m, *t.v) = (wrap(p), wrap(m), wrap(v));
        }
        Ok(norm)
    }
}
