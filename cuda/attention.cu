// Attention forward: softmax(Q K^T / sqrt(D)) V, for q [B, H, Lq, D], k and v [B, H, Lk, D] (bf16),
// written straight into the merged-head layout out [B, Lq, H * D] (bf16), optionally with the
// per-row log-sum-exp lse [B, H, Lq] (f32, natural log, of the scaled scores) for the backward.
// The Lq x Lk score matrix is never materialised: both kernels stream K and V in tiles and keep an
// online softmax (FlashAttention-2, Dao 2023).
//
// ---- 1. Tensor-core kernels (D = 64 and 128): flash_fwd<D, MT, WARPS, BC, Q_REGS> ---------------
//
// One CTA = one (batch, head) and BR = 16 * MT * WARPS query rows; warp w owns rows
// [w * 16 * MT, (w + 1) * 16 * MT) of the tile, as MT m16 tiles. The loop walks K/V in tiles of
// BC keys:
//     S = Q K_j^T                    (mma m16n8k16, f32 accumulate; Q from registers or smem)
//     m' = max(m, rowmax S)          (raw-score units; quad shuffles, see below)
//     P = exp2(S * c - m' * c)       (c = log2(e) / sqrt(D): the scale folded into the exponent)
//     l = l * exp2((m - m') * c) + rowsum P,   O = O * exp2((m - m') * c)
//     O += bf16(P) V_j               (P goes from the S accumulators to A fragments in registers)
// and ends with O / l, staged through shared memory so that the global stores are 16-byte and
// coalesced (one 128- or 256-byte row segment per head), and lse = (m * c + log2 l) * ln 2.
// The O rescale is skipped (warp vote) when no row of the warp raised its max in this tile: the
// factor is then exactly 1, and after the first tiles that is the common case.
//
// Pipeline: K and V tiles are double-buffered in shared memory with cp.async (16 bytes per thread
// per copy, .cg: the tiles are read once per CTA, so they bypass L1). Tile j + 1 is issued right
// after the barrier that opens iteration j, as two commit groups (K, then V), so a whole iteration
// of math covers its latency; QK^T waits only for K_j, PV only for V_j. Two barriers per tile: (A)
// K_j landed and every warp finished tile j - 1 (whose stage the prefetch overwrites); (B) V_j
// landed.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16; g = lane / 4, t = lane % 4; each 32-bit
// register holds two bf16, the lower column / k index in the low half):
//     A (16 x 16, row-major):  a0 = A[g][2t, 2t+1]     a1 = A[g+8][2t, 2t+1]
//                              a2 = A[g][2t+8, 2t+9]   a3 = A[g+8][2t+8, 2t+9]
//     B (16 x 8, k x n):       b0 = B[2t, 2t+1][g]     b1 = B[2t+8, 2t+9][g]
//     C (16 x 8, f32):         c0, c1 = C[g][2t, 2t+1] c2, c3 = C[g+8][2t, 2t+1]
// ldmatrix.x4 loads four 8 x 8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i
// and register i of lane l receives row l / 4, columns 2 (l % 4), +1 of matrix i (with .trans:
// column l / 4, rows 2 (l % 4), +1). Hence:
//     Q (A operand): lane l points at row (l % 16), column block 8 * (l / 16) of the 16 x 16 tile
//                    -> registers a0..a3 in order.
//     K (B operand of S = Q K^T, B[k][n] = K[n][k]; K rows are keys, so no transpose): lane l
//                    points at key (l % 8) + 8 * (l / 16), column block 8 * ((l / 8) % 2) -> b0, b1
//                    of n-tile 2p and b0, b1 of n-tile 2p + 1.
//     V (B operand of O = P V, B[k][n] = V[k][n]; .trans): lane l points at key (l % 16), column
//                    block 8 * (l / 16) -> b0, b1 of d-tile 2p and b0, b1 of d-tile 2p + 1.
//     P (A operand from the S accumulators of n-tiles 2s and 2s + 1): a0 = pack(C_2s c0, c1),
//                    a1 = pack(C_2s c2, c3), a2 = pack(C_2s+1 c0, c1), a3 = pack(C_2s+1 c2, c3).
// Each thread thus owns rows g and g + 8 of every m16 tile; the row's other columns live in the
// 3 other lanes of its quad, so row max needs two xor-shuffles (1, 2) and the row sum is kept
// per thread and reduced once at the end (the rescale factor is uniform over the quad).
//
// Shared memory: tiles are [rows][D] bf16, each row D / 8 16-byte chunks, chunk c of row r stored
// at chunk c ^ (r % 8). Rows are 128 or 256 bytes, so without the swizzle the 8 row addresses of an
// ldmatrix phase would all hit the same 16-byte bank group (8-way conflict); with it, 8
// consecutive rows at one logical chunk occupy 8 distinct bank groups. cp.async writes (8
// consecutive chunks of a row per phase) and the output staging (8 rows x one chunk) are
// conflict-free too.
//
// Masking and guards: K/V rows >= Lk and Q rows >= Lq are zero-filled by cp.async (src-size 0;
// zeros, not garbage, because 0 * NaN in P V would poison the row); in the last K tile scores of
// keys >= Lk are set to -inf before the max, so they get P = 0. Every tile holds at least one
// valid key, so the running max is finite after the first tile and (m - m') never sees
// -inf - -inf. Rows >= Lq are computed (zeros) but never stored. Lk = 0 gives O = 0 (as the CPU
// reference) and lse = -inf.
//
// Numerics: bf16 inputs, f32 scores, f32 softmax state (m, l) and f32 O accumulators; P is
// rounded to bf16 for the PV product (as FlashAttention does), l sums the unrounded f32 P.
// exp2 is ex2.approx.ftz (relative error ~2^-22; exp2(-inf) = 0).
//
// Variants (registers: O = MT * D / 2 floats, S = MT * BC / 2 floats, Q = MT * D / 4 when kept in
// registers; an SM of H100/H200 has 64 K registers and 227 KiB of shared memory, A100 164 KiB):
//   attention_fwd_d128_br128        D 128, MT 2, 4 warps, BC 48, Q in smem (ldmatrix per k-step)
//       The default for D = 128 (FLUX). O 128 + S 48 registers + fragments: ptxas uses ~250 of the
//       255 allowed by __launch_bounds__(128, 2) with no spills (BC = 64 needs > 255 and spills,
//       BC = 32 fits in ~232). Shared memory Q 32 KiB + 2 stages x (K + V) 48 KiB = 80 KiB.
//       -> 2 CTAs = 8 warps per SM on H100/H200 (and A100). Why 32 rows per warp: every K/V
//       fragment then feeds 2 MMAs, and shared-memory traffic comes to ~171 bytes per m16n8k16
//       of ldmatrix (K + V + the Q re-reads) + 32 of cp.async writes, ~1.6 clk at 128 B/clk/SM,
//       against ~1.5 clk per mma.sync on an H100 SM (~660 TFLOP/s mma.sync peak): about
//       balanced, as FlashAttention-2's own 128 x 64, 4-warp tile. 16 rows per warp need 256 B of
//       ldmatrix alone per MMA and are shared-memory-bound well below that. BR = 128 also halves the L2 -> SM K/V traffic of
//       BR = 64 (which at 350 TFLOP/s and L = 4608 would stream ~5.4 TB/s from L2).
//   attention_fwd_d128_br64_qregs   D 128, MT 1, 4 warps, BC 48, Q in registers (32 registers)
//       O 64 + S 24 + Q 32: ~167 registers under __launch_bounds__(128, 3), no spills; shared
//       memory 2 x (K + V) = 48 KiB (Q staged through stage 1) -> 3 CTAs = 12 warps per SM.
//       16 rows per warp: 256 B of ldmatrix per MMA. Not dispatched by default; kept to time
//       against the default on the GPU (issue 6).
//   attention_fwd_d64_br128_qregs   D 64, MT 2, 4 warps, BC 64, Q in registers (32 registers)
//       O 64 + S 64 + Q 32: ~222 registers, shared memory 2 x (K + V) = 32 KiB -> 2 CTAs per SM.
// Grid: x = ceil(Lq / BR) query tiles (fastest, so neighbouring CTAs share one head's K/V in L2),
// y = B * H. Block: 32 * WARPS threads. Dynamic shared memory as above (> 48 KiB: opt-in).
// The launcher (engine/src/backend/cuda/attention.rs) requires 16-byte-aligned q, k, v, out.
//
// ---- 2. SIMT fallback (any D <= 512): attention_fwd_simt_dc{1,2,4,8,16} -------------------------
//
// For the autoencoder's single-head mid-block attention (D = 512 in FLUX's AE, L = H * W up to
// ~16k) and any head dim the tensor-core kernels do not cover. One CTA = 4 warps = BQ = 4 * R query
// rows of one (batch, head); K/V stream through shared memory in chunks of 32 keys. Per chunk:
//   scores: lane j owns key j of the chunk and computes the R dot products over D (Q rows, f32 in
//           smem, read as broadcasts; K rows bf16 with an odd word stride, so the 32 lanes' reads
//           hit 32 banks);
//   softmax: per row a warp max (5 shuffles), p = exp2(s * c - m'), per-lane partial sums;
//           p goes to a per-warp smem row so that every lane can read all 32 (float4 broadcasts);
//   P V:    lane owns output columns lane + 32 i (i < DC), o[r][i] += p[r][j] * V[j][col].
// DC = next power of two of ceil(D / 32) (template), R = 8 rows per warp (4 when DC = 16, to keep
// o[R][DC] at 64 registers). Shared memory (the launcher computes the same): Q BQ x Dq f32
// (Dq = D rounded up to even), P 4 x R x 32 f32, K 32 x Dk bf16 (Dk = Dq, plus 2 when Dq % 4 == 0,
// so the row stride in 32-bit words is odd), V 32 x D bf16: 98 KiB at D = 512 (fits the 99 KiB
// per-block limit of sm_86/89 too). f32 everywhere but the stored K/V.
#include "flash.cuh"

