"""check-config finds what run would trip on, and run says it in one line per problem.

Each case here was a traceback before: a list in a directory the service user cannot
search, a short or unreadable pseudonym key, a TLS key that does not load, a DCC trust list
with no usable certificate.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scanner.gate import preflight
from tests.helpers import make_config, self_signed, toml_text

NOBODY = 65534


def gate_toml(directory: Path, **sections: dict[str, object]) -> Path:
    table: dict[str, dict[str, object]] = {
        "device": {"id": "gate-p", "site": "site-p"},
        "gpio": {"pin_factory": "mock"},
        "storage": {"dir": str(directory / "state")},
    }
    for name, values in sections.items():
        table.setdefault(name, {}).update(values)
    path = directory / "gate.toml"
    path.write_text(toml_text(table))
    return path


def cli(*args: str, as_user: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scanner", *args],
        capture_output=True,
        text=True,
        timeout=60,
        user=as_user,
        group=as_user,
    )


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user may enter (tmp_path's parents are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="gate-preflight-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


def test_a_list_the_service_user_cannot_reach_is_named_by_check_config(open_dir: Path) -> None:
    # /run/credentials/… while the service runs: the file is there, its directory is not
    # searchable for anyone but the service.
    private = open_dir / "private"
    private.mkdir(mode=0o700)
    (private / "allow.txt").write_text("EMP-0001\n")
    config = gate_toml(open_dir, policy={"allowlist_file": str(private / "allow.txt")})
    config.chmod(0o644)
    user = NOBODY if os.geteuid() == 0 else None  # root reads everything: test as someone else
    if user is None:
        private.chmod(0)
    result = cli("check-config", str(config), as_user=user)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"policy.allowlist_file: file '{private / 'allow.txt'}' cannot be read: Permission denied" in (
        result.stderr
    )


def test_a_path_that_cannot_be_opened_is_named_even_for_root(tmp_path: Path) -> None:
    loop = tmp_path / "loop.txt"
    loop.symlink_to(loop)
    config = gate_toml(tmp_path, policy={"denylist_file": str(loop)})
    result = cli("check-config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "policy.denylist_file: file" in result.stderr and "cannot be read" in result.stderr


def test_a_short_pseudonym_key_is_named_by_check_config_and_stops_run_in_one_line(tmp_path: Path) -> None:
    key = tmp_path / "subject.key"
    key.write_bytes(b"short")
    config = gate_toml(tmp_path, storage={"subject_key_file": str(key)}, camera={"source": f"dir:{tmp_path}"})
    checked = cli("check-config", str(config))
    assert checked.returncode == 2
    assert f"storage.subject_key_file: {key}: 5 bytes; a pseudonym key needs at least 16" in checked.stderr
    ran = cli("run", "--config", str(config))
    assert ran.returncode == 1
    assert "cannot start: storage.subject_key_file" in ran.stderr and "Traceback" not in ran.stderr


def test_a_missing_pseudonym_key_passes_the_check_without_being_made(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ready = preflight.check(config, create_key=False)
    assert ready.subject_key is None and not config.subject_key_path.exists()
    made = preflight.check(config, create_key=True)
    assert made.subject_key is not None and len(made.subject_key) == 32


def test_a_tls_key_that_does_not_belong_to_the_certificate_is_named(tmp_path: Path) -> None:
    ca, _ = self_signed(tmp_path, "ca")
    cert, _own_key = self_signed(tmp_path, "gate")
    _other_cert, other_key = self_signed(tmp_path, "other")
    config = gate_toml(
        tmp_path,
        mqtt={"tls": True, "ca_file": str(ca), "cert_file": str(cert), "key_file": str(other_key)},
    )
    result = cli("check-config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"mqtt.key_file: {cert} with {other_key}:" in result.stderr


def test_an_unreadable_tls_key_is_named(open_dir: Path) -> None:
    ca, _ = self_signed(open_dir, "ca")
    cert, key = self_signed(open_dir, "gate")
    for path in (ca, cert, open_dir / "gate.toml"):
        if path.exists():
            path.chmod(0o644)
    key.chmod(stat.S_IRUSR)  # the service user's own key, 0400 root
    config = gate_toml(
        open_dir, mqtt={"tls": True, "ca_file": str(ca), "cert_file": str(cert), "key_file": str(key)}
    )
    config.chmod(0o644)
    (open_dir / "state").mkdir(mode=0o777)
    user = NOBODY if os.geteuid() == 0 else None
    if user is None:
        key.chmod(0)
    result = cli("check-config", str(config), as_user=user)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"mqtt.key_file: file '{key}' cannot be read: Permission denied" in result.stderr


def test_a_dcc_trust_list_with_no_usable_certificate_stops_the_start(tmp_path: Path) -> None:
    cert, _key = self_signed(tmp_path, "dsc")
    pem = cert.read_text()  # PEM where base64 DER belongs: not a usable signer
    trust = tmp_path / "dcc-trust.json"
    trust.write_text(json.dumps({"version": "1", "certificates": [{"certificate": pem, "country": "VN"}]}))
    with pytest.raises(preflight.CannotStart) as caught:
        preflight.check(make_config(tmp_path, policy={"dcc_trust_file": str(trust)}), create_key=False)
    assert len(caught.value.problems) == 1
    assert (
        "policy:" in caught.value.problems[0] and "no usable signing certificate" in caught.value.problems[0]
    )
    der = base64.b64encode(
        x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    )
    trust.write_text(
        json.dumps({"version": "2", "certificates": [{"certificate": der.decode(), "country": "VN"}]})
    )
    ready = preflight.check(make_config(tmp_path, policy={"dcc_trust_file": str(trust)}), create_key=False)
    assert ready.trust.dcc_trust is not None and len(ready.trust.dcc_trust) == 1
