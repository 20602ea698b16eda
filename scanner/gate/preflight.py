"""What ``run`` needs before its first frame, checked one way for ``run`` and ``check-config``.

A gate that finds out at start that a list, a key or its TLS files cannot be used does not
start: it sits in a restart loop at a market with nobody to read the journal. So the daemon
and the technician's ``check-config`` ask the same questions here, and each problem is one
``key: problem`` line instead of a traceback.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from scanner import events
from scanner.config import Config
from scanner.credentials.signed import TrustError, TrustStore
from scanner.gate import commands, lists


class CannotStart(Exception):
    """Everything that keeps this config from running, one ``key: problem`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Ready:
    trust: lists.TrustData
    operator_keys: TrustStore | None
    subject_key: bytes | None  # None from a check: a missing key is made by the first run


def check(config: Config, *, create_key: bool) -> Ready:
    """Load what the gate decides with; raise CannotStart listing every problem found.

    ``create_key``: the daemon makes a missing pseudonym key; ``check-config`` only checks
    that it could.
    """
    problems: list[str] = []
    trust = lists.TrustData()
    try:
        trust = lists.load(config)  # deciding without a configured list is unsafe
    except lists.ListError as exc:
        problems.append(f"policy: {exc}")
    operator_keys = None
    try:
        operator_keys = commands.load_operator_keys(config.commands.operator_keys_file)
    except TrustError as exc:
        problems.append(f"commands.operator_keys_file: {exc}")
    subject_key = None
    try:
        subject_key = _subject_key(config.subject_key_path, create=create_key)
    except (OSError, ValueError) as exc:
        problems.append(f"storage.subject_key_file: {exc}")
    problems += _tls(config)
    if problems:
        raise CannotStart(problems)
    return Ready(trust, operator_keys, subject_key)


def _subject_key(path: Path, *, create: bool) -> bytes | None:
    if create:
        return events.load_or_create_key(path)
    if path.exists():
        return events.read_key(path)
    parent = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise ValueError(f"{path}: no directory to make the pseudonym key in")
    return None


def _tls(config: Config) -> list[str]:
    """Load the TLS files the way the broker link will, so a wrong or unreadable one is named."""
    m = config.mqtt
    if not m.tls:
        return []
    problems = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(m.ca_file))
    except (OSError, ssl.SSLError) as exc:
        problems.append(f"mqtt.ca_file: {m.ca_file}: {_why(exc)}")
    if m.cert_file is not None and m.key_file is not None:
        try:
            context.load_cert_chain(str(m.cert_file), str(m.key_file))
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"mqtt.key_file: {m.cert_file} with {m.key_file}: {_why(exc)}")
    return problems


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