namespace {

// 16 bytes global -> shared.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}

// The same, zero-filled (nothing read) when !valid; src is kept a valid address all the same.
__device__ __forceinline__ void cp_async_16_zfill(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's most recent commit groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a * b for one m16n8k16 tile (bf16 inputs, f32 accumulators).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][D] bf16 tile.
template <int D>
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
    return static_cast<uint32_t>(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
}

// Copies rows [0, ROWS) of a bf16 matrix with D columns and `stride` elements between rows (D for
// q, k, v; H * D for the merged-head g_out) starting at `src` into the swizzled tile at shared
// address `dst`; rows >= `valid` (>= 1) are zero-filled. All NT threads take part (one commit group is
// the caller's business). Thread tid copies chunk tid % CH of rows tid / CH + STEP * i: STEP is a
// multiple of 8, so every row a thread touches has the same swizzle and the addresses are one
// base plus immediates.
template <int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile(uint32_t dst, const __nv_bfloat16 *src, int stride, int valid, unsigned tid) {
    constexpr int CH = D / 8, STEP = NT / CH;
    static_assert(NT % CH == 0 && STEP % 8 == 0 && ROWS % STEP == 0, "tile rows must divide among the threads");
    const int row0 = static_cast<int>(tid / CH), ch = static_cast<int>(tid % CH);
    const uint32_t d0 = dst + swz<D>(row0, ch);
    if (valid >= ROWS) {  // every tile but the last: no guards, one base plus immediates
        const __nv_bfloat16 *s0 = src + row0 * stride + ch * 8;
#pragma unroll
        for (int i = 0; i < ROWS / STEP; ++i) cp_async_16(d0 + i * STEP * D * 2, s0 + i * STEP * stride);
    } else {
        const __nv_bfloat16 *s0 = src + ch * 8;
#pragma unroll
        for (int i = 0; i < ROWS / STEP; ++i) {
            const int row = row0 + i * STEP;
            // A zero-filled row still gets an in-bounds address (the last valid row; valid >= 1).
            cp_async_16_zfill(d0 + i * STEP * D * 2, s0 + min(row, valid - 1) * stride, row < valid);
        }
    }
}

// The four lane-dependent byte offsets of a swizzled ldmatrix source. A lane that addresses
// chunk 2c + x of a row r with r % 8 == y (x = 0 or 1) reads physical chunk (2c + x) ^ y; for
// c = 4u + w (w < 4) that is 8u + ((2w) ^ z) with z = x ^ y, so the address is
// row base + 128 u (an immediate) + off[w].
__device__ __forceinline__ void swizzle_offsets(uint32_t base, int z, uint32_t (&off)[4]) {
#pragma unroll
    for (int w = 0; w < 4; ++w) off[w] = base + (((2 * w) ^ z) << 4);
}

template <int D, int MT, int WARPS, int BC, bool Q_REGS>
__device__ __forceinline__ void flash_fwd(const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k,
                                          const __nv_bfloat16 *__restrict__ v, __nv_bfloat16 *__restrict__ out,
                                          float *__restrict__ lse, int heads, int lq, int lk, float scale_log2,
                                          unsigned char *smem) {
    constexpr int WR = 16 * MT;          // query rows per warp
    constexpr int BR = WR * WARPS;       // query rows per CTA
    constexpr int NT = 32 * WARPS;       // threads
    constexpr int CH = D / 8;            // 16-byte chunks per row
    constexpr int KD = D / 16;           // k-steps over the head dim (S = Q K^T)
    constexpr int NS = BC / 8;           // n-tiles of S
    constexpr int ND = D / 8;            // n-tiles of O
    constexpr uint32_t TILE_KV = BC * D * 2;
    constexpr uint32_t TILE_Q = BR * D * 2;
    static_assert(D % 64 == 0, "rows must be whole 128-byte swizzle periods");
    static_assert(BC % 16 == 0, "K fragments come in pairs of n-tiles");
    static_assert(!Q_REGS || TILE_Q <= 2 * TILE_KV, "Q is staged in stage 1 of the K/V buffers");

    const unsigned tid = threadIdx.x;
    const int warp = static_cast<int>(tid >> 5), lane = static_cast<int>(tid & 31);
    const int g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / heads, h = bh - b * heads;
    const int q0 = blockIdx.x * BR;
    const __nv_bfloat16 *qg = q + (static_cast<size_t>(bh) * lq + q0) * D;
    const __nv_bfloat16 *kg = k + static_cast<size_t>(bh) * lk * D;
    const __nv_bfloat16 *vg = v + static_cast<size_t>(bh) * lk * D;

    // Layout: Q_REGS: [K0 V0][K1 V1] with Q staged in [K1 V1]; else [Q][K0 V0][K1 V1].
    const uint32_t sbase = smem_addr(smem);
    const uint32_t sq = Q_REGS ? sbase + 2 * TILE_KV : sbase;
    const uint32_t skv = Q_REGS ? sbase : sbase + TILE_Q;
    const int nt = (lk + BC - 1) / BC;

    // ldmatrix sources (see swizzle_offsets). Q and V: lane points at row (lane % 16) of a 16-row
    // block, chunk pair member lane / 16. K: row (lane % 8) + 8 (lane / 16), member (lane / 8) % 2.
    // Every such row has row % 8 == lane % 8.
    // Q and V share the lane part (offqv); the warp-uniform parts (sq + warp rows, the V tile) are
    // added per use and live in uniform registers.
    uint32_t offqv[4], offk[4];
    swizzle_offsets((lane & 15) * (D * 2), (lane >> 4) ^ (lane & 7), offqv);
    swizzle_offsets(skv + ((lane & 7) + ((lane >> 4) << 3)) * (D * 2), ((lane >> 3) & 1) ^ (lane & 7), offk);
    const uint32_t sqw = sq + warp * WR * (D * 2), svt = skv + TILE_KV;

    // Prologue: Q, K0, V0 as three commit groups (the K/V groups empty when Lk = 0, so that the
    // group arithmetic below holds regardless).
    load_tile<BR, D, NT>(sq, qg, D, lq - q0, tid);
    cp_async_commit();
    if (nt > 0) load_tile<BC, D, NT>(skv, kg, D, lk, tid);
    cp_async_commit();
    if (nt > 0) load_tile<BC, D, NT>(skv + TILE_KV, vg, D, lk, tid);
    cp_async_commit();

    // A fragment of Q for m-tile mt and k-step kd (16 columns): rows mt * 16.., chunks 2 kd, 2 kd + 1.
    auto load_q = [&](int mt, int kd, uint32_t (&a)[4]) {
        ldsm_x4(sqw + offqv[kd & 3] + mt * 16 * D * 2 + (kd >> 2) * 128, a);
    };
    uint32_t qf[MT][KD][4];
    if constexpr (Q_REGS) {
        cp_async_wait<2>();  // Q landed (K0, V0 may be pending)
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kd = 0; kd < KD; ++kd) load_q(mt, kd, qf[mt][kd]);
        // No barrier here: barrier (A) of iteration 0 precedes the first write to stage 1.
    }

    float o[MT][ND][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < ND; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
        m[mt][0] = m[mt][1] = neg_inf();
        l[mt][0] = l[mt][1] = 0.f;
    }

    for (int j = 0; j < nt; ++j) {
        const uint32_t stage = (j & 1) * 2 * TILE_KV;
        const bool more = j + 1 < nt;
        cp_async_wait<1>();  // pending were K_j, V_j: K_j landed (and Q, for the smem-Q variant)
        __syncthreads();     // (A)
        if (more) {
            const uint32_t nk = skv + (2 * TILE_KV - stage);
            const int r0 = (j + 1) * BC;
            load_tile<BC, D, NT>(nk, kg + static_cast<size_t>(r0) * D, D, lk - r0, tid);
            cp_async_commit();
            load_tile<BC, D, NT>(nk + TILE_KV, vg + static_cast<size_t>(r0) * D, D, lk - r0, tid);
            cp_async_commit();
        }

        // S = Q K_j^T. K fragment pair p: keys 16 p.., chunks 2 kd, 2 kd + 1.
        float s[MT][NS][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NS; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
        for (int kd = 0; kd < KD; ++kd) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (Q_REGS) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) a[mt][i] = qf[mt][kd][i];
                } else {
                    load_q(mt, kd, a[mt]);
                }
            }
#pragma unroll
            for (int p = 0; p < NS / 2; ++p) {
                uint32_t bk[4];
                ldsm_x4(offk[kd & 3] + stage + p * 16 * D * 2 + (kd >> 2) * 128, bk);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16(s[mt][2 * p], a[mt], bk[0], bk[1]);
                    mma_bf16(s[mt][2 * p + 1], a[mt], bk[2], bk[3]);
                }
            }
        }

        // Keys past the end of K only occur in the last tile.
        if ((j + 1) * BC > lk) {
#pragma unroll
            for (int n = 0; n < NS; ++n)
#pragma unroll
                for (int c = 0; c < 4; ++c)
                    if (j * BC + n * 8 + 2 * t + (c & 1) >= lk)
#pragma unroll
                        for (int mt = 0; mt < MT; ++mt) s[mt][n][c] = neg_inf();
        }

        // Online softmax; hh = 0 is row g (c0, c1), hh = 1 row g + 8 (c2, c3). O is rescaled only
        // when some row of the warp raised its max (corr < 1): after the first tiles most do not,
        // and skipping a multiplication by exactly 1 changes nothing.
        float corr[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                float mx = m[mt][hh];
#pragma unroll
                for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * hh], s[mt][n][2 * hh + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                corr[mt][hh] = fast_exp2((m[mt][hh] - mx) * scale_log2);  // 0 on the first tile
                const float mxs = mx * scale_log2;
                m[mt][hh] = mx;
                float rs = 0.f;
#pragma unroll
                for (int n = 0; n < NS; ++n) {
#pragma unroll
                    for (int c = 2 * hh; c < 2 * hh + 2; ++c) {
                        const float p = fast_exp2(fmaf(s[mt][n][c], scale_log2, -mxs));
                        s[mt][n][c] = p;
                        rs += p;
                    }
                }
                l[mt][hh] = l[mt][hh] * corr[mt][hh] + rs;
            }
        }
        bool moved = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) moved |= (corr[mt][0] != 1.f) | (corr[mt][1] != 1.f);
        if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < ND; ++n) {
                    o[mt][n][0] *= corr[mt][0];
                    o[mt][n][1] *= corr[mt][0];
                    o[mt][n][2] *= corr[mt][1];
                    o[mt][n][3] *= corr[mt][1];
                }
        }

        if (more) {
            cp_async_wait<2>();  // pending were V_j, K_j+1, V_j+1
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // (B) V_j visible to all warps

        // O += P V_j. V fragment pair p (.trans): keys 16 ks.., chunks 2 p, 2 p + 1.
#pragma unroll
        for (int ks = 0; ks < BC / 16; ++ks) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                a[mt][0] = pack_bf16(s[mt][2 * ks][0], s[mt][2 * ks][1]);
                a[mt][1] = pack_bf16(s[mt][2 * ks][2], s[mt][2 * ks][3]);
                a[mt][2] = pack_bf16(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
                a[mt][3] = pack_bf16(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
            }
#pragma unroll
            for (int p = 0; p < D / 16; ++p) {
                uint32_t bv[4];
                ldsm_x4_trans(svt + stage + offqv[p & 3] + ks * 16 * D * 2 + (p >> 2) * 128, bv);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16(o[mt][2 * p], a[mt], bv[0], bv[1]);
                    mma_bf16(o[mt][2 * p + 1], a[mt], bv[2], bv[3]);
                }
            }
        }
    }

    // Epilogue: every warp is past its last smem read before anyone overwrites [0, BR * D * 2).
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float lt = l[mt][hh];
            lt += __shfl_xor_sync(0xffffffffu, lt, 1);
            lt += __shfl_xor_sync(0xffffffffu, lt, 2);
            const float inv = lt > 0.f ? __fdividef(1.f, lt) : 0.f;
            const int r = warp * WR + mt * 16 + g + 8 * hh;
