//! FLUX's autoencoder over images of any size at a memory cost set by the tile, not the image.
//!
//! Design decisions a reader would otherwise have to reverse-engineer:
//! - Geometry is in latent cells (`f` image pixels each), so that tiles start on the encoder's
//!   stride grid and every layer's resolution is an integer multiple of the latent's. Cores of
//!   equal size overlap by `overlap` cells (`sr::tiling::tiles`); each runs on its core plus
//!   `context` cells on every side that borders another tile, and only the core is kept.
//!   Neighbouring cores are blended with the raised-cosine window of `sr::tiling::window`, the
//!   one the sampler blends its velocities with, so any disagreement between tiles is spread
//!   over the overlap instead of cut at a line.
//! - GroupNorm is the one non-local op besides the mid-block attention: normalising a tile over
//!   itself equalises its colour and contrast with every other tile's (diffusers' tiling,
//!   `PerTile`). Whole-image statistics are gathered per tile over the cells it owns (overlaps
//!   split at their middle, so every cell counts once; `Backend::group_norm_stats` over that
//!   window at the layer's resolution) and merged over tiles in f64 (Chan's formula).
//! - A layer's statistics depend on the statistics of the layers before it, so one pass cannot
//!   gather what it must already apply. Fixed statistics (`Fixed`, applied with
//!   `Backend::group_norm_apply`) gathered in one state and applied in another are off by a
//!   little at every layer, and through 30 GroupNorms without renormalisation that compounds:
//!   measured on random weights, a downsampled estimate (Tiled VAE's fast mode) or a first pass
//!   of self-normalised tiles both land further from the whole image than per-tile statistics,
//!   and refinement passes oscillate. They become exact only after one refinement per layer
//!   (layer k's input depends on the layers before it only): `Exact`, the test of the machinery
//!   (with the mid-block attention off and a context covering the receptive field the tiles
//!   then equal the whole-image pass up to float rounding).
//! - The default, `Matched`, keeps per-tile normalisation's self-correction and removes its
//!   equalisation: a first pass of self-normalised tiles measures, per layer and group, each
//!   tile's own (mean, std) over its region and the whole image's (merged over owned cells);
//!   the output pass normalises each tile over itself and then scales by std_tile / std_image
//!   and shifts by (mean_tile - mean_image) / std_image, so a tile of sky stays as flat and as
//!   bright relative to a tile of forest as in the whole image. Where the two passes' states
//!   agree this is exactly the whole image's normalisation. Two passes.
//! - The mid-block attention runs per tile, over the core and its context: the one
//!   approximation that no statistics remove (global attention over 262k latent tokens at 4096
//!   pixels is out of reach).
//! - Memory: one tile's activations on the device; on the host the input, the output and its
//!   blending weights. A device out of memory halves the tile and starts again.

use super::flux_ae::{FluxAe, GroupNorm, Norms, EPS};
use super::AeDirection;
use crate::backend::error::DeviceOutOfMemory;
use crate::backend::Backend;
use crate::sr::resample::resize_planes;
use crate::sr::tiling::{tiles, window, Tile};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use loaders::{HostData, HostTensor};
use std::borrow::Cow;
use std::ops::Range;

/// How GroupNorm statistics reach the tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statistics {
    /// Each tile normalises over itself (diffusers' tiling): tiles differ in colour and contrast.
    PerTile,
    /// Each tile normalises over itself, then is brought to its level within the whole image:
    /// per layer and group, its mean and standard deviation relative to the whole image's, as a
    /// first pass of self-normalised tiles measured them.
    Matched,
    /// Fixed statistics of the whole image, estimated as `estimate` says and refined by
    /// `refinements` tiled passes that apply them and gather new ones.
    Fixed { estimate: Estimate, refinements: usize },
    /// Fixed, refined once per GroupNorm layer: every layer's statistics are the whole image's.
    Exact,
}

