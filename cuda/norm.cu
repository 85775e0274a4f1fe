// Normalisations: LayerNorm (no affine) fused with adaLN modulation, RMSNorm (T5), and GroupNorm
// (the autoencoder). bf16 in and out, statistics and arithmetic in f32. The CPU twin is
// engine/src/backend/cpu/{norm.rs,group_norm.rs}; the self-test compares the two.
//
// layer_norm_modulate: out = (1 + scale[b]) * (x - mean) * rsqrt(var + eps) + shift[b] per row
//   of x [B, L, D], biased variance. One warp per row, 4 rows per 128-thread block. The fast
//   path (D % 8 == 0, D <= 4096) keeps the whole row in registers as packed bf16 (VPT 16-byte
//   vectors per lane, VPT a template parameter chosen by the launcher as the smallest of
//   1, 2, 4, 8, 12, 16 that covers D / 256; D = 3072 is exactly 12), so x is read from memory
//   once: the VPT loads of a lane are issued together, then the exact two-pass statistics (mean,
//   then the sum of squared deviations about it) run on the registers with warp shuffles, and
//   no shared memory or __syncthreads is needed. Lane `lane` owns vectors j * 32 + lane, so
//   every load and store of a warp is 512 contiguous bytes. shift and scale ([B, D], shared by
//   the L rows of a sample) are read after the statistics and come from L1/L2. Otherwise
//   (D % 8 != 0 or D > 4096) a scalar warp-per-row kernel reads the row three times (mean,
//   variance, output) from global memory; the re-reads hit L1.
//
// group_norm: x [B, C, S] (S = product of the spatial dims), C in `groups` groups of
//   cpg = C / groups contiguous channels, so a (b, g) group is n = cpg * S contiguous elements
//   (millions at 1024 px). Three launches:
//   1. group_norm_stats: the group is cut into chunks of 8192 elements, one 256-thread block per
//      (group, chunk), 32 elements per thread held in f32 registers (4 16-byte vectors when
//      n % 8 == 0, else 32 scalars at stride 256). The block computes its chunk's exact
//      two-pass mean and M2 = sum (x - mean_chunk)^2 and writes (mean, M2) to a f32 scratch.
//   2. group_norm_finalize: one block per group merges the chunks with Chan's formula:
//      mean = sum n_i mean_i / n, M2 = sum (M2_i + n_i (mean_i - mean)^2). Every term is
//      non-negative, so there is no cancellation however large the mean is against the spread.
//      Writes (mean, rstd) per group.
//   3. group_norm_apply: same blocking as 1; out = (x - mean) * (rstd * weight[c]) + bias[c]. The
//      16-byte path needs S % 8 == 0 (then the 8 elements of a vector share one channel); the
//      scalar path finds each element's channel by division.
//   x is read twice (stats, apply) and written once; the scratch is 8 bytes per 8192 elements.
#include "common.cuh"
#include "reduce.cuh"

// ---------------------------------------------------------------------------------------------
// Reductions

// The sum of v over the block, returned to every thread. `red` holds one float per warp; the
// leading barrier makes back-to-back calls safe.
__device__ __forceinline__ float norm_block_sum(float v, float *red) {
    v = warp_sum(v);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / 32) ? red[lane] : 0.0f;
    return warp_sum(v);
}

// ---------------------------------------------------------------------------------------------
// LayerNorm + modulation

constexpr int LN_ROWS_PER_BLOCK = 4;  // warps of a 128-thread block, one row each

template <int VPT>
__device__ __forceinline__ void layer_norm_modulate_vec(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ shift,
                                                        const __nv_bfloat16 *__restrict__ scale, __nv_bfloat16 *__restrict__ out,
                                                        int rows, int tokens, int dim, float eps) {
    const int row = blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;  // uniform over the warp
    const int nvec = dim / 8;
    const __nv_bfloat16 *xr = x + (size_t)row * dim;

    uint4 raw[VPT];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        const int v = j * 32 + lane;
        raw[j] = v < nvec ? load16(xr + 8 * v) : make_uint4(0, 0, 0, 0);
    }

    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        float f[8];
        unpack8_bits(raw[j], f);
