"""`gate-scanner bench fuzz`: random and mutated payloads through the whole decision path.

Seeds are valid credentials of every type, made here with throw-away keys (a signed pass, an
EU DCC signed with a self-made P-256 certificate, a CCCD card text, a plain code). Each
payload goes payload → credential → pseudonym → policy → event JSON, exactly as at the gate
(only the outbox commit and the relay are left out). Any exception counts, including one a
parser raised and the reader caught: the goal is 0 in 100,000.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from scanner import credentials, events
from scanner.console import EXIT_OK, EXIT_RUNTIME
from scanner.credentials import base45, dcc, signed
from scanner.gate import policy
from scanner.gate.lists import TrustData
from scanner.models import CredentialType

NOW = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
CCCD_SAMPLE = "079190001234|025123456|Nguyễn Văn An|02011990|Nam|12 Lê Lợi, Quận 1, TP. Hồ Chí Minh|15062021"


def samples(now: datetime = NOW) -> tuple[dict[str, bytes], TrustData]:
    """One valid payload per credential type, and the trust data that makes them verify."""
    pass_key = Ed25519PrivateKey.generate()
    kid = bytes.fromhex("0badcafe")
    pass_trust = signed.TrustStore.of(
        [signed.TrustedKey(kid, pass_key.public_key(), "bench")], version=1, issued=now
    )
    pass_text = signed.PassIssuer(pass_key, kid).issue(
        b"EMP-0001", now - timedelta(hours=1), now + timedelta(days=1)
    )

    dcc_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COUNTRY_NAME, "VN"), x509.NameAttribute(NameOID.COMMON_NAME, "DSC")]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(dcc_key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=365))
        .not_valid_after(now + timedelta(days=365))
        .sign(dcc_key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    signer = dcc.signer_from_der(der, "VN")
    dcc_trust = dcc.DccTrustList.of([signer], version="bench", issued=now)
    protected = cbor2.dumps({1: -7, 4: signer.kid})
    hcert = {
        "ver": "1.3.0",
        "nam": {"fnt": "NGUYEN", "gnt": "VAN<AN"},
        "dob": "1990-01-02",
        "v": [
            {"tg": "840539006", "dn": 2, "sd": 2, "dt": "2026-01-01", "co": "VN", "ci": "URN:UVCI:01:VN:B"}
        ],
    }
    claims = cbor2.dumps(
        {
            1: "VN",
            6: int((now - timedelta(days=1)).timestamp()),
            4: int((now + timedelta(days=30)).timestamp()),
            -260: {1: hcert},
        }
    )
    der_sig = dcc_key.sign(cbor2.dumps(["Signature1", protected, b"", claims]), ec.ECDSA(hashes.SHA256()))
    r, s = utils.decode_dss_signature(der_sig)
    cose = cbor2.dumps(
        cbor2.CBORTag(18, [protected, {}, claims, r.to_bytes(32, "big") + s.to_bytes(32, "big")])
    )
    dcc_text = b"HC1:" + base45.encode(zlib.compress(cose, 9)).encode()

    payloads = {
        "plain": b"EMP-0001",
        "cccd": CCCD_SAMPLE.encode(),
        "signed": pass_text.encode(),
        "dcc": dcc_text,
    }
    return payloads, TrustData(pass_trust=pass_trust, dcc_trust=dcc_trust)


def _mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    seed = bytearray(rng.choice(seeds))
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.choice((0, 1, 4, 16, 64, 256, 1024, 3000)))
    if kind == 1 and seed:  # flip one bit
        i = rng.randrange(len(seed))
        seed[i] ^= 1 << rng.randrange(8)
    elif kind == 2:  # truncate
        del seed[rng.randrange(len(seed) + 1) :]
    elif kind == 3:  # insert junk
        i = rng.randrange(len(seed) + 1)
        seed[i:i] = rng.randbytes(rng.randrange(1, 9))
    elif kind == 4 and seed:  # overwrite a byte with a character of the same alphabet
        seed[rng.randrange(len(seed))] = ord(rng.choice(base45.ALPHABET + "|"))
    elif kind == 5:  # splice two seeds
        other = rng.choice(seeds)
        seed = seed[: rng.randrange(len(seed) + 1)] + other[rng.randrange(len(other) + 1) :]
    elif kind == 6:  # repeat a slice (oversized, nested-looking)
        i = rng.randrange(len(seed) + 1)
        seed += seed[i:] * rng.randrange(1, 20)
    return bytes(seed)


class ParserErrorCounter(logging.Handler):
    """Exceptions a parser raised and the reader turned into a reject still count as failures."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.count += 1


