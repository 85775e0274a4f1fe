//! Learned perceptual distances between a super-resolved image and its reference: LPIPS
//! (Zhang et al. 2018; the `lpips` package, v0.1), ST-LPIPS (shift-tolerant LPIPS, Ghildyal and
//! Liu 2022; `stlpips_pytorch`, variant `shift_tolerant`) and DISTS (Ding et al. 2020;
//! `DISTS_pytorch`), each on AlexNet or VGG16 features.
//!
//! Design decisions a reader would otherwise have to reverse-engineer:
//! - The feature networks run on the engine's backends (`Backend::conv2d`, `relu`, `max_pool2d`,
//!   `blur_pool2d`, `l2_pool2d`), both images of a pair as one batch of two. Each network is the
//!   reference's `Sequential` written out as a layer list whose weight names are the keys of the
//!   reference's files (torchvision's `features.I.*`, ST-LPIPS' `net.sliceN.I.*`), so loading is
//!   a lookup and a missing or mis-shaped tensor is named.
//! - The heads (LPIPS' unit-normalised squared differences weighted by the `lin` layers and
//!   averaged over space; DISTS' structure and texture terms) reduce the downloaded features on
//!   the host in f64; they are a few operations per feature against the networks' millions.
//! - Inputs are the RGB colour channels in [0, 1] (gray replicated, alpha dropped), scaled as the
//!   references scale them, in f32: LPIPS and ST-LPIPS see `(2x - 1 - shift) / scale`
//!   (`normalize=True`, then their `ScalingLayer`), DISTS `(x - mean) / std` (ImageNet's).
//! - On the CPU everything is f32 and matches the references to 1e-4 (tests/perceptual.rs); the
//!   CUDA backend stores activations in bf16, which moves the distances by about 1e-2 relative.

use super::weights::MetricWeights;
use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::{ensure, Context, Result};
use loaders::image::Image;
use loaders::{DType, HostTensor};
use std::collections::BTreeMap;

/// The perceptual metrics, by the network under them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perceptual {
    /// ST-LPIPS on the anti-aliased AlexNet (the package's default), weights complete in
    /// `st-lpips-alex.safetensors`.
    StLpipsAlex,
    StLpipsVgg,
    /// LPIPS v0.1 on torchvision's AlexNet (the package's default): heads in
    /// `lpips-alex.safetensors`, backbone in `alexnet.safetensors` (the user's file).
    LpipsAlex,
    LpipsVgg,
    /// DISTS: VGG16 with L2 pooling, alpha/beta in `dists.safetensors`, backbone in `vgg16.safetensors`.
    Dists,
}

/// One layer of a feature network, as the reference's `Sequential` has it.
#[derive(Debug, Clone, PartialEq)]
enum Layer {
    /// `Conv2d(cin, cout, k, stride, padding)` with weight `{name}.weight`, bias `{name}.bias`.
    Conv {
        name: String,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    },
    Relu,
    MaxPool {
        k: usize,
        stride: usize,
    },
    /// ST-LPIPS' `Downsample(filt_size=3, stride=2, pad_more=True)`: the 3x3 filter `{name}.filt`
    /// on the input reflected by 2 on every side.
    Blur {
        name: String,
    },
    /// DISTS' `L2pooling(filter_size=5, stride=2)`: padding 1 and the 3x3 filter built from
    /// `hanning(5)[1:-1]`.
    L2Pool,
    /// The features after this layer go to the head.
    Tap,
}

/// LPIPS' `ScalingLayer`: the inputs, in [-1, 1], are shifted and scaled per channel.
const LPIPS_SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const LPIPS_SCALE: [f32; 3] = [0.458, 0.448, 0.450];
/// ImageNet's statistics, DISTS' input normalisation.
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// `lpips.normalize_tensor`'s epsilon.
const LPIPS_EPS: f64 = 1e-10;
/// DISTS' c1 and c2.
const DISTS_C: f64 = 1e-6;

/// VGG16's convolutions (configuration "D"): blocks of 3x3 convolutions, a pooling between blocks.
const VGG16_BLOCKS: [&[usize]; 5] = [&[64, 64], &[128, 128], &[256, 256, 256], &[512, 512, 512], &[512, 512, 512]];

