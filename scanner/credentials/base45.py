"""RFC 9285 Base45: the text encoding of EU DCCs and of our signed passes.

Its 45 characters are exactly QR's alphanumeric set, so a code stays in the dense
alphanumeric mode, and ASCII survives zbar (which re-encodes binary). Decoding is strict
(no character outside the alphabet, no dangling character, no out-of-range group): that
makes the encoding a bijection, so a changed character always yields different bytes
(and so a failed signature), never the same credential.
"""

from __future__ import annotations

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
_VALUE = {ord(c): i for i, c in enumerate(ALPHABET)}


def encode(data: bytes) -> str:
    out: list[str] = []
    for i in range(0, len(data) - 1, 2):
        n = data[i] * 256 + data[i + 1]
        c, n = n % 45, n // 45
        d, e = n % 45, n // 45
        out += (ALPHABET[c], ALPHABET[d], ALPHABET[e])
    if len(data) % 2:
        c, d = data[-1] % 45, data[-1] // 45
        out += (ALPHABET[c], ALPHABET[d])
    return "".join(out)


def decode(text: bytes) -> bytes:
    """Raises ValueError (saying why) for anything that is not canonical Base45."""
    if len(text) % 3 == 1:
        raise ValueError("base45: length leaves a single character")
    try:
        values = [_VALUE[b] for b in text]
    except KeyError:
        raise ValueError("base45: character outside the alphabet") from None
    out = bytearray()
    for i in range(0, len(values) - 2, 3):
        n = values[i] + values[i + 1] * 45 + values[i + 2] * 2025
        if n > 0xFFFF:
            raise ValueError("base45: group out of range")
        out += n.to_bytes(2, "big")
    if len(values) % 3 == 2:
        n = values[-2] + values[-1] * 45
        if n > 0xFF:
            raise ValueError("base45: final pair out of range")
        out.append(n)
    return bytes(out)
