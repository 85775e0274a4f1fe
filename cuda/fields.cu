// The training fields' arithmetic (engine/src/backend/training.rs): casts between the model's bf16
// activations and the f32 fields the losses run on, the per-item linear combination that every
// flow-matching formula is made of (x_t = (1 - t) x0 + t eps, u = eps - x0, x0 = x_t - t v, a
// gradient's per-item scale), and per-item dot products. The CPU twins are the host functions
// behind engine/src/backend/cpu/training.rs; the self-test compares the two.
//
// A field batch is [items, per_item] f32, contiguous. Coefficients hold one value per item, or
// one for all (length 1). Dot products reduce each item in one block with a fixed tree (f64), so
// the result is the same bits on every run.
#include "common.cuh"
#include "reduce_f64.cuh"

constexpr int DOT_THREADS = 1024;

extern "C" __global__ void cast_bf16_to_f32(const __nv_bfloat16 *__restrict__ x, float *__restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        y[i] = __bfloat162float(x[i]);
    }
}

extern "C" __global__ void cast_f32_to_bf16(const float *__restrict__ x, __nv_bfloat16 *__restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        y[i] = __float2bfloat16(x[i]);
    }
}

// out[i, j] = a[i] x[i, j] + b[i] y[i, j]. Products rounded separately and then added, as the CPU
// does: __fmul_rn keeps nvcc from contracting them into a fused multiply-add.
extern "C" __global__ void axpby_items(const float *__restrict__ x, const float *__restrict__ y, float *__restrict__ out,
                                       const float *__restrict__ a, int a_len, const float *__restrict__ b, int b_len,
                                       long long per_item, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long item = i / per_item;
        const float ai = a[a_len == 1 ? 0 : item], bi = b[b_len == 1 ? 0 : item];
        out[i] = __fadd_rn(__fmul_rn(ai, x[i]), __fmul_rn(bi, y[i]));
    }
}

// out[item] = sum_j x[item, j] y[item, j], one block per item.
extern "C" __global__ void __launch_bounds__(DOT_THREADS)
    dot_items(const float *__restrict__ x, const float *__restrict__ y, double *__restrict__ out, long long per_item) {
    __shared__ double red[DOT_THREADS / 32];
    const float *xi = x + blockIdx.x * per_item, *yi = y + blockIdx.x * per_item;
    double sum = 0.0;
    for (long long j = threadIdx.x; j < per_item; j += blockDim.x) sum += (double)xi[j] * (double)yi[j];
    sum = block_sum_f64(sum, red);
    if (threadIdx.x == 0) out[blockIdx.x] = sum;
}
