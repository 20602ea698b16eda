#!/usr/bin/env bash
# First boot: install the provisioning bundle the technician dropped on the boot partition,
# validate it, remove it (it holds the device's private key), disable this unit, make the
# root file system read-only and reboot.
#
# Bundle (made by `gate-scanner provision`): BOOT/gate-scanner/ or BOOT/gate-scanner.tar with
# gate.toml ca.pem device.crt device.key [subject.key] [lists/*] [authorized_keys] SHA256SUMS.
# authorized_keys (optional, added to the bundle by hand before SHA256SUMS is made): the
# technician's SSH keys, so one image serves fleets with different keys.
#
# Usage: gate-scanner-firstboot.sh [--root DIR] [--boot DIR]
#   --root DIR (or ROOT=DIR): install under DIR instead of /; for tests. With a root prefix
#   the overlay is not enabled and nothing reboots.
# Environment: GATE_SCANNER (the CLI), SCANNER_USER (owner of the state files), TECHNICIAN
# (the login user that authorized_keys is for).
set -euo pipefail

root=${ROOT:-}
boot=${BOOT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$2; shift 2 ;;
    --boot) boot=$2; shift 2 ;;
    *) echo "usage: $0 [--root DIR] [--boot DIR]" >&2; exit 2 ;;
  esac
done
root=${root%/}
boot=${boot:-$root/boot/firmware}
cli=${GATE_SCANNER:-/opt/gate-scanner/.venv/bin/gate-scanner}
user=${SCANNER_USER:-gate-scanner}
technician=${TECHNICIAN:-technician}
etc=$root/etc/gate-scanner
state=$root/var/lib/gate-scanner
log_file=$boot/gate-scanner-provision.log

# The log goes to the journal and to the boot partition, where a technician can read it on a laptop.
log() { printf 'gate-scanner-firstboot: %s\n' "$*" | tee -a "$log_file" >&2; }

bundle=""
scratch=""
cleanup() { if [ -n "$scratch" ]; then rm -rf "$scratch"; fi; }
trap cleanup EXIT
if [ -d "$boot/gate-scanner" ]; then
  bundle=$boot/gate-scanner
elif [ -f "$boot/gate-scanner.tar" ]; then
  scratch=$(mktemp -d)
  tar -xf "$boot/gate-scanner.tar" -C "$scratch" --no-same-owner
  bundle=$scratch
else
  log "no bundle in $boot (gate-scanner/ or gate-scanner.tar): nothing to do"
  exit 0
fi

log "installing the bundle from $bundle"
if ! (cd "$bundle" && sha256sum --quiet -c SHA256SUMS); then
  log "FAILED: the bundle does not match its SHA256SUMS (copied incompletely?); copy it again"
  exit 1
fi
for required in gate.toml ca.pem device.crt device.key; do
  if [ ! -f "$bundle/$required" ]; then
    log "FAILED: $required is missing from the bundle"
    exit 1
  fi
done

install -d -m 0755 -o root -g root "$etc"
install -d -m 0700 -o "$user" -g "$user" "$state"
install -d -m 0700 -o "$user" -g "$user" "$state/keys"
install -m 0640 -o root -g "$user" "$bundle/gate.toml" "$etc/gate.toml"
install -m 0644 -o root -g root "$bundle/ca.pem" "$etc/ca.pem"
install -m 0644 -o root -g root "$bundle/device.crt" "$etc/device.crt"
install -m 0600 -o "$user" -g "$user" "$bundle/device.key" "$state/keys/device.key"
if [ -f "$bundle/subject.key" ]; then
  install -m 0600 -o "$user" -g "$user" "$bundle/subject.key" "$state/subject.key"
fi
if [ -d "$bundle/lists" ]; then
  install -d -m 0755 -o "$user" -g "$user" "$state/lists"
  for list in "$bundle"/lists/*; do
    install -m 0644 -o "$user" -g "$user" "$list" "$state/lists/$(basename "$list")"
  done
fi

if [ -f "$bundle/authorized_keys" ]; then
  if home=$(getent passwd "$technician" | cut -d: -f6) && [ -n "$home" ]; then
    install -d -m 0700 -o "$technician" -g "$technician" "$root$home/.ssh"
    install -m 0600 -o "$technician" -g "$technician" "$bundle/authorized_keys" "$root$home/.ssh/authorized_keys"
    log "SSH keys installed for $technician"
  else
    log "authorized_keys: no user $technician on this image; skipped"
  fi
fi

# Validate exactly what was installed. gate.toml names paths on the device; under a root
# prefix (tests) a copy with those paths prefixed is checked instead.
check=$etc/gate.toml
if [ -n "$root" ]; then
  check=$(mktemp)
  sed -e "s#\"/etc/gate-scanner/#\"$etc/#g" -e "s#\"/var/lib/gate-scanner#\"$state#g" "$etc/gate.toml" >"$check"
fi
if ! result=$("$cli" check-config "$check" 2>&1); then
  log "FAILED: check-config: $result"
  log "the bundle stays on the boot partition; fix it with gate-scanner provision and power on again"
  exit 1
fi
if [ -n "$root" ]; then rm -f "$check"; fi
log "check-config: ${result#"$check": }"

# The boot partition is FAT and readable by anyone holding the card: the secrets go now.
# (Flash wear levelling may keep old blocks; a lost card means revoking the device certificate.)
rm -rf "$boot/gate-scanner" "$boot/gate-scanner.tar"
sync
log "provisioned; secrets removed from $boot"
rm -f "$root/etc/systemd/system/multi-user.target.wants/gate-scanner-firstboot.service"

if [ -z "$root" ]; then
  # The overlay takes effect at the next boot: from then on / is a tmpfs overlay over a
  # read-only ext4, and only /var/lib/gate-scanner (its own partition) and /boot/firmware persist.
  "${READONLY:-/usr/local/sbin/gate-scanner-readonly.sh}" enable "$boot"
  log "read-only root enabled; rebooting"
  systemctl --no-block reboot
fi
