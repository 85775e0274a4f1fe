// Query/key preparation, fused: head split, per-head RMSNorm and rotary embedding. The CPU twin
// is engine/src/backend/cpu/rope.rs.
//
// x [B, L, W] holds q | k | v as its first 3 H D columns (BFL's `B L (K H D)`); the outputs are
// q, k, v [B, H, L, D]. For q and k: y = x * rsqrt(mean(x^2) + eps) * scale (scale [D], f32
// mean of squares), then each interleaved pair (y0, y1) becomes (cos y0 - sin y1,
// sin y0 + cos y1) with (cos, sin) from pe [B, L, D / 2, 2] (f32, one table per sample). v is
// copied. Every element of x is read once and every output element written once; pe is read by
// the 2 H q/k heads of a token and stays in L1/L2.
//
// Fast path (D a power of two from 8 to 256, W % 8 == 0), a template on D: one thread per
// 16-byte vector (8 elements, 4 pairs), D / 8 consecutive threads per head vector. Threads are
// numbered in x's order, ((b L + l) 3 H + slot) (D / 8) + c, so a warp reads whole token rows
// contiguously; it writes D * 2 contiguous bytes per head (256 B for D = 128). The sum of
// squares is reduced over the D / 8 lanes of a head with xor shuffles (offsets < D / 8 stay in
// the aligned lane group). All lanes run the shuffles (v heads and the tail past the last item
// included, with zeros) so the full-mask shuffles are legal; they leave afterwards. pe comes as
// two float4 per thread (its 4 pairs).
//
// Any other even D, or W % 8 != 0: one warp per head vector, lane `lane` taking pairs lane,
// lane + 32, ..., scalar accesses, two passes (sum of squares, then output; the re-read hits L1).
#include "common.cuh"

template <int D>
__device__ __forceinline__ void qk_norm_rope_vec(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ q_scale,
                                                 const __nv_bfloat16 *__restrict__ k_scale, const float *__restrict__ pe,
                                                 __nv_bfloat16 *__restrict__ q, __nv_bfloat16 *__restrict__ k, __nv_bfloat16 *__restrict__ v,
                                                 int tokens, int width, int heads, int items, float eps) {
    constexpr int TPH = D / 8;  // threads per head vector
    static_assert(TPH >= 1 && TPH <= 32 && (TPH & (TPH - 1)) == 0, "D must be a power of two in [8, 256]");
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = i < items;
    const int c = i % TPH;        // vector within the head
    const int hv = i / TPH;       // head vector: token * 3H + slot
    const int slots = 3 * heads;
    const int t = hv / slots;     // token, b * L + l
    const int slot = hv - t * slots;
    const int which = slot / heads;  // 0 q, 1 k, 2 v
    const int h = slot - which * heads;

    float y[8];
    if (active) {
        unpack8_bits(load16(x + (size_t)t * width + (size_t)slot * D + 8 * c), y);
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) y[e] = 0.0f;
    }
    float ss = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) ss += y[e] * y[e];
#pragma unroll
    for (int o = TPH / 2; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (!active) return;

    if (which < 2) {
        const float r = rsqrtf(ss / (float)D + eps);
        float w[8];
        unpack8_bits(load16((which == 0 ? q_scale : k_scale) + 8 * c), w);
        const float4 *p = reinterpret_cast<const float4 *>(pe + (size_t)t * D) + 2 * c;
        const float4 p0 = p[0], p1 = p[1];
        const float cs[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) y[e] = y[e] * r * w[e];
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
            const float x0 = y[e], x1 = y[e + 1], co = cs[e], si = cs[e + 1];
            y[e] = co * x0 - si * x1;
            y[e + 1] = si * x0 + co * x1;
        }
    }
    const int b = t / tokens, l = t - b * tokens;
    __nv_bfloat16 *dst = which == 0 ? q : (which == 1 ? k : v);
    // __stwb: a plain uint4 store through the selected pointer comes out as four 4-byte stores.
    __stwb(reinterpret_cast<uint4 *>(dst + (((size_t)b * heads + h) * tokens + l) * D + 8 * c), pack8_bits(y));
}

#define QK_VEC_KERNEL(D)                                                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                                                                 \
        qk_norm_rope_d##D##_bf16(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ q_scale,                    \
                                 const __nv_bfloat16 *__restrict__ k_scale, const float *__restrict__ pe, __nv_bfloat16 *__restrict__ q, \
                                 __nv_bfloat16 *__restrict__ k, __nv_bfloat16 *__restrict__ v, int tokens, int width, int heads,       \
                                 int items, float eps) {                                                                              \
        qk_norm_rope_vec<D>(x, q_scale, k_scale, pe, q, k, v, tokens, width, heads, items, eps);                                     \
    }

QK_VEC_KERNEL(8)
QK_VEC_KERNEL(16)
QK_VEC_KERNEL(32)
QK_VEC_KERNEL(64)
QK_VEC_KERNEL(128)
QK_VEC_KERNEL(256)

