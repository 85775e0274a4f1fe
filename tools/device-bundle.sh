#!/usr/bin/env bash
# Run on the build machine (Rust toolchain, no GPU needed): builds what tools/device-check.sh runs
# on a GPU machine that has no Rust and no network, into bundle/ (ignored by git; pass it to the
# device as a carried path). Contents: bin.tar.xz, the release `engine` binary and the GPU test
# executable (`cargo test --release --no-run --test gpu`), stripped and xz-compressed (device-check
# unpacks them there), and peer-wheels.tar.xz, the diffusers wheels of the PyTorch baseline
# (tools/peer-bench/wheels.sh, needs PyPI; about 1.9 MB). A device run carries at most 64 MiB,
# the working tree (the shipped model's 39 MB among it) and bundle/ together: checked at the end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="$ROOT/bundle"
rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"

cargo build --release -p engine --quiet
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
cp target/release/engine "$stage/engine"
tests="$(cargo test --release -p engine --test gpu --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')"
[ -n "$tests" ] || { echo "device-bundle: could not find the gpu test executable" >&2; exit 1; }
cp "$tests" "$stage/gpu-tests"
strip "$stage/engine" "$stage/gpu-tests"
tar -C "$stage" -cJf "$OUT_DIR/bin.tar.xz" engine gpu-tests
# The peer baseline is secondary: without its wheels device-check skips it, the rest still runs.
bash tools/peer-bench/wheels.sh "$OUT_DIR/peer-wheels.tar.xz" ||
    echo "device-bundle: no peer-bench wheels (is PyPI reachable?): device-check will skip the PyTorch baseline" >&2
git rev-parse --short HEAD > "$OUT_DIR/commit" 2>/dev/null || echo unknown > "$OUT_DIR/commit"
# What travels: tracked files, untracked files git does not ignore, and bundle/.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
bundle=$(find "$OUT_DIR" -type f -exec stat -c %s {} + | awk '{s += $1} END {print s + 0}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
if [ $((tree + bundle)) -ge $((64 << 20)) ]; then
    echo "device-bundle: the working tree ($(mib "$tree") MiB) and bundle/ ($(mib "$bundle") MiB) are over the 64 MiB a device run can carry" >&2
    exit 1
fi
echo "device-bundle: bundle/ ready ($(mib "$bundle") MiB; with the working tree $(mib $((tree + bundle))) of 64 MiB; commit $(cat "$OUT_DIR/commit"))"
