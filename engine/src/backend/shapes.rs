//! Shape rules shared by the backends, so that every backend accepts and rejects the same
//! operands with the same message.

use anyhow::{bail, ensure, Result};

/// Splits a shape around `dim` into (outer, inner) element counts: a row-major tensor is then
/// `outer` runs of `shape[dim] * inner` contiguous elements.
pub fn outer_inner(shape: &[usize], dim: usize) -> (usize, usize) {
    (shape[..dim].iter().product(), shape[dim + 1..].iter().product())
}

/// The result shape of concatenating `shapes` along `dim`.
pub fn concat(shapes: &[&[usize]], dim: usize) -> Result<Vec<usize>> {
    ensure!(!shapes.is_empty(), "concat: no tensors");
    let first = shapes[0];
    ensure!(dim < first.len(), "concat: dim {dim} out of range for {first:?}");
    for s in shapes {
        ensure!(
            s.len() == first.len() && s.iter().zip(first).enumerate().all(|(i, (a, b))| i == dim || a == b),
            "concat along {dim}: shapes {first:?} and {s:?} disagree"
        );
    }
    let mut out = first.to_vec();
    out[dim] = shapes.iter().map(|s| s[dim]).sum();
    Ok(out)
}

/// The result shape of `narrow(dim, start, len)`.
pub fn narrow(shape: &[usize], dim: usize, start: usize, len: usize) -> Result<Vec<usize>> {
    ensure!(dim < shape.len() && start + len <= shape[dim], "narrow: {start}..{} out of range for dim {dim} of {shape:?}", start + len);
    let mut out = shape.to_vec();
    out[dim] = len;
    Ok(out)
}

/// The result shape of swapping the last two dims.
pub fn transpose_last2(shape: &[usize]) -> Result<Vec<usize>> {
    ensure!(shape.len() >= 2, "transpose_last2: input has shape {shape:?}, expected at least 2 dims");
    let mut out = shape.to_vec();
    let r = out.len();
    out.swap(r - 2, r - 1);
    Ok(out)
}

/// A convolution's geometry, checked: input `[batch, cin, h, w]`, weight `[cout, cin, kh, kw]`,
/// padding (top, bottom, left, right), output `[batch, cout, oh, ow]`.
#[derive(Debug, Clone, Copy)]
pub struct ConvGeometry {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: [usize; 4],
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeometry {
    /// Checks the operands of `conv2d` (bias `[cout]` when given) and derives the output size.
    pub fn new(x: &[usize], weight: &[usize], bias: Option<&[usize]>, stride: usize, pad: [usize; 4]) -> Result<Self> {
        ensure!(x.len() == 4, "conv2d: input has shape {x:?}, expected [batch, channels, height, width]");
        ensure!(weight.len() == 4, "conv2d: weight has shape {weight:?}, expected [out, in, kh, kw]");
        ensure!(weight[1] == x[1], "conv2d: input has shape {x:?}, weight {weight:?} expects {} channels", weight[1]);
        if let Some(b) = bias {
            super::expect_shape("bias", "conv2d", b, &[weight[0]])?;
        }
        let (ph, pw) = (x[2] + pad[0] + pad[1], x[3] + pad[2] + pad[3]);
        let (kh, kw) = (weight[2], weight[3]);
        if stride == 0 || ph < kh || pw < kw {
            bail!("conv2d: kernel {weight:?} with stride {stride} and padding {pad:?} does not fit input {x:?}");
        }
        Ok(ConvGeometry {
            batch: x[0],
            cin: x[1],
            h: x[2],
            w: x[3],
            cout: weight[0],
            kh,
            kw,
            stride,
            pad,
            oh: (ph - kh) / stride + 1,
            ow: (pw - kw) / stride + 1,
        })
    }
}

/// A pooling window's geometry, checked: input `[batch, channels, h, w]`, a `kernel x kernel`
/// window every `stride` pixels of the input padded by `pad` (top, bottom, left, right), output
/// `[batch, channels, oh, ow]` (sizes rounded down, as PyTorch's pooling and convolutions).
#[derive(Debug, Clone, Copy)]
pub struct PoolGeometry {
    pub batch: usize,
    pub channels: usize,
    pub h: usize,
    pub w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: [usize; 4],
    pub oh: usize,
    pub ow: usize,
}

impl PoolGeometry {
    /// `max_pool2d`'s operands.
    pub fn max_pool(x: &[usize], kernel: usize, stride: usize) -> Result<Self> {
        Self::new("max_pool2d", x, kernel, stride, [0; 4])
    }

    /// The operands of a depthwise filter (`blur_pool2d`, `l2_pool2d`): `filter` `[C, 1, k, k]`;
    /// reflection padding must be smaller than the side it pads.
    pub fn depthwise(op: &str, x: &[usize], filter: &[usize], stride: usize, pad: [usize; 4], reflect: bool) -> Result<Self> {
        ensure!(x.len() == 4, "{op}: input has shape {x:?}, expected [batch, channels, height, width]");
        let k = filter.get(2).copied().unwrap_or(0);
        super::expect_shape("filter", op, filter, &[x[1], 1, k, k])?;
        if reflect {
            ensure!(
                pad[0].max(pad[1]) < x[2] && pad[2].max(pad[3]) < x[3],
                "{op}: reflection padding {pad:?} needs an input larger than the padding, found {x:?}"
            );
        }
        Self::new(op, x, k, stride, pad)
    }

