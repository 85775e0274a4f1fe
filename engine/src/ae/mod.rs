//! Autoencoders: the map between images and the latents the transformer sees. Two kinds (design
//! section 4): FLUX's 16-channel KL autoencoder (`flux_ae`) and the weightless `PixelShuffle(f)`.
//! Both are written once against the backend trait.

pub mod flux_ae;
pub mod pixel_shuffle;
pub mod tiled;

pub use flux_ae::{AutoEncoderParams, FluxAe};
pub use pixel_shuffle::PixelShuffle;
pub use tiled::{Estimate, Statistics, TileOptions, Tiled};

use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::{ensure, Context, Result};
use loaders::HostTensor;
use std::path::Path;

/// Which half of an autoencoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AeDirection {
    /// A `[batch, 3, height, width]` image to its latent.
    Encode,
    /// The latent of a `height x width` image back to the image.
    Decode,
}

pub trait Autoencoder<B: Backend>: Send + Sync {
    /// Image `[B, 3, H, W]` in [-1, 1] -> latent `[B, C, H / f, W / f]` as the transformer sees
    /// it: `scale * (mean - shift)`. H and W must be multiples of `downscale()`.
    fn encode(&self, b: &B, image: &Tensor<B>) -> Result<Tensor<B>>;

    /// The inverse of `encode`: latent `[B, C, h, w]` -> image `[B, 3, h f, w f]`, nominally in
    /// [-1, 1] (not clamped).
    fn decode(&self, b: &B, latent: &Tensor<B>) -> Result<Tensor<B>>;

    /// `encode` of a host image of any size, cut into tiles as `opts` says where the model's
    /// activations grow with the image (FLUX's); the default runs it whole. Calls
    /// `progress(done, total)` as tiles finish.
    fn encode_tiled(&self, b: &B, image: &HostTensor, _opts: &TileOptions, _progress: &mut dyn FnMut(usize, usize)) -> Result<Tiled> {
        Ok(Tiled::whole(b.download(&self.encode(b, &b.input(image)?)?)?))
    }

    /// `decode` of a host latent of any size, as `encode_tiled`.
    fn decode_tiled(&self, b: &B, latent: &HostTensor, _opts: &TileOptions, _progress: &mut dyn FnMut(usize, usize)) -> Result<Tiled> {
        Ok(Tiled::whole(b.download(&self.decode(b, &b.input(latent)?)?)?))
    }

    /// The spatial factor f between image and latent.
    fn downscale(&self) -> usize;

    fn latent_channels(&self) -> usize;
}

/// Checks an image batch against an autoencoder: `[B, 3, H, W]`, H and W multiples of f.
pub fn check_image_shape(shape: &[usize], f: usize) -> Result<()> {
    ensure!(shape.len() == 4 && shape[1] == 3, "image has shape {shape:?}, expected [batch, 3, height, width]");
    let (h, w) = (shape[2], shape[3]);
    ensure!(
        h % f == 0 && w % f == 0 && h > 0 && w > 0,
        "image is {w}x{h} (width x height); both sides must be multiples of {f}, the autoencoder's downscale factor"
    );
    Ok(())
}

/// Checks a latent batch: `[B, channels, h, w]`.
pub fn check_latent_shape(shape: &[usize], channels: usize) -> Result<()> {
    ensure!(shape.len() == 4 && shape[1] == channels, "latent has shape {shape:?}, expected [batch, {channels}, height, width]");
    Ok(())
}

/// Opens an autoencoder named on the command line: `pixel-shuffle:F` for the weightless one, else
/// an FLUX AE checkpoint (BFL or diffusers layout) with an optional JSON config of
/// `AutoEncoderParams` (fields it omits take FLUX's values), its mid-block attention on or off
/// (`FluxAe::mid_attention`).
pub fn load_autoencoder<B: Backend + 'static>(
    b: &B,
    model: &str,
    config: Option<&Path>,
    mid_attention: bool,
) -> Result<Box<dyn Autoencoder<B>>> {
    if let Some(f) = model.strip_prefix("pixel-shuffle:") {
        let f: usize =
            f.parse().ok().filter(|&f| f > 0).with_context(|| format!("--model {model}: the factor must be a positive integer"))?;
        ensure!(config.is_none(), "--model {model}: the pixel-shuffle autoencoder takes no --config");
        return Ok(Box::new(PixelShuffle::new(f)));
    }
    let params = config.map(AutoEncoderParams::read).transpose()?.unwrap_or_default();
    let mut ae = FluxAe::load(b, Path::new(model), &params)?;
    ae.mid_attention = mid_attention;
    Ok(Box::new(ae))
}
