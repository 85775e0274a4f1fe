//! Images as interleaved f32 samples in [0, 1]: decoding PNG, JPEG and WebP under explicit size
//! and allocation limits, and atomic writing as PNG (8- or 16-bit), JPEG or lossless WebP.
//!
//! What users of other SR tools lose and we keep: the EXIF orientation is applied on read (the
//! pixels come back upright, so the output needs no tag), the ICC profile travels with the image
//! and is written back, alpha, 16-bit depth and grayscale stay as they were where the output
//! format can hold them. A decoder that panics on a malformed file is contained to that file.

use std::any::Any;
use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageEncoder, ImageReader, Limits};

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
    /// The source's ICC colour profile, unparsed; written back into every output format.
    pub icc: Option<Vec<u8>>,
}

impl Image {
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), width * height * channels, "image data does not match {width}x{height}x{channels}");
        Image { width, height, channels, data, sixteen_bit: false, icc: None }
    }

    /// Whether the last channel is alpha (2 or 4 channels).
    pub fn has_alpha(&self) -> bool {
        self.channels == 2 || self.channels == 4
    }

    /// The colour channels as RGB (gray is replicated, alpha dropped).
    pub fn to_rgb(&self) -> Image {
        let color = if self.channels >= 3 { 3 } else { 1 };
        let data = self.data.chunks(self.channels).flat_map(|px| if color == 3 { [px[0], px[1], px[2]] } else { [px[0]; 3] }).collect();
        Image { width: self.width, height: self.height, channels: 3, data, sixteen_bit: self.sixteen_bit, icc: self.icc.clone() }
    }
}

/// The file format of an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// 8- or 16-bit, gray or colour, with or without alpha: everything an [`Image`] holds.
    Png,
    /// Baseline JPEG at `quality` (1-100). 8-bit only, no alpha: 16-bit samples are rounded to
    /// 8 bits and alpha is composited over white.
    Jpeg { quality: u8 },
    /// Lossless WebP (the only WebP encoder the `image` crate has). 8-bit only: 16-bit samples are
    /// rounded to 8 bits; alpha is kept; gray is stored as such but decoders return it as RGB.
    WebP,
}

impl OutputFormat {
    /// The JPEG quality used when the output follows a JPEG input.
    pub const DEFAULT_JPEG_QUALITY: u8 = 95;

    /// The format of the input's extension (case-insensitive): `.jpg`/`.jpeg` give JPEG at
    /// [`Self::DEFAULT_JPEG_QUALITY`], `.webp` gives lossless WebP, anything else PNG.
    pub fn for_input(path: &Path) -> OutputFormat {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext.eq_ignore_ascii_case("jpg") || ext.eq_ignore_ascii_case("jpeg") {
            OutputFormat::Jpeg { quality: Self::DEFAULT_JPEG_QUALITY }
        } else if ext.eq_ignore_ascii_case("webp") {
            OutputFormat::WebP
        } else {
            OutputFormat::Png
        }
    }

    /// The usual file extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg { .. } => "jpg",
            OutputFormat::WebP => "webp",
        }
    }
}

/// Decodes an image file (format from its content, not its extension).
pub fn read(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, "read", e))?;
    decode(path, &bytes)
}

/// Decodes image bytes; `path` names them in errors. The EXIF orientation is applied, the ICC
/// profile kept. Unreadable metadata (a broken EXIF block, a truncated ICC chunk) is ignored
/// rather than failing an image whose pixels are fine. A panic inside the decoder becomes an
/// [`Error::Invalid`] naming `path`.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<Image> {
    contained(path, "decoding", || decode_unguarded(path, bytes))
}

/// Runs `f`, turning a panic into an [`Error::Invalid`] about `path` (what `doing` was).
/// The panic hook still prints the panic; the process goes on with the next file.
fn contained<T>(path: &Path, doing: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|panic| Err(Error::invalid(path, format!("the decoder crashed while {doing}: {}", panic_message(&*panic)))))
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("unknown panic")
}

