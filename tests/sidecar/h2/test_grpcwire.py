"""gRPC message framing on a stream: split at any byte boundary, limits, compression refused."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.h2.grpcwire import Deframer, MessageError, frame_message


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(1, 64), min_size=1, max_size=50))
def test_messages_survive_any_split(messages, cuts):
    wire = b"".join(map(frame_message, messages))
    d = Deframer()
    got, i, k = [], 0, 0
    while i < len(wire):
        step = cuts[k % len(cuts)]
        got += d.feed(wire[i:i + step])
        i += step
        k += 1
    assert got == messages
    assert d.pending == 0


def test_truncated_message_is_pending():
    d = Deframer()
    assert d.feed(frame_message(b"hello")[:-1]) == []
    assert d.pending == 9


def test_oversized_message_is_refused_before_it_arrives():
    d = Deframer(max_message=10)
    with pytest.raises(MessageError) as err:
        d.feed(b"\x00" + (11).to_bytes(4, "big"))
    assert err.value.code == 8 and "exceeds the limit of 10" in str(err.value)


def test_compressed_message_is_refused():
    with pytest.raises(MessageError) as err:
        Deframer().feed(b"\x01\x00\x00\x00\x01x")
    assert err.value.code == 12
