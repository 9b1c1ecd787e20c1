"""State-of-the-world responses encoded once and shared by every stream that gets the same one.

After an endpoint change thousands of sidecars are sent the same EDS response: same type, same
version, same resources.  Building a DiscoveryResponse and serializing it per stream was a large
part of a push; here it is built and serialized once, and the bytes go to every stream (the ADS
handlers are registered with a serializer that passes bytes through, `add_ads_to_server`).

A nonce has to be unique only within a stream, but a shared response has one nonce, so the
cache key includes the nonce of the stream's previous response of that type: streams with the
same history share a response, and no stream is ever given the same nonce twice (a nonce is
a fresh number for each new entry, and a stream's next key always differs from the last).
"""
from __future__ import annotations

import itertools

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


class SharedResponses:
    def __init__(self, max_bytes: int = 64 << 20, max_entries: int = 4096):
        """The cache is dropped whole when it would grow past `max_bytes` (a full EDS of
        thousands of endpoints is hundreds of kilobytes) or `max_entries` (each holds its
        resources); old entries are never asked for again once every stream has moved on."""
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: dict[tuple, tuple[dict, str, bytes]] = {}
        self._bytes = 0
        self._seq = itertools.count(1)
        self.built = 0
        self.shared = 0

    def get(self, type_url: str, version: str, resources: dict[str, any_pb2.Any],
            previous_nonce: str) -> tuple[str, bytes]:
        """(nonce, encoded DiscoveryResponse).  `resources` must not be mutated afterwards: its
        identity is part of the key (view dicts and memoised selections never are)."""
        key = (type_url, version, id(resources), previous_nonce)
        hit = self._entries.get(key)
        if hit is not None and hit[0] is resources:
            self.shared += 1
            return hit[1], hit[2]
        nonce = str(next(self._seq))
        data = discovery_pb2.DiscoveryResponse(
            type_url=type_url, version_info=version, nonce=nonce,
            resources=[resources[n] for n in sorted(resources)]).SerializeToString()
        if self._bytes + len(data) > self.max_bytes or len(self._entries) >= self.max_entries:
            self._entries.clear()
            self._bytes = 0
        self._entries[key] = (resources, nonce, data)
        self._bytes += len(data)
        self.built += 1
        return nonce, data


def serialize(message) -> bytes:
    """Response serializer of the ADS handlers: shared responses are already bytes."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_ads_to_server(servicer, server: grpc.aio.Server) -> None:
    """Like the generated `add_AggregatedDiscoveryServiceServicer_to_server`, with `serialize`."""
    handlers = {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.StreamAggregatedResources, request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=serialize),
        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.DeltaAggregatedResources, request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=serialize),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),))
    server.add_registered_method_handlers(ADS_SERVICE, handlers)
    servicer.encoded_responses = True
