"""The transcoding table the issue asks for: HTTP request → gRPC method + request message, and
gRPC reply or status → HTTP status, content type and body."""
from __future__ import annotations

import base64
import json

import pytest
from google.protobuf import json_format, message_factory

from sidecar.transcode import Transcoder, TranscodeError
from tests.sidecar.transcode.protoset import LIBRARY_SERVICE, library_classes, library_set

L = library_classes()


@pytest.fixture(scope="module")
def tc() -> Transcoder:
    return Transcoder.from_descriptor_set(library_set(), [LIBRARY_SERVICE])


def transcode(tc, method, target, body=b"", content_type="application/json"):
    path, _, query = target.partition("?")
    m = tc.match(method, path)
    assert m is not None, f"{method} {path} did not match"
    data = tc.request_message(m, query, body, content_type)
    cls = message_factory.GetMessageClass(tc.pool.FindMessageTypeByName(m.binding.input_type))
    return m, json_format.MessageToDict(cls.FromString(data), preserving_proto_field_name=True, descriptor_pool=tc.pool)


REQUESTS = [
    # GET with path variables (a multi-segment one, and an additional binding)
    ("GET", "/v1/shelves/s1/books/b2", b"", "GetBook", {"name": "shelves/s1/books/b2"}),
    ("GET", "/v1/books/b%2F2", b"", "GetBook", {"name": "b/2"}),
    ("GET", "/v1/shelves/s1/books/b2?readMask=title,authors", b"", "GetBook",
     {"name": "shelves/s1/books/b2", "read_mask": "title,authors"}),
    ("GET", "/v1/shelves/s1/books/b2?read_mask=title", b"", "GetBook",
     {"name": "shelves/s1/books/b2", "read_mask": "title"}),
    # POST with body: a field, plus path and query
    ("POST", "/v1/shelves/s1/books?requestId=r-1", b'{"title": "Dune", "pages": "412", "genre": "FICTION"}',
     "CreateBook", {"parent": "shelves/s1", "request_id": "r-1",
                    "book": {"title": "Dune", "pages": "412", "genre": "FICTION"}}),
    # a nested path field inside the body field overrides the body
    ("PATCH", "/v1/shelves/s1/books/b2?updateMask=title", b'{"name": "ignored", "title": "New"}', "UpdateBook",
     {"book": {"name": "shelves/s1/books/b2", "title": "New"}, "update_mask": "title"}),
    ("DELETE", "/v1/shelves/s1/books/b2?force=true", b"", "DeleteBook", {"name": "shelves/s1/books/b2", "force": True}),
    # query mapping: repeated by repeated keys, nested by dots, enums by name or number, WKTs
    ("GET", "/v1/books:search?query=a+b&tags=x&tags=y&genres=FICTION&genres=2&pageSize=10&ids=1&ids=9007199254740993",
     b"", "SearchBooks", {"query": "a b", "tags": ["x", "y"], "genres": ["FICTION", "SCIENCE"], "page_size": 10,
                          "ids": ["1", "9007199254740993"]}),
    ("GET", "/v1/books:search?filter.minPages=100&filter.in_print=false&filter.range.low=1.5&filter.range.token=AAEC"
            "&filter.publishedAfter=2024-01-02T03:04:05Z&filter.maxReadTime=3600s&filter.minRating=4", b"",
     "SearchBooks", {"filter": {"min_pages": "100", "published_after": "2024-01-02T03:04:05Z",
                                "max_read_time": "3600s", "min_rating": 4, "range": {"low": 1.5, "token": "AAEC"}}}),
    ("GET", "/v1/books:search?filter.publishedAfter=2024-01-02T03:04:05%2B02:00", b"", "SearchBooks",
     {"filter": {"published_after": "2024-01-02T01:04:05Z"}}),
    # "**" keeps slashes; verb after "**"; HttpBody into a field, raw
    ("GET", "/v1/files/docs/a%20b/c.txt", b"", "GetFile", {"path": "docs/a b/c.txt"}),
    ("POST", "/v1/files/up/x.bin:upload", b"\x00\x01raw", "UploadFile",
     {"path": "up/x.bin", "file": {"content_type": "application/octet-stream", "data": "AAFyYXc="}}),
    ("PUT", "/v1/raw", b"<p>hi</p>", "PutRaw", {"content_type": "text/html", "data": base64.b64encode(b"<p>hi</p>").decode()}),
    ("HEAD", "/v1/ping", b"", "Ping", {}),
    ("GET", "/v1/shelves/s%201/books:watch?limit=2", b"", "WatchShelf", {"shelf": "s 1", "limit": 2}),
]
RAW_CONTENT_TYPES = {"/v1/raw": "text/html", "/v1/files/up/x.bin:upload": "application/octet-stream"}


