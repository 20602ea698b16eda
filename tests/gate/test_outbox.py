from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

from scanner.gate.outbox import Outbox, OutboxError, bench_commits
from tests.helpers import REPO


def payload(seq: int, created: str) -> bytes:
    return f'{{"seq":{seq},"created":"{created}"}}'.encode()


def test_seq_starts_at_one_and_is_never_reused(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    with Outbox(db, max_events=100) as ob:
        assert ob.next_seq == 1
        assert [ob.append(payload) for _ in range(3)] == [1, 2, 3]
        assert ob.remove([1, 2, 3]) == 3
        assert ob.depth() == 0
        assert ob.append(payload) == 4
    with Outbox(db, max_events=100) as ob:
        assert ob.next_seq == 5
        assert ob.depth() == 1
        ob.remove_upto(4)
        assert ob.append(payload) == 5


def test_pending_remove_and_oldest(tmp_path: Path) -> None:
    times = iter(f"2026-01-01T00:00:0{i}.000Z" for i in range(10))
    with Outbox(tmp_path / "o.db", max_events=100, clock=lambda: next(times)) as ob:
        assert ob.oldest_created() is None
        for _ in range(6):
            ob.append(payload)
        rows = ob.pending()
        assert [s for s, _ in rows] == [1, 2, 3, 4, 5, 6]
        assert rows[0][1] == b'{"seq":1,"created":"2026-01-01T00:00:00.000Z"}'
        assert [s for s, _ in ob.pending(after_seq=2, limit=2)] == [3, 4]
        assert ob.remove([2, 5, 99]) == 2
        assert ob.remove([]) == 0
        assert [s for s, _ in ob.pending()] == [1, 3, 4, 6]
        assert ob.oldest_created() == "2026-01-01T00:00:00.000Z"
        assert ob.remove_upto(3) == 2
        assert ob.depth() == 2
        assert ob.oldest_created() == "2026-01-01T00:00:03.000Z"


def test_every_commit_is_synced_before_append_returns(tmp_path: Path) -> None:
    # The promise behind "committed before the relay moves": a returned append survives a
    # power cut. In WAL mode that takes synchronous=FULL (the WAL is fsynced at every commit);
    # NORMAL syncs only at checkpoints and loses the last commits on power loss, OFF never syncs.
    db = tmp_path / "outbox.db"
    for _ in range(2):  # a new file and an existing one alike
        with Outbox(db, max_events=10) as ob:
            ob.append(payload)
            conn = ob._conn
            assert conn is not None
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
            assert not conn.in_transaction  # append returned after COMMIT, not inside it


def test_build_failure_stores_nothing_and_keeps_seq(tmp_path: Path) -> None:
    def broken(seq: int, created: str) -> bytes:
        raise RuntimeError("encoder bug")

    with Outbox(tmp_path / "o.db", max_events=10) as ob:
        with pytest.raises(RuntimeError):
            ob.append(broken)
        assert ob.depth() == 0
        assert ob.append(payload) == 1


def test_file_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with Outbox(tmp_path / "o.db", max_events=10) as ob:
            ob.append(payload)
            for f in tmp_path.iterdir():
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        os.umask(old)
    loose = tmp_path / "loose.db"
    loose.touch(mode=0o644)
    os.chmod(loose, 0o644)
    Outbox(loose, max_events=10).close()
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600


def test_full_raises_and_recovers(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_events=3) as ob:
        for _ in range(3):
            ob.append(payload)
        with pytest.raises(OutboxError) as info:
            ob.append(payload)
        # The reason goes into the ``outbox`` alarm an operator reads.
        assert info.value.reason == str(info.value) == "full: 3 events (max 3)"
        ob.remove([1])
        assert ob.append(payload) == 4


def test_disk_full_raises_and_keeps_earlier_rows(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_events=10_000) as ob:
        ob.append(payload)
        # Cap the database size: SQLite reports SQLITE_FULL exactly as on a full disk.
        conn = ob._conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={pages}")
        big = os.urandom(64 * 1024)
        with pytest.raises(OutboxError, match="full"):
            ob.append(lambda seq, created: big)
        assert ob.depth() == 1
        assert ob.next_seq == 2
        conn.execute("PRAGMA max_page_count=1073741823")
        assert ob.append(payload) == 2


def _quarantined_files(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if ".corrupt-" in f.name)


def test_junk_file_is_quarantined_and_seqs_continue_above_the_mark(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    with Outbox(db, max_events=100, seq_block=10) as ob:
        used = [ob.append(payload) for _ in range(25)]  # crosses two block reservations
        assert ob.quarantined is None
    db.write_bytes(b"this is not an sqlite database, it is a truncated mess" * 100)
    with Outbox(db, max_events=100, seq_block=10) as ob:
        assert ob.quarantined is not None and ob.quarantined.exists()
        assert ob.quarantined.name.startswith("outbox.db.corrupt-")
        assert stat.S_IMODE(ob.quarantined.stat().st_mode) == 0o600
        assert ob.depth() == 0
        seq = ob.append(payload)
        assert seq > max(used)  # a gap the collector reports, never a reused seq
        assert [s for s, _ in ob.pending()] == [seq]
    with Outbox(db, max_events=100, seq_block=10) as ob:  # the new file is a normal file now
        assert ob.quarantined is None
        assert ob.append(payload) == seq + 1
    assert len(_quarantined_files(tmp_path)) >= 1


def test_a_quarantined_outbox_is_named_by_the_utc_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # README: outbox.db.corrupt-<UTC time>, whatever the gate's local zone.
    monkeypatch.setenv("TZ", "Asia/Ho_Chi_Minh")
    time.tzset()
    try:
        db = tmp_path / "outbox.db"
        db.write_bytes(b"not a database" * 300)
        before = datetime.now(UTC)
        with Outbox(db, max_events=10) as ob:
            moved = ob.quarantined
            assert moved is not None
            stamp = datetime.strptime(moved.name.removeprefix("outbox.db.corrupt-"), "%Y%m%dT%H%M%S.%fZ")
            assert before - timedelta(seconds=1) <= stamp.replace(tzinfo=UTC) <= datetime.now(UTC)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_a_corrupt_outbox_that_cannot_be_moved_aside_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "outbox.db"
    db.write_bytes(b"not a database" * 300)

    def no_rename(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", no_rename)
    with pytest.raises(OutboxError) as info:
        Outbox(db, max_events=10)
    assert str(info.value) == (
        f"{db} is corrupt (file is not a database) and cannot be moved aside: [Errno 13] Permission denied"
    )


def test_a_failed_read_is_an_outbox_error_that_says_why(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_events=10) as ob:
        ob.append(payload)
        assert ob._conn is not None
        ob._conn.execute("DROP TABLE outbox")  # what a damaged page does to a query
        for read in (ob.oldest_created, ob.pending):
            with pytest.raises(OutboxError) as info:
                read()
            assert str(info.value).startswith("cannot read: "), info.value
        with pytest.raises(OutboxError) as info:
            ob.oldest_created()
        assert str(info.value) == "cannot read: no such table: outbox"


def test_malformed_pages_are_quarantined(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    with Outbox(db, max_events=1000) as ob:
        for _ in range(200):
            ob.append(lambda seq, created: b"x" * 500)
        used = ob.next_seq - 1
    # Keep the header (SQLite still recognises the file), trash the pages behind it.
    raw = bytearray(db.read_bytes())
    assert len(raw) > 8192
    raw[4096:] = b"\xff" * (len(raw) - 4096)
    db.write_bytes(bytes(raw))
    with Outbox(db, max_events=1000) as ob:
        assert ob.quarantined is not None
        assert ob.append(payload) > used


def test_deleted_outbox_continues_above_the_mark(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "outbox.db"
    with caplog.at_level(logging.WARNING, logger="scanner.gate.outbox"):
        with Outbox(db, max_events=100, seq_block=5) as ob:
            for _ in range(7):
                ob.append(payload)
        assert not caplog.records  # a new outbox in WAL mode: nothing to warn of
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        with Outbox(db, max_events=100, seq_block=5) as ob:
            assert ob.quarantined is None
            assert ob.append(payload) > 7
    # The technician learns why the seqs jump: the file is new, the mark on disk is not.
    assert [r.getMessage() for r in caplog.records] == [f"outbox {db} is new: seqs continue at 11"]


def test_an_outbox_still_corrupt_after_the_move_is_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scanner.gate import outbox as outbox_module

    def corrupt(self: Outbox) -> object:
        raise outbox_module._Corrupt("file is not a database")

    monkeypatch.setattr(Outbox, "_open", corrupt)
    with pytest.raises(OutboxError) as info:
        Outbox(tmp_path / "outbox.db", max_events=10)
    assert str(info.value) == f"cannot use {tmp_path / 'outbox.db'}: file is not a database"


def test_unopenable_file_still_raises(tmp_path: Path) -> None:
    # Not corruption: a directory where the file should be. Nothing is moved aside.
    (tmp_path / "o.db").mkdir()
    with pytest.raises(OutboxError, match="cannot"):
        Outbox(tmp_path / "o.db", max_events=10)
    assert not _quarantined_files(tmp_path)


def test_seq_mark_write_failure_fails_secure(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_events=100, seq_block=2) as ob:
        assert ob.append(payload) == 1
        ob.seq_path.unlink()
        ob.seq_path.mkdir()  # the sidecar cannot be replaced: the next block cannot be reserved
        assert ob.append(payload) == 2  # still inside the reserved block
        with pytest.raises(OutboxError, match="reserve"):
            ob.append(payload)
        assert ob.depth() == 2 and ob.next_seq == 3
        ob.seq_path.rmdir()
        assert ob.append(payload) == 3


def test_closed_raises(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", max_events=10)
    ob.close()
    ob.close()
    with pytest.raises(OutboxError, match="closed"):
        ob.append(payload)


def test_read_only_dir_raises() -> None:
    # Root ignores directory permissions, so when running as root the check runs in a forked
    # child that has dropped to "nobody". /tmp (not pytest's 0700 tmp) so nobody can reach it.
    d = Path(tempfile.mkdtemp(prefix="outbox-ro-", dir="/tmp"))
    try:
        os.chmod(d, 0o555)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 3
            try:
                os.close(r)
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                try:
                    Outbox(d / "o.db", max_events=10)
                    code = 1
                except OutboxError as exc:
                    os.write(w, exc.reason.encode())
                    code = 0
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            reason = f.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "Outbox opened in a read-only directory"
        assert "cannot open" in reason
    finally:
        os.chmod(d, 0o755)
        shutil.rmtree(d)


CHILD = """
import sys
from pathlib import Path
from scanner.gate.outbox import Outbox
ob = Outbox(Path(sys.argv[1]), max_events=1_000_000)
while True:
    seq = ob.append(lambda seq, created: b'{"seq": %d}' % seq)
    print(seq, flush=True)  # only after append returned: the row must survive SIGKILL now
"""


def test_sigkill_loses_nothing_committed(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    with Outbox(db, max_events=100) as ob:
        ob.append(payload)
        ob.remove([1])  # the child must continue after a deleted seq, not reuse it
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    reported: list[int] = []
    try:
        assert proc.stdout is not None
        # Bounded: the child prints forever until killed; EOF means it died on its own.
        for line in proc.stdout:
            reported.append(int(line))
            if len(reported) >= 40:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert len(reported) == 40, "child stopped early"
    assert reported == list(range(2, 42))
    with Outbox(db, max_events=100_000) as ob:
        stored = [s for s, _ in ob.pending(limit=100_000)]
        assert stored[:40] == reported  # every acknowledged append survived
        assert stored == list(range(2, 2 + len(stored)))  # and nothing half-written
        assert ob.next_seq == stored[-1] + 1
        assert ob.depth() == len(stored)


def test_two_threads(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", max_events=10_000)
    appended: list[int] = []
    removed = 0
    done = threading.Event()

    def producer() -> None:
        try:
            for _ in range(300):
                appended.append(ob.append(payload))
        finally:
            done.set()

    t = threading.Thread(target=producer)
    t.start()
    # Bounded by time, not by turns: 300 synced commits take seconds on a busy disk, and a
    # consumer that spun through a fixed number of turns gave up before the producer was done.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = ob.pending(limit=50)
        removed += ob.remove(s for s, _ in rows)
        if done.is_set() and not rows and ob.depth() == 0:
            break
        if not rows:
            done.wait(0.001)
    t.join(timeout=30)
    assert appended == list(range(1, 301))
    assert removed == 300
    assert ob.depth() == 0
    ob.close()


def test_bench_commits(tmp_path: Path) -> None:
    db = tmp_path / "bench.db"
    rate = bench_commits(db, 20)
    assert rate > 0
    assert not list(tmp_path.iterdir())
    db.touch()
    with pytest.raises(FileExistsError):
        bench_commits(db, 5)


BLOCK_CHILD = """
import sys
from pathlib import Path
from scanner.gate.outbox import Outbox
ob = Outbox(Path(sys.argv[1]), max_events=1_000_000, seq_block=3)
while True:
    seq = ob.append(lambda seq, created: b'{"seq": %d}' % seq)
    print(seq, flush=True)
"""


def test_sigkill_between_reservations_then_corruption_never_reuses(tmp_path: Path) -> None:
    """Killed at arbitrary points of the block cycle, then the db lost: the next seq is above all."""
    db = tmp_path / "outbox.db"
    reported: list[int] = []
    for kill_after in (4, 7, 5):  # bounded: three runs, each stops at a different block offset
        proc = subprocess.Popen(
            [sys.executable, "-c", BLOCK_CHILD, str(db)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )
        got = 0
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                reported.append(int(line))
                got += 1
                if got >= kill_after:
                    break
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        assert got == kill_after, "child stopped early"
    assert reported == sorted(set(reported))
    with Outbox(db, max_events=1_000_000) as ob:
        stored = [s for s, _ in ob.pending(limit=1000)]
    db.write_bytes(b"\x00junk" * 2000)
    with Outbox(db, max_events=100, seq_block=3) as ob:
        assert ob.quarantined is not None
        assert ob.append(payload) > max(stored)


def test_delivered_check_ins_leave_no_readable_trace_on_the_card(tmp_path: Path) -> None:
    marker = b"SUBJECT-c5425260c5425260-MARKER"
    ob = Outbox(tmp_path / "o.db", max_events=100)
    for _ in range(20):
        ob.append(lambda seq, created: marker + str(seq).encode())
    ob.remove_upto(20)  # the collector acknowledged every one
    assert ob.depth() == 0
    files = [p for p in tmp_path.iterdir() if p.name.startswith("o.db")]
    assert files and not any(marker in p.read_bytes() for p in files), [p.name for p in files]
    ob.close()


def test_a_quarantined_outbox_is_deleted_after_four_weeks(tmp_path: Path) -> None:
    old = tmp_path / "o.db.corrupt-20261001T000000.000000Z"
    recent = tmp_path / "o.db.corrupt-20261204T000000.000000Z"
    for path, age_days in ((old, 29), (recent, 3)):
        path.write_bytes(b"unsent check-ins")
        stamp = time.time() - age_days * 86_400
        os.utime(path, (stamp, stamp))
    Outbox(tmp_path / "o.db", max_events=10).close()
    assert not old.exists() and recent.exists()


def test_a_failed_removal_leaves_no_transaction_open(tmp_path: Path) -> None:
    # The publisher removes, the pipeline appends, on one connection: a removal that fails in
    # any way must roll back, or every later append (every scan) fails too.
    with Outbox(tmp_path / "o.db", max_events=10) as ob:
        for _ in range(3):
            ob.append(payload)
        assert ob._conn is not None
        ob._conn.execute(
            "CREATE TRIGGER no_delete BEFORE DELETE ON outbox BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
        with pytest.raises(OutboxError) as info:
            ob.remove([1])
        assert str(info.value) == "cannot remove: no"
        assert ob.append(payload) == 4
        with pytest.raises(OverflowError):  # too large to bind: not even an SQLite error
            ob.remove_range(2**70, 2**71)
        assert ob.append(payload) == 5
        ob._conn.execute("DROP TRIGGER no_delete")
        assert ob.remove_upto(5) == 5 and ob.depth() == 0


def test_the_seq_mark_lives_beside_the_database_under_its_name(tmp_path: Path) -> None:
    # An upgrade must find the mark an older gate wrote: its name is part of the on-disk format.
    with Outbox(tmp_path / "outbox.db", max_events=10, seq_block=5) as ob:
        ob.append(payload)
        assert ob.seq_path == tmp_path / "outbox.seq"
        assert (tmp_path / "outbox.seq").read_text() == "6\n"


def test_a_fresh_outbox_with_an_unreadable_mark_starts_at_seq_1(tmp_path: Path) -> None:
    (tmp_path / "outbox.seq").write_text("garbage\n")  # a mark left damaged, its db gone
    with Outbox(tmp_path / "outbox.db", max_events=10) as ob:
        assert ob.append(payload) == 1  # the collector must not see a gap where nothing was lost


def test_a_transaction_that_cannot_begin_is_refused_with_its_reason(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_events=10) as ob:
        ob._conn.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]  # a transaction left open
        try:
            with pytest.raises(OutboxError) as refused:
                ob.append(payload)
            assert refused.value.reason.startswith("cannot begin: ")
        finally:
            ob._conn.execute("ROLLBACK")  # type: ignore[union-attr]
        assert ob.append(payload) == 1


Script = Callable[[sqlite3.Connection], sqlite3.Cursor]


class _ScriptedConnection(sqlite3.Connection):
    """A real SQLite connection whose answer to chosen statements is scripted: what a damaged
    file (quick_check's findings) or a busy one (locked) says, which a test cannot make SQLite
    say on demand."""

    script: ClassVar[dict[str, Script]] = {}

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        action = self.script.get(sql)
        if action is not None:
            return action(self)
        return sqlite3.Connection.execute(self, sql, *args)


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Script]]:
    real_connect = sqlite3.connect
    monkeypatch.setattr(
        sqlite3, "connect", lambda *a, **kw: real_connect(*a, factory=_ScriptedConnection, **kw)
    )
    _ScriptedConnection.script = {}
    yield _ScriptedConnection.script
    _ScriptedConnection.script = {}


def test_an_existing_outbox_that_quick_check_finds_damaged_is_moved_aside(
    tmp_path: Path, scripted: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "outbox.db"
    with Outbox(db, max_events=10, seq_block=5) as ob:
        ob.append(payload)
        ob.append(payload)
    findings = " UNION ALL ".join(f"SELECT '{row}'" for row in ("row 1 missing from index i", "b", "c", "d"))
    scripted["PRAGMA quick_check"] = lambda conn: sqlite3.Connection.execute(conn, findings)
    with caplog.at_level(logging.ERROR, logger="scanner.gate.outbox"), Outbox(db, max_events=10) as ob:
        # Checked because it existed; the new file beside it is not (it would be found
        # "damaged" too here, and the gate could not start).
        assert ob.quarantined is not None and ob.append(payload) == 6
    assert "is corrupt (quick_check: corrupt: row 1 missing from index i; b; c): moved to" in caplog.text


def test_a_busy_outbox_is_an_error_not_corruption(tmp_path: Path, scripted: dict[str, Any]) -> None:
    db = tmp_path / "outbox.db"
    with Outbox(db, max_events=10) as ob:
        ob.append(payload)

    def locked(_conn: sqlite3.Connection) -> sqlite3.Cursor:
        raise sqlite3.OperationalError("database is locked")

    scripted["PRAGMA journal_mode=WAL"] = locked
    with pytest.raises(OutboxError) as info:
        Outbox(db, max_events=10)
    assert str(info.value) == f"cannot use {db}: database is locked"
    assert not _quarantined_files(tmp_path)  # nothing moved aside: the events are all still there
