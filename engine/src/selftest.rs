//! The backend self-test (`engine selftest`): every op of the `Backend` trait, then whole FLUX
//! forwards, run on the backend under test and on the CPU reference with the same inputs, every
//! element compared.
//!
//! Inputs are fresh seeded Gaussians (never zeros), rounded to bf16 on the host so that both
//! backends start from identical values and the comparison measures arithmetic only. Outputs of
//! the backend under test are poisoned with NaN before each op (`Backend::poison_outputs`), so an
//! element a kernel never writes fails instead of passing with a stale value. The error is
//! normwise: `max |candidate - reference| / max |reference|`, infinite on NaN, infinity or a
//! shape mismatch.

use crate::backend::backward::BackwardOps;
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::model::backward::Checkpointing;
use crate::model::flux::scalars;
use crate::model::weights::WeightLoader;
use crate::model::{Adapters, Conditioning, Flux, FluxInputs, FluxParams, Trainable};
use crate::tensor::Tensor;
use anyhow::Result;
use half::bf16;
use loaders::lora::{LoraAdapter, LoraLayout, LoraPart};
use loaders::{DType, HostData, HostTensor};
use std::collections::BTreeMap;

/// Relative error allowed for an op whose output is stored in bf16 (8 bits of mantissa: one
/// rounding is 4e-3 relative).
pub const BF16_OP_TOLERANCE: f64 = 1e-2;
/// Relative error allowed for a whole forward in bf16: dozens of ops, each rounding its output.
pub const BF16_MODEL_TOLERANCE: f64 = 3e-2;
/// Relative error allowed where the backend keeps f32 end to end.
pub const F32_TOLERANCE: f64 = 1e-4;

/// One comparison: an op on one shape.
#[derive(Debug, Clone)]
pub struct Check {
    pub op: String,
    pub shape: String,
    pub max_rel_err: f64,
    pub tolerance: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.max_rel_err.is_finite() && self.max_rel_err <= self.tolerance
    }
}

/// `max |candidate - reference| / max |reference|`; infinite when the shapes differ or the
/// candidate holds a NaN or infinity (the poison).
pub fn max_rel_err(candidate: &HostTensor, reference: &HostTensor) -> f64 {
    if candidate.shape != reference.shape {
        return f64::INFINITY;
    }
    let (c, r) = (candidate.to_f32(), reference.to_f32());
    let scale = r.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let mut worst = 0f64;
    for (&a, &b) in c.iter().zip(&r) {
        if !a.is_finite() {
            return f64::INFINITY;
        }
        worst = worst.max((a as f64 - b as f64).abs());
    }
    if scale == 0.0 {
        if worst == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        worst / scale
    }
}

/// The results as one table: op, shape, max rel err, tolerance, pass/fail.
pub fn render_table(checks: &[Check]) -> String {
    let op_w = checks.iter().map(|c| c.op.len()).max().unwrap_or(2).max(2);
    let shape_w = checks.iter().map(|c| c.shape.len()).max().unwrap_or(5).max(5);
    let mut out = format!("{:<op_w$}  {:<shape_w$}  {:>12}  {:>9}  result\n", "op", "shape", "max rel err", "tolerance");
    for c in checks {
        let err = if c.max_rel_err.is_finite() { format!("{:.3e}", c.max_rel_err) } else { "NaN/inf".into() };
        let verdict = if c.passed() { "pass" } else { "FAIL" };
        out.push_str(&format!("{:<op_w$}  {:<shape_w$}  {err:>12}  {:>9.0e}  {verdict}\n", c.op, c.shape, c.tolerance));
    }
    let failed = checks.iter().filter(|c| !c.passed()).count();
    out.push_str(&format!("{} checks, {} passed, {failed} failed\n", checks.len(), checks.len() - failed));
    out
}

/// Seeded Gaussian values rounded to bf16 (kept in f32 storage, so `input` is exact on both sides).
fn gaussian(shape: &[usize], seed: u64) -> HostTensor {
    let n = shape.iter().product();
    let v = crate::sampler::gaussian_noise(n, seed).into_iter().map(|x| bf16::from_f32(x).to_f32()).collect();
    HostTensor::from_f32(shape.to_vec(), v)
}

/// The inputs of one attention check, drawn in this order from `next` seeds: q `[B, H, Lq, D]`,
/// k and v `[B, H, Lk, D]`; and the shape as the check table names it.
struct AttentionCase {
    q: HostTensor,
    k: HostTensor,
    v: HostTensor,
    shape: String,
    /// `[B, Lq, H * D]`: the shape of the output and of its gradient.
    out_shape: [usize; 3],
}

impl AttentionCase {
    fn new((batch, heads, lq, lk, d): (usize, usize, usize, usize, usize), mut next: impl FnMut() -> u64) -> Self {
        AttentionCase {
            out_shape: [batch, lq, heads * d],
            q: gaussian(&[batch, heads, lq, d], next()),
            k: gaussian(&[batch, heads, lk, d], next()),
            v: gaussian(&[batch, heads, lk, d], next()),
            shape: format!("q [{batch},{heads},{lq},{d}], k/v {lk} tokens"),
        }
    }

    /// An output gradient `[B, Lq, H * D]` for the backward, from the next seed.
    fn g_out(&self, seed: u64) -> HostTensor {
        gaussian(&self.out_shape, seed)
    }
}

/// Like `gaussian` but stored as bf16, as weights are on the GPU.
fn weight(shape: &[usize], seed: u64, scale: f32) -> HostTensor {
    let n = shape.iter().product();
    let v = crate::sampler::gaussian_noise(n, seed).into_iter().map(|x| bf16::from_f32(x * scale)).collect();
    HostTensor::new(shape.to_vec(), HostData::BF16(v))
}

