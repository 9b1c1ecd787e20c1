"""Encoded responses are shared between streams with the same history, never reused within one."""
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, wrappers_pb2

from control.wire import SharedResponses, serialize
from protomesh.xdstypes import ENDPOINT


def res(value):
    a = any_pb2.Any()
    a.Pack(wrappers_pb2.StringValue(value=value))
    return a


def test_same_response_for_the_same_set_and_history_decodes_to_the_message():
    cache, resources = SharedResponses(), {"b": res("b"), "a": res("a")}
    n1, data1 = cache.get(ENDPOINT, "v1", resources, "")
    n2, data2 = cache.get(ENDPOINT, "v1", resources, "")
    assert (n1, data1) == (n2, data2) and cache.built == 1 and cache.shared == 1
    msg = discovery_pb2.DiscoveryResponse.FromString(data1)
    assert (msg.type_url, msg.version_info, msg.nonce) == (ENDPOINT, "v1", n1)
    assert [r.value for r in msg.resources] == [resources["a"].value, resources["b"].value]  # sorted by name


def test_a_stream_never_gets_the_same_nonce_twice_in_a_row():
    cache, resources = SharedResponses(), {"a": res("a")}
    first, _ = cache.get(ENDPOINT, "v1", resources, "")
    again, _ = cache.get(ENDPOINT, "v1", resources, first)  # e.g. a re-request of the same set
    assert again != first
    other, _ = cache.get(ENDPOINT, "v1", dict(resources), "")  # another dict: another entry
    assert other not in (first, again)


def test_the_cache_is_dropped_when_it_outgrows_its_bound():
    cache = SharedResponses(max_bytes=100)
    big = {"a": res("x" * 80)}
    cache.get(ENDPOINT, "v1", big, "")
    cache.get(ENDPOINT, "v2", big, "")
    assert len(cache._entries) == 1


def test_serializer_passes_bytes_through():
    msg = discovery_pb2.DiscoveryResponse(version_info="v")
    assert serialize(b"raw") == b"raw"
    assert serialize(msg) == msg.SerializeToString()


def test_the_cache_is_dropped_when_it_holds_too_many_entries():
    cache = SharedResponses(max_entries=2)
    resources = {"a": res("a")}
    for v in ("v1", "v2", "v3"):
        cache.get(ENDPOINT, v, resources, "")
    assert len(cache._entries) == 1
