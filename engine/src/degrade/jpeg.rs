//! JPEG compression: the image (clamped to [0, 1], rounded to 8 bits) encoded at an integer
//! quality with the `image` crate's baseline encoder and decoded again, all in memory.
//!
//! BasicSR uses `DiffJPEG`, a differentiable re-implementation with a float quality; here a real
//! encoder runs at the quality rounded to an integer. The encoder is pure Rust and deterministic.

use super::Rgb;
use anyhow::{Context, Result};
use image::codecs::jpeg::JpegEncoder;
use image::{ExtendedColorType, ImageFormat};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// `jpeg_range` of both rounds.
pub const JPEG1: [f64; 2] = [30.0, 95.0];
pub const JPEG2: [f64; 2] = [30.0, 95.0];

/// A quality drawn uniformly from `range`, rounded to an integer.
pub fn random_quality(rng: &mut ChaCha8Rng, range: [f64; 2]) -> u8 {
    (range[0] + (range[1] - range[0]) * rng.random::<f64>()).round().clamp(1.0, 100.0) as u8
}

/// `img` through a JPEG encode / decode at `quality` (1..=100).
pub fn jpeg(img: &Rgb, quality: u8) -> Result<Rgb> {
    let bytes: Vec<u8> = img.data.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    let mut buf = Vec::new();
    JpegEncoder::new_with_quality(&mut buf, quality)
        .encode(&bytes, img.width as u32, img.height as u32, ExtendedColorType::Rgb8)
        .with_context(|| format!("cannot JPEG-encode a {}x{} image", img.width, img.height))?;
    let back = image::load_from_memory_with_format(&buf, ImageFormat::Jpeg).context("cannot decode the JPEG just encoded")?.to_rgb8();
    Ok(Rgb { width: img.width, height: img.height, data: back.into_raw().iter().map(|&v| v as f32 / 255.0).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn psnr(a: &Rgb, b: &Rgb) -> f64 {
        let mse = a.data.iter().zip(&b.data).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.data.len() as f64;
        10.0 * (1.0 / mse).log10()
    }

    /// A smooth pattern with some texture, like a photo.
    fn pattern() -> Rgb {
        let (w, h) = (64, 48);
        let data = (0..h)
            .flat_map(|y| {
                (0..w).flat_map(move |x| {
                    let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
                    let t = ((x * 7 + y * 13) % 17) as f32 / 170.0;
                    [0.2 + 0.6 * fx + t, 0.5 + 0.3 * (6.0 * fy).sin(), 0.3 + 0.4 * fx * fy]
                })
            })
            .collect();
        Rgb { width: w, height: h, data }
    }

    #[test]
    fn quality_orders_the_error() {
        let img = pattern();
        let q95 = jpeg(&img, 95).unwrap();
        let q30 = jpeg(&img, 30).unwrap();
        assert_eq!((q95.width, q95.height), (64, 48));
        let (p95, p30) = (psnr(&img, &q95), psnr(&img, &q30));
        assert!(p95 > 30.0, "quality 95: {p95} dB");
        assert!(p30 < p95, "quality 30: {p30} dB, 95: {p95} dB");
        assert_eq!(jpeg(&img, 30).unwrap(), q30, "not deterministic");
    }
}