fn conv(name: String, cin: usize, cout: usize, k: usize, stride: usize, pad: usize) -> Layer {
    Layer::Conv { name, cin, cout, k, stride, pad }
}

/// torchvision's `alexnet().features` up to relu5, tapped after each ReLU (lpips' slices).
fn alexnet() -> Vec<Layer> {
    let f = |i: usize| format!("features.{i}");
    use Layer::*;
    vec![
        conv(f(0), 3, 64, 11, 4, 2),
        Relu,
        Tap,
        MaxPool { k: 3, stride: 2 },
        conv(f(3), 64, 192, 5, 1, 2),
        Relu,
        Tap,
        MaxPool { k: 3, stride: 2 },
        conv(f(6), 192, 384, 3, 1, 1),
        Relu,
        Tap,
        conv(f(8), 384, 256, 3, 1, 1),
        Relu,
        Tap,
        conv(f(10), 256, 256, 3, 1, 1),
        Relu,
        Tap,
    ]
}

/// stlpips_pytorch's `alexnet(variant='shift_tolerant')`: the first convolution at stride 1 and
/// every stride-2 step a max pooling at stride 1 followed by a blur pooling at stride 2.
fn alexnet_shift_tolerant() -> Vec<Layer> {
    let f = |slice: usize, i: usize| format!("net.slice{slice}.{i}");
    use Layer::*;
    let blur = |slice, i| Blur { name: f(slice, i) };
    vec![
        conv(f(1, 0), 3, 64, 11, 1, 2),
        blur(1, 1),
        Relu,
        Tap,
        MaxPool { k: 3, stride: 1 },
        blur(2, 4),
        conv(f(2, 5), 64, 192, 5, 1, 2),
        Relu,
        Tap,
        MaxPool { k: 3, stride: 1 },
        blur(3, 8),
        conv(f(3, 9), 192, 384, 3, 1, 1),
        Relu,
        Tap,
        conv(f(4, 11), 384, 256, 3, 1, 1),
        Relu,
        Tap,
        conv(f(5, 13), 256, 256, 3, 1, 1),
        Relu,
        Tap,
    ]
}

/// How a VGG16 variant goes from one block to the next.
#[derive(Clone, Copy, PartialEq, Eq)]
enum VggPool {
    /// torchvision's `MaxPool2d(2, 2)`.
    Max,
    /// ST-LPIPS: `MaxPool2d(2, 1)` then the blur pooling (two layers of the `Sequential`).
    MaxBlur,
    /// DISTS: L2 pooling in place of the max pooling (same index).
    L2,
}

/// VGG16's features up to relu5_3, tapped at the end of each block (relu1_2, relu2_2, relu3_3,
/// relu4_3, relu5_3); DISTS also taps its input. Layer indices count as in the reference's
/// `Sequential`; ST-LPIPS names them `net.slice{block}.{i}`, the others `features.{i}`.
fn vgg16(pool: VggPool) -> Vec<Layer> {
    let name = |block: usize, i: usize| match pool {
        VggPool::MaxBlur => format!("net.slice{}.{i}", block + 1),
        _ => format!("features.{i}"),
    };
    let mut layers = if pool == VggPool::L2 { vec![Layer::Tap] } else { vec![] };
    let (mut i, mut cin) = (0, 3);
    for (block, widths) in VGG16_BLOCKS.iter().enumerate() {
        if block > 0 {
            match pool {
                VggPool::Max => layers.push(Layer::MaxPool { k: 2, stride: 2 }),
                VggPool::L2 => layers.push(Layer::L2Pool),
                VggPool::MaxBlur => {
                    layers.push(Layer::MaxPool { k: 2, stride: 1 });
                    i += 1;
                    layers.push(Layer::Blur { name: name(block, i) });
                }
            }
            i += 1;
        }
        for &cout in widths.iter() {
            layers.push(conv(name(block, i), cin, cout, 3, 1, 1));
            layers.push(Layer::Relu);
            (i, cin) = (i + 2, cout);
        }
        layers.push(Layer::Tap);
    }
    layers
}