/// Runs `$body` (an expression giving `Result<Vec<Tensor<_>>>` with `$b` bound to a backend) on
/// the CPU and on the backend under test, and records one check per output.
macro_rules! compare {
    ($checks:expr, $dut:expr, $cpu:expr, $op:expr, $shape:expr, $tol:expr, |$b:ident| $body:expr) => {{
        let reference: Vec<HostTensor> = {
            let $b = $cpu;
            let outs: Vec<Tensor<CpuBackend>> = $body?;
            outs.iter().map(|t| $b.download(t)).collect::<Result<_>>()?
        };
        let candidate: Vec<HostTensor> = {
            let $b = $dut;
            $b.poison_outputs(true);
            let outs = $body;
            $b.poison_outputs(false);
            outs?.iter().map(|t| $b.download(t)).collect::<Result<_>>()?
        };
        let outputs = reference.len();
        let shape: String = $shape;
        for (i, (c, r)) in candidate.iter().zip(&reference).enumerate() {
            let op = if outputs > 1 { format!("{}[{i}]", $op) } else { $op.to_string() };
            $checks.push(Check { op, shape: shape.clone(), max_rel_err: max_rel_err(c, r), tolerance: $tol });
        }
    }};
}

/// Every op of the `Backend` trait on `dut` against the CPU, on shapes that cover the kernels'
/// special cases (lengths not multiples of 8 or of the tile sizes, head dims 64 and 128 and the
/// autoencoder's single wide head, both padding styles of the convolutions).
pub fn op_checks<D: Backend>(dut: &D, seed: u64) -> Result<Vec<Check>> {
    let cpu = &CpuBackend::new();
    let mut checks = Vec::new();
    let mut s = seed;
    let mut next = || {
        s += 1;
        s
    };
    let tol = BF16_OP_TOLERANCE;

    for &(rows, inf, outf, bias) in &[(77usize, 256usize, 384usize, true), (130, 192, 200, false)] {
        let (x, w, bi) = (gaussian(&[2, rows, inf], next()), weight(&[outf, inf], next(), 0.1), weight(&[outf], next(), 1.0));
        let shape = format!("[2,{rows},{inf}] x [{outf},{inf}]{}", if bias { " + bias" } else { "" });
        compare!(checks, dut, cpu, "linear", shape.clone(), tol, |b| {
            let (x, w, bi) = (b.input(&x)?, b.upload(&w)?, b.upload(&bi)?);
            b.linear(&x, &w, bias.then_some(&bi)).map(|y| vec![y])
        });
        compare!(checks, dut, cpu, "linear_gelu", shape, tol, |b| {
            let (x, w, bi) = (b.input(&x)?, b.upload(&w)?, b.upload(&bi)?);
            b.linear_gelu(&x, &w, bias.then_some(&bi)).map(|y| vec![y])
        });
    }

    {
        let (y, x) = (gaussian(&[2, 77, 384], next()), gaussian(&[2, 77, 256], next()));
        let (down, up, ub) = (weight(&[4, 256], next(), 0.1), weight(&[96, 4], next(), 0.5), weight(&[96], next(), 1.0));
        compare!(checks, dut, cpu, "lora_add", "y [2,77,384], rank 4, cols 128..224 + bias".into(), tol, |b| {
            let y = b.input(&y)?;
            let (x, down, up, ub) = (b.input(&x)?, b.upload(&down)?, b.upload(&up)?, b.upload(&ub)?);
            b.lora_add(y, &x, &down, &up, Some(&ub), 0.75, 128).map(|y| vec![y])
        });
    }

    for &(l, d) in &[(77usize, 256usize), (50, 3072), (33, 100)] {
        let (x, shift, scale) = (gaussian(&[2, l, d], next()), gaussian(&[2, d], next()), gaussian(&[2, d], next()));
        compare!(checks, dut, cpu, "layer_norm_modulate", format!("[2,{l},{d}]"), tol, |b| {
            b.layer_norm_modulate(&b.input(&x)?, &b.input(&shift)?, &b.input(&scale)?, 1e-6).map(|y| vec![y])
        });
    }

    for &(heads, d, l, extra) in &[(4usize, 64usize, 77usize, 100usize), (2, 128, 45, 0), (3, 96, 20, 2)] {
        let width = 3 * heads * d + extra;
        let x = gaussian(&[2, l, width], next());
        let (qs, ks) = (weight(&[d], next(), 1.0), weight(&[d], next(), 1.0));
        let angles = crate::sampler::gaussian_noise(2 * l * d / 2, next());
        let pe = HostTensor::from_f32(vec![2, l, d / 2, 2], angles.iter().flat_map(|&a| [(3.0 * a).cos(), (3.0 * a).sin()]).collect());
        compare!(checks, dut, cpu, "qk_norm_rope", format!("[2,{l},{width}], {heads} heads x {d}"), tol, |b| {
            let pe = b.upload(&pe)?;
            b.qk_norm_rope(&b.input(&x)?, heads, &b.upload(&qs)?, &b.upload(&ks)?, &pe, 1e-6).map(Vec::from)
        });
    }

    for &dims in &[
        (2usize, 3usize, 77usize, 77usize, 64usize),
        (1, 2, 300, 300, 128),
        (1, 2, 50, 130, 64),
        (1, 1, 200, 200, 32),
        (1, 1, 64, 64, 512),
    ] {
        let c = AttentionCase::new(dims, &mut next);
        compare!(checks, dut, cpu, "attention", c.shape.clone(), tol, |b| {
            b.attention(&b.input(&c.q)?, &b.input(&c.k)?, &b.input(&c.v)?).map(|y| vec![y])
        });
    }

    // The text encoders' attention: a relative-position bias (T5, scale 1) and a causal -inf mask
    // (CLIP, scale 1/sqrt(d)), on their head dim and token counts.
    for &(dims, causal) in
        &[((2usize, 3usize, 77usize, 77usize, 64usize), true), ((1, 4, 130, 130, 64), false), ((1, 2, 20, 33, 40), false)]
    {
        let c = AttentionCase::new(dims, &mut next);
        let (_, heads, lq, lk, _) = dims;
        let values = crate::sampler::gaussian_noise(heads * lq * lk, next());
        let bias: Vec<f32> =
            values.iter().enumerate().map(|(n, &x)| if causal && n % lk > n / lk % lq { f32::NEG_INFINITY } else { 3.0 * x }).collect();
        let bias = HostTensor::from_f32(vec![heads, lq, lk], bias);
        let shape = format!("{}{}", c.shape, if causal { ", causal" } else { ", bias" });
        compare!(checks, dut, cpu, "attention_bias", shape, tol, |b| {
            let scale = if causal { 1.0 / (dims.4 as f32).sqrt() } else { 1.0 };
            b.attention_bias(&b.input(&c.q)?, &b.input(&c.k)?, &b.input(&c.v)?, &b.upload(&bias)?, scale).map(|y| vec![y])
        });
    }

    for &(l, d) in &[(77usize, 4096usize), (33, 100)] {
        let (x, w) = (gaussian(&[2, l, d], next()), weight(&[d], next(), 1.0));
        compare!(checks, dut, cpu, "rms_norm", format!("[2,{l},{d}]"), tol, |b| {
            b.rms_norm(&b.input(&x)?, &b.upload(&w)?, 1e-6).map(|y| vec![y])
        });
    }

    for shape in [vec![2usize, 77, 200], vec![2, 64, 256]] {
        let desc = format!("{shape:?}");
        let (x, y) = (gaussian(&shape, next()), gaussian(&shape, next()));
        let gate = gaussian(&[shape[0], shape[2]], next());
        compare!(checks, dut, cpu, "gelu_tanh", desc.clone(), tol, |b| b.gelu_tanh(&b.input(&x)?).map(|y| vec![y]));
        compare!(checks, dut, cpu, "silu", desc.clone(), tol, |b| b.silu(&b.input(&x)?).map(|y| vec![y]));
        compare!(checks, dut, cpu, "add", desc.clone(), tol, |b| b.add(&b.input(&x)?, &b.input(&y)?).map(|y| vec![y]));
        compare!(checks, dut, cpu, "mul", desc.clone(), tol, |b| b.mul(&b.input(&x)?, &b.input(&y)?).map(|y| vec![y]));
        compare!(checks, dut, cpu, "affine", desc.clone(), tol, |b| b.affine(&b.input(&x)?, 0.3611, -0.1159).map(|y| vec![y]));
        compare!(checks, dut, cpu, "zeros", desc.clone(), tol, |b| b.zeros(x.shape.as_slice()).map(|y| vec![y]));
        compare!(checks, dut, cpu, "gated_residual", desc.clone(), tol, |b| {
            b.gated_residual(&b.input(&x)?, &b.input(&gate)?, &b.input(&y)?).map(|y| vec![y])
        });
        compare!(checks, dut, cpu, "transpose_last2", desc.clone(), tol, |b| b.transpose_last2(&b.input(&x)?).map(|y| vec![y]));
        for dim in 0..3 {
            compare!(checks, dut, cpu, "concat", format!("{desc} twice, dim {dim}"), tol, |b| {
                b.concat(&[&b.input(&x)?, &b.input(&y)?], dim).map(|y| vec![y])
            });
            let (start, len) = (shape[dim] / 3, shape[dim] / 2);
            compare!(checks, dut, cpu, "narrow", format!("{desc} dim {dim}, {start}..{}", start + len), tol, |b| {
                b.narrow(&b.input(&x)?, dim, start, len).map(|y| vec![y])
            });
        }
    }

    {
        // Position tables stay f32 on every backend: the copy must be exact.
        let (p, q) = (gaussian(&[1, 7, 16, 2], next()), gaussian(&[1, 9, 16, 2], next()));
        compare!(checks, dut, cpu, "concat (f32 table)", "[1,7,16,2] + [1,9,16,2], dim 1".into(), F32_TOLERANCE, |b| {
            let (p, q) = (b.upload(&p)?, b.upload(&q)?);
            let joint = b.concat(&[&p, &q], 1)?;
            anyhow::Ok(vec![b.narrow(&joint, 1, 3, 8)?])
        });
    }

    {
        let t = HostTensor::from_f32(vec![3], vec![0.0, 0.3711, 1.0]);
        compare!(checks, dut, cpu, "timestep_embedding", "t [3] -> [3,256]".into(), tol, |b| {
            b.timestep_embedding(&b.upload(&t)?, 256, 10_000.0, 1000.0).map(|y| vec![y])
        });
    }

    for &(cin, cout, k, stride, pad) in
        &[(8usize, 16usize, 3usize, 1usize, [1usize, 1, 1, 1]), (8, 12, 3, 2, [0, 1, 0, 1]), (16, 8, 1, 1, [0, 0, 0, 0])]
    {
        let (x, w, bi) = (gaussian(&[2, cin, 17, 19], next()), weight(&[cout, cin, k, k], next(), 0.2), weight(&[cout], next(), 1.0));
        compare!(checks, dut, cpu, "conv2d", format!("[2,{cin},17,19] * [{cout},{cin},{k},{k}], stride {stride}, pad {pad:?}"), tol, |b| {
            b.conv2d(&b.input(&x)?, &b.upload(&w)?, Some(&b.upload(&bi)?), stride, pad).map(|y| vec![y])
        });
    }

    for &(c, h, w, groups) in &[(32usize, 9usize, 11usize, 8usize), (12, 8, 16, 3), (6, 5, 7, 6)] {
        let x = gaussian(&[2, c, h, w], next());
        let (wt, bi) = (weight(&[c], next(), 1.0), weight(&[c], next(), 1.0));
        compare!(checks, dut, cpu, "group_norm", format!("[2,{c},{h},{w}], {groups} groups"), tol, |b| {
            b.group_norm(&b.input(&x)?, groups, &b.upload(&wt)?, &b.upload(&bi)?, 1e-6).map(|y| vec![y])
        });
    }

    {
        let x = gaussian(&[2, 32, 9, 11], next());
        compare!(checks, dut, cpu, "upsample_nearest2x", "[2,32,9,11]".into(), tol, |b| b
            .upsample_nearest2x(&b.input(&x)?)
            .map(|y| vec![y]));
        let y = gaussian(&[2, 3, 12, 16], next());
        compare!(checks, dut, cpu, "pixel_unshuffle", "[2,3,12,16], f 4".into(), tol, |b| b
            .pixel_unshuffle(&b.input(&y)?, 4)
            .map(|y| vec![y]));
        compare!(checks, dut, cpu, "pixel_shuffle", "[2,32,9,11], f 2".into(), tol, |b| b.pixel_shuffle(&b.input(&x)?, 2).map(|y| vec![y]));
    }

    {
        // The perceptual metrics' layers, on sides that no window or stride divides evenly.
        let (c, h, w) = (24usize, 19usize, 23usize);
        let x = gaussian(&[2, c, h, w], next());
        let desc = format!("[2,{c},{h},{w}]");
        compare!(checks, dut, cpu, "relu", desc.clone(), tol, |b| b.relu(&b.input(&x)?).map(|y| vec![y]));
        for (k, s) in [(3usize, 2usize), (3, 1), (2, 1)] {
            compare!(checks, dut, cpu, "max_pool2d", format!("{desc}, {k}x{k} stride {s}"), tol, |b| {
                b.max_pool2d(&b.input(&x)?, k, s).map(|y| vec![y])
            });
        }
        // Non-negative per-channel filters, as blur and L2 pooling use (a negative one could take
        // L2 pooling's square root below zero).
        let filter = {
            let v = weight(&[c, 1, 3, 3], next(), 0.3).to_f32();
            HostTensor::new(vec![c, 1, 3, 3], HostData::BF16(v.iter().map(|x| bf16::from_f32(x.abs())).collect()))
        };
        for (s, pad) in [(2usize, [2usize; 4]), (1, [1, 2, 0, 1])] {
            compare!(checks, dut, cpu, "blur_pool2d", format!("{desc}, 3x3 stride {s}, reflect {pad:?}"), tol, |b| {
                b.blur_pool2d(&b.input(&x)?, &b.upload(&filter)?, s, pad).map(|y| vec![y])
            });
        }
        compare!(checks, dut, cpu, "l2_pool2d", format!("{desc}, 3x3 stride 2, zeros [1, 1, 1, 1]"), tol, |b| {
            b.l2_pool2d(&b.input(&x)?, &b.upload(&filter)?, 2, [1; 4]).map(|y| vec![y])
        });
    }
    Ok(checks)
}

