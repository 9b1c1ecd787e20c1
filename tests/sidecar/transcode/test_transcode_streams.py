"""Server-streaming replies as NDJSON lines or SSE events, raw HttpBody chunks, and the error frame."""
from __future__ import annotations

import json

import pytest

from sidecar.transcode import NDJSON, SSE, Transcoder
from tests.sidecar.transcode.protoset import LIBRARY_SERVICE, library_classes, library_set

L = library_classes()


@pytest.fixture(scope="module")
def tc() -> Transcoder:
    return Transcoder.from_descriptor_set(library_set(), [LIBRARY_SERVICE])


def test_ndjson_and_sse_frames(tc):
    m = tc.match("GET", "/v1/shelves/s1/books:watch")
    assert m.server_streaming and not m.client_streaming
    books = [L.Book(name="a", pages=1), L.Book(name="b", title="line\nbreak")]
    nd = b"".join(tc.stream_frame(m, b.SerializeToString(), sse=False) for b in books)
    assert tc.stream_content_type(m, sse=False) == NDJSON
    assert nd == b'{"name":"a","pages":"1"}\n{"name":"b","title":"line\\nbreak"}\n'
    assert [json.loads(line) for line in nd.splitlines()] == [{"name": "a", "pages": "1"},
                                                               {"name": "b", "title": "line\nbreak"}]
    sse = b"".join(tc.stream_frame(m, b.SerializeToString(), sse=True) for b in books)
    assert tc.stream_content_type(m, sse=True) == SSE
    assert sse == b'data: {"name":"a","pages":"1"}\n\ndata: {"name":"b","title":"line\\nbreak"}\n\n'


def test_pretty_printing_never_breaks_frames():
    from sidecar.transcode import PrintOptions
    t = Transcoder.from_descriptor_set(library_set(), [LIBRARY_SERVICE], print_options=PrintOptions(add_whitespace=True))
    m = t.match("GET", "/v1/shelves/s1/books:watch")
    assert t.stream_frame(m, L.Book(name="a").SerializeToString(), sse=False) == b'{"name":"a"}\n'
    assert b"\n  " in t.response_body(t.match("GET", "/v1/authors/x"),
                                      L.GetAuthorResponse(author=L.Author(id="x")).SerializeToString())[1]


def test_error_frames(tc):
    line = tc.stream_error_frame(14, "upstream went away", sse=False)
    assert json.loads(line) == {"error": {"code": 14, "message": "upstream went away", "details": []}}
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    event = tc.stream_error_frame(14, "gone", sse=True)
    assert event == b'event: error\ndata: {"error":{"code":14,"message":"gone","details":[]}}\n\n'


def test_http_body_stream_is_raw(tc):
    # An rpc streaming HttpBody is one long raw body; the frames are its chunks, unframed.
    from tests.sidecar.transcode.protoset import compile_set
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "dl.proto").write_text(
            'syntax = "proto3"; package dl.v1; import "google/api/annotations.proto"; import "google/api/httpbody.proto";\n'
            'message R { string id = 1; }\n'
            'service D { rpc Get(R) returns (stream google.api.HttpBody) { option (google.api.http) = { get: "/d/{id}" }; } }\n')
        t = Transcoder.from_descriptor_set(compile_set(["dl.proto"], [tmp]), ["dl.v1.D"])
    m = t.match("GET", "/d/1")
    chunk = L.__getattr__("google.api.HttpBody")(content_type="text/csv", data=b"a,b\n")
    assert t.stream_frame(m, chunk.SerializeToString(), sse=False) == b"a,b\n"
    assert t.response_body(m, chunk.SerializeToString()) == ("text/csv", b"a,b\n")


def test_raw_response(tc):
    assert tc.raw_response(tc.match("GET", "/v1/files/a"))
    assert not tc.raw_response(tc.match("GET", "/v1/authors/a"))
    assert not tc.raw_response(tc.match("GET", "/v1/books:search"))
