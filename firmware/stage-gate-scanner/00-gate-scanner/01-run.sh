#!/bin/bash -e
# pi-gen host side (cwd = this sub-stage, ROOTFS_DIR = the image's root): files from
# firmware/files, copied into ./files by firmware/build-image.sh, with the wheelhouse.
install -m 0644 files/gate-scanner.service "${ROOTFS_DIR}/etc/systemd/system/gate-scanner.service"
install -d -m 0755 "${ROOTFS_DIR}/etc/systemd/system/gate-scanner.service.d"
install -m 0644 files/gate-scanner-data.conf "${ROOTFS_DIR}/etc/systemd/system/gate-scanner.service.d/data.conf"
for unit in gate-scanner-firstboot.service gate-scanner-datapart.service; do
  install -m 0644 "files/${unit}" "${ROOTFS_DIR}/etc/systemd/system/${unit}"
done
for script in gate-scanner-firstboot.sh gate-scanner-datapart.sh; do
  install -m 0755 "files/${script}" "${ROOTFS_DIR}/usr/local/sbin/${script}"
done
install -d -m 0755 "${ROOTFS_DIR}/etc/systemd/system.conf.d"
install -m 0644 files/gate-scanner-watchdog.conf "${ROOTFS_DIR}/etc/systemd/system.conf.d/gate-scanner-watchdog.conf"
cat files/config.txt.gate-scanner >>"${ROOTFS_DIR}/boot/firmware/config.txt"
install -d -m 0755 "${ROOTFS_DIR}/var/lib/gate-scanner"
grep -q GATEDATA "${ROOTFS_DIR}/etc/fstab" || cat files/fstab.gate-scanner >>"${ROOTFS_DIR}/etc/fstab"
# Keep the root partition at its built size: the rest of the card becomes the data partition
# (gate-scanner-datapart.sh). Raspberry Pi OS grows the root over the whole card from the
# init= hook in cmdline.txt; dropping it is the one change to the OS's own first boot.
sed -i 's# init=/usr/lib/raspberrypi-sys-mods/firstboot##; s# init=/usr/lib/raspi-config/init_resize.sh##' \
  "${ROOTFS_DIR}/boot/firmware/cmdline.txt"
rm -rf "${ROOTFS_DIR}/tmp/gate-scanner-wheelhouse"
cp -r files/wheelhouse "${ROOTFS_DIR}/tmp/gate-scanner-wheelhouse"
install -m 0644 files/README.md "${ROOTFS_DIR}/opt/README.gate-scanner.md" 2>/dev/null || true
