"""One Delta (incremental) ADS stream's state and the pure decision of what to send next.

Delta differs from state of the world in what a response carries: only the resources whose
version the client does not hold, plus `removed_resources`.  Versions are per resource (a hash
of its content).  Rules:
- subscriptions change with `resource_names_subscribe` / `_unsubscribe` on any request, whatever
  its nonce; LDS and CDS start as wildcard when the first request names nothing (or `*`);
- `initial_resource_versions` on a type's first request says what a reconnecting client holds,
  so only the differences are sent;
- a request carrying the nonce of the outstanding response ACKs it (the client now holds those
  versions) or NACKs it (`error_detail`): NACKed resource versions are not resent until their
  content changes, and the client keeps what it had;
- the same ordering as SotW: one outstanding response per type, CDS → EDS → LDS → RDS, a type
  waits until every earlier subscribed type is ACKed at its current content;
- when a Cluster is (re)sent, its ClusterLoadAssignment is sent again right after it, even if
  unchanged and without waiting for the CDS ACK: Envoy keeps an updated EDS cluster warming (and
  its CDS ACK back) until it gets one, and in Delta it does not ask.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from control.snapshot import version_of
from protomesh import xdstypes

WILDCARD_TYPES = (xdstypes.LISTENER, xdstypes.CLUSTER)


# Per resource object, like `snapshot.digest`: views share resource objects between nodes, and
# every Delta stream asks for the versions of everything it covers on each request it answers.
_VERSIONS: dict[int, tuple[any_pb2.Any, str]] = {}


def resource_version(resource: any_pb2.Any) -> str:
    hit = _VERSIONS.get(id(resource))
    if hit is not None and hit[0] is resource:
        return hit[1]
    if len(_VERSIONS) >= 200_000:
        _VERSIONS.clear()
    version = version_of({"": resource})
    _VERSIONS[id(resource)] = (resource, version)
    return version


@dataclass
class DeltaType:
    subscribed: bool = False
    wildcard: bool = False
    names: set[str] = field(default_factory=set)  # explicit subscriptions
    known: dict[str, str] = field(default_factory=dict)  # what the client holds: name → version
    pending: bool = False
    sent_nonce: str = ""
    sent: dict[str, str] = field(default_factory=dict)  # outstanding response: name → version
    sent_removed: tuple[str, ...] = ()
    nacked: dict[str, str] = field(default_factory=dict)  # name → refused version
    error: str = ""
    nacked_nonce: str = ""
    must_send: set[str] = field(default_factory=set)
    sends: int = 0

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def current(self, resources: dict[str, any_pb2.Any]) -> dict[str, str]:
        """Versions of the resources this subscription covers that exist now."""
        return {n: resource_version(r) for n, r in resources.items() if self.wants(n)}


@dataclass
class DeltaState:
    types: dict[str, DeltaType] = field(default_factory=lambda: {t: DeltaType() for t in xdstypes.PUSH_ORDER})
    nonce_counter: int = 0

    def on_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> str:
        """Record a DeltaDiscoveryRequest; returns 'ack', 'nack', 'subscribe' or 'stale'."""
        t = self.types.get(req.type_url)
        if t is None:
            return "stale"
        subscribe, unsubscribe = set(req.resource_names_subscribe), set(req.resource_names_unsubscribe)
        if not t.subscribed:
            t.subscribed = True
            t.wildcard = req.type_url in WILDCARD_TYPES and not subscribe
            t.known.update(req.initial_resource_versions)
        if "*" in subscribe:
            t.wildcard = True
        if "*" in unsubscribe:
            t.wildcard = False
        t.names |= subscribe - {"*"}
        t.names -= unsubscribe
        for name in unsubscribe:
            if not t.wants(name):
                t.known.pop(name, None)
                t.nacked.pop(name, None)
        if not req.response_nonce:
            return "subscribe"
        if not t.pending or req.response_nonce != t.sent_nonce:
            return "stale"
        t.pending = False
        if req.HasField("error_detail"):
            t.nacked.update(t.sent)
            t.error = req.error_detail.message
            t.nacked_nonce = t.sent_nonce
            return "nack"
        for name, version in t.sent.items():
            if t.wants(name):
                t.known[name] = version
            t.nacked.pop(name, None)
        for name in t.sent_removed:
            t.known.pop(name, None)
        t.error = ""
        return "ack"

    def _diff(self, type_url: str, view: dict) -> tuple[dict[str, str], list[str]]:
        t = self.types[type_url]
        current = t.current(view.get(type_url, {}))
        update = {n: v for n, v in current.items()
                  if (t.known.get(n) != v or n in t.must_send) and t.nacked.get(n) != v}
        removed = sorted(n for n in t.known if n not in current)
        return update, removed

    def in_sync(self, type_url: str, view: dict) -> bool:
        t = self.types[type_url]
        if not t.subscribed:
            return True
        if t.pending or t.must_send:
            return False
        current = t.current(view.get(type_url, {}))
        if any(t.known.get(n) != v for n, v in current.items()) or set(t.known) - set(current):
            return False
        if type_url == xdstypes.ENDPOINT:
            return eds_needed(self.types[xdstypes.CLUSTER].current(view.get(xdstypes.CLUSTER, {})), view) <= \
                (set(current) if t.wildcard else t.names)
        return True

    def next_responses(self, view: dict) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        """What to send now, in push order; each response is marked outstanding."""
        out = []
        for type_url in xdstypes.PUSH_ORDER:
            t = self.types[type_url]
            if t.pending:
                if type_url == xdstypes.CLUSTER:
                    out.extend(self._warming_endpoints(view))
                break
            if not t.subscribed:
                continue
            update, removed = self._diff(type_url, view)
            if update or removed:
                out.append(self._mark_sent(type_url, view, update, removed))
                if type_url == xdstypes.CLUSTER:
                    out.extend(self._warming_endpoints(view))
                break
            t.must_send.clear()  # nothing to send: what had to be re-sent is NACKed or gone
            if not self.in_sync(type_url, view):
                break
        return out

    def _warming_endpoints(self, view: dict) -> list:
        """Envoy ACKs a Cluster update only once the updated clusters are warm, i.e. after their
        ClusterLoadAssignments arrive: those cannot wait for the CDS ACK.  (Endpoints never name
        anything the node lacks, so sending them early is safe.)"""
        eds = self.types[xdstypes.ENDPOINT]
        if not eds.must_send or eds.pending:
            return []
        update, removed = self._diff(xdstypes.ENDPOINT, view)
        return [self._mark_sent(xdstypes.ENDPOINT, view, update, removed)] if update or removed else []

    def _mark_sent(self, type_url, view, update, removed) -> discovery_pb2.DeltaDiscoveryResponse:
        t = self.types[type_url]
        self.nonce_counter += 1
        t.sent_nonce = str(self.nonce_counter)
        t.sent, t.sent_removed = dict(update), tuple(removed)
        t.pending = True
        t.must_send.clear()
        t.sends += 1
        if type_url == xdstypes.CLUSTER:
            eds = self.types[xdstypes.ENDPOINT]
            eds.must_send |= {n for n in update if n in view.get(xdstypes.ENDPOINT, {}) and eds.wants(n)}
        resources = view.get(type_url, {})
        return discovery_pb2.DeltaDiscoveryResponse(
            type_url=type_url, nonce=t.sent_nonce,
            system_version_info=version_of({n: resources[n] for n in t.current(resources)}),
            resources=[discovery_pb2.Resource(name=n, version=v, resource=resources[n])
                       for n, v in sorted(update.items())],
            removed_resources=list(removed))

    def resource_status(self, view: dict):
        """(type_url, name, version held, status, error, rejected version) per resource, for CSDS."""
        for type_url, t in self.types.items():
            if not t.subscribed:
                continue
            current = t.current(view.get(type_url, {}))
            for name in sorted(set(current) | set(t.known) | (set() if t.wildcard else t.names)):
                held = t.known.get(name, "")
                if name in t.nacked and t.nacked[name] == current.get(name):
                    yield type_url, name, held, "NACKED", t.error, t.nacked[name]
                elif name in current and held != current[name]:
                    yield type_url, name, held, "REQUESTED", "", ""
                elif name not in current and name not in t.known:
                    yield type_url, name, "", "DOES_NOT_EXIST", "", ""
                else:
                    yield type_url, name, held, "ACKED", "", ""


def eds_needed(cds_versions: dict[str, str], view: dict) -> set[str]:
    """EDS clusters among the clusters a node holds: its EDS subscription must cover them before
    listeners (which route to them) go out."""
    return set(cds_versions) & set(view.get(xdstypes.ENDPOINT, {}))


def digest(versions: dict[str, str]) -> str:
    """One version for a set of per-resource versions ("" when empty), for status pages."""
    if not versions:
        return ""
    h = hashlib.sha256()
    for name in sorted(versions):
        h.update(f"{name}\0{versions[name]}\1".encode())
    return h.hexdigest()[:12]
