#!/usr/bin/env bash
# CI's kernel gate: recompiles every cuda/*.cu with the pinned nvcc (tools/setup-cuda.sh) and
# fails when the committed ptx/ differs from what the sources produce (stale PTX never lands),
# then prints ptxas' resource report (registers, shared memory, spills) for each kernel on the
# architectures we ship for and fails on any register spill.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NVCC="$(bash tools/setup-cuda.sh)"
PTXAS="$(dirname "$NVCC")/ptxas"
export NVCC

committed="$(mktemp -d)"
trap 'rm -rf "$committed"' EXIT
cp -r ptx/. "$committed/"
cargo check -p engine --quiet   # engine/build.rs rewrites ptx/ from cuda/
if ! diff -r -q "$committed" ptx >/dev/null; then
    echo "ptx-check: the committed ptx/ is stale; rebuild with the pinned nvcc (tools/setup-cuda.sh, then cargo build) and commit ptx/:" >&2
    diff -r -q "$committed" ptx >&2 || true
    exit 1
fi
# Internal-linkage names (a static __shared__ variable in an anonymous namespace, for one) carry
# a hash of the source file's path into the PTX, which then differs between checkouts.
if grep -l '_INTERNAL_' ptx/*.ptx >/dev/null 2>&1; then
    echo "ptx-check: PTX names that depend on the checkout's path (_INTERNAL_); declare those variables outside anonymous namespaces:" >&2
    grep -l '_INTERNAL_' ptx/*.ptx >&2
    exit 1
fi
for cu in cuda/*.cu; do
    name="$(basename "$cu" .cu)"
    [ -f "ptx/$name.ptx" ] || { echo "ptx-check: $cu has no ptx/$name.ptx" >&2; exit 1; }
done
for ptx in ptx/*.ptx; do
    name="$(basename "$ptx" .ptx)"
    [ -f "cuda/$name.cu" ] || { echo "ptx-check: $ptx has no source cuda/$name.cu" >&2; exit 1; }
done

# ptxas -v prints, per kernel: "Compiling entry function 'K' for 'sm_XX'", then the stack frame
# and spill line, then "Used N registers, ... N bytes smem ...". Tabulate those.
printf '%-44s %-7s %5s %8s %6s %6s\n' kernel arch regs smem spillS spillL
spills=0
for ptx in ptx/*.ptx; do
    case "$ptx" in
        *_sm90a.ptx) archs="sm_90a" ;;
        *) archs="sm_80 sm_90" ;;
    esac
    for arch in $archs; do
        report="$("$PTXAS" -arch="$arch" -v "$ptx" -o /dev/null 2>&1)"
        while IFS=$'\t' read -r kernel regs smem st ld; do
            printf '%-44s %-7s %5s %8s %6s %6s\n' "$kernel" "$arch" "$regs" "$smem" "$st" "$ld"
            if [ "$st" != 0 ] || [ "$ld" != 0 ]; then spills=$((spills + 1)); fi
        done < <(awk '
            /Compiling entry function/ { match($0, /function .[^'"'"']*/); k = substr($0, RSTART + 10, RLENGTH - 10); smem = 0 }
            /spill stores/ { for (i = 1; i <= NF; i++) { if ($(i+3) == "stores,") st = $i; if ($(i+3) == "loads") ld = $i } }
            /Used [0-9]+ registers/ {
                for (i = 1; i <= NF; i++) { if ($i == "Used") r = $(i+1); if ($(i+1) == "bytes" && $(i+2) == "smem") smem = $i }
                printf "%s\t%s\t%s\t%s\t%s\n", k, r, smem, st, ld
            }' <<<"$report")
    done
done
if [ "$spills" -ne 0 ]; then
    echo "ptx-check: $spills kernel build(s) spill registers (see spillS/spillL above)" >&2
    exit 1
fi
echo "ptx-check: ptx/ is current and no kernel spills"
