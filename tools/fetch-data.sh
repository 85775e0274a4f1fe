#!/usr/bin/env bash
# The shipped model's data: photographs from Debian's mate-backgrounds, plasma-workspace-wallpapers,
# lomiri-wallpapers and gnome-backgrounds and the ukui-wallpapers artwork (pinned by SHA-256, see
# tools/prepare-data.py), downscaled into
# data/photos/{train,val,test}, then the validation and test (HQ, LQ) pairs made by `engine degrade` with a
# fixed seed into data/val/{hq,lq} (512x512 HQ, 128x128 LQ) and data/test/{hq,lq} (256 and 64). Idempotent;
# data/ is git-ignored.
# Usage: bash tools/fetch-data.sh [OUT]   (default OUT = data)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/data}"
VENV="$ROOT/tools/.venv-data"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check pillow==11.3.0
"$VENV/bin/python" "$ROOT/tools/prepare-data.py" "$OUT"
cargo build --release --quiet -p engine --manifest-path "$ROOT/Cargo.toml"
"$ROOT/target/release/engine" degrade "$OUT/photos/val" -o "$OUT/val" --seed 2026 --scale 4 --crop 512 --overwrite
"$ROOT/target/release/engine" degrade "$OUT/photos/test" -o "$OUT/test" --seed 2026 --scale 4 --crop 256 --overwrite
echo "training photographs: $OUT/photos/train; validation pairs: $OUT/val/{hq,lq}; test pairs (ukui artwork, 64 -> 256): $OUT/test/{hq,lq}"