fn decode_unguarded(path: &Path, bytes: &[u8]) -> Result<Image> {
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
    let mut decoder = reader.into_decoder().map_err(fail)?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::invalid(path, format!("image has no pixels ({w}x{h})")));
    }
    let icc = decoder.icc_profile().ok().flatten().filter(|p| !p.is_empty());
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(fail)?;
    img.apply_orientation(orientation);
    let mut out = from_dynamic(img);
    out.icc = icc;
    Ok(out)
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
    Image { width, height, channels: channels.min(4), data, sixteen_bit, icc: None }
}

/// Writes a PNG atomically, rounding samples (clamped to [0, 1]) to 8 or 16 bits, with the ICC
/// profile if the image has one.
pub fn write_png(path: &Path, img: &Image, overwrite: bool) -> Result<()> {
    write(path, img, OutputFormat::Png, overwrite)
}

/// Writes `img` atomically in `format` (see [`OutputFormat`] for what each keeps), with its ICC
/// profile. Samples are clamped to [0, 1]. An existing `path` is an error unless `overwrite`.
pub fn write(path: &Path, img: &Image, format: OutputFormat, overwrite: bool) -> Result<()> {
    let bad =
        |what: &str| Error::invalid(path, format!("cannot write a {}-channel {}x{} image{what}", img.channels, img.width, img.height));
    if !(1..=4).contains(&img.channels) || img.data.len() != img.width * img.height * img.channels {
        return Err(bad(""));
    }
    let encode_err = |e: image::ImageError| Error::invalid(path, format!("cannot encode {}: {e}", format.extension().to_uppercase()));
    let mut bytes = Cursor::new(Vec::new());
    let icc = img.icc.clone().unwrap_or_default();
    match format {
        OutputFormat::Png => {
            let mut encoder = PngEncoder::new(&mut bytes);
            if !icc.is_empty() {
                encoder.set_icc_profile(icc).map_err(|e| encode_err(image::ImageError::Unsupported(e)))?;
            }
            to_dynamic(img, img.sixteen_bit).ok_or_else(|| bad(""))?.write_with_encoder(encoder).map_err(encode_err)?;
        }
        OutputFormat::Jpeg { quality } => {
            let mut encoder = JpegEncoder::new_with_quality(&mut bytes, quality.clamp(1, 100));
            if !icc.is_empty() {
                encoder.set_icc_profile(icc).map_err(|e| encode_err(image::ImageError::Unsupported(e)))?;
            }
            let opaque = over_white(img);
            to_dynamic(&opaque, false).ok_or_else(|| bad(""))?.write_with_encoder(encoder).map_err(encode_err)?;
        }
        OutputFormat::WebP => {
            let mut encoder = WebPEncoder::new_lossless(&mut bytes);
            if !icc.is_empty() {
                encoder.set_icc_profile(icc).map_err(|e| encode_err(image::ImageError::Unsupported(e)))?;
            }
            to_dynamic(img, false).ok_or_else(|| bad(""))?.write_with_encoder(encoder).map_err(encode_err)?;
        }
    }
    write_atomic(path, overwrite, |out| std::io::Write::write_all(out, bytes.get_ref()))
}

/// The image without alpha: colour composited over white (`c * a + (1 - a)`).
fn over_white(img: &Image) -> Image {
    if !img.has_alpha() {
        return img.clone();
    }
    let color = img.channels - 1;
    let data = img
        .data
        .chunks(img.channels)
        .flat_map(|px| {
            let a = px[color].clamp(0.0, 1.0);
            px[..color].iter().map(move |c| c.clamp(0.0, 1.0) * a + (1.0 - a))
        })
        .collect();
    Image { width: img.width, height: img.height, channels: color, data, sixteen_bit: img.sixteen_bit, icc: img.icc.clone() }
}

