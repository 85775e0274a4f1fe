//! 2-D convolution on the CPU as im2col + GEMM. Output pixels are processed in chunks: each chunk's
//! patches are unfolded into a `[pixels, C kh kw]` matrix (rows built in parallel), multiplied by
//! the weight `[O, C kh kw]` used transposed (the shared parallel `matmul`), and the resulting
//! `[pixels, O]` block is scattered into the NCHW output. Chunking bounds the unfolded matrix to
//! about `COLS_BUDGET` floats whatever the image size; padding is implicit (zeros), never copied.

use super::matmul::{matmul, Rhs};
use crate::backend::shapes::ConvGeometry;
use rayon::prelude::*;

/// Upper bound on the unfolded patch matrix, in f32 elements (64 MiB).
const COLS_BUDGET: usize = 16 << 20;

/// Output pixels transposed per step of the scatter into NCHW.
const SCATTER_TILE: usize = 32;

/// x `[B, C, H, W]`, weight `[O, C, kh, kw]`, bias `[O]` -> `[B, O, OH, OW]`.
pub fn conv2d(x: &[f32], weight: &[f32], bias: Option<&[f32]>, g: &ConvGeometry) -> Vec<f32> {
    let (oh, ow) = (g.oh, g.ow);
    let k = g.cin * g.kh * g.kw;
    let pixels = oh * ow;
    let chunk = (COLS_BUDGET / k.max(1)).clamp(1, pixels.max(1));
    let mut out = vec![0f32; g.batch * g.cout * pixels];
    let mut cols = vec![0f32; chunk * k];
    let mut block = vec![0f32; chunk * g.cout];
    for b in 0..g.batch {
        let xb = &x[b * g.cin * g.h * g.w..(b + 1) * g.cin * g.h * g.w];
        let ob = &mut out[b * g.cout * pixels..(b + 1) * g.cout * pixels];
        for p0 in (0..pixels).step_by(chunk) {
            let n = chunk.min(pixels - p0);
            cols[..n * k].par_chunks_mut(k).enumerate().for_each(|(i, row)| unfold(row, xb, g, (p0 + i) / ow, (p0 + i) % ow));
            let dst = &mut block[..n * g.cout];
            if let Some(bias) = bias {
                dst.chunks_mut(g.cout).for_each(|r| r.copy_from_slice(bias));
            }
            matmul(dst, &cols[..n * k], weight, n, g.cout, k, Rhs::Transposed, bias.is_some(), true);
            // `[pixels, O]` -> O planes, a tile of pixels at a time so that the tile stays in cache.
            for t0 in (0..n).step_by(SCATTER_TILE) {
                let tn = SCATTER_TILE.min(n - t0);
                let tile = &dst[t0 * g.cout..(t0 + tn) * g.cout];
                for (o, plane) in ob.chunks_mut(pixels).enumerate() {
                    for (i, v) in plane[p0 + t0..p0 + t0 + tn].iter_mut().enumerate() {
                        *v = tile[i * g.cout + o];
                    }
                }
            }
        }
    }
    out
}

/// One output pixel's receptive field, laid out (c, ky, kx) like the weight's rows.
fn unfold(row: &mut [f32], xb: &[f32], g: &ConvGeometry, oy: usize, ox: usize) {
    let (top, left) = (g.pad[0] as isize, g.pad[2] as isize);
    let y0 = (oy * g.stride) as isize - top;
    let x0 = (ox * g.stride) as isize - left;
    let mut i = 0;
    for c in 0..g.cin {
        let plane = &xb[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.kh {
            let y = y0 + ky as isize;
            let inside_y = y >= 0 && (y as usize) < g.h;
            for kx in 0..g.kw {
                let xx = x0 + kx as isize;
                row[i] = if inside_y && xx >= 0 && (xx as usize) < g.w { plane[y as usize * g.w + xx as usize] } else { 0.0 };
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook definition, in f64, with explicit bounds checks.
    fn naive(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &ConvGeometry) -> Vec<f64> {
        let oh = (g.h + g.pad[0] + g.pad[1] - g.kh) / g.stride + 1;
        let ow = (g.w + g.pad[2] + g.pad[3] - g.kw) / g.stride + 1;
        let mut out = vec![0f64; g.batch * g.cout * oh * ow];
        for b in 0..g.batch {
            for o in 0..g.cout {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut s = bias.map_or(0.0, |bb| bb[o] as f64);
                        for c in 0..g.cin {
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let y = (oy * g.stride + ky) as isize - g.pad[0] as isize;
                                    let xx = (ox * g.stride + kx) as isize - g.pad[2] as isize;
                                    if y < 0 || xx < 0 || y >= g.h as isize || xx >= g.w as isize {
                                        continue;
                                    }
                                    let xv = x[((b * g.cin + c) * g.h + y as usize) * g.w + xx as usize] as f64;
                                    let wv = w[((o * g.cin + c) * g.kh + ky) * g.kw + kx] as f64;
                                    s += xv * wv;
                                }
                            }
                        }
                        out[((b * g.cout + o) * oh + oy) * ow + ox] = s;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_convolution_on_odd_shapes_strides_and_asymmetric_padding() {
        let cases = [
            // (batch, cin, h, w, cout, kh, kw, stride, pad)
            (2, 3, 7, 9, 5, 3, 3, 1, [1, 1, 1, 1]),
            (1, 4, 8, 11, 3, 3, 3, 2, [0, 1, 0, 1]),
            (3, 2, 9, 6, 4, 3, 3, 2, [0, 1, 0, 1]),
            (2, 5, 5, 7, 6, 1, 1, 1, [0, 0, 0, 0]),
            (1, 3, 6, 5, 2, 2, 3, 3, [2, 0, 1, 3]),
        ];
        for (batch, cin, h, w, cout, kh, kw, stride, pad) in cases {
            let g = ConvGeometry::new(&[batch, cin, h, w], &[cout, cin, kh, kw], None, stride, pad).unwrap();
            let x: Vec<f32> = (0..batch * cin * h * w).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let wt: Vec<f32> = (0..cout * cin * kh * kw).map(|i| ((i * 53 % 97) as f32 - 48.0) / 31.0).collect();
            let bias: Vec<f32> = (0..cout).map(|i| i as f32 * 0.25 - 0.5).collect();
            for bias in [None, Some(bias.as_slice())] {
                let got = conv2d(&x, &wt, bias, &g);
                let want = naive(&x, &wt, bias, &g);
                assert_eq!(got.len(), want.len(), "{g:?}");
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()), "{g:?} at {i}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn chunked_unfolding_covers_every_pixel() {
        // A receptive field larger than the budget allows only a few pixels per chunk.
        let g = ConvGeometry::new(&[1, 1, 3, 5], &[2, 1, 1, 1], None, 1, [0; 4]).unwrap();
        let x: Vec<f32> = (0..15).map(|i| i as f32).collect();
        let got = conv2d(&x, &[1.0, -2.0], Some(&[0.5, 0.0]), &g);
        let want: Vec<f32> = x.iter().map(|v| v + 0.5).chain(x.iter().map(|v| -2.0 * v)).collect();
        assert_eq!(got, want);
    }
}
