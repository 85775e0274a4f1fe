// AdamW over the f32 master parameters of many tensors (the LoRA factors: hundreds of small
// tensors per model), with clipping on the global gradient norm. The CPU twin is
// engine/src/train/adamw.rs; the self-test compares the two.
//
// Design decisions:
// - Multi-tensor launches. The tensors are described by a device table of 4 pointers each
//   (param, m, v, grad) and a prefix sum of their block counts; block b finds its tensor by
//   binary search over that prefix, so one launch covers every tensor whatever their number.
//   Each block owns a chunk of ADAM_CHUNK consecutive elements of one tensor.
// - Three launches, no host round trip and no atomics, so the step is deterministic:
//   1. adamw_grad_sq_partial: each block's sum of g^2 (f64, as the CPU) into a scratch;
//   2. adamw_grad_norm_finalize: one block sums the partials in a fixed order and writes
//      stats = [norm, clip], clip = max_norm / norm when norm > max_norm, else 1 (max_norm < 0
//      means no clipping);
//   3. adamw_update: the update of every element, the gradient multiplied by stats[1].
// - A non-finite norm leaves every parameter and moment untouched (the CPU refuses the step);
//   the host reads stats[0] to report it.
// - Per element the arithmetic is f32 (the CPU uses f64: the difference is a rounding of the
//   result), with the step's scalars (bias corrections, 1 - beta) formed in f64 on the host.
#include "reduce_f64.cuh"

constexpr int ADAM_THREADS = 256;
constexpr int ADAM_PER_THREAD = 8;
constexpr int ADAM_CHUNK = ADAM_THREADS * ADAM_PER_THREAD;  // elements per block
constexpr int ADAM_FINALIZE_THREADS = 1024;

// Pointers of tensor t: table[4 t + {0, 1, 2, 3}] = param, m, v, grad.
enum { ADAM_PARAM = 0, ADAM_M = 1, ADAM_V = 2, ADAM_GRAD = 3 };

// The step's scalars, formed on the host (`AdamWScalars` in engine/src/backend/cuda/optim.rs).
struct AdamWScalars {
    float lr;
    float beta1, beta2;
    float one_minus_beta1, one_minus_beta2;
    float inv_bias1;       // 1 / (1 - beta1^k)
    float inv_sqrt_bias2;  // 1 / sqrt(1 - beta2^k)
    float eps;
    float weight_decay;
};

// The tensor of block b: the last t with first_block[t] <= b (first_block has tensors + 1 entries).
__device__ __forceinline__ int adam_tensor_of_block(const int *__restrict__ first_block, int tensors, int b) {
    int lo = 0, hi = tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (first_block[mid] <= b) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

extern "C" __global__ void __launch_bounds__(ADAM_THREADS)
    adamw_grad_sq_partial(const unsigned long long *__restrict__ table, const long long *__restrict__ sizes,
                          const int *__restrict__ first_block, int tensors, double *__restrict__ partial) {
    __shared__ double red[ADAM_THREADS / 32];
    const int t = adam_tensor_of_block(first_block, tensors, blockIdx.x);
    const float *g = reinterpret_cast<const float *>(table[4 * t + ADAM_GRAD]);
    const long long n = sizes[t];
    const long long base = (long long)(blockIdx.x - first_block[t]) * ADAM_CHUNK + threadIdx.x;
    double sum = 0.0;
#pragma unroll
    for (int k = 0; k < ADAM_PER_THREAD; ++k) {
        const long long i = base + k * ADAM_THREADS;
        if (i < n) {
            const double gi = g[i];
            sum += gi * gi;
        }
    }
    sum = block_sum_f64(sum, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

extern "C" __global__ void __launch_bounds__(ADAM_FINALIZE_THREADS)
    adamw_grad_norm_finalize(const double *__restrict__ partial, int blocks, double max_norm, double *__restrict__ stats) {
    __shared__ double red[ADAM_FINALIZE_THREADS / 32];
    double sum = 0.0;
    for (int i = threadIdx.x; i < blocks; i += blockDim.x) sum += partial[i];
    sum = block_sum_f64(sum, red);
    if (threadIdx.x == 0) {
        const double norm = sqrt(sum);
        stats[0] = norm;
        stats[1] = (max_norm >= 0.0 && norm > max_norm) ? max_norm / norm : 1.0;
    }
}

extern "C" __global__ void __launch_bounds__(ADAM_THREADS)
    adamw_update(const unsigned long long *__restrict__ table, const long long *__restrict__ sizes,
                 const int *__restrict__ first_block, int tensors, const double *__restrict__ stats, AdamWScalars s) {
    const double norm = stats[0];
    if (!isfinite(norm)) return;
    const float clip = (float)stats[1];
    const int t = adam_tensor_of_block(first_block, tensors, blockIdx.x);
    float *p = reinterpret_cast<float *>(table[4 * t + ADAM_PARAM]);
    float *m = reinterpret_cast<float *>(table[4 * t + ADAM_M]);
    float *v = reinterpret_cast<float *>(table[4 * t + ADAM_V]);
    const float *g = reinterpret_cast<const float *>(table[4 * t + ADAM_GRAD]);
    const long long n = sizes[t];
    const long long base = (long long)(blockIdx.x - first_block[t]) * ADAM_CHUNK + threadIdx.x;
#pragma unroll
    for (int k = 0; k < ADAM_PER_THREAD; ++k) {
        const long long i = base + k * ADAM_THREADS;
        if (i < n) {
            const float gi = g[i] * clip;
            const float mi = s.beta1 * m[i] + s.one_minus_beta1 * gi;
            const float vi = s.beta2 * v[i] + s.one_minus_beta2 * gi * gi;
            const float update = (mi * s.inv_bias1) / (sqrtf(vi) * s.inv_sqrt_bias2 + s.eps);
            const float pi = p[i];
            p[i] = pi - s.lr * (update + s.weight_decay * pi);
            m[i] = mi;
            v[i] = vi;
        }
    }
}
