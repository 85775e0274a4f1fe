//! Pooling for the perceptual metrics' feature networks: max pooling, and the two depthwise
//! filters (blur pooling with reflection padding, L2 pooling with zero padding). One output plane
//! per task; each output pixel is a gather over its window, so padding is never materialised.

use crate::backend::shapes::PoolGeometry;
use rayon::prelude::*;

/// What a depthwise filter does around its sum (`Backend::blur_pool2d`, `Backend::l2_pool2d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterPool {
    /// `sum filter * x`, the input extended by reflection.
    Blur,
    /// `sqrt(sum filter * x^2 + 1e-12)`, the input extended by zeros.
    L2,
}

/// DISTS' `(out + 1e-12).sqrt()`: keeps the square root's gradient finite at zero.
pub const L2_POOL_EPS: f32 = 1e-12;

/// `[B, C, H, W] -> [B, C, OH, OW]`, the maximum of each unpadded window.
pub fn max_pool2d(x: &[f32], g: &PoolGeometry) -> Vec<f32> {
    let (k, s) = (g.kernel, g.stride);
    let mut out = vec![0f32; g.batch * g.channels * g.oh * g.ow];
    out.par_chunks_mut(g.oh * g.ow).zip(x.par_chunks(g.h * g.w)).for_each(|(o, plane)| {
        for (oy, row) in o.chunks_mut(g.ow).enumerate() {
            for (ox, v) in row.iter_mut().enumerate() {
                let mut m = f32::NEG_INFINITY;
                for ky in 0..k {
                    let src = &plane[(oy * s + ky) * g.w + ox * s..][..k];
                    m = src.iter().fold(m, |m, &x| m.max(x));
                }
                *v = m;
            }
        }
    });
    out
}

/// Index `i` (which may lie in the padding) of a side of `n` samples, reflected into it
/// (`ReflectionPad2d`: -1 -> 1, n -> n - 2); the padding is smaller than n.
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    (if i < 0 {
        -i
    } else if i >= n {
        2 * (n - 1) - i
    } else {
        i
    }) as usize
}

