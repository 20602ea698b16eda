"""`gate-scanner bench trace`: a province's check-ins in the collector's store, stays kept
current while they load, then contact-tracing queries.

N synthetic check-ins (seeded) over the last ``--days`` days: sites with entry and exit gates
and some with entry gates only, one busy site (a bus station) with a large share of the
visits, regulars and occasional visitors, exits, missing exits, exits by the exit button (no
subject), rejected and annulled entries, and late events (a gate offline for hours delivers
its events after everyone else's). They are stored in the collector's batches (500) through
``insert_batch``, which derives the stays of every batch in the same transaction: the load
rate *is* the ingest rate with stays kept current.

Figures per store: load events/s (and batch p50/p99 ms); the time to build every stay again
from the check-ins, and whether that gives the same stays as the incremental upkeep;
``trace`` p50/p99 ms for one subject over 14 days with the one-hour margin; and one retention
run (the oldest week) with its longest step, which is how long it can hold up ingest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from scanner import events
from scanner.bench.outbox import LocalPostgres, PostgresUnavailable
from scanner.central.collector import BATCH_MAX
from scanner.central.stays import StayRules
from scanner.central.store import Store, StoredEvent, open_store, stay_checksum
from scanner.central.trace import trace
from scanner.config import CollectorConfig

DEFAULT_EVENTS = 1_000_000
TRACE_P99_GOAL_MS = {"postgresql": 200, "sqlite": 500}
LOAD_GOAL_EVENTS_PER_S = 5000


@dataclass(frozen=True, slots=True)
class Synthetic:
    """What the generator made: the batches in delivery order, and who to trace."""

    batches: Iterator[list[StoredEvent]]
    subjects: list[str]


def synthesize(n: int, *, days: int, seed: int, now: datetime, rules: StayRules) -> Synthetic:
    """About ``n`` check-ins over ``days`` days ending at ``now``, in delivery batches."""
    rng = random.Random(seed)
    n_sites = max(10, n // 5000)
    sites = [f"site-{i:04d}" for i in range(n_sites)]
    entry_only = set(rng.sample(sites, max(1, n_sites // 10)))
    hot = sites[0]  # the bus station
    entry_only.discard(hot)
    pseudo = events.Pseudonymizer(b"bench-trace-key-bench-trace-key!")
    n_subjects = max(50, n // 20)
    subjects = [pseudo.subject("plain", f"P{i:07d}".encode()) or "" for i in range(n_subjects)]
    # A few regulars come often (commuters, stall holders); most come now and then.
    weights = [8.0 if i % 50 == 0 else 1.0 for i in range(n_subjects)]
    home = {s: rng.choice(sites) for s in subjects}
    ids = events.Uuid7()
    seqs: dict[str, int] = {}
    traced = rng.sample(subjects, min(len(subjects), 400))

    def raw(e: dict[str, Any]) -> str:
        return json.dumps(e, separators=(",", ":"))

    def day_batches() -> Iterator[list[StoredEvent]]:
        first_day = rules.day_of(now - timedelta(days=days))
        made = visits = 0
        for d in range(days):
            day = first_day + timedelta(days=d)
            start, _ = rules.bounds(day)
            moves: list[tuple[datetime, str, str, str | None, str, str, str | None]] = []
            # Visits make 1-3 events each: aim each day at what is left of n.
            per_visit = made / visits if visits else 1.8
            today = max(1, round((n - made) / (days - d) / per_visit))
            visits += today
            for subject in rng.choices(subjects, weights, k=today):
                r = rng.random()
                site = hot if r < 0.15 else home[subject] if r < 0.6 else rng.choice(sites)
                entered = start + timedelta(hours=1 + rng.random() * 17)
                stay = timedelta(minutes=min(360.0, rng.lognormvariate(3.6, 0.7)))
                if entered + stay > now:
                    continue
                fate = rng.random()
                if fate < 0.03:
                    moves.append((entered, site, "in", subject, "rejected", "denylisted", None))
                    continue
                moves.append((entered, site, "in", subject, "accepted", "ok", None))
                if fate < 0.04:  # the door never saw them pass
                    moves.append(
                        (entered + timedelta(seconds=8), site, "in", subject, "annulled", "no_passage", "?")
                    )
                    continue
                if site in entry_only or fate < 0.09:  # no exit gate, or slipped out unseen
                    continue
                if fate < 0.12:
                    moves.append((entered + stay, site, "out", None, "accepted", "exit_request", None))
                else:
                    moves.append((entered + stay, site, "out", subject, "accepted", "ok", None))
            moves.sort(key=lambda m: m[0])
            built: list[StoredEvent] = []
            last_entry: dict[tuple[str, str | None], str] = {}
            for at, site, direction, who, decision, reason, annuls in moves:
                device = f"{site}-{direction}"
                seqs[device] = seqs.get(device, 0) + 1
                event_id = ids.new(int(at.timestamp() * 1000))
                if annuls is not None:
                    annuls = last_entry[(site, who)]
                elif direction == "in":
                    last_entry[(site, who)] = event_id
                credential: dict[str, Any] = {"type": "exit_button" if who is None else "plain"}
                if who is not None:
                    credential["subject"] = who
                ts = events.utc_ms(at)
                doc = {
                    "schema": events.SCHEMA,
                    "event_id": event_id,
                    "seq": seqs[device],
                    "device": device,
                    "site": site,
                    "direction": direction,
                    "ts": ts,
                    "clock_synced": True,
                    "decision": decision,
                    "reason": reason,
                    "credential": credential,
                    **({"annuls": annuls} if annuls else {}),
                }
                built.append(
                    StoredEvent(
                        event_id, device, site, direction, seqs[device], ts, who, decision, reason,
                        credential["type"], raw(doc), annuls,
                    )
                )  # fmt: skip
            # A few gates were offline for hours: their events of the day come after the rest.
            offline = {d for d in {e.device for e in built} if rng.random() < 0.02}
            built = [e for e in built if e.device not in offline] + [e for e in built if e.device in offline]
            made += len(built)
            for i in range(0, len(built), BATCH_MAX):
                yield built[i : i + BATCH_MAX]

    return Synthetic(day_batches(), traced)


def _ms(seconds: list[float], q: float) -> float:
    ordered = sorted(seconds)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def bench_store(store: Store, n: int, *, days: int, seed: int, traces: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    data = synthesize(n, days=days, seed=seed, now=now, rules=store.rules)
    loaded = 0
    batch_s: list[float] = []
    load_before = os.getloadavg()[0]
    cpu = time.process_time()
    started = time.perf_counter()
    for batch in data.batches:
        t0 = time.perf_counter()
        store.insert_batch(batch)
        batch_s.append(time.perf_counter() - t0)
        loaded += len(batch)
    load_s = time.perf_counter() - started
    # This process's CPU time: SQLite runs in it, PostgreSQL's server does not. Beside the
    # wall-clock rate it shows what a core of our own gets through on a shared machine.
    load_cpu_s = time.process_time() - cpu
    load_after = os.getloadavg()[0]
    incremental = store.all_stays()
    t0 = time.perf_counter()
    rebuilt_n = store.rebuild_stays()
    build_s = time.perf_counter() - t0
    rebuilt = store.all_stays()
    kinds: dict[str, int] = {}
    for s in rebuilt:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    trace_s: list[float] = []
    rows: list[int] = []
    margin = timedelta(hours=1)
    for subject in data.subjects[:traces]:
        t0 = time.perf_counter()
        answer = trace(store, [subject], now - timedelta(days=14), now, margin=margin)
        trace_s.append(time.perf_counter() - t0)
        rows.append(len(answer))
    steps: list[float] = []
    removed = 0
    cutoff = now - timedelta(days=max(1, days - 7))
    while True:
        t0 = time.perf_counter()
        gone = store.expire_step(cutoff)
        steps.append(time.perf_counter() - t0)
        if not gone:
            break
        removed += gone
    return {
        "store": store.kind,
        "events": loaded,
        "load_s": round(load_s, 1),
        "load_events_per_s": round(loaded / load_s),
        "load_events_per_cpu_s_this_process": round(loaded / max(load_cpu_s, 1e-9)),
        "machine_load_avg_1m": [round(load_before, 1), round(load_after, 1)],
        "batch_ms": {"p50": _ms(batch_s, 0.5), "p99": _ms(batch_s, 0.99), "max": _ms(batch_s, 1.0)},
        "stays": len(incremental),
        "stays_by_kind": kinds,
        "build_stays_s": round(build_s, 1),
        "rebuilt_stays": rebuilt_n,
        "rebuild_matches_incremental": stay_checksum(incremental) == stay_checksum(rebuilt)
        and len(incremental) == len(rebuilt),
        "trace_14d_margin_1h_ms": {
            "traces": len(trace_s),
            "p50": _ms(trace_s, 0.5),
            "p99": _ms(trace_s, 0.99),
            "max": _ms(trace_s, 1.0),
            "mean_rows": round(statistics.mean(rows), 1) if rows else 0,
        },
        "retention_oldest_week": {
            "removed": removed,
            "steps": len(steps),
            "total_s": round(sum(steps), 1),
            "longest_step_ms": _ms(steps, 1.0),
        },
        "goals": {
            "trace_p99_ms": TRACE_P99_GOAL_MS[store.kind],
            "load_events_per_s": LOAD_GOAL_EVENTS_PER_S,
        },
    }


def run_one(kind: str, n: int, *, days: int, seed: int, traces: int) -> dict[str, Any]:
    rules = StayRules.from_config(CollectorConfig())
    with tempfile.TemporaryDirectory(prefix="gs-bench-trace-") as tmp:
        pg: LocalPostgres | None = None
        try:
            if kind == "postgresql":
                pg = LocalPostgres(durable=True).start()
                url = pg.create_database("bench")
            else:
                url = f"sqlite:{Path(tmp) / 'collector.db'}"
            store = open_store(url, rules, retention_days=days + 1)
            try:
                return bench_store(store, n, days=days, seed=seed, traces=traces)
            finally:
                store.close()
        finally:
            if pg is not None:
                pg.stop()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="check-ins to load (default 1000000)")
    p.add_argument("--store", choices=("sqlite", "postgresql", "both"), default="both")
    p.add_argument("--days", type=int, default=28, help="the check-ins span this many days (default 28)")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--traces", type=int, default=200, help="subjects traced for the query figures")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    if args.events < 1000 or args.days < 8:
        print("bench trace: --events at least 1000, --days at least 8", file=sys.stderr)
        return 2
    kinds = ["sqlite", "postgresql"] if args.store == "both" else [args.store]
    results = []
    for kind in kinds:
        try:
            results.append(run_one(kind, args.events, days=args.days, seed=args.seed, traces=args.traces))
        except PostgresUnavailable as exc:
            if args.store == "postgresql":
                print(f"bench trace: {exc}", file=sys.stderr)
                return 1
            results.append({"store": kind, "skipped": str(exc)})
    print(json.dumps({"bench": "trace", "results": results}, indent=2))
    return 0 if all(r.get("rebuild_matches_incremental", True) for r in results) else 1