#pragma unroll
            for (int n = 0; n < ND; ++n)
                *reinterpret_cast<uint32_t *>(smem + swz<D>(r, n) + 4 * t) =
                    pack_bf16(o[mt][n][2 * hh] * inv, o[mt][n][2 * hh + 1] * inv);
            if (lse != nullptr && t == 0 && q0 + r < lq)
                lse[static_cast<size_t>(bh) * lq + q0 + r] = lt > 0.f ? (m[mt][hh] * scale_log2 + __log2f(lt)) * LN2 : neg_inf();
        }
    }
    __syncwarp();  // a warp stores only the rows it staged
#pragma unroll
    for (int i = 0; i < WR * CH / 32; ++i) {
        const int c = lane + 32 * i;
        const int r = warp * WR + c / CH, ch = c % CH;
        if (q0 + r < lq) {
            const uint4 val = *reinterpret_cast<const uint4 *>(smem + swz<D>(r, ch));
            *reinterpret_cast<uint4 *>(out + ((static_cast<size_t>(b) * lq + q0 + r) * heads + h) * D + ch * 8) = val;
        }
    }
}

// ---- SIMT fallback ----

template <int DC, int R>
__device__ __forceinline__ void simt_fwd(const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k,
                                         const __nv_bfloat16 *__restrict__ v, __nv_bfloat16 *__restrict__ out,
                                         float *__restrict__ lse, int heads, int lq, int lk, int d, float scale_log2,
                                         unsigned char *smem) {
    constexpr int WARPS = 4, BQ = WARPS * R, BKV = 32;
    const int dq = (d + 1) & ~1;                // Q row stride (f32), even: rows read as float2
    const int dk = dq % 4 == 0 ? dq + 2 : dq;   // K row stride (bf16): odd stride in 32-bit words
    float *qs = reinterpret_cast<float *>(smem);               // [BQ][dq]
    float *ps = qs + BQ * dq;                                  // [WARPS][R][32]
    __nv_bfloat16 *ks = reinterpret_cast<__nv_bfloat16 *>(ps + WARPS * R * 32);  // [BKV][dk]
    __nv_bfloat16 *vs = ks + BKV * dk;                         // [BKV][d]

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int bh = blockIdx.y, b = bh / heads, h = bh - b * heads;
    const int q0 = blockIdx.x * BQ;
    const __nv_bfloat16 *qg = q + static_cast<size_t>(bh) * lq * d;
    const __nv_bfloat16 *kg = k + static_cast<size_t>(bh) * lk * d;
    const __nv_bfloat16 *vg = v + static_cast<size_t>(bh) * lk * d;
    const __nv_bfloat16 zero = __float2bfloat16(0.f);

    for (int r = warp; r < BQ; r += WARPS)
        for (int c = lane; c < dq; c += 32)
            qs[r * dq + c] = (q0 + r < lq && c < d) ? __bfloat162float(qg[static_cast<size_t>(q0 + r) * d + c]) : 0.f;

    float o[R][DC], m[R], l[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int i = 0; i < DC; ++i) o[r][i] = 0.f;
        m[r] = neg_inf();
        l[r] = 0.f;
    }
    const float *qw = qs + warp * R * dq;
    float *pw = ps + warp * R * 32;

    for (int kv0 = 0; kv0 < lk; kv0 += BKV) {
        __syncthreads();  // previous chunk's K/V reads done (and, the first time, Q written)
        for (int r = warp; r < BKV; r += WARPS) {
            const bool ok = kv0 + r < lk;
            const __nv_bfloat16 *krow = kg + static_cast<size_t>(kv0 + r) * d;
            const __nv_bfloat16 *vrow = vg + static_cast<size_t>(kv0 + r) * d;
            for (int c = lane; c < dk; c += 32) ks[r * dk + c] = (ok && c < d) ? krow[c] : zero;
            for (int c = lane; c < d; c += 32) vs[r * d + c] = ok ? vrow[c] : zero;
        }
        __syncthreads();

        // Scores: lane = key.
        float s[R];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = 0.f;
        const __nv_bfloat162 *krow = reinterpret_cast<const __nv_bfloat162 *>(ks + lane * dk);
#pragma unroll 4
        for (int p = 0; p < dq / 2; ++p) {
            const float2 kf = __bfloat1622float2(krow[p]);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float2 qf = reinterpret_cast<const float2 *>(qw + r * dq)[p];
                s[r] = fmaf(qf.x, kf.x, s[r]);
                s[r] = fmaf(qf.y, kf.y, s[r]);
            }
        }

        // Online softmax (log2 domain: m and the exponents are scores * scale_log2).
        const bool valid = kv0 + lane < lk;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float x = valid ? s[r] * scale_log2 : neg_inf();
            const float mx = fmaxf(m[r], warp_max(x));  // finite: the chunk holds a valid key
            const float corr = fast_exp2(m[r] - mx);
            const float p = fast_exp2(x - mx);
            m[r] = mx;
            l[r] = l[r] * corr + p;
