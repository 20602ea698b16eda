#!/usr/bin/env bash
# Build the gate image, one of two ways (firmware/README.md says which to pick):
#
#   firmware/build-image.sh [WORKDIR]
#       Raspberry Pi OS Lite 64-bit: pi-gen stages 0-2 plus stage-gate-scanner. Needs docker
#       and the Raspberry Pi archive. Output in WORKDIR/pi-gen/deploy/.
#   firmware/build-image.sh --debian OUT.img
#       Debian 13 (trixie) arm64 for the Raspberry Pi from Debian's archive alone, with
#       mmdebstrap (no docker): root, qemu-user-static with binfmt_misc, mmdebstrap, mtools,
#       dosfstools, e2fsprogs, fdisk. WORKDIR env (default /var/tmp/gate-scanner-debian) keeps
#       the bootstrapped base root between builds; delete it to start from the archive again.
#   firmware/build-image.sh --tree DIR
#       Only the files the Debian recipe lays onto a root (units, scripts, fstab, boot
#       settings), into DIR: no packages, no root needed. tests/test_firmware.py checks it.
#
# Both install the same gate pieces from firmware/files (gate-scanner-install-files.sh on the
# root, gate-scanner-setup-chroot.sh inside it) and the same offline wheelhouse
# (gate-scanner-wheelhouse.sh): gate-scanner's wheel and its aarch64/CPython 3.13 wheels with
# hashes. The archives are used as of the build day: record the printed date with the image.
#
# SSH_PUBKEY=FILE: the technician's key for the `technician` user (both images).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
files=$here/files
pubkey_file=${SSH_PUBKEY:-$HOME/.ssh/id_ed25519.pub}
started=$(date +%s)
say() { printf '[build-image %4ss] %s\n' "$(($(date +%s) - started))" "$*" >&2; }

