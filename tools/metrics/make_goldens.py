#!/usr/bin/env python3
"""Reference values of the perceptual and no-reference metrics for tests/perceptual.rs, computed
by the packages that define them (run by tools/metrics/goldens.sh in tools/.venv-metrics).

Perceptual metrics, on the three HQ/SR pairs of tests/golden/metrics (tools/metrics-goldens.py),
into tests/golden/perceptual/reference.json:
- st_lpips_{alex,vgg}: stlpips_pytorch's LPIPS(net, variant='shift_tolerant') with its shipped
  heads, scaling layer and blur filters, and a random backbone (below); `_real` with the shipped
  backbone as well.
- lpips_{alex,vgg}: lpips' LPIPS(net, pnet_rand=True) with its shipped v0.1 heads and the random
  backbone (torchvision's layout, `features.I.*`).
- dists: DISTS_pytorch's DISTS with its shipped alpha/beta and a random VGG16 (torchvision's
  vgg16 built with weights=None instead of the ImageNet download it asks for).
All are called as their READMEs show: LPIPS on [-1, 1] images (normalize=True on [0, 1]), DISTS
on [0, 1] images; the RGB PNGs read by PIL, float32.

The random backbone replaces every backbone conv's weight and bias by a value nobody has to
store: for the tensor named NAME with fan-in F (input channels x kernel area), element i is
  bound * (2 * (splitmix64((fnv1a32(NAME) << 32) | i) >> 40) / 2^24 - 1),
bound = sqrt(6 / F) for weights (Kaiming's uniform bound for ReLU networks, so that activations
neither vanish nor explode through VGG's 13 layers) and 1 / sqrt(F) for biases (PyTorch's
default), computed in float64 and rounded to float32. tests/perceptual.rs rebuilds it.

The heads, alpha/beta, NIQE's and BRISQUE's parameters are converted by convert_weights.py (the
code tools/metric-weights.sh runs) into tests/golden/perceptual/weights/, ST-LPIPS' without its
backbone (*-heads.safetensors).

No-reference metrics, on the PNGs of tests/golden/noref (made here from the example photograph,
see noref_pictures; plus the small metrics pairs for BRISQUE) into
tests/golden/noref/reference.json:
- niqe: scikit-video 1.1.11's skvideo.measure.niqe on skvideo.utils.rgb2gray of the 8-bit RGB
  (0.2989 R + 0.5870 G + 0.1140 B, 0..255). That code predates numpy 2 and scipy 1.3: np.int
  is restored as int, and scipy.misc.imresize(img, 0.5, interp='bicubic', mode='F') as scipy
  1.2 implemented it: PIL's resize of the float32 image ('F' mode) to (int(W/2), int(H/2)) with
  Image.BICUBIC.
- brisque: OpenCV's cv2.quality.QualityBRISQUE_compute on cv2.imread of the PNG (8-bit BGR),
  with Debian opencv-data's brisque_model_live.yml and brisque_range_live.yml; brisque_features:
  its 36 features (QualityBRISQUE_computeFeatures), before scaling and the SVR.
"""

import io
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "tests" / "golden" / "metrics"
OUT = ROOT / "tests" / "golden" / "perceptual"
NOREF = ROOT / "tests" / "golden" / "noref"
QUALITY = Path("/usr/share/opencv4/quality")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert_weights  # noqa: E402

