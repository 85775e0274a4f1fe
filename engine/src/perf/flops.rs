//! Model FLOPs (design.md section 11) summed from an op trace, per op class and in total. The meta
//! backend assigns each op its FLOPs: `2 M N K` per matmul (LoRA's two included), `4 Lq Lk d` per
//! attention head, `2 out_elems C_in kh kw` per convolution; elementwise work, layout copies and
//! the per-sample embedding/modulation linears count 0. The closed forms at the bottom restate
//! those rules per layer from the configs alone; they exist to check the traces in tests.

use super::meta::Trace;
use crate::backend::profile::OpClass;
use std::collections::BTreeMap;

/// FLOPs of a trace by op class (classes with none are left out) and in total.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlopCount {
    pub by_class: BTreeMap<OpClass, u64>,
    pub total: u64,
}

impl FlopCount {
    pub fn of(trace: &Trace) -> Self {
        let mut count = FlopCount::default();
        for op in trace.ops().filter(|op| op.flops > 0) {
            *count.by_class.entry(op.class).or_default() += op.flops;
            count.total += op.flops;
        }
        count
    }

    pub fn class(&self, class: OpClass) -> u64 {
        self.by_class.get(&class).copied().unwrap_or(0)
    }
}

/// FLOPs of one training step from those of its forward: `forward + backward` with the backward
/// counted as twice the forward (design.md section 11), so `3 x forward`. This is the accounting
/// rule, not a count of the backward ops.
pub fn training_step_flops(forward: u64) -> u64 {
    3 * forward
}

/// Per-layer closed forms of the FLOP rules, written from the configs without the model code.
#[cfg(test)]
pub(crate) mod closed_form {
    use crate::ae::AutoEncoderParams;
    use crate::model::FluxParams;

    /// `2 rows out in`.
    fn linear(rows: usize, input: usize, output: usize) -> u64 {
        2 * (rows * input * output) as u64
    }

    /// `4 Lq Lk d` per head and sample.
    fn attention(batch: usize, heads: usize, lq: usize, lk: usize, head_dim: usize) -> u64 {
        4 * (batch * heads * lq * lk * head_dim) as u64
    }

    /// LoRA's extra FLOPs for one transformer evaluation with a rank-`rank` update on every
    /// target of design.md section 7: `2 rows rank (in + out)` each (down then up).
    pub fn flux_lora(p: &FluxParams, batch: usize, img_tokens: usize, txt_tokens: usize, rank: usize) -> u64 {
        let (h, m) = (p.hidden_size, p.mlp_hidden());
        let in_plus_out = |targets: &[(usize, usize)]| targets.iter().map(|&(i, o)| i + o).sum::<usize>();
        // A double-block stream: qkv, proj, MLP in, MLP out; it runs over the image rows, its twin
        // over the text rows, so a double block covers every joint row once.
        let double = in_plus_out(&[(h, 3 * h), (h, h), (h, m), (m, h)]);
        // A single block: linear1, linear2, over the joint rows.
        let single = in_plus_out(&[(h, 3 * h + m), (h + m, h)]);
        let rows = batch * (img_tokens + txt_tokens);
        2 * (rows * rank * (p.depth * double + p.depth_single_blocks * single)) as u64
    }