/// A whole FLUX forward of the `preset` with seeded random bf16 weights, on `dut` and on the CPU
/// (the CPU widens the same bf16 weights), on a `grid` of packed latent patches and 16 text tokens.
pub fn model_check<D: Backend>(dut: &D, preset: &str, grid: (usize, usize), seed: u64) -> Result<Check> {
    let cpu = &CpuBackend::new();
    let params = FluxParams::preset(preset)?;
    let inputs = FluxInputs::random(&params, 1, grid, 16, seed);
    let round = |t: &HostTensor| HostTensor::from_f32(t.shape.clone(), t.to_f32().iter().map(|&x| bf16::from_f32(x).to_f32()).collect());
    let inputs = FluxInputs { img: round(&inputs.img), txt: round(&inputs.txt), y: round(&inputs.y), ..inputs };
    let reference = {
        let mut w = WeightLoader::random(cpu, seed).with_dtype(Some(DType::BF16));
        Flux::build(&params, &mut w)?.forward_host(cpu, &inputs)?
    };
    let candidate = {
        let mut w = WeightLoader::random(dut, seed).with_dtype(Some(DType::BF16));
        let model = Flux::build(&params, &mut w)?;
        dut.poison_outputs(true);
        let out = model.forward_host(dut, &inputs);
        dut.poison_outputs(false);
        out?
    };
    Ok(Check {
        op: format!("forward {preset}"),
        shape: format!("{} img + 16 txt tokens", grid.0 * grid.1),
        max_rel_err: max_rel_err(&candidate, &reference),
        tolerance: BF16_MODEL_TOLERANCE,
    })
}

