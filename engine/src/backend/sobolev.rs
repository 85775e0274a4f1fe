//! The Sobolev operator of design.md section 6, on the host: the precision `L = D^T diag(lambda) D`
//! of a residual field, with `D` the orthonormal 2-D DCT-II (Neumann boundaries) over height and
//! width of every channel and `lambda_pq = (1 + xi_pq^2)^s` normalised to mean 1, so that the
//! energy `E(r) = mean_{c,p,q} lambda_pq R_cpq^2 = r^T L r / N` has the scale of an MSE.
//!
//! Decisions a reader would otherwise reverse-engineer:
//! - The DCT along an axis is a product with the dense DCT matrix (`gemm`), not an FFT: O(n) work
//!   per sample per axis instead of O(log n), but at GEMM speed and with no reindexing, which is
//!   enough for grids of a few hundred a side (energy of `[1, 3, 512, 512]`: about 0.2 s on two
//!   busy cores). Beyond that an FFT-based DCT (`rustfft`) would win.
//! - Fields are f32 (public data); transforms and reductions run in f64. S-DPO multiplies energy
//!   differences by beta = 2000, so the energies keep their f64 digits and are returned as f64.
//! - With the `PixelShuffle` autoencoder a latent `[3 f f, h, w]` is a rearrangement of the image,
//!   and DCT frequencies of that grid mean nothing. [`Sobolev::for_pixel_shuffle`] builds the
//!   operator on the image grid `[3, h f, w f]`; every method still takes and returns fields on
//!   the latent grid (depth-to-space on the way in, space-to-depth on the way out). A permutation
//!   is orthogonal, so the result is again a self-adjoint operator and all formulas hold as
//!   written on the latent grid.

use crate::backend::cpu::spatial::{pixel_shuffle, pixel_unshuffle};
use crate::sampler::gaussian_noise;
use anyhow::{ensure, Result};
use rayon::prelude::*;
use std::borrow::Cow;
use std::f64::consts::PI;
use std::fmt;

/// The Sobolev exponent `s` of design.md section 6.
pub const DEFAULT_EXPONENT: f64 = 1.5;

/// The shape of one field: channels x height x width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Grid {
    /// `channels x height x width`.
    pub fn new(channels: usize, height: usize, width: usize) -> Self {
        Grid { channels, height, width }
    }

    /// Values per field, `N = C H W`: the count the energy's mean divides by.
    pub fn elements(&self) -> usize {
        self.channels * self.height * self.width
    }
}

impl fmt::Display for Grid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.channels, self.height, self.width)
    }
}

/// The Sobolev precision operator `L r = IDCT(lambda . DCT(r))` and its energy
/// `E(r) = mean_{c,p,q} lambda_pq R_cpq^2`, for batches of fields `[B, C, H, W]` (row-major f32).
#[derive(Clone, Debug)]
pub struct Sobolev {
    /// The grid of the fields that callers pass and get back.
    field: Grid,
    /// The grid the DCT runs on: `field` itself, or the image grid of a `PixelShuffle` latent.
    spectral: Grid,
    /// Depth-to-space factor from `field` to `spectral`; 1 when they are one grid.
    shuffle: usize,
    exponent: f64,
    /// `[H, H]`, row p: `D[p, y] = c_p cos(pi (2 y + 1) p / 2H)`, `c_0 = sqrt(1/H)`, else `sqrt(2/H)`.
    dct_height: Vec<f64>,
    /// `[W, W]`, the same for the width.
    dct_width: Vec<f64>,
    /// `lambda_pq` over the spectral plane `[H, W]`, mean 1.
    lambda: Vec<f64>,
}

impl Sobolev {
    /// The operator for fields on `grid`, with weights `lambda_pq = (1 + xi^2)^s / mean`,
    /// `xi^2 = pi^2 ((p/H)^2 + (q/W)^2)`. `exponent = 0` gives the identity (Euclidean) operator.
    pub fn new(grid: Grid, exponent: f64) -> Result<Self> {
        Self::build(grid, grid, 1, exponent)
    }

