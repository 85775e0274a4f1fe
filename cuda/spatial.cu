// Spatial kernels for channels-first (NCHW) images: the im2col half of conv2d, the bias fill that
// seeds its GEMM, nearest 2x upsampling, and pixel (un)shuffle. All of them only move bf16 values,
// so they work on the raw 16-bit patterns (uint16_t) and never round anything.
//
// conv2d = im2col + cuBLASLt GEMM (engine/src/backend/cuda/spatial.rs drives it):
// - Columns for one image are the matrix cols[K, P] with K = C kh kw rows, ordered (c, ky, kx)
//   exactly like a row of the weight [O, C, kh, kw], and one column per output pixel
//   p = oy Wo + ox. Then out[b] = W[O, K] @ cols[b] is [O, Ho Wo] row-major, which is NCHW, so the
//   GEMM writes the output in place with no transpose.
// - Zero padding is implicit: the source pixel is (oy s + ky - top, ox s + kx - left), and a tap
//   outside [0, H) x [0, W) reads as 0. Bottom and right padding only show up through Ho and Wo,
//   which is how BFL's asymmetric (0, 1, 0, 1) padding before a stride-2 conv comes out right.
// - Bounded workspace: the columns are built for a chunk of n output pixels (p0 .. p0 + n) of all
//   B images at once, laid out [B, K, n], so that one strided-batched GEMM covers the chunk. The
//   wrapper picks n so that B K n bf16 stay within 256 MiB (n a multiple of 128 when the image needs
//   several chunks, which keeps the GEMM's output pointer out + p0 256-byte aligned); the only
//   excess is the floor of 128 pixels per chunk, reached beyond B K > 1M. A 128-channel 3x3 conv
//   on a 1024x1024 map (2.4 GB of columns in one piece) runs as 10 chunks of 104960 pixels.
// - 1x1, stride 1, unpadded convolutions skip im2col: x[b] = [C, H W] is already the column matrix.
// - Bias: cuBLASLt's bias epilogue broadcasts along the wrong dimension for this layout (one value
//   per output pixel), so fill_planes seeds out[b, o, :] = bias[o] and the GEMM accumulates into it
//   (beta = 1): still a single rounding of the f32 sum to bf16.
//
// Thread mappings (256 threads per block everywhere):
// - im2col_b16: x covers the chunk's pixels (one column j per thread, so stores are coalesced
//   along cols' rows), y the input channels, z the images (both grid-strided past 65535). A thread
//   divides p by Wo once, then writes its kh kw taps of channel c.
// - fill_planes_b16: x covers a plane's elements, y the B O planes (grid-strided).
// - upsample_nearest2x_b16: one thread per input element, writing its 2x2 block as two 32-bit
//   stores (2 ox is even and output rows are 2 W long, so both are 4-byte aligned).
// - pixel_unshuffle_b16 / pixel_shuffle_b16: one thread per output element, a gather with the CPU
//   reference's index formulas.
//
// Indexing: sizes that fit in int are int (the Rust side refuses larger ones with i32_arg); every
// offset into a whole tensor is size_t.
#include "common.cuh"

