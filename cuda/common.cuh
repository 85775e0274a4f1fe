// Shared by every kernel file: bf16 helpers and the vectorised element loop.
//
// Conventions (all kernels): activations and weights are bf16 in global memory, arithmetic is
// f32; sizes are int (the Rust wrappers refuse larger tensors); every output element is written
// exactly once (the self-test poisons outputs with NaN to prove it).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Eight bf16 as the raw bits of one uint4, for 16-byte loads and stores that compile to a single
// ld/st.global.v4 (a struct of __nv_bfloat162 would be copied field by field, through its
// user-defined copy constructor, as 4-byte accesses). bf16 -> f32 is exact: the bits shifted into
// the high half.
__device__ __forceinline__ uint4 load16(const void *p) { return *reinterpret_cast<const uint4 *>(p); }

__device__ __forceinline__ void store16(void *p, uint4 v) { *reinterpret_cast<uint4 *>(p) = v; }

__device__ __forceinline__ void unpack8_bits(uint4 u, float out[8]) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ uint4 pack8_bits(const float in[8]) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
        w[i] = (unsigned)__bfloat16_as_ushort(h.x) | ((unsigned)__bfloat16_as_ushort(h.y) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}
