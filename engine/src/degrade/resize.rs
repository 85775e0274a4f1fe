//! Resizing with PyTorch `F.interpolate` semantics (`align_corners=False`): `area` (adaptive
//! average pooling), `bilinear` and `bicubic` (A = -0.75, edge indices clamped, no clamping of
//! the result), and Real-ESRGAN's random up / down / keep choice.
//!
//! When `F.interpolate` is given a `scale_factor` (the first round), the output size is
//! `floor(size * scale)` and the source coordinates use `1 / scale`, not `in / out`; `resize`
//! takes that scale as `coord_scale`.

use super::kernels::choose;
use super::Rgb;
use crate::sr::resample::{apply_separable, bicubic_taps, Taps, CUBIC_A};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Area,
    Bilinear,
    Bicubic,
}

/// `resize_prob` (up, down, keep) and `resize_range` of one round.
#[derive(Debug, Clone, Copy)]
pub struct ResizeParams {
    pub probs: [f64; 3],
    pub range: [f64; 2],
}

pub const RESIZE1: ResizeParams = ResizeParams { probs: [0.2, 0.7, 0.1], range: [0.15, 1.5] };
pub const RESIZE2: ResizeParams = ResizeParams { probs: [0.3, 0.4, 0.3], range: [0.3, 1.2] };

/// A random scale (up: [1, hi], down: [lo, 1], keep: 1) and a random mode, as Real-ESRGAN draws
/// them.
pub fn random_scale_and_mode(rng: &mut ChaCha8Rng, p: &ResizeParams) -> (f64, Mode) {
    let scale = match choose(rng, &p.probs) {
        0 => 1.0 + (p.range[1] - 1.0) * rng.random::<f64>(),
        1 => p.range[0] + (1.0 - p.range[0]) * rng.random::<f64>(),
        _ => 1.0,
    };
    (scale, random_mode(rng))
}

/// One of area, bilinear, bicubic with equal probability.
pub fn random_mode(rng: &mut ChaCha8Rng) -> Mode {
    [Mode::Area, Mode::Bilinear, Mode::Bicubic][rng.random_range(0..3)]
}

/// The taps of every output index along one axis.
fn axis_taps(n_in: usize, n_out: usize, mode: Mode, coord_scale: Option<f64>) -> Vec<Taps> {
    // PyTorch `area_pixel_compute_scale`: 1 / scale_factor when given, else in / out.
    let ratio = coord_scale.filter(|s| *s > 0.0).map(|s| 1.0 / s).unwrap_or(n_in as f64 / n_out as f64);
    match mode {
        Mode::Bicubic => bicubic_taps(n_in, n_out, ratio, CUBIC_A),
        // adaptive_avg_pool: [floor(o * in / out), ceil((o + 1) * in / out)).
        Mode::Area => (0..n_out)
            .map(|o| {
                let (start, end) = ((o * n_in) / n_out, ((o + 1) * n_in).div_ceil(n_out));
                let w = 1.0 / (end - start) as f32;
                (start..end).map(|i| (i, w)).collect()
            })
            .collect(),
        Mode::Bilinear => (0..n_out)
            .map(|o| {
                let src = (ratio * (o as f64 + 0.5) - 0.5).max(0.0);
                let i0 = (src as usize).min(n_in - 1);
                let i1 = if i0 < n_in - 1 { i0 + 1 } else { i0 };
                let l1 = (src - i0 as f64) as f32;
                vec![(i0, 1.0 - l1), (i1, l1)]
            })
            .collect(),
    }
}