@pytest.mark.parametrize("method, target, body, rpc, expected", REQUESTS, ids=[f"{r[0]} {r[1]}" for r in REQUESTS])
def test_request_table(tc, method, target, body, rpc, expected):
    ctype = RAW_CONTENT_TYPES.get(target, "application/json")
    m, got = transcode(tc, method, target, body, ctype)
    assert m.grpc_path == f"/txtest.v1.Library/{rpc}"
    assert got == expected


def test_body_star_every_json_mapping(tc):
    book = {
        "name": "n", "title": "T", "authors": ["a", "b"], "genre": 3, "pages": 7,
        "createTime": "2024-05-06T07:08:09.123Z", "readTime": "1.5s",
        "metadata": {"k": [1, "two", None, {"deep": True}]}, "extra": "just a string",
        "attachment": {"@type": "type.googleapis.com/txtest.v1.Author", "id": "a1", "displayName": "Ann"},
        "rating": 5, "inPrint": False, "counters": {"reads": "10"}, "cover": "AP8=", "author": {"display_name": "Bo"},
        "price": "NaN", "isbn": "18446744073709551615", "related": [{"title": "R"}],
    }
    _, got = transcode(tc, "POST", "/v1/echo", json.dumps(book).encode())
    assert got == {
        "name": "n", "title": "T", "authors": ["a", "b"], "genre": "POETRY", "pages": "7",
        "create_time": "2024-05-06T07:08:09.123Z", "read_time": "1.500s",
        "metadata": {"k": [1.0, "two", None, {"deep": True}]}, "extra": "just a string",
        "attachment": {"@type": "type.googleapis.com/txtest.v1.Author", "id": "a1", "display_name": "Ann"},
        "rating": 5, "in_print": False, "counters": {"reads": "10"}, "cover": "AP8=", "author": {"display_name": "Bo"},
        "price": "NaN", "isbn": "18446744073709551615", "related": [{"title": "R"}],
    }
    # And back: the reply printed as canonical proto3 JSON (lowerCamelCase, int64 as strings).
    m = tc.match("POST", "/v1/echo")
    reply = message_factory.GetMessageClass(tc.pool.FindMessageTypeByName("txtest.v1.Book"))()
    json_format.ParseDict(book, reply, descriptor_pool=tc.pool)
    ctype, body = tc.response_body(m, reply.SerializeToString())
    assert ctype == "application/json"
    out = json.loads(body)
    assert out["createTime"] == "2024-05-06T07:08:09.123Z" and out["readTime"] == "1.500s"
    assert out["pages"] == "7" and out["isbn"] == "18446744073709551615" and out["genre"] == "POETRY"
    assert out["attachment"] == {"@type": "type.googleapis.com/txtest.v1.Author", "id": "a1", "displayName": "Ann"}
    assert out["inPrint"] is False and out["rating"] == 5 and out["counters"] == {"reads": "10"}


