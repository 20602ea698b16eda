#!/usr/bin/env bash
# Makes the root file system a RAM overlay over the read-only card from the next boot on.
# Both images use Debian's overlayroot package in the initramfs, as raspi-config's
# do_overlayfs does, but with `overlayroot=tmpfs:recurse=0` on the kernel command line and
# without raspi-config (Debian has none). recurse=0 is the point: raspi-config writes plain
# `overlayroot=tmpfs`, and overlayroot's default recursion then also lays a tmpfs over every
# other ext4 mount in fstab, the data partition included: the outbox and keys would be
# written to RAM and lost at power-off, while `findmnt` still showed a mount there.
#
# Usage: gate-scanner-readonly.sh enable|disable [BOOT_DIR]   (BOOT_DIR default /boot/firmware)
#   ROOT=DIR: the image's root is under DIR (tests).
set -euo pipefail

what=${1:-}
root=${ROOT:-}
boot=${2:-$root/boot/firmware}
# Not `ro` as well: overlayroot would then mount the overlay itself read-only. The card's root
# under it (mounted read-write where cmdline.txt says rw, as Debian's does) is made read-only
# by gate-scanner-lower-ro.service instead.
arg=overlayroot=tmpfs:recurse=0
cmdline=$boot/cmdline.txt
# Debian's raspi-firmware rewrites cmdline.txt on every kernel update from its defaults; this
# file is where it takes extra arguments from, so the setting survives an update.
extra=$root/etc/default/raspi-extra-cmdline

strip() { sed -E 's/(^| )(ro )?overlayroot=[^ ]*//g; s/^ +//' "$1"; }
case "$what" in
  enable)
    line=$(strip "$cmdline" | tr -d '\n')
    printf '%s %s\n' "$line" "$arg" >"$cmdline.new"
    mv "$cmdline.new" "$cmdline"
    if [ -e "$root/etc/kernel/postinst.d/z50-raspi-firmware" ]; then
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
