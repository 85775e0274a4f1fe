//! Launch for `cuda/rope.cu`: the fused head split, QK-RMSNorm and rotary embedding. Shapes are
//! checked as strictly as the CPU backend checks them, with the same messages.

use super::{bf16_of, bf16_tensor, f32_of, i32_arg, CudaBackend, T};
use crate::backend::shapes::{QkBackwardDims, QkDims};
use anyhow::Result;
use cudarc::driver::{LaunchConfig, PushKernelArg};

const THREADS: u32 = 256;

/// The one-thread-per-16-bytes kernel for `head_dim`, when there is one: a power of two from 8
/// to 256, with token rows of x 16-byte aligned (`width % 8 == 0`).
fn fast_kernel(head_dim: usize, width: usize) -> Option<&'static str> {
    if width % 8 != 0 {
        return None;
    }
    Some(match head_dim {
        8 => "qk_norm_rope_d8_bf16",
        16 => "qk_norm_rope_d16_bf16",
        32 => "qk_norm_rope_d32_bf16",
        64 => "qk_norm_rope_d64_bf16",
        128 => "qk_norm_rope_d128_bf16",
        256 => "qk_norm_rope_d256_bf16",
        _ => return None,
    })
}

pub(super) fn qk_norm_rope(b: &CudaBackend, x: &T, heads: usize, q_scale: &T, k_scale: &T, pe: &T, eps: f32) -> Result<[T; 3]> {
    let op = "qk_norm_rope";
    let dims = QkDims::new(x.shape(), heads, q_scale.shape(), k_scale.shape(), pe.shape())?;
    let (batch, tokens, width, hd) = (dims.batch, dims.tokens, dims.width, dims.head_dim);
    let xs = bf16_of(op, "x", x)?;
    let (qs, ks) = (bf16_of(op, "query scale", q_scale)?, bf16_of(op, "key scale", k_scale)?);
    let pes = f32_of(op, "pe (the RoPE table is uploaded in f32)", pe)?;

    let n = batch * heads * tokens * hd;
    let (mut q, mut k, mut v) = (b.alloc_bf16(n)?, b.alloc_bf16(n)?, b.alloc_bf16(n)?);
    let shape = vec![batch, heads, tokens, hd];
    if n > 0 {
        // One item per head vector (slow kernel, a warp each) or per 8 elements of one (fast
        // kernel, a thread each); indices past the last item stay below 2^31.
        let head_vectors = batch * tokens * 3 * heads;
        let (t32, w32, h32) = (i32_arg(op, tokens)?, i32_arg(op, width)?, i32_arg(op, heads)?);
        match fast_kernel(hd, width) {
            Some(kernel) => {
                let items = head_vectors * (hd / 8);
                i32_arg(op, items + THREADS as usize)?;
                let i32_items = i32_arg(op, items)?;
                let f = b.function("rope", kernel)?;
                let cfg = LaunchConfig {
                    grid_dim: (items.div_ceil(THREADS as usize) as u32, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut l = b.stream().launch_builder(&f);
                l.arg(xs).arg(qs).arg(ks).arg(pes).arg(&mut q).arg(&mut k).arg(&mut v);
                l.arg(&t32).arg(&w32).arg(&h32).arg(&i32_items).arg(&eps);
                // SAFETY: x holds batch * tokens * width elements with width >= 3 heads hd, pe
                // batch * tokens * hd floats, q, k, v n elements each; all are whole allocations
                // (256-byte aligned), so with width % 8 == 0 and hd % 8 == 0 every 16- and 32-byte
                // access is aligned.
                unsafe { l.launch(cfg) }?;
            }
            None => {
                let warps = THREADS as usize / 32;
                i32_arg(op, head_vectors + warps)?;
                let (d32, i32_items) = (i32_arg(op, hd)?, i32_arg(op, head_vectors)?);
                let f = b.function("rope", "qk_norm_rope_bf16")?;
                let cfg =
                    LaunchConfig { grid_dim: (head_vectors.div_ceil(warps) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
                let mut l = b.stream().launch_builder(&f);
                l.arg(xs).arg(qs).arg(ks).arg(pes).arg(&mut q).arg(&mut k).arg(&mut v);
                l.arg(&t32).arg(&w32).arg(&h32).arg(&d32).arg(&i32_items).arg(&eps);
                // SAFETY: as above; this kernel makes only 2- and 4-byte accesses.
                unsafe { l.launch(cfg) }?;
            }
        }
    }
    Ok([bf16_tensor(q, shape.clone()), bf16_tensor(k, shape.clone()), bf16_tensor(v, shape)])
}

/// The backward of `qk_norm_rope` wrt x (`BackwardOps::qk_norm_rope_backward`): one warp per head
/// vector of q, k, v, plus one per token for the `tail` columns, so that every element of the
/// `[B, L, W]` result is written once.
#[allow(clippy::too_many_arguments)]
pub(super) fn qk_norm_rope_backward(
    b: &CudaBackend,
    x: &T,
    heads: usize,
    q_scale: &T,
    k_scale: &T,
    pe: &T,
    eps: f32,
    g_qkv: [&T; 3],
    tail: Option<&T>,
) -> Result<T> {
    let op = "qk_norm_rope_backward";
    let d = QkBackwardDims::new(x.shape(), heads, (q_scale.shape(), k_scale.shape(), pe.shape()), g_qkv.map(T::shape), tail.map(T::shape))?;
    let (batch, tokens, width, hd) = (d.batch, d.tokens, d.width, d.head_dim);
    let xs = bf16_of(op, "x", x)?;
    let (qs, ks) = (bf16_of(op, "query scale", q_scale)?, bf16_of(op, "key scale", k_scale)?);
    let pes = f32_of(op, "pe (the RoPE table is uploaded in f32)", pe)?;
    let [gq, gk, gv] =
        [("query gradient", g_qkv[0]), ("key gradient", g_qkv[1]), ("value gradient", g_qkv[2])].map(|(what, g)| bf16_of(op, what, g));
    let (gq, gk, gv) = (gq?, gk?, gv?);
    let tails = tail.map(|t| bf16_of(op, "tail", t)).transpose()?;

    let mut gx = b.alloc_bf16(x.elem_count())?;
    let items = batch * tokens * (3 * heads + 1);
    if x.elem_count() > 0 {
        let warps = THREADS as usize / 32;
        i32_arg(op, items + warps)?;
        i32_arg(op, x.elem_count())?;
        let (t32, w32, h32, d32, i32_items) =
            (i32_arg(op, tokens)?, i32_arg(op, width)?, i32_arg(op, heads)?, i32_arg(op, hd)?, i32_arg(op, items)?);
        let f = b.function("rope", "qk_norm_rope_backward_bf16")?;
        let cfg = LaunchConfig { grid_dim: (items.div_ceil(warps) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let no_tail = 0u64; // a null pointer: with no tail columns the kernel never reads it
        let mut l = b.stream().launch_builder(&f);
        l.arg(xs).arg(qs).arg(ks).arg(pes).arg(gq).arg(gk).arg(gv);
        match tails {
            Some(t) => l.arg(t),
            None => l.arg(&no_tail),
        };
        l.arg(&mut gx).arg(&t32).arg(&w32).arg(&h32).arg(&d32).arg(&i32_items).arg(&eps);
        // SAFETY: x and gx hold batch * tokens * width elements, pe batch * tokens * hd floats,
        // the gradients batch * heads * tokens * hd, tail batch * tokens * (width - 3 heads hd);
        // the kernel makes only 2- and 4-byte accesses.
        unsafe { l.launch(cfg) }?;
    }
    Ok(bf16_tensor(gx, vec![batch, tokens, width]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_kernel_needs_power_of_two_heads_and_aligned_rows() {
        assert_eq!(fast_kernel(128, 3 * 24 * 128), Some("qk_norm_rope_d128_bf16"));
        assert_eq!(fast_kernel(64, 21504), Some("qk_norm_rope_d64_bf16"));
        assert_eq!(fast_kernel(128, 3 * 128 + 4), None);
        assert_eq!(fast_kernel(96, 3 * 96), None);
        assert_eq!(fast_kernel(6, 24), None);
        assert_eq!(fast_kernel(4, 24), None);
    }
}
