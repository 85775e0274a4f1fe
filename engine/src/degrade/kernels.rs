//! Blur kernels of BasicSR's `random_mixed_kernels` family and the circular low-pass (sinc)
//! kernel, with Real-ESRGAN's default parameters (`realesrgan_x4plus`).
//!
//! A kernel is a square, odd-sized `size * size` grid, row-major, normalised to sum 1. BasicSR pads
//! every kernel to 21x21 with zeros before `filter2D`; with reflect padding of half the kernel
//! size that changes nothing, so kernels here keep their own size. Sampling follows BasicSR's
//! `random_bivariate_*` functions draw for draw (though not with NumPy's generator).

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::f64::consts::PI;

/// A square kernel: `size * size` weights, row-major (y, then x).
#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    pub size: usize,
    pub weights: Vec<f32>,
}

impl Kernel {
    /// The 1x1 identity (BasicSR's `pulse_tensor`, the "no final sinc" case).
    pub fn pulse() -> Kernel {
        Kernel { size: 1, weights: vec![1.0] }
    }

    fn from_fn(size: usize, f: impl Fn(f64, f64) -> f64) -> Kernel {
        assert!(size % 2 == 1, "kernel size {size} is not odd");
        let c = (size / 2) as f64;
        let raw: Vec<f64> = (0..size * size).map(|i| f((i % size) as f64 - c, (i / size) as f64 - c)).collect();
        let sum: f64 = raw.iter().sum();
        Kernel { size, weights: raw.iter().map(|v| (v / sum) as f32).collect() }
    }
}

/// The kinds of `random_mixed_kernels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    Iso,
    Aniso,
    GeneralizedIso,
    GeneralizedAniso,
    PlateauIso,
    PlateauAniso,
}

/// Parameters of one degradation round's blur (`kernel_list`, `kernel_prob`, `blur_sigma`,
/// `betag_range`, `betap_range`, `sinc_prob`).
#[derive(Debug, Clone)]
pub struct BlurParams {
    pub kinds: [KernelKind; 6],
    pub probs: [f64; 6],
    pub sigma: [f64; 2],
    pub betag: [f64; 2],
    pub betap: [f64; 2],
    pub sinc_prob: f64,
}

const KINDS: [KernelKind; 6] = [
    KernelKind::Iso,
    KernelKind::Aniso,
    KernelKind::GeneralizedIso,
    KernelKind::GeneralizedAniso,
    KernelKind::PlateauIso,
    KernelKind::PlateauAniso,
];

/// First round of `realesrgan_x4plus`.
pub const BLUR1: BlurParams = BlurParams {
    kinds: KINDS,
    probs: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
    sigma: [0.2, 3.0],
    betag: [0.5, 4.0],
    betap: [1.0, 2.0],
    sinc_prob: 0.1,
};
/// Second round of `realesrgan_x4plus`.
pub const BLUR2: BlurParams = BlurParams {
    kinds: KINDS,
    probs: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
    sigma: [0.2, 1.5],
    betag: [0.5, 4.0],
    betap: [1.0, 2.0],
    sinc_prob: 0.1,
};
/// Probability of the final sinc filter.
pub const FINAL_SINC_PROB: f64 = 0.8;
/// `kernel_range`: odd sizes 7..=21.
pub const KERNEL_SIZES: [usize; 8] = [7, 9, 11, 13, 15, 17, 19, 21];

/// The inverse of BasicSR's `sigma_matrix2`: `R diag(sx^2, sy^2) R^T` inverted, as (a, b, c) of
/// the quadratic form `a x^2 + 2 b x y + c y^2`.
fn inverse_sigma(sx: f64, sy: f64, theta: f64) -> (f64, f64, f64) {
    let (s, c) = theta.sin_cos();
    let (vx, vy) = (sx * sx, sy * sy);
    // Sigma = [[c²vx + s²vy, cs(vx - vy)], [cs(vx - vy), s²vx + c²vy]]
    let (m00, m01, m11) = (c * c * vx + s * s * vy, c * s * (vx - vy), s * s * vx + c * c * vy);
    let det = m00 * m11 - m01 * m01;
    (m11 / det, -m01 / det, m00 / det)
}

/// `x^T Sigma^-1 x` at (x, y).
fn quad(inv: (f64, f64, f64), x: f64, y: f64) -> f64 {
    inv.0 * x * x + 2.0 * inv.1 * x * y + inv.2 * y * y
}

/// BasicSR `bivariate_Gaussian`: `exp(-0.5 x^T Sigma^-1 x)`, normalised.
pub fn gaussian(size: usize, sx: f64, sy: f64, theta: f64) -> Kernel {
    let inv = inverse_sigma(sx, sy, theta);
    Kernel::from_fn(size, |x, y| (-0.5 * quad(inv, x, y)).exp())
}

