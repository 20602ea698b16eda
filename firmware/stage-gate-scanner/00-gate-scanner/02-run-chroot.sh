#!/bin/bash -e
# pi-gen, inside the image: the service user, the venv, the wheel and the units, by the same
# script as the Debian image (firmware/files/gate-scanner-setup-chroot.sh).
bash /tmp/gate-scanner-wheelhouse/gate-scanner-setup-chroot.sh /tmp/gate-scanner-wheelhouse
rm -rf /tmp/gate-scanner-wheelhouse
