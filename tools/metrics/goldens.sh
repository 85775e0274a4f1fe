#!/usr/bin/env bash
# Regenerates tests/golden/perceptual and tests/golden/noref with the reference packages
# (tools/metrics/make_goldens.py) in tools/.venv-metrics. Needs PyPI and Debian's opencv-data
# (BRISQUE's model); CI does not run it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
exec "$METRICS_PY" "$ROOT/tools/metrics/make_goldens.py" "$@"
