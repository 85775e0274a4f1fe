//! `engine ae encode|decode`: an image through the autoencoder to a latent file, and back.

use anyhow::{bail, ensure, Context, Result};
use engine::ae::{load_autoencoder, Autoencoder};
use engine::backend::device::Device;
use engine::Backend;
use loaders::image::{self, Image};
use loaders::safetensors::{self, Checkpoint};
use loaders::HostTensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Encode an image to a latent, or decode a latent to an image, with an autoencoder.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Image (PNG, JPEG, WebP) -> `latent` [1,C,H/f,W/f] f32 in a .safetensors file.
    Encode(Io),
    /// `latent` [1,C,h,w] from a .safetensors file -> PNG image.
    Decode(Io),
}

#[derive(clap::Args)]
struct Io {
    /// Autoencoder checkpoint (.safetensors, BFL or diffusers layout), or `pixel-shuffle:F`.
    #[arg(long)]
    model: String,
    /// JSON config with BFL AutoEncoderParams field names (omitted fields: FLUX's values).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Input file.
    input: PathBuf,
    /// Output file.
    #[arg(short, long)]
    out: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Where to run: auto (a CUDA GPU when usable, else the CPU), cpu or cuda.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        Command::Encode(io) => engine::on_backend!(io.device, b => encode(b, &io)),
        Command::Decode(io) => engine::on_backend!(io.device, b => decode(b, &io)),
    }
}

fn open<B: Backend + 'static>(b: &B, io: &Io) -> Result<Box<dyn Autoencoder<B>>> {
    if io.out.exists() && !io.overwrite {
        bail!("{}: output exists; pass --overwrite to replace it", io.out.display());
    }
    load_autoencoder(b, &io.model, io.config.as_deref())
}

fn encode<B: Backend + 'static>(b: &B, io: &Io) -> Result<()> {
    let ae = open(b, io)?;
    let img = image::read(&io.input)?.to_rgb();
    let f = ae.downscale();
    ensure!(
        img.width % f == 0 && img.height % f == 0,
        "{}: image is {}x{} (width x height); both sides must be multiples of {f}, the autoencoder's downscale factor",
        io.input.display(),
        img.width,
        img.height
    );
    let x = b.input(&to_nchw(&img))?;
    let latent = b.download(&ae.encode(b, &x)?)?;
    safetensors::write(&io.out, &[("latent", &latent)], &BTreeMap::new(), io.overwrite)?;
    println!("latent  {:?} f32 -> {}", latent.shape, io.out.display());
    Ok(())
}

fn decode<B: Backend + 'static>(b: &B, io: &Io) -> Result<()> {
    let ae = open(b, io)?;
    let latent = read_latent(&io.input)?;
    let c = ae.latent_channels();
    ensure!(
        latent.shape.len() == 4 && latent.shape[0] == 1 && latent.shape[1] == c,
        "{}: 'latent' has shape {:?}, expected [1, {c}, height, width]",
        io.input.display(),
        latent.shape
    );
    let y = b.download(&ae.decode(b, &b.input(&latent)?)?)?;
    let img = from_nchw(&y);
    image::write_png(&io.out, &img, io.overwrite)?;
    println!("image   {}x{} -> {}", img.width, img.height, io.out.display());
    Ok(())
}

fn read_latent(path: &Path) -> Result<HostTensor> {
    let ckpt = Checkpoint::open(path)?;
    ensure!(ckpt.info("latent").is_some(), "{}: no tensor 'latent'", path.display());
    ckpt.read("latent").with_context(|| format!("{}: reading 'latent'", path.display()))
}

/// `[H, W, 3]` in [0, 1] -> `[1, 3, H, W]` in [-1, 1] (`x * 2 - 1`, i.e. `x / 127.5 - 1` on 8-bit data).
fn to_nchw(img: &Image) -> HostTensor {
    let (h, w) = (img.height, img.width);
    let mut data = vec![0f32; 3 * h * w];
    for (p, px) in img.data.chunks(3).enumerate() {
        for c in 0..3 {
            data[c * h * w + p] = px[c] * 2.0 - 1.0;
        }
    }
    HostTensor::from_f32(vec![1, 3, h, w], data)
}

/// `[1, 3, H, W]` -> RGB image; `write_png` then stores `round((clamp(x, -1, 1) + 1) * 127.5)`.
fn from_nchw(t: &HostTensor) -> Image {
    let (h, w) = (t.shape[2], t.shape[3]);
    let v = t.to_f32();
    let mut data = vec![0f32; 3 * h * w];
    for p in 0..h * w {
        for c in 0..3 {
            data[p * 3 + c] = (v[c * h * w + p].clamp(-1.0, 1.0) + 1.0) * 0.5;
        }
    }
    Image::new(w, h, 3, data)
}
