#!/usr/bin/env bash
# Regenerates tests/golden/ with the reference implementation (PyTorch + diffusers + peft).
# Creates tools/.venv-golden (git-ignored) on first use and keeps it in sync with
# tools/golden/requirements.txt; safe to run again at any time.
#   usage: tools/golden.sh [extra args for make_goldens.py]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV=tools/.venv-golden
source tools/pinned-venv.sh
pinned_venv "$VENV" tools/golden/requirements.txt

"$VENV/bin/python" tools/golden/make_ae_goldens.py --out tests/golden/ae
"$VENV/bin/python" tools/golden/make_goldens.py --out tests/golden "$@"
# imports make_goldens.py's BFL export, so it runs from its folder
(cd tools/golden && "../../$VENV/bin/python" make_import_goldens.py --out ../../tests/golden/import)
# after make_goldens.py: its guidance-b2 model is the base of the LoRA gradient goldens
exec "$VENV/bin/python" tools/golden/make_lora_grad_goldens.py --golden tests/golden
