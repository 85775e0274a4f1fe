#!/usr/bin/env bash
# Data-parallel training's NCCL path on one GPU (a step of tools/device-check.sh): a run whose
# gradients go through NCCL's all-reduce (ENGINE_COLLECTIVE=nccl: one rank, ncclAvg over one)
# must train exactly what the plain run trains, the adapter equal byte for byte.
# Usage: tools/nccl-one-rank.sh ENGINE WORK_DIR
set -euo pipefail
ENGINE="$1"
WORK="$2"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rm -rf "$WORK"
mkdir -p "$WORK/data"
# cudarc opens libnccl.so; NCCL's runtime packages and the nvidia-nccl wheels install only
# libnccl.so.2: link it under the other name, first on the library path.
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so '; then
    IFS=: read -ra dirs <<<"${LD_LIBRARY_PATH:-}"
    for d in "${dirs[@]}" /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64; do
        if [ -n "$d" ] && [ -e "$d/libnccl.so.2" ] && [ ! -e "$d/libnccl.so" ]; then
            mkdir -p "$WORK/nccl-link"
            ln -sf "$d/libnccl.so.2" "$WORK/nccl-link/libnccl.so"
            export LD_LIBRARY_PATH="$WORK/nccl-link:${LD_LIBRARY_PATH:-}"
            echo "nccl-one-rank: libnccl.so -> $d/libnccl.so.2"
            break
        fi
    done
fi
cp "$ROOT/examples/evening-glow.png" "$WORK/data/"
run() { # name, then environment assignments
    local name="$1"
    shift
    env "$@" "$ENGINE" train --device cuda --data "$WORK/data" --max-steps 3 --batch 2 --crop 64 --rank 4 --lr 1e-3 \
        --seed 3 --out "$WORK/$name" --log "$WORK/$name.jsonl"
}
run plain
run nccl ENGINE_COLLECTIVE=nccl | tee "$WORK/nccl.txt"
grep -q 'through NCCL' "$WORK/nccl.txt" || { echo "nccl-one-rank: the forced run did not average through NCCL" >&2; exit 1; }
if cmp -s "$WORK/plain/lora.safetensors" "$WORK/nccl/lora.safetensors"; then
    echo "nccl-one-rank: ok: the adapter trained through NCCL equals the plain run's, byte for byte"
    exit 0
fi
# Tell a wrong NCCL path from a GPU run that does not repeat itself.
run plain-again
if cmp -s "$WORK/plain/lora.safetensors" "$WORK/plain-again/lora.safetensors"; then
    echo "nccl-one-rank: FAILED: the NCCL run's adapter differs from the plain run's, which repeats itself" >&2
else
    echo "nccl-one-rank: FAILED: even two plain runs differ: the training step is not deterministic on this GPU" >&2
fi
exit 1