#pragma unroll
        for (int e = 0; e < 8; ++e) sum += f[e];
    }
    const float mean = warp_sum(sum) / (float)dim;

    float sq = 0.0f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        if (j * 32 + lane < nvec) {  // the zero padding is not part of the row
            float f[8];
            unpack8_bits(raw[j], f);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float d = f[e] - mean;
                sq += d * d;
            }
        }
    }
    const float rstd = rsqrtf(warp_sum(sq) / (float)dim + eps);

    const size_t sample = (size_t)(row / tokens) * dim;
    const __nv_bfloat16 *sh = shift + sample, *sc = scale + sample;
    __nv_bfloat16 *o = out + (size_t)row * dim;
    // The shift/scale loads are unconditional (a lane past the row's end reads the last vector)
    // so that they can be issued ahead of the stores; only the stores are guarded.
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        const int v = j * 32 + lane, vc = min(v, nvec - 1);
        float f[8], s[8], m[8];
        unpack8_bits(raw[j], f);
        unpack8_bits(load16(sh + 8 * vc), s);
        unpack8_bits(load16(sc + 8 * vc), m);
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = (1.0f + m[e]) * ((f[e] - mean) * rstd) + s[e];
        if (v < nvec) store16(o + 8 * v, pack8_bits(f));
    }
}

// MIN_BLOCKS caps the registers (65536 / (128 MIN_BLOCKS)) so that ptxas neither spills nor
// grows into a low occupancy: 16 vectors fit 128 registers, 12 fit 102 (at 80 they spill on
// sm_80), 8 fit 80, 4 and fewer 64.
#define LN_VEC_KERNEL(VPT, MIN_BLOCKS)                                                                                              \
    extern "C" __global__ void __launch_bounds__(32 * LN_ROWS_PER_BLOCK, MIN_BLOCKS)                                                \
        layer_norm_modulate_v##VPT##_bf16(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ shift,             \
                                          const __nv_bfloat16 *__restrict__ scale, __nv_bfloat16 *__restrict__ out, int rows,        \
                                          int tokens, int dim, float eps) {                                                          \
        layer_norm_modulate_vec<VPT>(x, shift, scale, out, rows, tokens, dim, eps);                                                 \
    }

LN_VEC_KERNEL(1, 8)
LN_VEC_KERNEL(2, 8)
LN_VEC_KERNEL(4, 8)
LN_VEC_KERNEL(8, 6)
LN_VEC_KERNEL(12, 5)
LN_VEC_KERNEL(16, 4)

