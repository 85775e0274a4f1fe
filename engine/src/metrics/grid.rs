//! The grid figure: how much a periodic grid of lines stands out in an image, as a tiled or
//! token-based upscaler leaves one (a 12-pixel grid for a pixel-shuffle-6 model's 2x2 tokens).
//! For a period P, the mean absolute luma step across the lines `x = k P` (between columns
//! `k P - 1` and `k P`) and `y = k P` is divided by the mean step everywhere else; the figure is
//! the largest ratio over the periods 8, 12 and 16. A photograph without a grid gives about 1;
//! a visible grid, clearly more.

use super::Plane;

/// The periods the figure takes its largest ratio over (pixels).
pub const GRID_PERIODS: [usize; 3] = [8, 12, 16];

/// The grid figure of a luma plane: the largest [`grid_ratio`] over [`GRID_PERIODS`].
pub fn grid_figure(y: &Plane) -> f64 {
    GRID_PERIODS.iter().map(|&p| grid_ratio(y, p)).fold(f64::NAN, f64::max)
}

/// The mean absolute step between neighbouring pixels across the lines of a `period` grid,
/// horizontal and vertical steps together, over the mean step everywhere else; NaN for an image
/// too small to hold a line, or one without steps elsewhere.
pub fn grid_ratio(y: &Plane, period: usize) -> f64 {
    let (w, h) = (y.width, y.height);
    let at = |x: usize, r: usize| y.data[r * w + x];
    let (mut on, mut on_n, mut off, mut off_n) = (0.0, 0usize, 0.0, 0usize);
    let mut add = |step: f64, boundary: bool| {
        if boundary {
            on += step;
            on_n += 1;
        } else {
            off += step;
            off_n += 1;
        }
    };
    for r in 0..h {
        for x in 1..w {
            add((at(x, r) - at(x - 1, r)).abs(), x % period == 0);
        }
    }
    for r in 1..h {
        for x in 0..w {
            add((at(x, r) - at(x, r - 1)).abs(), r % period == 0);
        }
    }
    if on_n == 0 || off_n == 0 || off == 0.0 {
        return f64::NAN;
    }
    (on / on_n as f64) / (off / off_n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth ramp with a step of `jump` added at every line of a `period` grid.
    fn gridded(w: usize, h: usize, period: usize, jump: f64) -> Plane {
        let data =
            (0..h).flat_map(|r| (0..w).map(move |x| x as f64 + 2.0 * r as f64 + jump * ((x / period + r / period) as f64))).collect();
        Plane::new(w, h, data)
    }

    /// Closed form on a ramp: steps of 1 (horizontal) and 2 (vertical) everywhere, plus `jump`
    /// across each line, so the ratio is (mean of 1 + j and 2 + j) / (mean of 1 and 2) when the
    /// two directions have as many steps.
    #[test]
    fn a_grid_on_a_ramp_has_the_closed_form_ratio() {
        let (w, period, jump) = (48, 12, 3.0);
        let plane = gridded(w, w, period, jump);
        let want = ((1.0 + jump) + (2.0 + jump)) / 2.0 / 1.5;
        assert!((grid_ratio(&plane, period) - want).abs() < 1e-12, "{} vs {want}", grid_ratio(&plane, period));
        // Lines of another period fall on the 12-grid's only at common multiples: a smaller ratio.
        assert!(grid_ratio(&plane, 8) < grid_ratio(&plane, 12));
        assert_eq!(grid_figure(&plane), grid_ratio(&plane, 12));
        // Without a grid every step is alike: 1 at every period.
        let plain = gridded(w, w, period, 0.0);
        for p in GRID_PERIODS {
            assert!((grid_ratio(&plain, p) - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn planes_too_small_or_flat_give_nan() {
        assert!(grid_ratio(&Plane::new(5, 5, (0..25).map(f64::from).collect()), 8).is_nan());
        assert!(grid_figure(&Plane::new(20, 20, vec![3.0; 400])).is_nan());
    }
}
