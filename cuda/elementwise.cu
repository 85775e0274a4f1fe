// Elementwise kernels: activations (GELU-tanh, SiLU, ReLU), sums, products, gated residuals, affine maps.
//
// Memory-bound by nature, so each thread moves 8 bf16 (16 bytes) per access when the tensor's
// length allows (the Rust side checks n % 8 == 0; device allocations are 256-byte aligned), and
// falls back to one element per thread otherwise. One thread per 8 (or 1) elements, 256 per block.
#include "common.cuh"
#include "reduce.cuh"

__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

__device__ __forceinline__ float relu(float x) { return fmaxf(x, 0.0f); }

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
UNARY_KERNEL(relu_bf16, relu)

// out = a (op) b for a binary op.
#define BINARY_KERNEL(name, op)                                                                                  \
    extern "C" __global__ void name(const __nv_bfloat16 *__restrict__ a, const __nv_bfloat16 *__restrict__ b,     \
                                    __nv_bfloat16 *__restrict__ out, int n, int vec8) {                           \
        int i = blockIdx.x * blockDim.x + threadIdx.x;                                                           \
        if (vec8) {                                                                                              \
            if (i >= n / 8) return;                                                                              \
            float va[8], vb[8];                                                                                  \
            unpack8_bits(load16(a + 8 * (size_t)i), va);                                                         \
            unpack8_bits(load16(b + 8 * (size_t)i), vb);                                                         \
            _Pragma("unroll") for (int j = 0; j < 8; ++j) va[j] = va[j] op vb[j];                                \
            store16(out + 8 * (size_t)i, pack8_bits(va));                                                        \
        } else if (i < n) {                                                                                      \
            out[i] = __float2bfloat16(__bfloat162float(a[i]) op __bfloat162float(b[i]));                         \
        }                                                                                                        \
    }

BINARY_KERNEL(add_bf16, +)
BINARY_KERNEL(mul_bf16, *)

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

// ---------------------------------------------------------------------------------------------
// Training backward (the CPU twin is engine/src/backend/cpu/backward.rs)


// d/dx of gelu_tanh: with t = tanh(k (x + 0.044715 x^3)),
// 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 * 0.044715 x^2).
__device__ __forceinline__ float gelu_tanh_grad(float x) {
    const float k = 0.7978845608028654f;
    const float t = tanhf(k * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * x * x);
}

// d/dx of silu: s (1 + x (1 - s)), s = sigmoid(x).
__device__ __forceinline__ float silu_grad(float x) {
    const float s = 1.0f / (1.0f + expf(-x));
    return s * (1.0f + x * (1.0f - s));
}

// gx = gy * f'(x) over n elements, given the forward's input x; `vec8` as for UNARY_KERNEL.
#define UNARY_BACKWARD_KERNEL(name, df)                                                                          \
    extern "C" __global__ void name(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ gy,   \
                                    __nv_bfloat16 *__restrict__ gx, int n, int vec8) {                           \
        int i = blockIdx.x * blockDim.x + threadIdx.x;                                                           \
        if (vec8) {                                                                                              \
            if (i >= n / 8) return;                                                                              \
            float v[8], g[8];                                                                                    \
            unpack8_bits(load16(x + 8 * (size_t)i), v);                                                          \
            unpack8_bits(load16(gy + 8 * (size_t)i), g);                                                         \
            _Pragma("unroll") for (int j = 0; j < 8; ++j) v[j] = g[j] * df(v[j]);                                \
            store16(gx + 8 * (size_t)i, pack8_bits(v));                                                          \
        } else if (i < n) {                                                                                      \
            gx[i] = __float2bfloat16(__bfloat162float(gy[i]) * df(__bfloat162float(x[i])));                      \
        }                                                                                                        \
    }

UNARY_BACKWARD_KERNEL(gelu_tanh_backward_bf16, gelu_tanh_grad)
UNARY_BACKWARD_KERNEL(silu_backward_bf16, silu_grad)

// The branch gradient of gated_residual: out = gate * gy, gy [B, L, D], gate [B, D]; `vec8` needs
// D % 8 == 0, as for gated_residual_bf16.
extern "C" __global__ void gated_residual_backward_bf16(const __nv_bfloat16 *__restrict__ gy, const __nv_bfloat16 *__restrict__ gate,
                                                        __nv_bfloat16 *__restrict__ out, int tokens, int dim, int n, int vec8) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (vec8) {
        if (i >= n / 8) return;
        int e = i * 8;
        int sample = e / (tokens * dim), col = e % dim;
        float vg[8], vt[8];
        unpack8_bits(load16(gy + 8 * (size_t)i), vg);
        unpack8_bits(load16(gate + (size_t)sample * dim + col), vt);
#pragma unroll
        for (int j = 0; j < 8; ++j) vg[j] *= vt[j];
        store16(out + 8 * (size_t)i, pack8_bits(vg));
    } else if (i < n) {
        int sample = i / (tokens * dim), col = i % dim;
        out[i] = __float2bfloat16(__bfloat162float(gate[(size_t)sample * dim + col]) * __bfloat162float(gy[i]));
    }
}

// out[s, c] = sum_l a[s, l, c] * b[s, l, c] (b == nullptr: a alone) for a, b [S, L, D], out [S, D]:
// the gate gradient of gated_residual (bf16, an activation) and the bias gradient of a linear (f32,
// a parameter: S = 1, L = all rows). Grid (ceil(D / 32), S), 256 threads (reduce.cuh).
template <typename OUT>
__device__ __forceinline__ void token_sum_product(const __nv_bfloat16 *__restrict__ a, const __nv_bfloat16 *__restrict__ b,
                                                  OUT *__restrict__ out, int tokens, int dim) {
    const int c = blockIdx.x * TOKEN_SUM_COLS + (int)threadIdx.x % TOKEN_SUM_COLS;
    const int s = blockIdx.y;
    float acc[1] = {0.0f};
    if (c < dim) {
        const size_t base = (size_t)s * tokens * dim + c;
        for (int l = (int)threadIdx.x / TOKEN_SUM_COLS; l < tokens; l += TOKEN_SUM_ROWS) {
            const size_t e = base + (size_t)l * dim;
            const float v = __bfloat162float(a[e]);
            acc[0] += b != nullptr ? v * __bfloat162float(b[e]) : v;
        }
    }
    if (token_sums_finish(acc) && c < dim) store_out(out + (size_t)s * dim + c, acc[0]);
}

extern "C" __global__ void __launch_bounds__(256)
    token_sum_product_bf16(const __nv_bfloat16 *__restrict__ a, const __nv_bfloat16 *__restrict__ b, __nv_bfloat16 *__restrict__ out,
                           int tokens, int dim) {
    token_sum_product(a, b, out, tokens, dim);
}

extern "C" __global__ void __launch_bounds__(256)
    token_sum_product_f32(const __nv_bfloat16 *__restrict__ a, const __nv_bfloat16 *__restrict__ b, float *__restrict__ out, int tokens,
                          int dim) {
    token_sum_product(a, b, out, tokens, dim);
}