// Any even D: one warp per head vector (items = B L 3H of them), 8 warps per block.
extern "C" __global__ void __launch_bounds__(256)
    qk_norm_rope_bf16(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ q_scale,
                      const __nv_bfloat16 *__restrict__ k_scale, const float *__restrict__ pe, __nv_bfloat16 *__restrict__ q,
                      __nv_bfloat16 *__restrict__ k, __nv_bfloat16 *__restrict__ v, int tokens, int width, int heads, int head_dim,
                      int items, float eps) {
    const int hv = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (hv >= items) return;  // uniform over the warp
    const int slots = 3 * heads;
    const int t = hv / slots, slot = hv - t * slots;
    const int which = slot / heads, h = slot - which * heads;
    const int b = t / tokens, l = t - b * tokens;
    const int pairs = head_dim / 2;
    const __nv_bfloat16 *src = x + (size_t)t * width + (size_t)slot * head_dim;
    __nv_bfloat16 *dst = (which == 0 ? q : (which == 1 ? k : v)) + (((size_t)b * heads + h) * tokens + l) * head_dim;
    if (which == 2) {
        for (int d = lane; d < head_dim; d += 32) dst[d] = src[d];
        return;
    }
    float ss = 0.0f;
    for (int d = lane; d < head_dim; d += 32) {
        const float f = __bfloat162float(src[d]);
        ss += f * f;
    }
    const float r = rsqrtf(warp_sum(ss) / (float)head_dim + eps);
    const __nv_bfloat16 *scale = which == 0 ? q_scale : k_scale;
    const float *cs = pe + (size_t)t * head_dim;
    for (int p = lane; p < pairs; p += 32) {
        const float x0 = __bfloat162float(src[2 * p]) * r * __bfloat162float(scale[2 * p]);
        const float x1 = __bfloat162float(src[2 * p + 1]) * r * __bfloat162float(scale[2 * p + 1]);
        const float co = cs[2 * p], si = cs[2 * p + 1];
        dst[2 * p] = __float2bfloat16(co * x0 - si * x1);
        dst[2 * p + 1] = __float2bfloat16(si * x0 + co * x1);
    }
}

// ---------------------------------------------------------------------------------------------
// Training backward (the CPU twin is engine/src/backend/cpu/backward.rs): gx [B, L, W] from the
// gradients gq, gk, gv [B, H, L, D] of the three outputs. For q and k, each pair of g is rotated
// back (u0 = cos g0 + sin g1, u1 = cos g1 - sin g0, the transpose of the forward's rotation), then
// through the RMSNorm: gx = r s u - x r^3 mean(x s u), r = rsqrt(mean(x^2) + eps); v's gradient
// is copied. Each token row also gets its `tail` columns [3 H D, W) copied from tail [B, L, W - 3 H D]
// (the part of x this op does not read, whose gradient another branch computed), so that every
// element of gx is written exactly once. One warp per item: items = B L (3 H + 1), the last slot of
// a token being the tail; two passes over the pairs (sums, then output; the re-read hits L1).
extern "C" __global__ void __launch_bounds__(256)
    qk_norm_rope_backward_bf16(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ q_scale,
                               const __nv_bfloat16 *__restrict__ k_scale, const float *__restrict__ pe, const __nv_bfloat16 *__restrict__ gq,
                               const __nv_bfloat16 *__restrict__ gk, const __nv_bfloat16 *__restrict__ gv,
                               const __nv_bfloat16 *__restrict__ tail, __nv_bfloat16 *__restrict__ gx, int tokens, int width, int heads,
                               int head_dim, int items, float eps) {
    const int item = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (item >= items) return;  // uniform over the warp
    const int slots = 3 * heads + 1;
    const int t = item / slots, slot = item - t * slots;
    const int qkv_width = 3 * heads * head_dim;
    __nv_bfloat16 *dst = gx + (size_t)t * width + (size_t)slot * head_dim;
    if (slot == 3 * heads) {
        const int tail_width = width - qkv_width;
        const __nv_bfloat16 *src = tail + (size_t)t * tail_width;
        for (int c = lane; c < tail_width; c += 32) dst[c] = src[c];
        return;
    }
    const int which = slot / heads, h = slot - which * heads;
    const int b = t / tokens, l = t - b * tokens;
    const __nv_bfloat16 *g = (which == 0 ? gq : (which == 1 ? gk : gv)) + (((size_t)b * heads + h) * tokens + l) * head_dim;
    if (which == 2) {
        for (int d = lane; d < head_dim; d += 32) dst[d] = g[d];
        return;
    }
    const __nv_bfloat16 *xr = x + (size_t)t * width + (size_t)slot * head_dim;
    const __nv_bfloat16 *scale = which == 0 ? q_scale : k_scale;
    const float *cs = pe + (size_t)t * head_dim;
    const int pairs = head_dim / 2;
    float ss = 0.0f, xsu = 0.0f;
    for (int p = lane; p < pairs; p += 32) {
        const float x0 = __bfloat162float(xr[2 * p]), x1 = __bfloat162float(xr[2 * p + 1]);
        const float g0 = __bfloat162float(g[2 * p]), g1 = __bfloat162float(g[2 * p + 1]);
        const float co = cs[2 * p], si = cs[2 * p + 1];
        ss += x0 * x0 + x1 * x1;
        xsu += x0 * __bfloat162float(scale[2 * p]) * (co * g0 + si * g1) + x1 * __bfloat162float(scale[2 * p + 1]) * (co * g1 - si * g0);
    }
    const float r = rsqrtf(warp_sum(ss) / (float)head_dim + eps);
    const float corr = r * r * r * warp_sum(xsu) / (float)head_dim;
    for (int p = lane; p < pairs; p += 32) {
        const float x0 = __bfloat162float(xr[2 * p]), x1 = __bfloat162float(xr[2 * p + 1]);
        const float g0 = __bfloat162float(g[2 * p]), g1 = __bfloat162float(g[2 * p + 1]);
        const float co = cs[2 * p], si = cs[2 * p + 1];
        dst[2 * p] = __float2bfloat16(r * __bfloat162float(scale[2 * p]) * (co * g0 + si * g1) - x0 * corr);
        dst[2 * p + 1] = __float2bfloat16(r * __bfloat162float(scale[2 * p + 1]) * (co * g1 - si * g0) - x1 * corr);
    }
}