/// BasicSR `bivariate_generalized_Gaussian`: `exp(-0.5 (x^T Sigma^-1 x)^beta)`, normalised.
pub fn generalized_gaussian(size: usize, sx: f64, sy: f64, theta: f64, beta: f64) -> Kernel {
    let inv = inverse_sigma(sx, sy, theta);
    Kernel::from_fn(size, |x, y| (-0.5 * quad(inv, x, y).powf(beta)).exp())
}

/// BasicSR `bivariate_plateau`: `1 / ((x^T Sigma^-1 x)^beta + 1)`, normalised.
pub fn plateau(size: usize, sx: f64, sy: f64, theta: f64, beta: f64) -> Kernel {
    let inv = inverse_sigma(sx, sy, theta);
    Kernel::from_fn(size, |x, y| 1.0 / (quad(inv, x, y).powf(beta) + 1.0))
}

/// BasicSR `circular_lowpass_kernel(cutoff, size)`: `cutoff J1(cutoff r) / (2 pi r)`, with the
/// limit `cutoff^2 / (4 pi)` at the centre, normalised.
pub fn circular_lowpass(cutoff: f64, size: usize) -> Kernel {
    Kernel::from_fn(size, |x, y| {
        let r = (x * x + y * y).sqrt();
        if r == 0.0 {
            cutoff * cutoff / (4.0 * PI)
        } else {
            cutoff * bessel_j1(cutoff * r) / (2.0 * PI * r)
        }
    })
}

/// Bessel function of the first kind, order 1 (the rational approximations of Numerical Recipes
/// `bessj1`, absolute error below 1e-8).
pub fn bessel_j1(x: f64) -> f64 {
    let ax = x.abs();
    if ax < 8.0 {
        let y = x * x;
        let n = x * (72362614232.0 + y * (-7895059235.0 + y * (242396853.1 + y * (-2972611.439 + y * (15704.48260 + y * (-30.16036606))))));
        let d = 144725228442.0 + y * (2300535178.0 + y * (18583304.74 + y * (99447.43394 + y * (376.9991397 + y))));
        n / d
    } else {
        let z = 8.0 / ax;
        let y = z * z;
        let xx = ax - 3.0 * std::f64::consts::FRAC_PI_4;
        let p = 1.0 + y * (0.183105e-2 + y * (-0.3516396496e-4 + y * (0.2457520174e-5 + y * (-0.240337019e-6))));
        let q = 0.04687499995 + y * (-0.2002690873e-3 + y * (0.8449199096e-5 + y * (-0.88228987e-6 + y * 0.105787412e-6)));
        let v = (std::f64::consts::FRAC_2_PI / ax).sqrt() * (xx.cos() * p - z * xx.sin() * q);
        if x < 0.0 {
            -v
        } else {
            v
        }
    }
}

fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Index drawn with the given (unnormalised) probabilities (Python's `random.choices`).
pub(crate) fn choose(rng: &mut ChaCha8Rng, probs: &[f64]) -> usize {
    let total: f64 = probs.iter().sum();
    let u = rng.random::<f64>() * total;
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return i;
        }
    }
    probs.len() - 1
}

/// BasicSR's shape draw: half the time below 1, half the time above (`beta_range` straddles 1).
fn random_beta(rng: &mut ChaCha8Rng, range: [f64; 2]) -> f64 {
    if rng.random::<f64>() < 0.5 {
        uniform(rng, range[0], 1.0)
    } else {
        uniform(rng, 1.0, range[1])
    }
}

/// BasicSR `random_mixed_kernels` with `sigma_x_range = sigma_y_range = sigma` and rotation in
/// [-pi, pi].
pub fn random_mixed_kernel(rng: &mut ChaCha8Rng, p: &BlurParams, size: usize) -> Kernel {
    let kind = p.kinds[choose(rng, &p.probs)];
    let iso = matches!(kind, KernelKind::Iso | KernelKind::GeneralizedIso | KernelKind::PlateauIso);
    let sx = uniform(rng, p.sigma[0], p.sigma[1]);
    let (sy, theta) = if iso { (sx, 0.0) } else { (uniform(rng, p.sigma[0], p.sigma[1]), uniform(rng, -PI, PI)) };
    match kind {
        KernelKind::Iso | KernelKind::Aniso => gaussian(size, sx, sy, theta),
        KernelKind::GeneralizedIso | KernelKind::GeneralizedAniso => generalized_gaussian(size, sx, sy, theta, random_beta(rng, p.betag)),
        KernelKind::PlateauIso | KernelKind::PlateauAniso => plateau(size, sx, sy, theta, random_beta(rng, p.betap)),
    }
}

