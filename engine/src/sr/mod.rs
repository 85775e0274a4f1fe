//! Super-resolution around the transformer: latent packing and the tiles that let any image
//! size run in bounded memory.

pub mod packing;
pub mod tiling;