def bench_fuzz(n: int, seed: int = 1) -> dict[str, Any]:
    payloads, trust = samples()
    reader = credentials.reader_for(pass_trust=trust.pass_trust, dcc_trust=trust.dcc_trust)
    rules = policy.Rules(accept=frozenset(CredentialType) - {CredentialType.UNKNOWN}, site="bench")
    pseudonymizer = events.Pseudonymizer(b"k" * 32)
    ids = events.Uuid7()
    rng = random.Random(seed)
    seeds = list(payloads.values())
    caught = ParserErrorCounter()
    logging.getLogger("scanner").addHandler(caught)
    escaped: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    start = time.perf_counter()
    try:
        for i in range(n):
            payload = _mutate(rng, seeds)
            try:
                credential = reader.parse(payload, NOW)
                subject = pseudonymizer.subject(str(credential.type), credential.identity)
                decision = policy.decide(credential, subject=subject, rules=rules, trust=trust, now=NOW)
                event = events.build_event(
                    decision,
                    seq=i + 1,
                    event_id=ids.new(),
                    device="bench",
                    site="bench",
                    direction="in",
                    scanned_at=NOW,
                    clock_synced=True,
                    subject=subject,
                )
                events.to_json(event)
                reasons[f"{credential.type}/{decision.reason}"] += 1
            except Exception as exc:
                escaped[type(exc).__name__] += 1
    finally:
        logging.getLogger("scanner").removeHandler(caught)
    elapsed = time.perf_counter() - start
    return {
        "payloads": n,
        "decisions_per_s": round(n / elapsed),
        "exceptions": sum(escaped.values()) + caught.count,
        "exceptions_escaped": dict(escaped),
        "exceptions_caught_by_reader": caught.count,
        "outcomes": dict(reasons.most_common()),
    }


def bench_decisions(repeat: int = 300) -> dict[str, dict[str, float]]:
    """Time of payload → credential → decision per credential type (median, p99 in ms)."""
    payloads, trust = samples()
    reader = credentials.reader_for(pass_trust=trust.pass_trust, dcc_trust=trust.dcc_trust)
    rules = policy.Rules(accept=frozenset(CredentialType) - {CredentialType.UNKNOWN}, site="bench")
    figures = {}
    for kind, payload in payloads.items():
        samples_ms = []
        for _ in range(repeat):
            begin = time.perf_counter()
            credential = reader.parse(payload, NOW)
            decision = policy.decide(credential, subject=None, rules=rules, trust=trust, now=NOW)
            samples_ms.append((time.perf_counter() - begin) * 1000)
        assert decision.accepted, (kind, decision.reason, decision.detail)  # the seed must be valid
        ordered = sorted(samples_ms)
        figures[kind] = {
            "p50": round(statistics.median(ordered), 3),
            "p99": round(ordered[round(0.99 * (len(ordered) - 1))], 3),
        }
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=100_000, help="how many payloads")
    parser.add_argument("--seed", type=int, default=1)


def main(args: argparse.Namespace) -> int:
    figures = bench_fuzz(args.n, args.seed)
    print(json.dumps(figures, indent=2))
    return EXIT_OK if figures["exceptions"] == 0 else EXIT_RUNTIME
