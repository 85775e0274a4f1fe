//! Launches for `cuda/norm.cu`: the modulated LayerNorm, RMSNorm and GroupNorm. Shapes are checked as
//! strictly as the CPU backend checks them, with the same messages.

use super::elementwise::token_sum_config;
use super::{bf16_of, bf16_tensor, expect_shape, i32_arg, CudaBackend, T};
use anyhow::{ensure, Result};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Rows (warps) per 128-thread block of the LayerNorm kernels; `LN_ROWS_PER_BLOCK` in norm.cu.
const LN_ROWS_PER_BLOCK: usize = 4;

/// The register-resident LayerNorm kernels by 16-byte vectors per lane; a row of D elements
/// needs `ceil(D / 256)` of them.
const LN_VARIANTS: [(usize, &str); 6] = [
    (1, "layer_norm_modulate_v1_bf16"),
    (2, "layer_norm_modulate_v2_bf16"),
    (4, "layer_norm_modulate_v4_bf16"),
    (8, "layer_norm_modulate_v8_bf16"),
    (12, "layer_norm_modulate_v12_bf16"),
    (16, "layer_norm_modulate_v16_bf16"),
];

/// Elements of a group handled by one block of the GroupNorm kernels (256 threads x 32);
/// `GN_CHUNK` in norm.cu.
const GN_CHUNK: usize = 8192;
const GN_THREADS: u32 = 256;

/// The LayerNorm kernel for rows of `dim` elements: the smallest register-resident variant that
/// holds the row, or the scalar kernel when `dim % 8 != 0` or the row is longer than 4096.
fn layer_norm_kernel(dim: usize) -> &'static str {
    let per_lane = (dim / 8).div_ceil(32);
    let fast = if dim % 8 == 0 { LN_VARIANTS.iter().find(|(v, _)| *v >= per_lane) } else { None };
    fast.map_or("layer_norm_modulate_bf16", |&(_, k)| k)
}

pub(super) fn layer_norm_modulate(b: &CudaBackend, x: &T, shift: &T, scale: &T, eps: f32) -> Result<T> {
    let op = "layer_norm_modulate";
    ensure!(x.rank() == 3, "{op}: x has shape {:?}, expected [batch, tokens, dim]", x.shape());
    let (batch, tokens, dim) = (x.dim(0), x.dim(1), x.dim(2));
    expect_shape("shift", op, shift.shape(), &[batch, dim])?;
    expect_shape("scale", op, scale.shape(), &[batch, dim])?;
    let (xs, shs, scs) = (bf16_of(op, "x", x)?, bf16_of(op, "shift", shift)?, bf16_of(op, "scale", scale)?);
    let rows = batch * tokens;
    let mut out = b.alloc_bf16(x.elem_count())?;
    if rows == 0 || dim == 0 {
        return Ok(bf16_tensor(out, x.shape().to_vec()));
    }
    // The kernels index rows (plus the last block's spare warps) and columns in 32 bits.
    i32_arg(op, rows + LN_ROWS_PER_BLOCK)?;
    let (r32, t32, d32) = (i32_arg(op, rows)?, i32_arg(op, tokens)?, i32_arg(op, dim)?);
    let f = b.function("norm", layer_norm_kernel(dim))?;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(LN_ROWS_PER_BLOCK) as u32, 1, 1),
        block_dim: (32 * LN_ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(shs).arg(scs).arg(&mut out).arg(&r32).arg(&t32).arg(&d32).arg(&eps);
    // SAFETY: x and out hold rows * dim elements, shift and scale batch * dim; every buffer is a
    // whole allocation (256-byte aligned), so with dim % 8 == 0 each row starts 16-byte aligned.
    unsafe { l.launch(cfg) }?;
    Ok(bf16_tensor(out, x.shape().to_vec()))
}

pub(super) fn rms_norm(b: &CudaBackend, x: &T, weight: &T, eps: f32) -> Result<T> {
    let op = "rms_norm";
    ensure!(x.rank() >= 1, "{op}: x has shape {:?}, expected [.., dim]", x.shape());
    let dim = x.dim(-1);
    expect_shape("weight", op, weight.shape(), &[dim])?;
    let (xs, ws) = (bf16_of(op, "x", x)?, bf16_of(op, "weight", weight)?);
    let rows = x.elem_count().checked_div(dim).unwrap_or(0);
    let mut out = b.alloc_bf16(x.elem_count())?;
    if rows == 0 {
        return Ok(bf16_tensor(out, x.shape().to_vec()));
    }
    // The kernel indexes rows (plus the last block's spare warps) and columns in 32 bits.
    i32_arg(op, rows + LN_ROWS_PER_BLOCK)?;
    let (r32, d32) = (i32_arg(op, rows)?, i32_arg(op, dim)?);
    let f = b.function("norm", "rms_norm_bf16")?;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(LN_ROWS_PER_BLOCK) as u32, 1, 1),
        block_dim: (32 * LN_ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(ws).arg(&mut out).arg(&r32).arg(&d32).arg(&eps);
    // SAFETY: x and out hold rows * dim elements, weight dim; one warp writes each row once.
    unsafe { l.launch(cfg) }?;
    Ok(bf16_tensor(out, x.shape().to_vec()))
}

