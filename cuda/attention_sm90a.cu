// Attention forward for Hopper (sm_90a only): the same operation, layouts and numerics as the
// tensor-core kernels of attention.cu (q [B, H, Lq, D], k and v [B, H, Lk, D] bf16; out in the
// merged-head layout [B, Lq, H * D] bf16; optional lse [B, H, Lq] f32, natural log, null = skip;
// scale passed as scale_log2 = log2(e) / sqrt(D)), computed with the Hopper-only instructions:
// wgmma (warpgroup MMA, operands read by the tensor cores straight from shared memory) and TMA
// (cp.async.bulk.tensor: whole tiles copied by the copy engine, completion counted on an mbarrier).
// Nothing here has run on a GPU yet: the engine probes it against the portable kernel at start-up
// and the self-test checks it (`attention (sm90a)`) before it is trusted or timed.
//
// Kernels: attention_fwd_sm90a_d128 and attention_fwd_sm90a_d64 (flash_fwd_sm90a<D, BC = 128, 2>).
//
// ---- Tiling ---------------------------------------------------------------------------------------
// One CTA = one (batch, head) and BR = 128 query rows; 384 threads = 3 warpgroups:
//   warpgroup 0: producer. One thread issues every TMA copy (Q once, then K_j and V_j per key tile);
//                the other 127 threads leave at once.
//   warpgroups 1, 2: consumers, 64 query rows each (one wgmma M = 64 tile).
// Per key tile j of BC = 128 keys, each consumer warpgroup computes
//     S = Q K_j^T        wgmma m64n{BC}k16, A = Q and B = K_j from shared memory, D / 16 k-steps
//     online softmax     exactly as attention.cu (raw-score max, exp2 with the scale folded in,
//                        rescale of O skipped when no row of the warp raised its max)
//     O += bf16(P) V_j   wgmma m64n{D}k16, A = P from registers, B = V_j from shared memory, BC / 16
//                        k-steps
// and ends with O / l staged through shared memory (its own rows of the Q tile, dead by then) for
// 16-byte coalesced stores into the merged layout, as attention.cu does.
//
// ---- Pipeline -------------------------------------------------------------------------------------
// STAGES = 2 buffers each for K and V. mbarriers (PTX ISA 9.7.13.15): q_full, k_full[s], v_full[s]
// (arrival count 1: the producer's arrive.expect_tx, plus the bytes of the copies, PTX ISA
// 9.7.13.15.11) and k_empty[s], v_empty[s] (arrival count 8: lane 0 of every consumer warp, after
// wgmma.wait_group has retired the MMAs that read the buffer). Fill n of stage s (tile j = n STAGES
// + s) waits for phase n - 1 of its empty barrier; a consumer waits for phase n of the full barrier
// (try_wait.parity with parity n & 1, PTX ISA 9.7.13.15.16). K and V have separate barriers so that
// S = Q K_j^T starts while V_j is still in flight, and K_j's buffer is refilled while P V_j runs.
// The two consumer warpgroups are not synchronised with each other: while one does its softmax,
// the other's MMAs keep the tensor cores busy.
//
// ---- Shared memory (dynamic, rounded up to a 1024-byte boundary at run time) ------------------------
// Every tile is stored as D / 64 panels of [rows][64] bf16: one 128-byte row per tile row,
// which is exactly one TMA box {64, rows, 1} with CU_TENSOR_MAP_SWIZZLE_128B (the box's inner
// extent may not exceed the swizzle span, cuTensorMapEncodeTiled). In that swizzle the 16-byte
// chunk c of row r lands at chunk c ^ (r % 8), relative to a 1024-byte-aligned base: the
// Swizzle<3,4,3> of the wgmma 128-byte swizzle atoms (PTX ISA 9.7.15.5.1.2, Table 38 and the
// canonical layouts), so the tensor cores read what TMA wrote without any reshuffling.
//     Q: BR x D (32 KiB at D = 128), K: STAGES x BC x D, V: STAGES x BC x D (64 KiB each)
// 161 KiB at D = 128 (with the 1 KiB alignment slack), 81 KiB at D = 64: one CTA per SM.
// Tails: the tensor maps are 3-D {D, L, B H}, so rows past Lq or Lk of a head are outside the
// tensor and TMA fills them with zeros (CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE); their expected byte
// count is still the whole box. Scores of keys >= Lk are set to -inf (P = 0) as in attention.cu;
// rows >= Lq are computed from zeros and never stored.
//
// ---- Matrix descriptors (PTX ISA 9.7.15.5.1.2.2) ----------------------------------------------------
// 64 bits: [0, 14) start address >> 4, [16, 30) leading-dimension byte offset (LBO) >> 4,
// [32, 46) stride-dimension byte offset (SBO) >> 4, [49, 52) base offset = 0 (every swizzle
// pattern starts on a 1024-byte boundary), [62, 64) swizzle mode = 1 (128-byte).
//   Q and K (K-major, imm-trans = 0; canonical Swizzle<3,4,3> o ((8,m),(T,2k)):((8T,SBO),(1,T)),
//     PTX ISA 9.7.15.5.1.2.1.3): SBO = 1024 (8 rows of 128 bytes), LBO unused for swizzled K-major
//     layouts ("assumed 1", 9.7.15.5.1.2.1.1) and encoded as 1. k-step kd of 16 columns starts
//     at panel kd / 4, byte 32 (kd % 4) of the row: the swizzle is applied by the hardware
//     to the computed address bits, so stepping inside a 128-byte span is a plain address offset.
//   V (MN-major: B[k][n] = V[key][d] with d contiguous, imm-trans-b = 1; canonical
//     Swizzle<3,4,3> o ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))): 64 d-columns per swizzle atom, the
//     next 64 columns (the next panel) at LBO = BC * 128 bytes; 8 keys per atom, the next 8
//     keys at SBO = 1024. k-step ks (16 keys) starts at row 16 ks, byte 2048 ks.
//
// ---- Register fragments (PTX ISA 9.7.15.5.1.1.1, Figures 148 and 149) --------------------------------
// Warp w of a warpgroup owns rows 16 w .. 16 w + 15 of the m64 tile; with g = lane / 4, t = lane % 4
// the f32 accumulator d[4 n + c] is row 16 w + g + 8 (c / 2), column 8 n + 2 t + (c % 2), and the
// bf16 A fragment's four 32-bit registers are (row g, cols 2t, 2t+1), (g + 8, 2t..), (g, 2t+8..),
// (g + 8, 2t+8..): the mma.m16n8k16 layouts of attention.cu, one m16 tile per warp. P for k-step
// ks is thus packed from the S accumulators of n-tiles 2 ks and 2 ks + 1 with no data movement,
// and the row max / sum need only the quad shuffles (xor 1, 2).
//
// ---- Register budget ------------------------------------------------------------------------------
// Consumer thread at D = 128: O 64 + S 64 f32 (P's 32 registers take S's place once S is packed),
// plus m, l and addresses: ptxas allocates 154 (122 at D = 64), under the 168 that
// __launch_bounds__(384, 1) leaves each thread (65,536 / 384, rounded down to a multiple of 8),
// with no spills. So no setmaxnreg re-split (producer down, consumers up) is needed; a wider key
// tile (BC = 192 or 256, S +32 or +64) would need one.
//
// Ordering: wgmma.fence before the first MMA of each batch (the accumulators were written by
// ordinary instructions: the O rescale, the reuse of S), wgmma.commit_group + wait_group 0 before
// the results are read (PTX ISA 9.7.15.7). fence_regs pins every accumulator read and write of the
// compiler's schedule to its side of those asm statements. mbarrier.init is made visible to the
// copy engine with fence.mbarrier_init before the first copy.
#include <cuda.h>  // CUtensorMap (the type of the __grid_constant__ parameters only)

