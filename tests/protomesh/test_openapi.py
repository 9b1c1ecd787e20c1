"""The OpenAPI document generated from the protos' google.api.http bindings: valid against the
OpenAPI schema (3.1 and 3.0, offline), and saying what the transcoder actually does."""
from __future__ import annotations

import json

import pytest
from openapi_spec_validator import validate

from protomesh.openapi import openapi_document
from sidecar.transcode import Transcoder
from tests.sidecar.transcode.protoset import DEMO_SERVICES, LIBRARY_SERVICE, demo_set, library_set

SCHEMAS = "#/components/schemas/"


def params(op) -> dict[str, dict]:
    return {(p["in"], p["name"]): p for p in op.get("parameters", [])}


@pytest.mark.parametrize("version", ["3.1.0", "3.0.3"])
@pytest.mark.parametrize("which", ["demo", "library"])
def test_documents_are_valid(version, which):
    fds, services = (demo_set(True), DEMO_SERVICES) if which == "demo" else (library_set(True), [LIBRARY_SERVICE])
    doc = openapi_document(fds, services, servers=["http://127.0.0.1:8080"], openapi_version=version)
    validate(json.loads(json.dumps(doc)))   # what /openapi.json serves
    assert doc["openapi"] == version and doc["servers"] == [{"url": "http://127.0.0.1:8080"}]
    # Every binding the transcoder serves is documented, at its method.
    t = Transcoder.from_descriptor_set(fds, services)
    ops = {op["x-grpc-method"] + " " + m.upper() for item in doc["paths"].values() for m, op in item.items()}
    assert ops == {f"{b.grpc_path} {b.http_method}" for b in t.bindings}


def test_demo_users_paths():
    doc = openapi_document(demo_set(True), DEMO_SERVICES)
    get_user = doc["paths"]["/v1/users/{id}"]["get"]
    assert params(get_user)[("path", "id")]["required"] is True
    assert get_user["summary"].startswith("Unary. Unknown ids fail with NOT_FOUND")
    assert get_user["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": SCHEMAS + "demo.users.v1.User"}
    assert get_user["responses"]["default"]["content"]["application/json"]["schema"] == {"$ref": SCHEMAS + "google.rpc.Status"}
    status = doc["components"]["schemas"]["google.rpc.Status"]
    assert set(status["properties"]) == {"code", "message", "details"}

    stream = doc["paths"]["/v1/users"]["get"]
    assert params(stream)[("query", "pageSize")]["schema"] == {"type": "integer", "format": "int32"}
    content = stream["responses"]["200"]["content"]
    assert set(content) == {"application/x-ndjson", "text/event-stream"}
    assert content["application/x-ndjson"]["schema"] == {"$ref": SCHEMAS + "demo.users.v1.User"}

    batch = doc["paths"]["/v1/users:batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert batch["type"] == "array" and batch["items"] == {"$ref": SCHEMAS + "demo.users.v1.CreateUserRequest"}
    products = doc["paths"]["/v1/products"]
    assert products["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "type": "array", "items": {"$ref": SCHEMAS + "demo.products.v1.Product"}}
    assert products["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": SCHEMAS + "demo.products.v1.Product"}
    user = doc["components"]["schemas"]["demo.users.v1.User"]
    assert set(user["properties"]) == {"id", "name", "email", "servedBy"}
    assert doc["components"]["schemas"]["demo.orders.v1.Order"]["properties"]["totalCents"]["type"] == "string"


def test_library_paths_and_schemas():
    doc = openapi_document(library_set(), [LIBRARY_SERVICE])
    paths, schemas = doc["paths"], doc["components"]["schemas"]
    # {name=shelves/*/books/*}: one placeholder with a pattern; the PATCH on {book.name=...} shares the path.
    item = paths["/v1/{name}"]
    assert set(item) == {"get", "patch", "delete"}
    assert params(item["get"])[("path", "name")]["schema"]["pattern"] == "^shelves/[^/]+/books/[^/]+$"
    assert "book.name" in params(item["patch"])[("path", "name")]["description"]
    assert paths["/v1/books/{name}"]["get"]["operationId"] == "txtest.v1.Library.GetBook_2"
    assert params(paths["/v1/files/{path}"]["get"])[("path", "path")]["schema"]["pattern"] == "^.*$"
    assert "/v1/files/{path}:upload" in paths and "/v1/books:search" in paths

    search = params(paths["/v1/books:search"]["get"])
    assert search[("query", "tags")]["schema"] == {"type": "array", "items": {"type": "string"}}
    assert search[("query", "tags")]["explode"] is True
    assert search[("query", "genres")]["schema"]["items"] == {"$ref": SCHEMAS + "txtest.v1.Genre"}
    assert search[("query", "filter.minPages")]["schema"]["type"] == "string"
    assert search[("query", "filter.publishedAfter")]["schema"]["format"] == "date-time"
    assert search[("query", "filter.range.token")]["schema"]["format"] == "byte"
    assert search[("query", "filter.minRating")]["schema"]["type"] == ["integer", "null"]
    assert not any(name.startswith("labels") for _, name in search)          # maps cannot come from a query
    # Path- and body-bound fields are not query parameters.
    create = params(paths["/v1/{parent}/books"]["post"])
    assert set(create) == {("path", "parent"), ("query", "requestId")}
    assert params(paths["/v1/{name}"]["patch"]).keys() == {("path", "name"), ("query", "updateMask")}
    assert "parameters" not in paths["/v1/echo"]["post"]

    assert paths["/v1/files/{path}"]["get"]["responses"]["200"]["content"] == {
        "*/*": {"schema": {"type": "string", "format": "binary"}}}
    assert set(paths["/v1/raw"]["put"]["requestBody"]["content"]) == {"*/*"}
    assert set(paths["/v1/files/{path}:upload"]["post"]["requestBody"]["content"]) == {"*/*"}
    assert paths["/v1/authors/{id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": SCHEMAS + "txtest.v1.Author"}
    assert "head" in paths["/v1/ping"]

    book = schemas["txtest.v1.Book"]["properties"]
    assert book["pages"]["type"] == "string" and book["isbn"]["format"] == "uint64"
    assert book["createTime"]["format"] == "date-time" and book["readTime"]["pattern"].endswith("s$")
    assert book["counters"] == {"type": "object", "additionalProperties": {"type": "string", "format": "int64",
                                                                           "pattern": "^-?[0-9]+$"}}
    assert book["related"]["items"] == {"$ref": SCHEMAS + "txtest.v1.Book"}          # recursion by $ref
    assert book["attachment"] == {"$ref": SCHEMAS + "google.protobuf.Any"}
    assert book["metadata"]["type"] == "object" and book["cover"]["format"] == "byte"
    assert schemas["txtest.v1.Genre"]["enum"] == ["GENRE_UNSPECIFIED", "FICTION", "SCIENCE", "POETRY"]
    assert "google.api.HttpBody" not in schemas


def test_openapi_30_uses_nullable():
    doc = openapi_document(library_set(), [LIBRARY_SERVICE], openapi_version="3.0.3")
    rating = doc["components"]["schemas"]["txtest.v1.Book"]["properties"]["rating"]
    assert rating == {"type": "integer", "format": "int32", "nullable": True}
    with pytest.raises(ValueError):
        openapi_document(library_set(), [LIBRARY_SERVICE], openapi_version="2.0")


def test_the_validator_would_catch_a_broken_document():
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
    doc = openapi_document(demo_set(), DEMO_SERVICES)
    del doc["paths"]["/v1/users/{id}"]["get"]["parameters"]           # {id} left undeclared
    with pytest.raises(OpenAPIValidationError):
        validate(doc)
