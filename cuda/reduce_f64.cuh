// f64 block reductions for the training kernels (optim.cu, sobolev.cu), whose sums the CPU
// reference keeps in f64 (gradient norms, Sobolev energies).
#pragma once

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The sum of v over the block, returned to every thread. `red` holds one double per warp and is
// not guarded against reuse: call it once per kernel. blockDim.x must be a multiple of 32. The
// reduction tree is fixed, so the result is the same bits on every run.
__device__ __forceinline__ double block_sum_f64(double v, double *red) {
    v = warp_sum_f64(v);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / 32) ? red[lane] : 0.0;
    return warp_sum_f64(v);
}
