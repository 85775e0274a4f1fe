//! Overlapping tiles over a latent grid and their blending weights. Every step of sampling
//! evaluates the model per tile and blends the velocities with these weights, so that all tiles
//! integrate one shared trajectory and no seam can form (MultiDiffusion's way, as DiffBIR and
//! SUPIR tile).

/// A window of a grid: rows `y..y + h`, columns `x..x + w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub y: usize,
    pub x: usize,
    pub h: usize,
    pub w: usize,
}

/// Start offsets of windows of `size` covering `0..len` with at least `overlap` shared cells
/// between neighbours, spread evenly, the last one flush with the end.
fn starts(len: usize, size: usize, overlap: usize) -> Vec<usize> {
    if len <= size {
        return vec![0];
    }
    let stride = (size - overlap.min(size - 1)).max(1);
    let n = (len - size).div_ceil(stride) + 1;
    (0..n).map(|i| (i * (len - size)) / (n - 1)).collect()
}

/// Tiles of at most `size x size` covering an `h x w` grid with `overlap` cells between
/// neighbours; the single tile of a grid no larger than `size` is the whole grid.
pub fn tiles(h: usize, w: usize, size: usize, overlap: usize) -> Vec<Tile> {
    let size = size.max(1);
    let (th, tw) = (size.min(h), size.min(w));
    starts(h, th, overlap).into_iter().flat_map(|y| starts(w, tw, overlap).into_iter().map(move |x| Tile { y, x, h: th, w: tw })).collect()
}

/// Per-cell weight inside a tile: 1 in the middle, falling smoothly (raised cosine) over `ramp`
/// cells towards each edge that borders another tile, never reaching 0 so that every covered
/// cell has positive total weight.
pub fn window(tile: Tile, grid_h: usize, grid_w: usize, ramp: usize) -> Vec<f32> {
    let ramp_1d = |i: usize, len: usize, at_start: bool, at_end: bool| -> f32 {
        let edge =
            |d: usize| if ramp == 0 || d >= ramp { 1.0 } else { 0.5 - 0.5 * (std::f32::consts::PI * (d as f32 + 0.5) / ramp as f32).cos() };
        let a = if at_start { 1.0 } else { edge(i) };
        let b = if at_end { 1.0 } else { edge(len - 1 - i) };
        (a * b).max(1e-3)
    };
    let (top, left) = (tile.y == 0, tile.x == 0);
    let (bottom, right) = (tile.y + tile.h == grid_h, tile.x + tile.w == grid_w);
    (0..tile.h).flat_map(|i| (0..tile.w).map(move |j| ramp_1d(i, tile.h, top, bottom) * ramp_1d(j, tile.w, left, right))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_grid_with_the_requested_overlap() {
        for &(h, w, size, overlap) in &[(10, 10, 16, 4), (40, 23, 16, 4), (64, 64, 32, 8), (33, 100, 20, 6)] {
            let ts = tiles(h, w, size, overlap);
            let mut cover = vec![0u32; h * w];
            for t in &ts {
                assert!(t.y + t.h <= h && t.x + t.w <= w && t.h <= size && t.w <= size);
                for i in t.y..t.y + t.h {
                    for j in t.x..t.x + t.w {
                        cover[i * w + j] += 1;
                    }
                }
            }
            assert!(cover.iter().all(|&c| c > 0), "{h}x{w} tile {size}: uncovered cell");
            let xs: Vec<usize> = ts.iter().filter(|t| t.y == 0).map(|t| t.x).collect();
            for pair in xs.windows(2) {
                assert!(
                    pair[0] + size.min(w) >= pair[1] + overlap.min(size - 1),
                    "{h}x{w}: neighbours {pair:?} overlap less than {overlap}"
                );
            }
        }
    }

    /// Blends per-tile outputs `field + offset(tile index)` and returns the result.
    fn blend(field: &[f32], h: usize, w: usize, size: usize, overlap: usize, offset: impl Fn(usize) -> f32) -> Vec<f32> {
        let (mut acc, mut wsum) = (vec![0f32; h * w], vec![0f32; h * w]);
        for (n, t) in tiles(h, w, size, overlap).into_iter().enumerate() {
            let win = window(t, h, w, overlap);
            for i in 0..t.h {
                for j in 0..t.w {
                    let k = (t.y + i) * w + t.x + j;
                    acc[k] += win[i * t.w + j] * (field[k] + offset(n));
                    wsum[k] += win[i * t.w + j];
                }
            }
        }
        acc.iter().zip(&wsum).map(|(a, s)| a / s).collect()
    }

    #[test]
    fn tiles_that_agree_reproduce_flat_and_gradient_fields() {
        let (h, w) = (37, 50);
        let flat = vec![0.7f32; h * w];
        let gradient: Vec<f32> = (0..h * w).map(|k| (k / w) as f32 * 0.1 + (k % w) as f32 * 0.03).collect();
        for field in [flat, gradient] {
            let out = blend(&field, h, w, 16, 6, |_| 0.0);
            for (a, b) in out.iter().zip(&field) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn tiles_that_disagree_meet_without_a_step() {
        // Neighbouring tiles whose outputs differ by 1: a hard cut would jump by 1 (a box window
        // by 1/2) at the border; the ramp spreads the change over the overlap.
        let (h, w) = (40, 52);
        let flat = vec![0f32; h * w];
        let out = blend(&flat, h, w, 16, 8, |n| (n % 2) as f32);
        let mut jump = 0f32;
        for i in 0..h {
            for j in 0..w {
                if j + 1 < w {
                    jump = jump.max((out[i * w + j + 1] - out[i * w + j]).abs());
                }
                if i + 1 < h {
                    jump = jump.max((out[(i + 1) * w + j] - out[i * w + j]).abs());
                }
            }
        }
        assert!(jump < 0.25, "largest step between neighbouring cells: {jump}");
    }
}
