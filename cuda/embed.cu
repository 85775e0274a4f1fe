// The sinusoidal timestep embedding, f32 throughout (t arrives in f32: in bf16, t * 1000 would be
// off by whole radians), written as bf16 activations.
#include "common.cuh"

// out[b, i] = cos(t_b * factor * f_i), out[b, half + i] = sin(...), f_i = exp(-ln(max_period) * i
// / half); an odd dim leaves the last column 0. One thread per output element.
extern "C" __global__ void timestep_embedding_bf16(const float *__restrict__ t, __nv_bfloat16 *__restrict__ out, int batch, int dim,
                                                   float neg_log_period, float time_factor) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= batch * dim) return;
    int b = idx / dim, col = idx % dim, half = dim / 2;
    float value = 0.0f;
    if (col < 2 * half) {
        int i = col < half ? col : col - half;
        // Rounded step by step as the CPU reference (and PyTorch) do.
        float freq = expf(neg_log_period * (float)i / (float)half);
        float arg = (t[b] * time_factor) * freq;
        value = col < half ? cosf(arg) : sinf(arg);
    }
    out[idx] = __float2bfloat16(value);
}
