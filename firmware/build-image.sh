#!/usr/bin/env bash
# Build the gate image: Raspberry Pi OS Lite 64-bit (pi-gen stages 0-2) plus the
# stage-gate-scanner stage from this directory.
#
# Reproducible inputs: pi-gen at a pinned ref (PI_GEN_REF), the Debian/Raspberry Pi archives
# as of the build (pi-gen has no snapshot pinning; record the build date), and an offline
# wheelhouse: gate-scanner's wheel plus its dependencies for aarch64/CPython 3.13 with hashes
# in wheelhouse/SHA256SUMS.
#
# Usage: firmware/build-image.sh [WORKDIR]   (needs docker; SSH_PUBKEY=~/.ssh/id_ed25519.pub)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
work=${1:-/var/tmp/gate-scanner-pi-gen}
pi_gen_repo=${PI_GEN_REPO:-https://github.com/RPi-Distro/pi-gen.git}
# The arm64 branch builds the 64-bit OS; pin a release tag of it for a repeatable build.
pi_gen_ref=${PI_GEN_REF:-arm64}
pubkey_file=${SSH_PUBKEY:-$HOME/.ssh/id_ed25519.pub}

if [ ! -d "$work/pi-gen" ]; then
  git clone --depth 1 --branch "$pi_gen_ref" "$pi_gen_repo" "$work/pi-gen"
fi
pigen=$work/pi-gen
stage=$pigen/stage-gate-scanner
rm -rf "$stage"
cp -r "$here/stage-gate-scanner" "$stage"
files=$stage/00-gate-scanner/files
mkdir -p "$files/wheelhouse"
cp "$here"/files/* "$files/"
cp "$repo/systemd/gate-scanner.service" "$here/README.md" "$files/"

python3 -m pip wheel --no-deps --wheel-dir "$files/wheelhouse" "$repo"
python3 -m pip download --dest "$files/wheelhouse" --only-binary=:all: \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
  --python-version 3.13 --implementation cp "$files"/wheelhouse/gate_scanner-*.whl
(cd "$files/wheelhouse" && sha256sum ./*.whl >SHA256SUMS)

# Lite only: skip the desktop stages and stage2's own image.
touch "$pigen/stage2/SKIP_IMAGES"
pubkey=""
if [ -f "$pubkey_file" ]; then pubkey=$(cat "$pubkey_file"); fi
cat >"$pigen/config" <<CONFIG
IMG_NAME=gate-scanner
RELEASE=trixie
TARGET_HOSTNAME=gate
FIRST_USER_NAME=technician
DISABLE_FIRST_BOOT_USER_RENAME=1
ENABLE_SSH=1
PUBKEY_SSH_FIRST_USER="$pubkey"
PUBKEY_ONLY_SSH=1
LOCALE_DEFAULT=en_GB.UTF-8
TIMEZONE_DEFAULT=Etc/UTC
STAGE_LIST="stage0 stage1 stage2 stage-gate-scanner"
CONFIG
(cd "$pigen" && ./build-docker.sh)
echo "image: $pigen/deploy/ (pi-gen $(git -C "$pigen" rev-parse HEAD), built $(date -u +%FT%TZ))"
