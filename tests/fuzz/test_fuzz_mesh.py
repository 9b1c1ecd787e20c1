"""Fuzz mesh.yaml parsing: whatever document a user writes, the control server answers with a
MeshError (file, field, fix) — never another exception, which would be a traceback at startup or
a crashed file watcher at runtime.

Documents come from two strategies: random YAML-shaped values built from the real field names
(so the parser goes deep), and the known-good demo mesh with one subtree replaced by junk.
"""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from control.errors import MeshError
from control.model import parse_mesh
from control.sources.protos import compile_protos
from tests.fuzz.fuzzsettings import fuzz_settings

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = str(REPO / "proto")
PROTOS = ("demo/users/v1/users.proto", "demo/orders/v1/orders.proto", "demo/products/v1/products.proto")


@lru_cache(maxsize=None)
def _compiled() -> dict:
    return compile_protos(list(PROTOS), (PROTO_ROOT,), "mesh.yaml")


def fake_compile(files, include_paths, mesh_file):
    """The real compile_protos' contract without running protoc per example: the same checks on
    its input (so a bad input breaks here exactly as it would there), cached results."""
    for f in files:
        if not any((Path(p) / f).is_file() for p in include_paths):
            raise MeshError(mesh_file, "services.*.proto", f"{f} not found under proto_paths")
    known = _compiled()
    out = {}
    for f in files:
        if f not in known:
            raise MeshError(mesh_file, "services.*.proto", f"{f} is not a demo proto (fuzz stub)")
        out[f] = known[f]
    return out


GOOD = {
    "proto_paths": [PROTO_ROOT],
    "services": {
        "users": {"protocol": "grpc", "proto": PROTOS[0], "lb": "round_robin", "timeout": "5s"},
        "orders": {"protocol": "grpc", "proto": [PROTOS[1]], "lb": "least_request"},
        "products": {"protocol": "http", "endpoints": ["127.0.0.1:9000"], "connect_timeout": "250ms"},
    },
    "gateway": {
        "http": "127.0.0.1:8080", "grpc": "127.0.0.1:8443",
        "routes": [
            {"name": "p", "match": {"path_prefix": "/v1/products", "headers": {"x-env": {"prefix": "can"}},
                                    "query": {"debug": "1"}}, "to": "products", "timeout": "2s",
             "rewrite_prefix": "/v2"},
            {"match": {"grpc_service": "demo.users.v1.Users", "grpc_method": "GetUser"}, "to": "users"},
            {"match": {"path_regex": "/c.*"}, "split": [{"to": "products", "weight": 9}, {"to": "products", "weight": 1}]},
        ],
    },
    "telemetry": {"otlp_endpoint": "http://127.0.0.1:4317", "sampling": 0.5},
}

FIELDS = ["services", "gateway", "telemetry", "proto_paths", "protocol", "proto", "lb", "timeout",
          "connect_timeout", "endpoints", "http", "grpc", "routes", "match", "to", "split", "weight",
          "name", "rewrite_prefix", "path_prefix", "path", "path_regex", "headers", "query",
          "grpc_service", "grpc_method", "exact", "prefix", "regex", "present", "otlp_endpoint",
          "sampling", "users", "products", "orders"]
VALUES = ["grpc", "http", "round_robin", "maglev", "5s", "0s", "250ms", "1m", "-1s", "1e9s", "127.0.0.1:80",
          "host:0", ":", "[::1]:80", "/", "/v1", "(", "[", "*", "demo.users.v1.Users", "GetUser",
          PROTOS[0], PROTOS[2], "../../etc/passwd", "users", "products", "nosuch", "", "\x00", "é"]

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
           | st.sampled_from(VALUES) | st.text(max_size=12))
keys = st.sampled_from(FIELDS) | st.text(max_size=8) | st.integers(-3, 3) | st.booleans() | st.none()
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=30,
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


ALL_PATHS = list(_paths(GOOD))[1:]


@st.composite
def mutated_good(draw):
    doc = copy.deepcopy(GOOD)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ALL_PATHS))
        node = doc
        try:
            for k in path[:-1]:
                node = node[k]
            if draw(st.booleans()) or not isinstance(node, dict):
                node[path[-1]] = draw(documents)
            else:
                node.pop(path[-1], None)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    return doc


def _check(doc) -> None:
    try:
        parse_mesh(doc, "mesh.yaml", REPO, fake_compile)
    except MeshError as exc:
        assert str(exc).startswith("mesh.yaml"), str(exc)


def test_good_document_parses():
    mesh = parse_mesh(copy.deepcopy(GOOD), "mesh.yaml", REPO, fake_compile)
    assert set(mesh.services) == {"users", "orders", "products"}


@fuzz_settings(quick=300)
@given(st.dictionaries(keys, documents, max_size=5))
def test_random_documents_only_raise_mesh_error(doc):
    _check(doc)


@fuzz_settings(quick=400)
@given(mutated_good())
def test_mutated_good_documents_only_raise_mesh_error(doc):
    _check(doc)


REPRODUCERS = {
    "proto_paths is not a list": "proto_paths: true\nservices:\n  products: { protocol: http }\n",
    "a proto_paths item is not a string": "proto_paths: [null]\nservices:\n  products: { protocol: http }\n",
    "proto is a number": "services:\n  users: { protocol: grpc, proto: 445 }\n",
    "a proto list item is a mapping": "services:\n  users: { protocol: grpc, proto: [{}] }\n",
    "route target is a list": ("services:\n  products: { protocol: http }\ngateway:\n  http: 127.0.0.1:8080\n"
                               "  routes:\n    - { match: { path_prefix: /p }, to: [products] }\n"),
    "split target is a mapping": ("services:\n  products: { protocol: http }\ngateway:\n  http: 127.0.0.1:8080\n"
                                  "  routes:\n    - { match: { path_prefix: /p }, split: [{ to: {a: 1}, weight: 1 }] }\n"),
}


@pytest.mark.parametrize("text", list(REPRODUCERS.values()), ids=list(REPRODUCERS))
def test_wrong_typed_values_are_mesh_errors(tmp_path, text):
    from control.model import load_mesh
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    with pytest.raises(MeshError):
        load_mesh(path)
