#!/usr/bin/env bash
# Proof on arm64: build a Debian 13 (trixie, the base of current Raspberry Pi OS) arm64 root
# file system under qemu-user emulation, install gate-scanner into it the way a gate gets it
# (apt packages, a venv that sees the system site packages, the wheel), and run the built-in
# demo inside it: replayed frames, mock pins, a private mosquitto, the real daemon.
#
# Needs root, debootstrap, qemu-user-static and binfmt_misc. Takes 20-40 minutes on 2 cores,
# so it is not part of the default test run:  sudo firmware/check-arm64.sh [ROOTFS_DIR]
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
root=${1:-/var/tmp/gate-scanner-arm64}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
started=$(date +%s)

say() { printf '[check-arm64 %4ss] %s\n' "$(($(date +%s) - started))" "$*"; }

for tool in debootstrap qemu-aarch64-static; do
  command -v "$tool" >/dev/null || { echo "check-arm64: $tool is missing (apt-get install debootstrap qemu-user-static)" >&2; exit 2; }
done
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  update-binfmts --enable qemu-aarch64
fi

# The same apt packages the image recipe installs (trixie names zbar libzbar0t64; python3-picamera2 exists only in the
# Raspberry Pi archive; its absence here is why the demo runs on replayed frames).
packages=python3,python3-venv,python3-pip,libzbar0t64,mosquitto,ca-certificates,libglib2.0-0t64

if [ ! -x "$root/usr/bin/python3" ]; then
  say "debootstrap trixie arm64 into $root"
  rm -rf "$root"
  debootstrap --arch=arm64 --variant=minbase --include="$packages" trixie "$root" "$mirror"
fi

say "building the gate-scanner wheel"
wheel_dir="$root/tmp/wheels"
rm -rf "$wheel_dir" && mkdir -p "$wheel_dir"
python3 -m pip wheel --quiet --no-deps --wheel-dir "$wheel_dir" "$here"

cleanup() {
  for mount_point in dev/pts dev proc sys; do
    umount -l "$root/$mount_point" 2>/dev/null || true
  done
}
trap cleanup EXIT
mount --bind /proc "$root/proc"
mount --bind /sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# This scratch root file system must trust what the host trusts (a proxy may re-sign TLS):
# pip there uses the system store, so the host's bundle goes into it.
cp -L "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$root/etc/ssl/certs/ca-certificates.crt"
unset PIP_FIND_LINKS PIP_CERT

say "installing into a venv with system site packages (as the image recipe does)"
chroot "$root" /bin/sh -ec '
  python3 --version
  uname -m
  rm -rf /opt/gate-scanner/.venv
  python3 -m venv --system-site-packages /opt/gate-scanner/.venv
  /opt/gate-scanner/.venv/bin/pip install --quiet /tmp/wheels/*.whl
'

say "running the demo inside arm64 (replayed frames, mock pins, private mosquitto)"
chroot "$root" /bin/sh -ec '
  cd /tmp
  /opt/gate-scanner/.venv/bin/gate-scanner demo
'
say "running the self-test inside arm64 (replayed card frames, mock pins, private mosquitto)"
chroot "$root" /bin/sh -ec '
  cd /tmp
  printf "[device]\nid = \"arm64-gate\"\nsite = \"proof\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = 1\n[storage]\ndir = \"/tmp/selftest-state\"\n" >/tmp/selftest.toml
  /opt/gate-scanner/.venv/bin/gate-scanner selftest --simulate --config /tmp/selftest.toml
'
say "arm64 proof passed"
