"""ADS (state of the world and Delta) and CSDS as methods of our HTTP/2 gRPC server
(sidecar/h2/grpcserver.py), the control server's default xDS engine.

The protocol logic is ControlPlane's (`open_stream` / `handle` / `close_stream`), shared with
the grpc.aio servicer; this module only adapts a call's callbacks to it.  Responses go out as
the encoded bytes ControlPlane already shares between streams (control/wire.py), so a push
costs no serialization per stream.  Measured with the bench's control case (5,000 streams): see
the README's performance section.
"""
from __future__ import annotations

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf.message import DecodeError

from control.server import Abort, ControlPlane, Stream
from sidecar.h2.grpcserver import Call

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
CSDS = "/envoy.service.status.v3.ClientStatusDiscoveryService/"
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def methods(plane: ControlPlane) -> dict:
    """The method table for `GrpcH2Server`."""
    return {
        ADS + "StreamAggregatedResources": lambda call: _AdsCall(plane, call, delta=False),
        ADS + "DeltaAggregatedResources": lambda call: _AdsCall(plane, call, delta=True),
        CSDS + "FetchClientStatus": lambda call: _CsdsCall(plane, call, unary=True),
        CSDS + "StreamClientStatus": lambda call: _CsdsCall(plane, call, unary=False),
    }


def _parse(parse, data: bytes, call: Call, what: str):
    """A request message, or None after ending the call with why it is not one."""
    try:
        return parse(data)
    except DecodeError as exc:
        call.finish(INVALID_ARGUMENT, f"request is not a valid {what}: {exc}")
        return None


class _AdsCall:
    """One ADS stream: requests to ControlPlane.handle, responses from its pushes."""

    __slots__ = ("plane", "call", "stream", "parse", "what")

    def __init__(self, plane: ControlPlane, call: Call, delta: bool):
        self.plane = plane
        self.call = call
        request = discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
        self.parse = request.FromString
        self.what = request.DESCRIPTOR.name
        self.stream = Stream(call.peer, delta, send=call.send)
        plane.open_stream(self.stream)

    def on_message(self, data: bytes) -> None:
        req = _parse(self.parse, data, self.call, self.what)
        if req is None:
            self.plane.close_stream(self.stream)
            return
        try:
            self.plane.handle(self.stream, req)
        except Abort as exc:
            self.plane.close_stream(self.stream)
            self.call.finish(exc.code.value[0], exc.message)

    def on_end(self) -> None:
        """The node closed its side: the stream is over (as on grpc.aio, it ends with OK)."""
        self.plane.close_stream(self.stream)
        self.call.finish()

    def on_cancel(self) -> None:
        self.plane.close_stream(self.stream)


class _CsdsCall:
    """Client status: one ClientStatusResponse per request (Fetch is the unary form)."""

    __slots__ = ("plane", "call", "unary", "answered")

    def __init__(self, plane: ControlPlane, call: Call, unary: bool):
        self.plane = plane
        self.call = call
        self.unary = unary
        self.answered = 0

    def on_message(self, data: bytes) -> None:
        if self.unary and self.answered:
            self.call.finish(INVALID_ARGUMENT, "FetchClientStatus is unary: send one request")
            return
        req = _parse(csds_pb2.ClientStatusRequest.FromString, data, self.call, "ClientStatusRequest")
        if req is None:
            return
        self.answered += 1
        self.call.send(csds_pb2.ClientStatusResponse(
            config=self.plane.client_configs(req.exclude_resource_contents)).SerializeToString())

    def on_end(self) -> None:
        if self.unary and not self.answered:
            self.call.finish(INVALID_ARGUMENT, "FetchClientStatus needs one request message")
        else:
            self.call.finish()

    def on_cancel(self) -> None:
        pass