@pytest.mark.parametrize("method, target, body, status, fragment", [
    ("POST", "/v1/echo", b"{not json", 400, "malformed JSON"),
    ("POST", "/v1/echo", b'{"nope": 1}', 400, "nope"),
    ("POST", "/v1/echo", b'{"pages": "x"}', 400, "pages"),
    ("POST", "/v1/echo", b'{"pages": 1, "pages": 2}', 400, "duplicate key"),
    ("POST", "/v1/echo", b'{"price": NaN}', 400, "NaN"),
    ("POST", "/v1/echo", b"[1, 2]", 400, "JSON object"),
    ("POST", "/v1/echo", b'{"createTime": "yesterday"}', 400, "createTime"),
    ("POST", "/v1/echo", b'{"attachment": {"@type": "type.googleapis.com/no.Such", "x": 1}}', 400, "no.Such"),
    ("POST", "/v1/echo", b"\xff\xfe\x00", 400, "malformed JSON"),
    ("GET", "/v1/books:search?unknown=1", b"", 400, "unknown"),
    ("GET", "/v1/books:search?pageSize=ten", b"", 400, "page_size"),
    ("GET", "/v1/books:search?pageSize=1&pageSize=2", b"", 400, "more than once"),
    ("GET", "/v1/books:search?filter=x", b"", 400, "only primitive fields"),
    ("GET", "/v1/books:search?labels.a=b", b"", 400, "labels.a"),
    ("GET", "/v1/books:search?labels=b", b"", 400, "only primitive fields"),
    ("GET", "/v1/books:search?genres=NOVEL", b"", 400, "NOVEL"),
    ("GET", "/v1/books:search?filter.inPrint=maybe", b"", 400, "not a bool"),
    ("GET", "/v1/books:search?filter.range.low=high", b"", 400, "not a number"),
    ("GET", "/v1/books:search?query=%FF", b"", 400, "UTF-8"),
    ("GET", "/v1/books/%FF", b"", 400, "UTF-8"),
    ("GET", "/v1/shelves/s1/books/b2?name=other", b"", 400, "bound by the path"),
    ("POST", "/v1/shelves/s1/books?book.title=x", b"{}", 400, "bound by the request body"),
    ("POST", "/v1/echo?title=x", b"{}", 400, "bound by the request body"),
])
def test_request_errors(tc, method, target, body, status, fragment):
    with pytest.raises(TranscodeError) as err:
        transcode(tc, method, target, body)
    assert err.value.http_status == status
    assert fragment in err.value.message


def test_unknown_query_parameters_can_be_ignored():
    lax = Transcoder.from_descriptor_set(library_set(), [LIBRARY_SERVICE], ignore_unknown_query_parameters=True)
    _, got = transcode(lax, "GET", "/v1/books:search?utm_source=x&query=q")
    assert got == {"query": "q"}
    listed = Transcoder.from_descriptor_set(library_set(), [LIBRARY_SERVICE], ignored_query_parameters=["api_key"])
    _, got = transcode(listed, "GET", "/v1/books:search?api_key=s3cret&query=q")
    assert got == {"query": "q"}
    with pytest.raises(TranscodeError):
        transcode(listed, "GET", "/v1/books:search?other=1")


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/shelves/s1/books"), ("POST", "/v1/shelves/s1/books/b2"), ("GET", "/v2/books/b"),
    ("POST", "/v1/files/x"), ("GET", "/v1/ping"), ("GET", "/v1/authors"),
])
def test_no_match(tc, method, path):
    assert tc.match(method, path) is None


def test_allowed_methods(tc):
    assert tc.allowed_methods("/v1/shelves/s1/books/b2") == ["DELETE", "GET", "PATCH"]


