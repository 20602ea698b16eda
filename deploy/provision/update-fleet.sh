#!/usr/bin/env bash
# Update gates over SSH, one at a time; roll a gate back when its self-test fails afterwards.
#
# Usage: deploy/provision/update-fleet.sh WHEEL HOST...
#   WHEEL  gate_scanner-*.whl built for the fleet (pure Python: `pip wheel --no-deps .`)
#   HOST   an SSH destination (technician@gate-12.example.org); the user needs sudo.
# Environment: SSH_OPTS (extra ssh options), STOP_ON_FAILURE=1 to stop the rollout at the
# first failed gate (default: go on, report at the end).
#
# Per gate: the previous venv is kept as /opt/gate-scanner/.venv.prev; the wheel is
# installed (--no-deps: dependencies change only with a new image); the daemon restarts;
# `gate-scanner selftest --unattended` (no card, no relay pulse) must not FAIL, else the
# .venv.prev is swapped back and the daemon restarted on it. With the read-only root of
# the image, the change is made in the lower (real) root file system and the gate reboots
# to see it; without an overlay, in place.
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
wheel=$1
shift
if [ ! -f "$wheel" ]; then
  echo "update-fleet: no wheel $wheel" >&2
  exit 2
fi
read -r -a ssh_opts <<<"${SSH_OPTS:-}"
ssh_opts+=(-o BatchMode=yes -o ConnectTimeout=15)
name=$(basename "$wheel")

# Runs on the gate as root: ACTION (install|rollback) WHEEL_NAME.
remote=$(cat <<'REMOTE'
set -euo pipefail
action=$1 wheel=$2
lower=/
if findmnt -n /media/root-ro >/dev/null 2>&1; then
  lower=/media/root-ro            # raspi-config overlay: the real root, read-only
  mount -o remount,rw "$lower"
fi
in_root() { if [ "$lower" = / ]; then "$@"; else chroot "$lower" "$@"; fi; }
systemctl stop gate-scanner
case "$action" in
  install)
    rm -rf "$lower/opt/gate-scanner/.venv.prev"
    cp -a "$lower/opt/gate-scanner/.venv" "$lower/opt/gate-scanner/.venv.prev"
    install -m 0644 "/tmp/$wheel" "$lower/tmp/$wheel"
    in_root /opt/gate-scanner/.venv/bin/pip install --quiet --no-deps --force-reinstall "/tmp/$wheel"
    rm -f "$lower/tmp/$wheel" ;;
  rollback)
    test -d "$lower/opt/gate-scanner/.venv.prev"
    rm -rf "$lower/opt/gate-scanner/.venv.failed"
    mv "$lower/opt/gate-scanner/.venv" "$lower/opt/gate-scanner/.venv.failed"
    mv "$lower/opt/gate-scanner/.venv.prev" "$lower/opt/gate-scanner/.venv" ;;
esac
sync
if [ "$lower" != / ]; then
  mount -o remount,ro "$lower" || true
  echo REBOOT
else
  systemctl start gate-scanner
fi
REMOTE
)

on_gate() { local host=$1; shift; ssh "${ssh_opts[@]}" "$host" sudo bash -s -- "$@" <<<"$remote"; }

wait_back() {
  local host=$1 deadline=$((SECONDS + 300))
  sleep 10
  until ssh "${ssh_opts[@]}" "$host" true 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then return 1; fi
    sleep 5
  done
}

apply() {
  local host=$1 action=$2 out
  out=$(on_gate "$host" "$action" "$name")
  if grep -q '^REBOOT$' <<<"$out"; then
    ssh "${ssh_opts[@]}" "$host" sudo systemctl reboot || true
    wait_back "$host"
  fi
}

selftest() {
  # The daemon owns the camera: stop it for the test, start it again whatever the result.
  ssh "${ssh_opts[@]}" "$1" 'sudo systemctl stop gate-scanner;
    sudo /opt/gate-scanner/.venv/bin/gate-scanner selftest --unattended --config /etc/gate-scanner/gate.toml;
    rc=$?; sudo systemctl start gate-scanner; exit $rc'
}

failed=()
for host in "$@"; do
  echo "== $host: installing $name"
  if ! scp "${ssh_opts[@]}" -q "$wheel" "$host:/tmp/$name"; then
    echo "== $host: unreachable or copy FAILED: not touched"
    failed+=("$host")
  elif ! apply "$host" install; then
    echo "== $host: install FAILED: restoring the previous version"
    apply "$host" rollback || echo "== $host: ROLLBACK FAILED: visit this gate"
    failed+=("$host")
  elif ! selftest "$host"; then
    echo "== $host: self-test FAILED after the update: rolling back"
    if apply "$host" rollback && selftest "$host"; then
      echo "== $host: rolled back; the previous version passes its self-test"
    else
      echo "== $host: rolled back, but the self-test still fails: not the update's fault? visit this gate"
    fi
    failed+=("$host")
  else
    echo "== $host: updated, self-test passed"
  fi
  if [ "${#failed[@]}" -gt 0 ] && [ "${STOP_ON_FAILURE:-0}" = 1 ]; then break; fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "update-fleet: failed on ${failed[*]}" >&2
  exit 1
fi
echo "update-fleet: all $# gates updated"
