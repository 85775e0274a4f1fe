// The Sobolev operator of design.md section 6 and the fused S-DPO loss of section 7, on batches of
// f32 residual fields. The CPU twins are engine/src/train/sobolev.rs (`Sobolev`) and
// engine/src/train/loss.rs (`sdpo_step`); the self-test compares the two.
//
// sobolev_apply: one block per (field, plane), the plane being one channel of one item on the
//   spectral grid [C, H, W]. The orthonormal 2-D DCT-II is two dense matrix products,
//   R = D_H r D_W^T, done in shared memory (the plane and one intermediate, 2 H W floats) with the
//   cosine tables read through L1 from global memory (D_H, D_W and D_W^T, each laid out so that
//   consecutive threads read consecutive or identical addresses). No FFT: the grids are small
//   (H, W <= 128, the launcher refuses more), and a matrix product has no reindexing. Then, per
//   coefficient, the plane's energy sum lambda R^2 (f64, as the CPU) and the weighted spectrum
//   w . R, and the inverse D_H^T (w . R) D_W written to the output. One kernel serves every
//   use through its weight table w: the precision (lambda), the covariance (1/lambda), colored
//   noise (lambda^-1/2, on white noise) and the energy gradient ((2/N) lambda). A null energy
//   table skips the energy; a null output skips the inverse transform for that field.
//   The spectral grid of a PixelShuffle(f) latent is the image grid: element (c, Y, X) of an item
//   is read from (and the output written to) latent channel (c f + Y % f) f + X % f, row Y / f,
//   column X / f, a gather folded into the load and the store (f = 1: the plain layout).
//   Up to 4 fields per launch (blockIdx.y), so the four residuals of S-DPO take one launch.
//
// sdpo_objective (one block): the pairs' four energies from the plane sums, dE, the loss, the
//   accuracy, the reward margin and d loss / d E(r^w_theta) per pair, in f64 as the CPU. The
//   sums over pairs run in pair order on one thread, so they are the CPU's sums.
// sdpo_scale_grads: grad_w *= a_i, grad_l *= -a_i per pair i. The energy gradients (2/N) L r
//   come out of sobolev_apply before a_i is known (it needs every plane of the pair's four
//   fields), so the scale is a second pass over the two gradients.
#include "reduce_f64.cuh"

constexpr int SOBOLEV_THREADS = 256;
constexpr int SOBOLEV_MAX_FIELDS = 4;

// `SobolevFields` in engine/src/backend/cuda/sobolev.rs: up to four inputs and their outputs
// (null: none for that field).
struct SobolevFields {
    const float *in[SOBOLEV_MAX_FIELDS];
    float *out[SOBOLEV_MAX_FIELDS];
};

// Offset within an item of spectral element (c, y, x), the item stored on the latent grid of a
// PixelShuffle(f) autoencoder, [C f f, H / f, W / f].
__device__ __forceinline__ int sobolev_offset(int c, int y, int x, int H, int W, int f) {
    const int channel = (c * f + y % f) * f + x % f;
    return (channel * (H / f) + y / f) * (W / f) + x / f;
}

// dst(r, s) = sum_k a[r * a_row + k * a_k] b[k * cols + s] for r < rows, s < cols, handed to
// `store(index, value)`; threads take consecutive s, so b is read along its rows.
template <typename Store>
__device__ __forceinline__ void sobolev_pass(const float *a, int a_row, int a_k, const float *b, int rows, int cols, int depth,
                                             Store store) {
    for (int o = threadIdx.x; o < rows * cols; o += blockDim.x) {
        const int r = o / cols, s = o % cols;
        float acc = 0.0f;
        for (int k = 0; k < depth; ++k) acc = fmaf(a[r * a_row + k * a_k], b[k * cols + s], acc);
        store(o, acc);
    }
}