def test_response_body_field_and_http_body(tc):
    search = tc.match("GET", "/v1/books:search")
    reply = L.SearchBooksResponse(books=[L.Book(title="A", pages=3)], next_page_token="t")
    assert tc.response_body(search, reply.SerializeToString()) == ("application/json", b'[{"title":"A","pages":"3"}]')
    assert tc.response_body(search, b"") == ("application/json", b"[]")
    author = tc.match("GET", "/v1/authors/a1")
    reply = L.GetAuthorResponse(author=L.Author(id="a1", display_name="Ann"), etag="e")
    assert tc.response_body(author, reply.SerializeToString()) == ("application/json", b'{"id":"a1","displayName":"Ann"}')
    f = tc.match("GET", "/v1/files/a/b.png")
    raw = L.__getattr__("google.api.HttpBody")(content_type="image/png", data=b"\x89PNG")
    assert tc.response_body(f, raw.SerializeToString()) == ("image/png", b"\x89PNG")
    assert tc.response_body(f, b"") == ("application/octet-stream", b"")
    ping = tc.match("HEAD", "/v1/ping")
    assert tc.response_body(ping, b"") == ("application/json", b"{}")


def test_print_options():
    from sidecar.transcode import PrintOptions
    opts = PrintOptions(always_print_primitive_fields=True, always_print_enums_as_ints=True,
                        preserve_proto_field_names=True)
    t = Transcoder.from_descriptor_set(library_set(), [LIBRARY_SERVICE], print_options=opts)
    m = t.match("GET", "/v1/authors/x")
    body = json.loads(t.response_body(m, L.GetAuthorResponse(author=L.Author(id="x")).SerializeToString())[1])
    assert body == {"id": "x", "display_name": ""}
    m = t.match("POST", "/v1/echo")
    body = json.loads(t.response_body(m, L.Book(genre=2).SerializeToString())[1])
    assert body["genre"] == 2 and body["pages"] == "0" and body["authors"] == [] and "create_time" not in body


def test_bad_upstream_bytes(tc):
    m = tc.match("POST", "/v1/echo")
    with pytest.raises(TranscodeError) as err:
        tc.response_body(m, b"\xff\xff\xff")
    assert err.value.http_status == 502


@pytest.mark.parametrize("code, http", [
    (0, 200), (1, 499), (2, 500), (3, 400), (4, 504), (5, 404), (6, 409), (7, 403), (8, 429), (9, 400),
    (10, 409), (11, 400), (12, 501), (13, 500), (14, 503), (15, 500), (16, 401), (99, 500),
])
def test_error_codes(tc, code, http):
    status, ctype, body = tc.error_body(code, "why")
    assert (status, ctype) == (http, "application/json")
    assert json.loads(body) == {"code": code, "message": "why", "details": []}


def test_error_details_from_status_details_bin(tc):
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2
    info, unknown = any_pb2.Any(), any_pb2.Any(type_url="type.googleapis.com/acme.Secret", value=b"\x01")
    info.Pack(error_details_pb2.ErrorInfo(reason="QUOTA", domain="protomesh.dev", metadata={"k": "v"}))
    bad = any_pb2.Any()
    bad.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="id", description="empty")]))
    st = status_pb2.Status(code=3, message="bad", details=[info, bad, unknown])
    status, _, body = tc.error_body(3, "bad", st.SerializeToString())
    assert status == 400
    assert json.loads(body)["details"] == [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "QUOTA", "domain": "protomesh.dev",
         "metadata": {"k": "v"}},
        {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": "id", "description": "empty"}]},
        {"@type": "type.googleapis.com/acme.Secret", "value": "AQ=="},
    ]
    # Garbage in grpc-status-details-bin never breaks the error reply.
    assert json.loads(tc.error_body(13, "x", b"\xff\xff")[2]) == {"code": 13, "message": "x", "details": []}


def test_plus_in_query_can_stay_a_plus():
    literal = Transcoder.from_descriptor_set(library_set(), [LIBRARY_SERVICE], query_param_unescape_plus=False)
    _, got = transcode(literal, "GET", "/v1/books:search?query=c++%20x")
    assert got == {"query": "c++ x"}
