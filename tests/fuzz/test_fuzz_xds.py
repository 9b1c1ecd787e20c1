"""Fuzz the sidecar's xDS resource parser with mutations of the resources our own control server
sends: whatever arrives, `parse_resources` either returns config or raises ConfigError (which
becomes a NACK with the last good config kept).  Any other exception escapes the xDS client's
response handler, which only turns ConfigError into a NACK.

Three mutators: a random field set to a random value of its type (structure-aware, reaching
regexes, weights, enums, ports, type URLs), raw bytes of the serialized resource damaged, and a
resource sent under another type's URL.
"""
from __future__ import annotations

import traceback
from functools import lru_cache
from pathlib import Path

import pytest
from google.protobuf import any_pb2, descriptor
from hypothesis import given, strategies as st

from control.model import load_mesh
from control.registry import Registration, Registry
from control.views import Views
from protomesh import xdstypes
from sidecar.config.errors import ConfigError
from sidecar.config.parse import parse_resources
from tests.fuzz.fuzzsettings import fuzz_settings

REPO = Path(__file__).resolve().parents[2]
MESH = f"""
proto_paths: [{REPO / 'proto'}]
services:
  users:    {{ protocol: grpc, proto: demo/users/v1/users.proto, lb: least_request, timeout: 2s }}
  products: {{ protocol: http, endpoints: ["127.0.0.1:9000", "127.0.0.2:9000"] }}
gateway:
  http: 127.0.0.1:8080
  grpc: 127.0.0.1:8443
  routes:
    - {{ match: {{ path_prefix: /v1/products, headers: {{ x-env: {{ regex: "can.*" }} }}, query: {{ d: "1" }} }},
        to: products, rewrite_prefix: /v2 }}
    - {{ match: {{ path_regex: "/c[0-9]+" }}, split: [{{ to: products, weight: 3 }}, {{ to: products, weight: 1 }}] }}
    - {{ match: {{ grpc_service: demo.users.v1.Users, grpc_method: GetUser }}, to: users }}
telemetry: {{ otlp_endpoint: "http://127.0.0.1:4317", sampling: 0.5 }}
"""
TYPES = (xdstypes.CLUSTER, xdstypes.ENDPOINT, xdstypes.LISTENER, xdstypes.ROUTE)


