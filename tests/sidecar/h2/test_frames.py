"""HTTP/2 frame parsing and serialising, including the errors each malformed frame must give."""
from __future__ import annotations

import pytest

from sidecar.h2 import frames as F


def test_header_round_trip():
    raw = F.frame(F.HEADERS, F.FLAG_END_HEADERS, 7, b"abc")
    assert F.parse_header(raw) == (3, F.HEADERS, F.FLAG_END_HEADERS, 7)
    assert F.parse_header(F.frame(F.DATA, 0, 0x80000001, b"")) == (0, F.DATA, 0, 1)  # R bit ignored
    big = F.data(1, b"x" * 70000)
    assert F.parse_header(big)[0] == 70000


def test_data_padding():
    payload = bytes([3]) + b"hello" + b"\0\0\0"
    assert F.strip_padding(payload, F.FLAG_PADDED, F.DATA) == (b"hello", 4)
    assert F.strip_padding(b"hello", 0, F.DATA) == (b"hello", 0)
    with pytest.raises(F.ConnectionError_) as info:
        F.strip_padding(bytes([9]) + b"abc", F.FLAG_PADDED, F.DATA)
    assert info.value.code == F.PROTOCOL_ERROR
    with pytest.raises(F.ConnectionError_):
        F.strip_padding(b"", F.FLAG_PADDED, F.DATA)


def test_headers_with_padding_and_priority():
    prio = (5).to_bytes(4, "big") + b"\x10"
    payload = bytes([2]) + prio + b"block" + b"\0\0"
    assert F.headers_fragment(payload, F.FLAG_PADDED | F.FLAG_PRIORITY, 3) == b"block"
    with pytest.raises(F.StreamError) as info:
        F.headers_fragment((3).to_bytes(4, "big") + b"\x10x", F.FLAG_PRIORITY, 3)
    assert info.value.code == F.PROTOCOL_ERROR and info.value.stream_id == 3
    with pytest.raises(F.ConnectionError_):
        F.headers_fragment(b"\0\0", F.FLAG_PRIORITY, 3)


def test_headers_split_into_continuations():
    block = bytes(range(256)) * 100  # 25600 octets
    raw = F.headers(1, block, True, max_frame=16384)
    first = F.parse_header(raw)
    assert first == (16384, F.HEADERS, F.FLAG_END_STREAM, 1)
    second = F.parse_header(raw, 9 + 16384)
    assert second == (25600 - 16384, F.CONTINUATION, F.FLAG_END_HEADERS, 1)
    assert raw[9:9 + 16384] + raw[18 + 16384:] == block


def test_settings():
    raw = F.settings([(F.SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20), (F.SETTINGS_MAX_CONCURRENT_STREAMS, 9), (99, 1)])
    length, ftype, flags, sid = F.parse_header(raw)
    assert (ftype, flags, sid, length) == (F.SETTINGS, 0, 0, 18)
    assert F.parse_settings(raw[9:], 0) == [(4, 1 << 20), (3, 9), (99, 1)]
    assert F.parse_settings(b"", F.FLAG_ACK) == []


@pytest.mark.parametrize("payload,flags,code", [
    (b"\0\x04\0\0\0", 0, F.FRAME_SIZE_ERROR),  # not a multiple of 6
    (b"\0\x02\0\0\0\x02", 0, F.PROTOCOL_ERROR),  # ENABLE_PUSH 2
    (b"\0\x04\x80\0\0\0", 0, F.FLOW_CONTROL_ERROR),  # window above 2^31-1
    (b"\0\x05\0\0\x10\0", 0, F.PROTOCOL_ERROR),  # max frame 4096 < 16384
    (b"\0\x05\x01\0\0\0", 0, F.PROTOCOL_ERROR),  # max frame 2^24
    (b"\0\x03\0\0\0\x01", F.FLAG_ACK, F.FRAME_SIZE_ERROR),  # ACK with a payload
])
def test_bad_settings(payload, flags, code):
    with pytest.raises(F.ConnectionError_) as info:
        F.parse_settings(payload, flags)
    assert info.value.code == code


def test_window_update_rst_goaway_ping():
    assert F.parse_window_update(F.window_update(1, 1000)[9:], 1) == 1000
    with pytest.raises(F.StreamError):
        F.parse_window_update(b"\0\0\0\0", 1)
    with pytest.raises(F.ConnectionError_) as info:
        F.parse_window_update(b"\0\0\0\0", 0)
    assert info.value.code == F.PROTOCOL_ERROR
    with pytest.raises(F.ConnectionError_) as info:
        F.parse_window_update(b"\0\0\0", 0)
    assert info.value.code == F.FRAME_SIZE_ERROR
    assert F.parse_rst_stream(F.rst_stream(3, F.CANCEL)[9:]) == F.CANCEL
    with pytest.raises(F.ConnectionError_):
        F.parse_rst_stream(b"\0")
    assert F.parse_goaway(F.goaway(7, F.ENHANCE_YOUR_CALM, b"slow down")[9:]) == (7, F.ENHANCE_YOUR_CALM, b"slow down")
    with pytest.raises(F.ConnectionError_):
        F.parse_goaway(b"\0" * 7)
    F.check_ping(F.ping(b"12345678")[9:])
    with pytest.raises(F.ConnectionError_):
        F.check_ping(b"1234")
    with pytest.raises(F.StreamError):
        F.check_priority((1).to_bytes(4, "big") + b"\0", 1)


def test_error_names_the_code():
    err = F.ConnectionError_(F.FLOW_CONTROL_ERROR, "peer exceeded the connection window")
    assert "FLOW_CONTROL_ERROR" in str(err) and err.code == 3