def fnv1a32(name):
    h = 0x811C9DC5
    for b in name.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def splitmix64(x):
    """On uint64 arrays, whose arithmetic wraps modulo 2^64."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_tensor(name, shape, fan_in):
    n = int(np.prod(shape))
    counters = np.uint64(fnv1a32(name) << 32) | np.arange(n, dtype=np.uint64)
    u = (splitmix64(counters) >> np.uint64(40)).astype(np.float64)
    bound = np.sqrt(6.0 / fan_in) if name.endswith(".weight") else 1.0 / np.sqrt(fan_in)
    return torch.from_numpy((bound * (2.0 * u / 2.0**24 - 1.0)).astype(np.float32).reshape(shape))


def randomise(module, prefix=""):
    """Replaces every conv weight and bias under `module` (named `prefix` + its state-dict key)."""
    convs = {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)}
    with torch.no_grad():
        for name, conv in convs.items():
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            conv.weight.copy_(random_tensor(f"{prefix}{name}.weight", tuple(conv.weight.shape), fan_in))
            conv.bias.copy_(random_tensor(f"{prefix}{name}.bias", tuple(conv.bias.shape), fan_in))
    return len(convs)


def load_rgb(path):
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()


def stlpips_model(net, real):
    from stlpips_pytorch import stlpips

    m = stlpips.LPIPS(net=net, variant="shift_tolerant", verbose=False).eval()
    if not real:
        # slice modules are named by their index in the features list, as in the weights file
        assert randomise(m.net, "net.") > 0
    return m


def lpips_model(net):
    import lpips

    m = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    # lpips' slices keep torchvision's `features` indices: name them as torchvision does
    with torch.no_grad():
        for sname, s in m.net.named_children():
            for idx, layer in s.named_children():
                if isinstance(layer, torch.nn.Conv2d):
                    randomise_conv(layer, f"features.{idx}")
    return m


def randomise_conv(conv, name):
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    conv.weight.copy_(random_tensor(f"{name}.weight", tuple(conv.weight.shape), fan_in))
    conv.bias.copy_(random_tensor(f"{name}.bias", tuple(conv.bias.shape), fan_in))


def dists_model():
    import torchvision
    from DISTS_pytorch import DISTS_pt

    # DISTS asks torchvision for ImageNet weights (a download); build the same VGG16 without them
    vgg16 = torchvision.models.vgg16
    DISTS_pt.models = types.SimpleNamespace(vgg16=lambda pretrained: vgg16(weights=None))
    m = DISTS_pt.DISTS(load_weights=True).eval()
    with torch.no_grad():
        for stage in [m.stage1, m.stage2, m.stage3, m.stage4, m.stage5]:
            for idx, layer in stage.named_children():
                if isinstance(layer, torch.nn.Conv2d):
                    randomise_conv(layer, f"features.{idx}")
    return m


def perceptual():
    pairs = sorted(p.stem for p in (PAIRS / "hq").glob("*.png"))
    models = {
        "st_lpips_alex": stlpips_model("alex", real=False),
        "st_lpips_vgg": stlpips_model("vgg", real=False),
        "st_lpips_alex_real": stlpips_model("alex", real=True),
        "st_lpips_vgg_real": stlpips_model("vgg", real=True),
        "lpips_alex": lpips_model("alex"),
        "lpips_vgg": lpips_model("vgg"),
    }
    dists = dists_model()
    rows = []
    with torch.no_grad():
        for stem in pairs:
            sr, hq = load_rgb(PAIRS / "sr" / f"{stem}.png"), load_rgb(PAIRS / "hq" / f"{stem}.png")
            row = {"name": stem}
            for key, m in models.items():
                row[key] = float(m(sr, hq, normalize=True).item())
            row["dists"] = float(dists(sr, hq).item())
            rows.append(row)
            print(row)
    return rows


def weights():
    """The heads and the non-network parameters, converted as tools/metric-weights.sh does."""
    from safetensors.numpy import load_file, save_file

    dst = OUT / "weights"
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = {"files": {}, "absent": {}}
        convert_weights.st_lpips(tmp, manifest)
        convert_weights.lpips_heads(tmp, manifest)
        convert_weights.dists(tmp, manifest)
        convert_weights.niqe(tmp, manifest)
        convert_weights.brisque(tmp, manifest, QUALITY)
        assert "brisque.safetensors" in manifest["files"], "BRISQUE's model is missing: apt-get install opencv-data"
        for net in ["alex", "vgg"]:
            full = load_file(tmp / f"st-lpips-{net}.safetensors")
            heads = {k: v for k, v in full.items() if not (k.startswith("net.") and (k.endswith(".weight") or k.endswith(".bias")))}
            save_file(heads, dst / f"st-lpips-{net}-heads.safetensors")
        for name in ["lpips-alex", "lpips-vgg", "dists", "niqe", "brisque"]:
            shutil.copy(tmp / f"{name}.safetensors", dst / f"{name}.safetensors")


def noref_pictures():
    """Pictures for the no-reference metrics, larger than NIQE's 193-pixel minimum: the quick
    start's example photograph (a validation LQ) enlarged 2x by PIL's bicubic to 256x256, the same
    with Gaussian noise, and the same through JPEG at quality 15 (BRISQUE's model was trained
    on such distortions; on smooth synthetic pictures it saturates at its clamp, 100)."""
    rng = np.random.default_rng(20261206)
    photo = Image.open(ROOT / "examples" / "evening-glow.png").convert("RGB")
    photo = photo.resize((photo.width * 2, photo.height * 2), resample=Image.BICUBIC)
    rgb = np.asarray(photo, dtype=np.float64) / 255.0
    noisy = np.clip(rgb + 0.06 * rng.standard_normal(rgb.shape), 0, 1)
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=15)
    jpeg = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float64) / 255.0
    return {"photo": rgb, "photo-noisy": noisy, "photo-jpeg": jpeg}


def noref():
    import cv2
    import scipy.misc
    import skvideo.measure
    import skvideo.utils

    def imresize(arr, size, interp="bilinear", mode=None):
        assert mode == "F" and interp == "bicubic" and isinstance(size, float)
        im = Image.fromarray(np.asarray(arr, dtype=np.float32))
        new = tuple((np.array(im.size) * size).astype(int))
        return np.array(im.resize(new, resample=Image.BICUBIC), dtype=np.float32)

    np.int = int
    scipy.misc.imresize = imresize

    NOREF.mkdir(parents=True, exist_ok=True)
    for name, img in noref_pictures().items():
        Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(NOREF / f"{name}.png")
    paths = sorted(NOREF.glob("*.png")) + sorted((PAIRS / "sr").glob("*.png"))
    rows = []
    for path in paths:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        row = {"path": str(path.relative_to(ROOT / "tests" / "golden"))}
        if min(rgb.shape[:2]) > 193:
            row["niqe"] = float(skvideo.measure.niqe(skvideo.utils.rgb2gray(rgb))[0])
        model, rng = str(QUALITY / "brisque_model_live.yml"), str(QUALITY / "brisque_range_live.yml")
        bgr = cv2.imread(str(path))
        row["brisque"] = float(cv2.quality.QualityBRISQUE_compute(bgr, model, rng)[0])
        row["brisque_features"] = [float(f) for f in np.ravel(cv2.quality.QualityBRISQUE_computeFeatures(bgr))]
        rows.append(row)
        print(row)
    return rows


def main():
    torch.manual_seed(0)  # the random backbones do not use it; the models' unused parts do
    weights()
    pairs = perceptual()
    versions = {p: convert_weights.importlib.metadata.version(p) for p in ["stlpips_pytorch", "lpips", "DISTS-pytorch", "torch", "torchvision"]}
    (OUT / "reference.json").write_text(json.dumps({"versions": versions, "pairs": pairs}, indent=1) + "\n")
    images = noref()
    versions = {p: convert_weights.importlib.metadata.version(p) for p in ["scikit-video", "opencv-contrib-python-headless", "pillow", "scipy"]}
    (NOREF / "reference.json").write_text(json.dumps({"versions": versions, "images": images}, indent=1) + "\n")


if __name__ == "__main__":
    main()
