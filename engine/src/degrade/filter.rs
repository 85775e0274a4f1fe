//! 2-D filtering as BasicSR's `filter2D`: reflect padding by half the kernel size, then a
//! cross-correlation (PyTorch `conv2d`, so the kernel is not flipped), each channel on its own.

use super::kernels::Kernel;
use super::Rgb;
use rayon::prelude::*;

/// The index `i` (possibly outside `0..n`) reflected into `0..n` without repeating the edge
/// (`-1 -> 1`, `n -> n - 2`), folding again as often as needed for tiny images.
pub fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - m }) as usize
}

/// `img` filtered with `k` (cross-correlation, reflect padding).
pub fn filter2d(img: &Rgb, k: &Kernel) -> Rgb {
    if k.size == 1 {
        let w = k.weights[0];
        return Rgb { width: img.width, height: img.height, data: img.data.iter().map(|v| v * w).collect() };
    }
    let (w, h, r) = (img.width, img.height, (k.size / 2) as isize);
    let xs: Vec<Vec<usize>> = (0..w).map(|x| (-r..=r).map(|d| reflect(x as isize + d, w)).collect()).collect();
    let mut out = vec![0.0f32; img.data.len()];
    out.par_chunks_mut(w * 3).enumerate().for_each(|(y, row)| {
        for (ky, dy) in (-r..=r).enumerate() {
            let src = &img.data[reflect(y as isize + dy, h) * w * 3..][..w * 3];
            let taps = &k.weights[ky * k.size..][..k.size];
            for (x, px) in row.chunks_exact_mut(3).enumerate() {
                let (mut a, mut b, mut c) = (0.0f32, 0.0f32, 0.0f32);
                for (&t, &sx) in taps.iter().zip(&xs[x]) {
                    a += t * src[sx * 3];
                    b += t * src[sx * 3 + 1];
                    c += t * src[sx * 3 + 2];
                }
                px[0] += a;
                px[1] += b;
                px[2] += c;
            }
        }
    });
    Rgb { width: w, height: h, data: out }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel5() -> Kernel {
        let weights: Vec<f32> = (0..25).map(|i| (i + 1) as f32 / 325.0).collect();
        Kernel { size: 5, weights }
    }

    #[test]
    fn reflect_does_not_repeat_the_edge() {
        let got: Vec<usize> = (-3..8).map(|i| reflect(i, 5)).collect();
        assert_eq!(got, [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]);
    }

    #[test]
    fn a_delta_gives_the_flipped_kernel() {
        let (w, h) = (9, 9);
        let mut img = Rgb { width: w, height: h, data: vec![0.0; w * h * 3] };
        img.data[(4 * w + 4) * 3 + 1] = 1.0;
        let k = kernel5();
        let out = filter2d(&img, &k);
        for dy in -2i64..=2 {
            for dx in -2i64..=2 {
                let (x, y) = ((4 + dx) as usize, (4 + dy) as usize);
                let flipped = k.weights[((2 - dy) * 5 + (2 - dx)) as usize];
                assert_eq!(out.data[(y * w + x) * 3 + 1], flipped);
                assert_eq!(out.data[(y * w + x) * 3], 0.0);
            }
        }
        assert_eq!(out.data.iter().filter(|&&v| v != 0.0).count(), 25);
    }

    #[test]
    fn a_constant_stays_constant() {
        let img = Rgb { width: 6, height: 4, data: [0.25f32, 0.5, 0.75].repeat(24) };
        let out = filter2d(&img, &kernel5());
        for px in out.data.chunks(3) {
            assert!((px[0] - 0.25).abs() < 1e-6 && (px[1] - 0.5).abs() < 1e-6 && (px[2] - 0.75).abs() < 1e-6);
        }
    }
}
