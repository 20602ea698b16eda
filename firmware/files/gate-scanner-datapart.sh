#!/usr/bin/env bash
# First boot, before /var/lib/gate-scanner is mounted: create the writable data partition
# (label GATEDATA, ext4) in the space after the root partition. The image recipe keeps the
# root partition at its built size (it removes the OS's grow-root-to-fill-the-card step), so
# the rest of the card is free; the root becomes a read-only overlay after provisioning, so
# it never needs the room.
#
# Usage: gate-scanner-datapart.sh [--dry-run] [DISK]   (DISK default: the disk holding /)
set -euo pipefail

label=GATEDATA
min_mib=256
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi

if blkid -L "$label" >/dev/null 2>&1; then
  echo "gate-scanner-datapart: $label exists: nothing to do"
  exit 0
fi
disk=${1:-}
if [ -z "$disk" ]; then
  rootpart=$(findmnt -no SOURCE /)
  disk=/dev/$(lsblk -no PKNAME "$rootpart")
fi
# The free space after the last partition, in 512-byte sectors (the last line of sfdisk
# --list-free), and nothing else: a card image also has a few MiB free before the boot
# partition, and sfdisk's own default start would put the data partition there.
read -r free_start free_sectors < <(sfdisk --list-free "$disk" |
  awk '/^ *[0-9]+ +[0-9]+ +[0-9]+/ {s = $1; n = $3} END {print s + 0, n + 0}')
# Start and size on 1 MiB boundaries, as flash erase blocks like.
start=$(((free_start + 2047) / 2048 * 2048))
size=$(((free_sectors - (start - free_start)) / 2048 * 2048))
free_mib=$((size / 2048))
if [ "$free_mib" -lt "$min_mib" ]; then
  echo "gate-scanner-datapart: only ${free_mib} MiB free on $disk (the root was grown over the card?): reflash" >&2
  exit 1
fi
echo "gate-scanner-datapart: creating $label (${free_mib} MiB at sector $start) on $disk"
if [ "$dry_run" = 1 ]; then exit 0; fi
printf 'start=%s, size=%s, type=83\n' "$start" "$size" | sfdisk --append --no-reread "$disk"
partx -u "$disk"
part=$(lsblk -lnpo NAME "$disk" | tail -n 1)
udevadm settle
mkfs.ext4 -q -L "$label" -m 0 "$part"
udevadm settle
