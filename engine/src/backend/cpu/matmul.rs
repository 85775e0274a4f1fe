//! f32 matrix products on the CPU through the `gemm` crate (packed, SIMD, rayon-parallel).

use gemm::Parallelism;

/// How the right-hand operand of a product is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rhs {
    /// `[n, k]` row-major, used as its transpose: a PyTorch linear weight, or K in `Q K^T`.
    Transposed,
    /// `[k, n]` row-major: V in `P V`.
    Normal,
}

/// `dst[m, n] = lhs[m, k] @ rhs (+ dst when accumulate)`, all row-major and contiguous.
#[allow(clippy::too_many_arguments)]
pub fn matmul(dst: &mut [f32], lhs: &[f32], rhs: &[f32], m: usize, n: usize, k: usize, rhs_layout: Rhs, accumulate: bool, parallel: bool) {
    assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= n * k, "matmul operands too short for {m}x{n}x{k}");
    let (rhs_cs, rhs_rs) = match rhs_layout {
        Rhs::Transposed => (k as isize, 1),
        Rhs::Normal => (1, n as isize),
    };
    let parallelism = if parallel { Parallelism::Rayon(rayon::current_num_threads()) } else { Parallelism::None };
    // SAFETY: the assert above bounds every index the strides below can reach; dst does not
    // alias lhs or rhs (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(lhs: &[f32], rhs: &[f32], m: usize, n: usize, k: usize, layout: Rhs) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let r = match layout {
                        Rhs::Transposed => rhs[j * k + p],
                        Rhs::Normal => rhs[p * n + j],
                    };
                    s += lhs[i * k + p] as f64 * r as f64;
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    #[test]
    fn matches_naive_product_on_odd_shapes() {
        for &(m, n, k) in &[(1, 1, 1), (7, 13, 5), (33, 65, 129), (130, 3, 64)] {
            let lhs: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let rhs: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 31.0).collect();
            for layout in [Rhs::Transposed, Rhs::Normal] {
                for accumulate in [false, true] {
                    for parallel in [false, true] {
                        let init: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 - 3.0).collect();
                        let mut dst = init.clone();
                        matmul(&mut dst, &lhs, &rhs, m, n, k, layout, accumulate, parallel);
                        let want = naive(&lhs, &rhs, m, n, k, layout);
                        for i in 0..m * n {
                            let w = want[i] + if accumulate { init[i] as f64 } else { 0.0 };
                            assert!(
                                (dst[i] as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                "{m}x{n}x{k} {layout:?} at {i}: {} vs {w}",
                                dst[i]
                            );
                        }
                    }
                }
            }
        }
    }
}
