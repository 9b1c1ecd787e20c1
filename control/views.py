"""Per-node resource views, computed once per mesh generation and shared between nodes.

The view depends on who asks: our sidecar/gateway (`translate/protomesh.py`), a real Envoy
(`translate/envoy.py`: no protomesh-only extensions; an Envoy gateway may move its listeners) or
a proxyless gRPC client (`translate/proxyless.py`: API listeners named like the targets).
"""
from __future__ import annotations

from control import snapshot
from control.model import Mesh
from control.registry import Registration, Registry
from control.translate import envoy as ev
from control.translate import protomesh as pm
from control.translate import proxyless as px
from protomesh import xdstypes


class Views:
    """Views are snapshots: a registration change marks the endpoints stale and `refresh()` (called
    by the coalesced push) rebuilds the assignments of the services that changed, once for all
    nodes.  Between pushes a node is served the last snapshot; the pending push brings the rest.
    Per-node views keep their other types and take the shared endpoints when next asked for, so
    a refresh costs O(changed services), not O(nodes) — with thousands of sidecars registering,
    rebuilding on every request made the connect storm quadratic."""

    def __init__(self, mesh: Mesh, registry: Registry):
        self.mesh = mesh
        self.registry = registry
        self.generation = 0
        self._shared: tuple | None = None
        self._endpoints_gen = 0  # bumps when the shared endpoints are replaced
        self._per_node: dict[tuple, tuple[int, dict]] = {}  # key -> (endpoints gen, view)
        self._proxyless_endpoints: dict | None = None
        self._endpoints_stale = False
        self._all_endpoints_stale = False  # a mesh edit of static endpoints: rebuild every service
        self._static_changed: set[str] = set()  # ... or of these services

    def invalidate(self, mesh: Mesh | None = None, endpoints_only: bool = False,
                   registrations_only: bool = False, services: set[str] | None = None) -> None:
        """A mesh change rebuilds every view.  An endpoint change only touches endpoints: at the
        next `refresh()` the changed assignments are rebuilt and the per-node views take them.
        `registrations_only`: only registrations changed (the registry knows which services);
        `services`: with `endpoints_only`, the services whose static endpoints changed (None:
        any may have)."""
        if mesh is not None:
            self.mesh = mesh
            endpoints_only = registrations_only = False
        self.generation += 1
        if not (endpoints_only or registrations_only) or self._shared is None:
            self._shared = None
            self._per_node.clear()
            self._proxyless_endpoints = None
            self._endpoints_stale = self._all_endpoints_stale = False
            self._static_changed = set()
            self.registry.take_dirty()
            snapshot.forget_all()
            return
        self._endpoints_stale = True
        if registrations_only:
            return
        if services is None:
            self._all_endpoints_stale = True
        else:
            self._static_changed |= services

    def refresh(self) -> None:
        """Apply pending endpoint changes: called when a push goes out."""
        if not self._endpoints_stale or self._shared is None:
            return
        dirty = self.registry.take_dirty() | self._static_changed
        services = None if self._all_endpoints_stale else dirty
        self._endpoints_stale = self._all_endpoints_stale = False
        self._static_changed = set()
        old, old_proxyless = self._shared[0], self._proxyless_endpoints
        endpoints = pm.endpoints_view(self.mesh, self.registry, old, services)
        self._shared = (endpoints, self._shared[1])
        self._endpoints_gen += 1
        self._proxyless_endpoints = None
        snapshot.forget(old)
        if old_proxyless is not None:
            snapshot.forget(old_proxyless)

    def stamp(self) -> tuple:
        """Changes whenever `for_node` could answer differently for some node."""
        return (self.generation, self._endpoints_gen, self._shared is None)

    def _endpoints_for(self, reg: Registration) -> dict:
        endpoints = self._shared[0]
        if reg.flavour != "grpc":
            return endpoints
        if self._proxyless_endpoints is None:  # proxyless endpoints carry locality names
            self._proxyless_endpoints = px.endpoints(endpoints)
        return self._proxyless_endpoints

    def for_node(self, reg: Registration, overrides: tuple = ()) -> dict[str, dict]:
        """`overrides`: gateway listen addresses from the node's metadata (`envoy.listen_overrides`)."""
        if self._shared is None:
            self.registry.take_dirty()
            self._shared = (pm.endpoints_view(self.mesh, self.registry), pm.shared_clusters(self.mesh))
            self._endpoints_gen += 1
        key = (reg, overrides)
        hit = self._per_node.get(key)
        if hit is not None:
            gen, view = hit
            if gen != self._endpoints_gen:
                view = {**view, xdstypes.ENDPOINT: self._endpoints_for(reg)}
                self._per_node[key] = (self._endpoints_gen, view)
            return view
        endpoints, clusters = self._shared
        if reg.flavour == "grpc":
            view = px.client_view(self.mesh, self._endpoints_for(reg))
        elif reg.flavour == "envoy":
            view = (ev.gateway_view(self.mesh, endpoints, clusters, overrides) if reg.role == "gateway"
                    else ev.sidecar_view(self.mesh, reg, endpoints, clusters))
        elif reg.role == "gateway":
            view = pm.gateway_view(self.mesh, endpoints, clusters)
        else:
            view = pm.sidecar_view(self.mesh, reg, endpoints, clusters)
        self._per_node[key] = (self._endpoints_gen, view)
        return view