#include "flash.cuh"

namespace {

// ---- mbarrier (PTX ISA 9.7.13.15) ----

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// One arrival that also announces `bytes` of copies completing on this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Until the phase with this parity has completed (acquire: what the copies or the arriving
// threads wrote before it is visible afterwards). A phase that never completes (copies that
// deliver fewer bytes than announced, a miscounted barrier) would hang the GPU and the process;
// after 2^28 polls (seconds: try_wait suspends between polls) the kernel traps instead, which the
// host sees as a failed launch.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    for (uint32_t polls = 0;; ++polls) {
        uint32_t done;
        asm volatile(
            "{\n.reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
        if (done) return;
        if (polls == (1u << 28)) __trap();
    }
}

// ---- TMA (PTX ISA 9.7.9.25.5.2) ----

// The box of the 3-D tensor map at element coordinates {c0, c1, c2} into shared memory at dst,
// completing `box bytes` on the mbarrier.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap *map, uint32_t bar, int c0, int c1, int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}

// ---- wgmma (PTX ISA 9.7.15) ----

// See the header: 128-byte swizzle, base offset 0.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
           (static_cast<uint64_t>(sbo >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

template <int R>
__device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define ACC8(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define ACC32(d) ACC8(d, 0), ACC8(d, 8), ACC8(d, 16), ACC8(d, 24)
#define ACC64(d) ACC32(d), ACC8(d, 32), ACC8(d, 40), ACC8(d, 48), ACC8(d, 56)
#define REGS32                                                                                                                   \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, " \
    "%26, %27, %28, %29, %30, %31}"
#define REGS64                                                                                                                   \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, " \
    "%26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, "   \
    "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// d (+)= A B for m64nNk16, bf16 in, f32 accumulate, A and B K-major in shared memory (the S
// product: scale-d = 0 on the first k-step overwrites the previous tile's scores).
template <int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, bool accumulate);

template <>
__device__ __forceinline__ void wgmma_ss<128>(float (&d)[64], uint64_t a, uint64_t b, bool accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " REGS64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : ACC64(d)
        : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
}

// d += A B for m64nNk16, A (4 registers of bf16 pairs) from registers, B MN-major in shared
// memory (imm-trans-b = 1: the P V product, V rows are keys with d contiguous).
template <int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b);

template <>
__device__ __forceinline__ void wgmma_rs<128>(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " REGS64 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : ACC64(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

template <>
__device__ __forceinline__ void wgmma_rs<64>(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " REGS32 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : ACC32(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

constexpr int SM90A_THREADS = 384;   // producer warpgroup + 2 consumer warpgroups
constexpr int SM90A_ROWS = 128;      // query rows per CTA (64 per consumer warpgroup)
constexpr int CONSUMER_WARPS = 8;    // arrivals on each empty barrier
constexpr uint32_t SPAN = 128;       // bytes of one tile row in one panel (the swizzle span)
constexpr uint32_t ATOM = 8 * SPAN;  // one swizzle pattern: 8 rows
constexpr int SM90A_STAGES = 2;      // K/V buffers each
constexpr int SM90A_BARRIERS = 1 + 4 * SM90A_STAGES;  // q_full, then k_full, v_full, k_empty, v_empty per stage

template <int D, int BC, int STAGES>
__device__ __forceinline__ void flash_fwd_sm90a(const CUtensorMap *tq, const CUtensorMap *tk, const CUtensorMap *tv,
                                                __nv_bfloat16 *__restrict__ out, float *__restrict__ lse, int heads, int lq, int lk,
                                                float scale_log2, unsigned char *smem, uint64_t *bars) {
    constexpr int BR = SM90A_ROWS;
    constexpr int DH = D / 64;               // 64-column panels (one swizzle span each)
    constexpr int ND = D / 8, NS = BC / 8;   // n-tiles of O and S
    constexpr uint32_t PANEL_Q = BR * SPAN, PANEL_KV = BC * SPAN;
    constexpr uint32_t Q_BYTES = DH * PANEL_Q, KV_BYTES = DH * PANEL_KV;
    static_assert(D % 64 == 0 && BC % 16 == 0 && BC <= 256, "tile shapes of the TMA boxes and wgmma");

    static_assert(STAGES == SM90A_STAGES, "the kernels declare SM90A_BARRIERS barriers");
    const uint32_t q_full = smem_addr(bars);
    auto k_full = [&](int s) { return q_full + 8 * (1 + s); };
    auto v_full = [&](int s) { return q_full + 8 * (1 + STAGES + s); };
    auto k_empty = [&](int s) { return q_full + 8 * (1 + 2 * STAGES + s); };
    auto v_empty = [&](int s) { return q_full + 8 * (1 + 3 * STAGES + s); };

    const uint32_t raw = smem_addr(smem);
    const uint32_t sq = (raw + ATOM - 1) & ~(ATOM - 1);
    const uint32_t sk = sq + Q_BYTES, sv = sk + STAGES * KV_BYTES;
    unsigned char *stage_out = smem + (sq - raw);  // generic pointer to the Q tile, for the epilogue

    const int tid = static_cast<int>(threadIdx.x), warp = tid >> 5, lane = tid & 31;
    const int bh = blockIdx.y, q0 = blockIdx.x * BR;
    const int nt = (lk + BC - 1) / BC;

    if (tid == 0) {
        mbar_init(q_full, 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(k_full(s), 1);
            mbar_init(v_full(s), 1);
            mbar_init(k_empty(s), CONSUMER_WARPS);
            mbar_init(v_empty(s), CONSUMER_WARPS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (warp < 4) {
        // Producer.
        if (tid == 0) {
            mbar_arrive_expect_tx(q_full, Q_BYTES);
            for (int hf = 0; hf < DH; ++hf) tma_load_3d(sq + hf * PANEL_Q, tq, q_full, 64 * hf, q0, bh);
            for (int j = 0; j < nt; ++j) {
                const int s = j % STAGES;
                const uint32_t use = static_cast<uint32_t>(j / STAGES);
                if (use > 0) mbar_wait(k_empty(s), (use - 1) & 1);
                mbar_arrive_expect_tx(k_full(s), KV_BYTES);
                for (int hf = 0; hf < DH; ++hf) tma_load_3d(sk + s * KV_BYTES + hf * PANEL_KV, tk, k_full(s), 64 * hf, j * BC, bh);
                if (use > 0) mbar_wait(v_empty(s), (use - 1) & 1);
                mbar_arrive_expect_tx(v_full(s), KV_BYTES);
                for (int hf = 0; hf < DH; ++hf) tma_load_3d(sv + s * KV_BYTES + hf * PANEL_KV, tv, v_full(s), 64 * hf, j * BC, bh);
            }
        }
    } else {
        // Consumers: warpgroup cw owns CTA rows [64 cw, 64 cw + 64), its warp wi rows 16 wi.. of those.
        const int cw = (warp >> 2) - 1, wi = warp & 3;
        const int g = lane >> 2, t = lane & 3;
        const uint32_t qa = sq + cw * 64 * SPAN;

        float o[D / 2], s[BC / 2];
        float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] = 0.f;

        mbar_wait(q_full, 0);
        for (int j = 0; j < nt; ++j) {
            const int st = j % STAGES;
            const uint32_t parity = static_cast<uint32_t>(j / STAGES) & 1;
            const uint32_t kt = sk + st * KV_BYTES, vt = sv + st * KV_BYTES;

            // S = Q K_j^T.
            mbar_wait(k_full(st), parity);
            fence_regs(s);
            wgmma_fence();
#pragma unroll
            for (int kd = 0; kd < D / 16; ++kd) {
                const uint32_t col = (kd & 3) * 32;  // byte offset of the k-step inside the 128-byte span
                wgmma_ss<BC>(s, smem_desc(qa + (kd >> 2) * PANEL_Q + col, 16, ATOM), smem_desc(kt + (kd >> 2) * PANEL_KV + col, 16, ATOM),
                             kd > 0);
            }
            wgmma_commit();
            wgmma_wait_all();
            fence_regs(s);
            if (lane == 0) mbar_arrive(k_empty(st));

            // Keys past the end of K only occur in the last tile.
            if ((j + 1) * BC > lk) {
#pragma unroll
                for (int n = 0; n < NS; ++n)
#pragma unroll
                    for (int c = 0; c < 4; ++c)
                        if (j * BC + n * 8 + 2 * t + (c & 1) >= lk) s[4 * n + c] = neg_inf();
            }

            // Online softmax; hh = 0 is row g (c = 0, 1), hh = 1 row g + 8 (c = 2, 3).
            float corr[2];
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                float mx = m[hh];
#pragma unroll
                for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * hh], s[4 * n + 2 * hh + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                corr[hh] = fast_exp2((m[hh] - mx) * scale_log2);  // 0 on the first tile
                const float mxs = mx * scale_log2;
                m[hh] = mx;
                float rs = 0.f;
#pragma unroll
                for (int n = 0; n < NS; ++n) {
#pragma unroll
                    for (int c = 2 * hh; c < 2 * hh + 2; ++c) {
                        const float p = fast_exp2(fmaf(s[4 * n + c], scale_log2, -mxs));
                        s[4 * n + c] = p;
                        rs += p;
                    }
                }
                l[hh] = l[hh] * corr[hh] + rs;
            }
            if (__any_sync(0xffffffffu, (corr[0] != 1.f) | (corr[1] != 1.f))) {
#pragma unroll
                for (int n = 0; n < ND; ++n) {
                    o[4 * n] *= corr[0];
                    o[4 * n + 1] *= corr[0];
                    o[4 * n + 2] *= corr[1];
                    o[4 * n + 3] *= corr[1];
                }
            }
            uint32_t p[BC / 16][4];
#pragma unroll
            for (int ks = 0; ks < BC / 16; ++ks) {
                p[ks][0] = pack_bf16(s[8 * ks], s[8 * ks + 1]);
                p[ks][1] = pack_bf16(s[8 * ks + 2], s[8 * ks + 3]);
                p[ks][2] = pack_bf16(s[8 * ks + 4], s[8 * ks + 5]);
                p[ks][3] = pack_bf16(s[8 * ks + 6], s[8 * ks + 7]);
            }

            // O += P V_j.
            mbar_wait(v_full(st), parity);
            fence_regs(o);
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < BC / 16; ++ks) wgmma_rs<D>(o, p[ks], smem_desc(vt + ks * 2 * ATOM, PANEL_KV, ATOM));
            wgmma_commit();
            wgmma_wait_all();
            fence_regs(o);
            if (lane == 0) mbar_arrive(v_empty(st));
        }

        // Epilogue: O / l into this warp's own 16 rows of the Q tile (same swizzled panels), then
        // 16-byte stores of whole rows. The warpgroup's last MMA retired after every warp of it
        // had finished its S product, so no MMA reads these rows of Q any more.
        const int b = bh / heads, h = bh - b * heads;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float lt = l[hh];
            lt += __shfl_xor_sync(0xffffffffu, lt, 1);
            lt += __shfl_xor_sync(0xffffffffu, lt, 2);
            const float inv = lt > 0.f ? __fdividef(1.f, lt) : 0.f;
            const int r = cw * 64 + wi * 16 + g + 8 * hh;
#pragma unroll
            for (int n = 0; n < ND; ++n)
                *reinterpret_cast<uint32_t *>(stage_out + (n >> 3) * PANEL_Q + r * SPAN + (((n & 7) ^ (r & 7)) << 4) + 4 * t) =
                    pack_bf16(o[4 * n + 2 * hh] * inv, o[4 * n + 2 * hh + 1] * inv);
            if (lse != nullptr && t == 0 && q0 + r < lq)
                lse[static_cast<size_t>(bh) * lq + q0 + r] = lt > 0.f ? (m[hh] * scale_log2 + __log2f(lt)) * LN2 : neg_inf();
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < 16 * ND / 32; ++i) {
            const int c = lane + 32 * i;
            const int r = cw * 64 + wi * 16 + c / ND, ch = c % ND;
            if (q0 + r < lq) {
                const uint4 val = load16(stage_out + (ch >> 3) * PANEL_Q + r * SPAN + (((ch & 7) ^ (r & 7)) << 4));
                store16(out + ((static_cast<size_t>(b) * lq + q0 + r) * heads + h) * D + ch * 8, val);
            }
        }
    }
}

}  // namespace

extern __shared__ __align__(128) unsigned char attention_sm90a_smem[];

#define SM90A_KERNEL(name, D)                                                                                               \
    extern "C" __global__ void __launch_bounds__(SM90A_THREADS, 1)                                                           \
        name(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk, const __grid_constant__ CUtensorMap tv, \
             __nv_bfloat16 *__restrict__ out, float *__restrict__ lse, int heads, int lq, int lk, float scale_log2) {          \
        /* Declared here, not in the anonymous namespace: the PTX name of a static shared variable there */              \
        /* carries a hash of the source path, and the committed PTX must not depend on the checkout. */                 \
        __shared__ __align__(8) uint64_t bars[SM90A_BARRIERS];                                                               \
        flash_fwd_sm90a<D, 128, SM90A_STAGES>(&tq, &tk, &tv, out, lse, heads, lq, lk, scale_log2, attention_sm90a_smem, bars); \
    }

SM90A_KERNEL(attention_fwd_sm90a_d128, 128)
SM90A_KERNEL(attention_fwd_sm90a_d64, 64)
