//! `PixelShuffle(f)`: the weightless autoencoder for small models. Encoding is space-to-depth
//! (PyTorch's `pixel_unshuffle`, 3 f f latent channels), decoding depth-to-space; its scale and
//! shift are the identity, so the latent is the image's samples rearranged.

use super::{check_image_shape, check_latent_shape, Autoencoder};
use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelShuffle {
    pub factor: usize,
}

impl PixelShuffle {
    pub fn new(factor: usize) -> Self {
        assert!(factor > 0, "pixel shuffle factor must be positive");
        PixelShuffle { factor }
    }
}

impl<B: Backend> Autoencoder<B> for PixelShuffle {
    fn encode(&self, b: &B, image: &Tensor<B>) -> Result<Tensor<B>> {
        check_image_shape(image.shape(), self.factor)?;
        b.pixel_unshuffle(image, self.factor)
    }

    fn decode(&self, b: &B, latent: &Tensor<B>) -> Result<Tensor<B>> {
        check_latent_shape(latent.shape(), <Self as Autoencoder<B>>::latent_channels(self))?;
        b.pixel_shuffle(latent, self.factor)
    }

    fn downscale(&self) -> usize {
        self.factor
    }

    fn latent_channels(&self) -> usize {
        3 * self.factor * self.factor
    }
}