#pragma unroll
            for (int i = 0; i < DC; ++i) o[r][i] *= corr;
            pw[r * 32 + lane] = p;
        }
        __syncwarp();

        // O += P V: lane = output columns lane + 32 i.
#pragma unroll 2
        for (int j = 0; j < BKV; j += 4) {
            float4 pr[R];
#pragma unroll
            for (int r = 0; r < R; ++r) pr[r] = *reinterpret_cast<const float4 *>(pw + r * 32 + j);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const __nv_bfloat16 *vrow = vs + (j + u) * d;
#pragma unroll
                for (int i = 0; i < DC; ++i) {
                    const int c = lane + 32 * i;
                    if (c < d) {
                        const float vv = __bfloat162float(vrow[c]);
#pragma unroll
                        for (int r = 0; r < R; ++r) {
                            const float pu = u == 0 ? pr[r].x : u == 1 ? pr[r].y : u == 2 ? pr[r].z : pr[r].w;
                            o[r][i] = fmaf(pu, vv, o[r][i]);
                        }
                    }
                }
            }
        }
        __syncwarp();  // pw is rewritten by the next chunk
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
        const float lt = warp_sum(l[r]);
        const int row = q0 + warp * R + r;
        if (row >= lq) continue;
        const float inv = lt > 0.f ? __fdividef(1.f, lt) : 0.f;
        __nv_bfloat16 *orow = out + ((static_cast<size_t>(b) * lq + row) * heads + h) * d;
#pragma unroll
        for (int i = 0; i < DC; ++i) {
            const int c = lane + 32 * i;
            if (c < d) orow[c] = __float2bfloat16(o[r][i] * inv);
        }
        if (lse != nullptr && lane == 0)
            lse[static_cast<size_t>(bh) * lq + row] = lt > 0.f ? (m[r] + __log2f(lt)) * LN2 : neg_inf();
    }
}

}  // namespace

extern __shared__ __align__(128) unsigned char attention_smem[];

#define FLASH_KERNEL(name, D, MT, WARPS, BC, Q_REGS, MIN_BLOCKS)                                                        \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, MIN_BLOCKS)                                            \
        name(const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k, const __nv_bfloat16 *__restrict__ v, \
             __nv_bfloat16 *__restrict__ out, float *__restrict__ lse, int heads, int lq, int lk, float scale_log2) {  \
        flash_fwd<D, MT, WARPS, BC, Q_REGS>(q, k, v, out, lse, heads, lq, lk, scale_log2, attention_smem);              \
    }

// name                          D    MT WARPS BC  Q in regs  CTAs/SM (launch bounds)
FLASH_KERNEL(attention_fwd_d128_br128,       128, 2, 4, 48, false, 2)
FLASH_KERNEL(attention_fwd_d128_br64_qregs,  128, 1, 4, 48, true, 3)
FLASH_KERNEL(attention_fwd_d64_br128_qregs,  64, 2, 4, 64, true, 2)

#define SIMT_KERNEL(name, DC, R)                                                                                    \
    extern "C" __global__ void __launch_bounds__(128)                                                               \
        name(const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k, const __nv_bfloat16 *__restrict__ v, \
             __nv_bfloat16 *__restrict__ out, float *__restrict__ lse, int heads, int lq, int lk, int d, float scale_log2) { \
        simt_fwd<DC, R>(q, k, v, out, lse, heads, lq, lk, d, scale_log2, attention_smem);                           \
    }

SIMT_KERNEL(attention_fwd_simt_dc1, 1, 8)
SIMT_KERNEL(attention_fwd_simt_dc2, 2, 8)
SIMT_KERNEL(attention_fwd_simt_dc4, 4, 8)
SIMT_KERNEL(attention_fwd_simt_dc8, 8, 8)
SIMT_KERNEL(attention_fwd_simt_dc16, 16, 4)

// ---- 3. Backward (SIMT, D <= 128): attention_bwd_delta, attention_bwd_{dkdv,dq}_d{32,64,128} -----
//
// FlashAttention-2's backward (Dao 2023, algorithm 2) on the CUDA cores, in three launches:
//   delta: delta[b, h, i] = g_out_i . out_i (f32), one warp per query row;
//   dkdv:  one CTA per (block of 32 keys, batch x head): K_j and V_j stay in shared memory while the
//          CTA walks every block i of 32 query rows, rebuilding P_ij = exp(S_ij / sqrt(D) - lse_i)
//          and dS_ij = P_ij (dO_i V_j^T - delta_i), and accumulates dV_j += P^T dO_i and
//          dK_j += dS^T Q_i in registers;
//   dq:    one CTA per (block of 32 query rows, batch x head): Q_i and dO_i stay while it walks
//          every key block, rebuilding dS the same way, and accumulates dQ_i += dS K_j.
// dQ has its own pass (recomputing S and dP: 2 products of the 5) rather than f32 atomics from the
// dkdv CTAs, so that every gradient is written once, summed in a fixed order: the result is
// deterministic (activation checkpointing reproduces it bit for bit) and needs no scratch.
// The 1 / sqrt(D) of dQ and dK is applied once, at the store.
//
// Probabilities (bwd_probs, shared by both): lane = key of the block, warp w = query rows
// 8w .. 8w + 7, as the forward's SIMT scores: Q and dO rows are f32 in shared memory read as float2
// broadcasts, K and V rows bf16 with an odd stride in 32-bit words (the 32 lanes' reads hit 32
// banks); each lane computes S and dP for its key and the warp's rows and writes P and dS to
// shared [32][32] tiles. Keys >= Lk and rows >= Lq get P = dS = 0 (their K, V, Q, dO are zeros).
// Accumulation: dkdv: lane = key, warp w = columns w + 4c (c < DMAX / 4), so dK and dV take
// DMAX / 2 registers; it reads P[i][lane] (consecutive words) and dO[i][col], Q[i][col]
// (broadcasts). dq: warp w = its own query rows (only __syncwarp between the steps), lane =
// columns lane + 32c (c < DMAX / 32), 8 DMAX / 32 registers; reads dS[row][k] (broadcasts) and
// K[k][col] (consecutive).
// Shared memory (the launcher computes the same): Q and dO 32 x Dq f32 each, P and dS 32 x 32 f32,
// lse and delta 32 f32, K and V 32 x Dk bf16 (Dq and Dk as the SIMT forward's): 57 KiB at D = 128.

