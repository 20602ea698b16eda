"""`gate-scanner bench outbox`: a gate's backlog drains through a private broker into the collector.

One gate process (the real ``Outbox`` + ``Publisher`` with ``delivery = "collector"``) starts
with N events already committed in its outbox, as after a long broker outage; a private
mosquitto carries them to a collector (in this process) that stores them and acks. The gate
only forgets an event on the collector's ack, so "outbox empty" means "all N stored".

Figures: end-to-end events/s (gate start → outbox empty), collector ingest/s (time inside
the store's insert alone), the gate process's RSS at start, middle and end of the drain.

``LocalPostgres`` (a private PostgreSQL cluster, used here and by the tests) lives here too:
initdb and pg_ctl on a free port in a temp dir owned by ``postgres`` (initdb refuses root),
unix socket in that dir, stopped with ``-m immediate``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scanner import events
from scanner.central.collector import Collector
from scanner.central.store import open_store
from scanner.config import from_table, load
from scanner.gate.outbox import Outbox
from scanner.gate.publisher import Publisher
from scanner.models import CheckinEvent
from scanner.sim.localbroker import LocalBroker, free_port

DEFAULT_EVENTS = 100_000


# --- a private PostgreSQL ----------------------------------------------------------------


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here; the message says why (for skip reasons)."""