extern "C" __global__ void __launch_bounds__(SOBOLEV_THREADS)
    sobolev_apply(SobolevFields fields, const float *__restrict__ dct_h, const float *__restrict__ dct_w,
                  const float *__restrict__ dct_w_t, const float *__restrict__ energy_weights, const float *__restrict__ out_weights,
                  double *__restrict__ plane_energy, int planes, int channels, int H, int W, int shuffle) {
    extern __shared__ float sobolev_smem[];
    __shared__ double red[SOBOLEV_THREADS / 32];
    float *plane = sobolev_smem;       // [H, W]: the field, then its spectrum
    float *half = sobolev_smem + H * W;  // [H, W]: the product along one axis
    const int field = blockIdx.y, p = blockIdx.x;
    const int c = p % channels;
    const size_t item = (size_t)(p / channels) * channels * H * W;
    // Selected by unrolled comparison: indexing the parameter struct by blockIdx.y would copy it
    // to the stack.
    const float *in = nullptr;
    float *out = nullptr;
#pragma unroll
    for (int k = 0; k < SOBOLEV_MAX_FIELDS; ++k) {
        if (k == field) {
            in = fields.in[k] + item;
            out = fields.out[k];
        }
    }

    for (int o = threadIdx.x; o < H * W; o += blockDim.x) plane[o] = in[sobolev_offset(c, o / W, o % W, H, W, shuffle)];
    __syncthreads();
    // Forward: half = plane D_W^T, then plane = D_H half.
    sobolev_pass(plane, W, 1, dct_w_t, H, W, W, [&](int o, float v) { half[o] = v; });
    __syncthreads();
    sobolev_pass(dct_h, H, 1, half, H, W, H, [&](int o, float v) { plane[o] = v; });
    __syncthreads();

    double energy = 0.0;
    for (int o = threadIdx.x; o < H * W; o += blockDim.x) {
        const float r = plane[o];
        if (energy_weights) energy += (double)energy_weights[o] * ((double)r * (double)r);
        if (out) plane[o] = r * out_weights[o];
    }
    if (energy_weights) {
        energy = block_sum_f64(energy, red);
        if (threadIdx.x == 0) plane_energy[(size_t)field * planes + p] = energy;
    }
    if (!out) return;  // uniform over the block
    __syncthreads();
    // Inverse: half = D_H^T plane, then out = half D_W.
    sobolev_pass(dct_h, 1, H, plane, H, W, H, [&](int o, float v) { half[o] = v; });
    __syncthreads();
    out += item;
    sobolev_pass(half, W, 1, dct_w, H, W, W,
                 [&](int o, float v) { out[sobolev_offset(c, o / W, o % W, H, W, shuffle)] = v; });
}

__device__ __forceinline__ double sdpo_softplus(double z) { return fmax(z, 0.0) + log1p(exp(-fabs(z))); }

__device__ __forceinline__ double sdpo_sigmoid(double z) {
    if (z >= 0.0) return 1.0 / (1.0 + exp(-z));
    const double e = exp(z);
    return e / (1.0 + e);
}

// plane_energy [4, pairs * channels] in the order policy winner, reference winner, policy loser,
// reference loser; writes pair_energy [4, pairs] (E = plane sum / n), winner_grad [pairs] and
// summary = [loss, accuracy, reward margin].
extern "C" __global__ void sdpo_objective(const double *__restrict__ plane_energy, int pairs, int channels, double n, double beta,
                                          double *__restrict__ pair_energy, double *__restrict__ winner_grad,
                                          double *__restrict__ summary) {
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        double e[4];
        for (int k = 0; k < 4; ++k) {
            double sum = 0.0;
            for (int c = 0; c < channels; ++c) sum += plane_energy[((size_t)k * pairs + i) * channels + c];
            e[k] = sum / n;
            pair_energy[(size_t)k * pairs + i] = e[k];
        }
        const double logit = 0.5 * beta * ((e[0] - e[1]) - (e[2] - e[3]));
        winner_grad[i] = 0.5 * beta * sdpo_sigmoid(logit) / pairs;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    double loss = 0.0, logits = 0.0;
    int wins = 0;
    for (int i = 0; i < pairs; ++i) {
        const double delta = (pair_energy[i] - pair_energy[pairs + i]) - (pair_energy[2 * pairs + i] - pair_energy[3 * pairs + i]);
        const double logit = 0.5 * beta * delta;
        loss += sdpo_softplus(logit);
        logits += logit;
        wins += delta < 0.0;
    }
    summary[0] = loss / pairs;
    summary[1] = (double)wins / pairs;
    summary[2] = -logits / pairs;
}

extern "C" __global__ void sdpo_scale_grads(float *__restrict__ grad_winner, float *__restrict__ grad_loser,
                                            const double *__restrict__ winner_grad, int per_pair, int total) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const float a = (float)winner_grad[i / per_pair];
    grad_winner[i] *= a;
    grad_loser[i] *= -a;
}
