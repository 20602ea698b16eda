#!/usr/bin/env bash
# Lays gate-scanner's own files onto an image's root file system: the daemon unit and its
# data-partition drop-in, the first-boot and data-partition units and scripts, the watchdog
# and journal settings, the fstab line for the data partition and the config.txt fragment.
# Both recipes call it (pi-gen's 01-run.sh, build-image.sh --debian), and so does the fast
# test (tests/test_firmware.py) on a scratch directory: one list of files, no copies.
#
# Usage: gate-scanner-install-files.sh ROOT FILES_DIR UNIT_FILE
#   ROOT       the image's root directory (its boot partition at ROOT/boot/firmware)
#   FILES_DIR  firmware/files (or pi-gen's copy of it)
#   UNIT_FILE  systemd/gate-scanner.service
set -euo pipefail

root=${1%/}
files=$2
unit=$3
sysd=$root/etc/systemd/system

install -d -m 0755 "$sysd/gate-scanner.service.d" "$root/etc/systemd/system.conf.d" \
  "$root/etc/systemd/journald.conf.d" "$root/usr/local/sbin" \
  "$root/var/lib/gate-scanner" "$root/boot/firmware"
install -m 0644 "$unit" "$sysd/gate-scanner.service"
install -m 0644 "$files/gate-scanner-data.conf" "$sysd/gate-scanner.service.d/data.conf"
for name in gate-scanner-firstboot.service gate-scanner-datapart.service gate-scanner-lower-ro.service; do
  install -m 0644 "$files/$name" "$sysd/$name"
done
for name in gate-scanner-firstboot.sh gate-scanner-datapart.sh gate-scanner-readonly.sh; do
  install -m 0755 "$files/$name" "$root/usr/local/sbin/$name"
done
install -m 0644 "$files/gate-scanner-watchdog.conf" "$root/etc/systemd/system.conf.d/gate-scanner-watchdog.conf"
install -m 0644 "$files/gate-scanner-journald.conf" "$root/etc/systemd/journald.conf.d/gate-scanner.conf"
if ! grep -qs GATEDATA "$root/etc/fstab"; then
  cat "$files/fstab.gate-scanner" >>"$root/etc/fstab"
fi
config=$root/boot/firmware/config.txt
if ! grep -qs '# gate-scanner' "$config"; then
  cat "$files/config.txt.gate-scanner" >>"$config"
fi
