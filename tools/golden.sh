#!/usr/bin/env bash
# Regenerates tests/golden/ with the reference implementation (PyTorch + diffusers + peft).
# Creates tools/.venv-golden (git-ignored) on first use and keeps it in sync with
# tools/golden/requirements.txt; safe to run again at any time.
#   usage: tools/golden.sh [extra args for make_goldens.py]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV=tools/.venv-golden
REQ=tools/golden/requirements.txt
STAMP="$VENV/.requirements.sha256"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "golden: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi

want="$(sha256sum "$REQ" | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
    echo "golden: installing pinned requirements (torch is large; this takes a few minutes)" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
    echo "$want" > "$STAMP"
fi

"$VENV/bin/python" tools/golden/make_ae_goldens.py --out tests/golden/ae
"$VENV/bin/python" tools/golden/make_goldens.py --out tests/golden "$@"
# imports make_goldens.py's BFL export, so it runs from its folder
(cd tools/golden && "../../$VENV/bin/python" make_import_goldens.py --out ../../tests/golden/import)
# after make_goldens.py: its guidance-b2 model is the base of the LoRA gradient goldens
exec "$VENV/bin/python" tools/golden/make_lora_grad_goldens.py --golden tests/golden