// Any D: one warp per row, scalar accesses, three passes over the row.
extern "C" __global__ void __launch_bounds__(32 * LN_ROWS_PER_BLOCK)
    layer_norm_modulate_bf16(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ shift,
                             const __nv_bfloat16 *__restrict__ scale, __nv_bfloat16 *__restrict__ out, int rows, int tokens, int dim,
                             float eps) {
    const int row = blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const __nv_bfloat16 *xr = x + (size_t)row * dim;
    float sum = 0.0f;
    for (int i = lane; i < dim; i += 32) sum += __bfloat162float(xr[i]);
    const float mean = warp_sum(sum) / (float)dim;
    float sq = 0.0f;
    for (int i = lane; i < dim; i += 32) {
        const float d = __bfloat162float(xr[i]) - mean;
        sq += d * d;
    }
    const float rstd = rsqrtf(warp_sum(sq) / (float)dim + eps);
    const size_t sample = (size_t)(row / tokens) * dim;
    __nv_bfloat16 *o = out + (size_t)row * dim;
    for (int i = lane; i < dim; i += 32) {
        const float n = (__bfloat162float(xr[i]) - mean) * rstd;
        o[i] = __float2bfloat16((1.0f + __bfloat162float(scale[sample + i])) * n + __bfloat162float(shift[sample + i]));
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm (T5's LayerNorm): out = x * rsqrt(mean(x^2) + eps) * weight per row of D. It normalises
// the text encoder's tokens once per import, so it is the scalar warp-per-row form.

extern "C" __global__ void __launch_bounds__(32 * LN_ROWS_PER_BLOCK)
    rms_norm_bf16(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ weight, __nv_bfloat16 *__restrict__ out,
                  int rows, int dim, float eps) {
    const int row = blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const __nv_bfloat16 *xr = x + (size_t)row * dim;
    float sq = 0.0f;
    for (int i = lane; i < dim; i += 32) {
        const float v = __bfloat162float(xr[i]);
        sq += v * v;
    }
    const float r = rsqrtf(warp_sum(sq) / (float)dim + eps);
    __nv_bfloat16 *o = out + (size_t)row * dim;
    for (int i = lane; i < dim; i += 32) o[i] = __float2bfloat16(__bfloat162float(xr[i]) * r * __bfloat162float(weight[i]));
}

// ---------------------------------------------------------------------------------------------
// GroupNorm

constexpr int GN_THREADS = 256;
constexpr int GN_PER_THREAD = 32;
constexpr int GN_CHUNK = GN_THREADS * GN_PER_THREAD;  // elements per block; the Rust side agrees
constexpr int GN_VECS = GN_PER_THREAD / 8;

// Loads this thread's 32 elements of chunk `chunk` of a group (`xg`, n elements): with VEC
// (n % 8 == 0) vectors (chunk * GN_CHUNK / 8) + j * 256 + tid for j < 4, else elements
// chunk * GN_CHUNK + j * 256 + tid for j < 32. Elements past n read as 0 and are flagged in
// `valid` (one bit per vector or per element).
template <bool VEC>
__device__ __forceinline__ unsigned group_norm_load(const __nv_bfloat16 *__restrict__ xg, int n, int chunk, float v[GN_PER_THREAD]) {
    const int start = chunk * GN_CHUNK;
    unsigned valid = 0;
    if (VEC) {
        uint4 raw[GN_VECS];
#pragma unroll
        for (int j = 0; j < GN_VECS; ++j) {
            const int e = start + (j * GN_THREADS + (int)threadIdx.x) * 8;
            raw[j] = make_uint4(0, 0, 0, 0);
            if (e < n) {
                raw[j] = load16(xg + e);
                valid |= 1u << j;
            }
        }
#pragma unroll
        for (int j = 0; j < GN_VECS; ++j) unpack8_bits(raw[j], v + 8 * j);
    } else {
#pragma unroll
        for (int j = 0; j < GN_PER_THREAD; ++j) {
            const int e = start + j * GN_THREADS + (int)threadIdx.x;
            v[j] = 0.0f;
            if (e < n) {
                v[j] = __bfloat162float(xg[e]);
                valid |= 1u << j;
            }
        }
    }
    return valid;
}

template <bool VEC>
__device__ __forceinline__ bool group_norm_valid(unsigned valid, int k) {
    return valid & (1u << (VEC ? k / 8 : k));
}

// Grid: groups_total * chunks blocks of 256; block = (group, chunk). partial[2 * block] = the
// chunk's (mean, M2).
template <bool VEC>
__device__ __forceinline__ void group_norm_stats(const __nv_bfloat16 *__restrict__ x, float *__restrict__ partial, int n, int chunks) {
    __shared__ float red[32];
    const int grp = blockIdx.x / chunks, chunk = blockIdx.x - grp * chunks;
    float v[GN_PER_THREAD];
    const unsigned valid = group_norm_load<VEC>(x + (size_t)grp * n, n, chunk, v);
    const int count = min(GN_CHUNK, n - chunk * GN_CHUNK);

    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < GN_PER_THREAD; ++k) s += v[k];
    const float mean = norm_block_sum(s, red) / (float)count;

    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < GN_PER_THREAD; ++k) {
        const float d = v[k] - mean;
        if (group_norm_valid<VEC>(valid, k)) sq += d * d;
    }
    const float m2 = norm_block_sum(sq, red);
    if (threadIdx.x == 0) {
        partial[2 * (size_t)blockIdx.x] = mean;
        partial[2 * (size_t)blockIdx.x + 1] = m2;
    }
}

extern "C" __global__ void __launch_bounds__(GN_THREADS)
    group_norm_stats_v8_bf16(const __nv_bfloat16 *__restrict__ x, float *__restrict__ partial, int n, int chunks) {
    group_norm_stats<true>(x, partial, n, chunks);
}

extern "C" __global__ void __launch_bounds__(GN_THREADS)
    group_norm_stats_bf16(const __nv_bfloat16 *__restrict__ x, float *__restrict__ partial, int n, int chunks) {
    group_norm_stats<false>(x, partial, n, chunks);
}

// One block (any multiple of 32 threads) per group: merges the group's `chunks` partials
// (Chan et al.) and writes stats[2 * grp] = mean, stats[2 * grp + 1] = rsqrt(M2 / n + eps).
extern "C" __global__ void group_norm_finalize(const float *__restrict__ partial, float *__restrict__ stats, int n, int chunks,
                                               float eps) {
    __shared__ float red[32];
    const int grp = blockIdx.x;
    const float *p = partial + 2 * (size_t)grp * chunks;
    float s = 0.0f;
    for (int k = threadIdx.x; k < chunks; k += blockDim.x) s += (float)min(GN_CHUNK, n - k * GN_CHUNK) * p[2 * k];
    const float mean = norm_block_sum(s, red) / (float)n;
    float m2 = 0.0f;
    for (int k = threadIdx.x; k < chunks; k += blockDim.x) {
        const float d = p[2 * k] - mean;
        m2 += p[2 * k + 1] + (float)min(GN_CHUNK, n - k * GN_CHUNK) * d * d;
    }
    m2 = norm_block_sum(m2, red);
    if (threadIdx.x == 0) {
        stats[2 * grp] = mean;
        stats[2 * grp + 1] = rsqrtf(m2 / (float)n + eps);
    }
}

// Same grid as the stats. Group grp = b * groups + g covers channels g * cpg .. (g + 1) * cpg of
// sample b; element e of the group is in channel g * cpg + e / spatial.
template <bool VEC>
__device__ __forceinline__ void group_norm_apply(const __nv_bfloat16 *__restrict__ x, const float *__restrict__ stats,
                                                 const __nv_bfloat16 *__restrict__ weight, const __nv_bfloat16 *__restrict__ bias,
                                                 __nv_bfloat16 *__restrict__ out, int n, int chunks, int spatial, int cpg, int groups) {
    const int grp = blockIdx.x / chunks, chunk = blockIdx.x - grp * chunks;
    const int c0 = (grp % groups) * cpg;
    const float mean = stats[2 * grp], rstd = stats[2 * grp + 1];
    float v[GN_PER_THREAD];
    const unsigned valid = group_norm_load<VEC>(x + (size_t)grp * n, n, chunk, v);
    __nv_bfloat16 *og = out + (size_t)grp * n;
    const int start = chunk * GN_CHUNK;
    if (VEC) {
#pragma unroll
        for (int j = 0; j < GN_VECS; ++j) {
            if (valid & (1u << j)) {
                const int e = start + (j * GN_THREADS + (int)threadIdx.x) * 8;
                // spatial % 8 == 0: the vector's 8 elements lie in one channel.
                const int c = c0 + e / spatial;
                const float a = rstd * __bfloat162float(weight[c]), b = __bfloat162float(bias[c]);
                float y[8];
#pragma unroll
                for (int k = 0; k < 8; ++k) y[k] = (v[8 * j + k] - mean) * a + b;
                store16(og + e, pack8_bits(y));
            }
        }
    } else {
#pragma unroll
        for (int j = 0; j < GN_PER_THREAD; ++j) {
            if (valid & (1u << j)) {
                const int e = start + j * GN_THREADS + (int)threadIdx.x;
                const int c = c0 + e / spatial;
                og[e] = __float2bfloat16((v[j] - mean) * (rstd * __bfloat162float(weight[c])) + __bfloat162float(bias[c]));
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(GN_THREADS)
    group_norm_apply_v8_bf16(const __nv_bfloat16 *__restrict__ x, const float *__restrict__ stats, const __nv_bfloat16 *__restrict__ weight,
                             const __nv_bfloat16 *__restrict__ bias, __nv_bfloat16 *__restrict__ out, int n, int chunks, int spatial, int cpg,
                             int groups) {
    group_norm_apply<true>(x, stats, weight, bias, out, n, chunks, spatial, cpg, groups);
}

extern "C" __global__ void __launch_bounds__(GN_THREADS)
    group_norm_apply_bf16(const __nv_bfloat16 *__restrict__ x, const float *__restrict__ stats, const __nv_bfloat16 *__restrict__ weight,
                          const __nv_bfloat16 *__restrict__ bias, __nv_bfloat16 *__restrict__ out, int n, int chunks, int spatial, int cpg,
                          int groups) {
    group_norm_apply<false>(x, stats, weight, bias, out, n, chunks, spatial, cpg, groups);
}

// ---------------------------------------------------------------------------------------------
// LayerNorm + modulation, training backward (the CPU twin is engine/src/backend/cpu/backward.rs).
// The row statistics are recomputed from x, exactly as the scalar forward computes them (two-pass
// mean and biased variance, f32), so that x_hat matches the forward's.


// (mean, rstd) of one row of `dim` elements, by one warp, returned to every lane.
__device__ __forceinline__ float2 layer_norm_row_stats(const __nv_bfloat16 *__restrict__ xr, int dim, float eps) {
    const int lane = threadIdx.x % 32;
    float sum = 0.0f;
    for (int i = lane; i < dim; i += 32) sum += __bfloat162float(xr[i]);
    const float mean = warp_sum(sum) / (float)dim;
    float sq = 0.0f;
    for (int i = lane; i < dim; i += 32) {
        const float d = __bfloat162float(xr[i]) - mean;
        sq += d * d;
    }
    return make_float2(mean, rsqrtf(warp_sum(sq) / (float)dim + eps));
}

// gx = rstd (g - mean(g) - x_hat mean(g x_hat)) with g = (1 + scale[b]) gy, the gradient of
// x_hat. One warp per row, 4 rows per block; four passes over the row (the re-reads hit L1).
extern "C" __global__ void __launch_bounds__(32 * LN_ROWS_PER_BLOCK)
    layer_norm_modulate_backward_bf16(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ scale,
                                      const __nv_bfloat16 *__restrict__ gy, __nv_bfloat16 *__restrict__ gx, int rows, int tokens, int dim,
                                      float eps) {
    const int row = blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;  // uniform over the warp
    const __nv_bfloat16 *xr = x + (size_t)row * dim, *gr = gy + (size_t)row * dim;
    const __nv_bfloat16 *sc = scale + (size_t)(row / tokens) * dim;
    const float2 st = layer_norm_row_stats(xr, dim, eps);
    float sg = 0.0f, sgx = 0.0f;
    for (int i = lane; i < dim; i += 32) {
        const float g = (1.0f + __bfloat162float(sc[i])) * __bfloat162float(gr[i]);
        sg += g;
        sgx += g * (__bfloat162float(xr[i]) - st.x) * st.y;
    }
    const float mean_g = warp_sum(sg) / (float)dim, mean_gx = warp_sum(sgx) / (float)dim;
    __nv_bfloat16 *o = gx + (size_t)row * dim;
    for (int i = lane; i < dim; i += 32) {
        const float g = (1.0f + __bfloat162float(sc[i])) * __bfloat162float(gr[i]);
        const float xh = (__bfloat162float(xr[i]) - st.x) * st.y;
        o[i] = __float2bfloat16(st.y * (g - mean_g - xh * mean_gx));
    }
}

// (mean, rstd) of every row into stats [rows, 2] (f32), for the shift/scale gradients below.
extern "C" __global__ void __launch_bounds__(32 * LN_ROWS_PER_BLOCK)
    layer_norm_row_stats_bf16(const __nv_bfloat16 *__restrict__ x, float2 *__restrict__ stats, int rows, int dim, float eps) {
    const int row = blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32;
    if (row >= rows) return;
    const float2 st = layer_norm_row_stats(x + (size_t)row * dim, dim, eps);
    if (threadIdx.x % 32 == 0) stats[row] = st;
}

// g_shift[b, c] = sum_l gy[b, l, c], g_scale[b, c] = sum_l gy[b, l, c] x_hat[b, l, c], both [B, D]
// bf16, x_hat from the row statistics of layer_norm_row_stats_bf16. Grid (ceil(D / 32), B), 256
// threads (reduce.cuh).
extern "C" __global__ void __launch_bounds__(256)
    layer_norm_modulate_backward_shift_scale_bf16(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ gy,
                                                  const float2 *__restrict__ stats, __nv_bfloat16 *__restrict__ g_shift,
                                                  __nv_bfloat16 *__restrict__ g_scale, int tokens, int dim) {
    const int c = blockIdx.x * TOKEN_SUM_COLS + (int)threadIdx.x % TOKEN_SUM_COLS;
    const int s = blockIdx.y;
    float acc[2] = {0.0f, 0.0f};
    if (c < dim) {
        for (int l = (int)threadIdx.x / TOKEN_SUM_COLS; l < tokens; l += TOKEN_SUM_ROWS) {
            const int row = s * tokens + l;
            const size_t e = (size_t)row * dim + c;
            const float g = __bfloat162float(gy[e]);
            const float2 st = stats[row];
            acc[0] += g;
            acc[1] += g * (__bfloat162float(x[e]) - st.x) * st.y;
        }
    }
    if (token_sums_finish(acc) && c < dim) {
        g_shift[(size_t)s * dim + c] = __float2bfloat16(acc[0]);
        g_scale[(size_t)s * dim + c] = __float2bfloat16(acc[1]);
    }
}