impl Perceptual {
    pub const ALL: [Perceptual; 5] =
        [Perceptual::StLpipsAlex, Perceptual::StLpipsVgg, Perceptual::LpipsAlex, Perceptual::LpipsVgg, Perceptual::Dists];

    pub fn name(self) -> &'static str {
        match self {
            Perceptual::StLpipsAlex => "st-lpips",
            Perceptual::StLpipsVgg => "st-lpips-vgg",
            Perceptual::LpipsAlex => "lpips",
            Perceptual::LpipsVgg => "lpips-vgg",
            Perceptual::Dists => "dists",
        }
    }

    /// The files of `MetricWeights` this metric needs, the backbone's last where it is separate.
    pub fn files(self) -> &'static [&'static str] {
        match self {
            Perceptual::StLpipsAlex => &["st-lpips-alex.safetensors"],
            Perceptual::StLpipsVgg => &["st-lpips-vgg.safetensors"],
            Perceptual::LpipsAlex => &["lpips-alex.safetensors", "alexnet.safetensors"],
            Perceptual::LpipsVgg => &["lpips-vgg.safetensors", "vgg16.safetensors"],
            Perceptual::Dists => &["dists.safetensors", "vgg16.safetensors"],
        }
    }

    fn layers(self) -> Vec<Layer> {
        match self {
            Perceptual::StLpipsAlex => alexnet_shift_tolerant(),
            Perceptual::StLpipsVgg => vgg16(VggPool::MaxBlur),
            Perceptual::LpipsAlex => alexnet(),
            Perceptual::LpipsVgg => vgg16(VggPool::Max),
            Perceptual::Dists => vgg16(VggPool::L2),
        }
    }

    /// The backbone's convolutions: (weight name, weight shape) and (bias name, bias shape), for
    /// building a network with weights of one's own (the tests' random backbones).
    pub fn backbone_convolutions(self) -> Vec<[(String, Vec<usize>); 2]> {
        self.layers()
            .into_iter()
            .filter_map(|l| match l {
                Layer::Conv { name, cin, cout, k, .. } => {
                    Some([(format!("{name}.weight"), vec![cout, cin, k, k]), (format!("{name}.bias"), vec![cout])])
                }
                _ => None,
            })
            .collect()
    }
}

/// A loaded perceptual metric: its feature network on a backend and its head.
pub struct PerceptualNet<B: Backend> {
    metric: Perceptual,
    layers: Vec<Built<B>>,
    head: Head,
}

enum Built<B: Backend> {
    Conv { weight: Tensor<B>, bias: Tensor<B>, stride: usize, pad: usize },
    Relu,
    MaxPool { k: usize, stride: usize },
    Blur { filter: Tensor<B> },
    L2Pool { filter: Tensor<B> },
    Tap,
}

enum Head {
    /// One `lin` weight vector per tap (LPIPS' 1x1 convolutions to one channel, no bias).
    Lpips(Vec<Vec<f64>>),
    /// DISTS' alpha and beta split per tap, each already divided by their common sum.
    Dists { alpha: Vec<Vec<f64>>, beta: Vec<Vec<f64>> },
}

/// Takes `name` out of `tensors`, checking its shape.
fn take(tensors: &BTreeMap<String, HostTensor>, name: &str, shape: &[usize], files: &[&str]) -> Result<HostTensor> {
    let t = tensors.get(name).with_context(|| format!("{}: no tensor named '{name}'", files.join(" + ")))?;
    ensure!(t.shape == shape, "{}: tensor '{name}' has shape {:?}, expected {shape:?}", files.join(" + "), t.shape);
    Ok(t.clone())
}

/// DISTS' L2 pooling filter for `channels` channels: `a a^T / sum` with `a = hanning(5)[1:-1]`
/// = (0.5, 1, 0.5), i.e. the 3-tap binomial filter.
fn l2_pool_filter(channels: usize) -> HostTensor {
    let a: Vec<f64> = (1..4).map(|n| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / 4.0).cos()).collect();
    let sum: f64 = a.iter().flat_map(|x| a.iter().map(move |y| x * y)).sum();
    let plane: Vec<f32> = a.iter().flat_map(|x| a.iter().map(move |y| (x * y / sum) as f32)).collect();
    HostTensor::from_f32(vec![channels, 1, 3, 3], plane.repeat(channels))
}