    /// The operator for fields on a `PixelShuffle(factor)` latent grid `[C f f, h, w]`, acting on
    /// the image grid `[C, h f, w f]`: `L_latent = P^T L_image P` with `P` PyTorch's
    /// `pixel_shuffle`, `out[b, c, y f + i, x f + j] = in[b, (c f + i) f + j, y, x]`.
    /// Methods take and return latent-grid fields; `dct` coefficients are on the image grid.
    pub fn for_pixel_shuffle(latent: Grid, factor: usize, exponent: f64) -> Result<Self> {
        ensure!(factor >= 1, "Sobolev: pixel shuffle factor must be at least 1, got {factor}");
        ensure!(
            latent.channels % (factor * factor) == 0,
            "Sobolev: a PixelShuffle({factor}) latent has a multiple of {} channels, the grid {latent} has {}",
            factor * factor,
            latent.channels
        );
        let image = Grid::new(latent.channels / (factor * factor), latent.height * factor, latent.width * factor);
        Self::build(latent, image, factor, exponent)
    }

    fn build(field: Grid, spectral: Grid, shuffle: usize, exponent: f64) -> Result<Self> {
        ensure!(field.elements() > 0, "Sobolev: the grid {field} is empty");
        ensure!(exponent.is_finite(), "Sobolev: the exponent s must be finite, got {exponent}");
        Ok(Sobolev {
            field,
            spectral,
            shuffle,
            exponent,
            dct_height: dct_matrix(spectral.height),
            dct_width: dct_matrix(spectral.width),
            lambda: sobolev_weights(spectral.height, spectral.width, exponent),
        })
    }

    /// The grid of the fields the methods take and return.
    pub fn field_grid(&self) -> Grid {
        self.field
    }

    /// The grid the DCT runs on (the image grid for a `PixelShuffle` latent).
    pub fn spectral_grid(&self) -> Grid {
        self.spectral
    }

    /// The Sobolev exponent `s`.
    pub fn exponent(&self) -> f64 {
        self.exponent
    }

    /// `lambda_pq`, row-major over the spectral plane `[H, W]`; their mean is 1.
    pub fn weights(&self) -> &[f64] {
        &self.lambda
    }

    /// Orthonormal DCT-II over height and width of every channel, `R = D_H r D_W^T`:
    /// `R[b, c, p, q] = c_p c_q sum_{y,x} r[b, c, y, x] cos(pi (2y+1) p / 2H) cos(pi (2x+1) q / 2W)`,
    /// laid out on the spectral grid.
    pub fn dct(&self, field: &[f32]) -> Result<Vec<f32>> {
        Ok(to_f32(&self.spectrum(field, "dct")?))
    }

    /// The inverse of [`Sobolev::dct`] (its transpose, the DCT being orthonormal): `r = D_H^T R D_W`.
    pub fn idct(&self, coefficients: &[f32]) -> Result<Vec<f32>> {
        self.batch(coefficients.len(), "idct")?;
        Ok(self.field_from_spectrum(coefficients.iter().map(|&v| v as f64).collect()))
    }

    /// The precision `L r = IDCT(lambda . DCT(r))`.
    pub fn precision(&self, r: &[f32]) -> Result<Vec<f32>> {
        self.apply(r, Filter::Precision)
    }

    /// The covariance `L^-1 r = IDCT(lambda^-1 . DCT(r))`.
    pub fn covariance(&self, r: &[f32]) -> Result<Vec<f32>> {
        self.apply(r, Filter::Covariance)
    }

    /// `IDCT(w . DCT(r))` with the spectral weights `w` of `filter` ([`Sobolev::filter_weights`]).
    pub fn apply(&self, r: &[f32], filter: Filter) -> Result<Vec<f32>> {
        self.batch(r.len(), filter.name())?;
        Ok(self.apply_weights(r, &self.filter_weights(filter)))
    }

