//! Launches for `cuda/layout.cu`: concat and narrow as 2-D block copies (bf16 activations and
//! f32 position tables alike), and the tiled transpose.

use super::{bf16_of, bf16_tensor, i32_arg, shapes, CudaBackend, CudaStorage, T};
use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

/// The geometry of a 2-D copy: `rows` rows of `width` elements, from `src` (rows `src_pitch`
/// apart, starting at element `src_off`) to `dst` (rows `dst_pitch` apart, from `dst_off`).
struct Copy2d {
    src_off: usize,
    src_pitch: usize,
    dst_off: usize,
    dst_pitch: usize,
    rows: usize,
    width: usize,
}

fn copy_2d<E: DeviceRepr>(b: &CudaBackend, src: &CudaSlice<E>, dst: &mut CudaSlice<E>, g: &Copy2d) -> Result<()> {
    if g.rows == 0 || g.width == 0 {
        return Ok(());
    }
    let op = "copy_2d";
    let kernel = match size_of::<E>() {
        2 => "copy_2d_b16",
        4 => "copy_2d_b32",
        n => bail!("{op}: no copy kernel for {n}-byte elements"),
    };
    let f = b.function("layout", kernel)?;
    let (sp, dp, w, r) = (i32_arg(op, g.src_pitch)?, i32_arg(op, g.dst_pitch)?, i32_arg(op, g.width)?, i32_arg(op, g.rows)?);
    let src = src.slice(g.src_off..);
    let mut dst = dst.slice_mut(g.dst_off..);
    let cfg = LaunchConfig {
        grid_dim: (g.width.div_ceil(256) as u32, g.rows.min(65_535) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = b.stream().launch_builder(&f);
    l.arg(&src).arg(&sp).arg(&mut dst).arg(&dp).arg(&w).arg(&r);
    // SAFETY: the callers derive offsets and pitches from checked shapes, so every row stays
    // inside both buffers.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// A fresh buffer of `n` elements of the sources' common dtype, filled by `copies`: (index of
/// the source, where its block goes).
fn gather(b: &CudaBackend, op: &str, srcs: &[&T], n: usize, copies: &[(usize, Copy2d)]) -> Result<CudaStorage> {
    fn run<E: DeviceRepr>(b: &CudaBackend, parts: &[&CudaSlice<E>], n: usize, copies: &[(usize, Copy2d)]) -> Result<CudaSlice<E>> {
        let mut out = b.alloc::<E>(n)?;
        for (i, g) in copies {
            copy_2d(b, parts[*i], &mut out, g)?;
        }
        Ok(out)
    }
    macro_rules! same_dtype {
        ($variant:ident) => {{
            let parts = srcs
                .iter()
                .map(|t| match t.storage() {
                    CudaStorage::$variant(s) => Ok(s),
                    other => bail!("{op}: inputs mix {} and {}", srcs[0].dtype(), other.dtype()),
                })
                .collect::<Result<Vec<_>>>()?;
            CudaStorage::$variant(run(b, &parts, n, copies)?)
        }};
    }
    Ok(match srcs[0].storage() {
        CudaStorage::BF16(_) => same_dtype!(BF16),
        CudaStorage::F16(_) => same_dtype!(F16),
        CudaStorage::F32(_) => same_dtype!(F32),
    })
}

pub(super) fn concat(b: &CudaBackend, xs: &[&T], dim: usize) -> Result<T> {
    let shape = shapes::concat(&xs.iter().map(|x| x.shape()).collect::<Vec<_>>(), dim)?;
    let (outer, inner) = shapes::outer_inner(&shape, dim);
    let total = shape[dim] * inner;
    let mut col = 0;
    let copies: Vec<(usize, Copy2d)> = xs
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let run = x.dim(dim as isize) * inner;
            col += run;
            (i, Copy2d { src_off: 0, src_pitch: run, dst_off: col - run, dst_pitch: total, rows: outer, width: run })
        })
        .collect();
    Ok(T::from_storage(gather(b, "concat", xs, outer * total, &copies)?, shape))
}

pub(super) fn narrow(b: &CudaBackend, x: &T, dim: usize, start: usize, len: usize) -> Result<T> {
    let shape = shapes::narrow(x.shape(), dim, start, len)?;
    let (outer, inner) = shapes::outer_inner(x.shape(), dim);
    let g = Copy2d {
        src_off: start * inner,
        src_pitch: x.dim(dim as isize) * inner,
        dst_off: 0,
        dst_pitch: len * inner,
        rows: outer,
        width: len * inner,
    };
    Ok(T::from_storage(gather(b, "narrow", &[x], outer * len * inner, &[(0, g)])?, shape))
}

pub(super) fn transpose_last2(b: &CudaBackend, x: &T) -> Result<T> {
    let op = "transpose_last2";
    let shape = shapes::transpose_last2(x.shape())?;
    let (m, n) = (x.dim(-2), x.dim(-1));
    let batch = x.elem_count() / (m * n).max(1);
    let mut out = b.alloc_bf16(x.elem_count())?;
    if x.elem_count() > 0 {
        let f = b.function("layout", "transpose_bf16")?;
        let (m32, n32) = (i32_arg(op, m)?, i32_arg(op, n)?);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(32) as u32, m.div_ceil(32) as u32, batch as u32),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let mut l = b.stream().launch_builder(&f);
        l.arg(bf16_of(op, "x", x)?).arg(&mut out).arg(&m32).arg(&n32);
        // SAFETY: in and out hold batch * m * n elements.
        unsafe { l.launch(cfg) }?;
    }
    Ok(bf16_tensor(out, shape))
}
