"""What surrounds a text code and what hides inside one: the same rules for every format."""

from __future__ import annotations

import unicodedata

# Characters that show as nothing: format characters (zero-width space and joiners, the
# byte-order mark, direction marks) and the "filler" letters some keyboards type as blanks.
INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def invisible(char: str) -> bool:
    return unicodedata.category(char) in ("Cf", "Cc") or char in INVISIBLE_LETTERS or char.isspace()


def blank(char: str) -> bool:
    # Other control characters are not padding: a payload that carries one is of no format of
    # ours, and trimming it away would let "\x16EMP-0001" pass as the badge "EMP-0001".
    return invisible(char) and (unicodedata.category(char) != "Cc" or char in "\t\r\n\x00")


def trim(payload: bytes) -> bytes:
    """The payload without what surrounds a code and belongs to no format, stripped the same
    way before any format is recognised.

    Generators, apps and phone keyboards put a byte-order mark, a line ending, a space, a
    no-break or ideographic space or a zero-width character around the text. Left in front,
    any of them hides the ``GP1:``/``HC1:``/card prefix, and an expired pass would then be read
    as a plain code. Every format here is text, and none ends in such a character: a Base45
    string cannot end in a space (its last digit of a group is at most 32, a space is 36).
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload.strip(b" \t\r\n\x00")  # not text: no format of ours, the plain parser says so
    start, end = 0, len(text)
    while start < end and blank(text[start]):
        start += 1
    while end > start and blank(text[end - 1]):
        end -= 1
    return text[start:end].encode("utf-8") if (start, end) != (0, len(text)) else payload