/// Each attention kernel the backend chooses between (`BackwardOps::attention_kernels`: on a
/// Hopper GPU the portable one and cuda/attention_sm90a.cu; none elsewhere) on its own against
/// the CPU, forced, whether or not the dispatch (and the Hopper kernel's start-up probe) would
/// pick it, so that a wrong kernel shows here as failing checks. Shapes: lengths that are no
/// multiple of the 128-row and 128-key tiles, fewer keys than one tile, a single key, a single
/// query row.
pub fn attention_kernel_checks<D: BackwardOps>(dut: &D, seed: u64) -> Result<Vec<Check>> {
    let cpu = CpuBackend::new();
    let mut checks = Vec::new();
    let mut s = seed.wrapping_add(90 << 32);
    let mut next = || {
        s += 1;
        s
    };
    for &dims in &[
        (1usize, 2usize, 300usize, 300usize, 128usize),
        (2, 3, 77, 130, 128),
        (1, 2, 1, 300, 128),
        (1, 1, 129, 1, 128),
        (2, 3, 77, 77, 64),
        (1, 1, 200, 257, 64),
    ] {
        let AttentionCase { q, k, v, shape, .. } = AttentionCase::new(dims, &mut next);
        let (out_ref, lse_ref) = cpu.attention_with_lse(&cpu.input(&q)?, &cpu.input(&k)?, &cpu.input(&v)?)?;
        for kernel in dut.attention_kernels() {
            dut.poison_outputs(true);
            let got = (|| dut.attention_with_lse_using(kernel, &dut.input(&q)?, &dut.input(&k)?, &dut.input(&v)?))();
            dut.poison_outputs(false);
            let (out, lse) = got.map_err(|e| e.context(format!("attention ({kernel}) on {shape}")))?;
            for (op, c, r) in [
                (format!("attention ({kernel})"), dut.download(&out)?, cpu.download(&out_ref)?),
                (format!("attention ({kernel}) lse"), dut.download(&lse)?, cpu.download(&lse_ref)?),
            ] {
                checks.push(Check { op, shape: shape.clone(), max_rel_err: max_rel_err(&c, &r), tolerance: BF16_OP_TOLERANCE });
            }
        }
    }
    Ok(checks)
}

