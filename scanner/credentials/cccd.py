"""The QR code on a Vietnamese chip-based citizen ID card (CCCD, and the 2024 "căn cước").

Text, UTF-8, fields separated by ``|``::

    CCCD number (12 digits) | old CMND (9 or 12 digits, or empty) | full name |
    date of birth ddMMyyyy | sex | permanent address | issue date ddMMyyyy

Cards and reader apps differ: the issue date may be missing (6 fields), fields may carry
stray spaces, the text may end in CR/LF, and names may arrive decomposed (NFD) from some
readers. The code is unsigned: anybody can print one, so it is an *identity claim*, never
proof, and it carries no validity window. Policy decides whether a claim may open a gate.

Only the 12-digit number leaves this module (as the identity, to be pseudonymised at once);
names, dates of birth and addresses are checked for shape and dropped, and no detail
string ever quotes a field's value.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import date

from scanner.models import Credential, CredentialType, Reason

MAX_BYTES = 1024  # a real card's text is ~150-250 bytes; anything far longer is not a card
# Self-identification: a 12-digit first field and a separator, or a digits-first text with
# at least six fields (a card with a damaged number). Either must be ours, reported as a
# malformed card if need be: falling through to plain codes would make a card's whole text,
# name and address included, someone's identity.
_LOOKS_LIKE = re.compile(rb"(?:\xef\xbb\xbf)?[ \t]*(?:[0-9]{12}[ \t]*\||[0-9]+[ \t]*\|(?:[^|]*\|){4})")
_NUMBER = re.compile(r"[0-9]{12}")  # not \d: that admits every script's digits
_OLD_NUMBER = re.compile(r"(?:[0-9]{9}|[0-9]{12})?")  # 12-digit CMNDs were issued 2012-2016
_DATE = re.compile(r"[0-9]{8}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Province codes of the ID number (Circular 07/2016/TT-BCA): 001 Hà Nội … 096 Cà Mau.
_PROVINCES = range(1, 97)
_OLDEST_YEAR = 1890  # nobody alive holds a card with an earlier date


def parse(payload: bytes) -> Credential | None:
    """None unless the payload looks like a CCCD QR; never raises."""
    if not _LOOKS_LIKE.match(payload):
        return None
    try:
        number = _number(payload)
    except _Malformed as exc:
        return Credential(CredentialType.CCCD, b"", problem=Reason.MALFORMED, detail=f"CCCD: {exc}")
    except Exception as exc:  # attacker-controlled input: a bug here must be a reject
        return Credential(
            CredentialType.CCCD,
            b"",
            problem=Reason.MALFORMED,
            detail=f"CCCD parser error: {type(exc).__name__}",
        )
    return Credential(
        CredentialType.CCCD, number.encode("ascii"), detail="identity claim (unsigned ID-card QR)"
    )


class _Malformed(ValueError):
    """Why a payload is not a well-formed card QR: names fields, never their values."""


def _number(payload: bytes) -> str:
    """The card's 12-digit number, after checking the shape of every field."""
    if len(payload) > MAX_BYTES:
        raise _Malformed(f"{len(payload)} bytes is longer than a card QR ({MAX_BYTES})")
    try:
        text = payload.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _Malformed("not UTF-8") from None
    # Some readers hand over NFD: normalise once so that every check sees one form.
    fields = [f.strip() for f in unicodedata.normalize("NFC", text.rstrip("\r\n")).split("|")]
    if len(fields) == 8 and fields[7] == "":  # a trailing separator some readers add
        fields.pop()
    if len(fields) not in (6, 7):
        raise _Malformed(f"{len(fields)} fields, expected 6 or 7")
    if any(_CONTROL.search(f) for f in fields):
        raise _Malformed("control characters in a field")
    number, old_number, name, born, sex, _address, *issued = fields
    if not _NUMBER.fullmatch(number):
        raise _Malformed("ID number is not 12 digits")
    if int(number[:3]) not in _PROVINCES:
        raise _Malformed("ID number has no valid province code")
    if not _OLD_NUMBER.fullmatch(old_number):
        raise _Malformed("old ID number is not 9 or 12 digits")
    if not name:
        raise _Malformed("name is empty")
    if any(c.isdigit() for c in name):
        raise _Malformed("name contains digits")
    if not _valid_date(born):
        raise _Malformed("date of birth is not a valid ddMMyyyy date")
    if not sex:
        raise _Malformed("sex is empty")
    if issued and issued[0] and not _valid_date(issued[0]):
        raise _Malformed("issue date is not a valid ddMMyyyy date")
    if issued and issued[0] and _as_date(issued[0]) < _as_date(born):
        raise _Malformed("issue date is before the date of birth")
    return number


def _valid_date(text: str) -> bool:
    if not _DATE.fullmatch(text):
        return False
    try:
        moment = _as_date(text)
    except ValueError:
        return False
    return moment.year >= _OLDEST_YEAR


def _as_date(text: str) -> date:
    return date(int(text[4:]), int(text[2:4]), int(text[:2]))