/// `[B, C, H, W] -> [B, C, OH, OW]` through channel c's `k x k` filter `filter[c]`.
pub fn depthwise(x: &[f32], filter: &[f32], g: &PoolGeometry, kind: FilterPool) -> Vec<f32> {
    let (k, s) = (g.kernel, g.stride);
    let (top, left) = (g.pad[0] as isize, g.pad[2] as isize);
    let mut out = vec![0f32; g.batch * g.channels * g.oh * g.ow];
    out.par_chunks_mut(g.oh * g.ow).zip(x.par_chunks(g.h * g.w)).enumerate().for_each(|(p, (o, plane))| {
        let f = &filter[(p % g.channels) * k * k..][..k * k];
        for (oy, row) in o.chunks_mut(g.ow).enumerate() {
            for (ox, v) in row.iter_mut().enumerate() {
                let mut acc = 0f32;
                for ky in 0..k {
                    let y = (oy * s + ky) as isize - top;
                    for kx in 0..k {
                        let xx = (ox * s + kx) as isize - left;
                        let sample = match kind {
                            FilterPool::Blur => plane[reflect(y, g.h) * g.w + reflect(xx, g.w)],
                            FilterPool::L2 if y >= 0 && xx >= 0 && (y as usize) < g.h && (xx as usize) < g.w => {
                                let v = plane[y as usize * g.w + xx as usize];
                                v * v
                            }
                            FilterPool::L2 => 0.0,
                        };
                        acc += f[ky * k + kx] * sample;
                    }
                }
                *v = match kind {
                    FilterPool::Blur => acc,
                    FilterPool::L2 => (acc + L2_POOL_EPS).sqrt(),
                };
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect()
    }

    /// Pads one plane explicitly, the way ReflectionPad2d / ZeroPad2d lay it out.
    fn padded(plane: &[f32], h: usize, w: usize, pad: [usize; 4], reflect_mode: bool) -> (Vec<f32>, usize, usize) {
        let (ph, pw) = (h + pad[0] + pad[1], w + pad[2] + pad[3]);
        let mut out = vec![0f32; ph * pw];
        for y in 0..ph {
            for x in 0..pw {
                let (sy, sx) = (y as isize - pad[0] as isize, x as isize - pad[2] as isize);
                out[y * pw + x] = if reflect_mode {
                    // the textbook mirror without repeating the edge: -1 -> 1, h -> h - 2
                    let my = if sy < 0 {
                        -sy
                    } else if sy >= h as isize {
                        2 * h as isize - 2 - sy
                    } else {
                        sy
                    };
                    let mx = if sx < 0 {
                        -sx
                    } else if sx >= w as isize {
                        2 * w as isize - 2 - sx
                    } else {
                        sx
                    };
                    plane[my as usize * w + mx as usize]
                } else if sy >= 0 && sx >= 0 && sy < h as isize && sx < w as isize {
                    plane[sy as usize * w + sx as usize]
                } else {
                    0.0
                };
            }
        }
        (out, ph, pw)
    }

    #[test]
    fn max_pool_takes_each_windows_maximum() {
        let (b, c, h, w) = (2, 3, 7, 9);
        let x = ramp(b * c * h * w);
        for (k, s) in [(3, 2), (3, 1), (2, 2), (2, 1)] {
            let g = PoolGeometry::max_pool(&[b, c, h, w], k, s).unwrap();
            let out = max_pool2d(&x, &g);
            assert_eq!(out.len(), b * c * g.oh * g.ow);
            assert_eq!((g.oh, g.ow), ((h - k) / s + 1, (w - k) / s + 1));
            for p in 0..b * c {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let want = (0..k * k).map(|t| x[p * h * w + (oy * s + t / k) * w + ox * s + t % k]).fold(f32::MIN, f32::max);
                        assert_eq!(out[(p * g.oh + oy) * g.ow + ox], want);
                    }
                }
            }
        }
    }

    #[test]
    fn depthwise_filters_match_an_explicitly_padded_convolution() {
        let (b, c, h, w) = (2, 3, 6, 7);
        let x = ramp(b * c * h * w);
        let k = 3;
        // non-negative, as blur and L2 pooling filters are (L2 pooling takes a square root)
        let filter: Vec<f32> = (0..c * k * k).map(|i| (i % 5) as f32 * 0.25 + 0.05).collect();
        for (kind, pad, s) in [(FilterPool::Blur, [2, 2, 2, 2], 2), (FilterPool::Blur, [1, 2, 0, 1], 1), (FilterPool::L2, [1, 1, 1, 1], 2)]
        {
            let g = PoolGeometry::depthwise("t", &[b, c, h, w], &[c, 1, k, k], s, pad, kind == FilterPool::Blur).unwrap();
            let out = depthwise(&x, &filter, &g, kind);
            for p in 0..b * c {
                let (img, _, pw) = padded(&x[p * h * w..(p + 1) * h * w], h, w, pad, kind == FilterPool::Blur);
                let f = &filter[(p % c) * k * k..][..k * k];
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let mut acc = 0f64;
                        for t in 0..k * k {
                            let v = img[(oy * s + t / k) * pw + ox * s + t % k] as f64;
                            acc += f[t] as f64 * if kind == FilterPool::L2 { v * v } else { v };
                        }
                        let want = if kind == FilterPool::L2 { (acc + 1e-12).sqrt() } else { acc };
                        let got = out[(p * g.oh + oy) * g.ow + ox] as f64;
                        assert!((got - want).abs() < 1e-5 * (1.0 + want.abs()), "{kind:?} {pad:?} at {p},{oy},{ox}: {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn reflection_padding_must_be_smaller_than_the_side() {
        assert!(PoolGeometry::depthwise("blur_pool2d", &[1, 2, 2, 5], &[2, 1, 3, 3], 2, [2, 2, 2, 2], true).is_err());
        assert!(PoolGeometry::depthwise("l2_pool2d", &[1, 2, 2, 5], &[2, 1, 3, 3], 2, [2, 2, 2, 2], false).is_ok());
        let e = PoolGeometry::depthwise("blur_pool2d", &[1, 2, 8, 8], &[3, 1, 3, 3], 2, [1; 4], true).unwrap_err();
        assert!(e.to_string().contains("filter has shape [3, 1, 3, 3], expected [2, 1, 3, 3]"), "{e}");
    }
}