namespace {

constexpr float LOG2E = 1.4426950408889634f;
constexpr int BWD_WARPS = 4, BWD_BLOCK = 32, BWD_ROWS_PER_WARP = BWD_BLOCK / BWD_WARPS;

struct BwdTiles {
    float *q, *dout, *p, *ds, *lse, *delta;
    __nv_bfloat16 *k, *v;
    int dq, dk;
};

__device__ __forceinline__ BwdTiles bwd_tiles(unsigned char *smem, int d) {
    BwdTiles t;
    t.dq = (d + 1) & ~1;
    t.dk = t.dq % 4 == 0 ? t.dq + 2 : t.dq;
    t.q = reinterpret_cast<float *>(smem);
    t.dout = t.q + BWD_BLOCK * t.dq;
    t.p = t.dout + BWD_BLOCK * t.dq;
    t.ds = t.p + BWD_BLOCK * BWD_BLOCK;
    t.lse = t.ds + BWD_BLOCK * BWD_BLOCK;
    t.delta = t.lse + BWD_BLOCK;
    t.k = reinterpret_cast<__nv_bfloat16 *>(t.delta + BWD_BLOCK);
    t.v = t.k + BWD_BLOCK * t.dk;
    return t;
}

// Query rows q0 .. q0 + 31 of head (b, h): Q, this head's columns of g_out (merged layout), lse in
// log2 units and delta into the tiles; rows >= lq and columns >= d as zeros.
__device__ __forceinline__ void bwd_load_rows(const BwdTiles &t, const __nv_bfloat16 *__restrict__ q,
                                              const __nv_bfloat16 *__restrict__ g_out, const float *__restrict__ lse,
                                              const float *__restrict__ delta, int b, int h, int heads, int lq, int d, int q0) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t bh = static_cast<size_t>(b) * heads + h;
    for (int r = warp; r < BWD_BLOCK; r += BWD_WARPS) {
        const int row = min(q0 + r, lq - 1);  // a row past the end keeps an in-bounds address
        const bool ok = q0 + r < lq;
        const __nv_bfloat16 *qr = q + (bh * lq + row) * d;
        const __nv_bfloat16 *gr = g_out + ((static_cast<size_t>(b) * lq + row) * heads + h) * d;
        for (int c = lane; c < t.dq; c += 32) {
            const bool in = ok && c < d;
            t.q[r * t.dq + c] = in ? __bfloat162float(qr[c]) : 0.f;
            t.dout[r * t.dq + c] = in ? __bfloat162float(gr[c]) : 0.f;
        }
        if (lane == 0) {
            t.lse[r] = ok ? lse[bh * lq + row] * LOG2E : 0.f;
            t.delta[r] = ok ? delta[bh * lq + row] : 0.f;
        }
    }
}

// Keys k0 .. k0 + 31 of head bh: K and V rows into the tiles; keys >= lk and columns >= d as zeros.
__device__ __forceinline__ void bwd_load_keys(const BwdTiles &t, const __nv_bfloat16 *__restrict__ k, const __nv_bfloat16 *__restrict__ v,
                                              int bh, int lk, int d, int k0) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const __nv_bfloat16 zero = __float2bfloat16(0.f);
    for (int r = warp; r < BWD_BLOCK; r += BWD_WARPS) {
        const bool ok = k0 + r < lk;
        const size_t row = static_cast<size_t>(bh) * lk + min(k0 + r, lk - 1);
        const __nv_bfloat16 *kr = k + row * d, *vr = v + row * d;
        for (int c = lane; c < t.dk; c += 32) {
            const bool in = ok && c < d;
            t.k[r * t.dk + c] = in ? kr[c] : zero;
            t.v[r * t.dk + c] = in ? vr[c] : zero;
        }
    }
}

// P and dS of the warp's rows for the lane's key into the tiles; rows >= rows_valid and an invalid
// key give zeros. The tiles' rows and keys must be loaded (a barrier after the loads).
__device__ __forceinline__ void bwd_probs(const BwdTiles &t, bool key_ok, int rows_valid, float scale_log2) {
    constexpr int R = BWD_ROWS_PER_WARP;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float s[R], dp[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = dp[r] = 0.f;
    const __nv_bfloat162 *kr = reinterpret_cast<const __nv_bfloat162 *>(t.k + lane * t.dk);
    const __nv_bfloat162 *vr = reinterpret_cast<const __nv_bfloat162 *>(t.v + lane * t.dk);
    const float2 *qw = reinterpret_cast<const float2 *>(t.q + warp * R * t.dq);
    const float2 *gw = reinterpret_cast<const float2 *>(t.dout + warp * R * t.dq);
    const int pairs = t.dq / 2;
#pragma unroll 4
    for (int p = 0; p < pairs; ++p) {
        const float2 kf = __bfloat1622float2(kr[p]), vf = __bfloat1622float2(vr[p]);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float2 qf = qw[r * pairs + p], gf = gw[r * pairs + p];
            s[r] = fmaf(qf.x, kf.x, fmaf(qf.y, kf.y, s[r]));
            dp[r] = fmaf(gf.x, vf.x, fmaf(gf.y, vf.y, dp[r]));
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int row = warp * R + r;
        const float p = key_ok && row < rows_valid ? fast_exp2(fmaf(s[r], scale_log2, -t.lse[row])) : 0.f;
        t.p[row * BWD_BLOCK + lane] = p;
        t.ds[row * BWD_BLOCK + lane] = p * (dp[r] - t.delta[row]);
    }
}

template <int DMAX>
__device__ __forceinline__ void attn_bwd_dkdv(const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k,
                                              const __nv_bfloat16 *__restrict__ v, const __nv_bfloat16 *__restrict__ g_out,
                                              const float *__restrict__ lse, const float *__restrict__ delta, __nv_bfloat16 *__restrict__ gk,
                                              __nv_bfloat16 *__restrict__ gv, int heads, int lq, int lk, int d, float scale_log2,
                                              float scale, unsigned char *smem) {
    constexpr int DC = DMAX / BWD_WARPS;
    const BwdTiles t = bwd_tiles(smem, d);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int bh = blockIdx.y, b = bh / heads, h = bh - b * heads;
    const int k0 = blockIdx.x * BWD_BLOCK;
    const bool key_ok = k0 + lane < lk;
    bwd_load_keys(t, k, v, bh, lk, d, k0);
    float ak[DC], av[DC];
#pragma unroll
    for (int c = 0; c < DC; ++c) ak[c] = av[c] = 0.f;
    for (int q0 = 0; q0 < lq; q0 += BWD_BLOCK) {
        __syncthreads();  // the previous rows are consumed (and, the first time, K and V are in)
        bwd_load_rows(t, q, g_out, lse, delta, b, h, heads, lq, d, q0);
        __syncthreads();
        bwd_probs(t, key_ok, lq - q0, scale_log2);
        __syncthreads();  // every warp's P and dS rows are in
#pragma unroll 2
        for (int i = 0; i < BWD_BLOCK; ++i) {
            const float p = t.p[i * BWD_BLOCK + lane], ds = t.ds[i * BWD_BLOCK + lane];
            const float *qi = t.q + i * t.dq, *gi = t.dout + i * t.dq;
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                const int col = warp + BWD_WARPS * c;
                if (col < d) {
                    av[c] = fmaf(p, gi[col], av[c]);
                    ak[c] = fmaf(ds, qi[col], ak[c]);
                }
            }
        }
    }
    if (!key_ok) return;
    const size_t row = (static_cast<size_t>(bh) * lk + k0 + lane) * d;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
        const int col = warp + BWD_WARPS * c;
        if (col < d) {
            gk[row + col] = __float2bfloat16(ak[c] * scale);
            gv[row + col] = __float2bfloat16(av[c]);
        }
    }
}