pub(super) fn group_norm(b: &CudaBackend, x: &T, groups: usize, weight: &T, bias: &T, eps: f32) -> Result<T> {
    let op = "group_norm";
    ensure!(x.rank() >= 2, "{op}: input has shape {:?}, expected [batch, channels, ..]", x.shape());
    let channels = x.dim(1);
    ensure!(groups > 0 && channels % groups == 0, "{op}: {channels} channels do not split into {groups} groups");
    expect_shape("weight", op, weight.shape(), &[channels])?;
    expect_shape("bias", op, bias.shape(), &[channels])?;
    let (xs, ws, bs) = (bf16_of(op, "input", x)?, bf16_of(op, "weight", weight)?, bf16_of(op, "bias", bias)?);
    let spatial: usize = x.shape()[2..].iter().product();
    let per_group = channels / groups;
    // A (sample, group) pair is n contiguous elements: per_group whole channel planes.
    let n = per_group * spatial;
    let all_groups = x.dim(0) * groups;
    let mut out = b.alloc_bf16(x.elem_count())?;
    if n == 0 || all_groups == 0 {
        return Ok(bf16_tensor(out, x.shape().to_vec()));
    }
    let chunks = n.div_ceil(GN_CHUNK);
    let blocks = all_groups * chunks;
    // Element indices within a group run to n plus one chunk; block indices to `blocks`.
    i32_arg(op, n + GN_CHUNK)?;
    i32_arg(op, blocks)?;
    let (n32, c32, s32, p32, g32) =
        (i32_arg(op, n)?, i32_arg(op, chunks)?, i32_arg(op, spatial)?, i32_arg(op, per_group)?, i32_arg(op, groups)?);
    let mut partial = b.alloc::<f32>(2 * blocks)?;
    let mut stats = b.alloc::<f32>(2 * all_groups)?;
    let per_chunk = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (GN_THREADS, 1, 1), shared_mem_bytes: 0 };

    // 1. (mean, M2) of every chunk; the 16-byte path needs each group to start 16-byte aligned.
    let f = b.function("norm", if n % 8 == 0 { "group_norm_stats_v8_bf16" } else { "group_norm_stats_bf16" })?;
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(&mut partial).arg(&n32).arg(&c32);
    // SAFETY: x holds all_groups * n elements, partial 2 per block.
    unsafe { l.launch(per_chunk) }?;

    // 2. Chunks merged into (mean, rstd) per group.
    let f = b.function("norm", "group_norm_finalize")?;
    let cfg = LaunchConfig { grid_dim: (all_groups as u32, 1, 1), block_dim: (GN_THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut l = b.stream().launch_builder(&f);
    l.arg(&partial).arg(&mut stats).arg(&n32).arg(&c32).arg(&eps);
    // SAFETY: partial holds 2 * chunks floats per group, stats 2 per group.
    unsafe { l.launch(cfg) }?;

    // 3. Normalise and apply the per-channel affine; the 16-byte path needs whole vectors to
    // lie in one channel plane.
    let f = b.function("norm", if spatial % 8 == 0 { "group_norm_apply_v8_bf16" } else { "group_norm_apply_bf16" })?;
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(&stats).arg(ws).arg(bs).arg(&mut out).arg(&n32).arg(&c32).arg(&s32).arg(&p32).arg(&g32);
    // SAFETY: x and out hold all_groups * n elements, weight and bias `channels`, stats 2 per group.
    unsafe { l.launch(per_chunk) }?;
    Ok(bf16_tensor(out, x.shape().to_vec()))
}

/// The rows of `x` `[batch, tokens, dim]` and the checks shared by the LayerNorm backward ops.
fn layer_norm_rows(op: &str, x: &T, gy: &T) -> Result<(usize, usize, usize)> {
    ensure!(x.rank() == 3, "{op}: x has shape {:?}, expected [batch, tokens, dim]", x.shape());
    expect_shape("output gradient", op, gy.shape(), x.shape())?;
    Ok((x.dim(0), x.dim(1), x.dim(2)))
}

/// One warp per row, `LN_ROWS_PER_BLOCK` rows per block.
fn per_row_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(LN_ROWS_PER_BLOCK) as u32, 1, 1),
        block_dim: (32 * LN_ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn layer_norm_modulate_backward(b: &CudaBackend, x: &T, scale: &T, gy: &T, eps: f32) -> Result<T> {
    let op = "layer_norm_modulate_backward";
    let (batch, tokens, dim) = layer_norm_rows(op, x, gy)?;
    expect_shape("scale", op, scale.shape(), &[batch, dim])?;
    let (xs, scs, gys) = (bf16_of(op, "x", x)?, bf16_of(op, "scale", scale)?, bf16_of(op, "output gradient", gy)?);
    let rows = batch * tokens;
    let mut gx = b.alloc_bf16(x.elem_count())?;
    if rows == 0 || dim == 0 {
        return Ok(bf16_tensor(gx, x.shape().to_vec()));
    }
    i32_arg(op, rows + LN_ROWS_PER_BLOCK)?;
    let (r32, t32, d32) = (i32_arg(op, rows)?, i32_arg(op, tokens)?, i32_arg(op, dim)?);
    let f = b.function("norm", "layer_norm_modulate_backward_bf16")?;
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(scs).arg(gys).arg(&mut gx).arg(&r32).arg(&t32).arg(&d32).arg(&eps);
    // SAFETY: x, gy and gx hold rows * dim elements, scale batch * dim.
    unsafe { l.launch(per_row_config(rows)) }?;
    Ok(bf16_tensor(gx, x.shape().to_vec()))
}

/// `(g_shift, g_scale)`: the row statistics in one launch (f32 scratch, 8 bytes per row), then
/// the per-sample sums over tokens in another.
pub(super) fn layer_norm_modulate_backward_shift_scale(b: &CudaBackend, x: &T, gy: &T, eps: f32) -> Result<(T, T)> {
    let op = "layer_norm_modulate_backward_shift_scale";
    let (batch, tokens, dim) = layer_norm_rows(op, x, gy)?;
    let (xs, gys) = (bf16_of(op, "x", x)?, bf16_of(op, "output gradient", gy)?);
    let (mut g_shift, mut g_scale) = (b.alloc_bf16(batch * dim)?, b.alloc_bf16(batch * dim)?);
    let rows = batch * tokens;
    if batch * dim > 0 {
        ensure!(batch <= 65_535, "{op}: batch {batch} exceeds the 65,535 samples one launch covers");
        i32_arg(op, x.elem_count())?;
        i32_arg(op, rows + LN_ROWS_PER_BLOCK)?;
        let (r32, t32, d32) = (i32_arg(op, rows)?, i32_arg(op, tokens)?, i32_arg(op, dim)?);
        let mut stats = b.alloc::<f32>(2 * rows)?;
        if rows > 0 {
            let f = b.function("norm", "layer_norm_row_stats_bf16")?;
            let mut l = b.stream().launch_builder(&f);
            l.arg(xs).arg(&mut stats).arg(&r32).arg(&d32).arg(&eps);
            // SAFETY: x holds rows * dim elements, stats 2 floats per row.
            unsafe { l.launch(per_row_config(rows)) }?;
        }
        let f = b.function("norm", "layer_norm_modulate_backward_shift_scale_bf16")?;
        let mut l = b.stream().launch_builder(&f);
        l.arg(xs).arg(gys).arg(&stats).arg(&mut g_shift).arg(&mut g_scale).arg(&t32).arg(&d32);
        // SAFETY: x and gy hold batch * tokens * dim elements, stats 2 floats per row (a whole
        // allocation, so the float2 reads are aligned), g_shift and g_scale batch * dim; the grid
        // covers every (column, sample) once and the kernel guards columns past dim.
        unsafe { l.launch(token_sum_config(batch, dim)) }?;
    }
    Ok((bf16_tensor(g_shift, vec![batch, dim]), bf16_tensor(g_scale, vec![batch, dim])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_variant_holds_the_row() {
        assert_eq!(layer_norm_kernel(3072), "layer_norm_modulate_v12_bf16");
        assert_eq!(layer_norm_kernel(4096), "layer_norm_modulate_v16_bf16");
        assert_eq!(layer_norm_kernel(2048), "layer_norm_modulate_v8_bf16");
        assert_eq!(layer_norm_kernel(2056), "layer_norm_modulate_v12_bf16");
        assert_eq!(layer_norm_kernel(64), "layer_norm_modulate_v1_bf16");
        assert_eq!(layer_norm_kernel(8), "layer_norm_modulate_v1_bf16");
        assert_eq!(layer_norm_kernel(264), "layer_norm_modulate_v2_bf16");
        assert_eq!(layer_norm_kernel(4104), "layer_norm_modulate_bf16");
        assert_eq!(layer_norm_kernel(30), "layer_norm_modulate_bf16");
    }
}
