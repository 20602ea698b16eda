#!/usr/bin/env bash
# Boot the Debian gate image in qemu-system-aarch64 (virt board, TCG, 512 MB) and check first
# boot, the gate's check-ins on the host, the read-only root across a reboot, the self-test and
# the refusal of a tampered bundle, with no keyboard input (firmware/boot_test.py says how).
# Slow (tens of minutes under emulation), so not part of the default test run.
#
# Usage: sudo firmware/boot-test.sh OUT.img [--work DIR] [--card-mib N]
#   OUT.img from firmware/build-image.sh --debian; it is copied, never changed.
# Needs: qemu-system-arm, mtools, fdisk, mosquitto, socat, openssh-client, and the project's
# venv (./quickstart test makes .venv) for the host side: provision, the broker, the subscriber.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
if [ $# -lt 1 ]; then echo "usage: $0 OUT.img [--work DIR] [--card-mib N]" >&2; exit 2; fi
for tool in qemu-system-aarch64 mtype mcopy sfdisk mosquitto socat ssh ssh-keygen; do
  command -v "$tool" >/dev/null || {
    echo "boot-test: $tool is missing (apt-get install qemu-system-arm mtools fdisk mosquitto socat openssh-client)" >&2
    exit 2
  }
done
python=${PYTHON:-$repo/.venv/bin/python}
if [ ! -x "$python" ]; then echo "boot-test: no $python: run ./quickstart test once, or set PYTHON" >&2; exit 2; fi
cd "$repo"
exec "$python" "$here/boot_test.py" "$@"
