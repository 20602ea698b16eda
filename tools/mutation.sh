#!/usr/bin/env bash
# Mutation testing of the gate's safety code: mutmut plants small bugs, one at a time, in a
# copy of the code (mutants/) and runs the fast tests that reach each; a bug no test notices
# is a promise nobody guards. What is covered, how to read the result and every surviving
# mutant judged equivalent: docs/mutation.md. Not part of the default suite (21 minutes for the
# last full run on this 2-core machine).
#
#   tools/mutation.sh            the whole selection below, from scratch
#   tools/mutation.sh GLOB...    only the mutants whose names match (e.g. 'scanner.mqtt.*')
#
# Prints mutmut's progress, then one JSON line of figures per module (tools/mutation_report.py)
# and the diff of every mutant that survived without an explanation in docs/mutation.md.
# Exit 0 only when there is none.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/mutmut ] || { echo "mutation.sh: run ./quickstart test (or pip install -e '.[test]') first" >&2; exit 2; }
export PATH="$PWD/.venv/bin:$PATH"

# The safety code, function by function (mutmut's names: module.x_function or
# module.xǁClassǁmethod). Everything else in these modules is left alone.
selection=(
  # Relay, LEDs and buzzer: all of it.
  'scanner.gate.signals.*'
  # The scan path: decision → committed event → relay, and the remote open.
  'scanner.gate.pipeline.x_show_fault__mutmut_*'
  'scanner.gate.pipeline.xǁGateǁprocess__mutmut_*'
  'scanner.gate.pipeline.xǁGateǁ_scan__mutmut_*'
  'scanner.gate.pipeline.xǁGateǁremote_open__mutmut_*'
  'scanner.gate.pipeline.xǁGateǁ_commit__mutmut_*'
  'scanner.gate.pipeline.xǁGateǁ_remember_accept__mutmut_*'
  # The outbox: all of it but the benchmark helper.
  'scanner.gate.outbox.xǁ*'
  # The gate's delivery: what is published, when a row may go, the collector's ack.
  'scanner.gate.publisher.xǁPublisherǁ_fill__mutmut_*'
  'scanner.gate.publisher.xǁPublisherǁ_collector_may_send__mutmut_*'
  'scanner.gate.publisher.xǁPublisherǁ_publish_row__mutmut_*'
  'scanner.gate.publisher.xǁPublisherǁ_on_puback__mutmut_*'
  'scanner.gate.publisher.xǁPublisherǁ_on_ack__mutmut_*'
  'scanner.gate.publisher.xǁPublisherǁ_remove__mutmut_*'
  'scanner.gate.publisher.xǁPublisherǁwait_drained__mutmut_*'
  'scanner.mqtt.xǁAckǁ*'
  # Command verification: signature, device, age, replay.
  'scanner.gate.commands.x_canonical__mutmut_*'
  'scanner.gate.commands.x_load_document__mutmut_*'
  'scanner.gate.commands.x_parse__mutmut_*'
  'scanner.gate.commands.x_parse_time__mutmut_*'
  'scanner.gate.commands.x__stored_time__mutmut_*'
  'scanner.gate.commands.xǁVerifierǁverify__mutmut_*'
  'scanner.gate.commands.xǁReplayGuardǁ*'
  # Pseudonyms: the key and the keyed hash.
  'scanner.events.x_load_or_create_key__mutmut_*'
  'scanner.events.xǁPseudonymizerǁ*'
)
if [ $# -gt 0 ]; then selection=("$@"); fi

# Twice the cores: the tests mostly wait (relay pulses, broker round trips, fsync), not compute.
jobs=${MUTATION_JOBS:-$(( $(nproc) * 2 ))}
echo "load before: $(uptime)"
rm -rf mutants  # from scratch: mutmut keeps earlier results otherwise
mkdir mutants
start=$(date +%s)
# mutmut's progress (and its list of every mutant at the end) goes to a log, not the terminal.
mutate() {
  mutmut run --max-children "$jobs" "$@" >> mutants/run.log 2>&1 || { tail -n 40 mutants/run.log >&2; exit 1; }
}
mutate "${selection[@]}"
# A timeout counts as caught, but mutmut can also kill a healthy run as one (see
# list_timeouts in tools/mutation_report.py): run each timeout again, on its own.
mapfile -t timeouts < <(python tools/mutation_report.py --timeouts "${selection[@]}")
if [ ${#timeouts[@]} -gt 0 ]; then
  echo "running the ${#timeouts[@]} timeouts again: ${timeouts[*]}"
  mutate "${timeouts[@]}"
fi
echo "mutation run: $(( $(date +%s) - start )) s, $jobs workers on $(nproc) cores (log: mutants/run.log)"
echo "load after: $(uptime)"
exec python tools/mutation_report.py "${selection[@]}"
