//! Real-ESRGAN's second-order degradation (design.md section 8): an HQ image becomes the LQ image
//! it is trained to restore, with BasicSR's `RealESRGANDataset` / `RealESRGANModel` parameters
//! (`realesrgan_x4plus`).
//!
//! One file per stage, each a pure function on RGB `[h, w, 3]` f32 buffers in [0, 1]; every random
//! draw comes from one `ChaCha8Rng` passed explicitly, so one seed gives the same bytes. The
//! order of the draws is ours (NumPy's and PyTorch's generators are not reproduced), the
//! distributions are BasicSR's. Where we deviate from BasicSR, the stage's header says so; the
//! pipeline does not apply Real-ESRGAN's unsharp mask to the HQ before degrading it.

pub mod filter;
pub mod jpeg;
pub mod kernels;
pub mod noise;
pub mod resize;

use anyhow::{bail, Result};
use loaders::image::Image;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// An RGB image: `height * width * 3` samples, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl Rgb {
    /// The colour channels of `img` (gray replicated, alpha dropped).
    pub fn from_image(img: &Image) -> Rgb {
        let rgb = img.to_rgb();
        Rgb { width: rgb.width, height: rgb.height, data: rgb.data }
    }

    /// As an 8-bit RGB image.
    pub fn into_image(self) -> Image {
        Image::new(self.width, self.height, 3, self.data)
    }
}

/// `img` cropped to `(w, h)` at offset `(x0, y0)`.
pub fn crop(img: &Image, x0: usize, y0: usize, w: usize, h: usize) -> Image {
    assert!(x0 + w <= img.width && y0 + h <= img.height, "crop outside the image");
    let c = img.channels;
    let data = (y0..y0 + h).flat_map(|y| img.data[(y * img.width + x0) * c..(y * img.width + x0 + w) * c].iter().copied()).collect();
    // A copy keeps whatever else the image carries (bit depth, colour profile).
    let mut out = img.clone();
    (out.width, out.height, out.data) = (w, h, data);
    out
}

/// `hq` cropped (top-left) to a multiple of `scale` on both sides, as BasicSR's paired crops do.
pub fn crop_to_multiple(hq: &Image, scale: usize) -> Image {
    crop(hq, 0, 0, hq.width - hq.width % scale, hq.height - hq.height % scale)
}

/// The size `floor(n * s)`, at least 1 (PyTorch would fail on an empty output).
fn scaled(n: usize, s: f64) -> usize {
    ((n as f64 * s).floor() as usize).max(1)
}

/// The LQ image of `hq` (RGB of it, cropped to a multiple of `scale`): exactly `1 / scale` of that
/// crop's size, 8-bit values.
pub fn degrade(hq: &Image, scale: usize, seed: u64) -> Result<Image> {
    if scale == 0 || hq.width < scale || hq.height < scale {
        bail!("a {}x{} image cannot be reduced by {scale}", hq.width, hq.height);
    }
    let hq = Rgb::from_image(&crop_to_multiple(hq, scale));
    let (ori_w, ori_h) = (hq.width, hq.height);
    let rng = &mut ChaCha8Rng::seed_from_u64(seed);

    // The kernels, drawn first as the dataset does.
    let kernel1 = kernels::random_blur_kernel(rng, &kernels::BLUR1);
    let kernel2 = kernels::random_blur_kernel(rng, &kernels::BLUR2);
    let sinc = kernels::random_final_sinc(rng);

    // First round: blur, random resize (by a scale factor), noise, JPEG.
    let mut out = filter::filter2d(&hq, &kernel1);
    let (s, mode) = resize::random_scale_and_mode(rng, &resize::RESIZE1);
    out = resize::resize(&out, scaled(out.width, s), scaled(out.height, s), mode, Some(s));
    out = noise::random_noise(&out, rng, &noise::NOISE1);
    out = jpeg::jpeg(&out, jpeg::random_quality(rng, jpeg::JPEG1))?;

    // Second round: blur with probability 0.8, random resize (to a size relative to the LQ), noise.
    if rng.random::<f64>() < 0.8 {
        out = filter::filter2d(&out, &kernel2);
    }
    let (s, mode) = resize::random_scale_and_mode(rng, &resize::RESIZE2);
    let (w2, h2) = (scaled(ori_w, s / scale as f64), scaled(ori_h, s / scale as f64));
    out = resize::resize(&out, w2, h2, mode, None);
    out = noise::random_noise(&out, rng, &noise::NOISE2);

    // The final sinc + resize to the LQ size and JPEG, in random order.
    let (lq_w, lq_h) = (ori_w / scale, ori_h / scale);
    let resize_first = rng.random::<f64>() < 0.5;
    let mode = resize::random_mode(rng);
    let quality = jpeg::random_quality(rng, jpeg::JPEG2);
    if resize_first {
        out = resize::resize(&out, lq_w, lq_h, mode, None);
        out = filter::filter2d(&out, &sinc);
        out = jpeg::jpeg(&out, quality)?;
    } else {
        out = jpeg::jpeg(&out, quality)?;
        out = resize::resize(&out, lq_w, lq_h, mode, None);
        out = filter::filter2d(&out, &sinc);
    }
    // Clamp and round to 8 bits.
    out.data.iter_mut().for_each(|v| *v = (v.clamp(0.0, 1.0) * 255.0).round() / 255.0);
    Ok(out.into_image())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo(w: usize, h: usize) -> Image {
        let data = (0..h)
            .flat_map(|y| {
                (0..w).flat_map(move |x| {
                    let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
                    [fx, 0.5 + 0.4 * (9.0 * fx * fy).sin(), if (x / 8 + y / 8) % 2 == 0 { 0.8 } else { 0.2 }]
                })
            })
            .collect();
        Image::new(w, h, 3, data)
    }

    #[test]
    fn the_seed_decides_the_output_and_the_size_is_exact() {
        let hq = photo(131, 98);
        for seed in 0..6 {
            let a = degrade(&hq, 4, seed).unwrap();
            assert_eq!((a.width, a.height, a.channels), (32, 24, 3), "seed {seed}");
            assert!(a.data.iter().all(|v| (0.0..=1.0).contains(v)));
            assert_eq!(degrade(&hq, 4, seed).unwrap(), a, "seed {seed} is not deterministic");
            assert_ne!(degrade(&hq, 4, seed + 100).unwrap(), a);
        }
        let two = degrade(&hq, 2, 9).unwrap();
        assert_eq!((two.width, two.height), (65, 49));
    }

    #[test]
    fn gray_and_tiny_inputs() {
        let gray = Image::new(16, 12, 1, vec![0.5; 16 * 12]);
        let lq = degrade(&gray, 4, 1).unwrap();
        assert_eq!((lq.width, lq.height, lq.channels), (4, 3, 3));
        assert_eq!((degrade(&photo(4, 4), 4, 2).unwrap().width), 1);
        assert!(degrade(&photo(3, 8), 4, 2).is_err());
    }
}
