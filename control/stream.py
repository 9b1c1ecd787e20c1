"""One ADS stream's protocol state and the pure decision of what to send next.

Rules (state of the world):
- a request whose nonce is not the last one we sent for that type is stale and only updates
  nothing (the client will catch up with the newer response);
- a request answering our last response is an ACK (no error_detail) or a NACK (error_detail):
  a NACKed version is never resent; the node keeps its last ACKed version until content changes;
- a request that repeats the nonce of a response already ACKed is a re-request and is answered
  again (same version, new nonce): Envoy does this for EDS after a Cluster change and keeps the
  cluster warming, and its CDS ACK back, for up to 15 s until the server answers — so this EDS
  answer goes out even while CDS is unacknowledged;
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
    resend: bool = False  # the client re-requested what it already has: answer again


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
        if not t.pending and error is None:
            t.resend = True
            return "rerequest"
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
            # Every EDS cluster the node holds (a proxyless client asks for some clusters only).
            cds = self.types[xdstypes.CLUSTER]
            held = select(view.get(xdstypes.CLUSTER, {}), cds.names) if cds.subscribed else {}
            eds_clusters = set(held) & set(view.get(xdstypes.ENDPOINT, {}))
            if t.names is not None and not eds_clusters <= t.names:
                return False
        return True

    def next_sends(self, view: dict[str, dict[str, any_pb2.Any]]) -> list[tuple[str, str, dict]]:
        """What to send now: (type_url, version, resources) in push order."""
        out = []
        for type_url in xdstypes.PUSH_ORDER:
            t = self.types[type_url]
            if t.pending:
                if type_url == xdstypes.CLUSTER:
                    out.extend(self._eds_rerequest(view))
                break
            if not t.subscribed:
                continue
            resources = select(view.get(type_url, {}), t.names)
            version = version_of(resources)
            changed = version != t.sent_version or t.names != t.sent_names or t.resend
            if changed and version != t.nacked_version:
                out.append((type_url, version, resources))
                break  # later types wait for this one's ACK
            if not self.in_sync(type_url, view):
                break
        return out

    def _eds_rerequest(self, view) -> list:
        """Envoy holds its ACK of a Cluster update until the updated clusters are warm, and they
        warm when EDS answers the request it repeats (same nonce and version).  So that answer
        cannot wait for the CDS ACK like other EDS pushes; endpoints never name anything the node
        lacks, so sending them early is safe."""
        eds = self.types[xdstypes.ENDPOINT]
        if not (eds.resend and eds.subscribed and not eds.pending):
            return []
        resources = select(view.get(xdstypes.ENDPOINT, {}), eds.names)
        version = version_of(resources)
        return [] if version == eds.nacked_version else [(xdstypes.ENDPOINT, version, resources)]

    def mark_sent(self, type_url: str, version: str) -> str:
        t = self.types[type_url]
        self.nonce_counter += 1
        t.sent_nonce = str(self.nonce_counter)
        t.sent_version = version
        t.sent_names = t.names
        t.pending = True
        t.resend = False
        t.sends += 1
        return t.sent_nonce


    def resource_status(self, view: dict):
        """(type_url, name, version held, status, error, rejected version) per resource, for CSDS.
        In SotW the version is the type's: a NACK refuses the whole response."""
        for type_url, t in self.types.items():
            if not t.subscribed:
                continue
            for name in sorted(view.get(type_url, {}) if t.names is None else t.names):
                if t.error and t.nacked_version == t.sent_version:
                    yield type_url, name, t.acked_version, "NACKED", t.error, t.nacked_version
                elif t.pending:
                    yield type_url, name, t.acked_version, "REQUESTED", "", ""
                else:
                    yield type_url, name, t.acked_version, "ACKED", "", ""