    /// One transformer evaluation: every token linear and every joint attention. Per block over
    /// the joint sequence of L = Li + Lt tokens (h hidden, m MLP width):
    /// double `2 L (3h h + h h + h m + m h) + 4 L^2 h`, single `2 L ((3h + m) h + (h + m) h) + 4 L^2 h`;
    /// plus img_in, txt_in and the final linear. With FLUX.1-dev (m = 4h) both blocks are
    /// `24 L h^2 + 4 L^2 h`.
    pub fn flux_step(p: &FluxParams, batch: usize, img_tokens: usize, txt_tokens: usize, lora_rank: Option<usize>) -> u64 {
        let (h, m) = (p.hidden_size, p.mlp_hidden());
        let l = img_tokens + txt_tokens;
        let rows = batch * l;
        let attn = attention(batch, p.num_heads, l, l, p.head_dim());
        let double = linear(rows, h, 3 * h) + linear(rows, h, h) + linear(rows, h, m) + linear(rows, m, h) + attn;
        let single = linear(rows, h, 3 * h + m) + linear(rows, h + m, h) + attn;
        let ends = linear(batch * img_tokens, p.in_channels, h)
            + linear(batch * txt_tokens, p.context_in_dim, h)
            + linear(batch * img_tokens, h, p.out_channels);
        p.depth as u64 * double
            + p.depth_single_blocks as u64 * single
            + ends
            + lora_rank.map_or(0, |r| flux_lora(p, batch, img_tokens, txt_tokens, r))
    }

    /// `2 out_elems C_in k^2` for a k x k convolution producing `cout` channels at h x w.
    fn conv(batch: usize, cin: usize, cout: usize, k: usize, h: usize, w: usize) -> u64 {
        2 * (batch * cout * h * w * cin * k * k) as u64
    }

    /// A ResnetBlock at h x w: two 3x3 convs, plus a 1x1 shortcut when the channels change.
    fn resnet(batch: usize, cin: usize, cout: usize, h: usize, w: usize) -> u64 {
        conv(batch, cin, cout, 3, h, w) + conv(batch, cout, cout, 3, h, w) + if cin != cout { conv(batch, cin, cout, 1, h, w) } else { 0 }
    }

    /// The middle: ResnetBlock, single-head attention over the h w positions (q, k, v and the
    /// output projection are c x c linears; head dim c), ResnetBlock.
    fn mid(batch: usize, c: usize, h: usize, w: usize) -> u64 {
        let n = h * w;
        2 * resnet(batch, c, c, h, w) + 4 * linear(batch * n, c, c) + attention(batch, 1, n, n, c)
    }

    /// Encoder of an `h x w` image: conv_in, per level `num_res_blocks` ResnetBlocks then (but at
    /// the last level) a stride-2 3x3 conv to half size, the middle, conv_out to 2 z channels.
    pub fn ae_encode(p: &AutoEncoderParams, batch: usize, h: usize, w: usize) -> u64 {
        let (mut h, mut w) = (h, w);
        let mut total = conv(batch, p.in_channels, p.ch, 3, h, w);
        let mut c = p.ch;
        for (i, &mult) in p.ch_mult.iter().enumerate() {
            for _ in 0..p.num_res_blocks {
                total += resnet(batch, c, p.ch * mult, h, w);
                c = p.ch * mult;
            }
            if i + 1 < p.ch_mult.len() {
                (h, w) = (h / 2, w / 2);
                total += conv(batch, c, c, 3, h, w);
            }
        }
        total + mid(batch, c, h, w) + conv(batch, c, 2 * p.z_channels, 3, h, w)
    }

    /// Decoder of an `h x w` latent: conv_in, the middle, per level from the deepest
    /// `num_res_blocks + 1` ResnetBlocks then (but at the top level) nearest x2 and a 3x3 conv at
    /// double size, conv_out to 3 channels.
    pub fn ae_decode(p: &AutoEncoderParams, batch: usize, h: usize, w: usize) -> u64 {
        let (mut h, mut w) = (h, w);
        let mut c = p.ch * p.ch_mult[p.ch_mult.len() - 1];
        let mut total = conv(batch, p.z_channels, c, 3, h, w) + mid(batch, c, h, w);
        for (i, &mult) in p.ch_mult.iter().enumerate().rev() {
            for _ in 0..=p.num_res_blocks {
                total += resnet(batch, c, p.ch * mult, h, w);
                c = p.ch * mult;
            }
            if i > 0 {
                (h, w) = (2 * h, 2 * w);
                total += conv(batch, c, c, 3, h, w);
            }
        }
        total + conv(batch, c, p.out_ch, 3, h, w)
    }
}