impl<B: Backend> PerceptualNet<B> {
    /// Loads `metric` from the weights folder.
    pub fn load(backend: &B, metric: Perceptual, weights: &MetricWeights) -> Result<Self> {
        Self::from_tensors(backend, metric, &weights.tensors(metric.files())?, metric.files())
    }

    /// Builds `metric` from tensors named as in its files (`files` names them in errors).
    pub fn from_tensors(backend: &B, metric: Perceptual, tensors: &BTreeMap<String, HostTensor>, files: &[&str]) -> Result<Self> {
        let dtype = backend.weight_dtype().unwrap_or(DType::F32);
        let upload = |t: HostTensor| backend.upload(&t.cast(dtype));
        let mut layers = Vec::new();
        let mut widths = Vec::new();
        let mut channels = 3;
        for layer in metric.layers() {
            layers.push(match layer {
                Layer::Conv { name, cin, cout, k, stride, pad } => {
                    let weight = take(tensors, &format!("{name}.weight"), &[cout, cin, k, k], files)?;
                    let bias = take(tensors, &format!("{name}.bias"), &[cout], files)?;
                    channels = cout;
                    Built::Conv { weight: upload(weight)?, bias: upload(bias)?, stride, pad }
                }
                Layer::Relu => Built::Relu,
                Layer::MaxPool { k, stride } => Built::MaxPool { k, stride },
                Layer::Blur { name } => {
                    Built::Blur { filter: upload(take(tensors, &format!("{name}.filt"), &[channels, 1, 3, 3], files)?)? }
                }
                Layer::L2Pool => Built::L2Pool { filter: upload(l2_pool_filter(channels))? },
                Layer::Tap => {
                    widths.push(channels);
                    Built::Tap
                }
            });
        }
        let head = match metric {
            Perceptual::Dists => {
                let total: usize = widths.iter().sum();
                let alpha = take(tensors, "alpha", &[1, total, 1, 1], files)?.to_f32();
                let beta = take(tensors, "beta", &[1, total, 1, 1], files)?.to_f32();
                let sum: f64 = alpha.iter().chain(&beta).map(|&v| v as f64).sum();
                let split = |v: &[f32]| -> Vec<Vec<f64>> {
                    let mut at = 0;
                    widths
                        .iter()
                        .map(|&w| {
                            at += w;
                            v[at - w..at].iter().map(|&x| x as f64 / sum).collect()
                        })
                        .collect()
                };
                Head::Dists { alpha: split(&alpha), beta: split(&beta) }
            }
            _ => Head::Lpips(
                widths
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| {
                        Ok(take(tensors, &format!("lin{i}.model.1.weight"), &[1, w, 1, 1], files)?
                            .to_f32()
                            .iter()
                            .map(|&v| v as f64)
                            .collect())
                    })
                    .collect::<Result<_>>()?,
            ),
        };
        Ok(PerceptualNet { metric, layers, head })
    }

    pub fn metric(&self) -> Perceptual {
        self.metric
    }

    /// The distance between `sr` and `hq` (same size; lower is closer).
    pub fn distance(&self, backend: &B, sr: &Image, hq: &Image) -> Result<f64> {
        ensure!(
            (sr.width, sr.height) == (hq.width, hq.height),
            "sizes differ: {}x{} against {}x{}",
            sr.width,
            sr.height,
            hq.width,
            hq.height
        );
        // DISTS compares the unscaled input as its first "feature".
        let mut taps = if self.metric == Perceptual::Dists { vec![pair_tensor(sr, hq, |x, _| x)] } else { vec![] };
        taps.extend(self.features(backend, &self.input(sr, hq)).with_context(|| {
            format!("{}: the network cannot run on a {}x{} image (too small?)", self.metric.name(), sr.width, sr.height)
        })?);
        Ok(match &self.head {
            Head::Lpips(lins) => taps.iter().zip(lins).map(|(t, w)| lpips_layer(t, w)).sum(),
            Head::Dists { alpha, beta } => {
                1.0 - taps.iter().zip(alpha.iter().zip(beta)).map(|(t, (a, b))| dists_layer(t, a, b)).sum::<f64>()
            }
        })
    }

    /// The pair as a batch of two `[2, 3, H, W]`, scaled as the metric's reference scales it.
    fn input(&self, sr: &Image, hq: &Image) -> HostTensor {
        match self.metric {
            Perceptual::Dists => pair_tensor(sr, hq, |x, c| (x - IMAGENET_MEAN[c]) / IMAGENET_STD[c]),
            _ => pair_tensor(sr, hq, |x, c| (2.0 * x - 1.0 - LPIPS_SHIFT[c]) / LPIPS_SCALE[c]),
        }
    }

    /// Runs the network; returns the tapped activations in order, on the host (DISTS' input
    /// tap, the first layer, excluded: `distance` takes it from the images).
    fn features(&self, b: &B, input: &HostTensor) -> Result<Vec<HostTensor>> {
        let mut x = b.input(input)?;
        let mut taps = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            x = match layer {
                Built::Conv { weight, bias, stride, pad } => b.conv2d(&x, weight, Some(bias), *stride, [*pad; 4])?,
                Built::Relu => b.relu(&x)?,
                Built::MaxPool { k, stride } => b.max_pool2d(&x, *k, *stride)?,
                Built::Blur { filter } => b.blur_pool2d(&x, filter, 2, [2; 4])?,
                Built::L2Pool { filter } => b.l2_pool2d(&x, filter, 2, [1; 4])?,
                Built::Tap => {
                    if i > 0 {
                        taps.push(b.download(&x)?);
                    }
                    continue;
                }
            };
        }
        Ok(taps)
    }
}

