// Elementwise kernels: activations (GELU-tanh, SiLU), sums, gated residuals, affine maps.
//
// Memory-bound by nature, so each thread moves 8 bf16 (16 bytes) per access when the tensor's
// length allows (the Rust side checks n % 8 == 0; device allocations are 256-byte aligned), and
// falls back to one element per thread otherwise. One thread per 8 (or 1) elements, 256 per block.
#include "common.cuh"

__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// y = f(x) for a unary f, over n elements; `vec8` selects the 16-byte path (n % 8 == 0).
#define UNARY_KERNEL(name, f)                                                                    \
    extern "C" __global__ void name(const __nv_bfloat16 *__restrict__ x, __nv_bfloat16 *__restrict__ y, \
                                    int n, int vec8) {                                           \
        int i = blockIdx.x * blockDim.x + threadIdx.x;                                           \
        if (vec8) {                                                                              \
            if (i >= n / 8) return;                                                              \
            float v[8];                                                                          \
            unpack8_bits(load16(x + 8 * (size_t)i), v);                                  \
            _Pragma("unroll") for (int j = 0; j < 8; ++j) v[j] = f(v[j]);                        \
            store16(y + 8 * (size_t)i, pack8_bits(v));                                         \
        } else if (i < n) {                                                                      \
            y[i] = __float2bfloat16(f(__bfloat162float(x[i])));                                  \
        }                                                                                        \
    }

UNARY_KERNEL(gelu_tanh_bf16, gelu_tanh)
UNARY_KERNEL(silu_bf16, silu)

// out = a + b.
extern "C" __global__ void add_bf16(const __nv_bfloat16 *__restrict__ a, const __nv_bfloat16 *__restrict__ b,
                                    __nv_bfloat16 *__restrict__ out, int n, int vec8) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (vec8) {
        if (i >= n / 8) return;
        float va[8], vb[8];
        unpack8_bits(load16(a + 8 * (size_t)i), va);
        unpack8_bits(load16(b + 8 * (size_t)i), vb);
#pragma unroll
        for (int j = 0; j < 8; ++j) va[j] += vb[j];
        store16(out + 8 * (size_t)i, pack8_bits(va));
    } else if (i < n) {
        out[i] = __float2bfloat16(__bfloat162float(a[i]) + __bfloat162float(b[i]));
    }
}

// out = x * scale + offset.
extern "C" __global__ void affine_bf16(const __nv_bfloat16 *__restrict__ x, __nv_bfloat16 *__restrict__ out,
                                       float scale, float offset, int n, int vec8) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (vec8) {
        if (i >= n / 8) return;
        float v[8];
        unpack8_bits(load16(x + 8 * (size_t)i), v);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = v[j] * scale + offset;
        store16(out + 8 * (size_t)i, pack8_bits(v));
    } else if (i < n) {
        out[i] = __float2bfloat16(__bfloat162float(x[i]) * scale + offset);
    }
}

// out = x + gate * y; x, y [B, L, D], gate [B, D] broadcast over the L tokens. With `vec8`
// (D % 8 == 0) a group of 8 never straddles two rows, so one gate load serves all 8.
extern "C" __global__ void gated_residual_bf16(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ gate,
                                               const __nv_bfloat16 *__restrict__ y, __nv_bfloat16 *__restrict__ out,
                                               int tokens, int dim, int n, int vec8) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (vec8) {
        if (i >= n / 8) return;
        int e = i * 8;
        int sample = e / (tokens * dim), col = e % dim;
        float vx[8], vy[8], vg[8];
        unpack8_bits(load16(x + 8 * (size_t)i), vx);
        unpack8_bits(load16(y + 8 * (size_t)i), vy);
        unpack8_bits(load16(gate + (size_t)sample * dim + col), vg);
#pragma unroll
        for (int j = 0; j < 8; ++j) vx[j] += vg[j] * vy[j];
        store16(out + 8 * (size_t)i, pack8_bits(vx));
    } else if (i < n) {
        int sample = i / (tokens * dim), col = i % dim;
        float g = __bfloat162float(gate[(size_t)sample * dim + col]);
        out[i] = __float2bfloat16(__bfloat162float(x[i]) + g * __bfloat162float(y[i]));
    }
}

// y[r, offset + j] += scale * v[j] for every row r < rows and j < len (y has `width` columns):
// an unmerged LoRA's up-projection bias.
extern "C" __global__ void add_scaled_row_bf16(__nv_bfloat16 *__restrict__ y, const __nv_bfloat16 *__restrict__ v, float scale,
                                               int rows, int width, int offset, int len) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * len) return;
    int r = i / len, j = i % len;
    __nv_bfloat16 *p = y + (size_t)r * width + offset + j;
    *p = __float2bfloat16(__bfloat162float(*p) + scale * __bfloat162float(v[j]));
}

// x[i] = uniform in [-bound, bound] from a counter-based hash of (seed, i): benchmark weights
// made on the device (a FLUX.1-dev-size model never passes through host memory), non-zero so the
// GPU draws the power real weights make it draw.
extern "C" __global__ void fill_uniform_bf16(__nv_bfloat16 *__restrict__ x, unsigned long long seed, float bound, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned long long z = seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(i + 1);  // splitmix64
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);  // [0, 1) from the top 24 bits
        x[i] = __float2bfloat16((2.0f * u - 1.0f) * bound);
    }
}
