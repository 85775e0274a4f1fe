//! Images as interleaved f32 samples in [0, 1]: decoding PNG, JPEG and WebP under explicit size
//! and allocation limits, and atomic PNG writing that keeps 8- or 16-bit depth.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use crate::atomic::write_atomic;
use crate::error::{Error, Result};

/// Largest side and allocation a decoder may use: far above any photo, far below what would
/// exhaust memory.
const MAX_SIDE: u32 = 32_768;
const MAX_ALLOC: u64 = 4 << 30;

/// Row-major `[height, width, channels]` samples in [0, 1]; 1 (gray), 2 (gray + alpha), 3 (RGB)
/// or 4 (RGBA) channels.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<f32>,
    /// Whether the source had 16 bits per sample (written back as 16-bit PNG).
    pub sixteen_bit: bool,
}

impl Image {
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), width * height * channels, "image data does not match {width}x{height}x{channels}");
        Image { width, height, channels, data, sixteen_bit: false }
    }

    /// The colour channels as RGB (gray is replicated, alpha dropped).
    pub fn to_rgb(&self) -> Image {
        let color = if self.channels >= 3 { 3 } else { 1 };
        let data = self.data.chunks(self.channels).flat_map(|px| if color == 3 { [px[0], px[1], px[2]] } else { [px[0]; 3] }).collect();
        Image { width: self.width, height: self.height, channels: 3, data, sixteen_bit: self.sixteen_bit }
    }
}

/// Decodes an image file (format from its content, not its extension).
pub fn read(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, "read", e))?;
    decode(path, &bytes)
}

/// Decodes image bytes; `path` names them in errors.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<Image> {
    let fail = |e: image::ImageError| Error::invalid(path, format!("cannot decode image: {e}"));
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| Error::io(path, "read", e))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    if reader.format().is_none() {
        return Err(Error::invalid(path, "not a PNG, JPEG or WebP image"));
    }
    let decoder = reader.into_decoder().map_err(fail)?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::invalid(path, format!("image has no pixels ({w}x{h})")));
    }
    let img = DynamicImage::from_decoder(decoder).map_err(fail)?;
    Ok(from_dynamic(img))
}

fn from_dynamic(img: DynamicImage) -> Image {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let sixteen_bit = matches!(img.color().bytes_per_pixel() / img.color().channel_count().max(1), 2 | 4);
    let channels = img.color().channel_count() as usize;
    let data: Vec<f32> = match channels {
        1 => img.to_luma32f().into_raw(),
        2 => img.to_luma_alpha32f().into_raw(),
        3 => img.to_rgb32f().into_raw(),
        _ => img.to_rgba32f().into_raw(),
    };
    Image { width, height, channels: channels.min(4), data, sixteen_bit }
}

/// Writes a PNG atomically, rounding samples (clamped to [0, 1]) to 8 or 16 bits.
pub fn write_png(path: &Path, img: &Image, overwrite: bool) -> Result<()> {
    let (w, h) = (img.width as u32, img.height as u32);
    let q8 = |v: &f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    let q16 = |v: &f32| (v.clamp(0.0, 1.0) * 65535.0).round() as u16;
    let dynamic = match (img.channels, img.sixteen_bit) {
        (1, false) => image::GrayImage::from_raw(w, h, img.data.iter().map(q8).collect()).map(DynamicImage::ImageLuma8),
        (2, false) => image::GrayAlphaImage::from_raw(w, h, img.data.iter().map(q8).collect()).map(DynamicImage::ImageLumaA8),
        (3, false) => image::RgbImage::from_raw(w, h, img.data.iter().map(q8).collect()).map(DynamicImage::ImageRgb8),
        (4, false) => image::RgbaImage::from_raw(w, h, img.data.iter().map(q8).collect()).map(DynamicImage::ImageRgba8),
        (1, true) => image::ImageBuffer::from_raw(w, h, img.data.iter().map(q16).collect()).map(DynamicImage::ImageLuma16),
        (2, true) => image::ImageBuffer::from_raw(w, h, img.data.iter().map(q16).collect()).map(DynamicImage::ImageLumaA16),
        (3, true) => image::ImageBuffer::from_raw(w, h, img.data.iter().map(q16).collect()).map(DynamicImage::ImageRgb16),
        (4, true) => image::ImageBuffer::from_raw(w, h, img.data.iter().map(q16).collect()).map(DynamicImage::ImageRgba16),
        _ => None,
    }
    .ok_or_else(|| Error::invalid(path, format!("cannot write a {}-channel {}x{} image", img.channels, img.width, img.height)))?;
    let mut png = Cursor::new(Vec::new());
    dynamic.write_to(&mut png, image::ImageFormat::Png).map_err(|e| Error::invalid(path, format!("cannot encode PNG: {e}")))?;
    write_atomic(path, overwrite, |out| std::io::Write::write_all(out, png.get_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip_keeps_depth_channels_and_values() {
        let dir = tempfile::tempdir().unwrap();
        for (channels, sixteen_bit) in [(1, false), (2, true), (3, false), (3, true), (4, false)] {
            let (w, h) = (5, 3);
            let levels = if sixteen_bit { 65535.0 } else { 255.0 };
            let data: Vec<f32> =
                (0..w * h * channels).map(|i| ((i * 37) % 256) as f32 / 255.0).map(|v| (v * levels).round() / levels).collect();
            let img = Image { width: w, height: h, channels, data, sixteen_bit };
            let path = dir.path().join(format!("{channels}-{sixteen_bit}.png"));
            write_png(&path, &img, false).unwrap();
            let back = read(&path).unwrap();
            assert_eq!((back.width, back.height, back.channels, back.sixteen_bit), (w, h, channels, sixteen_bit));
            assert!(back.data.iter().zip(&img.data).all(|(a, b)| (a - b).abs() < 1e-6));
            assert!(matches!(write_png(&path, &img, false), Err(Error::Exists { .. })));
        }
    }

    #[test]
    fn non_images_are_named_errors() {
        let msg = decode(Path::new("notes.png"), b"plain text, not pixels").unwrap_err().to_string();
        assert!(msg.starts_with("notes.png:"), "{msg}");
        let mut png = Cursor::new(Vec::new());
        DynamicImage::new_rgb8(4, 4).write_to(&mut png, image::ImageFormat::Png).unwrap();
        let bytes = png.into_inner();
        let msg = decode(Path::new("cut.png"), &bytes[..bytes.len() / 2]).unwrap_err().to_string();
        assert!(msg.starts_with("cut.png:"), "{msg}");
    }
}