/// `[2, 3, H, W]`: sample 0 from `a`, sample 1 from `b`, each colour value mapped by `f(x, c)`.
fn pair_tensor(a: &Image, b: &Image, f: impl Fn(f32, usize) -> f32) -> HostTensor {
    let (w, h) = (a.width, a.height);
    let mut data = Vec::with_capacity(2 * 3 * w * h);
    for img in [a.to_rgb(), b.to_rgb()] {
        for c in 0..3 {
            data.extend(img.data.chunks_exact(3).map(|px| f(px[c], c)));
        }
    }
    HostTensor::from_f32(vec![2, 3, h, w], data)
}

/// One tap's LPIPS term: features `[2, C, H, W]` unit-normalised over channels at every pixel,
/// squared differences weighted by `lin` `[C]`, averaged over the pixels.
fn lpips_layer(t: &HostTensor, lin: &[f64]) -> f64 {
    let (c, hw) = (t.shape[1], t.shape[2] * t.shape[3]);
    let v = t.to_f32();
    let (f0, f1) = v.split_at(c * hw);
    let norm = |f: &[f32], p: usize| (0..c).map(|k| (f[k * hw + p] as f64).powi(2)).sum::<f64>().sqrt() + LPIPS_EPS;
    let total: f64 = (0..hw)
        .map(|p| {
            let (n0, n1) = (norm(f0, p), norm(f1, p));
            (0..c).map(|k| lin[k] * (f0[k * hw + p] as f64 / n0 - f1[k * hw + p] as f64 / n1).powi(2)).sum::<f64>()
        })
        .sum();
    total / hw as f64
}

