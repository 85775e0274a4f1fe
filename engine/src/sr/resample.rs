//! Resizing images to any size, as `--outscale` needs after the model's fixed 4x: bicubic when
//! an axis grows, area averaging when it shrinks.
//!
//! Bicubic is PyTorch's and OpenCV's: Keys' cubic convolution with A = -0.75, pixel centres
//! aligned (`align_corners=False`: source `(dst + 0.5) * in / out - 0.5`), border pixels
//! replicated. Upscaling needs no antialiasing. Shrinking averages each output pixel's footprint
//! (OpenCV's INTER_AREA), weighting input pixels by how much of them it covers. Each axis picks
//! its own method. Channel-agnostic, alpha included; values are not clamped (bicubic overshoots
//! a little at sharp edges; the writers clamp to [0, 1]).

use loaders::image::Image;

/// Keys' cubic convolution coefficient, as in PyTorch and OpenCV.
pub(crate) const CUBIC_A: f64 = -0.75;
const A: f64 = CUBIC_A;

fn cubic(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x <= 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// The input indices and weights that make one output index along one axis.
pub(crate) type Taps = Vec<(usize, f32)>;

/// Bicubic taps of every output index: source coordinate `ratio * (o + 0.5) - 0.5` (pixel
/// centres aligned), indices past the border clamped to it.
pub(crate) fn bicubic_taps(n_in: usize, n_out: usize, ratio: f64, a: f64) -> Vec<Taps> {
    (0..n_out)
        .map(|o| {
            let src = ratio * (o as f64 + 0.5) - 0.5;
            let i0 = src.floor();
            let t = src - i0;
            (-1..=2).map(|k| ((i0 as i64 + k).clamp(0, n_in as i64 - 1) as usize, cubic(t - k as f64, a) as f32)).collect()
        })
        .collect()
}

/// Bicubic taps where the axis grows, footprint-weighted area taps where it shrinks.
fn taps(n_in: usize, n_out: usize, a: f64) -> Vec<Taps> {
    let scale = n_in as f64 / n_out as f64;
    if n_out >= n_in {
        return bicubic_taps(n_in, n_out, scale, a);
    }
    (0..n_out)
        .map(|j| {
            let (lo, hi) = (j as f64 * scale, (j + 1) as f64 * scale);
            (lo.floor() as usize..(hi.ceil() as usize).min(n_in))
                .map(|i| (i, ((hi.min(i as f64 + 1.0) - lo.max(i as f64)) / scale) as f32))
                .filter(|&(_, w)| w > 0.0)
                .collect()
        })
        .collect()
}

/// Applies per-axis taps to row-major data of `c` interleaved channels: rows first (width),
/// then columns (height).
pub(crate) fn apply_separable(data: &[f32], w_in: usize, h_in: usize, c: usize, tx: &[Taps], ty: &[Taps]) -> Vec<f32> {
    let width = tx.len();
    let mut rows = vec![0f32; h_in * width * c];
    for y in 0..h_in {
        let src = &data[y * w_in * c..(y + 1) * w_in * c];
        let dst = &mut rows[y * width * c..(y + 1) * width * c];
        for (x, taps) in tx.iter().enumerate() {
            let out = &mut dst[x * c..(x + 1) * c];
            for &(i, w) in taps {
                for (o, s) in out.iter_mut().zip(&src[i * c..(i + 1) * c]) {
                    *o += w * s;
                }
            }
        }
    }
    let row_len = width * c;
    let mut out = vec![0f32; ty.len() * row_len];
    for (y, taps) in ty.iter().enumerate() {
        let dst = &mut out[y * row_len..(y + 1) * row_len];
        for &(i, w) in taps {
            for (o, s) in dst.iter_mut().zip(&rows[i * row_len..(i + 1) * row_len]) {
                *o += w * s;
            }
        }
    }
    out
}

/// `img` resized to `width` x `height` (both at least 1), same channels, depth flag and ICC.
pub fn resize(img: &Image, width: usize, height: usize) -> Image {
    resize_with(img, width, height, A)
}

/// `planes` consecutive `h x w` planes (an NCHW tensor's data) resized to `h2 x w2` each, as
/// [`resize`] resizes an image.
pub fn resize_planes(data: &[f32], planes: usize, (h, w): (usize, usize), (h2, w2): (usize, usize)) -> Vec<f32> {
    assert!(h2 > 0 && w2 > 0 && data.len() == planes * h * w, "cannot resize {planes} planes of {h}x{w} to {h2}x{w2}");
    let (tx, ty) = (taps(w, w2, A), taps(h, h2, A));
    data.chunks(h * w).flat_map(|plane| apply_separable(plane, w, h, 1, &tx, &ty)).collect()
}

/// [`resize`] with the cubic coefficient `a` (tests use -0.5, the one that reproduces ramps).
fn resize_with(img: &Image, width: usize, height: usize, a: f64) -> Image {
    assert!(width > 0 && height > 0, "cannot resize to {width}x{height}");
    let data = apply_separable(&img.data, img.width, img.height, img.channels, &taps(img.width, width, a), &taps(img.height, height, a));
    Image { width, height, channels: img.channels, data, sixteen_bit: img.sixteen_bit, icc: img.icc.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: usize, h: usize, c: usize, f: impl Fn(usize, usize, usize) -> f32) -> Image {
        let data = (0..h).flat_map(|y| (0..w).flat_map(move |x| (0..c).map(move |k| (x, y, k)))).map(|(x, y, k)| f(x, y, k)).collect();
        Image::new(w, h, c, data)
    }

    #[test]
    fn kernel_is_keys_with_a_minus_three_quarters() {
        assert_eq!(cubic(0.0, A), 1.0);
        assert!(cubic(1.0, A).abs() < 1e-12 && cubic(2.0, A).abs() < 1e-12);
        // PyTorch's weights at t = 0.5: [-0.09375, 0.59375, 0.59375, -0.09375].
        assert!((cubic(1.5, A) + 0.09375).abs() < 1e-12 && (cubic(0.5, A) - 0.59375).abs() < 1e-12);
    }

    #[test]
    fn constant_stays_constant() {
        let img = image(7, 5, 4, |_, _, k| [0.2, 0.5, 0.9, 1.0][k]);
        for (w, h) in [(28, 20), (3, 2), (10, 3), (7, 5), (1, 1), (13, 17)] {
            let out = resize(&img, w, h);
            assert_eq!((out.width, out.height, out.channels), (w, h, 4));
            for px in out.data.chunks(4) {
                for (v, want) in px.iter().zip([0.2, 0.5, 0.9, 1.0]) {
                    assert!((v - want).abs() < 1e-5, "{w}x{h}: {v} vs {want}");
                }
            }
        }
    }

    #[test]
    fn a_linear_ramp_stays_linear_in_the_interior_when_upscaling() {
        // Channel 0 ramps along x, channel 1 along y; interior: all four taps inside the image.
        let img = image(8, 8, 2, |x, y, k| if k == 0 { 0.1 * x as f32 } else { 0.05 * y as f32 + 0.1 });
        let ramp = |v: f64, k: usize| if k == 0 { 0.1 * v } else { 0.05 * v + 0.1 };
        let interior = |v: f64| (1.0..5.0).contains(&v);
        // Keys' kernel reproduces ramps exactly only at a = -0.5: that checks the taps and the
        // pixel-centre alignment. At a = -0.75 (PyTorch's, ours) the ramp comes back with a
        // ripple that repeats every input pixel, under 5% of one input step.
        for (a, tolerance) in [(-0.5, 1e-5), (A, 0.05)] {
            let out = resize_with(&img, 20, 20, a);
            for y in 0..20 {
                for x in 0..20 {
                    let (s, t) = ((x as f64 + 0.5) * 0.4 - 0.5, (y as f64 + 0.5) * 0.4 - 0.5);
                    for (k, v, step) in [(0, s, 0.1), (1, t, 0.05)] {
                        if interior(v) {
                            let got = out.data[(y * 20 + x) * 2 + k] as f64;
                            assert!((got - ramp(v, k)).abs() <= tolerance * step + 1e-6, "a {a} ({x}, {y}) channel {k}: {got}");
                        }
                    }
                    // One input pixel further (5 output pixels at 2.5x) is exactly one step up.
                    if interior(s) && interior(s + 2.0) {
                        let d = out.data[(y * 20 + x + 5) * 2] - out.data[(y * 20 + x) * 2];
                        assert!((d - 0.2).abs() < 1e-5, "a {a} x {x}: {d}");
                    }
                }
            }
        }
    }

    #[test]
    fn halving_averages_2x2_blocks() {
        let img = image(6, 4, 3, |x, y, k| ((x * 7 + y * 13 + k * 5) % 11) as f32 / 10.0);
        let out = resize(&img, 3, 2);
        for y in 0..2 {
            for x in 0..3 {
                for k in 0..3 {
                    let at = |xx: usize, yy: usize| img.data[(yy * 6 + xx) * 3 + k];
                    let mean = (at(2 * x, 2 * y) + at(2 * x + 1, 2 * y) + at(2 * x, 2 * y + 1) + at(2 * x + 1, 2 * y + 1)) / 4.0;
                    assert!((out.data[(y * 3 + x) * 3 + k] - mean).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn fractional_shrinking_keeps_the_mean() {
        let img = image(10, 10, 1, |x, y, _| ((x * 3 + y * 5) % 7) as f32 / 6.0);
        let out = resize(&img, 4, 4); // 2.5 input pixels per output pixel
        let mean = |d: &[f32]| d.iter().sum::<f32>() / d.len() as f32;
        assert!((mean(&out.data) - mean(&img.data)).abs() < 1e-5);
    }

    #[test]
    fn same_size_is_the_identity() {
        let img = image(5, 4, 2, |x, y, k| (x + 2 * y + k) as f32 / 20.0);
        let out = resize(&img, 5, 4);
        assert!(out.data.iter().zip(&img.data).all(|(a, b)| (a - b).abs() < 1e-6));
    }
}