/// Where shared statistics start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Estimate {
    /// One pass over the whole input area-downsampled to a tile (Tiled VAE's fast mode): cheap,
    /// but a downsampled image's features are smoother than the full-size ones'.
    Downsampled,
    /// A tiled pass in which every tile normalises over itself and gathers each layer's
    /// statistics over the cells it owns: the full-size features, for one more pass.
    Tiles,
}

/// How to cut an encode or decode into tiles. Sides are in image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileOptions {
    /// Core side of a tile; `Some(0)`: the whole image at once; None: the largest tile whose
    /// memory plan fits `max_memory`, at most `DEFAULT_MAX_TILE` (the whole image when that
    /// tile's context would cover it).
    pub tile: Option<usize>,
    /// Pixels blended between neighbouring tiles.
    pub overlap: usize,
    /// Pixels computed around each tile and cropped off.
    pub context: usize,
    pub statistics: Statistics,
    /// Bytes the tile's activations may take; None: the backend's free memory.
    pub max_memory: Option<u64>,
}

/// The default tile's largest side (pixels): with the default 64 pixels of context a 512-pixel
/// region, which keeps a CPU decode at FLUX's shapes under 1.5 GB resident (README, *Tiled
/// autoencoder*) and is large enough to keep a GPU busy.
pub const DEFAULT_MAX_TILE: usize = 384;

/// The share of the memory budget a tile's planned activations may take: the rest is headroom
/// for what the plan does not see (allocator slack, the CPU's convolution scratch).
pub const BUDGET_SHARE: f64 = 0.6;

/// Whether a tile of `tile` pixels with `context` pixels on every side covers an image whose
/// longer side is `side` pixels: a default tile then runs the image whole, at the same cost.
pub fn covers(tile: usize, context: usize, side: usize) -> bool {
    tile + 2 * context >= side
}

impl Default for TileOptions {
    fn default() -> Self {
        TileOptions { tile: None, overlap: 32, context: 64, statistics: Statistics::Matched, max_memory: None }
    }
}

/// What a tiled encode or decode produced and how.
#[derive(Debug, Clone)]
pub struct Tiled {
    pub output: HostTensor,
    /// The core tile side used, in pixels; None: the whole image in one pass.
    pub tile: Option<usize>,
    pub tiles: usize,
    /// Passes over the tiles (refinements and the output pass).
    pub passes: usize,
    /// The output rows and columns where a tile's core starts or ends (image edges excluded):
    /// where seams would show.
    pub seams: (Vec<usize>, Vec<usize>),
}

impl Tiled {
    /// The output of one whole-image pass.
    pub fn whole(output: HostTensor) -> Self {
        Tiled { output, tile: None, tiles: 1, passes: 1, seams: (Vec::new(), Vec::new()) }
    }
}

/// Tiles in latent cells, with the cells each owns for the statistics.
struct Layout {
    /// Latent grid.
    h: usize,
    w: usize,
    overlap: usize,
    jobs: Vec<Job>,
}

struct Job {
    core: Tile,
    /// The core with its context, clipped to the grid.
    region: Tile,
    /// The cells whose statistics this tile gathers, relative to `region`.
    own: Tile,
}

/// Where each of `starts` (ascending, windows of `size`) stops owning cells: the middle of
/// its overlap with the next, `len` for the last.
fn ownership(starts: &[usize], size: usize, len: usize) -> Vec<Range<usize>> {
    let ends: Vec<usize> = starts.windows(2).map(|p| (p[1] + p[0] + size) / 2).chain([len]).collect();
    starts.iter().enumerate().map(|(i, _)| if i == 0 { 0 } else { ends[i - 1] }..ends[i]).collect()
}

