#!/usr/bin/env bash
# `engine train` on the GPU against the CPU, and a resumed GPU run against an uninterrupted one
# (design.md section 12): a few SFT steps of a random flux-tiny LoRA on the examples/ image, and a
# few AS-DPO steps with the closed-form losers on top of that SFT adapter. Prints the largest
# relative difference of the logged losses between the two devices (bf16 against f32: a few
# percent is expected, more is a bug) and whether the resumed GPU run wrote the same adapter as
# the uninterrupted one, byte for byte (the kernels' determinism). Usage (from the repository
# root, with the engine binary as the first argument): tools/train-parity.sh ENGINE OUT_DIR
set -uo pipefail
ENGINE="$1"
OUT="$2"
mkdir -p "$OUT"
rm -rf "$OUT"/{cpu,cuda,split}-* "$OUT"/*.jsonl
common=(--preset flux-tiny --init-seed 3 --data examples --crop 64 --batch 2 --rank 4 --lr 1e-3 --seed 11)
run() { # device, name, stage, steps, extra...
    local device="$1" name="$2" stage="$3" steps="$4"
    shift 4
    "$ENGINE" train --stage "$stage" "${common[@]}" --device "$device" --out "$OUT/$name" --max-steps "$steps" --log "$OUT/$name.jsonl" "$@"
}
status=0
for device in cpu cuda; do
    run "$device" "$device-sft" sft 6 || status=1
    run "$device" "$device-asdpo" asdpo 4 --closed-form --sft-lora "$OUT/$device-sft/lora.safetensors" || status=1
done
run cuda split-sft sft 3 && run cuda split-sft sft 6 --resume || status=1
python3 - "$OUT" <<'PY' || status=1
import json, sys
out = sys.argv[1]
def losses(name):
    return [json.loads(l)["loss"] for l in open(f"{out}/{name}.jsonl")]
worst = 0.0
for stage in ("sft", "asdpo"):
    cpu, gpu = losses(f"cpu-{stage}"), losses(f"cuda-{stage}")
    err = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(cpu, gpu))
    worst = max(worst, err)
    print(f"{stage}: cpu {['%.5f' % l for l in cpu]}")
    print(f"{stage}: gpu {['%.5f' % l for l in gpu]}  largest relative difference {err:.2e}")
same = open(f"{out}/cuda-sft/lora.safetensors", "rb").read() == open(f"{out}/split-sft/lora.safetensors", "rb").read()
print("resumed GPU run:", "bit-identical to the uninterrupted one" if same else "DIFFERS from the uninterrupted one (a kernel is not deterministic)")
sys.exit(0 if worst < 0.1 else 1)
PY
exit $status
