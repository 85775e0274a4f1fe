//! Linear layers through cuBLASLt: bf16 operands, f32 accumulation, bias and GELU fused into the
//! GEMM's epilogue; the unmerged LoRA update accumulates into the base output in place (beta = 1).
//!
//! Row-major `y[M, N] = x[M, K] @ w[N, K]^T` is the column-major product `y^T = w^T' x^T`: with
//! cuBLAS' column-major view, `w` (row-major `[N, K]`) is a `K x N` matrix used transposed and `x`
//! a `K x M` matrix used as is, and `y^T` comes out `N x M` with leading dimension N — which is
//! row-major `y`. The bias is then per row of `y^T`, i.e. per output feature, as the epilogue wants.

use super::{bf16_of, bf16_tensor, elementwise_config, expect_shape, i32_arg, CudaBackend, CudaStorage, T};
use crate::backend::backward::LoraAddGrads;
use anyhow::{bail, ensure, Result};
use cudarc::cublaslt::{result as lt_result, sys as lt_sys, Activation, Matmul, MatmulConfig, MatmulShared};
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

// ---- Training backward -------------------------------------------------------------------------

/// The output element of a [`gemm_rm`]: bf16 for activation gradients (and the rank-sized
/// intermediates of LoRA), f32 for parameter gradients, which are summed over every row.
pub(super) trait GemmOut: cudarc::driver::DeviceRepr {
    const TYPE: lt_sys::cudaDataType;
}

impl GemmOut for bf16 {
    const TYPE: lt_sys::cudaDataType = lt_sys::cudaDataType::CUDA_R_16BF;
}

impl GemmOut for f32 {
    const TYPE: lt_sys::cudaDataType = lt_sys::cudaDataType::CUDA_R_32F;
}

/// How a row-major operand of [`gemm_rm`] is stored: rows `ld` elements apart, and whether the
/// product uses it transposed.
#[derive(Clone, Copy, Debug)]
pub(super) struct Stored {
    pub ld: usize,
    pub trans: bool,
}

/// cuBLASLt workspace per backward GEMM (stream-ordered, so it comes from the cached pool):
/// room for the split-K algorithms that the long reductions of weight gradients want.
const WORKSPACE_BYTES: usize = 4 << 20;

/// Releases a cuBLASLt descriptor when dropped, so that every early return frees it.
struct Desc<H: Copy>(H, unsafe fn(H) -> std::result::Result<(), lt_result::CublasError>);

impl<H: Copy> Drop for Desc<H> {
    fn drop(&mut self) {
        // SAFETY: the handle was created by cuBLASLt and is destroyed once, here.
        let _ = unsafe { (self.1)(self.0) };
    }
}

/// The largest power of two (up to 256) dividing a device address: the alignment cuBLASLt may
/// assume. Its heuristic assumes 256 unless told, and a column window (a LoRA's slice of a fused
/// output) or an f32 buffer need not be.
fn alignment(ptr: u64) -> u32 {
    1 << ptr.trailing_zeros().min(8)
}

