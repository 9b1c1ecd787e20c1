"""The protocol-neutral shape of one request, so every policy is written once.

The HTTP/1.1 listener and the gRPC listener both turn what they receive into a `Call`; routing,
filters, telemetry and the access log only ever see a `Call`.  A local answer (no upstream was
asked) is a `Reply`, and it always carries a machine-readable reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# gRPC status codes used by local replies (grpc.StatusCode values, kept as ints to stay cheap).
GRPC_OK = 0
GRPC_CANCELLED = 1
GRPC_UNKNOWN = 2
GRPC_INVALID_ARGUMENT = 3
GRPC_DEADLINE_EXCEEDED = 4
GRPC_NOT_FOUND = 5
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16

REASON_HEADER = "x-protomesh-reason"


@dataclass(slots=True)
class Call:
    """One request as policies see it.  Header names are lower case; values are str."""

    protocol: str  # "http" | "grpc"
    method: str  # HTTP method ("POST" for gRPC)
    authority: str  # Host / :authority, without default-port normalisation
    path: str  # path and query as received
    headers: dict[str, str]
    peer: str  # "ip:port" of the downstream
    listener: str  # name of the listener that accepted it
    deadline: float | None = None  # absolute, loop.time() based; None = no deadline
    route_name: str = ""
    cluster: str = ""
    upstream: str = ""  # "ip:port" actually used
    span: Any = None  # the server span, if tracing
    start: float = 0.0  # time.perf_counter() when accepted
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def grpc_service(self) -> str:
        """`pkg.Service` for a gRPC path `/pkg.Service/Method`, else ''."""
        parts = self.path.split("/")
        return parts[1] if len(parts) == 3 else ""

    @property
    def grpc_method(self) -> str:
        parts = self.path.split("/")
        return parts[2] if len(parts) == 3 else ""


@dataclass(frozen=True, slots=True)
class Reply:
    """A local answer.  `status` is used on HTTP, `grpc_status` on gRPC; `reason` is mandatory."""

    status: int
    grpc_status: int
    reason: str  # machine readable, e.g. "no_route", "upstream_unavailable"
    message: str  # human readable detail
    headers: tuple[tuple[str, str], ...] = ()

    def reason_value(self, call: Call | None = None) -> str:
        """The value of the `x-protomesh-reason` header: the reason plus the route, when known."""
        if call is not None and call.route_name:
            return f"{self.reason} route={call.route_name}"
        return self.reason


def no_route(call: Call) -> Reply:
    return Reply(404, GRPC_UNIMPLEMENTED, "no_route",
                 f"no route on listener {call.listener} for {call.authority}{call.path}")


def no_config(listener: str) -> Reply:
    return Reply(503, GRPC_UNAVAILABLE, "config_pending",
                 f"listener {listener} has no route configuration yet")


def no_cluster(cluster: str) -> Reply:
    return Reply(503, GRPC_UNAVAILABLE, "cluster_not_found", f"cluster {cluster} is not configured")


def no_healthy_upstream(cluster: str) -> Reply:
    return Reply(503, GRPC_UNAVAILABLE, "no_healthy_upstream", f"cluster {cluster} has no endpoints")


def upstream_unavailable(cluster: str, endpoint: str, why: str) -> Reply:
    return Reply(503, GRPC_UNAVAILABLE, "upstream_unavailable",
                 f"cluster {cluster} endpoint {endpoint}: {why}")


def upstream_timeout(cluster: str, timeout_s: float) -> Reply:
    return Reply(504, GRPC_DEADLINE_EXCEEDED, "upstream_timeout",
                 f"cluster {cluster} did not answer within {timeout_s:g}s")