def find_pg_bin() -> Path:
    """The newest ``/usr/lib/postgresql/*/bin`` holding initdb and pg_ctl."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name.split(".")[0])
    )
    for candidate in reversed(found):
        if os.access(Path(candidate) / "initdb", os.X_OK) and os.access(Path(candidate) / "pg_ctl", os.X_OK):
            return Path(candidate)
    for name in ("initdb", "pg_ctl"):
        if shutil.which(name) is None:
            raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found")
    return Path(shutil.which("initdb") or "").parent


class LocalPostgres:
    """A throwaway cluster. ``durable=False`` turns fsync off (tests); the bench keeps it on."""

    def __init__(self, *, durable: bool = True, start_timeout: float = 30.0) -> None:
        self.durable = durable
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.port = 0
        self._bin = find_pg_bin()
        self._as_postgres: list[str] = []
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise PostgresUnavailable("running as root and runuser is missing (initdb refuses root)")
            try:
                self._pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no user 'postgres'") from None
            self._as_postgres = [runuser, "-u", "postgres", "--"]

    def _run(self, *argv: str, timeout: float) -> None:
        cmd = [*self._as_postgres, *argv]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"{Path(argv[0]).name} failed ({result.returncode}): {result.stderr[-2000:]}"
            )

    def start(self) -> LocalPostgres:

        self.dir = Path(tempfile.mkdtemp(prefix="gs-pg-"))
        if self._as_postgres:
            os.chown(self.dir, self._pw.pw_uid, self._pw.pw_gid)
        data = self.dir / "data"
        self._run(
            str(self._bin / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            timeout=120,
        )
        self.port = free_port()
        options = f"-p {self.port} -k {self.dir} -c listen_addresses='' -c max_connections=20"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            str(self._bin / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(self.dir / "postgres.log"),
            "-w",
            "-t",
            str(int(self.start_timeout)),
            "-o",
            options,
            "start",
            timeout=self.start_timeout + 10,
        )
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.dir}&port={self.port}"

    def create_database(self, name: str) -> str:
        import psycopg  # the optional `postgres` extra: a gate never has it

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.dir is None:
            return
        # Already down is fine: the directory goes anyway.
        with contextlib.suppress(PostgresUnavailable, subprocess.TimeoutExpired):
            self._run(
                str(self._bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop", timeout=30
            )
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the backlog -------------------------------------------------------------------------


def gate_table(
    workdir: Path, port: int, *, device: str = "bench-gate", site: str = "bench"
) -> dict[str, Any]:
    return {
        "device": {"id": device, "site": site},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "storage": {"dir": str(workdir), "delivery": "collector", "outbox_max_events": 10_000_000},
        "daemon": {"log_level": "warning"},
    }


def fill_outbox(
    path: Path, n: int, *, device: str, site: str, subjects: int = 500, start_seq: int = 1
) -> None:
    """Commit ``n`` check-ins to the outbox at ``path`` in one transaction.

    One append per event would cost one fsync each (minutes for 100,000); the rows are
    exactly what ``Outbox.append`` writes, so the drain that follows is the real one.
    """

    Outbox(path, max_events=max(n, 10)).close()  # the real schema
    ids = events.Uuid7()
    pseudo = events.Pseudonymizer(b"bench-key-bench-key-bench-key!!!")
    base_ms = int(time.time() * 1000) - n * 50
    created = events.now_ms()
    rows = []
    for i in range(n):
        seq = start_seq + i
        ms = base_ms + i * 50
        ts = events.utc_ms(datetime.fromtimestamp(ms / 1000, UTC))
        event = CheckinEvent(
            event_id=ids.new(ms),
            seq=seq,
            device=device,
            site=site,
            direction="in",
            ts=ts,
            clock_synced=True,
            decision="accepted",
            reason="ok",
            credential_type="plain",
            subject=pseudo.subject("plain", f"EMP-{i % subjects:05d}".encode()),
        )
        rows.append((seq, created, events.to_json(event)))
    with sqlite3.connect(str(path), isolation_level=None) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO outbox (seq, created, payload) VALUES (?, ?, ?)", rows)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (start_seq + n,))
        conn.execute("COMMIT")
    conn.close()


def _rss_kib(pid: int | str = "self") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def gate_child(config_path: Path, timeout: float) -> int:
    """The gate side, in its own process so its RSS is its own: drain and report JSON."""

    config = load(config_path)
    outbox = Outbox(config.storage.dir / "outbox.db", config.storage.outbox_max_events)
    total = outbox.depth()
    publisher = Publisher(config, outbox, status=lambda: {"bench": True})
    samples = [(total, _rss_kib())]
    started = time.perf_counter()
    publisher.start()
    deadline = time.monotonic() + timeout
    drained = False
    while time.monotonic() < deadline:
        if publisher.wait_drained(0.25):
            drained = True
            break
        samples.append((outbox.depth(), _rss_kib()))
    elapsed = time.perf_counter() - started
    samples.append((outbox.depth(), _rss_kib()))
    publisher.stop()
    outbox.close()
    middle = min(samples, key=lambda s: abs(s[0] - total / 2))
    print(
        json.dumps(
            {
                "drained": drained,
                "events": total,
                "drain_s": round(elapsed, 3),
                "left": samples[-1][0],
                "rss_kib": {"start": samples[0][1], "middle": middle[1], "end": samples[-1][1]},
                "rss_max_kib": max(s[1] for s in samples),
            }
        ),
        flush=True,
    )
    return 0 if drained else 1


def bench_outbox(n: int, store_kind: str, *, timeout: float | None = None) -> dict[str, Any]:

    timeout = timeout if timeout is not None else max(60.0, n / 500)
    with tempfile.TemporaryDirectory(prefix="gs-bench-outbox-") as tmp:
        work = Path(tmp)
        pg: LocalPostgres | None = None
        try:
            if store_kind == "postgresql":
                pg = LocalPostgres(durable=True).start()
                url = pg.create_database("bench")
            else:
                url = f"sqlite:{work / 'collector.db'}"
            with LocalBroker(work / "broker") as broker:
                gate_dir = work / "gate"
                gate_dir.mkdir()
                fill_outbox(gate_dir / "outbox.db", n, device="bench-gate", site="bench")
                table = gate_table(gate_dir, broker.port)
                config_path = work / "gate.toml"
                config_path.write_text(_toml(table))
                collector_cfg = from_table(
                    {**table, "collector": {"store": url, "name": "bench", "session_expiry_s": 0}}
                )
                store = open_store(url)
                collector = Collector(collector_cfg, store).start()
                try:
                    if not collector.wait_subscribed(10):
                        raise RuntimeError("collector did not subscribe within 10 s")
                    result = subprocess.run(
                        [sys.executable, "-m", "scanner.bench.outbox", str(config_path), str(timeout)],
                        capture_output=True,
                        text=True,
                        timeout=timeout + 30,
                    )
                    if result.returncode not in (0, 1) or not result.stdout.strip():
                        raise RuntimeError(f"gate process failed: {result.stderr[-2000:]}")
                    gate = json.loads(result.stdout.strip().splitlines()[-1])
                    if not gate["drained"]:
                        gate["stderr_tail"] = result.stderr[-3000:]
                    stats = collector.stats()
                    stored = store.count()
                finally:
                    collector.stop()
                    store.close()
        finally:
            if pg is not None:
                pg.stop()
    drain_rate = gate["events"] / gate["drain_s"] if gate["drain_s"] > 0 else 0.0
    ingest_rate = stats["insert_events"] / stats["insert_s"] if stats["insert_s"] > 0 else 0.0
    return {
        "store": store_kind,
        "events": n,
        "drained": gate["drained"],
        "stored": stored,
        "duplicates_seen": stats["duplicates"],
        "drain_s": gate["drain_s"],
        "drain_events_per_s": round(drain_rate),
        "ingest_events_per_s": round(ingest_rate),
        "collector_batches": stats["batches"],
        "mean_batch": round(stats["insert_events"] / max(stats["batches"], 1), 1),
        "gate_rss_kib": gate["rss_kib"],
        "gate_rss_max_kib": gate["rss_max_kib"],
        "goals": {"drain_events_per_s": 2000, "ingest_events_per_s": 5000},
        **({"gate_log_tail": gate["stderr_tail"]} if "stderr_tail" in gate else {}),
    }


def _toml(table: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in table.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="backlog size (default 100000)")
    p.add_argument(
        "--store",
        choices=("sqlite", "postgresql", "both"),
        default="both",
        help="collector store (default both; postgresql needs the server binaries)",
    )


def main(args: argparse.Namespace) -> int:

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    if args.events < 1:
        print("--events: must be at least 1", file=sys.stderr)
        return 2
    kinds = ["sqlite", "postgresql"] if args.store == "both" else [args.store]
    results = []
    status = 0
    for kind in kinds:
        try:
            results.append(bench_outbox(args.events, kind))
        except PostgresUnavailable as exc:
            if args.store == "postgresql":
                print(f"bench outbox: {exc}", file=sys.stderr)
                return 1
            results.append({"store": kind, "skipped": str(exc)})
        if results[-1].get("drained") is False:
            status = 1
    print(json.dumps({"bench": "outbox", "results": results}, indent=2))
    return status


if __name__ == "__main__":  # the gate child of bench_outbox
    threading.current_thread().name = "gate"
    sys.exit(gate_child(Path(sys.argv[1]), float(sys.argv[2])))
