//! Linear layers through cuBLASLt: bf16 operands, f32 accumulation, bias and GELU fused into the
//! GEMM's epilogue; the unmerged LoRA update accumulates into the base output in place (beta = 1).
//!
//! Row-major `y[M, N] = x[M, K] @ w[N, K]^T` is the column-major product `y^T = w^T' x^T`: with
//! cuBLAS' column-major view, `w` (row-major `[N, K]`) is a `K x N` matrix used transposed and `x`
//! a `K x M` matrix used as is, and `y^T` comes out `N x M` with leading dimension N — which is
//! row-major `y`. The bias is then per row of `y^T`, i.e. per output feature, as the epilogue wants.

use super::{bf16_of, bf16_tensor, elementwise_config, expect_shape, i32_arg, CudaBackend, CudaStorage, T};
use anyhow::{bail, ensure, Result};
use cudarc::cublaslt::{Activation, Matmul, MatmulConfig};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, PushKernelArg};
use half::bf16;

#[derive(Clone, Copy)]
pub(super) enum Epilogue {
    None,
    /// GELU, tanh approximation (cuBLASLt's GELU epilogue; the self-test holds it to the CPU's).
    GeluTanh,
}

/// `rows x in` times `[out, in]^T` into `c` (column offset `c` already applied by the caller),
/// whose rows are `ldc` apart: `c = alpha * x w^T + beta * c (+ bias) (then GELU)`.
#[allow(clippy::too_many_arguments)]
fn gemm<C: DevicePtrMut<bf16>>(
    b: &CudaBackend,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    c: &mut C,
    (rows, in_f, out_f, ldc): (usize, usize, usize, usize),
    alpha: f32,
    beta: f32,
    bias: Option<&CudaSlice<bf16>>,
    epilogue: Epilogue,
) -> Result<()> {
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: out_f as u64,
        n: rows as u64,
        k: in_f as u64,
        alpha,
        lda: in_f as i64,
        ldb: in_f as i64,
        beta,
        ldc: ldc as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    let act = match epilogue {
        Epilogue::None => None,
        Epilogue::GeluTanh => Some(Activation::Gelu),
    };
    // SAFETY: the shapes were checked by the callers: w holds out*in, x rows*in, and c covers
    // (rows - 1) * ldc + out elements past its start.
    unsafe { b.blas.matmul(cfg, w, x, c, bias, act.as_ref()) }?;
    Ok(())
}

/// `(rows, in, out)` of `x @ w^T` with every shape checked.
fn linear_dims(op: &str, x: &T, w: &T) -> Result<(usize, usize, usize)> {
    ensure!(w.rank() == 2, "{op}: weight has shape {:?}, expected [out, in]", w.shape());
    let (out_f, in_f) = (w.dim(0), w.dim(1));
    ensure!(x.rank() >= 1 && x.dim(-1) == in_f, "{op}: input has shape {:?}, weight expects {in_f} input features", x.shape());
    Ok((x.elem_count() / in_f, in_f, out_f))
}

