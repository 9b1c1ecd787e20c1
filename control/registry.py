"""Registrations: a sidecar is an endpoint of its service while its xDS stream lives.

The node metadata a sidecar connects with announces its service, protocol, inbound address and
labels.  When the last stream of a node ends, the endpoint stays for a grace period (a sidecar
reconnecting to a restarted control server must not blink out of every peer's endpoint list),
then goes.  Pure bookkeeping: time is passed in.
"""
from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import json_format

from protomesh import xdstypes


@dataclass(frozen=True)
class Registration:
    node_id: str
    role: str  # sidecar | gateway
    flavour: str
    service: str = ""
    protocol: str = ""
    advertise: tuple[str, int] | None = None
    app: tuple[str, int] | None = None
    inbound: tuple[str, int] | None = None
    outbound_http: tuple[str, int] | None = None
    outbound_grpc: tuple[str, int] | None = None
    labels: tuple[tuple[str, str], ...] = ()


class RegistrationError(ValueError):
    pass


def _addr(meta: dict, key: str) -> tuple[str, int] | None:
    value = meta.get(key)
    if not value:
        return None
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit():
        raise RegistrationError(f"node metadata {key}={value!r} is not host:port")
    return host, int(port)


def _flavour_from_agent(user_agent_name: str) -> str:
    """Which data plane a node is when its metadata does not say: Envoy calls itself "envoy",
    grpc's xDS client "gRPC C-core …" / "gRPC Python …"."""
    if user_agent_name == "envoy":
        return "envoy"
    if user_agent_name.lower().startswith("grpc"):
        return "grpc"
    return "unknown"


def registration_from_node(node) -> Registration:
    meta = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
    flavour = meta.get(xdstypes.META_FLAVOUR) or _flavour_from_agent(node.user_agent_name)
    # A proxyless gRPC client is nobody's endpoint unless its metadata says otherwise.
    role = meta.get(xdstypes.META_ROLE, "client" if flavour == "grpc" else "sidecar")
    if role == "gateway":
        return Registration(node.id, role, flavour)
    labels = meta.get(xdstypes.META_LABELS) or {}
    return Registration(
        node_id=node.id, role=role, flavour=flavour,
        service=str(meta.get(xdstypes.META_SERVICE, "")),
        protocol=str(meta.get(xdstypes.META_PROTOCOL, "")),
        advertise=_addr(meta, "protomesh.advertise"),
        app=_addr(meta, xdstypes.META_APP),
        inbound=_addr(meta, xdstypes.META_INBOUND),
        outbound_http=_addr(meta, xdstypes.META_OUTBOUND_HTTP),
        outbound_grpc=_addr(meta, xdstypes.META_OUTBOUND_GRPC),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
    )


class Registry:
    """Registrations indexed by service, and the services whose endpoints changed since the
    views last looked (`take_dirty`): with thousands of sidecars connecting, a registration must
    cost the rebuild of its own service's endpoints, not a scan of every node for every service."""

    def __init__(self, grace_s: float = 5.0):
        self.grace_s = grace_s
        self._regs: dict[str, Registration] = {}
        self._by_service: dict[str, dict[str, Registration]] = {}
        self._streams: dict[str, int] = {}
        self._gone_at: dict[str, float] = {}
        self._dirty: set[str] = set()

    def connect(self, reg: Registration) -> bool:
        """A stream for this node opened.  Returns True when the endpoint set changed."""
        self._streams[reg.node_id] = self._streams.get(reg.node_id, 0) + 1
        self._gone_at.pop(reg.node_id, None)
        old = self._regs.get(reg.node_id)
        if old == reg:
            return False
        if old is not None:
            self._drop(old)
        self._regs[reg.node_id] = reg
        self._by_service.setdefault(reg.service, {})[reg.node_id] = reg
        self._dirty.add(reg.service)
        return True

    def _drop(self, reg: Registration) -> None:
        del self._regs[reg.node_id]
        peers = self._by_service.get(reg.service, {})
        peers.pop(reg.node_id, None)
        if not peers:
            self._by_service.pop(reg.service, None)
        self._dirty.add(reg.service)

    def take_dirty(self) -> set[str]:
        """Services whose registrations changed since the last call."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def disconnect(self, node_id: str, now: float) -> None:
        left = self._streams.get(node_id, 0) - 1
        if left > 0:
            self._streams[node_id] = left
            return
        self._streams.pop(node_id, None)
        if node_id in self._regs:
            self._gone_at[node_id] = now + self.grace_s

    def expire(self, now: float) -> bool:
        """Drop registrations whose grace ran out.  Returns True when something was dropped."""
        due = [n for n, t in self._gone_at.items() if t <= now]
        for n in due:
            del self._gone_at[n]
            if n in self._regs:
                self._drop(self._regs[n])
        return bool(due)

    def next_expiry(self) -> float | None:
        return min(self._gone_at.values(), default=None)

    def endpoints(self, service: str) -> list[Registration]:
        """One registration per advertised address: the workers of one sidecar (`--workers`)
        share their listeners, so they are one endpoint."""
        seen: dict[tuple[str, int], Registration] = {}
        for r in sorted(self._by_service.get(service, {}).values(), key=lambda r: r.node_id):
            if r.service == service and r.advertise and r.advertise not in seen:
                seen[r.advertise] = r
        return list(seen.values())

    def all(self) -> list[Registration]:
        return sorted(self._regs.values(), key=lambda r: r.node_id)
