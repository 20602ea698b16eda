"""The collector's ack as a gate reads it: anyone who may publish on ``ack`` can send anything."""

from __future__ import annotations

import json

import pytest

from scanner.mqtt import ACK_MAX_BYTES, ACK_SCHEMA, Ack

UPTO = "upto is not a non-negative integer"
RANGES = "ranges is not a list of [a, b] with a <= b"


def ack_bytes(**fields: object) -> bytes:
    return json.dumps({"schema": ACK_SCHEMA, **fields}).encode()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (ack_bytes(upto=7, ranges=[[9, 12], [15, 15]]), Ack(7, ((9, 12), (15, 15)))),
        (ack_bytes(upto=0, ranges=[]), Ack(0, ())),
        (ack_bytes(upto=3), Ack(3, ())),  # no ranges: none
        (ack_bytes(ranges=[[1, 2]]), Ack(0, ((1, 2),))),  # no upto: nothing cumulative
        (ack_bytes(upto=2**62, ranges=[[2**62, 2**63]]), Ack(2**62, ((2**62, 2**63),))),
    ],
)
def test_an_ack_names_exactly_the_seqs_it_lists(payload: bytes, expected: Ack) -> None:
    assert Ack.parse(payload) == expected


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"", "not JSON"),
        (b"not json", "not JSON"),
        (b"[" * 30_000, "nested too deep"),  # under the size limit, past the parser's depth
        (b"[" * 100_000, "longer than any ack"),
        (b"[1, 2]", "wrong schema"),
        (json.dumps({"upto": 3}).encode(), "wrong schema"),
        (json.dumps({"schema": "gate-scanner/ack/2", "upto": 3}).encode(), "wrong schema"),
        (ack_bytes(upto="10"), UPTO),
        (ack_bytes(upto=True), UPTO),  # a bool is an int in Python, never a seq
        (ack_bytes(upto=-1), UPTO),
        (ack_bytes(upto=1.5), UPTO),
        (ack_bytes(upto=None), UPTO),
        (ack_bytes(upto=1, ranges={"1": 2}), RANGES),
        (ack_bytes(upto=1, ranges=[[1, 2, 3]]), RANGES),
        (ack_bytes(upto=1, ranges=[[1]]), RANGES),
        (ack_bytes(upto=1, ranges=[[3, 2]]), RANGES),  # backwards
        (ack_bytes(upto=1, ranges=[[1, "2"]]), RANGES),
        (ack_bytes(upto=1, ranges=[[False, 2]]), RANGES),
        (ack_bytes(upto=1, ranges=[[1, 2.0]]), RANGES),
        (ack_bytes(upto=1, ranges=[[1, 2], 5]), RANGES),
        (ack_bytes(upto=1, ranges=[(1, 2), None]), RANGES),
    ],
    # Short ids of plain words: mutmut passes each test's id on pytest's command line.
    ids=lambda value: value.split()[0] if isinstance(value, str) else "",
)
def test_anything_else_is_a_value_error_that_says_why(payload: bytes, why: str) -> None:
    # The gate logs why it ignored an ack (an operator's only clue to a broken collector).
    with pytest.raises(ValueError) as info:
        Ack.parse(payload)
    if why != "not JSON":  # json's own message says where it broke
        assert str(info.value) == why


def test_the_size_limit_is_exact() -> None:
    body = ack_bytes(upto=5)
    padded = body[:-1] + b" " * (ACK_MAX_BYTES - len(body)) + b"}"
    assert len(padded) == ACK_MAX_BYTES
    assert Ack.parse(padded) == Ack(5, ())
    with pytest.raises(ValueError, match=r"^longer than any ack$"):
        Ack.parse(padded[:-1] + b" }")


def test_what_the_collector_sends_is_what_a_gate_reads() -> None:
    ack = Ack.of(41, [(43, 44), (47, 47)])
    document = ack.to_json()
    assert document == {"schema": ACK_SCHEMA, "upto": 41, "ranges": [[43, 44], [47, 47]]}
    assert Ack.parse(json.dumps(document).encode()) == ack
