// Pooling for the perceptual metrics' feature networks (engine/src/metrics/perceptual.rs):
// max pooling (AlexNet, VGG16), blur pooling (ST-LPIPS' anti-aliased downsampling: a depthwise
// filter on the input extended by reflection) and L2 pooling (DISTS: the square root of a
// depthwise filter of x^2, zero padding). The CPU twin is engine/src/backend/cpu/pool.rs.
//
// One thread per output element of [B, C, OH, OW] (256 per block); each gathers its k x k window
// straight from the unpadded input, so padding is never materialised. The windows of neighbouring
// threads overlap and are served by the L1 cache; these layers are a small share of the
// networks' work next to their convolutions (im2col + cuBLASLt), so nothing more is done.
// Arithmetic in f32, one rounding to bf16 per output.
#include "common.cuh"

// out[p, oy, ox] = max over the kernel x kernel window at (oy s, ox s) of plane p; x is
// [planes, h, w], out [planes, oh, ow], n = planes oh ow.
extern "C" __global__ void max_pool2d_bf16(const __nv_bfloat16 *__restrict__ x, __nv_bfloat16 *__restrict__ out, int h, int w,
                                           int kernel, int stride, int oh, int ow, int n) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= n) return;
    const int ox = o % ow, t = o / ow;
    const int oy = t % oh, p = t / oh;
    const __nv_bfloat16 *src = x + (size_t)p * h * w + (size_t)(oy * stride) * w + ox * stride;
    float m = -INFINITY;
    for (int ky = 0; ky < kernel; ++ky)
        for (int kx = 0; kx < kernel; ++kx) m = fmaxf(m, __bfloat162float(src[ky * w + kx]));
    out[o] = __float2bfloat16(m);
}

// ReflectionPad2d's index: -1 -> 1, n -> n - 2 (the padding is smaller than n).
__device__ __forceinline__ int reflect(int i, int n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); }

// Depthwise k x k filter with stride s, channel c = p % channels using filter[c] ([C, 1, k, k]):
// l2 == 0: blur pooling, sum filter * x over the reflected window;
// l2 != 0: L2 pooling, sqrt(sum filter * x^2 + 1e-12) over the zero-padded window.
// x is [planes, h, w] with planes = B C; top and left are the padding before row and column 0.
extern "C" __global__ void depthwise_pool2d_bf16(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ filter,
                                                 __nv_bfloat16 *__restrict__ out, int channels, int h, int w, int kernel,
                                                 int stride, int top, int left, int oh, int ow, int n, int l2) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= n) return;
    const int ox = o % ow, t = o / ow;
    const int oy = t % oh, p = t / oh;
    const __nv_bfloat16 *plane = x + (size_t)p * h * w;
    const __nv_bfloat16 *f = filter + (size_t)(p % channels) * kernel * kernel;
    const int y0 = oy * stride - top, x0 = ox * stride - left;
    float acc = 0.0f;
    for (int ky = 0; ky < kernel; ++ky) {
        const int y = y0 + ky;
        for (int kx = 0; kx < kernel; ++kx) {
            const int xx = x0 + kx;
            float v;
            if (l2) {
                v = ((unsigned)y < (unsigned)h && (unsigned)xx < (unsigned)w) ? __bfloat162float(plane[y * w + xx]) : 0.0f;
                v *= v;
            } else {
                v = __bfloat162float(plane[reflect(y, h) * w + reflect(xx, w)]);
            }
            acc = fmaf(__bfloat162float(f[ky * kernel + kx]), v, acc);
        }
    }
    out[o] = __float2bfloat16(l2 ? sqrtf(acc + 1e-12f) : acc);
}