/// One round's blur kernel as `RealESRGANDataset` draws it: a random odd size, then with
/// `sinc_prob` a sinc (cutoff in [pi/3, pi] below size 13, else [pi/5, pi]), otherwise a mixed
/// kernel.
pub fn random_blur_kernel(rng: &mut ChaCha8Rng, p: &BlurParams) -> Kernel {
    let size = KERNEL_SIZES[rng.random_range(0..KERNEL_SIZES.len())];
    if rng.random::<f64>() < p.sinc_prob {
        let lo = if size < 13 { PI / 3.0 } else { PI / 5.0 };
        circular_lowpass(uniform(rng, lo, PI), size)
    } else {
        random_mixed_kernel(rng, p, size)
    }
}

/// The final sinc kernel: with `FINAL_SINC_PROB` a sinc of random size and cutoff in [pi/3, pi],
/// otherwise the identity pulse.
pub fn random_final_sinc(rng: &mut ChaCha8Rng) -> Kernel {
    if rng.random::<f64>() < FINAL_SINC_PROB {
        let size = KERNEL_SIZES[rng.random_range(0..KERNEL_SIZES.len())];
        circular_lowpass(uniform(rng, PI / 3.0, PI), size)
    } else {
        Kernel::pulse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn at(k: &Kernel, x: i64, y: i64) -> f64 {
        let c = (k.size / 2) as i64;
        k.weights[((y + c) as usize) * k.size + (x + c) as usize] as f64
    }

    #[test]
    fn every_kernel_sums_to_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200 {
            for k in [random_blur_kernel(&mut rng, &BLUR1), random_blur_kernel(&mut rng, &BLUR2), random_final_sinc(&mut rng)] {
                assert_eq!(k.size % 2, 1);
                assert!(k.size == 1 || (7..=21).contains(&k.size));
                let sum: f64 = k.weights.iter().map(|&w| w as f64).sum();
                assert!((sum - 1.0).abs() < 1e-5, "sum {sum}");
            }
        }
    }

    #[test]
    fn gaussian_matches_the_closed_form() {
        // Anisotropic, rotated: Sigma = R diag(sx², sy²) R^T, value ∝ exp(-x^T Sigma^-1 x / 2).
        let (sx, sy, th) = (2.0f64, 0.7f64, 0.6f64);
        let k = gaussian(15, sx, sy, th);
        let closed = |x: f64, y: f64| {
            // Rotate the point into the kernel's axes.
            let (u, v) = (x * th.cos() + y * th.sin(), -x * th.sin() + y * th.cos());
            (-0.5 * (u * u / (sx * sx) + v * v / (sy * sy))).exp()
        };
        let norm: f64 = (-7..=7).flat_map(|y| (-7..=7).map(move |x| (x, y))).map(|(x, y)| closed(x as f64, y as f64)).sum();
        for (x, y) in [(0, 0), (1, 0), (2, 3), (-4, 1), (7, -7)] {
            let want = closed(x as f64, y as f64) / norm;
            assert!((at(&k, x, y) - want).abs() < 1e-7, "({x},{y}): {} vs {want}", at(&k, x, y));
        }
    }

    #[test]
    fn isotropic_kernels_are_rotation_symmetric() {
        for k in [
            gaussian(21, 1.7, 1.7, 0.0),
            generalized_gaussian(13, 2.0, 2.0, 0.0, 0.7),
            plateau(13, 1.3, 1.3, 0.0, 1.5),
            circular_lowpass(2.0, 11),
        ] {
            let c = (k.size / 2) as i64;
            for y in -c..=c {
                for x in -c..=c {
                    let v = at(&k, x, y);
                    for (rx, ry) in [(-y, x), (-x, -y), (y, -x), (y, x)] {
                        assert!((at(&k, rx, ry) - v).abs() < 1e-7);
                    }
                }
            }
        }
    }

    #[test]
    fn sinc_matches_the_j1_formula() {
        // Known values of J1.
        for (x, want) in [
            (1.0, 0.440_050_585_744_933_5),
            (2.5, 0.497_094_102_464_274),
            (10.0, 0.043_472_746_168_861_44),
            (-3.0, -0.339_058_958_525_936_5),
        ] {
            assert!((bessel_j1(x) - want).abs() < 1e-7, "J1({x}) = {}", bessel_j1(x));
        }
        let cutoff = 1.9;
        let k = circular_lowpass(cutoff, 13);
        let r = (3.0f64 * 3.0 + 2.0 * 2.0).sqrt();
        let want = (cutoff * bessel_j1(cutoff * r) / (2.0 * PI * r)) / (cutoff * cutoff / (4.0 * PI));
        assert!((at(&k, 3, 2) / at(&k, 0, 0) - want).abs() < 1e-5);
    }

    #[test]
    fn the_draws_follow_the_seed() {
        let a = random_blur_kernel(&mut ChaCha8Rng::seed_from_u64(3), &BLUR1);
        let b = random_blur_kernel(&mut ChaCha8Rng::seed_from_u64(3), &BLUR1);
        assert_eq!(a, b);
    }
}
