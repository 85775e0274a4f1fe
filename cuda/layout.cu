// Layout kernels: strided block copies (concat and narrow along any dim) and the transpose of the
// last two dims. Tensors are contiguous row-major; a tensor seen as [outer, dim, inner] is `outer`
// rows of dim * inner elements, so both concat and narrow are 2-D copies of `rows` rows of
// `width` elements between buffers with different row pitches.
#include "common.cuh"

// dst[r * dst_pitch + j] = src[r * src_pitch + j] for r < rows, j < width, for 2- and 4-byte
// elements (bf16 activations, f32 position tables). Launch: x covers width (256 per block), y
// covers rows (grid-strided past 65535).
template <typename E>
__device__ void copy_2d(const E *__restrict__ src, int src_pitch, E *__restrict__ dst, int dst_pitch, int width, int rows) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= width) return;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) dst[(size_t)r * dst_pitch + j] = src[(size_t)r * src_pitch + j];
}

extern "C" __global__ void copy_2d_b16(const uint16_t *src, int src_pitch, uint16_t *dst, int dst_pitch, int width, int rows) {
    copy_2d(src, src_pitch, dst, dst_pitch, width, rows);
}

extern "C" __global__ void copy_2d_b32(const uint32_t *src, int src_pitch, uint32_t *dst, int dst_pitch, int width, int rows) {
    copy_2d(src, src_pitch, dst, dst_pitch, width, rows);
}

// out[b, j, i] = in[b, i, j] for in [batch, m, n]: 32x32 tiles through shared memory so both the
// read and the write are coalesced (the +1 column avoids bank conflicts). Block (32, 8); grid
// (ceil(n/32), ceil(m/32), batch).
extern "C" __global__ void transpose_bf16(const __nv_bfloat16 *__restrict__ in, __nv_bfloat16 *__restrict__ out, int m, int n) {
    __shared__ __nv_bfloat16 tile[32][33];
    const __nv_bfloat16 *src = in + (size_t)blockIdx.z * m * n;
    __nv_bfloat16 *dst = out + (size_t)blockIdx.z * m * n;
    int x = blockIdx.x * 32 + threadIdx.x;
    for (int dy = threadIdx.y; dy < 32; dy += 8) {
        int y = blockIdx.y * 32 + dy;
        if (x < n && y < m) tile[dy][threadIdx.x] = src[(size_t)y * n + x];
    }
    __syncthreads();
    x = blockIdx.y * 32 + threadIdx.x;
    for (int dy = threadIdx.y; dy < 32; dy += 8) {
        int y = blockIdx.x * 32 + dy;
        if (x < m && y < n) dst[(size_t)y * m + x] = tile[threadIdx.x][dy];
    }
}
