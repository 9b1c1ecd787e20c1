"""One ADS stream's protocol state and the pure decision of what to send next.

Rules (state of the world):
- a request whose nonce is not the last one we sent for that type is stale and only updates
  nothing (the client will catch up with the newer response);
- a request answering our last response is an ACK (no error_detail) or a NACK (error_detail):
  a NACKed version is never resent; the node keeps its last ACKed version until content changes;
- at most one response per type is outstanding (unanswered) at a time;
- types go out in order CDS → EDS → LDS → RDS, and a type waits until every earlier type the
  node subscribes to is ACKed at its current version (for EDS: and subscribed to every EDS
  cluster), so a route never names a cluster the node does not have.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import any_pb2

from control.snapshot import select, version_of
from protomesh import xdstypes

NAMED_TYPES = (xdstypes.ROUTE, xdstypes.ENDPOINT)


@dataclass
class TypeState:
    subscribed: bool = False
    names: frozenset[str] | None = None  # None = wildcard
    sent_version: str = ""
    sent_names: frozenset[str] | None = None
    sent_nonce: str = ""
    pending: bool = False
    acked_version: str = ""
    nacked_version: str = ""
    error: str = ""
    sends: int = 0


@dataclass
class StreamState:
    types: dict[str, TypeState] = field(default_factory=lambda: {t: TypeState() for t in xdstypes.PUSH_ORDER})
    nonce_counter: int = 0

    def on_request(self, type_url: str, names: list[str], nonce: str, version: str,
                   error: str | None) -> str:
        """Record a DiscoveryRequest; returns 'ack', 'nack', 'subscribe' or 'stale'."""
        t = self.types.get(type_url)
        if t is None:
            return "stale"
        if nonce and nonce != t.sent_nonce:
            return "stale"
        wildcard = type_url not in NAMED_TYPES and (not names or names == ["*"])
        t.names = None if wildcard else frozenset(names)
        t.subscribed = True
        if not nonce:
            return "subscribe"
        t.pending = False
        if error is not None:
            t.nacked_version = t.sent_version
            t.error = error
            return "nack"
        t.acked_version = version
        t.error = ""
        return "ack"

    def in_sync(self, type_url: str, view: dict[str, dict[str, any_pb2.Any]]) -> bool:
        t = self.types[type_url]
        if not t.subscribed:
            return True
        if t.pending:
            return False
        current = version_of(select(view.get(type_url, {}), t.names))
        if t.acked_version != current:
            return False
        if type_url == xdstypes.ENDPOINT:
            eds_clusters = set(view.get(xdstypes.ENDPOINT, {}))
            if t.names is not None and not eds_clusters <= t.names:
                return False
        return True

    def next_sends(self, view: dict[str, dict[str, any_pb2.Any]]) -> list[tuple[str, str, dict]]:
        """What to send now: (type_url, version, resources) in push order."""
        out = []
        for type_url in xdstypes.PUSH_ORDER:
            t = self.types[type_url]
            if t.pending:
                break
            if not t.subscribed:
                continue
            resources = select(view.get(type_url, {}), t.names)
            version = version_of(resources)
            changed = version != t.sent_version or t.names != t.sent_names
            if changed and version != t.nacked_version:
                out.append((type_url, version, resources))
                break  # later types wait for this one's ACK
            if not self.in_sync(type_url, view):
                break
        return out

    def mark_sent(self, type_url: str, version: str) -> str:
        t = self.types[type_url]
        self.nonce_counter += 1
        t.sent_nonce = str(self.nonce_counter)
        t.sent_version = version
        t.sent_names = t.names
        t.pending = True
        t.sends += 1
        return t.sent_nonce

