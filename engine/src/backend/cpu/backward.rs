//! The CPU reference of the backward ops (`backend::backward`, whose header states the
//! conventions). Like the forward: f32 compute, row statistics in f64, rayon over rows or heads,
//! products through `matmul::matmul`. That wrapper takes its left operand row-major, so the
//! products of a transposed activation (`g^T x` in the LoRA and attention weight gradients) use a
//! transposed copy of the smaller operand: a copy the size of one operand, against a product
//! `k` times larger.

use super::matmul::{matmul, Rhs};
use super::{act, dtype_of, f32_tensor, layout, per_sample_dims, spatial, timed, widen, CpuBackend, T};
use crate::backend::backward::{BackwardOps, LoraAddGrads};
use crate::backend::expect_shape;
use crate::backend::profile::OpClass;
use crate::backend::shapes::QkBackwardDims;
use anyhow::{bail, ensure, Result};
use loaders::HostData;
use rayon::prelude::*;
use std::borrow::Cow;

/// Query rows per attention step, as in the forward (`attention.rs`).
const QUERY_BLOCK: usize = 64;

impl BackwardOps for CpuBackend {
    fn linear_backward_input(&self, gy: &T, w: &T) -> Result<T> {
        timed(OpClass::of_linear(gy.rank()), || {
            const OP: &str = "linear_backward_input";
            ensure!(w.rank() == 2, "{OP}: weight has shape {:?}, expected [out, in]", w.shape());
            let (out_f, in_f) = (w.dim(0), w.dim(1));
            ensure!(
                gy.rank() >= 1 && gy.dim(-1) == out_f,
                "{OP}: output gradient has shape {:?}, weight {:?} gives {out_f} features",
                gy.shape(),
                w.shape()
            );
            let rows = gy.elem_count() / out_f;
            let mut gx = vec![0f32; rows * in_f];
            matmul(&mut gx, act(OP, gy)?, &widen(w), rows, in_f, out_f, Rhs::Normal, false, true);
            let mut shape = gy.shape().to_vec();
            *shape.last_mut().unwrap() = in_f;
            Ok(f32_tensor(gx, shape))
        })
    }

    fn linear_backward_params(&self, gy: &T, x: &T) -> Result<(T, T)> {
        timed(OpClass::of_linear(gy.rank()), || {
            const OP: &str = "linear_backward_params";
            ensure!(gy.rank() >= 1 && x.rank() >= 1, "{OP}: output gradient {:?} and input {:?} must have features", gy.shape(), x.shape());
            let (out_f, in_f) = (gy.dim(-1), x.dim(-1));
            let leading = &x.shape()[..x.rank() - 1];
            ensure!(
                gy.shape()[..gy.rank() - 1] == *leading,
                "{OP}: output gradient has shape {:?}, input {:?}: their leading dimensions differ",
                gy.shape(),
                x.shape()
            );
            let rows: usize = leading.iter().product();
            let (gy_v, x_v) = (act(OP, gy)?, act(OP, x)?);
            // g_weight = gy^T @ x transposes the narrower operand: gy as it stands, or x for the
            // product's transpose x^T @ gy, whose result is then turned back (a weight-sized copy,
            // against a product `rows` times larger).
            let g_weight = if out_f <= in_f {
                let mut g = vec![0f32; out_f * in_f];
                matmul(&mut g, &spatial::transpose_last2(gy_v, 1, rows, out_f), x_v, out_f, in_f, rows, Rhs::Normal, false, true);
                g
            } else {
                let mut g_t = vec![0f32; in_f * out_f];
                matmul(&mut g_t, &spatial::transpose_last2(x_v, 1, rows, in_f), gy_v, in_f, out_f, rows, Rhs::Normal, false, true);
                spatial::transpose_last2(&g_t, 1, in_f, out_f)
            };
            let g_bias = sum_over_tokens(1, rows, out_f, |row, acc| {
                for (a, &g) in acc.iter_mut().zip(&gy_v[row * out_f..(row + 1) * out_f]) {
                    *a += g as f64;
                }
            });
            Ok((f32_tensor(g_weight, vec![out_f, in_f]), f32_tensor(g_bias, vec![out_f])))
        })
    }

    fn lora_backward(&self, gx: T, gy: &T, x: &T, down: &T, up: &T, scale: f32, offset: usize) -> Result<LoraAddGrads<Self>> {
        timed(OpClass::of_lora(x.rank()), || {
            const OP: &str = "lora_backward";
            ensure!(down.rank() == 2 && up.rank() == 2, "{OP}: down {:?} and up {:?} must be matrices", down.shape(), up.shape());
            let (rank, in_f, out_len) = (down.dim(0), down.dim(1), up.dim(0));
            expect_shape("up", OP, up.shape(), &[out_len, rank])?;
            ensure!(x.rank() >= 1 && x.dim(-1) == in_f, "{OP}: input has shape {:?}, down expects {in_f} features", x.shape());
            expect_shape("input gradient", OP, gx.shape(), x.shape())?;
            let (rows, width) = (x.elem_count() / in_f, gy.dim(-1));
            ensure!(
                gy.elem_count() == rows * width && offset + out_len <= width,
                "{OP}: update of {out_len} columns at {offset} does not fit output gradient {:?} of input {:?}",
                gy.shape(),
                x.shape()
            );
            let (x_v, gy_v, down_v, up_v) = (act(OP, x)?, act(OP, gy)?, widen(down), widen(up));
            // The adapter's columns of gy, contiguous for the products.
            let gy_part: Cow<[f32]> =
                if out_len == width { Cow::Borrowed(gy_v) } else { Cow::Owned(layout::narrow(gy_v, width, offset, out_len, rows, 1)) };

            // g_h = scale * gy_part @ up: the gradient of the rank-sized activation h = x @ down^T.
            let mut g_h = vec![0f32; rows * rank];
            matmul(&mut g_h, &gy_part, &up_v, rows, rank, out_len, Rhs::Normal, false, true);
            g_h.iter_mut().for_each(|v| *v *= scale);

            let gx_shape = gx.shape().to_vec();
            let mut gx_v = into_activation(OP, gx)?;
            matmul(&mut gx_v, &g_h, &down_v, rows, in_f, rank, Rhs::Normal, true, true);

            let mut g_down = vec![0f32; rank * in_f];
            matmul(&mut g_down, &spatial::transpose_last2(&g_h, 1, rows, rank), x_v, rank, in_f, rows, Rhs::Normal, false, true);

            // g_up = scale * gy_part^T @ h, computed as its transpose h^T @ gy_part so that only the
            // rank-sized operands are transposed.
            let mut h = vec![0f32; rows * rank];
            matmul(&mut h, x_v, &down_v, rows, rank, in_f, Rhs::Transposed, false, true);
            let mut g_up_t = vec![0f32; rank * out_len];
            matmul(&mut g_up_t, &spatial::transpose_last2(&h, 1, rows, rank), &gy_part, rank, out_len, rows, Rhs::Normal, false, true);
            let mut g_up = spatial::transpose_last2(&g_up_t, 1, rank, out_len);
            g_up.iter_mut().for_each(|v| *v *= scale);

            Ok(LoraAddGrads {
                gx: f32_tensor(gx_v, gx_shape),
                down: f32_tensor(g_down, vec![rank, in_f]),
                up: f32_tensor(g_up, vec![out_len, rank]),
            })
        })
    }

