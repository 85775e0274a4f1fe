#!/usr/bin/env bash
# On the GPU machine (tools/device-check.sh calls it): installs diffusers into python3's PyTorch
# environment from the archive tools/peer-bench/wheels.sh made, without network, then runs
# peer_bench.py with the remaining arguments.
#   usage: tools/peer-bench/device-run.sh WHEELS.tar.xz [peer_bench.py arguments]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ $# -ge 1 ] || { echo "usage: $0 WHEELS.tar.xz [peer_bench.py arguments]" >&2; exit 2; }
wheels="$1"
shift
want="$(sed -n 's/^diffusers==//p' "$HERE/requirements.txt")"

if python3 -c "import sys, diffusers; sys.exit(diffusers.__version__ != '$want')" 2>/dev/null; then
    echo "device-run: diffusers $want already installed"
else
    [ -f "$wheels" ] || { echo "device-run: $wheels missing: run tools/device-bundle.sh (it calls tools/peer-bench/wheels.sh)" >&2; exit 1; }
    dir="$(mktemp -d)"
    trap 'rm -rf "$dir"' EXIT
    # Python's tarfile rather than tar -J: it needs no xz binary on the machine.
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$wheels" "$dir"
    # Without --no-deps: pip checks diffusers' needs against what is installed and names any missing.
    python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-compile --no-index --find-links "$dir" "diffusers==$want"
    echo "device-run: installed diffusers $want offline"
fi
python3 "$HERE/peer_bench.py" "$@"
