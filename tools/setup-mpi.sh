#!/usr/bin/env bash
# What `cargo build --features mpi` and the data-parallel tests (tests/mpi.rs) need: Open MPI
# (mpirun, and libmpi with its headers for rsmpi's bindings) and libclang (bindgen), from
# Debian's packages; installs them when missing (as root, or through sudo).
set -euo pipefail
have_libclang() {
    ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' || compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null
}
if command -v mpirun >/dev/null && command -v mpicc >/dev/null && have_libclang; then
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev libclang-dev >/dev/null