    fn gelu_tanh_backward(&self, x_pre: &T, gy: &T) -> Result<T> {
        timed(OpClass::Elementwise, || {
            const OP: &str = "gelu_tanh_backward";
            expect_shape("output gradient", OP, gy.shape(), x_pre.shape())?;
            let gx = act(OP, x_pre)?.par_iter().zip(act(OP, gy)?).map(|(&x, &g)| g * gelu_tanh_derivative(x)).collect();
            Ok(f32_tensor(gx, x_pre.shape().to_vec()))
        })
    }

    fn layer_norm_modulate_backward(&self, x: &T, scale: &T, gy: &T, eps: f32) -> Result<T> {
        timed(OpClass::Elementwise, || {
            const OP: &str = "layer_norm_modulate_backward";
            let (_, tokens, dim) = per_sample_dims(OP, x, &[("scale", scale)])?;
            expect_shape("output gradient", OP, gy.shape(), x.shape())?;
            let (x_v, gy_v, scale_v) = (act(OP, x)?, act(OP, gy)?, widen(scale));
            let mut gx = vec![0f32; x.elem_count()];
            gx.par_chunks_mut(dim).zip(x_v.par_chunks(dim).zip(gy_v.par_chunks(dim))).enumerate().for_each(|(row, (gx, (xr, gr)))| {
                let sc = &scale_v[(row / tokens) * dim..(row / tokens + 1) * dim];
                let n = dim as f64;
                let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                let rstd = 1.0 / (var + eps as f64).sqrt();
                // With x_hat = (x - mean) rstd and g = (1 + scale) gy the gradient of x_hat:
                // gx = rstd (g - mean(g) - x_hat mean(g x_hat)).
                let g_hat = |i: usize| (1.0 + sc[i] as f64) * gr[i] as f64;
                let x_hat = |i: usize| (xr[i] as f64 - mean) * rstd;
                let mean_g = (0..dim).map(g_hat).sum::<f64>() / n;
                let mean_g_x = (0..dim).map(|i| g_hat(i) * x_hat(i)).sum::<f64>() / n;
                for (i, v) in gx.iter_mut().enumerate() {
                    *v = (rstd * (g_hat(i) - mean_g - x_hat(i) * mean_g_x)) as f32;
                }
            });
            Ok(f32_tensor(gx, x.shape().to_vec()))
        })
    }

    fn layer_norm_modulate_backward_shift_scale(&self, x: &T, gy: &T, eps: f32) -> Result<(T, T)> {
        timed(OpClass::Elementwise, || {
            const OP: &str = "layer_norm_modulate_backward_shift_scale";
            ensure!(x.rank() == 3, "{OP}: x has shape {:?}, expected [batch, tokens, dim]", x.shape());
            expect_shape("output gradient", OP, gy.shape(), x.shape())?;
            let (b, l, d) = (x.dim(0), x.dim(1), x.dim(2));
            let (x_v, gy_v) = (act(OP, x)?, act(OP, gy)?);
            // Each sample's accumulator holds g_shift then g_scale.
            let sums = sum_over_tokens(b, l, 2 * d, |row, acc| {
                let (xr, gr) = (&x_v[row * d..(row + 1) * d], &gy_v[row * d..(row + 1) * d]);
                let n = d as f64;
                let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                let rstd = 1.0 / (var + eps as f64).sqrt();
                let (g_shift, g_scale) = acc.split_at_mut(d);
                for i in 0..d {
                    g_shift[i] += gr[i] as f64;
                    g_scale[i] += gr[i] as f64 * (xr[i] as f64 - mean) * rstd;
                }
            });
            let (mut g_shift, mut g_scale) = (Vec::with_capacity(b * d), Vec::with_capacity(b * d));
            for sample in sums.chunks(2 * d) {
                g_shift.extend_from_slice(&sample[..d]);
                g_scale.extend_from_slice(&sample[d..]);
            }
            Ok((f32_tensor(g_shift, vec![b, d]), f32_tensor(g_scale, vec![b, d])))
        })
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
    ) -> Result<T> {
        timed(OpClass::Elementwise, || {
            const OP: &str = "qk_norm_rope_backward";
            let d = QkBackwardDims::new(
                x.shape(),
                heads,
                (q_scale.shape(), k_scale.shape(), pe.shape()),
                g_qkv.map(T::shape),
                tail.map(T::shape),
            )?;
            let (b, l, w, hd, qkv_w, tail_w) = (d.batch, d.tokens, d.width, d.head_dim, d.qkv, d.tail);
            let (x_v, pe_v, q_scale, k_scale) = (act(OP, x)?, widen(pe), widen(q_scale), widen(k_scale));
            let g = [act(OP, g_qkv[0])?, act(OP, g_qkv[1])?, act(OP, g_qkv[2])?];
            let tail_v = tail.map(|t| act(OP, t)).transpose()?;
            let mut gx = vec![0f32; b * l * w];
            // One task per token row: it gathers the row's head vectors from the three gradients.
            gx.par_chunks_mut(w).enumerate().for_each(|(row, gx_row)| {
                let (bi, li) = (row / l, row % l);
                let rot = &pe_v[row * hd..(row + 1) * hd];
                for (which, g_which) in g.iter().enumerate() {
                    for h in 0..heads {
                        let col = (which * heads + h) * hd;
                        let src = ((bi * heads + h) * l + li) * hd;
                        let (g_head, dst) = (&g_which[src..src + hd], &mut gx_row[col..col + hd]);
                        if which == 2 {
                            dst.copy_from_slice(g_head);
                        } else {
                            unrotate_pairs(dst, g_head, rot);
                            let x_head = &x_v[row * w + col..row * w + col + hd];
                            rms_norm_backward_in_place(dst, x_head, if which == 0 { &q_scale } else { &k_scale }, eps);
                        }
                    }
                }
                if let Some(t) = tail_v {
                    gx_row[qkv_w..].copy_from_slice(&t[row * tail_w..(row + 1) * tail_w]);
                }
            });
            Ok(f32_tensor(gx, vec![b, l, w]))
        })
    }

