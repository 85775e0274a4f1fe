//! Euler integration of the flow from noise (t = 1) to data (t = 0) over a grid of packed latent
//! tokens, evaluated in overlapping tiles whose velocities are blended every step, so that all
//! tiles follow one trajectory (no seams) and memory is bounded by the tile size.

use super::tiling::{tiles, window, Tile};
use anyhow::{ensure, Result};
use loaders::HostTensor;

/// A grid of `rows x cols` tokens with `features` values each, row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub rows: usize,
    pub cols: usize,
    pub features: usize,
}

impl Grid {
    pub fn len(&self) -> usize {
        self.rows * self.cols * self.features
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The model as the sampler sees it: `n` tiles' input `img` `[n, L, features + cond features]`
/// on a grid of `(rows, cols)` tokens each (`L = rows cols`) at time `t` -> velocities
/// `[n * L * features]`.
pub type Velocity<'a> = dyn FnMut(&HostTensor, (usize, usize), f32) -> Result<Vec<f32>> + 'a;

/// Integrates each `x` of `xs` (noise, one per image, all on `grid`) along `schedule` with its
/// LQ condition of `conds` (same rows and columns, `cond_features` each) concatenated on
/// features. `tile` and `overlap` are in tokens. Every tile of every image has the same shape,
/// so the model evaluates up to `batch` of them per call. Calls `progress(step)` after every step.
#[allow(clippy::too_many_arguments)]
pub fn euler_tiled(
    mut xs: Vec<Vec<f32>>,
    conds: &[&[f32]],
    grid: Grid,
    cond_features: usize,
    schedule: &[f32],
    (tile, overlap): (usize, usize),
    batch: usize,
    velocity: &mut Velocity<'_>,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    ensure!(xs.len() == conds.len(), "sampler: {} noise fields for {} conditions", xs.len(), conds.len());
    for (x, cond) in xs.iter().zip(conds) {
        ensure!(x.len() == grid.len(), "sampler: noise has {} values for a {grid:?} grid", x.len());
        ensure!(cond.len() == grid.rows * grid.cols * cond_features, "sampler: condition does not match the grid");
    }
    let plan: Vec<(Tile, Vec<f32>)> =
        tiles(grid.rows, grid.cols, tile, overlap).into_iter().map(|t| (t, window(t, grid.rows, grid.cols, overlap))).collect();
    let jobs: Vec<(usize, usize)> = (0..xs.len()).flat_map(|item| (0..plan.len()).map(move |k| (item, k))).collect();
    let (th, tw) = (plan[0].0.h, plan[0].0.w);
    let l = th * tw;
    let f = grid.features;
    let width = f + cond_features;
    for (step, pair) in schedule.windows(2).enumerate() {
        let (t, t_next) = (pair[0], pair[1]);
        let mut v_sums = vec![vec![0f32; grid.len()]; xs.len()];
        let mut w_sums = vec![vec![0f32; grid.rows * grid.cols]; xs.len()];
        for chunk in jobs.chunks(batch.max(1)) {
            let mut input = Vec::with_capacity(chunk.len() * l * width);
            for &(item, k) in chunk {
                let tile = plan[k].0;
                for i in 0..tile.h {
                    for j in 0..tile.w {
                        let cell = (tile.y + i) * grid.cols + tile.x + j;
                        input.extend_from_slice(&xs[item][cell * f..(cell + 1) * f]);
                        input.extend_from_slice(&conds[item][cell * cond_features..(cell + 1) * cond_features]);
                    }
                }
            }
            let n = chunk.len();
            let img = HostTensor::from_f32(vec![n, l, width], input);
            let v = velocity(&img, (th, tw), t)?;
            ensure!(v.len() == n * l * f, "sampler: the model returned {} values for {n} tiles of {l} tokens x {f}", v.len());
            for (&(item, k), v) in chunk.iter().zip(v.chunks(l * f)) {
                let (tile, win) = (&plan[k].0, &plan[k].1);
                for i in 0..tile.h {
                    for j in 0..tile.w {
                        let (p, cell) = (i * tile.w + j, (tile.y + i) * grid.cols + tile.x + j);
                        for c in 0..f {
                            v_sums[item][cell * f + c] += win[p] * v[p * f + c];
                        }
                        w_sums[item][cell] += win[p];
                    }
                }
            }
        }
        let dt = t_next - t;
        for ((x, v_sum), w_sum) in xs.iter_mut().zip(&v_sums).zip(&w_sums) {
            for (cell, w) in w_sum.iter().enumerate() {
                for c in 0..f {
                    x[cell * f + c] += dt * v_sum[cell * f + c] / w;
                }
            }
        }
        progress(step + 1);
    }
    Ok(xs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::{gaussian_noise, schedule};

    /// The exact velocity of the straight path from `x0` to the current sample: integrating it
    /// must land on `x0` whatever the schedule, because Euler is exact on straight lines.
    fn straight_to(x0: &[f32], x: &[f32], t: f32) -> Vec<f32> {
        x.iter().zip(x0).map(|(xt, x0)| (xt - x0) / t).collect()
    }

    #[test]
    fn straight_paths_land_on_their_target_tiled_or_not() {
        let grid = Grid { rows: 9, cols: 13, features: 2 };
        // The "condition" is the target itself: the velocity reads it from the tile input.
        let target: Vec<f32> = (0..grid.len()).map(|i| ((i * 37) % 11) as f32 / 5.0 - 1.0).collect();
        for (tile, overlap) in [(64, 0), (5, 2), (4, 3)] {
            let mut v = |img: &HostTensor, _: (usize, usize), t: f32| -> Result<Vec<f32>> {
                let d = img.to_f32();
                let x: Vec<f32> = d.chunks(4).flat_map(|c| [c[0], c[1]]).collect();
                let x0: Vec<f32> = d.chunks(4).flat_map(|c| [c[2], c[3]]).collect();
                Ok(straight_to(&x0, &x, t))
            };
            let mut steps = 0;
            // Two images with different targets, their tiles mixed in batches of 3.
            let other: Vec<f32> = target.iter().map(|x| -x).collect();
            let out = euler_tiled(
                vec![gaussian_noise(grid.len(), 1), gaussian_noise(grid.len(), 2)],
                &[&target, &other],
                grid,
                2,
                &schedule(7, 117),
                (tile, overlap),
                3,
                &mut v,
                &mut |s| steps = s,
            )
            .unwrap();
            assert_eq!(steps, 7);
            for (out, target) in out.iter().zip([&target, &other]) {
                for (a, b) in out.iter().zip(target) {
                    assert!((a - b).abs() < 1e-4, "tile {tile}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn tiles_that_disagree_leave_no_step_at_their_borders() {
        // Each tile's model adds a different constant drift; blending must spread the
        // disagreement over the overlaps instead of cutting at tile borders.
        let grid = Grid { rows: 24, cols: 30, features: 1 };
        let cond = vec![0f32; grid.rows * grid.cols];
        let mut calls = 0usize;
        let mut v = |img: &HostTensor, _: (usize, usize), _t: f32| -> Result<Vec<f32>> {
            calls += 1;
            let drift = if calls % 2 == 0 { 1.0 } else { -1.0 };
            Ok(vec![drift; img.shape[1]])
        };
        let out = euler_tiled(vec![vec![0f32; grid.len()]], &[&cond], grid, 1, &[1.0, 0.0], (10, 5), 1, &mut v, &mut |_| ()).unwrap();
        let out = &out[0];
        let mut jump = 0f32;
        for i in 0..grid.rows {
            for j in 0..grid.cols - 1 {
                jump = jump.max((out[i * grid.cols + j + 1] - out[i * grid.cols + j]).abs());
            }
        }
        assert!(jump < 0.6, "largest step between neighbouring tokens: {jump} (tiles disagree by 2)");
    }
}
