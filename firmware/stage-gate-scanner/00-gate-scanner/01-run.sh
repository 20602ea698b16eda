#!/bin/bash -e
# pi-gen host side (cwd = this sub-stage, ROOTFS_DIR = the image's root). firmware/build-image.sh
# copied firmware/files (with the wheelhouse) into ./files: the same files and the same
# install script as the Debian image (firmware/files/gate-scanner-install-files.sh).
bash files/gate-scanner-install-files.sh "${ROOTFS_DIR}" files files/gate-scanner.service
# Keep the root partition at its built size: the rest of the card becomes the data partition
# (gate-scanner-datapart.sh). Raspberry Pi OS grows the root over the whole card from the
# init= hook in cmdline.txt; dropping it is the one change to the OS's own first boot.
sed -i 's# init=/usr/lib/raspberrypi-sys-mods/firstboot##; s# init=/usr/lib/raspi-config/init_resize.sh##' \
  "${ROOTFS_DIR}/boot/firmware/cmdline.txt"
rm -rf "${ROOTFS_DIR}/tmp/gate-scanner-wheelhouse"
cp -r files/wheelhouse "${ROOTFS_DIR}/tmp/gate-scanner-wheelhouse"
cp files/gate-scanner-setup-chroot.sh "${ROOTFS_DIR}/tmp/gate-scanner-wheelhouse/"
install -m 0644 files/README.md "${ROOTFS_DIR}/opt/README.gate-scanner.md"