    fn new(op: &str, x: &[usize], kernel: usize, stride: usize, pad: [usize; 4]) -> Result<Self> {
        ensure!(x.len() == 4, "{op}: input has shape {x:?}, expected [batch, channels, height, width]");
        let (ph, pw) = (x[2] + pad[0] + pad[1], x[3] + pad[2] + pad[3]);
        if kernel == 0 || stride == 0 || ph < kernel || pw < kernel {
            bail!("{op}: a {kernel}x{kernel} window with stride {stride} and padding {pad:?} does not fit input {x:?}");
        }
        Ok(PoolGeometry {
            batch: x[0],
            channels: x[1],
            h: x[2],
            w: x[3],
            kernel,
            stride,
            pad,
            oh: (ph - kernel) / stride + 1,
            ow: (pw - kernel) / stride + 1,
        })
    }

    pub fn out_shape(&self) -> Vec<usize> {
        vec![self.batch, self.channels, self.oh, self.ow]
    }
}

/// The dims of `attention(q, k, v)`, checked: q `[batch, heads, lq, head_dim]`, k and v
/// `[batch, heads, lk, head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct AttentionDims {
    pub batch: usize,
    pub heads: usize,
    pub lq: usize,
    pub lk: usize,
    pub head_dim: usize,
}

impl AttentionDims {
    pub fn new(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        ensure!(q.len() == 4, "attention: q has shape {q:?}, expected [batch, heads, tokens, head_dim]");
        let (batch, heads, lq, head_dim) = (q[0], q[1], q[2], q[3]);
        ensure!(k.len() == 4, "attention: k has shape {k:?}");
        let lk = k[2];
        super::expect_shape("k", "attention", k, &[batch, heads, lk, head_dim])?;
        super::expect_shape("v", "attention", v, &[batch, heads, lk, head_dim])?;
        Ok(AttentionDims { batch, heads, lq, lk, head_dim })
    }

    /// The dims of `attention_bias(q, k, v, bias)`: those of `attention` and bias `[H, Lq, Lk]`.
    pub fn with_bias(q: &[usize], k: &[usize], v: &[usize], bias: &[usize]) -> Result<Self> {
        let dims = AttentionDims::new(q, k, v)?;
        super::expect_shape("bias", "attention_bias", bias, &[dims.heads, dims.lq, dims.lk])?;
        Ok(dims)
    }
}

/// The dims of `qk_norm_rope(x, heads, q_scale, k_scale, pe)`, checked: x `[batch, tokens,
/// width]` holding q, k, v of `heads` heads in its first columns, scales `[head_dim]` (even),
/// pe `[batch, tokens, head_dim / 2, 2]`.
#[derive(Debug, Clone, Copy)]
pub struct QkDims {
    pub batch: usize,
    pub tokens: usize,
    pub width: usize,
    pub head_dim: usize,
}

impl QkDims {
    pub fn new(x: &[usize], heads: usize, q_scale: &[usize], k_scale: &[usize], pe: &[usize]) -> Result<Self> {
        let op = "qk_norm_rope";
        ensure!(x.len() == 3, "{op}: x has shape {x:?}, expected [batch, tokens, width]");
        let (batch, tokens, width) = (x[0], x[1], x[2]);
        ensure!(q_scale.len() == 1, "{op}: query scale has shape {q_scale:?}");
        let head_dim = q_scale[0];
        super::expect_shape("key scale", op, k_scale, &[head_dim])?;
        ensure!(
            width >= 3 * heads * head_dim && head_dim % 2 == 0,
            "{op}: width {width} cannot hold q, k, v of {heads} heads x {head_dim}"
        );
        super::expect_shape("pe", op, pe, &[batch, tokens, head_dim / 2, 2])?;
        Ok(QkDims { batch, tokens, width, head_dim })
    }
}

/// The dims of `qk_norm_rope_backward(x, heads, q_scale, k_scale, pe, eps, g_qkv, tail)`,
/// checked: x, scales and pe as for `qk_norm_rope`, the three gradients
/// `[batch, heads, tokens, head_dim]`, and the tail `[batch, tokens, tail]` that with q, k and v
/// makes up x's width exactly.
#[derive(Debug, Clone, Copy)]
pub struct QkBackwardDims {
    pub batch: usize,
    pub tokens: usize,
    pub width: usize,
    pub head_dim: usize,
    /// Columns of q, k and v together.
    pub qkv: usize,
    /// Columns after them.
    pub tail: usize,
}

impl QkBackwardDims {
    pub fn new(
        x: &[usize],
        heads: usize,
        (q_scale, k_scale, pe): (&[usize], &[usize], &[usize]),
        g_qkv: [&[usize]; 3],
        tail: Option<&[usize]>,
    ) -> Result<Self> {
        let op = "qk_norm_rope_backward";
        ensure!(x.len() == 3, "{op}: x has shape {x:?}, expected [batch, tokens, width]");
        let (batch, tokens, width) = (x[0], x[1], x[2]);
        ensure!(q_scale.len() == 1, "{op}: query scale has shape {q_scale:?}");
        let head_dim = q_scale[0];
        super::expect_shape("key scale", op, k_scale, &[head_dim])?;
        super::expect_shape("pe", op, pe, &[batch, tokens, head_dim / 2, 2])?;
        for (name, g) in ["query gradient", "key gradient", "value gradient"].into_iter().zip(g_qkv) {
            super::expect_shape(name, op, g, &[batch, heads, tokens, head_dim])?;
        }
        let qkv = 3 * heads * head_dim;
        let tail = match tail {
            Some(t) => {
                ensure!(t.len() == 3 && t[0] == batch && t[1] == tokens, "{op}: tail has shape {t:?}, expected [{batch}, {tokens}, _]");
                t[2]
            }
            None => 0,
        };
        ensure!(
            head_dim % 2 == 0 && qkv + tail == width,
            "{op}: q, k, v of {heads} heads x {head_dim} and a tail of {tail} columns do not make up the input's width {width}"
        );
        Ok(QkBackwardDims { batch, tokens, width, head_dim, qkv, tail })
    }
}
