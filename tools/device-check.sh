#!/usr/bin/env bash
# Run on a GPU machine (H100/H200: nvcc and PyTorch present, no Rust, no network) from the
# repository root, with bundle/ made beforehand by tools/device-bundle.sh. Prints the machine's
# facts, runs the ignored GPU tests and `engine selftest`, then the kernel and model benchmarks
# when the binary has them, a one-rank training run through NCCL against the plain one
# (tools/nccl-one-rank.sh), then the PyTorch + diffusers baseline on the same shapes
# (tools/peer-bench, when bundle/ has its wheels; PEER_COMPILE=1 adds its torch.compile variant);
# logs go to $OUT (default ./device-out); a short table comes last. Every step has its own time
# limit, cut to what is left of BUDGET seconds for the whole run (default 540: the device tool's
# calls end at 600 s, and a session has 15 minutes of device time in all); a step that would get
# under 20 s is skipped and says so. Correctness comes first, then the timings, then the peer.
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
BUDGET="${BUDGET:-540}"
step() { # name, limit in seconds, command... (returns the command's exit status)
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET - SECONDS - 10))
    if [ $left -lt 20 ]; then
        SUMMARY+=("$(printf '%-14s %-22s' "$name" "SKIPPED (budget)")")
        return 1
    fi
    [ $limit -gt $left ] && limit=$left
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    [ $rc -eq 0 ] || verdict="FAILED (exit $rc)"
    [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit} s"
    SUMMARY+=("$(printf '%-14s %-22s %4d s  %s' "$name" "$verdict" $((SECONDS - t0)) "$OUT/$name.log")")
    tail -n 80 "$OUT/$name.log"
    return $rc
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

# The attention kernels on probation (the Hopper forward, the tensor-core backward) get steps of
# their own first: if one faults, the CUDA context of the process is lost, and every later step
# would fail with it. Each try switches off what the last one named (its warning, or the variable
# its failure message suggests); a failure naming neither switches both off. The summary says
# what the later steps ran with.
if "$BIN/engine" --help | grep -q '^  kernels'; then
    for try in 1 2 3; do
        log="$OUT/attention-probe-$try.log"
        step "attention-probe-$try" 60 "$BIN/engine" kernels --size small --device cuda && ok=1 || ok=0
        switched=0
        if [ -z "${ENGINE_ATTENTION:-}" ] && grep -q 'sm90a attention kernel disabled\|ENGINE_ATTENTION=portable' "$log"; then
            export ENGINE_ATTENTION=portable
            switched=1
        fi
        if [ -z "${ENGINE_ATTENTION_BWD:-}" ] && grep -q 'mma attention backward kernel disabled\|ENGINE_ATTENTION_BWD=simt' "$log"; then
            export ENGINE_ATTENTION_BWD=simt
            switched=1
        fi
        [ $ok = 1 ] && break
        if [ $switched = 0 ]; then
            export ENGINE_ATTENTION=portable ENGINE_ATTENTION_BWD=simt
            break
        fi
    done
    SUMMARY+=("(later steps ran with ENGINE_ATTENTION=${ENGINE_ATTENTION:-auto} ENGINE_ATTENTION_BWD=${ENGINE_ATTENTION_BWD:-auto})")
fi
step gpu-tests 150 "$BIN/gpu-tests" --ignored --test-threads=1
step selftest 90 "$BIN/engine" selftest --device cuda
# Data-parallel training's NCCL path on this one GPU: the adapter equals the plain run's.
if "$BIN/engine" train --help | grep -q 'peer-timeout'; then
    step nccl-one-rank 120 bash tools/nccl-one-rank.sh "$BIN/engine" "$(mktemp -d)/nccl"
fi
# engine train itself on the GPU: its losses against the CPU's, and resume determinism.
if "$BIN/engine" train --help | grep -q 'bytes_to_device'; then
    step train-parity 120 bash tools/train-parity.sh "$BIN/engine" "$BIN/train"
fi
if "$BIN/engine" --help | grep -q '^  kernels'; then
    step kernels 90 "$BIN/engine" kernels --json "$OUT/kernels.json"
fi
if "$BIN/engine" --help | grep -q '^  bench'; then
    step bench 120 "$BIN/engine" bench --shape flux-dev --random-weights --res 1024 --steps 28 --autoencoder --json "$OUT/bench.json"
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