    /// The weights `w_pq` of `filter` over the spectral plane `[H, W]`, row-major: what both the
    /// host and the GPU multiply the DCT coefficients by.
    pub fn filter_weights(&self, filter: Filter) -> Vec<f64> {
        let gradient_scale = 2.0 / self.field.elements() as f64;
        self.lambda
            .iter()
            .map(|&lambda| match filter {
                Filter::Precision => lambda,
                Filter::Covariance => 1.0 / lambda,
                Filter::EnergyGrad => gradient_scale * lambda,
                Filter::ColoredNoise => lambda.sqrt().recip(),
            })
            .collect()
    }

    /// The orthonormal DCT-II matrices `(D_H, D_W)` of the spectral grid, row-major `[n, n]`,
    /// row p = frequency p.
    pub fn dct_matrices(&self) -> (&[f64], &[f64]) {
        (&self.dct_height, &self.dct_width)
    }

    /// The depth-to-space factor from the field grid to the spectral grid (1: the same grid).
    pub fn shuffle_factor(&self) -> usize {
        self.shuffle
    }

    /// The Sobolev energy of each field, `E(r) = mean_{c,p,q} lambda_pq R_cpq^2` (= `mean(r^2)` at s = 0).
    pub fn energy(&self, r: &[f32]) -> Result<Vec<f64>> {
        let spectrum = self.spectrum(r, "energy")?;
        let n = self.field.elements();
        let plane = self.lambda.len();
        Ok(spectrum
            .par_chunks(n)
            .map(|item| {
                let weighted: f64 = item
                    .chunks(plane)
                    .map(|coefficients| coefficients.iter().zip(&self.lambda).map(|(c, lambda)| lambda * c * c).sum::<f64>())
                    .sum();
                weighted / n as f64
            })
            .collect())
    }

    /// The gradient of each field's energy, `dE/dr = (2/N) L r` (L is self-adjoint), N = C H W.
    pub fn energy_grad(&self, r: &[f32]) -> Result<Vec<f32>> {
        self.apply(r, Filter::EnergyGrad)
    }

    /// The Sobolev norm of each field, `||d||_H = sqrt(E(d))`.
    pub fn sobolev_norm(&self, d: &[f32]) -> Result<Vec<f64>> {
        Ok(self.energy(d)?.into_iter().map(f64::sqrt).collect())
    }

    /// `batch` fields of Gaussian noise with covariance `L^-1`: `IDCT(lambda^{-1/2} . DCT(n))`,
    /// `n` white from [`gaussian_noise`] (ChaCha8 seeded by `seed`), so the same seed gives the
    /// same noise on every machine.
    pub fn colored_noise(&self, batch: usize, seed: u64) -> Vec<f32> {
        let white = gaussian_noise(batch * self.field.elements(), seed);
        self.apply_weights(&white, &self.filter_weights(Filter::ColoredNoise))
    }

    /// `IDCT(weights . DCT(r))` for `r` of a checked length.
    fn apply_weights(&self, r: &[f32], weights: &[f64]) -> Vec<f32> {
        let mut spectrum = self.transformed(r);
        spectrum.par_chunks_mut(weights.len()).for_each(|plane| plane.iter_mut().zip(weights).for_each(|(c, w)| *c *= w));
        self.field_from_spectrum(spectrum)
    }

    /// The number of fields in `len` values, or an error naming the method and the grid.
    fn batch(&self, len: usize, what: &str) -> Result<usize> {
        let n = self.field.elements();
        ensure!(len % n == 0, "Sobolev::{what}: {len} values are not a whole number of {} fields ({n} values each)", self.field);
        Ok(len / n)
    }

    /// Checked field (f32, field grid) to DCT coefficients (f64, spectral grid).
    fn spectrum(&self, field: &[f32], what: &str) -> Result<Vec<f64>> {
        self.batch(field.len(), what)?;
        Ok(self.transformed(field))
    }