/// `img` resized to `out_w x out_h`. `coord_scale`: the `scale_factor` PyTorch was given, if any.
pub fn resize(img: &Rgb, out_w: usize, out_h: usize, mode: Mode, coord_scale: Option<f64>) -> Rgb {
    assert!(out_w > 0 && out_h > 0, "resize to an empty {out_w}x{out_h}");
    if (out_w, out_h) == (img.width, img.height) && (coord_scale.is_none() || coord_scale == Some(1.0)) {
        return img.clone();
    }
    let xt = axis_taps(img.width, out_w, mode, coord_scale);
    let yt = axis_taps(img.height, out_h, mode, coord_scale);
    Rgb { width: out_w, height: out_h, data: apply_separable(&img.data, img.width, img.height, 3, &xt, &yt) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ramp(w: usize, h: usize) -> Rgb {
        let data = (0..h).flat_map(|y| (0..w).flat_map(move |x| [x as f32 * 0.05, y as f32 * 0.03, 0.5])).collect();
        Rgb { width: w, height: h, data }
    }

    #[test]
    fn a_constant_stays_constant() {
        let img = Rgb { width: 13, height: 9, data: [0.2f32, 0.6, 0.9].repeat(13 * 9) };
        for mode in [Mode::Area, Mode::Bilinear, Mode::Bicubic] {
            for (w, h, s) in [(6, 4, None), (29, 17, None), (19, 13, Some(1.5)), (2, 1, Some(0.15))] {
                let out = resize(&img, w, h, mode, s);
                assert_eq!((out.width, out.height), (w, h));
                for px in out.data.chunks(3) {
                    assert!((px[0] - 0.2).abs() < 1e-5 && (px[1] - 0.6).abs() < 1e-5 && (px[2] - 0.9).abs() < 1e-5, "{mode:?} {px:?}");
                }
            }
        }
    }

    #[test]
    fn bilinear_keeps_a_ramp_linear_inside() {
        let out = resize(&ramp(16, 12), 24, 18, Mode::Bilinear, None);
        // Output x maps to source (x + 0.5) * 16/24 - 0.5; away from the clamped edges the value is
        // 0.05 times that.
        for y in 2..16 {
            for x in 2..22 {
                let sx = (x as f32 + 0.5) * 16.0 / 24.0 - 0.5;
                let sy = (y as f32 + 0.5) * 12.0 / 18.0 - 0.5;
                let px = &out.data[(y * 24 + x) * 3..][..3];
                assert!((px[0] - 0.05 * sx).abs() < 1e-5 && (px[1] - 0.03 * sy).abs() < 1e-5, "({x},{y}) {px:?}");
            }
        }
    }

    #[test]
    fn area_halving_is_the_block_mean() {
        let img = Rgb { width: 6, height: 4, data: (0..72).map(|i| ((i * 7919) % 101) as f32 / 100.0).collect() };
        let out = resize(&img, 3, 2, Mode::Area, None);
        for y in 0..2 {
            for x in 0..3 {
                for c in 0..3 {
                    let v = |dx: usize, dy: usize| img.data[((2 * y + dy) * 6 + 2 * x + dx) * 3 + c];
                    let want = (v(0, 0) + v(1, 0) + v(0, 1) + v(1, 1)) / 4.0;
                    assert!((out.data[(y * 3 + x) * 3 + c] - want).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn bicubic_upscale_of_an_impulse_gives_pytorch_weights() {
        // Upscaling by 2 puts outputs 2, 3, 4 at sources 0.75, 1.25, 1.75: an impulse at source 2
        // is their last, third and third tap. PyTorch's (A = -0.75) taps at t = 0.25 are
        // [-0.10546875, 0.87890625, 0.26171875, -0.03515625]; t = 0.75 is the mirror image.
        let mut img = Rgb { width: 8, height: 1, data: vec![0.0; 24] };
        img.data[2 * 3] = 1.0;
        let out = resize(&img, 16, 2, Mode::Bicubic, None);
        for (x, want) in [(2, -0.10546875), (3, 0.26171875), (4, 0.87890625)] {
            assert!((out.data[x * 3] as f64 - want).abs() < 1e-6, "output {x}: {}", out.data[x * 3]);
        }
    }

    #[test]
    fn random_scales_stay_in_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..500 {
            let (s, _) = random_scale_and_mode(&mut rng, &RESIZE1);
            assert!((0.15..=1.5).contains(&s));
            let (s, _) = random_scale_and_mode(&mut rng, &RESIZE2);
            assert!((0.3..=1.2).contains(&s));
        }
    }
}
