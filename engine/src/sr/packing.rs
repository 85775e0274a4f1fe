//! FLUX's 2x2 latent packing: `[B, C, H, W] -> [B, (H/2)(W/2), C*4]` with channels ordered
//! `c ph pw` (einops `b c (h ph) (w pw) -> b (h w) (c ph pw)`), and its inverse. Image ids for
//! the packed grid come from `model::positions::image_ids`.

use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use loaders::HostTensor;

/// For every element of a `[b, c, h, w]` latent: (its index there, its index packed).
fn index_pairs(b: usize, c: usize, h: usize, w: usize) -> impl Iterator<Item = (usize, usize)> {
    let (tokens, gw) = ((h / 2) * (w / 2), w / 2);
    (0..b * c * h * w).map(move |i| {
        let (xx, y, ci, bi) = (i % w, (i / w) % h, (i / (w * h)) % c, i / (w * h * c));
        let token = (y / 2) * gw + xx / 2;
        let feature = ci * 4 + (y % 2) * 2 + xx % 2;
        (i, (bi * tokens + token) * c * 4 + feature)
    })
}

/// Packs a latent whose height and width are even.
pub fn pack(latent: &HostTensor) -> Result<HostTensor> {
    ensure!(latent.shape.len() == 4, "pack: latent has shape {:?}, expected [batch, channels, height, width]", latent.shape);
    let [b, c, h, w] = [latent.shape[0], latent.shape[1], latent.shape[2], latent.shape[3]];
    ensure!(h % 2 == 0 && w % 2 == 0, "pack: latent {h}x{w} must have even sides");
    let x = latent.to_f32();
    let mut out = vec![0f32; x.len()];
    for (i, p) in index_pairs(b, c, h, w) {
        out[p] = x[i];
    }
    Ok(HostTensor::from_f32(vec![b, (h / 2) * (w / 2), c * 4], out))
}

/// Unpacks `[B, (H/2)(W/2), C*4]` back to `[B, C, H, W]`.
pub fn unpack(packed: &HostTensor, height: usize, width: usize) -> Result<HostTensor> {
    ensure!(packed.shape.len() == 3, "unpack: tensor has shape {:?}, expected [batch, tokens, features]", packed.shape);
    let [b, l, f] = [packed.shape[0], packed.shape[1], packed.shape[2]];
    ensure!(
        height % 2 == 0 && width % 2 == 0 && l == (height / 2) * (width / 2) && f % 4 == 0,
        "unpack: {:?} does not hold a {height}x{width} latent",
        packed.shape
    );
    let c = f / 4;
    let x = packed.to_f32();
    let mut out = vec![0f32; x.len()];
    for (i, p) in index_pairs(b, c, height, width) {
        out[i] = x[p];
    }
    Ok(HostTensor::from_f32(vec![b, c, height, width], out))
}

/// [`pack`] on the backend: `pixel_unshuffle(2)` puts each 2x2 patch's values on channels in
/// `c ph pw` order, and a transpose turns channels into features of row-major tokens.
pub fn pack_tensor<B: Backend>(b: &B, latent: &Tensor<B>) -> Result<Tensor<B>> {
    ensure!(latent.rank() == 4, "pack: latent has shape {:?}, expected [batch, channels, height, width]", latent.shape());
    let (n, c, h, w) = (latent.dim(0), latent.dim(1), latent.dim(2), latent.dim(3));
    ensure!(h % 2 == 0 && w % 2 == 0, "pack: latent {h}x{w} must have even sides");
    let patches = b.pixel_unshuffle(latent, 2)?.reshape(&[n, 4 * c, (h / 2) * (w / 2)])?;
    b.transpose_last2(&patches)
}

/// [`unpack`] on the backend: the inverse of [`pack_tensor`].
pub fn unpack_tensor<B: Backend>(b: &B, packed: &Tensor<B>, height: usize, width: usize) -> Result<Tensor<B>> {
    ensure!(packed.rank() == 3, "unpack: tensor has shape {:?}, expected [batch, tokens, features]", packed.shape());
    let (n, l, f) = (packed.dim(0), packed.dim(1), packed.dim(2));
    ensure!(
        height % 2 == 0 && width % 2 == 0 && l == (height / 2) * (width / 2) && f % 4 == 0,
        "unpack: {:?} does not hold a {height}x{width} latent",
        packed.shape()
    );
    let channels = b.transpose_last2(packed)?.reshape(&[n, f, height / 2, width / 2])?;
    b.pixel_shuffle(&channels, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_follows_the_einops_pattern_and_round_trips() {
        let (b, c, h, w) = (2, 3, 4, 6);
        let latent = HostTensor::from_f32(vec![b, c, h, w], (0..b * c * h * w).map(|i| i as f32).collect());
        let p = pack(&latent).unwrap();
        assert_eq!(p.shape, vec![b, 6, 12]);
        // Token (row 1, col 2) of batch 1, feature (c=2, ph=1, pw=0) holds x[1, 2, 3, 4].
        let token = 3 + 2;
        let v = p.to_f32()[(6 + token) * 12 + 2 * 4 + 2];
        assert_eq!(v, (((c + 2) * h + 3) * w + 4) as f32, "batch 1, channel 2, row 3, column 4");
        assert_eq!(unpack(&p, h, w).unwrap(), latent);
        assert!(pack(&HostTensor::from_f32(vec![1, 1, 3, 4], vec![0.0; 12])).is_err());
    }

    /// The backend's packing moves every value where the host's does.
    #[test]
    fn packing_on_the_backend_is_the_hosts() {
        let b = crate::backend::cpu::CpuBackend::new();
        let (n, c, h, w) = (2, 3, 4, 6);
        let latent = HostTensor::from_f32(vec![n, c, h, w], (0..n * c * h * w).map(|i| i as f32).collect());
        let packed = pack_tensor(&b, &b.input(&latent).unwrap()).unwrap();
        assert_eq!(b.download(&packed).unwrap(), pack(&latent).unwrap());
        assert_eq!(b.download(&unpack_tensor(&b, &packed, h, w).unwrap()).unwrap(), latent);
    }
}
