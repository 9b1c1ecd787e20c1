"""Path templates: the grammar of google/api/http.proto, matching and percent-decoding."""
from __future__ import annotations

import pytest

from sidecar.transcode.errors import TranscodeConfigError
from sidecar.transcode.template import PathTemplate


@pytest.mark.parametrize("template, path, expected", [
    ("/v1/users/{id}", "/v1/users/42", {"id": "42"}),
    ("/v1/users/{id}", "/v1/users/42/x", None),
    ("/v1/users/{id}", "/v1/users/", None),                       # "*" needs a non-empty segment
    ("/v1/users/{id}", "/v1/users", None),
    ("/v1/users/{id}", "/v1/users/a%20b%2Fc", {"id": "a b/c"}),     # one segment: fully decoded
    ("/v1/users/{id}", "/v1/users/caf%C3%A9", {"id": "café"}),
    ("/v1/{name=shelves/*/books/*}", "/v1/shelves/s1/books/b2", {"name": "shelves/s1/books/b2"}),
    ("/v1/{name=shelves/*/books/*}", "/v1/shelves/s1/books", None),
    ("/v1/{name=shelves/*/books/*}", "/v1/shelfs/s1/books/b2", None),
    ("/v1/{name=shelves/*}/b/{id}", "/v1/shelves/a%2Fb/b/7", {"name": "shelves/a%2Fb", "id": "7"}),  # %2F kept
    ("/v1/{name=shelves/*}/b/{id}", "/v1/shelves/a%20b/b/7", {"name": "shelves/a b", "id": "7"}),
    ("/v1/files/{path=**}", "/v1/files/a/b/c.txt", {"path": "a/b/c.txt"}),
    ("/v1/files/{path=**}", "/v1/files", {"path": ""}),            # "**" matches zero segments
    ("/v1/files/{path=**}", "/v1/files/", {"path": ""}),
    ("/v1/files/{path=**}:upload", "/v1/files/x/y:upload", {"path": "x/y"}),
    ("/v1/files/{path=**}:upload", "/v1/files/x/y", None),
    ("/v1/users:batch", "/v1/users:batch", {}),
    ("/v1/users:batch", "/v1/users", None),
    ("/v1/users/{user.id}/orders/{order_id}", "/v1/users/u/orders/o", {"user.id": "u", "order_id": "o"}),
    ("/v1/*/x", "/v1/anything/x", {}),
    ("/v1/*/x", "/v1//x", None),
    ("/v1/{name=projects/*/**}", "/v1/projects/p/a/b", {"name": "projects/p/a/b"}),
    ("/v1/users", "/v1/us%65rs", {}),                               # literals compare decoded
    ("/v1/users", "v1/users", None),
])
def test_match(template, path, expected):
    assert PathTemplate.parse(template).match(path) == expected


@pytest.mark.parametrize("template, reason", [
    ("v1/users", "must start with '/'"),
    ("/v1/{id", "expected '=' or '}'"),
    ("/v1/{id=a", "unexpected end"),
    ("/v1/{}", "expected a field name"),
    ("/v1/{a=b/{c}}", "nested variable"),
    ("/v1/**/x", "'**' must be the last segment"),
    ("/v1/{a}/{a}", "bound twice"),
    ("/v1//x", "empty segment"),
    ("/v1/x:", "empty verb"),
    ("/v1/{9a}", "expected a field name"),
    ("/v1/a}", "unexpected '}'"),
])
def test_parse_errors(template, reason):
    with pytest.raises(TranscodeConfigError) as err:
        PathTemplate.parse(template, "users.proto: Users.Get")
    assert reason in str(err.value)
    assert err.value.where == "users.proto: Users.Get"


def test_specificity_prefers_literals_and_verbs():
    a = PathTemplate.parse("/v1/users/{id}")
    b = PathTemplate.parse("/v1/users/me")
    c = PathTemplate.parse("/v1/{name=**}")
    d = PathTemplate.parse("/v1/{name=users/*}:activate")
    ordered = sorted([a, b, c, d], key=PathTemplate.specificity, reverse=True)
    assert [t.text for t in ordered] == [d.text, b.text, a.text, c.text]


def test_openapi_path_and_shape():
    t = PathTemplate.parse("/v1/{book.name=shelves/*/books/*}:read")
    assert t.openapi_path() == "/v1/{book.name}:read"
    assert t.shape() == "/v1/shelves/*/books/*:read"
    assert PathTemplate.parse("/v1/*/x/**").openapi_path() == "/v1/{_wildcard1}/x/{_wildcard2}"
    assert PathTemplate.parse("/v1/*/{a.b=x/*}/**").placeholders() == ["_wildcard1", "a.b", "_wildcard2"]
    assert PathTemplate.parse("/v1/{a}/*").openapi_path({"a": "x", "_wildcard1": "y"}) == "/v1/{x}/{y}"
