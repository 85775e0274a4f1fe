//! Launches for `cuda/spatial.cu`: conv2d as im2col + cuBLASLt GEMM (chunked over output pixels so
//! that the column workspace stays within `COLS_BUDGET`), nearest 2x upsampling, and pixel
//! (un)shuffle. Shape checks and messages are the CPU backend's.

use super::gemm::{matmul_strided, Strided};
use super::{bf16_of, bf16_tensor, elementwise_config, i32_arg, CudaBackend, T};
use crate::backend::shapes::ConvGeometry;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

/// Upper bound on the im2col workspace, in bf16 elements (256 MiB), unless a single 128-pixel
/// chunk of all images is larger (`batch * C kh kw > 1M`): that chunk is then the workspace.
const COLS_BUDGET: usize = 128 << 20;

/// Chunks of output pixels are multiples of this, so that every chunk's start in the output (and
/// in `x` on the 1x1 path) stays 256-byte aligned for cuBLASLt.
const CHUNK_ALIGN: usize = 128;

/// Blocks along a grid's y or z axis; the kernels loop past it.
const GRID_YZ_MAX: usize = 65_535;

pub(super) enum Direction {
    SpaceToDepth,
    DepthToSpace,
}

/// Output pixels per im2col chunk for `pixels` per image and `rows = batch * C kh kw`: all of them
/// when they fit `COLS_BUDGET`, else the fewest chunks that do, balanced, each a multiple of
/// `CHUNK_ALIGN` (at least one `CHUNK_ALIGN`).
fn chunk_pixels(pixels: usize, rows: usize) -> usize {
    if pixels.saturating_mul(rows) <= COLS_BUDGET {
        return pixels;
    }
    let most = (COLS_BUDGET / rows / CHUNK_ALIGN * CHUNK_ALIGN).max(CHUNK_ALIGN);
    let chunks = pixels.div_ceil(most);
    pixels.div_ceil(chunks).next_multiple_of(CHUNK_ALIGN).min(most)
}

/// x `[B, C, H, W]`, weight `[O, C, kh, kw]`, bias `[O]` -> `[B, O, Ho, Wo]` (see the trait).
pub(super) fn conv2d(b: &CudaBackend, x: &T, w: &T, bias: Option<&T>, stride: usize, pad: [usize; 4]) -> Result<T> {
    let op = "conv2d";
    let g = ConvGeometry::new(x.shape(), w.shape(), bias.map(|t| t.shape()), stride, pad)?;
    let (oh, ow) = (g.oh, g.ow);
    let xs = bf16_of(op, "x", x)?;
    let ws = bf16_of(op, "weight", w)?;
    let bs = bias.map(|t| bf16_of(op, "bias", t)).transpose()?;

    let pixels = oh * ow;
    let k = g.cin * g.kh * g.kw;
    let planes = g.batch * g.cout;
    let mut out = b.alloc_bf16(planes * pixels)?;
    let shape = vec![g.batch, g.cout, oh, ow];
    if planes * pixels == 0 {
        return Ok(bf16_tensor(out, shape));
    }
    if let Some(bs) = bs {
        fill_planes(b, bs, &mut out, planes, g.cout, pixels)?;
    } else if k == 0 {
        b.stream().memset_zeros(&mut out)?;
    }
    if k == 0 {
        // No input channels or an empty kernel: the output is the bias (or zeros), as on the CPU.
        return Ok(bf16_tensor(out, shape));
    }

    // out[b] = W[O, K] @ cols[b][K, n] for each chunk of n pixels, written at column p0 of the
    // [O, Ho Wo] image: rows Ho Wo apart, images O Ho Wo apart.
    let lw = Strided { ld: k, stride: 0 };
    let lout = Strided { ld: pixels, stride: g.cout * pixels };
    let accumulate = bs.is_some();
    let pointwise = g.kh == 1 && g.kw == 1 && stride == 1 && pad == [0; 4];
    if pointwise {
        // 1x1: x[b] = [C, H W] is the column matrix already (Ho Wo = H W here).
        let lx = Strided { ld: pixels, stride: g.cin * pixels };
        let dims = (g.cout, pixels, k, g.batch);
        matmul_strided(b, &ws.as_view(), lw, &xs.as_view(), lx, &mut out.as_view_mut(), lout, dims, accumulate)?;
        return Ok(bf16_tensor(out, shape));
    }

    let chunk = chunk_pixels(pixels, g.batch * k);
    let mut cols = b.alloc_bf16(g.batch * k * chunk)?;
    let f = b.function("spatial", "im2col_b16")?;
    let args = [
        i32_arg(op, g.batch)?,
        i32_arg(op, g.cin)?,
        i32_arg(op, g.h)?,
        i32_arg(op, g.w)?,
        i32_arg(op, g.kh)?,
        i32_arg(op, g.kw)?,
        i32_arg(op, stride)?,
        i32_arg(op, pad[0])?,
        i32_arg(op, pad[2])?,
        i32_arg(op, ow)?,
    ];
    // Everything the kernel computes in int: a plane's size, a padded row or column, a pixel index.
    i32_arg(op, g.h * g.w)?;
    i32_arg(op, g.h + pad[0] + pad[1])?;
    i32_arg(op, g.w + pad[2] + pad[3])?;
    i32_arg(op, pixels)?;
    i32_arg(op, k)?;
    for p0 in (0..pixels).step_by(chunk) {
        let n = chunk.min(pixels - p0);
        let (p0_32, n32) = (i32_arg(op, p0)?, i32_arg(op, n)?);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256) as u32, g.cin.min(GRID_YZ_MAX) as u32, g.batch.min(GRID_YZ_MAX) as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = b.stream().launch_builder(&f);
        l.arg(xs).arg(&mut cols);
        for a in &args {
            l.arg(a);
        }
        l.arg(&p0_32).arg(&n32);
        // SAFETY: x holds B C H W elements and every tap read is inside its plane; cols holds
        // B K chunk >= B K n elements, of which the kernel writes [B, K, n] exactly.
        unsafe { l.launch(cfg) }?;
        let lcols = Strided { ld: n, stride: k * n };
        let mut dst = out.slice_mut(p0..);
        matmul_strided(b, &ws.as_view(), lw, &cols.as_view(), lcols, &mut dst, lout, (g.cout, n, k, g.batch), accumulate)?;
    }
    Ok(bf16_tensor(out, shape))
}