    /// Field (f32, field grid, length checked) to DCT coefficients (f64, spectral grid).
    fn transformed(&self, field: &[f32]) -> Vec<f64> {
        let on_grid = self.to_spectral_grid(field);
        let mut spectrum: Vec<f64> = on_grid.par_iter().map(|&v| v as f64).collect();
        self.transform_planes(&mut spectrum, Direction::Forward);
        spectrum
    }

    /// DCT coefficients (f64, spectral grid) to a field (f32, field grid).
    fn field_from_spectrum(&self, mut spectrum: Vec<f64>) -> Vec<f32> {
        self.transform_planes(&mut spectrum, Direction::Inverse);
        self.to_field_grid(to_f32(&spectrum))
    }

    fn to_spectral_grid<'a>(&self, field: &'a [f32]) -> Cow<'a, [f32]> {
        if self.shuffle == 1 {
            return Cow::Borrowed(field);
        }
        let batch = field.len() / self.field.elements();
        Cow::Owned(pixel_shuffle(field, batch, self.field.channels, self.field.height, self.field.width, self.shuffle))
    }

    fn to_field_grid(&self, on_grid: Vec<f32>) -> Vec<f32> {
        if self.shuffle == 1 {
            return on_grid;
        }
        let batch = on_grid.len() / self.spectral.elements();
        pixel_unshuffle(&on_grid, batch, self.spectral.channels, self.spectral.height, self.spectral.width, self.shuffle)
    }

    /// The 2-D DCT (or its inverse) of every `[H, W]` plane in place: forward `D_H X D_W^T`,
    /// inverse `D_H^T X D_W`. Planes run in parallel, each product on one thread.
    fn transform_planes(&self, data: &mut [f64], direction: Direction) {
        let (h, w) = (self.spectral.height, self.spectral.width);
        let inverse = direction == Direction::Inverse;
        data.par_chunks_mut(h * w).for_each_init(
            || vec![0f64; h * w],
            |along_width, plane| {
                matmul(
                    along_width,
                    Operand { data: plane, transposed: false },
                    Operand { data: &self.dct_width, transposed: !inverse },
                    h,
                    w,
                    w,
                );
                matmul(
                    plane,
                    Operand { data: &self.dct_height, transposed: inverse },
                    Operand { data: along_width, transposed: false },
                    h,
                    w,
                    h,
                );
            },
        );
    }
}

/// A spectral filter `IDCT(w . DCT(r))` of the operator, by its weights `w_pq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `lambda`: the precision `L`.
    Precision,
    /// `1 / lambda`: the covariance `L^-1`.
    Covariance,
    /// `(2/N) lambda`: the energy gradient `(2/N) L r`.
    EnergyGrad,
    /// `lambda^-1/2`: white noise in, noise of covariance `L^-1` out.
    ColoredNoise,
}

impl Filter {
    /// The method name that errors carry.
    pub fn name(self) -> &'static str {
        match self {
            Filter::Precision => "precision",
            Filter::Covariance => "covariance",
            Filter::EnergyGrad => "energy_grad",
            Filter::ColoredNoise => "colored_noise",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Forward,
    Inverse,
}

/// The orthonormal DCT-II matrix of size n, row p = frequency p.
fn dct_matrix(n: usize) -> Vec<f64> {
    let mut d = vec![0f64; n * n];
    for (p, row) in d.chunks_mut(n).enumerate() {
        let scale = if p == 0 { (1.0 / n as f64).sqrt() } else { (2.0 / n as f64).sqrt() };
        for (y, v) in row.iter_mut().enumerate() {
            *v = scale * (PI * (2 * y + 1) as f64 * p as f64 / (2 * n) as f64).cos();
        }
    }
    d
}

/// `lambda_pq = (1 + pi^2 ((p/H)^2 + (q/W)^2))^s`, divided by its mean over the plane.
fn sobolev_weights(h: usize, w: usize, exponent: f64) -> Vec<f64> {
    let raw: Vec<f64> = (0..h)
        .flat_map(|p| {
            (0..w).map(move |q| {
                let xi2 = PI * PI * ((p as f64 / h as f64).powi(2) + (q as f64 / w as f64).powi(2));
                (1.0 + xi2).powf(exponent)
            })
        })
        .collect();
    let mean = raw.iter().sum::<f64>() / raw.len() as f64;
    raw.into_iter().map(|lambda| lambda / mean).collect()
}

fn to_f32(values: &[f64]) -> Vec<f32> {
    values.par_iter().map(|&v| v as f32).collect()
}

/// A row-major matrix, used as stored or as its transpose.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f64],
    transposed: bool,
}

