#!/bin/bash -e
# pi-gen, inside the image: the service user, the venv (seeing apt's picamera2 and lgpio),
# the units.
if ! id gate-scanner >/dev/null 2>&1; then
  useradd --system --user-group --home-dir /var/lib/gate-scanner --shell /usr/sbin/nologin gate-scanner
fi
usermod -a -G video,gpio gate-scanner
rm -rf /opt/gate-scanner/.venv
python3 -m venv --system-site-packages /opt/gate-scanner/.venv
# Offline and pinned: only what build-image.sh put in the wheelhouse can be installed.
/opt/gate-scanner/.venv/bin/pip install --no-index --find-links /tmp/gate-scanner-wheelhouse gate-scanner
rm -rf /tmp/gate-scanner-wheelhouse
systemctl enable gate-scanner.service gate-scanner-firstboot.service gate-scanner-datapart.service
