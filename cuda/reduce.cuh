// Per-sample sums over tokens, shared by the training backward's reductions: [S, L, D] tensors
// reduced to [S, D] (a bias or modulation-vector gradient). One 256-thread block per (strip of 32
// columns, sample): thread (x = tid % 32, y = tid / 32) sums column strip * 32 + x over tokens
// y, y + 8, ..., so each warp reads 64 contiguous bytes of one token row; the 8 partial sums of a
// column are then added in a fixed order through shared memory, so the result does not depend on
// scheduling (activation checkpointing must reproduce it bit for bit).
#pragma once

constexpr int TOKEN_SUM_COLS = 32, TOKEN_SUM_ROWS = 8;  // the block is 32 x 8; the launchers agree

// Reduces each of the N per-thread partial sums over the 8 thread rows of the block. Returns true
// in the threads of row 0, which then hold the column's totals in acc.
template <int N>
__device__ __forceinline__ bool token_sums_finish(float (&acc)[N]) {
    __shared__ float part[N][TOKEN_SUM_ROWS][TOKEN_SUM_COLS + 1];
    const int x = threadIdx.x % TOKEN_SUM_COLS, y = threadIdx.x / TOKEN_SUM_COLS;
#pragma unroll
    for (int i = 0; i < N; ++i) part[i][y][x] = acc[i];
    __syncthreads();
    if (y != 0) return false;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        float s = 0.0f;
#pragma unroll
        for (int r = 0; r < TOKEN_SUM_ROWS; ++r) s += part[i][r][x];
        acc[i] = s;
    }
    return true;
}

__device__ __forceinline__ void store_out(float *p, float v) { *p = v; }
__device__ __forceinline__ void store_out(__nv_bfloat16 *p, float v) { *p = __float2bfloat16(v); }