/// `dst[m, n] = lhs[m, k] rhs[k, n]` in f64 through `gemm`, single-threaded (callers parallelise
/// over planes). A transposed operand is read through its strides, never copied.
fn matmul(dst: &mut [f64], lhs: Operand, rhs: Operand, m: usize, n: usize, k: usize) {
    assert!(dst.len() == m * n && lhs.data.len() == m * k && rhs.data.len() == k * n, "matmul operands do not match {m}x{n}x{k}");
    // (column stride, row stride) of the matrix the product reads.
    let (lhs_cs, lhs_rs) = if lhs.transposed { (m, 1) } else { (1, k) };
    let (rhs_cs, rhs_rs) = if rhs.transposed { (k, 1) } else { (1, n) };
    // SAFETY: the assert above makes every index the strides can reach lie inside its slice;
    // dst is a distinct &mut borrow, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.data.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.data.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_fields(len: usize, seed: u64) -> Vec<f32> {
        gaussian_noise(len, seed)
    }

    /// `c_k cos(pi (2 i + 1) k / 2n)`, the DCT-II basis written out from its definition.
    fn basis(n: usize, k: usize, i: usize) -> f64 {
        let c = if k == 0 { (1.0 / n as f64).sqrt() } else { (2.0 / n as f64).sqrt() };
        c * (std::f64::consts::PI * (2 * i + 1) as f64 * k as f64 / (2 * n) as f64).cos()
    }

    /// The 2-D DCT-II of every plane as the direct quadruple sum, in f64.
    fn direct_dct(x: &[f32], h: usize, w: usize) -> Vec<f64> {
        let mut out = vec![0f64; x.len()];
        for (plane, coefficients) in x.chunks(h * w).zip(out.chunks_mut(h * w)) {
            for p in 0..h {
                for q in 0..w {
                    let mut sum = 0f64;
                    for y in 0..h {
                        for xx in 0..w {
                            sum += plane[y * w + xx] as f64 * basis(h, p, y) * basis(w, q, xx);
                        }
                    }
                    coefficients[p * w + q] = sum;
                }
            }
        }
        out
    }

    /// `(1 + pi^2 ((p/H)^2 + (q/W)^2))^s` over its mean, from design.md section 6.
    fn expected_weights(h: usize, w: usize, s: f64) -> Vec<f64> {
        let mut raw = Vec::new();
        for p in 0..h {
            for q in 0..w {
                let xi2 = std::f64::consts::PI.powi(2) * ((p as f64 / h as f64).powi(2) + (q as f64 / w as f64).powi(2));
                raw.push((1.0 + xi2).powf(s));
            }
        }
        let mean: f64 = raw.iter().sum::<f64>() / raw.len() as f64;
        raw.iter().map(|v| v / mean).collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    fn max_abs(a: &[f32]) -> f64 {
        a.iter().fold(0f64, |m, &v| m.max((v as f64).abs()))
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()))
    }

    #[test]
    fn exponent_zero_gives_the_mse_and_the_identity() {
        let grid = Grid::new(3, 7, 10);
        let op = Sobolev::new(grid, 0.0).unwrap();
        let r = random_fields(4 * grid.elements(), 1);
        for (item, energy) in r.chunks(grid.elements()).zip(op.energy(&r).unwrap()) {
            let mse = item.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / item.len() as f64;
            assert!((energy - mse).abs() <= 1e-12 * mse, "energy {energy} mse {mse}");
        }
        // The f64 round trip is exact to far below half an f32 ulp, so the f32 result is the input.
        assert_eq!(op.precision(&r).unwrap(), r);
        assert_eq!(op.covariance(&r).unwrap(), r);
    }

    #[test]
    fn dct_preserves_the_sum_of_squares_and_idct_inverts_it() {
        for grid in [Grid::new(2, 8, 8), Grid::new(3, 5, 13), Grid::new(1, 1, 6)] {
            let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
            let x = random_fields(3 * grid.elements(), 2);
            let coefficients = op.dct(&x).unwrap();
            for (field, spectrum) in x.chunks(grid.elements()).zip(coefficients.chunks(grid.elements())) {
                let (a, b) = (dot(field, field), dot(spectrum, spectrum));
                assert!((a - b).abs() <= 1e-6 * a, "{grid}: sum of squares {a} became {b}");
            }
            let back = op.idct(&coefficients).unwrap();
            assert!(max_diff(&back, &x) <= 1e-6 * max_abs(&x), "{grid}: idct(dct(x)) is off by {}", max_diff(&back, &x));
        }
    }

    #[test]
    fn dct_matches_the_direct_dct_ii_sum() {
        let grid = Grid::new(2, 6, 9);
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let x = random_fields(2 * grid.elements(), 3);
        let got = op.dct(&x).unwrap();
        let want: Vec<f32> = direct_dct(&x, grid.height, grid.width).iter().map(|&v| v as f32).collect();
        assert!(max_diff(&got, &want) <= 1e-6 * max_abs(&want), "off by {}", max_diff(&got, &want));
    }

    #[test]
    fn precision_is_self_adjoint_and_covariance_inverts_it() {
        let grid = Grid::new(2, 12, 9);
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let a = random_fields(2 * grid.elements(), 4);
        let b = random_fields(2 * grid.elements(), 5);
        let (la, lb) = (op.precision(&a).unwrap(), op.precision(&b).unwrap());
        let scale = dot(&la, &la).sqrt() * dot(&b, &b).sqrt();
        assert!((dot(&la, &b) - dot(&a, &lb)).abs() <= 1e-6 * scale, "<La, b> {} <a, Lb> {}", dot(&la, &b), dot(&a, &lb));
        let (ca, cb) = (op.covariance(&a).unwrap(), op.covariance(&b).unwrap());
        let scale = dot(&ca, &ca).sqrt() * dot(&b, &b).sqrt();
        assert!((dot(&ca, &b) - dot(&a, &cb)).abs() <= 1e-6 * scale);
        for round_trip in [op.precision(&ca).unwrap(), op.covariance(&la).unwrap()] {
            assert!(max_diff(&round_trip, &a) <= 1e-5 * max_abs(&a), "L L^-1 a is off by {}", max_diff(&round_trip, &a));
        }
        // The operator is not the identity, or the checks above would prove nothing.
        assert!(max_diff(&la, &a) > 0.1 * max_abs(&a));
    }

    #[test]
    fn energy_is_the_quadratic_form_of_the_explicit_matrix() {
        let (h, w) = (5, 4);
        let grid = Grid::new(2, h, w);
        for s in [DEFAULT_EXPONENT, 0.5, -0.7] {
            let op = Sobolev::new(grid, s).unwrap();
            let lambda = expected_weights(h, w, s);
            let max_weight_error = op.weights().iter().zip(&lambda).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(max_weight_error < 1e-12, "s = {s}: weights are off by {max_weight_error}");
            // M = D^T diag(lambda) D over one plane, D the (HW x HW) 2-D DCT written out.
            let plane = h * w;
            let d = |pq: usize, yx: usize| basis(h, pq / w, yx / w) * basis(w, pq % w, yx % w);
            let mut m = vec![0f64; plane * plane];
            for i in 0..plane {
                for j in 0..plane {
                    m[i * plane + j] = (0..plane).map(|pq| d(pq, i) * lambda[pq] * d(pq, j)).sum();
                }
            }
            let r = random_fields(3 * grid.elements(), 6);
            for (item, energy) in r.chunks(grid.elements()).zip(op.energy(&r).unwrap()) {
                let mut form = 0f64;
                for channel in item.chunks(plane) {
                    for i in 0..plane {
                        for j in 0..plane {
                            form += channel[i] as f64 * m[i * plane + j] * channel[j] as f64;
                        }
                    }
                }
                let want = form / grid.elements() as f64;
                assert!((energy - want).abs() <= 1e-12 * want, "s = {s}: energy {energy}, r^T M r / N {want}");
            }
        }
    }

    #[test]
    fn energy_grad_matches_central_differences() {
        let grid = Grid::new(2, 6, 5);
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let r = random_fields(2 * grid.elements(), 7);
        let grad = op.energy_grad(&r).unwrap();
        let n = grid.elements();
        for index in (0..r.len()).step_by(7) {
            let (mut plus, mut minus) = (r.clone(), r.clone());
            plus[index] += 1e-2;
            minus[index] -= 1e-2;
            let item = index / n;
            let (e_plus, e_minus) = (op.energy(&plus).unwrap()[item], op.energy(&minus).unwrap()[item]);
            // E is quadratic, so the central difference over the actual f32 step is its derivative
            // at the step's midpoint, which is r to within f32 rounding.
            let numeric = (e_plus - e_minus) / (plus[index] as f64 - minus[index] as f64);
            assert!((numeric - grad[index] as f64).abs() <= 1e-5 * max_abs(&grad), "index {index}: {numeric} vs {}", grad[index]);
        }
    }

    #[test]
    fn colored_noise_has_covariance_inverse_lambda() {
        let grid = Grid::new(2, 6, 5);
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let samples = 4000;
        let noise = op.colored_noise(samples, 8);
        assert_eq!(noise, op.colored_noise(samples, 8));
        assert_ne!(noise, op.colored_noise(samples, 9));
        let spectra = direct_dct(&noise, grid.height, grid.width);
        let mut variance = vec![0f64; grid.elements()];
        for spectrum in spectra.chunks(grid.elements()) {
            variance.iter_mut().zip(spectrum).for_each(|(v, c)| *v += c * c / samples as f64);
        }
        // The sample variance of a zero-mean Gaussian has relative standard deviation sqrt(2 / n).
        let tolerance = 5.0 * (2.0 / samples as f64).sqrt();
        let lambda = expected_weights(grid.height, grid.width, DEFAULT_EXPONENT);
        for (k, v) in variance.iter().enumerate() {
            let want = 1.0 / lambda[k % lambda.len()];
            assert!((v / want - 1.0).abs() <= tolerance, "coefficient {k}: variance {v}, 1/lambda {want}");
        }
    }

    /// PyTorch's `pixel_shuffle` index map: latent `(c f + i) f + j, y, x` to image `c, y f + i, x f + j`,
    /// within one batch item.
    fn image_index(latent: Grid, f: usize, index: usize) -> usize {
        let (channel, y, x) = (index / (latent.height * latent.width), index / latent.width % latent.height, index % latent.width);
        let (c, i, j) = (channel / (f * f), channel / f % f, channel % f);
        (c * latent.height * f + y * f + i) * latent.width * f + x * f + j
    }

    #[test]
    fn pixel_shuffle_operator_works_on_the_image_grid() {
        let (f, latent) = (2, Grid::new(12, 3, 4));
        let latent_op = Sobolev::for_pixel_shuffle(latent, f, DEFAULT_EXPONENT).unwrap();
        let image_op = Sobolev::new(Grid::new(3, 6, 8), DEFAULT_EXPONENT).unwrap();
        assert_eq!((latent_op.field_grid(), latent_op.spectral_grid()), (latent, image_op.field_grid()));
        let n = latent.elements();
        let depth_to_space = |x: &[f32]| {
            let mut out = vec![0f32; x.len()];
            for (index, &v) in x.iter().enumerate() {
                out[index / n * n + image_index(latent, f, index % n)] = v;
            }
            out
        };
        let x = random_fields(2 * n, 10);
        let image = depth_to_space(&x);
        let coefficients = latent_op.dct(&x).unwrap();
        let want: Vec<f32> = direct_dct(&image, 6, 8).iter().map(|&v| v as f32).collect();
        assert!(max_diff(&coefficients, &want) <= 1e-6 * max_abs(&want));
        assert!(max_diff(&latent_op.idct(&coefficients).unwrap(), &x) <= 1e-6 * max_abs(&x), "depth-to-space round trip");
        assert_eq!(latent_op.energy(&x).unwrap(), image_op.energy(&image).unwrap());
        assert_eq!(depth_to_space(&latent_op.precision(&x).unwrap()), image_op.precision(&image).unwrap());

        // A smooth image is smooth on the image grid only: its space-to-depth latent looks rough
        // to an operator built on the latent grid.
        let mut smooth = vec![0f32; n];
        for (index, v) in smooth.iter_mut().enumerate() {
            let image_position = image_index(latent, f, index) % (6 * 8);
            *v = (std::f32::consts::PI * (image_position / 8) as f32 / 6.0).cos();
        }
        let on_image = latent_op.energy(&smooth).unwrap()[0];
        let on_latent = Sobolev::new(latent, DEFAULT_EXPONENT).unwrap().energy(&smooth).unwrap()[0];
        assert!(on_image < 0.5 * on_latent, "energy {on_image} on the image grid, {on_latent} on the latent grid");
    }

    /// The filters' weights against their closed forms: covariance and colored noise invert
    /// the precision (exactly and in square), the gradient weights are `2/N` of it, and the
    /// filters applied agree with the named methods.
    #[test]
    fn filter_weights_are_the_closed_forms_of_lambda() {
        let grid = Grid::new(2, 5, 7);
        let op = Sobolev::new(grid, DEFAULT_EXPONENT).unwrap();
        let [precision, covariance, gradient, noise] =
            [Filter::Precision, Filter::Covariance, Filter::EnergyGrad, Filter::ColoredNoise].map(|f| op.filter_weights(f));
        assert_eq!(precision, op.weights());
        for k in 0..precision.len() {
            assert!((precision[k] * covariance[k] - 1.0).abs() < 1e-14);
            assert!((precision[k] * noise[k] * noise[k] - 1.0).abs() < 1e-14);
            assert!((gradient[k] - 2.0 / grid.elements() as f64 * precision[k]).abs() < 1e-15);
        }
        let r = random_fields(2 * grid.elements(), 11);
        assert_eq!(op.apply(&r, Filter::EnergyGrad).unwrap(), op.energy_grad(&r).unwrap());
        assert_eq!(op.apply(&r, Filter::ColoredNoise).unwrap(), op.colored_noise(2, 11));
        let message = op.apply(&r[1..], Filter::ColoredNoise).unwrap_err().to_string();
        assert!(message.contains("colored_noise") && message.contains("2x5x7"), "{message}");
    }

    #[test]
    fn rejects_fields_that_are_not_whole_grids() {
        let op = Sobolev::new(Grid::new(2, 4, 4), DEFAULT_EXPONENT).unwrap();
        let r = vec![0f32; 33];
        let message = op.energy(&r).unwrap_err().to_string();
        assert!(message.contains("energy") && message.contains("2x4x4") && message.contains("33"), "{message}");
        assert!(op.dct(&r).is_err() && op.idct(&r).is_err() && op.precision(&r).is_err() && op.covariance(&r).is_err());
        assert!(op.energy_grad(&r).is_err() && op.sobolev_norm(&r).is_err());
        assert!(Sobolev::new(Grid::new(0, 4, 4), 1.0).is_err());
        assert!(Sobolev::new(Grid::new(1, 4, 4), f64::NAN).is_err());
        assert!(Sobolev::for_pixel_shuffle(Grid::new(10, 4, 4), 2, 1.0).is_err());
        assert!(Sobolev::for_pixel_shuffle(Grid::new(12, 4, 4), 0, 1.0).is_err());
    }
}