    fn attention_backward(&self, q: &T, k: &T, v: &T, out: &T, lse: &T, g_out: &T) -> Result<[T; 3]> {
        timed(OpClass::Attention, || {
            const OP: &str = "attention_backward";
            ensure!(q.rank() == 4, "{OP}: q has shape {:?}, expected [batch, heads, tokens, head_dim]", q.shape());
            let (b, h, lq, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
            ensure!(k.rank() == 4, "{OP}: k has shape {:?}, expected [batch, heads, tokens, head_dim]", k.shape());
            let lk = k.dim(2);
            expect_shape("k", OP, k.shape(), &[b, h, lk, d])?;
            expect_shape("v", OP, v.shape(), &[b, h, lk, d])?;
            expect_shape("output", OP, out.shape(), &[b, lq, h * d])?;
            expect_shape("output gradient", OP, g_out.shape(), &[b, lq, h * d])?;
            expect_shape("lse", OP, lse.shape(), &[b, h, lq])?;
            let dims = AttentionDims { batch: b, heads: h, lq, lk, d };
            let [gq, gk, gv] =
                attention_backward(act(OP, q)?, act(OP, k)?, act(OP, v)?, act(OP, out)?, act(OP, lse)?, act(OP, g_out)?, &dims);
            Ok([f32_tensor(gq, q.shape().to_vec()), f32_tensor(gk, k.shape().to_vec()), f32_tensor(gv, v.shape().to_vec())])
        })
    }

    fn gated_residual_backward(&self, gy: &T, gate: &T) -> Result<T> {
        timed(OpClass::Elementwise, || {
            const OP: &str = "gated_residual_backward";
            let (_, tokens, dim) = per_sample_dims(OP, gy, &[("gate", gate)])?;
            let (gy_v, gate_v) = (act(OP, gy)?, widen(gate));
            let mut g_branch = vec![0f32; gy.elem_count()];
            g_branch.par_chunks_mut(dim).zip(gy_v.par_chunks(dim)).enumerate().for_each(|(row, (o, gr))| {
                let gate_row = &gate_v[(row / tokens) * dim..(row / tokens + 1) * dim];
                for ((o, &g), &t) in o.iter_mut().zip(gr).zip(gate_row) {
                    *o = t * g;
                }
            });
            Ok(f32_tensor(g_branch, gy.shape().to_vec()))
        })
    }

    fn gated_residual_backward_gate(&self, gy: &T, y: &T) -> Result<T> {
        timed(OpClass::Elementwise, || {
            const OP: &str = "gated_residual_backward_gate";
            ensure!(gy.rank() == 3, "{OP}: output gradient has shape {:?}, expected [batch, tokens, dim]", gy.shape());
            expect_shape("branch", OP, y.shape(), gy.shape())?;
            let (b, l, d) = (gy.dim(0), gy.dim(1), gy.dim(2));
            let (gy_v, y_v) = (act(OP, gy)?, act(OP, y)?);
            let g_gate = sum_over_tokens(b, l, d, |row, acc| {
                for ((a, &g), &v) in acc.iter_mut().zip(&gy_v[row * d..(row + 1) * d]).zip(&y_v[row * d..(row + 1) * d]) {
                    *a += g as f64 * v as f64;
                }
            });
            Ok(f32_tensor(g_gate, vec![b, d]))
        })
    }

    fn silu_backward(&self, x: &T, gy: &T) -> Result<T> {
        timed(OpClass::Elementwise, || {
            const OP: &str = "silu_backward";
            expect_shape("output gradient", OP, gy.shape(), x.shape())?;
            let gx = act(OP, x)?
                .par_iter()
                .zip(act(OP, gy)?)
                .map(|(&x, &g)| {
                    let s = 1.0 / (1.0 + (-x).exp());
                    g * s * (1.0 + x * (1.0 - s))
                })
                .collect();
            Ok(f32_tensor(gx, x.shape().to_vec()))
        })
    }
}

/// Rows per task of `sum_over_tokens`.
const TOKEN_CHUNK: usize = 64;

/// Per-sample sums over tokens: `add_row(row, acc)` adds the terms of row `row` (of
/// `samples * tokens`) to acc `[width]`; returns `[samples, width]`. Rows are summed in f64 in
/// fixed chunks, whose partial sums are then added in order, so that the result does not depend
/// on how rayon schedules the chunks (activation checkpointing must reproduce it exactly).
fn sum_over_tokens(samples: usize, tokens: usize, width: usize, add_row: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f32> {
    let chunks = tokens.div_ceil(TOKEN_CHUNK);
    let partial: Vec<Vec<f64>> = (0..samples * chunks)
        .into_par_iter()
        .map(|task| {
            let (sample, chunk) = (task / chunks, task % chunks);
            let mut acc = vec![0f64; width];
            for token in chunk * TOKEN_CHUNK..((chunk + 1) * TOKEN_CHUNK).min(tokens) {
                add_row(sample * tokens + token, &mut acc);
            }
            acc
        })
        .collect();
    let mut out = Vec::with_capacity(samples * width);
    for sample in partial.chunks(chunks.max(1)).take(samples) {
        let mut acc = vec![0f64; width];
        for p in sample {
            acc.iter_mut().zip(p).for_each(|(a, v)| *a += v);
        }
        out.extend(acc.iter().map(|&a| a as f32));
    }
    out.resize(samples * width, 0.0);
    out
}

/// An activation's buffer taken over, to accumulate into.
fn into_activation(op: &str, t: T) -> Result<Vec<f32>> {
    match t.into_storage() {
        HostData::F32(v) => Ok(v),
        other => bail!("{op}: activation stored as {} (expected F32)", dtype_of(&other)),
    }
}

/// d/dx of `elementwise::gelu_tanh(x) = x (1 + tanh(u)) / 2` with `u = K (x + 0.044715 x^3)`.
fn gelu_tanh_derivative(x: f32) -> f32 {
    const K: f32 = 0.797_884_6;
    let t = (K * (x + 0.044715 * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * K * (1.0 + 3.0 * 0.044715 * x * x)
}

/// The transpose of `rope::rotate_pairs`: writes each pair of `g` rotated by minus its angle.
fn unrotate_pairs(dst: &mut [f32], g: &[f32], pe: &[f32]) {
    for ((d, g), cs) in dst.chunks_exact_mut(2).zip(g.chunks_exact(2)).zip(pe.chunks_exact(2)) {
        let (c, s) = (cs[0], cs[1]);
        d[0] = c * g[0] + s * g[1];
        d[1] = c * g[1] - s * g[0];
    }
}

/// Backward of `norm::rms_norm_in_place` (`y = x r scale`, `r = rsqrt(mean(x^2) + eps)`): turns
/// `g` = dL/dy into dL/dx = `r scale g - x r^3 mean(x scale g)`, in place.
fn rms_norm_backward_in_place(g: &mut [f32], x: &[f32], scale: &[f32], eps: f32) {
    let n = x.len() as f64;
    let r = 1.0 / (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n + eps as f64).sqrt();
    let mean_xsg = g.iter().zip(x).zip(scale).map(|((&g, &x), &s)| g as f64 * s as f64 * x as f64).sum::<f64>() / n;
    for ((g, &x), &s) in g.iter_mut().zip(x).zip(scale) {
        *g = (r * s as f64 * *g as f64 - x as f64 * r.powi(3) * mean_xsg) as f32;
    }
}

/// `ln sum_j exp(q_i . k_j / sqrt(d))` for every query row of `heads_total` heads, one query block
/// at a time like the forward.
pub(super) fn row_log_sum_exp(q: &[f32], k: &[f32], heads_total: usize, lq: usize, lk: usize, d: usize) -> Vec<f32> {
    let scale = 1.0 / (d as f32).sqrt();
    let mut lse = vec![0f32; heads_total * lq];
    lse.par_chunks_mut(lq).enumerate().for_each(|(bh, lse_head)| {
        let kh = &k[bh * lk * d..(bh + 1) * lk * d];
        lse_head.par_chunks_mut(QUERY_BLOCK).enumerate().for_each(|(blk, lse_block)| {
            let (r0, rows) = (blk * QUERY_BLOCK, lse_block.len());
            let mut scores = vec![0f32; rows * lk];
            matmul(&mut scores, &q[(bh * lq + r0) * d..(bh * lq + r0 + rows) * d], kh, rows, lk, d, Rhs::Transposed, false, false);
            for (l, row) in lse_block.iter_mut().zip(scores.chunks(lk)) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
                let sum: f64 = row.iter().map(|&s| ((s * scale - max) as f64).exp()).sum();
                *l = (max as f64 + sum.ln()) as f32;
            }
        });
    });
    lse
}

struct AttentionDims {
    batch: usize,
    heads: usize,
    lq: usize,
    lk: usize,
    d: usize,
}

/// The attention gradients, one rayon task per (batch, head): gq of each query block is written
/// once, gk and gv sum over the query blocks in the task's own rows, so tasks share no output.
/// Per block, P is rebuilt from the scores and the saved lse: memory stays O(block x Lk).
fn attention_backward(q: &[f32], k: &[f32], v: &[f32], out: &[f32], lse: &[f32], g_out: &[f32], dims: &AttentionDims) -> [Vec<f32>; 3] {
    let &AttentionDims { batch, heads, lq, lk, d } = dims;
    let scale = 1.0 / (d as f32).sqrt();
    let mut gq = vec![0f32; batch * heads * lq * d];
    let mut gk = vec![0f32; batch * heads * lk * d];
    let mut gv = vec![0f32; batch * heads * lk * d];
    let per_head = gq.par_chunks_mut(lq * d).zip(gk.par_chunks_mut(lk * d).zip(gv.par_chunks_mut(lk * d)));
    per_head.enumerate().for_each(|(bh, (gq_h, (gk_h, gv_h)))| {
        let (b, h) = (bh / heads, bh % heads);
        let kh = &k[bh * lk * d..(bh + 1) * lk * d];
        let vh = &v[bh * lk * d..(bh + 1) * lk * d];
        for r0 in (0..lq).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(lq - r0);
            let qb = &q[(bh * lq + r0) * d..(bh * lq + r0 + rows) * d];
            // This head's rows of the merged output gradient, and delta_i = g_out_i . out_i
            // (= sum_j P_ij gP_ij, the softmax's correction term).
            let mut g_ob = vec![0f32; rows * d];
            let mut delta = vec![0f32; rows];
            for i in 0..rows {
                let src = ((b * lq + r0 + i) * heads + h) * d;
                g_ob[i * d..(i + 1) * d].copy_from_slice(&g_out[src..src + d]);
                delta[i] = g_out[src..src + d].iter().zip(&out[src..src + d]).map(|(&g, &o)| g as f64 * o as f64).sum::<f64>() as f32;
            }
            let mut p = vec![0f32; rows * lk];
            matmul(&mut p, qb, kh, rows, lk, d, Rhs::Transposed, false, false);
            for (row, &l) in p.chunks_mut(lk).zip(&lse[bh * lq + r0..bh * lq + r0 + rows]) {
                row.iter_mut().for_each(|s| *s = (*s * scale - l).exp());
            }
            matmul(gv_h, &spatial::transpose_last2(&p, 1, rows, lk), &g_ob, lk, d, rows, Rhs::Normal, true, false);
            // gS = P (g_out v^T - delta), with the score scale folded in for gq and gk.
            let mut g_s = vec![0f32; rows * lk];
            matmul(&mut g_s, &g_ob, vh, rows, lk, d, Rhs::Transposed, false, false);
            for ((gs_row, p_row), &dl) in g_s.chunks_mut(lk).zip(p.chunks(lk)).zip(&delta) {
                for (gs, &pv) in gs_row.iter_mut().zip(p_row) {
                    *gs = pv * (*gs - dl) * scale;
                }
            }
            matmul(&mut gq_h[r0 * d..(r0 + rows) * d], &g_s, kh, rows, d, lk, Rhs::Normal, false, false);
            matmul(gk_h, &spatial::transpose_last2(&g_s, 1, rows, lk), qb, lk, d, rows, Rhs::Normal, true, false);
        }
    });
    [gq, gk, gv]
}

#[cfg(test)]
mod tests {
    //! Every op against central differences of a naive f64 forward (checked against the CPU
    //! forward op first, so that it is the function the backward claims to differentiate). The
    //! loss is `sum(gy * forward(x))` with random gy; the analytic gradient is in f32, the
    //! differences in f64, so agreement is expected to ~1e-5 and asserted at 1e-4.
    use super::*;
    use crate::backend::Backend;
    use loaders::{DType, HostTensor};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    const STEP: f64 = 1e-4;
    const TOL: f64 = 1e-4;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    fn randn(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        (0..n).map(|_| StandardNormal.sample(rng)).collect()
    }

    fn tensor(data: Vec<f32>, shape: &[usize]) -> T {
        f32_tensor(data, shape.to_vec())
    }

    /// A weight stored as `dtype`; returns it with the values it actually holds.
    fn weight(data: Vec<f32>, shape: &[usize], dtype: DType) -> (T, Vec<f64>) {
        let t = CpuBackend.upload(&HostTensor::from_f32(shape.to_vec(), data).cast(dtype)).unwrap();
        let held = f64s(&widen(&t));
        (t, held)
    }

    fn f64s(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn values(t: &T) -> Vec<f32> {
        act("test", t).unwrap().to_vec()
    }

    fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g as f64 - w).abs() <= tol * (1.0 + w.abs()), "{what} at {i}: {g} vs {w}");
        }
    }

    #[derive(Clone, Copy)]
    enum Probe {
        /// One unit direction per element: for small inputs.
        EveryElement,
        /// Random Gaussian directions, seeded: for inputs too large to probe element by element.
        Random(usize),
    }

    /// Checks `grad`, the analytic gradient of `loss` at `x`, against central differences of `loss`
    /// along the directions of `probe`. The error is measured against `|numeric|` plus the size
    /// `<grad, dir>` has for a random direction of the same length, so that an element whose
    /// derivative happens to vanish does not demand an absolute agreement f32 cannot give.
    fn check_gradient(what: &str, x: &[f32], grad: &[f32], loss: impl Fn(&[f64]) -> f64, probe: Probe) {
        assert_eq!(x.len(), grad.len(), "{what}: gradient has {} elements for an input of {}", grad.len(), x.len());
        let n = x.len();
        let (x0, g) = (f64s(x), f64s(grad));
        let g_norm = dot(&g, &g).sqrt();
        let mut r = rng(n as u64);
        let directions: Box<dyn Iterator<Item = Vec<f64>>> = match probe {
            Probe::EveryElement => Box::new((0..n).map(|i| (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect())),
            Probe::Random(count) => Box::new((0..count).map(move |_| f64s(&randn(n, &mut r)))),
        };
        for (di, dir) in directions.enumerate() {
            let at = |t: f64| loss(&x0.iter().zip(&dir).map(|(x, d)| x + t * d).collect::<Vec<_>>());
            let numeric = (at(STEP) - at(-STEP)) / (2.0 * STEP);
            let analytic = dot(&g, &dir);
            let typical = g_norm * (dot(&dir, &dir) / n as f64).sqrt();
            assert!(
                (analytic - numeric).abs() <= TOL * (numeric.abs() + typical),
                "{what}, direction {di}: analytic {analytic} vs numeric {numeric} (typical size {typical})"
            );
        }
    }

    #[test]
    fn linear_input_gradient_matches_differences() {
        let mut r = rng(1);
        for (dtype, (rows, out_f, in_f)) in [(DType::F32, (6, 7, 5)), (DType::BF16, (3, 4, 9)), (DType::F16, (130, 33, 20))] {
            let x = randn(rows * in_f, &mut r);
            let (w, w64) = weight(randn(out_f * in_f, &mut r), &[out_f, in_f], dtype);
            let gy = f64s(&randn(rows * out_f, &mut r));
            let forward = |x: &[f64]| -> Vec<f64> {
                (0..rows * out_f)
                    .map(|ro| dot(&x[(ro / out_f) * in_f..(ro / out_f + 1) * in_f], &w64[(ro % out_f) * in_f..][..in_f]))
                    .collect()
            };
            let y = CpuBackend.linear(&tensor(x.clone(), &[rows, in_f]), &w, None).unwrap();
            assert_close("linear forward", &values(&y), &forward(&f64s(&x)), 1e-5);

            let gy_t = tensor(gy.iter().map(|&v| v as f32).collect(), &[1, rows, out_f]);
            let gx = CpuBackend.linear_backward_input(&gy_t, &w).unwrap();
            assert_eq!(gx.shape(), [1, rows, in_f]);
            let probe = if rows * in_f <= 64 { Probe::EveryElement } else { Probe::Random(4) };
            check_gradient(&format!("linear {dtype} x"), &x, &values(&gx), |x| dot(&gy, &forward(x)), probe);
        }
    }

    #[test]
    fn lora_gradients_match_differences() {
        let mut r = rng(2);
        // (rows, in, rank, width, out_len, offset, weight dtype): a middle part of a wider output,
        // and an adapter covering the whole output in half precision.
        for (rows, in_f, rank, width, out_len, offset, dtype) in [(8, 6, 3, 10, 4, 5, DType::F32), (5, 7, 2, 6, 6, 0, DType::F16)] {
            let scale = 0.7f32;
            let x = randn(rows * in_f, &mut r);
            let (down, down64) = weight(randn(rank * in_f, &mut r), &[rank, in_f], dtype);
            let (up, up64) = weight(randn(out_len * rank, &mut r), &[out_len, rank], dtype);
            let up_bias = randn(out_len, &mut r);
            let y0 = randn(rows * width, &mut r);
            let gy = f64s(&randn(rows * width, &mut r));
            let gx_base = randn(rows * in_f, &mut r);
            // The columns lora_add writes, as a function of (x, down, up).
            let forward = |x: &[f64], down: &[f64], up: &[f64]| -> Vec<f64> {
                let mut y = f64s(&y0);
                for ro in 0..rows {
                    let h: Vec<f64> = (0..rank).map(|k| dot(&x[ro * in_f..(ro + 1) * in_f], &down[k * in_f..(k + 1) * in_f])).collect();
                    for o in 0..out_len {
                        y[ro * width + offset + o] += scale as f64 * (dot(&h, &up[o * rank..(o + 1) * rank]) + up_bias[o] as f64);
                    }
                }
                y
            };
            let shape = [1, rows, in_f];
            let y = CpuBackend
                .lora_add(
                    tensor(y0.clone(), &[1, rows, width]),
                    &tensor(x.clone(), &shape),
                    &down,
                    &up,
                    Some(&tensor(up_bias.clone(), &[out_len])),
                    scale,
                    offset,
                )
                .unwrap();
            assert_close("lora_add forward", &values(&y), &forward(&f64s(&x), &down64, &up64), 1e-5);

            let g = CpuBackend
                .lora_backward(
                    tensor(gx_base.clone(), &shape),
                    &tensor(gy.iter().map(|&v| v as f32).collect(), &[1, rows, width]),
                    &tensor(x.clone(), &shape),
                    &down,
                    &up,
                    scale,
                    offset,
                )
                .unwrap();
            assert_eq!((g.gx.shape(), g.down.shape(), g.up.shape()), (&shape[..], &[rank, in_f][..], &[out_len, rank][..]));
            assert_eq!((g.down.dtype(), g.up.dtype()), (DType::F32, DType::F32));
            let gx_added: Vec<f32> = values(&g.gx).iter().zip(&gx_base).map(|(a, b)| a - b).collect();
            let loss = |x: &[f64], down: &[f64], up: &[f64]| dot(&gy, &forward(x, down, up));
            let x64 = f64s(&x);
            let down_held: Vec<f32> = down64.iter().map(|&v| v as f32).collect();
            let up_held: Vec<f32> = up64.iter().map(|&v| v as f32).collect();
            check_gradient("lora x", &x, &gx_added, |x| loss(x, &down64, &up64), Probe::EveryElement);
            check_gradient("lora down", &down_held, &values(&g.down), |d| loss(&x64, d, &up64), Probe::EveryElement);
            check_gradient("lora up", &up_held, &values(&g.up), |u| loss(&x64, &down64, u), Probe::EveryElement);
        }
    }

    #[test]
    fn gelu_gradient_matches_differences() {
        let mut r = rng(3);
        let x: Vec<f32> = randn(120, &mut r).iter().map(|v| 3.0 * v).collect();
        let gy = f64s(&randn(120, &mut r));
        let gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
        let y = CpuBackend.gelu_tanh(&tensor(x.clone(), &[2, 60])).unwrap();
        assert_close("gelu forward", &values(&y), &x.iter().map(|&v| gelu(v as f64)).collect::<Vec<_>>(), 1e-5);
        let gy_t = tensor(gy.iter().map(|&v| v as f32).collect(), &[2, 60]);
        let gx = CpuBackend.gelu_tanh_backward(&tensor(x.clone(), &[2, 60]), &gy_t).unwrap();
        check_gradient("gelu", &x, &values(&gx), |x| x.iter().zip(&gy).map(|(&x, g)| g * gelu(x)).sum(), Probe::EveryElement);
    }

    #[test]
    fn layer_norm_modulate_gradient_matches_differences() {
        let mut r = rng(4);
        for (b, l, d, probe) in [(2, 3, 16, Probe::EveryElement), (2, 37, 128, Probe::Random(4))] {
            // An offset and a spread so that the mean and variance both matter.
            let x: Vec<f32> = randn(b * l * d, &mut r).iter().map(|v| 2.0 * v + 0.5).collect();
            let shift = randn(b * d, &mut r);
            let scale: Vec<f32> = randn(b * d, &mut r).iter().map(|v| 0.5 * v).collect();
            let gy = f64s(&randn(b * l * d, &mut r));
            let eps = 1e-6;
            let forward = |x: &[f64]| -> Vec<f64> {
                let mut y = vec![0f64; x.len()];
                for (row, (yr, xr)) in y.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                    let mean = xr.iter().sum::<f64>() / d as f64;
                    let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
                    let bi = row / l;
                    for i in 0..d {
                        yr[i] = (1.0 + scale[bi * d + i] as f64) * (xr[i] - mean) / (var + eps).sqrt() + shift[bi * d + i] as f64;
                    }
                }
                y
            };
            let (xt, sc) = (tensor(x.clone(), &[b, l, d]), tensor(scale.clone(), &[b, d]));
            let y = CpuBackend.layer_norm_modulate(&xt, &tensor(shift.clone(), &[b, d]), &sc, eps as f32).unwrap();
            assert_close("layer_norm_modulate forward", &values(&y), &forward(&f64s(&x)), 1e-5);
            let gy_t = tensor(gy.iter().map(|&v| v as f32).collect(), &[b, l, d]);
            let gx = CpuBackend.layer_norm_modulate_backward(&xt, &sc, &gy_t, eps as f32).unwrap();
            check_gradient(&format!("layer_norm_modulate {d}"), &x, &values(&gx), |x| dot(&gy, &forward(x)), probe);
        }
    }

    #[test]
    fn qk_norm_rope_gradient_matches_differences() {
        let mut r = rng(5);
        // (batch, tokens, heads, head_dim, tail): a single block's linear1 output with its MLP
        // columns, and a double block's qkv at FLUX's head size.
        for (b, l, heads, hd, tail_w, probe) in [(2, 3, 2, 8, 5, Probe::EveryElement), (1, 5, 2, 128, 0, Probe::Random(4))] {
            let qkv_w = 3 * heads * hd;
            let w = qkv_w + tail_w;
            let x = randn(b * l * w, &mut r);
            let q_scale: Vec<f32> = randn(hd, &mut r).iter().map(|v| 1.0 + 0.3 * v).collect();
            let k_scale: Vec<f32> = randn(hd, &mut r).iter().map(|v| 1.0 + 0.3 * v).collect();
            let pe: Vec<f32> = randn(b * l * hd / 2, &mut r).iter().flat_map(|&a| [(3.0 * a).cos(), (3.0 * a).sin()]).collect();
            let n_head = b * heads * l * hd;
            let g: Vec<Vec<f64>> = (0..3).map(|_| f64s(&randn(n_head, &mut r))).collect();
            let tail = randn(b * l * tail_w, &mut r);
            let eps = 1e-6;
            // q, k, v in [B, H, L, D] order, concatenated.
            let forward = |x: &[f64]| -> Vec<f64> {
                let mut out = vec![0f64; 3 * n_head];
                for (which, dst) in out.chunks_mut(n_head).enumerate() {
                    for (bi, h, li) in (0..b).flat_map(|bi| (0..heads).flat_map(move |h| (0..l).map(move |li| (bi, h, li)))) {
                        let src = &x[(bi * l + li) * w + (which * heads + h) * hd..][..hd];
                        let o = &mut dst[((bi * heads + h) * l + li) * hd..][..hd];
                        if which == 2 {
                            o.copy_from_slice(src);
                            continue;
                        }
                        let rms = (dot(src, src) / hd as f64 + eps).sqrt();
                        let s = if which == 0 { &q_scale } else { &k_scale };
                        let cs = &pe[(bi * l + li) * hd..][..hd];
                        for p in 0..hd / 2 {
                            let (x0, x1) = (src[2 * p] / rms * s[2 * p] as f64, src[2 * p + 1] / rms * s[2 * p + 1] as f64);
                            let (c, sn) = (cs[2 * p] as f64, cs[2 * p + 1] as f64);
                            o[2 * p] = c * x0 - sn * x1;
                            o[2 * p + 1] = sn * x0 + c * x1;
                        }
                    }
                }
                out
            };
            let (xt, qs, ks, pet) = (
                tensor(x.clone(), &[b, l, w]),
                tensor(q_scale.clone(), &[hd]),
                tensor(k_scale.clone(), &[hd]),
                tensor(pe.clone(), &[b, l, hd / 2, 2]),
            );
            let got: Vec<f32> = CpuBackend.qk_norm_rope(&xt, heads, &qs, &ks, &pet, eps as f32).unwrap().iter().flat_map(values).collect();
            assert_close("qk_norm_rope forward", &got, &forward(&f64s(&x)), 1e-5);

            let g_t: Vec<T> = g.iter().map(|g| tensor(g.iter().map(|&v| v as f32).collect(), &[b, heads, l, hd])).collect();
            let tail_t = (tail_w > 0).then(|| tensor(tail.clone(), &[b, l, tail_w]));
            let gx = CpuBackend
                .qk_norm_rope_backward(&xt, heads, &qs, &ks, &pet, eps as f32, [&g_t[0], &g_t[1], &g_t[2]], tail_t.as_ref())
                .unwrap();
            // The tail stands for a branch reading the remaining columns linearly.
            let g_all: Vec<f64> = g.concat();
            let loss = |x: &[f64]| {
                let tail_term: f64 =
                    (0..b * l).map(|row| dot(&x[row * w + qkv_w..(row + 1) * w], &f64s(&tail[row * tail_w..][..tail_w]))).sum();
                dot(&g_all, &forward(x)) + tail_term
            };
            check_gradient(&format!("qk_norm_rope {hd}"), &x, &values(&gx), loss, probe);
            if tail_w > 0 {
                let no_tail = CpuBackend.qk_norm_rope_backward(&xt, heads, &qs, &ks, &pet, eps as f32, [&g_t[0], &g_t[1], &g_t[2]], None);
                assert!(no_tail.is_err(), "a result narrower than the input must be refused");
            }
        }
    }

    /// Textbook attention in f64 with the full score matrix: `[B, Lq, H * D]` and lse `[B, H, Lq]`.
    fn naive_attention(q: &[f64], k: &[f64], v: &[f64], (b, h, lq, lk, d): (usize, usize, usize, usize, usize)) -> (Vec<f64>, Vec<f64>) {
        let mut out = vec![0f64; b * lq * h * d];
        let mut lse = vec![0f64; b * h * lq];
        for bh in 0..b * h {
            let (qh, kh, vh) = (&q[bh * lq * d..][..lq * d], &k[bh * lk * d..][..lk * d], &v[bh * lk * d..][..lk * d]);
            for i in 0..lq {
                let s: Vec<f64> = (0..lk).map(|j| dot(&qh[i * d..(i + 1) * d], &kh[j * d..(j + 1) * d]) / (d as f64).sqrt()).collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                lse[bh * lq + i] = m + z.ln();
                for t in 0..d {
                    out[((bh / h * lq + i) * h + bh % h) * d + t] = (0..lk).map(|j| (s[j] - m).exp() / z * vh[j * d + t]).sum();
                }
            }
        }
        (out, lse)
    }

    #[test]
    fn attention_gradients_match_differences() {
        let mut r = rng(6);
        // Tiny shapes probed element by element (one with more keys than queries), then FLUX's
        // head sizes over sequences that end in a partial query block.
        let cases = [((2, 2, 5, 5, 8), 0), ((1, 2, 3, 7, 4), 0), ((1, 2, 70, 70, 64), 3), ((2, 1, 130, 130, 128), 3)];
        for ((b, h, lq, lk, d), random_dirs) in cases {
            let dims = (b, h, lq, lk, d);
            let (q, k, v) = (randn(b * h * lq * d, &mut r), randn(b * h * lk * d, &mut r), randn(b * h * lk * d, &mut r));
            let g_out = f64s(&randn(b * lq * h * d, &mut r));
            let (qt, kt, vt) = (tensor(q.clone(), &[b, h, lq, d]), tensor(k.clone(), &[b, h, lk, d]), tensor(v.clone(), &[b, h, lk, d]));
            let (out, lse) = CpuBackend.attention_with_lse(&qt, &kt, &vt).unwrap();
            let (want_out, want_lse) = naive_attention(&f64s(&q), &f64s(&k), &f64s(&v), dims);
            assert_close("attention forward", &values(&out), &want_out, 1e-5);
            assert_close("lse", &values(&lse), &want_lse, 1e-5);
            assert_eq!(values(&out), values(&CpuBackend.attention(&qt, &kt, &vt).unwrap()), "attention_with_lse must equal attention");

            let g_out_t = tensor(g_out.iter().map(|&v| v as f32).collect(), &[b, lq, h * d]);
            let [gq, gk, gv] = CpuBackend.attention_backward(&qt, &kt, &vt, &out, &lse, &g_out_t).unwrap();
            let probe = || if random_dirs == 0 { Probe::EveryElement } else { Probe::Random(random_dirs) };
            let (q64, k64, v64) = (f64s(&q), f64s(&k), f64s(&v));
            let loss = |q: &[f64], k: &[f64], v: &[f64]| dot(&g_out, &naive_attention(q, k, v, dims).0);
            check_gradient(&format!("attention q {dims:?}"), &q, &values(&gq), |q| loss(q, &k64, &v64), probe());
            check_gradient(&format!("attention k {dims:?}"), &k, &values(&gk), |k| loss(&q64, k, &v64), probe());
            check_gradient(&format!("attention v {dims:?}"), &v, &values(&gv), |v| loss(&q64, &k64, v), probe());
        }
    }

    #[test]
    fn gated_residual_branch_gradient_matches_differences() {
        let mut r = rng(7);
        let (b, l, d) = (2, 3, 5);
        let (x, gate, y) = (randn(b * l * d, &mut r), randn(b * d, &mut r), randn(b * l * d, &mut r));
        let gy = f64s(&randn(b * l * d, &mut r));
        let forward =
            |y: &[f64]| -> Vec<f64> { (0..b * l * d).map(|i| x[i] as f64 + gate[(i / (l * d)) * d + i % d] as f64 * y[i]).collect() };
        let (xt, gt, yt) = (tensor(x.clone(), &[b, l, d]), tensor(gate.clone(), &[b, d]), tensor(y.clone(), &[b, l, d]));
        assert_close("gated_residual forward", &values(&CpuBackend.gated_residual(&xt, &gt, &yt).unwrap()), &forward(&f64s(&y)), 1e-6);
        let gy_t = tensor(gy.iter().map(|&v| v as f32).collect(), &[b, l, d]);
        let g_branch = CpuBackend.gated_residual_backward(&gy_t, &gt).unwrap();
        check_gradient("gated_residual branch", &y, &values(&g_branch), |y| dot(&gy, &forward(y)), Probe::EveryElement);
    }

    #[test]
    fn linear_parameter_gradients_match_differences() {
        let mut r = rng(8);
        // (leading dims, out, in): out <= in and out > in (the two ways the product is taken),
        // each over batch and tokens, then more rows than a chunk of the bias sum.
        let cases =
            [(vec![2, 3], 4, 7, Probe::EveryElement), (vec![2, 5], 9, 6, Probe::EveryElement), (vec![1, 130], 33, 20, Probe::Random(4))];
        for (leading, out_f, in_f, probe) in cases {
            let rows: usize = leading.iter().product();
            let (x, w, bias) = (randn(rows * in_f, &mut r), randn(out_f * in_f, &mut r), randn(out_f, &mut r));
            let gy = f64s(&randn(rows * out_f, &mut r));
            let x64 = f64s(&x);
            let forward = |w: &[f64], bias: &[f64]| -> Vec<f64> {
                (0..rows * out_f)
                    .map(|ro| dot(&x64[(ro / out_f) * in_f..][..in_f], &w[(ro % out_f) * in_f..][..in_f]) + bias[ro % out_f])
                    .collect()
            };
            let shape = |last: usize| leading.iter().copied().chain([last]).collect::<Vec<_>>();
            let xt = tensor(x.clone(), &shape(in_f));
            let y = CpuBackend.linear(&xt, &tensor(w.clone(), &[out_f, in_f]), Some(&tensor(bias.clone(), &[out_f]))).unwrap();
            assert_close("linear forward", &values(&y), &forward(&f64s(&w), &f64s(&bias)), 1e-5);

            let gy_t = tensor(gy.iter().map(|&v| v as f32).collect(), &shape(out_f));
            let (g_w, g_b) = CpuBackend.linear_backward_params(&gy_t, &xt).unwrap();
            assert_eq!((g_w.shape(), g_b.shape()), (&[out_f, in_f][..], &[out_f][..]));
            let (w64, b64) = (f64s(&w), f64s(&bias));
            let what = format!("linear {leading:?} x {in_f} -> {out_f}");
            check_gradient(&format!("{what} weight"), &w, &values(&g_w), |w| dot(&gy, &forward(w, &b64)), probe);
            check_gradient(&format!("{what} bias"), &bias, &values(&g_b), |b| dot(&gy, &forward(&w64, b)), probe);
        }
        let mismatched = CpuBackend.linear_backward_params(&tensor(vec![0.0; 12], &[2, 2, 3]), &tensor(vec![0.0; 8], &[4, 2]));
        assert!(mismatched.is_err(), "rows of gy and x that do not pair up must be refused");
    }

    #[test]
    fn layer_norm_modulate_shift_scale_gradients_match_differences() {
        let mut r = rng(9);
        // A sample's tokens spanning several chunks of the sums, partial last chunk included.
        for (b, l, d, probe) in [(2, 3, 16, Probe::EveryElement), (2, 150, 24, Probe::Random(4))] {
            let x: Vec<f32> = randn(b * l * d, &mut r).iter().map(|v| 2.0 * v + 0.5).collect();
            let shift = randn(b * d, &mut r);
            let scale: Vec<f32> = randn(b * d, &mut r).iter().map(|v| 0.5 * v).collect();
            let gy = f64s(&randn(b * l * d, &mut r));
            let eps = 1e-6;
            let forward = |shift: &[f64], scale: &[f64]| -> Vec<f64> {
                let mut y = vec![0f64; x.len()];
                for (row, (yr, xr)) in y.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                    let xr = f64s(xr);
                    let mean = xr.iter().sum::<f64>() / d as f64;
                    let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
                    let bi = row / l;
                    for i in 0..d {
                        yr[i] = (1.0 + scale[bi * d + i]) * (xr[i] - mean) / (var + eps).sqrt() + shift[bi * d + i];
                    }
                }
                y
            };
            let xt = tensor(x.clone(), &[b, l, d]);
            let y =
                CpuBackend.layer_norm_modulate(&xt, &tensor(shift.clone(), &[b, d]), &tensor(scale.clone(), &[b, d]), eps as f32).unwrap();
            let (shift64, scale64) = (f64s(&shift), f64s(&scale));
            assert_close("layer_norm_modulate forward", &values(&y), &forward(&shift64, &scale64), 1e-5);
            let gy_t = tensor(gy.iter().map(|&v| v as f32).collect(), &[b, l, d]);
            let (g_shift, g_scale) = CpuBackend.layer_norm_modulate_backward_shift_scale(&xt, &gy_t, eps as f32).unwrap();
            assert_eq!((g_shift.shape(), g_scale.shape()), (&[b, d][..], &[b, d][..]));
            check_gradient(
                &format!("layer_norm_modulate {l} shift"),
                &shift,
                &values(&g_shift),
                |s| dot(&gy, &forward(s, &scale64)),
                probe,
            );
            check_gradient(
                &format!("layer_norm_modulate {l} scale"),
                &scale,
                &values(&g_scale),
                |c| dot(&gy, &forward(&shift64, c)),
                probe,
            );
        }
    }

    #[test]
    fn gated_residual_gate_gradient_matches_differences() {
        let mut r = rng(10);
        for (b, l, d) in [(2, 3, 5), (3, 100, 4)] {
            let (x, gate, y) = (randn(b * l * d, &mut r), randn(b * d, &mut r), randn(b * l * d, &mut r));
            let gy = f64s(&randn(b * l * d, &mut r));
            let forward = |gate: &[f64]| -> Vec<f64> {
                (0..b * l * d).map(|i| x[i] as f64 + gate[(i / (l * d)) * d + i % d] * y[i] as f64).collect()
            };
            let (xt, gt, yt) = (tensor(x.clone(), &[b, l, d]), tensor(gate.clone(), &[b, d]), tensor(y.clone(), &[b, l, d]));
            let out = CpuBackend.gated_residual(&xt, &gt, &yt).unwrap();
            assert_close("gated_residual forward", &values(&out), &forward(&f64s(&gate)), 1e-6);
            let gy_t = tensor(gy.iter().map(|&v| v as f32).collect(), &[b, l, d]);
            let g_gate = CpuBackend.gated_residual_backward_gate(&gy_t, &yt).unwrap();
            assert_eq!(g_gate.shape(), [b, d]);
            check_gradient(&format!("gated_residual gate {l}"), &gate, &values(&g_gate), |g| dot(&gy, &forward(g)), Probe::EveryElement);
        }
    }

    #[test]
    fn silu_gradient_matches_differences() {
        let mut r = rng(11);
        let x: Vec<f32> = randn(120, &mut r).iter().map(|v| 4.0 * v).collect();
        let gy = f64s(&randn(120, &mut r));
        let silu = |x: f64| x / (1.0 + (-x).exp());
        let y = CpuBackend.silu(&tensor(x.clone(), &[3, 40])).unwrap();
        assert_close("silu forward", &values(&y), &x.iter().map(|&v| silu(v as f64)).collect::<Vec<_>>(), 1e-5);
        let gy_t = tensor(gy.iter().map(|&v| v as f32).collect(), &[3, 40]);
        let gx = CpuBackend.silu_backward(&tensor(x.clone(), &[3, 40]), &gy_t).unwrap();
        assert_eq!(gx.shape(), [3, 40]);
        check_gradient("silu", &x, &values(&gx), |x| x.iter().zip(&gy).map(|(&x, g)| g * silu(x)).sum(), Probe::EveryElement);
    }
}
