//! A metric-weights folder for the tests, laid out as tools/metric-weights.sh lays it out, with
//! the random backbones of tools/metrics/make_goldens.py in place of the trained ones.

use engine::metrics::perceptual::Perceptual;
use engine::metrics::weights::MetricWeights;
use loaders::safetensors::{self, Checkpoint};
use loaders::HostTensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn golden(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden").join(rel)
}

pub fn json(rel: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden(rel)).unwrap()).unwrap()
}

fn fnv1a32(name: &str) -> u32 {
    name.bytes().fold(0x811C_9DC5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

fn splitmix64(x: u64) -> u64 {
    let z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random backbone tensor `name` of make_goldens.py: element i is
/// `bound * (2 (splitmix64((fnv1a32(name) << 32) | i) >> 40) / 2^24 - 1)`, bound `sqrt(6 / fan_in)`
/// for weights and `1 / sqrt(fan_in)` for biases.
fn random_tensor(name: &str, shape: &[usize], fan_in: usize) -> HostTensor {
    let bound = if name.ends_with(".weight") { (6.0 / fan_in as f64).sqrt() } else { 1.0 / (fan_in as f64).sqrt() };
    let key = (fnv1a32(name) as u64) << 32;
    let n: usize = shape.iter().product();
    let data = (0..n as u64).map(|i| (bound * (2.0 * (splitmix64(key | i) >> 40) as f64 / 16_777_216.0 - 1.0)) as f32).collect();
    HostTensor::from_f32(shape.to_vec(), data)
}

fn random_backbone(metric: Perceptual) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    for [(w, ws), (b, bs)] in metric.backbone_convolutions() {
        let fan_in = ws[1] * ws[2] * ws[3];
        out.insert(b.clone(), random_tensor(&b, &bs, fan_in));
        out.insert(w.clone(), random_tensor(&w, &ws, fan_in));
    }
    out
}

pub fn read_all(path: &Path) -> BTreeMap<String, HostTensor> {
    let ckpt = Checkpoint::open(path).unwrap();
    ckpt.names().map(|n| (n.to_string(), ckpt.read(n).unwrap())).collect()
}

pub fn write(path: &Path, tensors: &BTreeMap<String, HostTensor>) {
    let list: Vec<(&str, &HostTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    safetensors::write(path, &list, &BTreeMap::new(), true).unwrap();
}

/// A weights folder laid out as tools/metric-weights.sh lays it out, with the goldens' random
/// backbones in place of the trained ones (ST-LPIPS' heads and blur filters are its shipped ones).
pub fn golden_weights(dir: &Path) -> MetricWeights {
    let src = golden("perceptual/weights");
    for net in ["alex", "vgg"] {
        let metric = if net == "alex" { Perceptual::StLpipsAlex } else { Perceptual::StLpipsVgg };
        let mut all = read_all(&src.join(format!("st-lpips-{net}-heads.safetensors")));
        all.extend(random_backbone(metric));
        write(&dir.join(format!("st-lpips-{net}.safetensors")), &all);
    }
    write(&dir.join("alexnet.safetensors"), &random_backbone(Perceptual::LpipsAlex));
    write(&dir.join("vgg16.safetensors"), &random_backbone(Perceptual::LpipsVgg));
    for f in ["lpips-alex", "lpips-vgg", "dists", "niqe", "brisque"] {
        std::fs::copy(src.join(format!("{f}.safetensors")), dir.join(format!("{f}.safetensors"))).unwrap();
    }
    MetricWeights::new(dir)
}