impl Layout {
    fn new(h: usize, w: usize, tile: usize, overlap: usize, context: usize) -> Self {
        // More overlap than half a tile only repeats work.
        let overlap = overlap.min(tile / 2);
        // Per axis the fewest tiles of at most `tile` cells, then shrunk to share the length
        // evenly: tiles of the full side would overlap by more than asked and cost more.
        let axis = |len: usize| -> (Vec<usize>, usize) {
            let n = tiles(len, 1, tile, overlap).len();
            let even = tiles(len, 1, (len + (n - 1) * overlap).div_ceil(n), overlap);
            (even.iter().map(|t| t.y).collect(), even[0].h)
        };
        let ((ys, th), (xs, tw)) = (axis(h), axis(w));
        let (own_y, own_x) = (ownership(&ys, th, h), ownership(&xs, tw, w));
        let cores = ys.iter().flat_map(|&y| xs.iter().map(move |&x| Tile { y, x, h: th, w: tw }));
        let jobs = cores
            .map(|core| {
                let (y0, x0) = (core.y.saturating_sub(context), core.x.saturating_sub(context));
                let region = Tile { y: y0, x: x0, h: (core.y + core.h + context).min(h) - y0, w: (core.x + core.w + context).min(w) - x0 };
                let oy = &own_y[ys.binary_search(&core.y).expect("a tile's row start")];
                let ox = &own_x[xs.binary_search(&core.x).expect("a tile's column start")];
                let own = Tile { y: oy.start - y0, x: ox.start - x0, h: oy.len(), w: ox.len() };
                Job { core, region, own }
            })
            .collect();
        Layout { h, w, overlap, jobs }
    }

