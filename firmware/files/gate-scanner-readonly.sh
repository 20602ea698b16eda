#!/usr/bin/env bash
# Makes the root file system a RAM overlay over the read-only card from the next boot on.
# Both images use Debian's overlayroot in the initramfs, as raspi-config's do_overlayfs does,
# but set directly, so that the same line works without raspi-config:
# `overlayroot=tmpfs:recurse=0` on the kernel command line. recurse=0 keeps the other mounts
# (the data partition, the boot partition) as they are: read-write, on the card.
#
# Usage: gate-scanner-readonly.sh enable|disable [BOOT_DIR]   (BOOT_DIR default /boot/firmware)
set -euo pipefail

what=${1:-}
boot=${2:-/boot/firmware}
arg=overlayroot=tmpfs:recurse=0
cmdline=$boot/cmdline.txt
# Debian's raspi-firmware rewrites cmdline.txt on every kernel update from its defaults; this
# file is where it takes extra arguments from, so the setting survives an update.
extra=/etc/default/raspi-extra-cmdline

strip() { sed -E 's/(^| )overlayroot=[^ ]*//g; s/^ +//' "$1"; }
case "$what" in
  enable)
    line=$(strip "$cmdline" | tr -d '\n')
    printf '%s %s\n' "$line" "$arg" >"$cmdline.new"
    mv "$cmdline.new" "$cmdline"
    if [ -d /etc/default ] && [ -e /etc/kernel/postinst.d/z50-raspi-firmware ]; then
      printf '%s\n' "$arg" >"$extra"
    fi
    ;;
  disable)
    strip "$cmdline" >"$cmdline.new"
    mv "$cmdline.new" "$cmdline"
    if [ -f "$extra" ]; then strip "$extra" >"$extra.new" && mv "$extra.new" "$extra"; fi
    ;;
  *)
    echo "usage: $0 enable|disable [BOOT_DIR]" >&2
    exit 2
    ;;
esac
sync