/// One tap's DISTS term, `sum_c alpha_c S1_c + beta_c S2_c` with per-channel means, variances
/// and covariance over the pixels (biased, as `mean` computes them).
fn dists_layer(t: &HostTensor, alpha: &[f64], beta: &[f64]) -> f64 {
    let (c, hw) = (t.shape[1], t.shape[2] * t.shape[3]);
    let v = t.to_f32();
    let (f0, f1) = v.split_at(c * hw);
    let n = hw as f64;
    (0..c)
        .map(|k| {
            let (x, y) = (&f0[k * hw..(k + 1) * hw], &f1[k * hw..(k + 1) * hw]);
            let mx = x.iter().map(|&v| v as f64).sum::<f64>() / n;
            let my = y.iter().map(|&v| v as f64).sum::<f64>() / n;
            let vx = x.iter().map(|&v| (v as f64 - mx).powi(2)).sum::<f64>() / n;
            let vy = y.iter().map(|&v| (v as f64 - my).powi(2)).sum::<f64>() / n;
            let cov = x.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / n - mx * my;
            let s1 = (2.0 * mx * my + DISTS_C) / (mx * mx + my * my + DISTS_C);
            let s2 = (2.0 * cov + DISTS_C) / (vx + vy + DISTS_C);
            alpha[k] * s1 + beta[k] * s2
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layer lists against the module lists the reference packages print (torchvision 0.29,
    /// stlpips_pytorch 0.0.2, DISTS_pytorch 0.1): names, counts and taps.
    #[test]
    fn networks_follow_the_reference_sequentials() {
        let convs = |m: Perceptual| m.backbone_convolutions().into_iter().map(|[w, _]| w.0).collect::<Vec<_>>();
        assert_eq!(
            convs(Perceptual::LpipsAlex),
            ["features.0.weight", "features.3.weight", "features.6.weight", "features.8.weight", "features.10.weight"]
        );
        let vgg: Vec<String> = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28].iter().map(|i| format!("features.{i}.weight")).collect();
        assert_eq!(convs(Perceptual::LpipsVgg), vgg);
        assert_eq!(convs(Perceptual::Dists), vgg);
        let st_vgg = ["1.0", "1.2", "2.6", "2.8", "3.12", "3.14", "3.16", "4.20", "4.22", "4.24", "5.28", "5.30", "5.32"];
        assert_eq!(convs(Perceptual::StLpipsVgg), st_vgg.iter().map(|s| format!("net.slice{s}.weight")).collect::<Vec<_>>());
        let blurs: Vec<String> =
            vgg16(VggPool::MaxBlur).into_iter().filter_map(|l| if let Layer::Blur { name } = l { Some(name) } else { None }).collect();
        assert_eq!(blurs, ["net.slice2.5", "net.slice3.11", "net.slice4.19", "net.slice5.27"]);
        let taps = |m: Perceptual| m.layers().iter().filter(|l| **l == Layer::Tap).count();
        assert_eq!(Perceptual::ALL.map(taps), [5, 5, 5, 5, 6]);
        assert_eq!(vgg16(VggPool::L2).iter().filter(|l| **l == Layer::L2Pool).count(), 4);
    }

    #[test]
    fn dists_l2_pool_filter_is_the_normalised_hanning_window() {
        let f = l2_pool_filter(2).to_f32();
        let want = [1.0, 2.0, 1.0, 2.0, 4.0, 2.0, 1.0, 2.0, 1.0].map(|v| v / 16.0);
        assert_eq!(&f[..9], &want);
        assert_eq!(&f[9..], &want);
    }

    #[test]
    fn lpips_head_of_identical_features_is_zero_and_of_opposite_ones_four_times_the_weights() {
        let f = [0.5f32, -1.0, 2.0, 0.25];
        let same = HostTensor::from_f32(vec![2, 2, 1, 2], f.iter().chain(&f).copied().collect());
        assert_eq!(lpips_layer(&same, &[1.0, 3.0]), 0.0);
        let neg: Vec<f32> = f.iter().chain(f.iter()).enumerate().map(|(i, &v)| if i < 4 { v } else { -v }).collect();
        let opposite = HostTensor::from_f32(vec![2, 2, 1, 2], neg);
        // unit vectors u and -u differ by 2u: squared, 4 u_k^2, weighted and summed per pixel
        let u = |a: f64, b: f64| (a * a / (a * a + b * b), b * b / (a * a + b * b));
        let (p0, p1) = (u(0.5, 2.0), u(-1.0, 0.25));
        let want = (4.0 * (p0.0 + 3.0 * p0.1) + 4.0 * (p1.0 + 3.0 * p1.1)) / 2.0;
        assert!((lpips_layer(&opposite, &[1.0, 3.0]) - want).abs() < 1e-9);
    }
}