    /// Rows and columns (at `s` output cells per latent cell) where a core starts or ends.
    fn seams(&self, s: usize) -> (Vec<usize>, Vec<usize>) {
        let lines = |edges: &mut dyn Iterator<Item = usize>, len: usize| {
            let mut v: Vec<usize> = edges.filter(|&e| e > 0 && e < len).map(|e| e * s).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let rows = lines(&mut self.jobs.iter().flat_map(|j| [j.core.y, j.core.y + j.core.h]), self.h);
        let cols = lines(&mut self.jobs.iter().flat_map(|j| [j.core.x, j.core.x + j.core.w]), self.w);
        (rows, cols)
    }
}

/// Per-(sample, group) running moments of one GroupNorm layer over the tiles gathered so far.
#[derive(Debug, Clone)]
struct Moments {
    count: f64,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl Moments {
    /// Adds a window of `count` values per group with the given (mean, variance) pairs.
    fn merge(&mut self, count: f64, stats: &[f32]) {
        let total = self.count + count;
        for (i, s) in stats.chunks(2).enumerate() {
            let delta = s[0] as f64 - self.mean[i];
            self.mean[i] += delta * count / total;
            self.m2[i] += s[1] as f64 * count + delta * delta * self.count * count / total;
        }
        self.count = total;
    }

    /// `[batch, groups, 2]` of (mean, 1 / sqrt(variance + eps)), as `group_norm_apply` takes them.
    fn normalisation(&self, batch: usize) -> HostTensor {
        let data = self.mean.iter().zip(&self.m2).flat_map(|(m, m2)| [*m as f32, (1.0 / (m2 / self.count + EPS as f64).sqrt()) as f32]);
        HostTensor::from_f32(vec![batch, self.mean.len() / batch, 2], data.collect())
    }
}

/// How the GroupNorms of one tile's pass normalise.
enum Normalise<'a, B: Backend> {
    /// Over the tile itself.
    Own,
    /// With fixed `group_norm_apply` statistics, one tensor per layer.
    Fixed(&'a [Tensor<B>]),
    /// Over the tile itself, then scaled and shifted by the tile's place in the whole image: per
    /// layer, (scale, shift) pairs per (sample, group) (`Statistics::Matched`).
    Matched(&'a [Vec<f32>]),
}

/// The GroupNorms of one pass over one tile (or the whole downsampled input): normalise as
/// `normalise` says, and gather each layer's statistics over the owned cells (merged over tiles)
/// and over the whole region (the tile's own) when asked.
struct TileNorms<'a, B: Backend> {
    normalise: Normalise<'a, B>,
    gather: Option<&'a mut Vec<Moments>>,
    own_stats: Option<&'a mut Vec<Vec<f32>>>,
    /// The region's size in latent cells (a layer's resolution is a multiple of it).
    region: (usize, usize),
    own: Tile,
    layer: usize,
}

impl<'a, B: Backend> TileNorms<'a, B> {
    /// `job`'s normalisation, gathering and recording nothing.
    fn new(job: &Job, normalise: Normalise<'a, B>) -> Self {
        TileNorms { normalise, gather: None, own_stats: None, region: (job.region.h, job.region.w), own: job.own, layer: 0 }
    }
}

/// `1 / sqrt(variance + eps)`.
fn rstd(variance: f32) -> f32 {
    1.0 / (variance + EPS).sqrt()
}

impl<B: Backend> Norms<B> for TileNorms<'_, B> {
    fn group_norm(&mut self, b: &B, norm: &GroupNorm<B>, x: &Tensor<B>) -> Result<Tensor<B>> {
        let layer = self.layer;
        self.layer += 1;
        let (height, width) = (x.dim(2), x.dim(3));
        if let Some(gathered) = self.gather.as_deref_mut() {
            let r = height / self.region.0;
            ensure!(
                x.rank() == 4 && height == r * self.region.0 && width == r * self.region.1,
                "tiled autoencoder: GroupNorm {layer} input {:?} is not a multiple of the {}x{} latent region",
                x.shape(),
                self.region.0,
                self.region.1
            );
            let (rows, cols) = (self.own.y * r..(self.own.y + self.own.h) * r, self.own.x * r..(self.own.x + self.own.w) * r);
            let count = (x.dim(1) / norm.groups * rows.len() * cols.len()) as f64;
            let stats = b.download(&b.group_norm_stats(x, norm.groups, rows, cols)?)?.to_f32();
            if gathered.len() == layer {
                gathered.push(Moments { count: 0.0, mean: vec![0.0; stats.len() / 2], m2: vec![0.0; stats.len() / 2] });
            }
            gathered[layer].merge(count, &stats);
        }
        let region_stats = || -> Result<Vec<f32>> { Ok(b.download(&b.group_norm_stats(x, norm.groups, 0..height, 0..width)?)?.to_f32()) };
        if let Some(own_stats) = self.own_stats.as_deref_mut() {
            own_stats.push(region_stats()?);
        }
        match self.normalise {
            Normalise::Own => b.group_norm(x, norm.groups, &norm.weight, &norm.bias, EPS),
            Normalise::Fixed(stats) => b.group_norm_apply(x, &stats[layer], &norm.weight, &norm.bias),
            Normalise::Matched(relative) => {
                // (x - mean) / std * scale + shift as one normalisation: mean - shift * std / scale
                // and scale / std.
                let current = region_stats()?;
                let stats: Vec<f32> = current
                    .chunks(2)
                    .zip(relative[layer].chunks(2))
                    .flat_map(|(c, m)| {
                        let std = 1.0 / rstd(c[1]);
                        [c[0] - m[1] * std / m[0], m[0] / std]
                    })
                    .collect();
                let shape = vec![x.dim(0), norm.groups, 2];
                b.group_norm_apply(x, &b.upload(&HostTensor::from_f32(shape, stats))?, &norm.weight, &norm.bias)
            }
        }
    }
}

/// Per layer, the (scale, shift) pairs that take a tile normalised over itself to its place in
/// the whole image: scale = std_tile / std_image, shift = (mean_tile - mean_image) / std_image,
/// from the tile's own statistics and the image's, measured in the same pass.
fn relative(own: &[Vec<f32>], image: &[Moments]) -> Vec<Vec<f32>> {
    own.iter()
        .zip(image)
        .map(|(tile, m)| {
            let whole = m.normalisation(1).to_f32();
            tile.chunks(2).zip(whole.chunks(2)).flat_map(|(t, w)| [w[1] / rstd(t[1]), (t[0] - w[0]) * w[1]]).collect()
        })
        .collect()
}

/// `[B, C, H, W]` rows `rows`, columns `cols`.
fn crop(t: &HostTensor, rows: Range<usize>, cols: Range<usize>) -> HostTensor {
    let (n, c, h, w) = (t.shape[0], t.shape[1], t.shape[2], t.shape[3]);
    let v: Cow<[f32]> = match &t.data {
        HostData::F32(v) => Cow::Borrowed(v),
        _ => Cow::Owned(t.to_f32()),
    };
    let mut out = Vec::with_capacity(n * c * rows.len() * cols.len());
    for plane in v.chunks(h * w) {
        for y in rows.clone() {
            out.extend_from_slice(&plane[y * w + cols.start..y * w + cols.end]);
        }
    }
    HostTensor::from_f32(vec![n, c, rows.len(), cols.len()], out)
}

impl<B: Backend> FluxAe<B> {
    /// Image pixels of context that make every tile's core equal the whole-image pass (with
    /// shared exact statistics and the mid-block attention off): the receptive field of the
    /// convolutions along one direction, counted at the image's resolution.
    pub fn receptive_field(&self, direction: AeDirection) -> usize {
        let p = &self.params;
        let levels = p.ch_mult.len();
        let f = p.downscale();
        // Pixels one 3x3 conv reaches at a layer whose cells are `s` pixels wide: s.
        match direction {
            AeDirection::Encode => {
                // conv_in; per level its blocks' convs, then the stride-2 conv after BFL's (0, 1, 0,
                // 1) pad, which reads two cells ahead; then the mid block and conv_out.
                let mut px = 1;
                for level in 0..levels {
                    let s = 1 << level;
                    px += 2 * p.num_res_blocks * s + if level + 1 < levels { 2 * s } else { 0 };
                }
                px + (4 + 1) * f
            }
            AeDirection::Decode => {
                // conv_in and the mid block at the latent's resolution, each level's blocks and the
                // conv after its upsampling, then conv_out at full resolution.
                let mut px = (1 + 4) * f;
                for level in (0..levels).rev() {
                    let s = 1 << level;
                    px += 2 * (p.num_res_blocks + 1) * s + if level > 0 { s / 2 } else { 0 };
                }
                px + 1
            }
        }
    }

