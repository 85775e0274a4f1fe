#!/usr/bin/env bash
# Run on the build machine (network to PyPI): packs the wheels of tools/peer-bench/requirements.txt
# into one archive that tools/peer-bench/device-run.sh installs offline on the GPU machine.
#   usage: tools/peer-bench/wheels.sh OUT.tar.xz
# Wheels are deflate zips, which xz cannot shrink further; re-storing their members uncompressed
# (the same files, so RECORD's hashes still hold) lets one xz stream compress them together:
# 6.5 MB of wheels become under 2 MB, which matters under the device run's 64 MiB limit.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ $# -eq 1 ] || { echo "usage: $0 OUT.tar.xz" >&2; exit 2; }
out="$(realpath -m "$1")"
PYTHON="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# --no-deps: requirements.txt names every carried package; the rest must already be on the device.
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -r "$HERE/requirements.txt" -d "$tmp/dl"
want=$(grep -c '^[A-Za-z]' "$HERE/requirements.txt")
have=$(find "$tmp/dl" -name '*.whl' | wc -l)
[ "$have" -eq "$want" ] || { echo "wheels.sh: $have wheels for $want requirements" >&2; exit 1; }
if find "$tmp/dl" -name '*.whl' ! -name '*-py3-none-any.whl' | grep .; then
    echo "wheels.sh: the wheels above are not pure Python: they would only fit one Python version on the device" >&2
    exit 1
fi

mkdir "$tmp/stored"
"$PYTHON" - "$tmp/dl" "$tmp/stored" <<'PY'
import os, sys, zipfile
src_dir, dst_dir = sys.argv[1:]
for name in sorted(os.listdir(src_dir)):
    with zipfile.ZipFile(os.path.join(src_dir, name)) as src, \
         zipfile.ZipFile(os.path.join(dst_dir, name), "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)  # read before changing the entry's compression
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
PY
mkdir -p "$(dirname "$out")"
tar -cf - -C "$tmp/stored" . | xz -9 > "$out.part"
mv "$out.part" "$out"
echo "wheels.sh: $(ls "$tmp/stored" | tr '\n' ' ')-> $out ($(( $(stat -c %s "$out") / 1024 )) KiB)"