/// Each attention backward kernel the backend chooses between (`BackwardOps::attention_backward_kernels`:
/// on a GPU the SIMT pair and the tensor-core pair; none on the CPU) on its own against the CPU,
/// forced, whether or not the dispatch (and the tensor-core pair's start-up probe) would pick it.
/// Each backend differentiates its own forward (output and log-sum-exp), as training does.
/// Shapes: lengths that leave partial tiles of 32, 64 and 128 rows, more keys than queries and
/// fewer, a single query row, three keys (not one: with a single key P = 1 and gq = gk = 0
/// exactly, leaving only rounding noise to compare); head dims 128 and 64 (the tensor-core ones).
pub fn attention_backward_kernel_checks<D: BackwardOps>(dut: &D, seed: u64) -> Result<Vec<Check>> {
    let kernels = dut.attention_backward_kernels();
    let cpu = CpuBackend::new();
    let mut checks = Vec::new();
    if kernels.is_empty() {
        return Ok(checks);
    }
    let mut s = seed.wrapping_add(91 << 32);
    let mut next = || {
        s += 1;
        s
    };
    for &dims in &[(1usize, 2usize, 200usize, 200usize, 128usize), (2, 3, 77, 130, 64), (1, 1, 1, 300, 128), (1, 2, 129, 3, 64)] {
        let case = AttentionCase::new(dims, &mut next);
        let g_out = case.g_out(next());
        let AttentionCase { q, k, v, shape, .. } = case;
        let reference = {
            let (q, k, v) = (cpu.input(&q)?, cpu.input(&k)?, cpu.input(&v)?);
            let (out, lse) = cpu.attention_with_lse(&q, &k, &v)?;
            cpu.attention_backward(&q, &k, &v, &out, &lse, &cpu.input(&g_out)?)?
        };
        let (qd, kd, vd, gd) = (dut.input(&q)?, dut.input(&k)?, dut.input(&v)?, dut.input(&g_out)?);
        let (out, lse) = dut.attention_with_lse(&qd, &kd, &vd)?;
        for kernel in &kernels {
            dut.poison_outputs(true);
            let got = dut.attention_backward_using(kernel, &qd, &kd, &vd, &out, &lse, &gd);
            dut.poison_outputs(false);
            let grads = got.map_err(|e| e.context(format!("attention backward ({kernel}) on {shape}")))?;
            for (name, (c, r)) in ["gq", "gk", "gv"].iter().zip(grads.iter().zip(&reference)) {
                checks.push(Check {
                    op: format!("attention backward ({kernel}) {name}"),
                    shape: shape.clone(),
                    max_rel_err: max_rel_err(&dut.download(c)?, &cpu.download(r)?),
                    tolerance: BF16_OP_TOLERANCE,
                });
            }
        }
    }
    Ok(checks)
}

/// Every op (and each attention kernel, forward and backward, where the device has a choice),
/// then the `flux-tiny` and `flux-small` forwards, then every backward op and a `flux-tiny`
/// training backward.
pub fn run_all<D: BackwardOps>(dut: &D, seed: u64) -> Result<Vec<Check>> {
    let mut checks = op_checks(dut, seed)?;
    checks.extend(attention_kernel_checks(dut, seed)?);
    checks.push(model_check(dut, "flux-tiny", (6, 5), seed)?);
    checks.push(model_check(dut, "flux-small", (16, 16), seed)?);
    checks.extend(backward_op_checks(dut, seed)?);
    checks.extend(attention_backward_kernel_checks(dut, seed)?);
    checks.extend(backward_model_check(dut, "flux-tiny", (6, 5), seed)?);
    Ok(checks)
}

/// Relative error allowed for a whole training backward in bf16: it chains about twice the ops of
/// the forward, and a parameter gradient sums rounded terms over every token.
pub const BF16_BACKWARD_TOLERANCE: f64 = 5e-2;