@lru_cache(maxsize=None)
def valid_resources() -> tuple[tuple[str, bytes], ...]:
    """(type_url, serialized Any) of everything a gateway and a users sidecar are sent."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mesh.yaml"
        path.write_text(MESH)
        mesh = load_mesh(path)
    registry = Registry()
    sidecar = Registration("users-1", "sidecar", "protomesh", service="users", protocol="grpc",
                           advertise=("127.0.0.1", 15006), app=("127.0.0.1", 50051), inbound=("127.0.0.1", 15006),
                           outbound_http=("127.0.0.1", 15001), outbound_grpc=("127.0.0.1", 15002))
    registry.connect(sidecar)
    views = Views(mesh, registry)
    out = []
    for reg in (Registration("gw", "gateway", "protomesh"), sidecar):
        for type_url, resources in views.for_node(reg).items():
            for name in sorted(resources):
                out.append((reg.node_id, type_url, resources[name].SerializeToString()))
    return tuple(out)


def resources() -> tuple[tuple[str, bytes], ...]:
    return tuple((t, raw) for _, t, raw in valid_resources())


def test_the_valid_resources_parse():
    by_node: dict = {}
    for node, type_url, raw in valid_resources():
        by_node.setdefault((node, type_url), []).append(any_pb2.Any.FromString(raw))
    assert {t for _, t in by_node} == set(TYPES)
    for (_, type_url), anys in by_node.items():
        parse_resources(type_url, anys)


# ---- structure-aware mutation ------------------------------------------------------------------------
STRINGS = ["", "(", "[", "*", "a" * 300, "\x00", "é", "0.0.0.0", "::", "/", "type.googleapis.com/x.Y",
           xdstypes.HCM, xdstypes.ROUTER, "envoy.filters.http.router", "(?P<x>", "a{99999}"]
INTS = [0, 1, -1, 2, 65535, 65536, 2**31 - 1, -2**31, 2**32 - 1, 2**63 - 1]


def _fields(msg, depth=0):
    """(message, field) for every field of every present sub-message, Any payloads included."""
    for fd in msg.DESCRIPTOR.fields:
        yield msg, fd
    if depth > 12:
        return
    for fd, value in msg.ListFields():
        if fd.type != descriptor.FieldDescriptor.TYPE_MESSAGE:
            continue
        if fd.message_type.GetOptions().map_entry:
            values = list(value.values()) if fd.message_type.fields_by_name["value"].message_type else []
        elif fd.is_repeated:
            values = list(value)
        else:
            values = [value]
        for v in values:
            yield from _fields(v, depth + 1)


def _random_value(draw, fd):
    t = fd.type
    F = descriptor.FieldDescriptor
    if t == F.TYPE_STRING:
        return draw(st.sampled_from(STRINGS) | st.text(max_size=20))
    if t == F.TYPE_BYTES:
        return draw(st.binary(max_size=40))
    if t == F.TYPE_BOOL:
        return draw(st.booleans())
    if t == F.TYPE_ENUM:
        return draw(st.sampled_from([v.number for v in fd.enum_type.values] + [99]))
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return draw(st.floats(allow_nan=True, allow_infinity=True, width=32 if t == F.TYPE_FLOAT else 64))
    unsigned = t in (F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_FIXED32, F.TYPE_FIXED64)
    bits = 32 if t in (F.TYPE_INT32, F.TYPE_UINT32, F.TYPE_SINT32, F.TYPE_FIXED32, F.TYPE_SFIXED32) else 64
    lo, hi = (0, 2**bits - 1) if unsigned else (-2**(bits - 1), 2**(bits - 1) - 1)
    return draw(st.sampled_from([v for v in INTS if lo <= v <= hi]) | st.integers(lo, hi))


def _mutate_any(draw, anyv: any_pb2.Any) -> None:
    """Unpack the payload by its type URL, mutate it (recursing into nested Anys), repack."""
    from google.protobuf import symbol_database
    try:
        cls = symbol_database.Default().GetSymbol(anyv.type_url.split("/")[-1])
    except KeyError:
        return
    inner = cls()
    anyv.Unpack(inner)
    _mutate(draw, inner)
    anyv.value = inner.SerializeToString()


def _mutate(draw, msg) -> None:
    pairs = list(_fields(msg))
    for _ in range(draw(st.integers(1, 3))):
        owner, fd = draw(st.sampled_from(pairs))
        if fd.message_type is not None and fd.message_type.full_name == "google.protobuf.Any" \
                and not fd.is_repeated and owner.HasField(fd.name):
            _mutate_any(draw, getattr(owner, fd.name))
            continue
        if fd.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
            if fd.is_repeated:
                container = getattr(owner, fd.name)
                if fd.message_type.GetOptions().map_entry:
                    container.clear() if draw(st.booleans()) else None
                elif len(container) and draw(st.booleans()):
                    del container[draw(st.integers(0, len(container) - 1))]
                else:
                    container.add()
            elif draw(st.booleans()):
                owner.ClearField(fd.name)
            else:
                getattr(owner, fd.name).SetInParent()
            continue
        value = _random_value(draw, fd)
        try:
            if fd.is_repeated:
                getattr(owner, fd.name).append(value)
            else:
                setattr(owner, fd.name, value)
        except (ValueError, TypeError):
            pass  # e.g. invalid UTF-8 for a string field: protobuf refuses it before the wire


@st.composite
def field_mutated(draw):
    type_url, raw = draw(st.sampled_from(resources()))
    anyv = any_pb2.Any.FromString(raw)
    _mutate_any(draw, anyv)
    return type_url, anyv


@st.composite
def byte_mutated(draw):
    type_url, raw = draw(st.sampled_from(resources()))
    anyv = any_pb2.Any.FromString(raw)
    data = bytearray(anyv.value)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            data[i:i] = data[i:i + draw(st.integers(1, 32))]
    anyv.value = bytes(data)
    return type_url, anyv


@st.composite
def type_confused(draw):
    type_url = draw(st.sampled_from(TYPES))
    _, raw = draw(st.sampled_from(resources()))
    return type_url, any_pb2.Any.FromString(raw)


def _check(type_url: str, anyv: any_pb2.Any) -> None:
    try:
        parse_resources(type_url, [anyv])
    except ConfigError as exc:
        assert str(exc), "a NACK needs a reason"
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__} escaped parse_resources: {exc}\n"
                                 + "".join(traceback.format_exception(exc)[-3:])) from exc


@fuzz_settings(quick=400)
@given(field_mutated())
def test_field_mutations_only_raise_config_error(case):
    _check(*case)


@fuzz_settings(quick=400)
@given(byte_mutated())
def test_byte_mutations_only_raise_config_error(case):
    _check(*case)


@fuzz_settings(quick=100)
@given(type_confused())
def test_type_confusion_only_raises_config_error(case):
    _check(*case)


def test_undecodable_resource_is_a_config_error():
    bad = any_pb2.Any(type_url=xdstypes.CLUSTER, value=b"\x0a\x05ab")  # field 1 says 5 bytes, 2 follow
    with pytest.raises(ConfigError, match="cannot decode"):
        parse_resources(xdstypes.CLUSTER, [bad])


@pytest.mark.parametrize("field", ["type", "lb_policy"])
def test_unknown_enum_value_is_a_config_error(field):
    from envoy.config.cluster.v3 import cluster_pb2
    c = cluster_pb2.Cluster(name="c", type=cluster_pb2.Cluster.STATIC)
    setattr(c, field, 99)
    anyv = any_pb2.Any()
    anyv.Pack(c)
    with pytest.raises(ConfigError, match="unknown value 99"):
        parse_resources(xdstypes.CLUSTER, [anyv])


def test_unset_label_value_is_a_config_error():
    from envoy.config.endpoint.v3 import endpoint_pb2
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name="c")
    lb = cla.endpoints.add().lb_endpoints.add()
    lb.endpoint.address.socket_address.address = "127.0.0.1"
    lb.endpoint.address.socket_address.port_value = 80
    lb.metadata.filter_metadata["protomesh"].fields["source"].SetInParent()  # a Value with no kind
    anyv = any_pb2.Any()
    anyv.Pack(cla)
    with pytest.raises(ConfigError, match="label values"):
        parse_resources(xdstypes.ENDPOINT, [anyv])