    /// Encodes an image `[B, 3, H, W]` or decodes a latent `[B, C, h, w]` (host tensors, shapes
    /// checked by the caller) as `opts` says.
    pub(super) fn run_tiled(
        &self,
        b: &B,
        input: &HostTensor,
        direction: AeDirection,
        opts: &TileOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tiled> {
        let f = self.params.downscale();
        let (h, w) = match direction {
            AeDirection::Encode => (input.shape[2] / f, input.shape[3] / f),
            AeDirection::Decode => (input.shape[2], input.shape[3]),
        };
        let mut tile = match opts.tile {
            Some(px) => px.div_ceil(f),
            None => {
                let px = self.default_tile(b, input.shape[0], direction, opts)?;
                if covers(px, opts.context, h.max(w) * f) {
                    0
                } else {
                    px.div_ceil(f)
                }
            }
        };
        loop {
            let whole = tile == 0 || (tile >= h && tile >= w);
            let attempt = if whole {
                self.whole(b, input, direction).map(Tiled::whole)
            } else {
                let layout = Layout::new(h, w, tile, opts.overlap.div_ceil(f), opts.context.div_ceil(f));
                let s = if direction == AeDirection::Decode { f } else { 1 };
                self.tiled(b, input, direction, &layout, opts.statistics, progress).map(|(output, passes)| Tiled {
                    output,
                    tile: Some(tile * f),
                    tiles: layout.jobs.len(),
                    passes,
                    seams: layout.seams(s),
                })
            };
            match attempt {
                Err(e) if e.chain().any(|c| c.is::<DeviceOutOfMemory>()) && (if whole { h.max(w) } else { tile }) > 1 => {
                    tile = if whole { h.max(w) } else { tile }.div_ceil(2);
                }
                result => return result,
            }
        }
    }

    fn whole(&self, b: &B, input: &HostTensor, direction: AeDirection) -> Result<HostTensor> {
        let x = b.input(input)?;
        b.download(&match direction {
            AeDirection::Encode => self.encode_with(b, &x, &mut super::flux_ae::OwnStatistics)?,
            AeDirection::Decode => self.decode_with(b, &x, &mut super::flux_ae::OwnStatistics)?,
        })
    }

    /// The default tile side in pixels: the largest of a ladder, at most `DEFAULT_MAX_TILE`,
    /// whose planned activations (a tile with its context, on the shapes-only backend) fit
    /// `BUDGET_SHARE` of the budget; the smallest rung when none fits.
    fn default_tile(&self, b: &B, batch: usize, direction: AeDirection, opts: &TileOptions) -> Result<usize> {
        let budget = match opts.max_memory {
            Some(bytes) => bytes,
            None => match b.free_memory()? {
                Some(bytes) => bytes,
                None => return Ok(DEFAULT_MAX_TILE),
            },
        };
        crate::perf::ae_tile_for_budget(
            &self.params,
            batch,
            direction,
            b.activation_dtype(),
            opts.context,
            (budget as f64 * BUDGET_SHARE) as u64,
        )
    }

    /// One pass over a tile's region with the given statistics, gathering into `gather`.
    fn tile_pass(&self, b: &B, input: &HostTensor, direction: AeDirection, job: &Job, mut norms: TileNorms<B>) -> Result<HostTensor> {
        let s = if direction == AeDirection::Encode { self.params.downscale() } else { 1 };
        let r = &job.region;
        let x = b.input(&crop(input, r.y * s..(r.y + r.h) * s, r.x * s..(r.x + r.w) * s))?;
        b.download(&match direction {
            AeDirection::Encode => self.encode_with(b, &x, &mut norms)?,
            AeDirection::Decode => self.decode_with(b, &x, &mut norms)?,
        })
    }

    /// Every layer's statistics from the whole input area-downsampled to fit one tile.
    fn estimate(&self, b: &B, input: &HostTensor, direction: AeDirection, layout: &Layout) -> Result<Vec<Moments>> {
        let tile = layout.jobs[0].core.h.max(layout.jobs[0].core.w);
        let d = layout.h.max(layout.w).div_ceil(tile);
        let (h, w) = (layout.h.div_ceil(d), layout.w.div_ceil(d));
        let s = if direction == AeDirection::Encode { self.params.downscale() } else { 1 };
        let (n, c) = (input.shape[0], input.shape[1]);
        let small = resize_planes(&input.to_f32(), n * c, (input.shape[2], input.shape[3]), (h * s, w * s));
        let small = HostTensor::from_f32(vec![n, c, h * s, w * s], small);
        let mut gathered = Vec::new();
        let all = Job { core: Tile { y: 0, x: 0, h, w }, region: Tile { y: 0, x: 0, h, w }, own: Tile { y: 0, x: 0, h, w } };
        let norms = TileNorms { gather: Some(&mut gathered), ..TileNorms::new(&all, Normalise::Own) };
        self.tile_pass(b, &small, direction, &all, norms)?;
        Ok(gathered)
    }

    /// The tiled passes: statistics first (per `statistics`), then the output, blended.
    /// Returns the output and the number of tiled passes.
    fn tiled(
        &self,
        b: &B,
        input: &HostTensor,
        direction: AeDirection,
        layout: &Layout,
        statistics: Statistics,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(HostTensor, usize)> {
        let batch = input.shape[0];
        let tiles = layout.jobs.len();
        // Fixed statistics start from the downsampled estimate, or from a first gathering pass
        // of self-normalised tiles (as Matched does); then each pass applies and gathers.
        let mut fixed = match statistics {
            Statistics::Fixed { estimate: Estimate::Downsampled, .. } | Statistics::Exact => {
                Some(self.estimate(b, input, direction, layout)?)
            }
            _ => None,
        };
        let gathering = match statistics {
            Statistics::PerTile => 0,
            Statistics::Matched => 1,
            Statistics::Fixed { estimate: Estimate::Downsampled, refinements } => refinements,
            Statistics::Fixed { estimate: Estimate::Tiles, refinements } => refinements + 1,
            Statistics::Exact => fixed.as_ref().map_or(0, Vec::len),
        };
        let first = usize::from(fixed.is_some());
        let total = first + (gathering + 1) * tiles;
        progress(first, total);
        let mut own_stats: Vec<Vec<Vec<f32>>> = Vec::new();
        for pass in 0..gathering {
            let uploaded = upload_all(b, fixed.as_deref(), batch)?;
            let mut gathered = Vec::new();
            for (k, job) in layout.jobs.iter().enumerate() {
                let normalise = uploaded.as_deref().map_or(Normalise::Own, Normalise::Fixed);
                let mut own = Vec::new();
                let record = (statistics == Statistics::Matched).then_some(&mut own);
                let norms = TileNorms { gather: Some(&mut gathered), own_stats: record, ..TileNorms::new(job, normalise) };
                self.tile_pass(b, input, direction, job, norms)?;
                if statistics == Statistics::Matched {
                    own_stats.push(own);
                }
                progress(first + pass * tiles + k + 1, total);
            }
            fixed = Some(gathered);
        }
        let uploaded = match statistics {
            Statistics::Fixed { .. } | Statistics::Exact => upload_all(b, fixed.as_deref(), batch)?,
            _ => None,
        };
        let (s, channels) = match direction {
            AeDirection::Encode => (1, self.params.z_channels),
            AeDirection::Decode => (self.params.downscale(), self.params.out_ch),
        };
        let (oh, ow) = (layout.h * s, layout.w * s);
        let (mut acc, mut weights) = (vec![0f32; batch * channels * oh * ow], vec![0f32; oh * ow]);
        for (k, job) in layout.jobs.iter().enumerate() {
            let matched = match (statistics, &fixed) {
                (Statistics::Matched, Some(image)) => Some(relative(&own_stats[k], image)),
                _ => None,
            };
            let normalise = match (&uploaded, &matched) {
                (Some(fixed), _) => Normalise::Fixed(fixed),
                (None, Some(matched)) => Normalise::Matched(matched),
                (None, None) => Normalise::Own,
            };
            let out = self.tile_pass(b, input, direction, job, TileNorms::new(job, normalise))?;
            let (core, region) = (job.core, job.region);
            let out = crop(
                &out,
                (core.y - region.y) * s..(core.y - region.y + core.h) * s,
                (core.x - region.x) * s..(core.x - region.x + core.w) * s,
            );
            let scaled = Tile { y: core.y * s, x: core.x * s, h: core.h * s, w: core.w * s };
            let win = window(scaled, oh, ow, layout.overlap * s);
            let v = out.to_f32();
            for (plane, tile_plane) in v.chunks(scaled.h * scaled.w).enumerate() {
                let dst = &mut acc[plane * oh * ow..(plane + 1) * oh * ow];
                for i in 0..scaled.h {
                    let row = (scaled.y + i) * ow + scaled.x;
                    for j in 0..scaled.w {
                        dst[row + j] += win[i * scaled.w + j] * tile_plane[i * scaled.w + j];
                    }
                }
            }
            for i in 0..scaled.h {
                for j in 0..scaled.w {
                    weights[(scaled.y + i) * ow + scaled.x + j] += win[i * scaled.w + j];
                }
            }
            progress(first + gathering * tiles + k + 1, total);
        }
        for plane in acc.chunks_mut(oh * ow) {
            plane.iter_mut().zip(&weights).for_each(|(v, w)| *v /= w);
        }
        Ok((HostTensor::from_f32(vec![batch, channels, oh, ow], acc), gathering + 1))
    }
}

/// The gathered statistics as `group_norm_apply` operands, one per layer; None stays None.
fn upload_all<B: Backend>(b: &B, moments: Option<&[Moments]>, batch: usize) -> Result<Option<Vec<Tensor<B>>>> {
    moments.map(|ms| ms.iter().map(|m| b.upload(&m.normalisation(batch))).collect()).transpose()
}

/// The seam figure of `image` `[B, C, H, W]`: the mean absolute difference between neighbouring
/// pixels across `rows` (between row y - 1 and y) and `cols`, over the mean across every other
/// row and column whose index is a multiple of `period`. 1.0: the lines do not stand out from
/// the image's own texture. Tile edges fall on latent cells, whose own edges a decoder may mark
/// (nearest upsampling), so a decoded image is compared with its cell edges only (`period` f).
pub fn seam_ratio(image: &HostTensor, rows: &[usize], cols: &[usize], period: usize) -> f64 {
    let (h, w) = (image.shape[2], image.shape[3]);
    let v = image.to_f32();
    let (mut on, mut off) = ((0f64, 0usize), (0f64, 0usize));
    let mut add = |seam: bool, d: f32| {
        let acc = if seam { &mut on } else { &mut off };
        acc.0 += d.abs() as f64;
        acc.1 += 1;
    };
    for plane in v.chunks(h * w) {
        for y in 0..h {
            for x in 0..w {
                if x > 0 && x % period == 0 {
                    add(cols.contains(&x), plane[y * w + x] - plane[y * w + x - 1]);
                }
                if y > 0 && y % period == 0 {
                    add(rows.contains(&y), plane[y * w + x] - plane[(y - 1) * w + x]);
                }
            }
        }
    }
    (on.0 / on.1.max(1) as f64) / (off.0 / off.1.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cell_is_owned_by_exactly_one_tile() {
        for &(h, w, tile, overlap, context) in &[(20, 14, 6, 2, 3), (9, 9, 4, 3, 0), (33, 17, 8, 4, 18), (5, 40, 16, 5, 2)] {
            let layout = Layout::new(h, w, tile, overlap, context);
            let mut owners = vec![0u32; h * w];
            for job in &layout.jobs {
                let (core, region, own) = (job.core, job.region, job.own);
                assert!(region.y <= core.y && region.x <= core.x && core.y + core.h <= region.y + region.h);
                assert!(core.y - region.y <= context && region.y + region.h - core.y - core.h <= context);
                for y in region.y + own.y..region.y + own.y + own.h {
                    for x in region.x + own.x..region.x + own.x + own.w {
                        assert!(y >= core.y && y < core.y + core.h && x >= core.x && x < core.x + core.w, "owned cell outside the core");
                        owners[y * w + x] += 1;
                    }
                }
            }
            assert!(owners.iter().all(|&n| n == 1), "{h}x{w} tile {tile}: {owners:?}");
        }
    }

    #[test]
    fn merged_moments_equal_the_moments_of_the_union() {
        let data: Vec<f64> = (0..50).map(|i| ((i * 37) % 17) as f64 * 0.3 - 2.0 + (i / 25) as f64 * 5.0).collect();
        let moments = |v: &[f64]| {
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            (mean, v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64)
        };
        let mut m = Moments { count: 0.0, mean: vec![0.0], m2: vec![0.0] };
        for part in [&data[..7], &data[7..30], &data[30..]] {
            let (mean, var) = moments(part);
            m.merge(part.len() as f64, &[mean as f32, var as f32]);
        }
        let (mean, var) = moments(&data);
        assert!((m.mean[0] - mean).abs() < 1e-6 && (m.m2[0] / m.count - var).abs() < 1e-5, "{m:?} vs {mean} {var}");
        let n = m.normalisation(1).to_f32();
        assert!((n[1] as f64 - 1.0 / (var + EPS as f64).sqrt()).abs() < 1e-5);
    }
}