# ------------------------------------------------------------------------------ pi-gen
build_pi_gen() {
  local work=${1:-/var/tmp/gate-scanner-pi-gen}
  local pi_gen_repo=${PI_GEN_REPO:-https://github.com/RPi-Distro/pi-gen.git}
  # The arm64 branch builds the 64-bit OS; pin a release tag of it for a repeatable build.
  local pi_gen_ref=${PI_GEN_REF:-arm64}
  if [ ! -d "$work/pi-gen" ]; then
    git clone --depth 1 --branch "$pi_gen_ref" "$pi_gen_repo" "$work/pi-gen"
  fi
  local pigen=$work/pi-gen
  local stage=$pigen/stage-gate-scanner
  rm -rf "$stage"
  cp -r "$here/stage-gate-scanner" "$stage"
  local stage_files=$stage/00-gate-scanner/files
  mkdir -p "$stage_files"
  # pi-gen runs a stage from its own tree, so the shared files travel with it.
  cp "$files"/* "$stage_files/"
  cp "$repo/systemd/gate-scanner.service" "$here/README.md" "$stage_files/"
  cat "$files/gate-scanner-packages.txt" >>"$stage/00-gate-scanner/00-packages"
  "$files/gate-scanner-wheelhouse.sh" "$repo" "$stage_files/wheelhouse"

  # Lite only: skip the desktop stages and stage2's own image.
  touch "$pigen/stage2/SKIP_IMAGES"
  local pubkey=""
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
}

# ------------------------------------------------------------------------------ Debian
# Labels as Debian's own Raspberry Pi images use them (raspi-firmware's defaults name them).
BOOT_LABEL=RASPIFIRM
ROOT_LABEL=RASPIROOT
BOOT_MIB=256
ALIGN_MIB=4

packages_csv() { cat "$@" | grep -v '^#' | tr -s '\n' ',' | sed 's/,$//'; }

chroot_mounts() {
  local root=$1
  mount --bind /proc "$root/proc"
  mount --bind /sys "$root/sys"
  mount --bind /dev "$root/dev"
  mount --bind /dev/pts "$root/dev/pts"
}

# The build machine's environment stays out of the image (a pip index, PYTHONDONTWRITEBYTECODE).
in_root() {
  local root=$1
  shift
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$root" "$@"
}

chroot_unmount() {
  local root=$1 point
  for point in dev/pts dev sys proc; do
    if mountpoint -q "$root/$point"; then umount -l "$root/$point"; fi
  done
}

# The slow part, cached: Debian's packages for the gate, bootstrapped under qemu-user. Keyed
# on the package lists, so a changed list rebuilds it.
debian_base() {
  local base=$1 mirror=$2
  local lists=("$here/debian/packages.txt" "$files/gate-scanner-packages.txt")
  local key
  key=$(cat "${lists[@]}" | sha256sum | cut -c1-16)
  if [ -f "$base.key" ] && [ "$(cat "$base.key")" = "$key" ] && [ -x "$base/usr/bin/python3" ]; then
    say "base root $base is current (package lists $key)"
    return
  fi
  rm -rf "$base" "$base.key"
  say "mmdebstrap trixie arm64 into $base"
  # raspi-firmware's kernel hook copies the kernel, initrd and device trees to /boot/firmware
  # only when that is a mount point; a bind mount of the directory on itself is one, and the
  # files stay in the tree for the FAT image.
  # shellcheck disable=SC2016 # the hooks are run by mmdebstrap, which passes the root as $1
  mmdebstrap --mode=root --arch=arm64 --variant=apt \
    --components="main non-free-firmware" \
    --include="$(packages_csv "${lists[@]}")" \
    --setup-hook='mkdir -p "$1/boot/firmware" && mount --bind "$1/boot/firmware" "$1/boot/firmware"' \
    --customize-hook='umount "$1/boot/firmware"' \
    trixie "$base" "$mirror"
  echo "$key" >"$base.key"
}

# Everything the Debian image gets as files, with no package or chroot involved: what
# `--tree DIR` lays out for tests/test_firmware.py, so the recipe cannot rot unseen.
debian_lay_files() {
  local root=$1
  say "laying the gate's files onto the root"
  "$files/gate-scanner-install-files.sh" "$root" "$files" "$repo/systemd/gate-scanner.service"
  install -d -m 0755 "$root/etc/udev/rules.d" "$root/opt"
  install -m 0644 "$here/debian/99-gate-scanner-gpio.rules" "$root/etc/udev/rules.d/99-gate-scanner-gpio.rules"
  install -m 0644 "$here/debian/gate-scanner-sshkeys.service" "$root/etc/systemd/system/gate-scanner-sshkeys.service"
  install -d -m 0755 "$root/etc/systemd/network"
  install -m 0644 "$here/debian/gate-scanner-network.network" "$root/etc/systemd/network/50-gate-scanner.network"
  install -m 0644 "$here/README.md" "$root/opt/README.gate-scanner.md"
  echo gate >"$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tgate\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
  # Root and boot by label: the same lines find the card on a Pi (mmcblk0) and in QEMU (vda).
  {
    echo "LABEL=$ROOT_LABEL  /  ext4  rw,noatime,errors=remount-ro  0  1"
    echo "LABEL=$BOOT_LABEL  /boot/firmware  vfat  rw,noatime  0  2"
    grep -v -e "LABEL=$ROOT_LABEL" -e "LABEL=$BOOT_LABEL" -e '^# UNCONFIGURED' "$root/etc/fstab" || true
  } >"$root/etc/fstab.new"
  mv "$root/etc/fstab.new" "$root/etc/fstab"
  # raspi-firmware writes config.txt and cmdline.txt afresh on every kernel update, from
  # /etc/default/raspi-firmware (root, consoles) and raspi-firmware-custom (our config.txt
  # lines); the serial console on the Pi 3/Zero 2 header is ttyS1, the last one /dev/console.
  install -d -m 0755 "$root/etc/default"
  if [ ! -f "$root/etc/default/raspi-firmware" ]; then
    printf '#ROOTPART=/dev/mmcblk0p2\n#CONSOLES="auto"\n' >"$root/etc/default/raspi-firmware"
  fi
  sed -i -e "s|^#\?ROOTPART=.*|ROOTPART=LABEL=$ROOT_LABEL|" \
    -e 's|^#\?CONSOLES=.*|CONSOLES="tty0 ttyS1,115200"|' "$root/etc/default/raspi-firmware"
  grep -q "^ROOTPART=LABEL=$ROOT_LABEL" "$root/etc/default/raspi-firmware"
  install -m 0644 "$files/config.txt.gate-scanner" "$root/etc/default/raspi-firmware-custom"
}

debian_customize() {
  local root=$1 wheelhouse=$2
  debian_lay_files "$root"
  rm -rf "$root/tmp/gate-scanner-wheelhouse"
  cp -r "$wheelhouse" "$root/tmp/gate-scanner-wheelhouse"
  cp "$files/gate-scanner-setup-chroot.sh" "$root/tmp/gate-scanner-wheelhouse/"
  chroot_mounts "$root"
  trap 'chroot_unmount "'"$root"'"' RETURN
  say "inside the arm64 root: user, venv, wheel, units"
  in_root "$root" /bin/bash /tmp/gate-scanner-wheelhouse/gate-scanner-setup-chroot.sh /tmp/gate-scanner-wheelhouse
  rm -rf "$root/tmp/gate-scanner-wheelhouse"
  # shellcheck disable=SC2016 # expanded inside the image, not here
  in_root "$root" /bin/sh -ec '
    systemctl enable systemd-networkd.service systemd-resolved.service ssh.service gate-scanner-sshkeys.service
    if ! id technician >/dev/null 2>&1; then
      useradd --create-home --shell /bin/bash --groups sudo,adm,video,gpio technician
    fi
    # No password at all (key only); "*" rather than a locked "!", which sshd would refuse.
    usermod -p "*" technician
    echo "technician ALL=(ALL) NOPASSWD: ALL" >/etc/sudoers.d/010_technician
    chmod 0440 /etc/sudoers.d/010_technician
    # Regenerate cmdline.txt and config.txt from /etc/default/raspi-firmware*.
    DEB_MAINT_PARAMS=configure /etc/kernel/postinst.d/z50-raspi-firmware
  '
  install -d -m 0700 -o 1000 -g 1000 "$root/home/technician/.ssh"
  if [ -f "$pubkey_file" ]; then
    install -m 0600 -o 1000 -g 1000 "$pubkey_file" "$root/home/technician/.ssh/authorized_keys"
  fi
  # Host keys made now would be shared by every card: gate-scanner-sshkeys makes them on first boot.
  rm -f "$root"/etc/ssh/ssh_host_*
  # The same for the machine id: systemd makes one on first boot (systemd-firstboot semantics).
  : >"$root/etc/machine-id"
  rm -f "$root/var/lib/dbus/machine-id"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*_Packages
}

debian_image() {
  local root=$1 out=$2 work=$3
  local boot_img=$work/boot.img root_img=$work/root.img stash=$work/boot-firmware
  say "boot partition (FAT32, $BOOT_MIB MiB, label $BOOT_LABEL)"
  rm -f "$boot_img" "$root_img"
  mkfs.vfat -F 32 -n "$BOOT_LABEL" -C "$boot_img" $((BOOT_MIB * 1024)) >/dev/null
  mcopy -s -p -i "$boot_img" "$root"/boot/firmware/* ::
  # The root partition holds an empty /boot/firmware: the FAT partition is mounted there.
  rm -rf "$stash"
  mv "$root/boot/firmware" "$stash"
  mkdir -m 0755 "$root/boot/firmware"
  local used_mib root_mib
  used_mib=$(du -s --block-size=1M "$root" | cut -f1)
  # Room for the first boot's writes and a kernel update; the card's rest is the data partition.
  root_mib=$((used_mib * 115 / 100 + 256))
  say "root partition (ext4, $root_mib MiB for $used_mib MiB, label $ROOT_LABEL)"
  mkfs.ext4 -q -L "$ROOT_LABEL" -d "$root" -E root_owner=0:0 "$root_img" "${root_mib}M" ||
    { rmdir "$root/boot/firmware"; mv "$stash" "$root/boot/firmware"; return 1; }
  rmdir "$root/boot/firmware"
  mv "$stash" "$root/boot/firmware"
  say "disk image $out (MBR: the Pi's boot ROM reads only that)"
  local total=$((ALIGN_MIB + BOOT_MIB + root_mib))
  rm -f "$out"
  truncate -s "${total}M" "$out"
  sfdisk --quiet "$out" <<SFDISK
label: dos
unit: sectors
start=$((ALIGN_MIB * 2048)), size=$((BOOT_MIB * 2048)), type=c, bootable
start=$(((ALIGN_MIB + BOOT_MIB) * 2048)), size=$((root_mib * 2048)), type=83
SFDISK
  dd if="$boot_img" of="$out" bs=1M seek="$ALIGN_MIB" conv=notrunc,sparse status=none
  dd if="$root_img" of="$out" bs=1M seek=$((ALIGN_MIB + BOOT_MIB)) conv=notrunc,sparse status=none
  rm -f "$boot_img" "$root_img"
}

build_debian() {
  local out=$1
  local work=${WORKDIR:-/var/tmp/gate-scanner-debian}
  local mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  local tool
  for tool in mmdebstrap qemu-aarch64-static mkfs.vfat mcopy mkfs.ext4 sfdisk; do
    command -v "$tool" >/dev/null || {
      echo "build-image: $tool is missing (apt-get install mmdebstrap qemu-user-static binfmt-support dosfstools mtools e2fsprogs fdisk)" >&2
      exit 2
    }
  done
  if [ "$(id -u)" -ne 0 ]; then echo "build-image: --debian needs root (chroot, mounts)" >&2; exit 2; fi
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then update-binfmts --enable qemu-aarch64; fi
  mkdir -p "$work"
  debian_base "$work/base" "$mirror"
  say "copying the base root"
  rm -rf "$work/root"
  cp -a "$work/base" "$work/root"
  say "wheelhouse (gate-scanner from $repo, dependencies for aarch64)"
  rm -rf "$work/wheelhouse"
  "$files/gate-scanner-wheelhouse.sh" "$repo" "$work/wheelhouse"
  debian_customize "$work/root" "$work/wheelhouse"
  debian_image "$work/root" "$out" "$work"
  say "image: $out ($(du -h --apparent-size "$out" | cut -f1)), Debian trixie as of $(date -u +%FT%TZ)"
}

if [ "${1:-}" = "--debian" ]; then
  if [ $# -ne 2 ]; then echo "usage: $0 --debian OUT.img" >&2; exit 2; fi
  build_debian "$2"
elif [ "${1:-}" = "--tree" ]; then
  if [ $# -ne 2 ]; then echo "usage: $0 --tree DIR" >&2; exit 2; fi
  debian_lay_files "$2"
else
  build_pi_gen "${1:-}"
fi
