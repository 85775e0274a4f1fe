//! Super-resolution around the transformer: the model folder, latent packing, tiled sampling,
//! and the upscale of one image.

pub mod colorfix;
pub mod conditioning;
pub mod import;
pub mod model_dir;
pub mod packing;
pub mod resample;
pub mod sample;
pub mod tiling;
pub mod upscaler;
