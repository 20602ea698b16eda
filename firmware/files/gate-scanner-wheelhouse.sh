#!/usr/bin/env bash
# The offline wheelhouse both image recipes install from: gate-scanner's wheel built from this
# checkout plus every dependency as an aarch64/CPython 3.13 wheel (the Python of trixie, which
# Raspberry Pi OS and Debian 13 share), hashes in SHA256SUMS. The image never reaches PyPI.
#
# Usage: gate-scanner-wheelhouse.sh REPO OUT_DIR   (needs pip on the build machine, and PyPI)
set -euo pipefail

repo=$1
out=$2
python=${PYTHON:-python3}
mkdir -p "$out"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$out" "$repo"
"$python" -m pip download --quiet --dest "$out" --only-binary=:all: \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
  --python-version 3.13 --implementation cp "$out"/gate_scanner-*.whl
(cd "$out" && sha256sum ./*.whl >SHA256SUMS)
