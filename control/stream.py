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
  cluster), so a route never names a cluster the node does not have;
- EDS and RDS responses carry only the resources the client lacks or holds in another content,
  once it has ACKed a full set on this stream (the xDS spec lets SotW responses of these named
  types hold a subset; only LDS and CDS must be complete, and Envoy, grpc and our sidecar keep
  the named resources a response leaves out).  An endpoint change then sends one assignment to
  each node, not all of them: with thousands of registered sidecars that is the difference
  between kilobytes and megabytes per stream.  A re-request gets the full set.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import any_pb2

from control.snapshot import changed_since, selection
from protomesh import xdstypes

NAMED_TYPES = (xdstypes.ROUTE, xdstypes.ENDPOINT)
_EMPTY: dict = {}  # one object, so memoised selections of a missing type share one key


@dataclass
class TypeState:
    subscribed: bool = False
    names: frozenset[str] | None = None  # None = wildcard
    sent_version: str = ""
    sent_names: frozenset[str] | None = None
    sent_nonce: str = ""
    pending: bool = False
    acked_version: str = ""
    acked_at: float = 0.0  # wall-clock time the last ACK arrived (set by the server: this is pure)
    nacked_version: str = ""
    error: str = ""
    sends: int = 0
    resend: bool = False  # the client re-requested what it already has: answer again
    held: dict | None = None  # the full selection the client holds (its last ACK); None: unknown
    prepared: dict | None = None  # full selection behind the response next_sends chose
    sent_full: dict | None = None  # ... and behind the outstanding one


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
        new = None if wildcard else frozenset(names)
        if new != t.names:  # an unchanged subscription keeps its object (memo keys, cached hash)
            t.names = new
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
        t.held = t.sent_full
        t.error = ""
        return "ack"

    def in_sync(self, type_url: str, view: dict[str, dict[str, any_pb2.Any]], current: str | None = None) -> bool:
        """`current`: the version of the type's selection, if the caller has it already."""
        t = self.types[type_url]
        if not t.subscribed:
            return True
        if t.pending:
            return False
        if current is None:
            _, current = selection(view.get(type_url, _EMPTY), t.names)
        if t.acked_version != current:
            return False
        if type_url == xdstypes.ENDPOINT and t.names is not None:
            # Every EDS cluster the node holds (a proxyless client asks for some clusters only).
            cds = self.types[xdstypes.CLUSTER]
            held = selection(view.get(xdstypes.CLUSTER, _EMPTY), cds.names)[0] if cds.subscribed else _EMPTY
            if not eds_covered(held, view.get(xdstypes.ENDPOINT, _EMPTY), t.names):
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
            resources, version = selection(view.get(type_url, _EMPTY), t.names)
            changed = version != t.sent_version or t.names != t.sent_names or t.resend
            if changed and version != t.nacked_version:
                t.prepared = resources
                if type_url in NAMED_TYPES and t.held is not None and not t.resend:
                    resources = changed_since(t.held, resources)
                out.append((type_url, version, resources))
                break  # later types wait for this one's ACK
            if not self.in_sync(type_url, view, version):
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
        resources, version = selection(view.get(xdstypes.ENDPOINT, _EMPTY), eds.names)
        if version == eds.nacked_version:
            return []
        eds.prepared = resources
        return [(xdstypes.ENDPOINT, version, resources)]

    def mark_sent(self, type_url: str, version: str, nonce: str | None = None) -> str:
        """Record the response chosen by `next_sends` as outstanding; `nonce` if the caller
        has one (a shared response's), else the stream's own next."""
        t = self.types[type_url]
        self.nonce_counter += 1
        t.sent_nonce = nonce or str(self.nonce_counter)
        t.sent_version = version
        t.sent_names = t.names
        t.pending = True
        t.resend = False
        t.sends += 1
        t.sent_full, t.prepared = t.prepared, None
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


def eds_covered(clusters: dict, endpoints: dict, names: frozenset[str]) -> bool:
    """Whether an EDS subscription `names` covers every EDS cluster among `clusters`."""
    return all(n in names for n in clusters if n in endpoints)