/// Row-major `C[m, n] = alpha op(A) op(B) + beta C`, with op(A) `[m, k]` and op(B) `[k, n]`:
/// bf16 operands, f32 accumulation, C in bf16 or f32. `A` is stored `[m, k]`, or `[k, m]` when
/// `la.trans`; `B` `[k, n]`, or `[n, k]` when `lb.trans`; C's rows are `ldc` apart. Extents are
/// checked against the buffers. Unlike [`gemm`] (cudarc's `Matmul`, one element type for A, B
/// and C) this drives cuBLASLt directly, for the mixed bf16 x bf16 -> f32 products of the
/// parameter gradients and for operands that are views.
///
/// In cuBLAS' column-major view a row-major matrix is its transpose, so this is
/// `C^T = op(B)^T op(A)^T`: cuBLAS' A is our B (transposed in cuBLAS' terms exactly when it is in
/// ours), cuBLAS' B is our A, and its `m, n` are our `n, m`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_rm<E: GemmOut>(
    b: &CudaBackend,
    a: &impl DevicePtr<bf16>,
    la: Stored,
    bm: &impl DevicePtr<bf16>,
    lb: Stored,
    c: &mut impl DevicePtrMut<E>,
    ldc: usize,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let op = "gemm";
    ensure!(m > 0 && n > 0 && k > 0, "{op}: empty product m={m} n={n} k={k}");
    let a_stored = if la.trans { (k, m) } else { (m, k) };
    let b_stored = if lb.trans { (n, k) } else { (k, n) };
    for (what, len, ld, (rows, cols)) in [("A", a.len(), la.ld, a_stored), ("B", bm.len(), lb.ld, b_stored), ("C", c.len(), ldc, (m, n))] {
        let end = (rows - 1) * ld + cols;
        ensure!(ld >= cols && end <= len, "{op}: {what} [{rows}, {cols}] with rows {ld} apart needs {end} elements, has {len}");
    }
    let mut workspace = b.alloc::<u8>(WORKSPACE_BYTES)?;
    let stream = b.stream();
    let (a_ptr, _a_sync) = a.device_ptr(stream);
    let (b_ptr, _b_sync) = bm.device_ptr(stream);
    let (c_ptr, _c_sync) = c.device_ptr_mut(stream);
    let (w_ptr, _w_sync) = workspace.device_ptr_mut(stream);
    let bf16_type = lt_sys::cudaDataType::CUDA_R_16BF;
    // cuBLAS' operands (stored shapes in its column-major terms: a row-major [r, c] is c x r).
    let layout = |ty, (rows, cols): (usize, usize), ld: usize| -> Result<Desc<lt_sys::cublasLtMatrixLayout_t>> {
        let h = lt_result::create_matrix_layout(ty, cols as u64, rows as u64, ld as i64)?;
        Ok(Desc(h, lt_result::destroy_matrix_layout))
    };
    let lay_a = layout(bf16_type, b_stored, lb.ld)?;
    let lay_b = layout(bf16_type, a_stored, la.ld)?;
    let lay_c = layout(E::TYPE, (m, n), ldc)?;
    let desc = Desc(
        lt_result::create_matmul_desc(lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt_sys::cudaDataType::CUDA_R_32F)?,
        lt_result::destroy_matmul_desc,
    );
    let pref = Desc(lt_result::create_matmul_pref()?, lt_result::destroy_matmul_pref);
    let workspace_bytes = WORKSPACE_BYTES as u64;
    // SAFETY: each attribute gets a value of the type cuBLASLt documents for it (cublasOperation_t
    // as i32, alignments u32, the workspace size u64), read during the call only.
    unsafe {
        use lt_sys::cublasLtMatmulDescAttributes_t as D;
        use lt_sys::cublasLtMatmulPreferenceAttributes_t as P;
        for (attr, trans) in [(D::CUBLASLT_MATMUL_DESC_TRANSA, lb.trans), (D::CUBLASLT_MATMUL_DESC_TRANSB, la.trans)] {
            let v = trans as i32;
            lt_result::set_matmul_desc_attribute(desc.0, attr, (&v) as *const i32 as *const _, size_of::<i32>())?;
        }
        let ws = (&workspace_bytes) as *const u64 as *const _;
        lt_result::set_matmul_pref_attribute(pref.0, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ws, size_of::<u64>())?;
        for (attr, ptr) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, b_ptr),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, a_ptr),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, c_ptr),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, c_ptr),
        ] {
            let v = alignment(ptr);
            lt_result::set_matmul_pref_attribute(pref.0, attr, (&v) as *const u32 as *const _, size_of::<u32>())?;
        }
    }
    let handle = *b.blas.handle();
    // SAFETY: the layouts describe extents checked above against the buffers; alpha and beta are
    // f32 as the descriptor's scale type; everything runs on the backend's stream, which orders
    // the workspace's reuse.
    unsafe {
        let heuristic = lt_result::get_matmul_algo_heuristic(handle, desc.0, lay_a.0, lay_b.0, lay_c.0, lay_c.0, pref.0)?;
        lt_result::matmul(
            handle,
            desc.0,
            (&alpha) as *const f32 as *const _,
            (&beta) as *const f32 as *const _,
            b_ptr as *const _,
            lay_a.0,
            a_ptr as *const _,
            lay_b.0,
            c_ptr as *const _,
            lay_c.0,
            c_ptr as *mut _,
            lay_c.0,
            &heuristic.algo,
            w_ptr as *mut _,
            WORKSPACE_BYTES,
            stream.cu_stream() as *mut _,
        )?;
    }
    Ok(())
}

