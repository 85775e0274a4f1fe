#!/usr/bin/env bash
# The shipped model's validation table and spectral figure (issue 7), from the models that
# tools/train-shipped.sh leaves in RUNS (default data/runs): bicubic, SFT, SFT + S-DPO (s = 0 and
# 1.5) and SFT + AS-DPO, each at its defaults, at one step and at 4 steps (single samples),
# upscaled with the CLI's defaults (seed 0, wavelet colour fix) from data/val/lq and scored
# against data/val/hq. Writes RUNS/eval/*.csv, prints the table as Markdown, and draws
# docs/spectrum.png (EveningGlow_a: HQ black, bicubic-of-HQ blue, SFT + AS-DPO red, then SFT
# green, S-DPO s = 0 orange, S-DPO s = 1.5 magenta, the LQ's bicubic cyan).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUNS="${1:-data/runs}"
E=target/release/engine
OUT="$RUNS/eval"
mkdir -p "$OUT"

mean() { awk -F, '$1 == "mean" { printf "%.2f | %.4f | %.2f", $2, $3, $4 }' "$1"; }
score() { $E eval "$1" data/val/hq --csv "$OUT/$2.csv" --overwrite > /dev/null; }

$E upscale data/val/lq -o "$OUT/bicubic" --bicubic --overwrite 2> /dev/null
score "$OUT/bicubic" bicubic
echo "| variant | steps | PSNR-Y (dB) | SSIM-Y | LSD |"
echo "|---|---|---|---|---|"
echo "| bicubic | - | $(mean "$OUT/bicubic.csv") |"
# Each model at its defaults (model.json: one step, the mean of 4 samples), and single samples at
# one step (the posterior-mean estimate) and at 4 steps.
for name in sft dpo-s0 dpo-s1.5 asdpo; do
  for setting in default 1 4; do
    dir="$OUT/$name-$setting"
    flags=()
    [ "$setting" = default ] || flags=(--steps "$setting" --average 1)
    $E upscale data/val/lq -o "$dir" --model "$RUNS/model-$name" "${flags[@]}" --overwrite 2> "$dir.log" || { cat "$dir.log"; exit 1; }
    score "$dir" "$name-$setting"
    echo "| $name | $setting | $(mean "$OUT/$name-$setting.csv") |"
  done
done
$E eval "$OUT/asdpo-default" data/val/hq --plot docs/spectrum.png --plot-stem EveningGlow_a --overwrite \
  --plot-also "$OUT/sft-default" --plot-also "$OUT/dpo-s0-default" --plot-also "$OUT/dpo-s1.5-default" \
  --plot-also "$OUT/bicubic" > /dev/null
echo "wrote docs/spectrum.png"
