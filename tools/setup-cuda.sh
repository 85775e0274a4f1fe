#!/usr/bin/env bash
# Installs nvcc (no GPU or driver needed) from PyPI into tools/.venv-cuda with the pins of
# design.md section 10, matching the GPU machines' CUDA 13.0 driver (PTX from a newer nvcc would
# not load there). Idempotent and quiet; prints where nvcc is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/tools/.venv-cuda"
PINS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88)

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
NVCC="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "bin", "nvcc"))')"
[ -x "$NVCC" ] || { echo "setup-cuda: nvcc not found at $NVCC after install" >&2; exit 1; }
echo "$NVCC"
