"""Accepted resources per type and what to subscribe to next.  Pure: no I/O, no asyncio.

SotW semantics: Listener and Cluster are wildcard subscriptions, so each response is the full
set.  RouteConfiguration and ClusterLoadAssignment are named: a response holds some of the
subscribed names, and names no longer subscribed are forgotten.

Delta semantics (`apply_delta`): a response adds or replaces some resources and removes others by
name; the result is parsed as a whole, so it is still all or nothing.
"""
from __future__ import annotations

import hashlib
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
    versions: dict[str, str] = field(default_factory=dict)  # per resource (Delta)


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
        state.versions = {k: version for k in state.raw}
        state.error = ""

    def apply_delta(self, type_url: str, system_version: str, resources: list, removed: list[str]) -> None:
        """Accept a Delta response (`resources`: discovery Resource messages) all or nothing;
        raises ConfigError (→ NACK) and changes nothing."""
        state = self.types[type_url]
        raw, versions = dict(state.raw), dict(state.versions)
        for name in removed:
            raw.pop(name, None)
            versions.pop(name, None)
        for r in resources:
            raw[r.name] = r.resource
            versions[r.name] = r.version
        if type_url not in WILDCARD:
            wanted = set(state.names)
            raw = {k: v for k, v in raw.items() if k in wanted}
        names = sorted(raw)
        parsed = parse_resources(type_url, [raw[n] for n in names])
        state.parsed = parsed
        state.raw = {k: raw[n] for k, n in zip(parsed.keys(), names)}
        state.versions = {n: versions.get(n, "") for n in state.raw}
        state.version = system_version or _digest(state.versions)
        state.error = ""

    def retain(self, type_url: str, names) -> None:
        """Forget resources no longer subscribed (Delta: the server does not send their removal)."""
        state = self.types[type_url]
        keep = set(names)
        state.parsed = {k: v for k, v in state.parsed.items() if k in keep}
        state.raw = {k: v for k, v in state.raw.items() if k in keep}
        state.versions = {k: v for k, v in state.versions.items() if k in keep}

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



def _digest(versions: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(versions):
        h.update(f"{name}\0{versions[name]}\1".encode())
    return h.hexdigest()[:12]
