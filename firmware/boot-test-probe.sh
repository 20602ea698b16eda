#!/bin/sh
# Runs inside the booted gate (as root, fed over SSH by firmware/boot_test.py): one JSON
# object with what the boot test asserts, in one round trip, since each is slow under TCG.
set -u
unit=gate-scanner.service
state=/var/lib/gate-scanner
pids=$(cat /sys/fs/cgroup/system.slice/$unit/cgroup.procs 2>/dev/null || true)
mem='['
for pid in $pids; do
  rss=$(awk '/^Rss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
  pss=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
  cv=$(grep -c 'cv2' "/proc/$pid/maps" 2>/dev/null || true)
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" | cut -c1-60 | tr -dc '[:alnum:] ./_=-')
  mem="$mem{\"pid\": $pid, \"rss_kb\": ${rss:-0}, \"pss_kb\": ${pss:-0},"
  mem="$mem \"cv2_maps\": ${cv:-0}, \"cmd\": \"$cmd\"},"
done
mem="${mem%,}]"
modes=$(stat -c '"%n": "%a %U:%G"' /etc/gate-scanner/gate.toml /etc/gate-scanner/ca.pem \
  /etc/gate-scanner/device.crt $state $state/keys/device.key $state/subject.key \
  $state/lists/pass-trust.json | paste -sd,)
keys=$(sha256sum $state/keys/device.key $state/subject.key | awk '{print $1}' | paste -sd,)
wd=/sys/class/watchdog/watchdog0
wd_id=$(cat $wd/identity 2>/dev/null || echo none)
wd_state=$(cat $wd/state 2>/dev/null || echo none)
wd_timeout=$(cat $wd/timeout 2>/dev/null || echo 0)
firstboot=gate-scanner-firstboot.service
cat <<JSON
{"memory": $mem,
 "modes": {$modes},
 "keys": "$keys",
 "root": "$(findmnt -no FSTYPE,OPTIONS /)",
 "lower": "$(findmnt -no SOURCE,FSTYPE,OPTIONS /media/root-ro 2>/dev/null)",
 "data": "$(findmnt -no SOURCE,FSTYPE,OPTIONS $state)",
 "data_label": "$(lsblk -no LABEL "$(findmnt -no SOURCE $state)" 2>/dev/null)",
 "data_mib": $(df -m --output=size $state | tail -n 1),
 "firstboot_enabled": "$(systemctl is-enabled $firstboot 2>&1)",
 "firstboot_ran_this_boot": "$(systemctl show -p ExecMainStartTimestampMonotonic --value $firstboot)",
 "marker": "$(cat /gate-scanner-boot-test-marker 2>/dev/null || echo absent)",
 "watchdog": {"identity": "$wd_id", "state": "$wd_state", "timeout": $wd_timeout,
              "runtime": "$(systemctl show -p RuntimeWatchdogUSec --value)"},
 "unit": "$(systemctl show -p ActiveState,SubState,Result,NRestarts --value $unit | paste -sd' ')",
 "started_line": "$(journalctl -b -u $unit -o cat | grep -c "^Started $unit")",
 "mem_total_kb": $(awk '/^MemTotal:/ {print $2}' /proc/meminfo),
 "mem_available_kb": $(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)}
JSON
