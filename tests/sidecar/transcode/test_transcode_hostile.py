"""Hostile bodies and query strings get a 4xx with a reason — never a crash or a long hang."""
from __future__ import annotations

import pytest

from sidecar.transcode import Transcoder, TranscodeError
from tests.sidecar.transcode.protoset import LIBRARY_SERVICE, library_set


@pytest.fixture(scope="module")
def tc() -> Transcoder:
    return Transcoder.from_descriptor_set(library_set(), [LIBRARY_SERVICE], max_body_bytes=1 << 20, max_json_depth=32)


def nested(depth: int, key: str = "a") -> bytes:
    return (b'{"%s":' % key.encode()) * depth + b"1" + b"}" * depth


def rejected(tc, target: str, body: bytes, ctype: str = "application/json") -> TranscodeError:
    path, _, query = target.partition("?")
    m = tc.match("POST" if body or path == "/v1/echo" else "GET", path)
    with pytest.raises(TranscodeError) as err:
        tc.request_messages(m, query, body, ctype)
    return err.value


def test_body_over_the_size_limit(tc):
    err = rejected(tc, "/v1/echo", b'{"title": "' + b"x" * (1 << 20) + b'"}')
    assert (err.http_status, err.reason) == (413, "body_too_large")
    err = rejected(tc, "/v1/files/a:upload", b"\0" * ((1 << 20) + 1))   # raw HttpBody bodies too
    assert err.http_status == 413


@pytest.mark.parametrize("body", [
    b"[" * (4 << 20 - 1),                                   # past Python's own recursion limit
    b'{"extra": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"metadata": ' + nested(40) + b"}",                    # under the interpreter's limit, over ours
], ids=["megabyte-of-brackets", "deep-list-in-value", "deep-struct"])
def test_too_deep(tc, body):
    big = Transcoder.from_descriptor_set(library_set(), [LIBRARY_SERVICE], max_json_depth=32)  # 4 MiB limit
    err = rejected(big, "/v1/echo", body)
    assert (err.http_status, err.reason) == (400, "json_too_deep")


def test_depth_under_the_limit_is_fine(tc):
    m = tc.match("POST", "/v1/echo")
    assert tc.request_message(m, "", b'{"metadata": ' + nested(20) + b"}", "application/json")


@pytest.mark.parametrize("body, fragment", [
    (b'{"pages": ' + b"9" * 5000 + b"}", "malformed JSON"),        # int digit limit
    (b'{"pages": "' + b"9" * 30 + b'"}', "pages"),                  # out of int64 range
    (b'{"title": "\\ud800"}', "title"),                              # lone surrogate
    (b'{"createTime": "99999-01-01T00:00:00Z"}', "createTime"),
    (b'{"readTime": "999999999999999s"}', "readTime"),
    (b'{"rating": 1e400}', "rating"),
], ids=["huge-int", "int64-range", "surrogate", "timestamp-range", "duration-range", "overflow"])
def test_bad_values(tc, body, fragment):
    err = rejected(tc, "/v1/echo", body)
    assert err.http_status == 400 and fragment in err.message


def test_too_many_query_parameters(tc):
    query = "&".join(f"tags=t{i}" for i in range(1001))
    err = rejected(tc, "/v1/books:search?" + query, b"")
    assert err.http_status == 400 and err.reason == "invalid_query"


def test_client_streaming_bodies():
    from tests.sidecar.transcode.protoset import DEMO_SERVICES, demo_set
    t = Transcoder.from_descriptor_set(demo_set(), DEMO_SERVICES)
    m = t.match("POST", "/v1/users:batch")
    assert m.client_streaming
    assert t.request_messages(m, "", b'[{"name": "a"}, {"name": "b", "email": "e"}]', "application/json") == \
        [b"\n\x01a", b"\n\x01b\x12\x01e"]
    assert t.request_messages(m, "", b'{"name": "a"}', "application/json") == [b"\n\x01a"]
    assert t.request_messages(m, "", b'{"name": "a"}\n\n{"name": "b"}\n', "application/x-ndjson") == [b"\n\x01a", b"\n\x01b"]
    assert t.request_messages(m, "", b"", "application/json") == []
    with pytest.raises(TranscodeError) as err:
        t.request_messages(m, "", b'[{"name": "a"}, 7]', "application/json")
    assert "element 1" in err.value.message


def test_default_limits_accept_depth_64_in_a_struct():
    t = Transcoder.from_descriptor_set(library_set(), [LIBRARY_SERVICE])
    m = t.match("POST", "/v1/echo")
    assert t.request_message(m, "", b'{"metadata": ' + nested(63) + b"}", "application/json")
    with pytest.raises(TranscodeError):
        t.request_message(m, "", b'{"metadata": ' + nested(64) + b"}", "application/json")


def test_too_many_values_is_refused_before_protobuf_parses_them():
    t = Transcoder.from_descriptor_set(library_set(), [LIBRARY_SERVICE], max_json_values=1000)
    m = t.match("POST", "/v1/echo")
    assert t.request_message(m, "", b'{"authors": [' + b",".join([b'"a"'] * 998) + b"]}", "application/json")
    with pytest.raises(TranscodeError) as err:
        t.request_message(m, "", b'{"authors": [' + b",".join([b'"a"'] * 999) + b"]}", "application/json")
    assert (err.value.http_status, err.value.reason) == (400, "json_too_large")


def test_ndjson_stream_shares_one_value_budget():
    from tests.sidecar.transcode.protoset import DEMO_SERVICES, demo_set
    t = Transcoder.from_descriptor_set(demo_set(), DEMO_SERVICES, max_json_values=30)
    m = t.match("POST", "/v1/users:batch")
    assert len(t.request_messages(m, "", b'{"name": "a"}\n' * 15, "application/x-ndjson")) == 15
    with pytest.raises(TranscodeError, match="more than"):
        t.request_messages(m, "", b'{"name": "a"}\n' * 16, "application/x-ndjson")
