#!/usr/bin/env bash
# Run on the build machine (Rust toolchain, no GPU needed): builds what tools/device-check.sh runs
# on a GPU machine that has no Rust and no network, into bundle/ (ignored by git; pass it to the
# device as a carried path). Contents: the release `engine` binary and the GPU test executable
# (`cargo test --release --no-run --test gpu`), stripped, and peer-wheels.tar.xz, the diffusers
# wheels of the PyTorch baseline (tools/peer-bench/wheels.sh, needs PyPI; about 1.9 MB), under
# 64 MiB together. A device run's 64 MiB covers the working tree too: keep an eye on both.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="$ROOT/bundle"
rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"

cargo build --release -p engine --quiet
cp target/release/engine "$OUT_DIR/engine"
tests="$(cargo test --release -p engine --test gpu --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')"
[ -n "$tests" ] || { echo "device-bundle: could not find the gpu test executable" >&2; exit 1; }
cp "$tests" "$OUT_DIR/gpu-tests"
strip "$OUT_DIR/engine" "$OUT_DIR/gpu-tests"
# The peer baseline is secondary: without its wheels device-check skips it, the rest still runs.
bash tools/peer-bench/wheels.sh "$OUT_DIR/peer-wheels.tar.xz" ||
    echo "device-bundle: no peer-bench wheels (is PyPI reachable?): device-check will skip the PyTorch baseline" >&2
git rev-parse --short HEAD > "$OUT_DIR/commit" 2>/dev/null || echo unknown > "$OUT_DIR/commit"
size=$(du -sm "$OUT_DIR" | cut -f1)
[ "$size" -lt 64 ] || { echo "device-bundle: bundle/ is ${size} MiB, over the 64 MiB a device run can carry" >&2; exit 1; }
echo "device-bundle: bundle/ ready (${size} MiB, commit $(cat "$OUT_DIR/commit"))"
