"""Every parser, through the gate's reader, on arbitrary bytes: a credential or a reason, never a raise."""

import logging

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scanner import credentials
from scanner.bench.fuzz import NOW, ParserErrorCounter, samples
from scanner.models import Credential, Reason

PAYLOADS, TRUST = samples()
READER = credentials.reader_for(pass_trust=TRUST.pass_trust, dcc_trust=TRUST.dcc_trust)
PREFIXES = [b"", b"HC1:", b"GP1:", b"gp1:", b"079190001234|", *PAYLOADS.values()]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(PREFIXES), tail=st.binary(max_size=600), cut=st.integers(0, 400))
def test_reader_never_raises_and_always_explains(prefix, tail, cut):
    payload = prefix[:cut] + tail if cut < len(prefix) else prefix + tail
    counter = ParserErrorCounter()
    logging.getLogger("scanner").addHandler(counter)
    try:
        credential = READER.parse(payload, NOW)
    finally:
        logging.getLogger("scanner").removeHandler(counter)
    assert isinstance(credential, Credential)
    assert credential.problem is None or isinstance(credential.problem, Reason)
    assert counter.count == 0, "a parser raised (the reader caught it)"


def test_the_seeds_are_valid():
    for kind, payload in PAYLOADS.items():
        credential = READER.parse(payload, NOW)
        assert credential.problem is None and credential.type.value == kind, (kind, credential)