pub(super) fn linear(b: &CudaBackend, x: &T, w: &T, bias: Option<&T>, epilogue: Epilogue) -> Result<T> {
    let op = "linear";
    let (rows, in_f, out_f) = linear_dims(op, x, w)?;
    let bias = match bias {
        Some(t) => {
            expect_shape("bias", op, t.shape(), &[out_f])?;
            Some(bf16_of(op, "bias", t)?)
        }
        None => None,
    };
    let mut y = b.alloc_bf16(rows * out_f)?;
    if rows > 0 {
        gemm(b, bf16_of(op, "x", x)?, bf16_of(op, "weight", w)?, &mut y, (rows, in_f, out_f, out_f), 1.0, 0.0, bias, epilogue)?;
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = out_f;
    Ok(bf16_tensor(y, shape))
}

/// `y[.., offset..offset + out] += scale * (x down^T up^T + up_bias)`: the rank-r intermediate in
/// bf16, the second GEMM accumulating straight into the column window of `y`.
#[allow(clippy::too_many_arguments)]
pub(super) fn lora_add(b: &CudaBackend, y: T, x: &T, down: &T, up: &T, up_bias: Option<&T>, scale: f32, offset: usize) -> Result<T> {
    let op = "lora_add";
    let (rows, in_f, rank) = linear_dims(op, x, down)?;
    ensure!(up.rank() == 2 && up.dim(1) == rank, "{op}: up has shape {:?}, expected [out, {rank}]", up.shape());
    let out_len = up.dim(0);
    let width = y.dim(-1);
    ensure!(y.elem_count() == rows * width, "{op}: y has shape {:?}, x has {rows} rows", y.shape());
    ensure!(offset + out_len <= width, "{op}: columns {offset}..{} exceed y's width {width}", offset + out_len);
    let shape = y.shape().to_vec();
    let mut ys = match y.into_storage() {
        CudaStorage::BF16(s) => s,
        other => bail!("{op}: y is {} on the GPU, expected BF16", other.dtype()),
    };
    if rows == 0 {
        return Ok(bf16_tensor(ys, shape));
    }
    let mut h = b.alloc_bf16(rows * rank)?;
    gemm(b, bf16_of(op, "x", x)?, bf16_of(op, "down", down)?, &mut h, (rows, in_f, rank, rank), 1.0, 0.0, None, Epilogue::None)?;
    {
        let mut window = ys.slice_mut(offset..);
        gemm(b, &h, bf16_of(op, "up", up)?, &mut window, (rows, rank, out_len, width), scale, 1.0, None, Epilogue::None)?;
    }
    if let Some(bias) = up_bias {
        expect_shape("up_bias", op, bias.shape(), &[out_len])?;
        let f = b.function("elementwise", "add_scaled_row_bf16")?;
        let (r32, w32, o32, l32) = (i32_arg(op, rows)?, i32_arg(op, width)?, i32_arg(op, offset)?, i32_arg(op, out_len)?);
        let mut l = b.stream().launch_builder(&f);
        l.arg(&mut ys).arg(bf16_of(op, "up_bias", bias)?).arg(&scale).arg(&r32).arg(&w32).arg(&o32).arg(&l32);
        // SAFETY: ys holds rows*width elements, bias out_len; the kernel touches columns
        // offset..offset+out_len of each row.
        unsafe { l.launch(elementwise_config(rows * out_len)) }?;
    }
    Ok(bf16_tensor(ys, shape))
}

/// One operand of [`matmul_strided`]: a row-major matrix whose rows are `ld` elements apart, the
/// next matrix of the batch `stride` elements further (0: one matrix shared by the whole batch).
#[derive(Clone, Copy, Debug)]
pub(super) struct Strided {
    pub ld: usize,
    pub stride: usize,
}

/// Row-major, strided-batched `C[i] = A[i] @ B[i]` (`C[i] += A[i] @ B[i]` when `accumulate`) for
/// `i < batch`, with A `[m, k]`, B `[k, n]`, C `[m, n]`: bf16 operands, f32 accumulation, one
/// rounding to bf16. (conv2d: `out[b] = W[O, C kh kw] @ cols[b]`, the bias pre-filled into C.)
///
/// In cuBLAS' column-major view a row-major matrix is its transpose with the same leading
/// dimension, so this is `C^T = B^T A^T` with neither operand transposed: cuBLAS `m, n` are our
/// `n, m`. No bias epilogue: cuBLASLt broadcasts a bias along our rows' length, not per row of C;
/// a per-row bias is written into C first and accumulated. Base pointers must be 256-byte
/// aligned (what cuBLASLt's algorithm heuristic assumes unless told otherwise); leading
/// dimensions and strides may be anything. Extents are checked against the views.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_strided(
    b: &CudaBackend,
    a: &CudaView<'_, bf16>,
    la: Strided,
    bm: &CudaView<'_, bf16>,
    lb: Strided,
    c: &mut CudaViewMut<'_, bf16>,
    lc: Strided,
    (m, n, k, batch): (usize, usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    let op = "matmul_strided";
    ensure!(m > 0 && n > 0 && k > 0 && batch > 0, "{op}: empty product m={m} n={n} k={k} batch={batch}");
    for (what, len, l, rows, cols) in [("A", a.len(), la, m, k), ("B", bm.len(), lb, k, n), ("C", c.len(), lc, m, n)] {
        let end = (batch - 1) * l.stride + (rows - 1) * l.ld + cols;
        ensure!(l.ld >= cols && end <= len, "{op}: {what} [{rows}, {cols}] x{batch} with {l:?} needs {end} elements, has {len}");
    }
    let stream = b.stream();
    let aligned = [a.device_ptr(stream).0, bm.device_ptr(stream).0, c.device_ptr_mut(stream).0].iter().all(|p| p % 256 == 0);
    ensure!(aligned, "{op}: operands must start 256-byte aligned");
    let cfg = MatmulConfig {
        transa: false,
        transb: false,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: lb.ld as i64,
        ldb: la.ld as i64,
        beta: if accumulate { 1.0 } else { 0.0 },
        ldc: lc.ld as i64,
        stride_a: Some(lb.stride as i64),
        stride_b: Some(la.stride as i64),
        stride_c: Some(lc.stride as i64),
        stride_bias: None,
        batch_size: Some(i32_arg(op, batch)?),
    };
    // SAFETY: the loop above checked that every matrix of the batch lies inside its view.
    unsafe { b.blas.matmul(cfg, bm, a, c, None, None) }?;
    Ok(())
}