template <int DMAX>
__device__ __forceinline__ void attn_bwd_dq(const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k,
                                            const __nv_bfloat16 *__restrict__ v, const __nv_bfloat16 *__restrict__ g_out,
                                            const float *__restrict__ lse, const float *__restrict__ delta, __nv_bfloat16 *__restrict__ gq,
                                            int heads, int lq, int lk, int d, float scale_log2, float scale, unsigned char *smem) {
    constexpr int DC = DMAX / 32, R = BWD_ROWS_PER_WARP;
    const BwdTiles t = bwd_tiles(smem, d);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int bh = blockIdx.y, b = bh / heads, h = bh - b * heads;
    const int q0 = blockIdx.x * BWD_BLOCK;
    bwd_load_rows(t, q, g_out, lse, delta, b, h, heads, lq, d, q0);
    float acc[R][DC];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < DC; ++c) acc[r][c] = 0.f;
    for (int k0 = 0; k0 < lk; k0 += BWD_BLOCK) {
        __syncthreads();  // every warp is done with the previous keys (and, the first time, the rows are in)
        bwd_load_keys(t, k, v, bh, lk, d, k0);
        __syncthreads();
        bwd_probs(t, k0 + lane < lk, lq - q0, scale_log2);
        __syncwarp();  // the warp reads back only the dS rows it wrote
#pragma unroll 4
        for (int j = 0; j < BWD_BLOCK; ++j) {
            float kf[DC];
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                const int col = lane + 32 * c;
                kf[c] = col < d ? __bfloat162float(t.k[j * t.dk + col]) : 0.f;
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float ds = t.ds[(warp * R + r) * BWD_BLOCK + j];
#pragma unroll
                for (int c = 0; c < DC; ++c) acc[r][c] = fmaf(ds, kf[c], acc[r][c]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int row = q0 + warp * R + r;
        if (row >= lq) continue;
        __nv_bfloat16 *dst = gq + (static_cast<size_t>(bh) * lq + row) * d;
#pragma unroll
        for (int c = 0; c < DC; ++c) {
            const int col = lane + 32 * c;
            if (col < d) dst[col] = __float2bfloat16(acc[r][c] * scale);
        }
    }
}

}  // namespace

// delta[b, h, i] = g_out[b, i, h] . out[b, i, h] (both [B, Lq, H * D]): one warp per row of the
// merged layout, r = (b Lq + i) H + h, 8 per block.
extern "C" __global__ void __launch_bounds__(256)
    attention_bwd_delta(const __nv_bfloat16 *__restrict__ out, const __nv_bfloat16 *__restrict__ g_out, float *__restrict__ delta,
                        int heads, int lq, int d, int rows) {
    const int r = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= rows) return;  // uniform over the warp
    const __nv_bfloat16 *o = out + static_cast<size_t>(r) * d, *g = g_out + static_cast<size_t>(r) * d;
    float s = 0.f;
    for (int c = lane; c < d; c += 32) s = fmaf(__bfloat162float(o[c]), __bfloat162float(g[c]), s);
    s = warp_sum(s);
    if (lane == 0) {
        const int h = r % heads, bi = r / heads, b = bi / lq, i = bi - b * lq;
        delta[(static_cast<size_t>(b) * heads + h) * lq + i] = s;
    }
}

#define BWD_KERNELS(DMAX)                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * BWD_WARPS) attention_bwd_dkdv_d##DMAX(                                   \
        const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k, const __nv_bfloat16 *__restrict__ v,           \
        const __nv_bfloat16 *__restrict__ g_out, const float *__restrict__ lse, const float *__restrict__ delta,                 \
        __nv_bfloat16 *__restrict__ gk, __nv_bfloat16 *__restrict__ gv, int heads, int lq, int lk, int d, float scale_log2,    \
        float scale) {                                                                                                           \
        attn_bwd_dkdv<DMAX>(q, k, v, g_out, lse, delta, gk, gv, heads, lq, lk, d, scale_log2, scale, attention_smem);           \
    }                                                                                                                            \
    extern "C" __global__ void __launch_bounds__(32 * BWD_WARPS) attention_bwd_dq_d##DMAX(                                     \
        const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k, const __nv_bfloat16 *__restrict__ v,           \
        const __nv_bfloat16 *__restrict__ g_out, const float *__restrict__ lse, const float *__restrict__ delta,                 \
        __nv_bfloat16 *__restrict__ gq, int heads, int lq, int lk, int d, float scale_log2, float scale) {                      \
        attn_bwd_dq<DMAX>(q, k, v, g_out, lse, delta, gq, heads, lq, lk, d, scale_log2, scale, attention_smem);                 \
    }

BWD_KERNELS(32)
BWD_KERNELS(64)
BWD_KERNELS(128)

// ---- 4. Backward on tensor cores (D = 64 and 128): attention_bwd_{dkdv,dq}_mma_d{64,128} ----------
//
// The same three launches and the same arithmetic as part 3 (delta is part 3's kernel), with the
// five products on mma.m16n8k16 (bf16 in, f32 accumulate) and one template, flash_bwd<D, BN, DKDV>,
// for both gradient passes. Each pass is "rows resident, columns streamed":
//     dkdv: rows = 64 keys (X = K, Y = V), columns = query tiles of BN (U = Q, W = dO);
//     dq:   rows = 64 queries (X = Q, Y = dO), columns = key tiles of BN (U = K, W = V).
// Per column tile, warp w (rows 16w .. 16w + 15) computes
//     S  = X U^T, dP = Y W^T                     (A = X, Y rows; B = U, W rows: K's pattern below)
//     P  = exp2(S c - lse log2 e)                (c = log2(e) / sqrt(D), lse from the forward)
//     dS = P (dP - delta)
// and accumulates, with P and dS going from the accumulators to A fragments in registers as the
// forward's P does:
//     dkdv: dV += P W, dK += dS U                (B = W, U rows through ldmatrix.trans: V's pattern)
//     dq:   dQ += dS U
// In dkdv, S, P and dS are the transposes of the forward's (keys down, queries across), which is
// what lets dV and dK be A x B products with the key rows owned by the warp; lse and delta then
// vary along the columns, and come with each query tile (4-byte cp.async into shared memory). In
// dq they vary along the rows and each thread keeps its two rows' values in registers. 1 / sqrt(D)
// is applied to dK and dQ at the store, as in part 3.
//
// Fragment layouts are the forward's (part 1's table): PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type" (the A, B and C/D fragment figures for .bf16), and
// ldmatrix's "fragment layout of one 8x8 matrix" figure (.trans swaps the roles of row and column):
//     X, Y (A operand, row-major 16 x 16 of the warp's rows): Q's pattern, lane -> row lane % 16,
//          chunk member lane / 16.
//     U, W as B of S = X U^T (B[k][n] = U[n][k], no transpose): K's pattern, lane -> row
//          (lane % 8) + 8 (lane / 16), chunk member (lane / 8) % 2 -> b0, b1 of n-tiles 2p, 2p + 1.
//     U, W as B of dK += dS U (B[k][n] = U[k][n], .trans): V's pattern, lane -> row lane % 16,
//          chunk member lane / 16 -> b0, b1 of d-tiles 2p, 2p + 1.
//     P, dS (A operand of the accumulations): the forward's P packing of n-tiles 2s, 2s + 1.
// Accumulator element c of n-tile n of a thread sits at row g + 8 (c / 2), column n * 8 + 2t + c % 2.
//
// Pipeline: X and Y are loaded once; U and W (and, in dkdv, the tile's lse and delta) are
// double-buffered, one cp.async commit group per column tile: tile j + 1 is issued right after
// the barrier that opens iteration j, so it lands while tile j is computed. One barrier per tile:
// tile j landed (wait_group 0 before it) and every warp finished tile j - 1, whose stage the
// prefetch overwrites.
//
// Masking: rows and columns past the end are zero-filled by cp.async (so every product stays
// finite); in the last column tile, S of columns past the end is set to -inf, giving P = dS = 0
// (ex2(-inf) = +0, and dP there is 0), so that they add nothing to dV, dK or dQ. Rows past the
// end compute finite values that are never stored. lse is finite for every stored row (a row
// has keys whenever there is a key tile to walk; with no keys the dq loop is empty and stores 0).
//
// Numerics: as FlashAttention-2: f32 S, dP, P, dS; P and dS rounded to bf16 as MMA operands; f32
// accumulators; outputs rounded to bf16 once.
//
// Kernels (registers: accumulators D / 2 floats each per thread, S and dP BN / 2 each):
//   attention_bwd_dkdv_mma_d128  BN 32: dK + dV 128 + S, dP 32 registers; smem X, Y 2 x 16 KiB,
//                                2 stages x (U + W) 2 x 16 KiB, lse/delta 2 x 256 B = 64.5 KiB
//   attention_bwd_dq_mma_d128    BN 64: dQ 64 + S, dP 64; smem 32 + 64 = 96 KiB
//   attention_bwd_dkdv_mma_d64   BN 64: 64 + 64; smem 16 + 32 + 1 KiB = 49 KiB
//   attention_bwd_dq_mma_d64     BN 64: 32 + 64; smem 16 + 32 = 48 KiB
// All within the 99 KiB a block may use on sm_86/89 as on A100/H100. Block 128 threads; grid
// x = row blocks of 64 (keys for dkdv, queries for dq), y = B * H. The launcher
// (engine/src/backend/cuda/attention.rs) computes the same shared memory and requires 16-byte-
// aligned q, k, v and g_out.

