# Sourced by tools/metric-weights.sh and tools/metrics/goldens.sh: creates tools/.venv-metrics
# (git-ignored) on first use and keeps it in sync with tools/metrics/requirements.txt, then sets
# METRICS_PY to its python.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
METRICS_VENV="$ROOT/tools/.venv-metrics"
metrics_req="$ROOT/tools/metrics/requirements.txt"
metrics_stamp="$METRICS_VENV/.requirements.sha256"

if [ ! -x "$METRICS_VENV/bin/python" ]; then
    echo "metrics: creating $METRICS_VENV" >&2
    "${PYTHON:-python3}" -m venv "$METRICS_VENV"
fi
metrics_want="$(sha256sum "$metrics_req" | cut -d' ' -f1)"
if [ "$metrics_want" != "$(cat "$metrics_stamp" 2>/dev/null || true)" ]; then
    echo "metrics: installing the pinned reference packages (torch is large; this takes a few minutes)" >&2
    "$METRICS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$metrics_req"
    echo "$metrics_want" > "$metrics_stamp"
fi
METRICS_PY="$METRICS_VENV/bin/python"