/// The samples quantised to 8 or 16 bits as the matching `DynamicImage`; `None` for a channel
/// count or a data length that does not fit.
fn to_dynamic(img: &Image, sixteen_bit: bool) -> Option<DynamicImage> {
    let (w, h) = (img.width as u32, img.height as u32);
    let q8 = |v: &f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    let q16 = |v: &f32| (v.clamp(0.0, 1.0) * 65535.0).round() as u16;
    match (img.channels, sixteen_bit) {
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
            let img = Image { width: w, height: h, channels, data, sixteen_bit, icc: None };
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

    /// A little-endian TIFF block with one IFD entry: Orientation (0x0112, SHORT) = `tag`.
    fn exif_orientation(tag: u16) -> Vec<u8> {
        let mut e = b"II*\0".to_vec();
        e.extend(8u32.to_le_bytes());
        e.extend(1u16.to_le_bytes());
        e.extend(0x0112u16.to_le_bytes());
        e.extend(3u16.to_le_bytes());
        e.extend(1u32.to_le_bytes());
        e.extend(tag.to_le_bytes());
        e.extend(0u16.to_le_bytes());
        e.extend(0u32.to_le_bytes());
        e
    }

    /// Where displayed pixel (x, y) comes from in the stored `w` x `h` image, from the EXIF
    /// definition of each tag (which visual side the stored 0th row and 0th column are).
    fn stored_pixel(tag: u16, x: usize, y: usize, w: usize, h: usize) -> (usize, usize) {
        match tag {
            1 => (x, y),
            2 => (w - 1 - x, y),
            3 => (w - 1 - x, h - 1 - y),
            4 => (x, h - 1 - y),
            5 => (y, x),
            6 => (y, h - 1 - x),
            7 => (w - 1 - y, h - 1 - x),
            8 => (w - 1 - y, x),
            _ => unreachable!(),
        }
    }

    fn encode_with(img: &DynamicImage, exif: Vec<u8>, icc: Vec<u8>, format: OutputFormat) -> Vec<u8> {
        let mut bytes = Cursor::new(Vec::new());
        match format {
            OutputFormat::Png => {
                let mut e = PngEncoder::new(&mut bytes);
                e.set_exif_metadata(exif).unwrap();
                if !icc.is_empty() {
                    e.set_icc_profile(icc).unwrap();
                }
                img.write_with_encoder(e).unwrap();
            }
            OutputFormat::Jpeg { quality } => {
                let mut e = JpegEncoder::new_with_quality(&mut bytes, quality);
                e.set_exif_metadata(exif).unwrap();
                img.write_with_encoder(e).unwrap();
            }
            OutputFormat::WebP => {
                let mut e = WebPEncoder::new_lossless(&mut bytes);
                e.set_exif_metadata(exif).unwrap();
                img.write_with_encoder(e).unwrap();
            }
        }
        bytes.into_inner()
    }

    #[test]
    fn exif_orientation_is_applied_on_read_for_png_and_webp() {
        let (w, h) = (3usize, 2usize);
        let stored = image::RgbImage::from_fn(w as u32, h as u32, |x, y| image::Rgb([x as u8 * 40, y as u8 * 100, 7]));
        let stored = DynamicImage::ImageRgb8(stored);
        for format in [OutputFormat::Png, OutputFormat::WebP] {
            for tag in 1..=8u16 {
                let bytes = encode_with(&stored, exif_orientation(tag), Vec::new(), format);
                let img = decode(Path::new("o.img"), &bytes).unwrap();
                let (ow, oh) = if tag >= 5 { (h, w) } else { (w, h) };
                assert_eq!((img.width, img.height), (ow, oh), "{format:?} tag {tag}");
                for y in 0..oh {
                    for x in 0..ow {
                        let (sx, sy) = stored_pixel(tag, x, y, w, h);
                        let got = &img.data[(y * ow + x) * 3..][..2];
                        let want = [sx as f32 * 40.0 / 255.0, sy as f32 * 100.0 / 255.0];
                        assert!((got[0] - want[0]).abs() < 1e-6 && (got[1] - want[1]).abs() < 1e-6, "{format:?} tag {tag} at ({x}, {y})");
                    }
                }
            }
        }
    }

    #[test]
    fn exif_orientation_is_applied_on_read_for_jpeg() {
        // Stored 32x16: left half red, right half blue. Tag 6 (rotate 90 clockwise) shows it as
        // 16x32 with red on top; tag 8 (rotate 270) with red at the bottom.
        let stored = image::RgbImage::from_fn(32, 16, |x, _| if x < 16 { image::Rgb([255, 0, 0]) } else { image::Rgb([0, 0, 255]) });
        let stored = DynamicImage::ImageRgb8(stored);
        for (tag, red_on_top) in [(6, true), (8, false)] {
            let bytes = encode_with(&stored, exif_orientation(tag), Vec::new(), OutputFormat::Jpeg { quality: 95 });
            let img = decode(Path::new("o.jpg"), &bytes).unwrap();
            assert_eq!((img.width, img.height, img.channels), (16, 32, 3));
            let red_at = |y: usize| img.data[(y * 16 + 8) * 3] > 0.8 && img.data[(y * 16 + 8) * 3 + 2] < 0.2;
            assert_eq!(red_at(4), red_on_top, "tag {tag}");
            assert_eq!(red_at(28), !red_on_top, "tag {tag}");
        }
    }

    #[test]
    fn icc_profile_survives_every_output_format() {
        let dir = tempfile::tempdir().unwrap();
        let icc: Vec<u8> = (0..300u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut img = Image::new(4, 3, 3, (0..36).map(|i| i as f32 / 35.0).collect());
        img.icc = Some(icc.clone());
        for format in [OutputFormat::Png, OutputFormat::Jpeg { quality: 90 }, OutputFormat::WebP] {
            let path = dir.path().join(format!("icc.{}", format.extension()));
            write(&path, &img, format, false).unwrap();
            assert_eq!(read(&path).unwrap().icc.as_deref(), Some(&icc[..]), "{format:?}");
        }
        // And it is read from a file another encoder wrote.
        let bytes = encode_with(&DynamicImage::new_rgb8(2, 2), Vec::new(), icc.clone(), OutputFormat::Png);
        assert_eq!(decode(Path::new("x.png"), &bytes).unwrap().icc, Some(icc));
        let plain = Image::new(1, 1, 3, vec![0.5; 3]);
        write_png(&dir.path().join("plain.png"), &plain, false).unwrap();
        assert_eq!(read(&dir.path().join("plain.png")).unwrap().icc, None);
    }

    #[test]
    fn jpeg_output_drops_to_8_bit_and_composites_alpha_on_white() {
        let dir = tempfile::tempdir().unwrap();
        // 16x16 RGBA 16-bit: left half opaque black, right half fully transparent black.
        let data = (0..16 * 16).flat_map(|i| [0.0, 0.0, 0.0, if i % 16 < 8 { 1.0 } else { 0.0 }]).collect();
        let img = Image { sixteen_bit: true, ..Image::new(16, 16, 4, data) };
        let path = dir.path().join("a.jpg");
        write(&path, &img, OutputFormat::Jpeg { quality: 95 }, false).unwrap();
        let back = read(&path).unwrap();
        assert_eq!((back.width, back.height, back.channels, back.sixteen_bit), (16, 16, 3, false));
        let at = |x: usize, y: usize| back.data[(y * 16 + x) * 3];
        assert!(at(2, 8) < 0.1 && at(13, 8) > 0.9, "{} {}", at(2, 8), at(13, 8));
        // Gray + alpha becomes gray.
        let gray = Image::new(8, 8, 2, (0..64).flat_map(|_| [0.0, 0.0]).collect());
        write(&dir.path().join("g.jpg"), &gray, OutputFormat::Jpeg { quality: 95 }, false).unwrap();
        let back = read(&dir.path().join("g.jpg")).unwrap();
        assert_eq!(back.channels, 1);
        assert!(back.data.iter().all(|&v| v > 0.95));
    }

    #[test]
    fn webp_output_keeps_alpha_losslessly() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<f32> = (0..5 * 3 * 4).map(|i| ((i * 53) % 256) as f32 / 255.0).collect();
        let img = Image::new(5, 3, 4, data);
        let path = dir.path().join("a.webp");
        write(&path, &img, OutputFormat::WebP, false).unwrap();
        let back = read(&path).unwrap();
        assert_eq!((back.width, back.height, back.channels), (5, 3, 4));
        assert!(back.data.iter().zip(&img.data).all(|(a, b)| (a - b).abs() < 1e-6));
        assert!(matches!(write(&path, &img, OutputFormat::WebP, false), Err(Error::Exists { .. })));
        write(&path, &img, OutputFormat::WebP, true).unwrap();
        // 16-bit gray: rounded to 8 bits, read back as RGB with equal channels.
        let gray = Image { sixteen_bit: true, ..Image::new(4, 2, 1, (0..8).map(|i| i as f32 / 7.0).collect()) };
        let path = dir.path().join("g.webp");
        write(&path, &gray, OutputFormat::WebP, false).unwrap();
        let back = read(&path).unwrap();
        assert_eq!((back.width, back.height, back.sixteen_bit), (4, 2, false));
        for (px, want) in back.data.chunks(back.channels).zip(&gray.data) {
            assert!(px[..back.channels.min(3)].iter().all(|v| (v - want).abs() <= 0.5 / 255.0 + 1e-6), "{px:?} vs {want}");
        }
    }

    #[test]
    fn output_format_follows_the_input_extension() {
        let f = |p: &str| OutputFormat::for_input(Path::new(p));
        assert_eq!(f("a/b.JPG"), OutputFormat::Jpeg { quality: OutputFormat::DEFAULT_JPEG_QUALITY });
        assert_eq!(f("b.jpeg"), OutputFormat::Jpeg { quality: OutputFormat::DEFAULT_JPEG_QUALITY });
        assert_eq!(f("c.WebP"), OutputFormat::WebP);
        assert_eq!(f("d.png"), OutputFormat::Png);
        assert_eq!(f("noext"), OutputFormat::Png);
        assert_eq!(OutputFormat::WebP.extension(), "webp");
    }

    #[test]
    fn a_decoder_panic_is_an_error_naming_the_file() {
        let r: Result<()> = contained(Path::new("bad.jpg"), "decoding", || panic!("index out of bounds in the huffman table"));
        let msg = r.unwrap_err().to_string();
        assert!(msg.starts_with("bad.jpg:") && msg.contains("huffman"), "{msg}");
        // Malformed JPEG and WebP bytes: errors (or contained panics), each naming the file.
        let jpeg = encode_with(&DynamicImage::new_rgb8(16, 16), Vec::new(), Vec::new(), OutputFormat::Jpeg { quality: 90 });
        let webp = encode_with(&DynamicImage::new_rgba8(16, 16), Vec::new(), Vec::new(), OutputFormat::WebP);
        for (name, bytes) in [("t.jpg", &jpeg), ("t.webp", &webp)] {
            for cut in [bytes.len() / 3, bytes.len() / 2, bytes.len() - 4] {
                let mut broken = bytes[..cut].to_vec();
                broken.extend(std::iter::repeat_n(0xffu8, 7));
                if let Err(e) = decode(Path::new(name), &broken) {
                    assert!(e.to_string().starts_with(&format!("{name}:")), "{e}");
                }
            }
            let msg = decode(Path::new(name), &bytes[..12]).unwrap_err().to_string();
            assert!(msg.starts_with(&format!("{name}:")), "{msg}");
        }
    }
}
