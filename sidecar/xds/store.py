"""Accepted resources per type and what to subscribe to next.  Pure: no I/O, no asyncio.

SotW semantics: Listener and Cluster are wildcard subscriptions, so each response is the full
set.  RouteConfiguration and ClusterLoadAssignment are named: a response holds some of the
subscribed names, and names no longer subscribed are forgotten.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import any_pb2

from protomesh import xdstypes
from sidecar.config.model import RuntimeConfig
from sidecar.config.parse import parse_resources

WILDCARD = (xdstypes.LISTENER, xdstypes.CLUSTER)


@dataclass
class TypeState:
    version: str = ""  # last ACKed version
    nonce: str = ""  # nonce of the last response seen
    names: tuple[str, ...] = ()  # subscription (empty = wildcard for LDS/CDS)
    parsed: dict = field(default_factory=dict)
    raw: dict[str, any_pb2.Any] = field(default_factory=dict)
    error: str = ""  # last NACK reason, cleared by the next ACK


class Store:
    def __init__(self) -> None:
        self.types: dict[str, TypeState] = {t: TypeState() for t in xdstypes.PUSH_ORDER}

    def apply(self, type_url: str, version: str, resources: list[any_pb2.Any]) -> None:
        """Accept a response all or nothing; raises ConfigError (→ NACK) and changes nothing."""
        parsed = parse_resources(type_url, resources)
        raw = dict(zip(parsed.keys(), resources))  # parse_resources keeps response order
        state = self.types[type_url]
        if type_url in WILDCARD:
            state.parsed, state.raw = parsed, raw
        else:
            wanted = set(state.names)
            state.parsed = {k: v for k, v in state.parsed.items() if k in wanted}
            state.raw = {k: v for k, v in state.raw.items() if k in wanted}
            state.parsed.update({k: v for k, v in parsed.items() if k in wanted})
            state.raw.update({k: v for k, v in raw.items() if k in wanted})
        state.version = version
        state.error = ""

    def wanted_names(self) -> dict[str, tuple[str, ...]]:
        """Named subscriptions implied by the accepted listeners and clusters."""
        listeners = self.types[xdstypes.LISTENER].parsed.values()
        clusters = self.types[xdstypes.CLUSTER].parsed.values()
        return {
            xdstypes.ROUTE: tuple(sorted({l.route_table for l in listeners if l.inline_routes is None})),
            xdstypes.ENDPOINT: tuple(sorted(c.name for c in clusters if c.eds)),
        }

    def config(self) -> RuntimeConfig:
        t = self.types
        return RuntimeConfig(
            listeners=dict(t[xdstypes.LISTENER].parsed),
            route_tables=dict(t[xdstypes.ROUTE].parsed),
            clusters=dict(t[xdstypes.CLUSTER].parsed),
            assignments=dict(t[xdstypes.ENDPOINT].parsed),
            versions={xdstypes.SHORT[k]: v.version for k, v in t.items()},
        )