/// f32 zeros: the parameter gradient of a product over no rows.
fn zeros_f32(b: &CudaBackend, n: usize, shape: Vec<usize>) -> Result<T> {
    Ok(T::from_storage(CudaStorage::F32(b.stream().alloc_zeros::<f32>(n.max(1))?), shape))
}

/// `gx = gy @ w` for gy `[.., out]`, w `[out, in]`.
pub(super) fn linear_backward_input(b: &CudaBackend, gy: &T, w: &T) -> Result<T> {
    let op = "linear_backward_input";
    ensure!(w.rank() == 2, "{op}: weight has shape {:?}, expected [out, in]", w.shape());
    let (out_f, in_f) = (w.dim(0), w.dim(1));
    ensure!(
        gy.rank() >= 1 && gy.dim(-1) == out_f,
        "{op}: output gradient has shape {:?}, weight {:?} gives {out_f} features",
        gy.shape(),
        w.shape()
    );
    let rows: usize = gy.shape()[..gy.rank() - 1].iter().product();
    let mut shape = gy.shape().to_vec();
    *shape.last_mut().unwrap() = in_f;
    let (gys, ws) = (bf16_of(op, "output gradient", gy)?, bf16_of(op, "weight", w)?);
    if rows * in_f > 0 && out_f == 0 {
        return Ok(bf16_tensor(b.stream().alloc_zeros::<bf16>(rows * in_f)?, shape));
    }
    let mut gx = b.alloc_bf16(rows * in_f)?;
    if rows * in_f > 0 {
        let normal = |ld| Stored { ld, trans: false };
        gemm_rm(b, gys, normal(out_f), ws, normal(in_f), &mut gx, in_f, (rows, in_f, out_f), 1.0, 0.0)?;
    }
    Ok(bf16_tensor(gx, shape))
}

/// `(gy^T @ x, sum of gy's rows)`, both f32, for gy `[.., out]` and x `[.., in]`.
pub(super) fn linear_backward_params(b: &CudaBackend, gy: &T, x: &T) -> Result<(T, T)> {
    let op = "linear_backward_params";
    ensure!(gy.rank() >= 1 && x.rank() >= 1, "{op}: output gradient {:?} and input {:?} must have features", gy.shape(), x.shape());
    let (out_f, in_f) = (gy.dim(-1), x.dim(-1));
    let leading = &x.shape()[..x.rank() - 1];
    ensure!(
        gy.shape()[..gy.rank() - 1] == *leading,
        "{op}: output gradient has shape {:?}, input {:?}: their leading dimensions differ",
        gy.shape(),
        x.shape()
    );
    let rows: usize = leading.iter().product();
    let (gys, xs) = (bf16_of(op, "output gradient", gy)?, bf16_of(op, "input", x)?);
    if rows == 0 || out_f == 0 || in_f == 0 {
        return Ok((zeros_f32(b, out_f * in_f, vec![out_f, in_f])?, zeros_f32(b, out_f, vec![out_f])?));
    }
    let mut g_weight = b.alloc::<f32>(out_f * in_f)?;
    gemm_rm(
        b,
        gys,
        Stored { ld: out_f, trans: true },
        xs,
        Stored { ld: in_f, trans: false },
        &mut g_weight,
        in_f,
        (out_f, in_f, rows),
        1.0,
        0.0,
    )?;
    let g_bias = super::elementwise::token_sums::<f32>(b, op, gys, None, 1, rows, out_f)?;
    Ok((T::from_storage(CudaStorage::F32(g_weight), vec![out_f, in_f]), T::from_storage(CudaStorage::F32(g_bias), vec![out_f])))
}