namespace {

// 4 bytes global -> shared (through L1: .cg takes only 16), zero-filled when !valid; src must
// still be a valid address.
__device__ __forceinline__ void cp_async_4_zfill(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0) : "memory");
}

constexpr int BWD_MMA_WARPS = 4, BWD_MMA_ROWS = 16 * BWD_MMA_WARPS;

template <int D, int BN, bool DKDV>
__device__ __forceinline__ void flash_bwd(const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k,
                                          const __nv_bfloat16 *__restrict__ v, const __nv_bfloat16 *__restrict__ g_out,
                                          const float *__restrict__ lse, const float *__restrict__ delta,
                                          __nv_bfloat16 *__restrict__ gv, __nv_bfloat16 *__restrict__ grad, int heads, int lq,
                                          int lk, float scale_log2, float scale, unsigned char *smem) {
    constexpr int NT = 32 * BWD_MMA_WARPS;
    constexpr int KD = D / 16;  // k-steps of S and dP over the head dim
    constexpr int NS = BN / 8;  // n-tiles of S and dP
    constexpr int ND = D / 8;   // n-tiles of the accumulators
    constexpr int NACC = DKDV ? 2 : 1;  // dkdv: acc[0] = dV, acc[1] = dK; dq: acc[0] = dQ
    constexpr uint32_t TILE_R = BWD_MMA_ROWS * D * 2, TILE_N = BN * D * 2;
    static_assert(D % 64 == 0, "rows must be whole 128-byte swizzle periods");
    static_assert(BN % 16 == 0 && 2 * BN <= NT, "column tiles come in pairs of n-tiles; one thread per lse/delta value");

    const unsigned tid = threadIdx.x;
    const int warp = static_cast<int>(tid >> 5), lane = static_cast<int>(tid & 31);
    const int g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / heads, h = bh - b * heads;
    const int r0 = blockIdx.x * BWD_MMA_ROWS;
    const int n_rows = DKDV ? lk : lq, n_cols = DKDV ? lq : lk;

    const __nv_bfloat16 *qg = q + static_cast<size_t>(bh) * lq * D;
    const __nv_bfloat16 *kg = k + static_cast<size_t>(bh) * lk * D;
    const __nv_bfloat16 *vg = v + static_cast<size_t>(bh) * lk * D;
    const __nv_bfloat16 *og = g_out + (static_cast<size_t>(b) * lq * heads + h) * D;  // row i at og + i * heads * D
    const int ostride = heads * D;
    const __nv_bfloat16 *xg = DKDV ? kg : qg, *yg = DKDV ? vg : og, *ug = DKDV ? qg : kg, *wg = DKDV ? og : vg;
    const int ystride = DKDV ? D : ostride, ustride = D, wstride = DKDV ? ostride : D;
    const float *lse_bh = lse + static_cast<size_t>(bh) * lq, *delta_bh = delta + static_cast<size_t>(bh) * lq;

    // Layout: [X][Y][U0 W0][U1 W1], then for dkdv [lse0 delta0][lse1 delta1] (BN floats each).
    const uint32_t sx = smem_addr(smem), sy = sx + TILE_R, sst = sy + TILE_R, sld = sst + 4 * TILE_N;

    // Issues column tile j into stage j % 2 as one commit group.
    auto issue = [&](int j) {
        const int c0 = j * BN;
        const uint32_t su = sst + (j & 1) * 2 * TILE_N;
        load_tile<BN, D, NT>(su, ug + static_cast<size_t>(c0) * ustride, ustride, n_cols - c0, tid);
        load_tile<BN, D, NT>(su + TILE_N, wg + static_cast<size_t>(c0) * wstride, wstride, n_cols - c0, tid);
        if constexpr (DKDV) {
            if (tid < 2 * BN) {
                const int i = static_cast<int>(tid % BN);
                const float *src = (tid < BN ? lse_bh : delta_bh) + min(c0 + i, lq - 1);
                cp_async_4_zfill(sld + (j & 1) * 2 * BN * 4 + tid * 4, src, c0 + i < lq);
            }
        }
        cp_async_commit();
    };

    // With no column tile (lq = 0 for dkdv, lk = 0 for dq) nothing is loaded and zeros are stored:
    // no copy may still be in flight when the CTA exits.
    const int nt = (n_cols + BN - 1) / BN;
    if (nt > 0) {
        load_tile<BWD_MMA_ROWS, D, NT>(sx, xg + static_cast<size_t>(r0) * D, D, n_rows - r0, tid);
        load_tile<BWD_MMA_ROWS, D, NT>(sy, yg + static_cast<size_t>(r0) * ystride, ystride, n_rows - r0, tid);
        cp_async_commit();
        issue(0);
    }

    // ldmatrix sources, as the forward's (see swizzle_offsets): offa for the A operands and the
    // .trans B operands (row lane % 16, member lane / 16), offb for the plain B operands (row
    // (lane % 8) + 8 (lane / 16), member (lane / 8) % 2). Every such row has row % 8 == lane % 8.
    uint32_t offa[4], offb[4];
    swizzle_offsets((lane & 15) * (D * 2), (lane >> 4) ^ (lane & 7), offa);
    swizzle_offsets(((lane & 7) + ((lane >> 4) << 3)) * (D * 2), ((lane >> 3) & 1) ^ (lane & 7), offb);
    const uint32_t sxw = sx + warp * 16 * (D * 2), syw = sy + warp * 16 * (D * 2);

    // dq: lse (log2 units) and delta of the thread's rows g and g + 8; rows past lq get 0 (never stored).
    float lse_r[2] = {0.f, 0.f}, delta_r[2] = {0.f, 0.f};
    if constexpr (!DKDV) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int row = r0 + warp * 16 + g + 8 * hh;
            if (row < lq) {
                lse_r[hh] = lse_bh[row] * LOG2E;
                delta_r[hh] = delta_bh[row];
            }
        }
    }

    float acc[NACC][ND][4];
#pragma unroll
    for (int a = 0; a < NACC; ++a)
#pragma unroll
        for (int n = 0; n < ND; ++n) acc[a][n][0] = acc[a][n][1] = acc[a][n][2] = acc[a][n][3] = 0.f;

    for (int j = 0; j < nt; ++j) {
        cp_async_wait<0>();  // tile j (and, the first time, X and Y) landed for this thread
        __syncthreads();     // ... for every thread, and every warp is done with tile j - 1
        if (j + 1 < nt) issue(j + 1);
        const uint32_t su = sst + (j & 1) * 2 * TILE_N, sw = su + TILE_N;

        // S = X U^T, dP = Y W^T. Fragment pair p: columns 16 p.., chunks 2 kd, 2 kd + 1.
        float s[NS][4], dp[NS][4];
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[n][c] = dp[n][c] = 0.f;
#pragma unroll
        for (int kd = 0; kd < KD; ++kd) {
            uint32_t ax[4], ay[4];
            ldsm_x4(sxw + offa[kd & 3] + (kd >> 2) * 128, ax);
            ldsm_x4(syw + offa[kd & 3] + (kd >> 2) * 128, ay);
#pragma unroll
            for (int p = 0; p < NS / 2; ++p) {
                uint32_t bu[4], bw[4];
                ldsm_x4(su + offb[kd & 3] + p * 16 * D * 2 + (kd >> 2) * 128, bu);
                ldsm_x4(sw + offb[kd & 3] + p * 16 * D * 2 + (kd >> 2) * 128, bw);
                mma_bf16(s[2 * p], ax, bu[0], bu[1]);
                mma_bf16(s[2 * p + 1], ax, bu[2], bu[3]);
                mma_bf16(dp[2 * p], ay, bw[0], bw[1]);
                mma_bf16(dp[2 * p + 1], ay, bw[2], bw[3]);
            }
        }

        // Columns past the end only occur in the last tile.
        if ((j + 1) * BN > n_cols) {
#pragma unroll
            for (int n = 0; n < NS; ++n)
#pragma unroll
                for (int c = 0; c < 4; ++c)
                    if (j * BN + n * 8 + 2 * t + (c & 1) >= n_cols) s[n][c] = neg_inf();
        }

        // P into s, dS into dp.
#pragma unroll
        for (int n = 0; n < NS; ++n) {
            float2 lc = make_float2(0.f, 0.f), dc = make_float2(0.f, 0.f);
            if constexpr (DKDV) {
                const float *lsej = reinterpret_cast<const float *>(smem + 2 * TILE_R + 4 * TILE_N) + (j & 1) * 2 * BN;
                lc = *reinterpret_cast<const float2 *>(lsej + n * 8 + 2 * t);
                dc = *reinterpret_cast<const float2 *>(lsej + BN + n * 8 + 2 * t);
            }
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float l2 = DKDV ? ((c & 1) ? lc.y : lc.x) * LOG2E : lse_r[c >> 1];
                const float de = DKDV ? ((c & 1) ? dc.y : dc.x) : delta_r[c >> 1];
                const float p = fast_exp2(fmaf(s[n][c], scale_log2, -l2));
                s[n][c] = p;
                dp[n][c] = p * (dp[n][c] - de);
            }
        }

        // dkdv: dV += P W, dK += dS U; dq: dQ += dS U. U/W fragment pair p (.trans): columns
        // 16 ks.. of the tile, chunks 2 p, 2 p + 1.