// cols[b, (c kh + ky) kw + kx, j] = x[b, c, oy s + ky - top, ox s + kx - left] (0 outside the
// image), for j < n with oy Wo + ox = p0 + j. x is [B, C, H, W]; cols is [B, C kh kw, n].
extern "C" __global__ void im2col_b16(const uint16_t *__restrict__ x, uint16_t *__restrict__ cols, int batch, int channels,
                                      int h, int w, int kh, int kw, int stride, int top, int left, int wo, int p0, int n) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const int p = p0 + j;
    const int oy = p / wo, ox = p - oy * wo;
    const int iy0 = oy * stride - top, ix0 = ox * stride - left;
    const int taps = kh * kw;
    const size_t plane = (size_t)h * w;
    const size_t rows = (size_t)channels * taps;
    for (int b = blockIdx.z; b < batch; b += gridDim.z) {
        for (int c = blockIdx.y; c < channels; c += gridDim.y) {
            const uint16_t *src = x + ((size_t)b * channels + c) * plane;
            uint16_t *dst = cols + ((size_t)b * rows + (size_t)c * taps) * n + j;
            for (int ky = 0; ky < kh; ++ky) {
                const int iy = iy0 + ky;
                const bool row_inside = (unsigned)iy < (unsigned)h;
                for (int kx = 0; kx < kw; ++kx) {
                    const int ix = ix0 + kx;
                    uint16_t v = 0;  // bf16 +0.0
                    if (row_inside && (unsigned)ix < (unsigned)w) v = src[iy * w + ix];
                    dst[(size_t)(ky * kw + kx) * n] = v;
                }
            }
        }
    }
}

// out[q, i] = bias[q % channels] for q < planes (= B O), i < plane_len: the conv's bias, written
// before the GEMM accumulates into it.
extern "C" __global__ void fill_planes_b16(const uint16_t *__restrict__ bias, uint16_t *__restrict__ out, int planes,
                                           int channels, int plane_len) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= plane_len) return;
    for (int q = blockIdx.y; q < planes; q += gridDim.y) out[(size_t)q * plane_len + i] = bias[q % channels];
}

// out[r', x'] = in[r' / 2, x' / 2] over [rows, w] -> [2 rows, 2 w], where a row is one image row of
// one (b, c) plane: row r = plane H + y maps to output rows 2r and 2r + 1 = plane 2H + 2y (+ 1).
// n = rows w input elements, one per thread.
extern "C" __global__ void upsample_nearest2x_b16(const uint16_t *__restrict__ x, uint16_t *__restrict__ out, int w, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int r = i / w, col = i - r * w;
    const uint32_t v = x[i];
    const uint32_t pair = v | (v << 16);
    // Output row 2r starts at element 2r * 2w; the next output row is 2w elements = w words on.
    uint32_t *dst = reinterpret_cast<uint32_t *>(out + (size_t)r * 4 * w + 2 * col);
    dst[0] = pair;
    dst[w] = pair;
}

// Space-to-depth: out[b, (c f + i) f + j, y, x] = in[b, c, y f + i, x f + j]; in [B, C, H, W],
// out [B, C f f, H / f, W / f], n = B C H W.
extern "C" __global__ void pixel_unshuffle_b16(const uint16_t *__restrict__ x, uint16_t *__restrict__ out, int channels, int h,
                                               int w, int f, int n) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= n) return;
    const int oh = h / f, ow = w / f, oc_count = channels * f * f;
    const int ox = o % ow;
    int t = o / ow;
    const int oy = t % oh;
    t /= oh;
    const int oc = t % oc_count, b = t / oc_count;
    const int c = oc / (f * f), fi = oc / f % f, fj = oc % f;
    out[o] = x[(((size_t)b * channels + c) * h + oy * f + fi) * w + ox * f + fj];
}

// Depth-to-space, the inverse: out[b, c, y, x] = in[b, (c f + y % f) f + x % f, y / f, x / f];
// in [B, C_in, H, W] with C_in = C f f, out [B, C, H f, W f], n = B C_in H W.
extern "C" __global__ void pixel_shuffle_b16(const uint16_t *__restrict__ x, uint16_t *__restrict__ out, int channels_in, int h,
                                             int w, int f, int n) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= n) return;
    const int channels = channels_in / (f * f), oh = h * f, ow = w * f;
    const int ox = o % ow;
    int t = o / ow;
    const int oy = t % oh;
    t /= oh;
    const int c = t % channels, b = t / channels;
    const int ic = (c * f + oy % f) * f + ox % f;
    out[o] = x[(((size_t)b * channels_in + ic) * h + oy / f) * w + ox / f];
}