/// The LoRA backward (`BackwardOps::lora_backward`): with `g_h = scale gy_part @ up` (bf16, the
/// gradient of the rank-sized `h = x @ down^T`), `gx += g_h @ down` in place, `g_down = g_h^T @ x`
/// and `g_up = scale gy_part^T @ h`, h recomputed as the forward computes it. `gy_part` is read in
/// place as a column window of gy (rows `width` apart).
#[allow(clippy::too_many_arguments)]
pub(super) fn lora_backward(
    b: &CudaBackend,
    gx: T,
    gy: &T,
    x: &T,
    down: &T,
    up: &T,
    scale: f32,
    offset: usize,
) -> Result<LoraAddGrads<CudaBackend>> {
    let op = "lora_backward";
    ensure!(down.rank() == 2 && up.rank() == 2, "{op}: down {:?} and up {:?} must be matrices", down.shape(), up.shape());
    let (rank, in_f, out_len) = (down.dim(0), down.dim(1), up.dim(0));
    expect_shape("up", op, up.shape(), &[out_len, rank])?;
    ensure!(x.rank() >= 1 && x.dim(-1) == in_f, "{op}: input has shape {:?}, down expects {in_f} features", x.shape());
    expect_shape("input gradient", op, gx.shape(), x.shape())?;
    let (rows, width): (usize, usize) = (x.shape()[..x.rank() - 1].iter().product(), gy.dim(-1));
    ensure!(
        gy.elem_count() == rows * width && offset + out_len <= width,
        "{op}: update of {out_len} columns at {offset} does not fit output gradient {:?} of input {:?}",
        gy.shape(),
        x.shape()
    );
    let (xs, gys, downs, ups) =
        (bf16_of(op, "input", x)?, bf16_of(op, "output gradient", gy)?, bf16_of(op, "down", down)?, bf16_of(op, "up", up)?);
    let gx_shape = gx.shape().to_vec();
    let mut gxs = match gx.into_storage() {
        CudaStorage::BF16(s) => s,
        other => bail!("{op}: input gradient is {} on the GPU, expected BF16", other.dtype()),
    };
    if rows == 0 || rank == 0 || in_f == 0 || out_len == 0 {
        return Ok(LoraAddGrads {
            gx: bf16_tensor(gxs, gx_shape),
            down: zeros_f32(b, rank * in_f, vec![rank, in_f])?,
            up: zeros_f32(b, out_len * rank, vec![out_len, rank])?,
        });
    }
    let normal = |ld| Stored { ld, trans: false };
    let transposed = |ld| Stored { ld, trans: true };
    let gy_part = gys.slice(offset..);
    let mut g_h = b.alloc_bf16(rows * rank)?;
    gemm_rm(b, &gy_part, normal(width), ups, normal(rank), &mut g_h, rank, (rows, rank, out_len), scale, 0.0)?;
    gemm_rm(b, &g_h, normal(rank), downs, normal(in_f), &mut gxs, in_f, (rows, in_f, rank), 1.0, 1.0)?;
    let mut g_down = b.alloc::<f32>(rank * in_f)?;
    gemm_rm(b, &g_h, transposed(rank), xs, normal(in_f), &mut g_down, in_f, (rank, in_f, rows), 1.0, 0.0)?;
    let mut h = b.alloc_bf16(rows * rank)?;
    gemm(b, xs, downs, &mut h, (rows, in_f, rank, rank), 1.0, 0.0, None, Epilogue::None)?;
    let mut g_up = b.alloc::<f32>(out_len * rank)?;
    gemm_rm(b, &gy_part, transposed(width), &h, normal(rank), &mut g_up, rank, (out_len, rank, rows), scale, 0.0)?;
    Ok(LoraAddGrads {
        gx: bf16_tensor(gxs, gx_shape),
        down: T::from_storage(CudaStorage::F32(g_down), vec![rank, in_f]),
        up: T::from_storage(CudaStorage::F32(g_up), vec![out_len, rank]),
    })
}