/// out[q, :] = bias[q % channels] for the `planes` planes of `plane_len` elements.
fn fill_planes(
    b: &CudaBackend,
    bias: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
    planes: usize,
    channels: usize,
    plane_len: usize,
) -> Result<()> {
    let op = "conv2d";
    let f = b.function("spatial", "fill_planes_b16")?;
    let (q32, c32, n32) = (i32_arg(op, planes)?, i32_arg(op, channels)?, i32_arg(op, plane_len)?);
    let cfg = LaunchConfig {
        grid_dim: (plane_len.div_ceil(256) as u32, planes.min(GRID_YZ_MAX) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = b.stream().launch_builder(&f);
    l.arg(bias).arg(out).arg(&q32).arg(&c32).arg(&n32);
    // SAFETY: out holds planes * plane_len elements and bias `channels`; every index stays inside.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

pub(super) fn upsample_nearest2x(b: &CudaBackend, x: &T) -> Result<T> {
    let op = "upsample_nearest2x";
    ensure!(x.rank() == 4, "upsample_nearest2x: input has shape {:?}, expected [batch, channels, height, width]", x.shape());
    let (h, w) = (x.dim(2), x.dim(3));
    let xs = bf16_of(op, "x", x)?;
    let n = x.elem_count();
    let mut out = b.alloc_bf16(4 * n)?;
    let shape = vec![x.dim(0), x.dim(1), 2 * h, 2 * w];
    if n == 0 {
        return Ok(bf16_tensor(out, shape));
    }
    let (w32, n32) = (i32_arg(op, w)?, i32_arg(op, n)?);
    let f = b.function("spatial", "upsample_nearest2x_b16")?;
    let mut l = b.stream().launch_builder(&f);
    l.arg(xs).arg(&mut out).arg(&w32).arg(&n32);
    // SAFETY: x holds n elements, out 4 n; each thread writes its own 2x2 block.
    unsafe { l.launch(elementwise_config(n)) }?;
    Ok(bf16_tensor(out, shape))
}

pub(super) fn pixel_shuffle(b: &CudaBackend, x: &T, f: usize, d: Direction) -> Result<T> {
    let (op, kernel) = match d {
        Direction::SpaceToDepth => ("pixel_unshuffle", "pixel_unshuffle_b16"),
        Direction::DepthToSpace => ("pixel_shuffle", "pixel_shuffle_b16"),
    };
    ensure!(x.rank() == 4, "{op}: input has shape {:?}, expected [batch, channels, height, width]", x.shape());
    let (batch, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let shape = match d {
        Direction::SpaceToDepth => {
            ensure!(f > 0 && h % f == 0 && w % f == 0, "pixel_unshuffle: {h}x{w} is not a multiple of the factor {f}");
            vec![batch, c * f * f, h / f, w / f]
        }
        Direction::DepthToSpace => {
            ensure!(f > 0 && c % (f * f) == 0, "pixel_shuffle: {c} channels are not a multiple of {f}x{f}");
            vec![batch, c / (f * f), h * f, w * f]
        }
    };
    let xs = bf16_of(op, "x", x)?;
    let n = x.elem_count();
    let mut out = b.alloc_bf16(n)?;
    if n == 0 {
        return Ok(bf16_tensor(out, shape));
    }
    // The kernels compute C f f, H f and W f in int, besides the element index.
    let (c32, h32, w32, fac32, n32) = (i32_arg(op, c)?, i32_arg(op, h)?, i32_arg(op, w)?, i32_arg(op, f)?, i32_arg(op, n)?);
    i32_arg(op, c * f * f)?;
    i32_arg(op, h * f)?;
    i32_arg(op, w * f)?;
    let func = b.function("spatial", kernel)?;
    let mut l = b.stream().launch_builder(&func);
    l.arg(xs).arg(&mut out).arg(&c32).arg(&h32).arg(&w32).arg(&fac32).arg(&n32);
    // SAFETY: x and out hold n elements; the kernel writes each output once and gathers inside x.
    unsafe { l.launch(elementwise_config(n)) }?;
    Ok(bf16_tensor(out, shape))
}
