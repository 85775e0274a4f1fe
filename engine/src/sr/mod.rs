//! Super-resolution around the transformer: the model folder, latent packing, tiled sampling,
//! and the upscale of one image.

pub mod model_dir;
pub mod packing;
pub mod sample;
pub mod tiling;
// pub mod upscaler; (enabled once resample.rs lands)