#pragma unroll
        for (int ks = 0; ks < BN / 16; ++ks) {
            uint32_t ads[4];
            ads[0] = pack_bf16(dp[2 * ks][0], dp[2 * ks][1]);
            ads[1] = pack_bf16(dp[2 * ks][2], dp[2 * ks][3]);
            ads[2] = pack_bf16(dp[2 * ks + 1][0], dp[2 * ks + 1][1]);
            ads[3] = pack_bf16(dp[2 * ks + 1][2], dp[2 * ks + 1][3]);
            uint32_t ap[4];
            if constexpr (DKDV) {
                ap[0] = pack_bf16(s[2 * ks][0], s[2 * ks][1]);
                ap[1] = pack_bf16(s[2 * ks][2], s[2 * ks][3]);
                ap[2] = pack_bf16(s[2 * ks + 1][0], s[2 * ks + 1][1]);
                ap[3] = pack_bf16(s[2 * ks + 1][2], s[2 * ks + 1][3]);
            }
#pragma unroll
            for (int p = 0; p < D / 16; ++p) {
                const uint32_t off = offa[p & 3] + ks * 16 * D * 2 + (p >> 2) * 128;
                uint32_t bu[4];
                ldsm_x4_trans(su + off, bu);
                mma_bf16(acc[NACC - 1][2 * p], ads, bu[0], bu[1]);
                mma_bf16(acc[NACC - 1][2 * p + 1], ads, bu[2], bu[3]);
                if constexpr (DKDV) {
                    uint32_t bw[4];
                    ldsm_x4_trans(sw + off, bw);
                    mma_bf16(acc[0][2 * p], ap, bw[0], bw[1]);
                    mma_bf16(acc[0][2 * p + 1], ap, bw[2], bw[3]);
                }
            }
        }
    }

    // Row r0 + warp * 16 + g (+ 8) of dV, dK (dkdv; [B, H, Lk, D]) or dQ (dq; [B, H, Lq, D]): a quad
    // writes 16 contiguous bytes per row and n-tile. Stored once per CTA, so plain 4-byte stores.
#pragma unroll
    for (int a = 0; a < NACC; ++a) {
        __nv_bfloat16 *dst = a == NACC - 1 ? grad : gv;
        const float mul = a == NACC - 1 ? scale : 1.f;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int row = r0 + warp * 16 + g + 8 * hh;
            if (row >= n_rows) continue;
            __nv_bfloat16 *dr = dst + (static_cast<size_t>(bh) * n_rows + row) * D + 2 * t;
#pragma unroll
            for (int n = 0; n < ND; ++n)
                *reinterpret_cast<uint32_t *>(dr + n * 8) = pack_bf16(acc[a][n][2 * hh] * mul, acc[a][n][2 * hh + 1] * mul);
        }
    }
}

}  // namespace

#define BWD_MMA_KERNELS(D, BN_DKDV, BN_DQ)                                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * BWD_MMA_WARPS) attention_bwd_dkdv_mma_d##D(                           \
        const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k, const __nv_bfloat16 *__restrict__ v,       \
        const __nv_bfloat16 *__restrict__ g_out, const float *__restrict__ lse, const float *__restrict__ delta,             \
        __nv_bfloat16 *__restrict__ gk, __nv_bfloat16 *__restrict__ gv, int heads, int lq, int lk, float scale_log2,        \
        float scale) {                                                                                                       \
        flash_bwd<D, BN_DKDV, true>(q, k, v, g_out, lse, delta, gv, gk, heads, lq, lk, scale_log2, scale, attention_smem);  \
    }                                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * BWD_MMA_WARPS) attention_bwd_dq_mma_d##D(                             \
        const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k, const __nv_bfloat16 *__restrict__ v,       \
        const __nv_bfloat16 *__restrict__ g_out, const float *__restrict__ lse, const float *__restrict__ delta,             \
        __nv_bfloat16 *__restrict__ gq, int heads, int lq, int lk, float scale_log2, float scale) {                          \
        flash_bwd<D, BN_DQ, false>(q, k, v, g_out, lse, delta, nullptr, gq, heads, lq, lk, scale_log2, scale, attention_smem); \
    }

// D    BN (dkdv) BN (dq)
BWD_MMA_KERNELS(128, 32, 64)
BWD_MMA_KERNELS(64, 64, 64)

// ---- 5. Attention with an additive bias (the text encoders): attention_bias_bf16 ----------------
//
// softmax(scale Q K^T + bias) V with bias [H, Lq, Lk] (f32, shared by the batch): T5's
// relative-position bias (scale 1), CLIP's causal mask as -inf (scale 1 / sqrt(D)). It runs once per model import, on 77 or 512
// tokens, so it is the plain form rather than a flash kernel: one 128-thread CTA per (query row,
// head, batch) keeps the row's Lk scores in shared memory, takes their max and sum with block
// reductions, then each thread sums P V for its own output columns (coalesced V reads). Any head
// dim; the Rust side bounds Lk + D by the shared memory.

constexpr int AB_THREADS = 128;

// The block-wide max (or sum) of v, returned to every thread; `red` holds one slot per warp.
__device__ __forceinline__ float ab_block_reduce(float v, float *red, bool is_max) {
    v = is_max ? warp_max(v) : warp_sum(v);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // red may still be read by the previous reduction
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = red[0];
#pragma unroll
    for (int w = 1; w < AB_THREADS / 32; ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
    return r;
}

extern "C" __global__ void __launch_bounds__(AB_THREADS)
    attention_bias_bf16(const __nv_bfloat16 *__restrict__ q, const __nv_bfloat16 *__restrict__ k, const __nv_bfloat16 *__restrict__ v,
                        const float *__restrict__ bias, __nv_bfloat16 *__restrict__ out, int heads, int lq, int lk, int d, float scale) {
    extern __shared__ float ab_smem[];  // the query row [d], then the scores [lk]
    __shared__ float red[AB_THREADS / 32];
    float *qs = ab_smem, *s = ab_smem + d;
    const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const size_t pair = (size_t)b * heads + h;
    const __nv_bfloat16 *qr = q + (pair * lq + i) * d;
    const __nv_bfloat16 *kh = k + pair * lk * d, *vh = v + pair * lk * d;
    const float *br = bias + ((size_t)h * lq + i) * lk;
    for (int t = threadIdx.x; t < d; t += AB_THREADS) qs[t] = __bfloat162float(qr[t]);
    __syncthreads();
    float m = -INFINITY;
    for (int j = threadIdx.x; j < lk; j += AB_THREADS) {
        const __nv_bfloat16 *kr = kh + (size_t)j * d;
        float acc = 0.0f;
        for (int t = 0; t < d; ++t) acc += qs[t] * __bfloat162float(kr[t]);
        const float score = acc * scale + br[j];
        s[j] = score;
        m = fmaxf(m, score);
    }
    m = ab_block_reduce(m, red, true);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < lk; j += AB_THREADS) {
        const float e = expf(s[j] - m);  // a masked key: exp(-inf) = 0
        s[j] = e;
        sum += e;
    }
    const float inv = 1.0f / ab_block_reduce(sum, red, false);  // its barriers publish s
    __nv_bfloat16 *o = out + (((size_t)b * lq + i) * heads + h) * d;
    for (int t = threadIdx.x; t < d; t += AB_THREADS) {
        float acc = 0.0f;
        for (int j = 0; j < lk; ++j) acc += s[j] * __bfloat162float(vh[(size_t)j * d + t]);
        o[t] = __float2bfloat16(acc * inv);
    }
}
