"""CCCD ID-card QR: realistic card texts, defensive parsing, and no personal data in output.

Every sample is invented: the numbers follow the card rules but belong to nobody.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scanner.credentials import cccd
from scanner.models import CredentialType, Reason

NUMBER = "001099012345"
NAME = "Nguyễn Thị Ánh Tuyết"
BORN = "29022000"
ADDRESS = "Số 12, Ngõ 34 Phố Trần Duy Hưng, Phường Trung Hòa, Quận Cầu Giấy, Hà Nội"
ISSUED = "15032021"
CARD = f"{NUMBER}|123456789|{NAME}|{BORN}|Nữ|{ADDRESS}|{ISSUED}"
PERSONAL = (NUMBER, "123456789", NAME, "Nguyễn", BORN, ADDRESS, "Trần Duy Hưng", ISSUED)

VALID = {
    "seven fields": CARD,
    "six fields (no issue date)": f"{NUMBER}|123456789|{NAME}|{BORN}|Nữ|{ADDRESS}",
    "empty old number": f"{NUMBER}||{NAME}|{BORN}|Nữ|{ADDRESS}|{ISSUED}",
    "12-digit old number": f"{NUMBER}|001199000111|{NAME}|{BORN}|Nữ|{ADDRESS}|{ISSUED}",
    "NFD diacritics": unicodedata.normalize("NFD", CARD),
    "stray whitespace": f" {NUMBER} | 123456789 |  {NAME} | {BORN} | Nữ | {ADDRESS} | {ISSUED} ",
    "CRLF": CARD + "\r\n",
    "LF": CARD + "\n",
    "trailing separator": CARD + "|",
    "empty issue date": f"{NUMBER}|123456789|{NAME}|{BORN}|Nữ|{ADDRESS}|",
    "byte-order mark": "\ufeff" + CARD,
    "male, born 1950s": "079055001234||Trần Văn Bảy|01011955|Nam|Ấp 3, Xã Tân Thạnh, Cái Bè, Tiền Giang|",
    "highest province code": "096203000001||Lê Hoàng Nam|31122003|Nam|Cà Mau|10012022",
    "upper-case name": f"{NUMBER}|123456789|NGUYỄN VĂN AN|{BORN}|Nam|{ADDRESS}|{ISSUED}",
}


@pytest.mark.parametrize("text", VALID.values(), ids=VALID.keys())
def test_card_yields_identity_claim(text: str) -> None:
    credential = cccd.parse(text.encode("utf-8"))
    assert credential is not None
    assert credential.problem is None, credential.detail
    assert credential.type is CredentialType.CCCD
    number = text.lstrip("\ufeff ").split("|")[0].strip()
    assert credential.identity == number.encode()
    # An unsigned claim: nothing that looks like proof or a validity window.
    assert credential.issuer is None and credential.valid_from is None and credential.valid_until is None
    assert credential.credential_id == b""
    assert_no_personal_data(credential, text)


def test_nfc_and_nfd_give_the_same_identity() -> None:
    nfc = cccd.parse(unicodedata.normalize("NFC", CARD).encode())
    nfd = cccd.parse(unicodedata.normalize("NFD", CARD).encode())
    assert nfc == nfd


MALFORMED = {
    "invalid date of birth": f"{NUMBER}|123456789|{NAME}|31022000|Nữ|{ADDRESS}|{ISSUED}",
    "date of birth not 8 digits": f"{NUMBER}|123456789|{NAME}|1/1/2000|Nữ|{ADDRESS}|{ISSUED}",
    "month 13": f"{NUMBER}|123456789|{NAME}|01132000|Nữ|{ADDRESS}|{ISSUED}",
    "year 1066": f"{NUMBER}|123456789|{NAME}|01011066|Nữ|{ADDRESS}|{ISSUED}",
    "invalid issue date": f"{NUMBER}|123456789|{NAME}|{BORN}|Nữ|{ADDRESS}|00002021",
    "issued before birth": f"{NUMBER}|123456789|{NAME}|{BORN}|Nữ|{ADDRESS}|01011999",
    "province 000": f"000099012345|123456789|{NAME}|{BORN}|Nữ|{ADDRESS}|{ISSUED}",
    "province 097": f"097099012345|123456789|{NAME}|{BORN}|Nữ|{ADDRESS}|{ISSUED}",
    "11-digit number": f"00109901234|123456789|{NAME}|{BORN}|Nữ|{ADDRESS}|{ISSUED}",
    "13-digit number": f"0010990123456|123456789|{NAME}|{BORN}|Nữ|{ADDRESS}|{ISSUED}",
    "old number 8 digits": f"{NUMBER}|12345678|{NAME}|{BORN}|Nữ|{ADDRESS}|{ISSUED}",
    "old number with letters": f"{NUMBER}|12345678X|{NAME}|{BORN}|Nữ|{ADDRESS}|{ISSUED}",
    "five fields": f"{NUMBER}|123456789|{NAME}|{BORN}|Nữ",
    "eight fields": f"{CARD}|extra",
    "two fields": f"{NUMBER}|{NAME}",
    "empty name": f"{NUMBER}|123456789| |{BORN}|Nữ|{ADDRESS}|{ISSUED}",
    "digits in name": f"{NUMBER}|123456789|Nguyen 2|{BORN}|Nữ|{ADDRESS}|{ISSUED}",
    "empty sex": f"{NUMBER}|123456789|{NAME}|{BORN}||{ADDRESS}|{ISSUED}",
    "control character": f"{NUMBER}|123456789|{NAME}\x00|{BORN}|Nữ|{ADDRESS}|{ISSUED}",
    "line break inside a field": f"{NUMBER}|123456789|{NAME}|{BORN}|Nữ|Số 12,\nHà Nội|{ISSUED}",
    "non-ASCII digits in a date": f"{NUMBER}|123456789|{NAME}|٠١٠١٢٠٠٠|Nữ|{ADDRESS}|{ISSUED}",
    "too long": f"{NUMBER}|123456789|{NAME}|{BORN}|Nữ|{ADDRESS * 20}|{ISSUED}",
}


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_card_is_rejected_without_personal_data(text: str) -> None:
    credential = cccd.parse(text.encode("utf-8"))
    assert credential is not None
    assert credential.type is CredentialType.CCCD
    assert credential.problem is Reason.MALFORMED
    assert credential.identity == b""
    assert credential.detail.startswith("CCCD")
    assert_no_personal_data(credential, text)


def test_not_utf8_is_malformed() -> None:
    credential = cccd.parse(CARD.encode("utf-16-le").replace(b"\x00", b"")[:12] + b"|\xff\xfe|x|y|z|w")
    assert credential is not None and credential.problem is Reason.MALFORMED
    assert "UTF-8" in credential.detail


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"hello",
        b"GP1:ABC",
        b"HC1:NCF",
        b"001099012345",  # a number alone is a plain code, not a card
        b"ticket|42",
        b"12|34",  # too few fields to be a damaged card
        b"x001099012345|a|b|c|d|e",
        CARD.encode("utf-16"),
    ],
)
def test_other_payloads_are_not_cards(payload: bytes) -> None:
    assert cccd.parse(payload) is None


def assert_no_personal_data(credential: object, text: str) -> None:
    shown = repr(credential) + getattr(credential, "detail", "")
    for value in (*PERSONAL, *[f.strip() for f in text.split("|")[:4] if len(f.strip()) > 3]):
        assert value not in shown, value
        assert unicodedata.normalize("NFC", value) not in shown, value


@settings(max_examples=1000)
@given(st.binary(max_size=400))
def test_never_raises_on_arbitrary_bytes(payload: bytes) -> None:
    credential = cccd.parse(payload)
    assert credential is None or credential.type is CredentialType.CCCD


FIELD = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=1000)
@given(st.from_regex(r"\A[0-9]{12}\Z"), st.lists(FIELD, min_size=1, max_size=9))
def test_never_raises_on_card_shaped_text(number: str, fields: list[str]) -> None:
    payload = "|".join([number, *fields]).encode("utf-8", errors="surrogatepass")
    credential = cccd.parse(payload)
    assert credential is not None and credential.type is CredentialType.CCCD
    if credential.problem is None:
        assert credential.identity == number.encode()
    else:
        assert credential.identity == b"" and number not in credential.detail
