#!/usr/bin/env bash
# Run on a GPU machine (H100/H200: nvcc and PyTorch present, no Rust, no network) from the
# repository root, with bundle/ made beforehand by tools/device-bundle.sh. Prints the machine's
# facts, runs the ignored GPU tests and `engine selftest`, then the kernel and model benchmarks
# when the binary has them, then the PyTorch + diffusers baseline on the same shapes
# (tools/peer-bench, when bundle/ has its wheels; PEER_COMPILE=1 adds its torch.compile variant);
# logs go to $OUT (default ./device-out); a short table comes last. Every step has its own time
# limit so the whole run ends within 14 minutes (19 with PEER_COMPILE=1); most finish far sooner.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/device-out}"
mkdir -p "$OUT"
# Results of an earlier run in the same folder would be compared as if they were this run's.
rm -f "$OUT"/{bench,kernels,peer-bench,peer-compile}.json "$OUT/logs.tar.gz"
BUNDLE="$ROOT/bundle"
[ -f "$BUNDLE/bin.tar.xz" ] || { echo "device-check: bundle/bin.tar.xz missing: run tools/device-bundle.sh on the build machine and carry bundle/" >&2; exit 1; }
# The binaries travel xz-compressed (the carry limit); Python unpacks them (the machine may lack
# xz) outside bundle/, so that bundle/ stays small enough to carry again.
BIN="$(mktemp -d)"
trap 'rm -rf "$BIN"' EXIT
python3 -c 'import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    try:
        t.extractall(sys.argv[2], filter="data")
    except TypeError:  # a Python without extraction filters
        t.extractall(sys.argv[2])' "$BUNDLE/bin.tar.xz" "$BIN" ||
    { echo "device-check: cannot unpack bundle/bin.tar.xz" >&2; exit 1; }

# cuBLASLt: from a CUDA toolkit, or from the NVIDIA wheels PyTorch ships with.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
if command -v python3 >/dev/null; then
    for d in $(python3 -c 'import glob, os, site
dirs = site.getsitepackages() + [site.getusersitepackages()]
print(" ".join(sorted({os.path.dirname(p) for s in dirs for p in glob.glob(os.path.join(s, "nvidia", "*", "lib", "lib*.so*"))})))' 2>/dev/null); do
        LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
    done
fi
export LD_LIBRARY_PATH

declare -a SUMMARY
step() { # name, limit in seconds, command...
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    [ $rc -eq 0 ] || verdict="FAILED (exit $rc)"
    [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit} s"
    SUMMARY+=("$(printf '%-12s %-22s %4d s  %s' "$name" "$verdict" $((SECONDS - t0)) "$OUT/$name.log")")
    tail -n 80 "$OUT/$name.log"
}

{
    echo "date:    $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "commit:  $(cat "$BUNDLE/commit" 2>/dev/null)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu:     /'
    command -v nvcc >/dev/null && nvcc --version | tail -1 | sed 's/^/nvcc:    /'
    echo "LD_LIBRARY_PATH: $LD_LIBRARY_PATH"
    echo "ldd engine:"
    ldd "$BIN/engine" | sed 's/^/  /'
} 2>&1 | tee "$OUT/machine.txt"

# The Hopper attention kernel has its own step first: if it faults, the CUDA context of the process
# is lost, and every later step would fail with it. On a failure or a disabled probe the rest runs
# on the portable kernel (ENGINE_ATTENTION=portable), and the summary says so.
if "$BIN/engine" --help | grep -q '^  kernels'; then
    step hopper-probe 60 "$BIN/engine" kernels --size small --device cuda
    if ! grep -q 'attention fwd (sm90a)' "$OUT/hopper-probe.log" || grep -q 'sm90a attention kernel disabled' "$OUT/hopper-probe.log"; then
        export ENGINE_ATTENTION=portable
        SUMMARY+=("(the Hopper attention kernel is not used below: see hopper-probe.log; ENGINE_ATTENTION=portable)")
    fi
fi
step gpu-tests 150 "$BIN/gpu-tests" --ignored --test-threads=1
step selftest 90 "$BIN/engine" selftest --device cuda
if "$BIN/engine" --help | grep -q '^  kernels'; then
    step kernels 90 "$BIN/engine" kernels --json "$OUT/kernels.json"
fi
if "$BIN/engine" --help | grep -q '^  bench'; then
    step bench 120 "$BIN/engine" bench --shape flux-dev --random-weights --res 1024 --steps 28 --json "$OUT/bench.json"
    # The other shapes of the performance table (their figures are in the logs).
    step bench-512 45 "$BIN/engine" bench --shape flux-dev --random-weights --res 512 --steps 10
    step bench-b4 60 "$BIN/engine" bench --shape flux-dev --random-weights --res 1024 --batch 4 --steps 4
    step bench-train 90 "$BIN/engine" bench --shape flux-dev --random-weights --res 512 --steps 3 --train
fi
# The peer: the same step in PyTorch + diffusers (diffusers installed offline from bundle/) and
# PyTorch's SDPA, printed beside the engine's JSON as ratios. A failure here stops nothing.
if [ -f "$BUNDLE/peer-wheels.tar.xz" ]; then
    compare=()
    for j in bench kernels; do
        [ -f "$OUT/$j.json" ] && compare+=(--compare "$OUT/$j.json")
    done
    step peer-bench 180 bash tools/peer-bench/device-run.sh "$BUNDLE/peer-wheels.tar.xz" \
        --shape flux-dev --res 1024 --steps 28 --json "$OUT/peer-bench.json" "${compare[@]}"
    if [ "${PEER_COMPILE:-0}" = 1 ]; then
        step peer-compile 300 bash tools/peer-bench/device-run.sh "$BUNDLE/peer-wheels.tar.xz" \
            --compile --skip-attention --shape flux-dev --res 1024 --steps 28 --json "$OUT/peer-compile.json" "${compare[@]}"
    fi
fi

echo
echo "== device-check summary ($(date -u +%H:%MZ)) =="
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
# A device run brings back at most 8 files from $OUT: past that, the summary and the JSON results
# stay loose and the logs go into one archive.
if [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
    (cd "$OUT" && tar -czf logs.tar.gz machine.txt ./*.log && rm -f machine.txt ./*.log)
    echo "(the logs above are packed into $OUT/logs.tar.gz with machine.txt: tar -xzf to read them)" | tee -a "$OUT/summary.txt"
fi
