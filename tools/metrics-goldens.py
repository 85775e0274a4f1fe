#!/usr/bin/env python3
"""Reference image-quality metrics for tests/metrics.rs and tests/cli_eval.rs.

Generates three deterministic HQ/SR pairs of small RGB PNGs (SR = HQ plus noise, a blur, a colour
shift) under tests/golden/metrics/{hq,sr}/, and writes reference.json beside them with, per pair:

- psnr_y: skimage.metrics.peak_signal_noise_ratio(y_hq, y_sr, data_range=255)
- ssim_y: skimage.metrics.structural_similarity(y_sr, y_hq, data_range=255, gaussian_weights=True,
          sigma=1.5, use_sample_covariance=False)
- lsd:    sqrt(mean((10 log10(P_sr + eps) - 10 log10(P_hq + eps))^2)), P = |fft2(y)|^2 / y.size,
          eps = 1e-10 (numpy)

where y = BasicSR's rgb2ycbcr(img / 255, y_only=True) * 255 = 16 + 65.481 R + 128.553 G + 24.966 B
(R, G, B in [0, 1]), computed in float64 from the PNG files as written.

Run from the repository root with the pinned environment (tools/golden/requirements.txt):
    tools/.venv-golden/bin/python tools/metrics-goldens.py
"""

import json
from pathlib import Path

import numpy as np
import skimage
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "metrics"
EPS = 1e-10


def hq_picture(h, w, rng):
    """A smooth synthetic picture (gradients, soft blobs, a ring) plus fine texture."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = x / w, y / h
    r = 0.25 + 0.5 * u + 0.15 * np.sin(2 * np.pi * v * 1.5)
    g = 0.3 + 0.4 * v + 0.2 * np.exp(-((u - 0.6) ** 2 + (v - 0.4) ** 2) / 0.05)
    b = 0.5 + 0.3 * np.cos(2 * np.pi * np.hypot(u - 0.5, v - 0.5) * 3)
    img = np.stack([r, g, b], axis=-1)
    texture = 0.06 * np.sin(2 * np.pi * (x / 3.1 + y / 4.7))[..., None] + 0.04 * rng.standard_normal((h, w, 1))
    return np.clip(img + texture, 0, 1)


def blur(img):
    """3x3 binomial blur, edges replicated."""
    k = np.array([1.0, 2.0, 1.0]) / 4
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = sum(k[i] * p[i : i + img.shape[0], :, :] for i in range(3))
    return sum(k[j] * rows[:, j : j + img.shape[1], :] for j in range(3))


def to_u8(img):
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def y_channel(path):
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    return 16.0 + rgb @ np.array([65.481, 128.553, 24.966])


def lsd(y_sr, y_hq):
    p_sr = np.abs(np.fft.fft2(y_sr)) ** 2 / y_sr.size
    p_hq = np.abs(np.fft.fft2(y_hq)) ** 2 / y_hq.size
    d = 10 * np.log10(p_sr + EPS) - 10 * np.log10(p_hq + EPS)
    return float(np.sqrt(np.mean(d**2)))


def main():
    rng = np.random.default_rng(20260601)
    pairs = []
    for name, (h, w), degrade in [
        ("noise", (40, 56), lambda hq: hq + 0.03 * rng.standard_normal(hq.shape)),
        ("blur", (33, 47), blur),
        ("shift", (40, 56), lambda hq: hq + np.array([0.04, -0.02, 0.05]) + 0.01 * rng.standard_normal(hq.shape)),
    ]:
        hq = hq_picture(h, w, rng)
        sr = degrade(hq)
        paths = {}
        for side, img in [("hq", hq), ("sr", sr)]:
            (OUT / side).mkdir(parents=True, exist_ok=True)
            paths[side] = OUT / side / f"{name}.png"
            Image.fromarray(to_u8(img), "RGB").save(paths[side], optimize=True)
        y_sr, y_hq = y_channel(paths["sr"]), y_channel(paths["hq"])
        pairs.append(
            {
                "name": name,
                "width": w,
                "height": h,
                "psnr_y": float(peak_signal_noise_ratio(y_hq, y_sr, data_range=255)),
                "ssim_y": float(
                    structural_similarity(
                        y_sr, y_hq, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
                    )
                ),
                "lsd": lsd(y_sr, y_hq),
            }
        )
    ref = {
        "generator": "tools/metrics-goldens.py",
        "numpy": np.__version__,
        "scikit-image": skimage.__version__,
        "lsd_eps": EPS,
        "pairs": pairs,
    }
    (OUT / "reference.json").write_text(json.dumps(ref, indent=2) + "\n")
    for p in pairs:
        print(f"{p['name']:6} {p['width']}x{p['height']}  psnr_y {p['psnr_y']:.4f}  ssim_y {p['ssim_y']:.5f}  lsd {p['lsd']:.4f}")


if __name__ == "__main__":
    main()