/// Every op of `BackwardOps` on `dut` against the CPU, as `op_checks` does for the forward ops:
/// odd lengths and tails of every tile, LoRA windows at unaligned column offsets, head dims 32,
/// 64, 128 and one that is none of them. Attention's backward takes each backend's own forward
/// output and log-sum-exp, so that the check covers the pair as training uses it.
pub fn backward_op_checks<D: BackwardOps>(dut: &D, seed: u64) -> Result<Vec<Check>> {
    let cpu = &CpuBackend::new();
    let mut checks = Vec::new();
    let mut s = seed.wrapping_add(1 << 32);
    let mut next = || {
        s += 1;
        s
    };
    let tol = BF16_OP_TOLERANCE;

    for &(rows, inf, outf) in &[(77usize, 256usize, 384usize), (130, 192, 200), (5, 24, 9)] {
        let (x, gy, w) = (gaussian(&[2, rows, inf], next()), gaussian(&[2, rows, outf], next()), weight(&[outf, inf], next(), 0.1));
        let shape = format!("gy [2,{rows},{outf}], w [{outf},{inf}]");
        compare!(checks, dut, cpu, "linear_backward_input", shape.clone(), tol, |b| {
            b.linear_backward_input(&b.input(&gy)?, &b.upload(&w)?).map(|g| vec![g])
        });
        compare!(checks, dut, cpu, "linear_backward_params", shape, tol, |b| {
            b.linear_backward_params(&b.input(&gy)?, &b.input(&x)?).map(|(g_w, g_b)| vec![g_w, g_b])
        });
    }

    // (rank, out_len, offset, width): a window at a 256-byte boundary, and one at an odd column
    // of an odd width (no operand of the products aligned).
    for &(rank, out_len, offset, width) in &[(4usize, 96usize, 128usize, 384usize), (3, 50, 37, 101)] {
        let (gx, x, gy) = (gaussian(&[2, 77, 256], next()), gaussian(&[2, 77, 256], next()), gaussian(&[2, 77, width], next()));
        let (down, up) = (weight(&[rank, 256], next(), 0.1), weight(&[out_len, rank], next(), 0.5));
        let shape = format!("x [2,77,256], rank {rank}, cols {offset}..{} of {width}", offset + out_len);
        compare!(checks, dut, cpu, "lora_backward", shape, tol, |b| {
            let g = b.lora_backward(b.input(&gx)?, &b.input(&gy)?, &b.input(&x)?, &b.upload(&down)?, &b.upload(&up)?, 0.75, offset)?;
            anyhow::Ok(vec![g.gx, g.down, g.up])
        });
    }

    for shape in [vec![2usize, 77, 200], vec![2, 64, 256], vec![1, 3, 5]] {
        let desc = format!("{shape:?}");
        let (x, gy, y) = (gaussian(&shape, next()), gaussian(&shape, next()), gaussian(&shape, next()));
        let gate = gaussian(&[shape[0], shape[2]], next());
        compare!(checks, dut, cpu, "gelu_tanh_backward", desc.clone(), tol, |b| {
            b.gelu_tanh_backward(&b.input(&x)?, &b.input(&gy)?).map(|g| vec![g])
        });
        compare!(checks, dut, cpu, "silu_backward", desc.clone(), tol, |b| b.silu_backward(&b.input(&x)?, &b.input(&gy)?).map(|g| vec![g]));
        compare!(checks, dut, cpu, "gated_residual_backward", desc.clone(), tol, |b| {
            b.gated_residual_backward(&b.input(&gy)?, &b.input(&gate)?).map(|g| vec![g])
        });
        compare!(checks, dut, cpu, "gated_residual_backward_gate", desc, tol, |b| {
            b.gated_residual_backward_gate(&b.input(&gy)?, &b.input(&y)?).map(|g| vec![g])
        });
    }

    for &(l, d) in &[(77usize, 256usize), (50, 3072), (33, 100), (300, 40)] {
        let (x, gy, scale) = (gaussian(&[2, l, d], next()), gaussian(&[2, l, d], next()), gaussian(&[2, d], next()));
        compare!(checks, dut, cpu, "layer_norm_modulate_backward", format!("[2,{l},{d}]"), tol, |b| {
            b.layer_norm_modulate_backward(&b.input(&x)?, &b.input(&scale)?, &b.input(&gy)?, 1e-6).map(|g| vec![g])
        });
        compare!(checks, dut, cpu, "layer_norm_modulate_backward_shift_scale", format!("[2,{l},{d}]"), tol, |b| {
            b.layer_norm_modulate_backward_shift_scale(&b.input(&x)?, &b.input(&gy)?, 1e-6).map(|(g_shift, g_scale)| vec![g_shift, g_scale])
        });
    }

    for &(heads, d, l, tail_w) in &[(4usize, 64usize, 77usize, 100usize), (2, 128, 45, 0), (3, 96, 20, 2)] {
        let width = 3 * heads * d + tail_w;
        let x = gaussian(&[2, l, width], next());
        let (qs, ks) = (weight(&[d], next(), 1.0), weight(&[d], next(), 1.0));
        let angles = crate::sampler::gaussian_noise(2 * l * d / 2, next());
        let pe = HostTensor::from_f32(vec![2, l, d / 2, 2], angles.iter().flat_map(|&a| [(3.0 * a).cos(), (3.0 * a).sin()]).collect());
        let g: Vec<HostTensor> = (0..3).map(|_| gaussian(&[2, heads, l, d], next())).collect();
        let tail = gaussian(&[2, l, tail_w], next());
        compare!(checks, dut, cpu, "qk_norm_rope_backward", format!("[2,{l},{width}], {heads} heads x {d}, tail {tail_w}"), tol, |b| {
            let (gq, gk, gv) = (b.input(&g[0])?, b.input(&g[1])?, b.input(&g[2])?);
            let tail = if tail_w > 0 { Some(b.input(&tail)?) } else { None };
            let (x, qs, ks, pe) = (b.input(&x)?, b.upload(&qs)?, b.upload(&ks)?, b.upload(&pe)?);
            b.qk_norm_rope_backward(&x, heads, &qs, &ks, &pe, 1e-6, [&gq, &gk, &gv], tail.as_ref()).map(|g| vec![g])
        });
    }

    for &dims in
        &[(2usize, 3usize, 77usize, 77usize, 64usize), (1, 2, 130, 130, 128), (1, 2, 50, 130, 64), (1, 1, 70, 33, 100), (1, 2, 40, 40, 32)]
    {
        let case = AttentionCase::new(dims, &mut next);
        let g_out = case.g_out(next());
        let AttentionCase { q, k, v, shape, .. } = case;
        compare!(checks, dut, cpu, "attention_with_lse", shape.clone(), tol, |b| {
            b.attention_with_lse(&b.input(&q)?, &b.input(&k)?, &b.input(&v)?).map(|(out, lse)| vec![out, lse])
        });
        compare!(checks, dut, cpu, "attention_backward", shape, tol, |b| {
            let (q, k, v) = (b.input(&q)?, b.input(&k)?, b.input(&v)?);
            let (out, lse) = b.attention_with_lse(&q, &k, &v)?;
            b.attention_backward(&q, &k, &v, &out, &lse, &b.input(&g_out)?).map(Vec::from)
        });
    }
    Ok(checks)
}

