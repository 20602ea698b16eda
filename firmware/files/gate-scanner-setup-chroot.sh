#!/usr/bin/env bash
# Inside the image (chroot), for both recipes: the service user, the venv (it sees apt's
# numpy and, on Raspberry Pi OS, picamera2 and lgpio), gate-scanner from the offline
# wheelhouse, the units enabled. Run after gate-scanner-install-files.sh.
#
# Usage: gate-scanner-setup-chroot.sh WHEELHOUSE_DIR
set -euo pipefail

wheelhouse=$1
# Debian has no gpio group (Raspberry Pi OS makes one); the unit's SupplementaryGroups needs it,
# and 99-gate-scanner-gpio.rules hands it /dev/gpiochip*.
getent group gpio >/dev/null || groupadd --system gpio
if ! id gate-scanner >/dev/null 2>&1; then
  useradd --system --user-group --home-dir /var/lib/gate-scanner --shell /usr/sbin/nologin gate-scanner
fi
usermod -a -G video,gpio gate-scanner
rm -rf /opt/gate-scanner/.venv
python3 -m venv --system-site-packages /opt/gate-scanner/.venv
# Offline and pinned: only what the wheelhouse holds (hashes checked first) can be installed.
(cd "$wheelhouse" && sha256sum --quiet -c SHA256SUMS)
/opt/gate-scanner/.venv/bin/pip install --quiet --no-index --find-links "$wheelhouse" gate-scanner
# The root is read-only at run time: bytecode not compiled now would be compiled again in
# memory at every start of the daemon and of its decoder process.
/opt/gate-scanner/.venv/bin/python -m compileall -q -j 0 /opt/gate-scanner/.venv/lib >/dev/null
ln -sf /opt/gate-scanner/.venv/bin/gate-scanner /usr/local/bin/gate-scanner
systemctl enable gate-scanner.service gate-scanner-firstboot.service gate-scanner-datapart.service \
  gate-scanner-lower-ro.service
