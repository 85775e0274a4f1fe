#!/usr/bin/env bash
# Regenerates tests/golden/perceptual and tests/golden/noref with the reference packages
# (tools/metrics/make_goldens.py) in tools/.venv-metrics. Needs PyPI and Debian's opencv-data
# (BRISQUE's model); CI does not run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$ROOT/tools/pinned-venv.sh"
pinned_venv "$ROOT/tools/.venv-metrics" "$ROOT/tools/metrics/requirements.txt"
exec "$ROOT/tools/.venv-metrics/bin/python" "$ROOT/tools/metrics/make_goldens.py" "$@"