/// The worst error over named gradients, as one check (the name of the worst in its shape).
fn worst_of(op: String, candidate: &BTreeMap<String, HostTensor>, reference: &BTreeMap<String, HostTensor>) -> Check {
    let first = reference.keys().next().cloned().unwrap_or_default();
    let mut worst = (if candidate.len() == reference.len() { 0.0 } else { f64::INFINITY }, first);
    for (name, r) in reference {
        let err = candidate.get(name).map_or(f64::INFINITY, |c| max_rel_err(c, r));
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    Check { op, shape: format!("{} tensors, worst {}", reference.len(), worst.1), max_rel_err: worst.0, tolerance: BF16_BACKWARD_TOLERANCE }
}

/// One training step's backward of the `preset` on `dut` and on the CPU, from the same seeded
/// bf16 weights and inputs as `model_check` and a seeded output gradient: LoRA training (a rank-3
/// adapter on every token-path linear, the input gradient and every adapter factor's compared),
/// then full training of the same model without adapters (every base parameter's gradient).
pub fn backward_model_check<D: BackwardOps>(dut: &D, preset: &str, grid: (usize, usize), seed: u64) -> Result<Vec<Check>> {
    let cpu = &CpuBackend::new();
    let params = FluxParams::preset(preset)?;
    let inputs = FluxInputs::random(&params, 1, grid, 16, seed);
    let round = |t: &HostTensor| HostTensor::from_f32(t.shape.clone(), t.to_f32().iter().map(|&x| bf16::from_f32(x).to_f32()).collect());
    let inputs = FluxInputs { img: round(&inputs.img), txt: round(&inputs.txt), y: round(&inputs.y), ..inputs };
    let out_shape = [1, grid.0 * grid.1, params.out_channels];
    let g_out = gaussian(&out_shape, seed ^ 0x9e37);
    let adapter = every_token_linear_adapter(&params, seed)?;
    let shape = format!("{} img + 16 txt tokens", grid.0 * grid.1);

    let mut checks = Vec::new();
    for lora in [Some(&adapter), None] {
        let reference = training_grads(cpu, &params, &inputs, &g_out, lora, seed)?;
        dut.poison_outputs(true);
        let candidate = training_grads(dut, &params, &inputs, &g_out, lora, seed);
        dut.poison_outputs(false);
        let candidate = candidate?;
        // The input gradient apart from the parameters' (whose names never are "img").
        let split = |mut g: BTreeMap<String, HostTensor>| {
            let img: BTreeMap<String, HostTensor> = g.remove_entry("img").into_iter().collect();
            (img, g)
        };
        let ((cand_img, cand_params), (ref_img, ref_params)) = (split(candidate), split(reference));
        let what = if lora.is_some() { "lora" } else { "full" };
        checks.push(worst_of(format!("backward {preset} {what}: input"), &cand_img, &ref_img));
        checks.push(worst_of(format!("backward {preset} {what}: parameters"), &cand_params, &ref_params));
    }
    for c in &mut checks {
        c.shape = format!("{shape}, {}", c.shape);
    }
    Ok(checks)
}

/// A rank-3 adapter on every token-path linear of the `preset` (whole outputs), with seeded bf16
/// factors sized so that the update is a fair fraction of the base weight's.
fn every_token_linear_adapter(params: &FluxParams, seed: u64) -> Result<LoraAdapter> {
    let cpu = &CpuBackend::new();
    let mut w = WeightLoader::random(cpu, seed).with_dtype(Some(DType::BF16));
    let model = Flux::build(params, &mut w)?;
    let rank = 3;
    let parts = crate::model::params::token_path(&model)
        .into_iter()
        .enumerate()
        .map(|(i, lin)| {
            let (out_f, in_f) = (lin.weight.dim(0), lin.weight.dim(1));
            let down = weight(&[rank, in_f], seed ^ (2 * i as u64 + 1) << 20, 1.0 / (in_f as f32).sqrt());
            let up = weight(&[out_f, rank], seed ^ (2 * i as u64 + 2) << 20, 0.5 / (rank as f32).sqrt());
            LoraPart { target: lin.name.clone(), out_offset: 0, down, up, up_bias: None, scale: 1.0, source: lin.name.clone() }
        })
        .collect();
    Ok(LoraAdapter { path: "selftest.safetensors".into(), layout: LoraLayout::Bfl, parts, replacements: vec![], skipped: vec![] })
}

/// The gradients of one training step on backend `b`, downloaded: "img" for the input, the
/// adapter factors as "<target>[i].down" / ".up" when `adapter` is trained, else (full training)
/// the base parameters by checkpoint key.
fn training_grads<B: BackwardOps>(
    b: &B,
    params: &FluxParams,
    inputs: &FluxInputs,
    g_out: &HostTensor,
    adapter: Option<&LoraAdapter>,
    seed: u64,
) -> Result<BTreeMap<String, HostTensor>> {
    let mut w = WeightLoader::random(b, seed).with_dtype(Some(DType::BF16));
    let model = Flux::build(params, &mut w)?;
    w.finish()?;
    let adapters = adapter.map(|a| Adapters::from_file(b, &model, a)).transpose()?;
    let tr = adapters.as_ref().map_or(Trainable::Full, Trainable::Lora);
    let c = Conditioning::new(b, &model, &inputs.txt, &inputs.y, inputs.guidance.as_ref(), &inputs.txt_ids, &inputs.img_ids)?;
    let img = b.input(&inputs.img)?;
    let (_, acts) = model.forward_train(b, &img, &scalars(b, &inputs.timesteps)?, &c, tr, Checkpointing::Off)?;
    let grads = model.backward(b, &img, &c, tr, acts, &b.input(g_out)?)?;
    let mut out = BTreeMap::from([("img".to_string(), b.download(&grads.img)?)]);
    for (target, deltas) in &grads.lora {
        for (i, g) in deltas.iter().enumerate() {
            out.insert(format!("{target}[{i}].down"), b.download(&g.down)?);
            out.insert(format!("{target}[{i}].up"), b.download(&g.up)?);
        }
    }
    for (name, g) in &grads.base {
        out.insert(name.clone(), b.download(g)?);
    }
    Ok(out)
}
mod training;
pub use training::{training_checks, SDPO_TOLERANCE};

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> HostTensor {
        HostTensor::from_f32(vec![v.len()], v.to_vec())
    }

    #[test]
    fn relative_error_is_normwise_and_rejects_poison_and_shape_mismatch() {
        assert_eq!(max_rel_err(&t(&[1.0, -2.0]), &t(&[1.0, -2.0])), 0.0);
        // Worst absolute error 0.1 against a reference whose largest magnitude is 4.
        assert!((max_rel_err(&t(&[1.1, 4.0, 0.0]), &t(&[1.0, 4.0, 0.05])) - 0.1 / 4.0).abs() < 1e-6);
        assert!(max_rel_err(&t(&[f32::NAN, 1.0]), &t(&[0.0, 1.0])).is_infinite());
        assert!(max_rel_err(&t(&[f32::INFINITY]), &t(&[1.0])).is_infinite());
        assert!(max_rel_err(&t(&[1.0, 2.0]), &HostTensor::from_f32(vec![2, 1], vec![1.0, 2.0])).is_infinite());
        assert_eq!(max_rel_err(&t(&[0.0]), &t(&[0.0])), 0.0);
        assert!(max_rel_err(&t(&[1e-3]), &t(&[0.0])).is_infinite());
    }

    #[test]
    fn a_check_passes_only_within_tolerance() {
        let c = |e: f64| Check { op: "x".into(), shape: "[1]".into(), max_rel_err: e, tolerance: 1e-2 };
        assert!(c(0.0).passed() && c(1e-2).passed());
        assert!(!c(1.01e-2).passed() && !c(f64::INFINITY).passed() && !c(f64::NAN).passed());
    }

    #[test]
    fn the_table_lists_every_check_and_counts_failures() {
        let checks = vec![
            Check { op: "linear".into(), shape: "[2,3]".into(), max_rel_err: 1e-3, tolerance: 1e-2 },
            Check { op: "attention".into(), shape: "[1,2,3,4]".into(), max_rel_err: f64::INFINITY, tolerance: 1e-2 },
        ];
        let table = render_table(&checks);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[1].starts_with("linear") && lines[1].ends_with("pass"), "{table}");
        assert!(lines[2].starts_with("attention") && lines[2].contains("NaN/inf") && lines[2].ends_with("FAIL"), "{table}");
        assert_eq!(lines[3], "2 checks, 1 passed, 1 failed");
    }

    /// The reference against itself: every check passes exactly, so the harness (inputs, shapes,
    /// the closures' argument order) runs through without a GPU; and every op of `BackwardOps` is
    /// covered.
    #[test]
    fn backward_op_checks_pass_on_the_reference_and_cover_every_op() {
        let checks = backward_op_checks(&CpuBackend::new(), 3).unwrap();
        assert!(checks.iter().all(|c| c.max_rel_err == 0.0), "{}", render_table(&checks));
        let ops: std::collections::BTreeSet<&str> = checks.iter().map(|c| c.op.split('[').next().unwrap()).collect();
        let every = [
            "linear_backward_input",
            "linear_backward_params",
            "lora_backward",
            "gelu_tanh_backward",
            "layer_norm_modulate_backward",
            "layer_norm_modulate_backward_shift_scale",
            "qk_norm_rope_backward",
            "attention_with_lse",
            "attention_backward",
            "gated_residual_backward",
            "gated_residual_backward_gate",
            "silu_backward",
        ];
        assert_eq!(ops, every.into_iter().collect());
    }

    #[test]
    fn backward_model_check_passes_on_the_reference() {
        let checks = backward_model_check(&CpuBackend::new(), "flux-tiny", (3, 4), 5).unwrap();
        assert_eq!(checks.len(), 4, "{}", render_table(&checks));
        assert!(checks.iter().all(|c| c.max_rel_err == 0.0), "{}", render_table(&checks));
        // The LoRA parameters are the adapters' factors, full training's the base weights.
        assert!(checks[1].shape.contains(".down") || checks[1].shape.contains(".up"), "{}", render_table(&checks));
        assert!(checks[3].shape.contains(".weight") || checks[3].shape.contains(".bias"), "{}", render_table(&checks));
    }

    #[test]
    fn the_worst_gradient_decides_and_a_missing_one_fails() {
        let reference = BTreeMap::from([("a".to_string(), t(&[1.0, 2.0])), ("b".to_string(), t(&[4.0]))]);
        let mut candidate = reference.clone();
        candidate.insert("b".into(), t(&[4.4]));
        let c = worst_of("x".into(), &candidate, &reference);
        assert!((c.max_rel_err - 0.1).abs() < 1e-6 && c.shape.ends_with("worst b"), "{c:?}");
        candidate.remove("a");
        assert!(!worst_of("x".into(), &candidate, &reference).passed());
    }
}
