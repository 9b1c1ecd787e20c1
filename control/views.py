"""Per-node resource views, computed once per mesh generation and shared between nodes.

The view depends on who asks: our sidecar/gateway (`translate/protomesh.py`), a real Envoy
(`translate/envoy.py`: no protomesh-only extensions; an Envoy gateway may move its listeners) or
a proxyless gRPC client (`translate/proxyless.py`: API listeners named like the targets).
"""
from __future__ import annotations

from control.model import Mesh
from control.registry import Registration, Registry
from control.translate import envoy as ev
from control.translate import protomesh as pm
from control.translate import proxyless as px
from protomesh import xdstypes


class Views:
    def __init__(self, mesh: Mesh, registry: Registry):
        self.mesh = mesh
        self.registry = registry
        self.generation = 0
        self._shared: tuple | None = None
        self._per_node: dict[tuple, dict] = {}
        self._proxyless_endpoints: dict | None = None
        self._endpoints_stale = False

    def invalidate(self, mesh: Mesh | None = None, endpoints_only: bool = False) -> None:
        """A mesh change rebuilds every view.  A registration change only touches endpoints:
        the per-node views keep everything else and take the new ClusterLoadAssignments, so a
        thousand sidecars connecting cost a thousand small updates, not a thousand rebuilds
        of a thousand views."""
        if mesh is not None:
            self.mesh = mesh
            endpoints_only = False
        self.generation += 1
        self._proxyless_endpoints = None
        if not endpoints_only or self._shared is None:
            self._shared = None
            self._per_node.clear()
            self._endpoints_stale = False
            return
        self._endpoints_stale = True  # rebuilt once, when a view is next asked for

    def _refresh_endpoints(self) -> None:
        self._endpoints_stale = False
        endpoints = pm.endpoints_view(self.mesh, self.registry)
        self._shared = (endpoints, self._shared[1])
        for key, view in list(self._per_node.items()):
            if key[0].flavour == "grpc":
                del self._per_node[key]  # proxyless endpoints carry locality data: rebuild those
            else:
                self._per_node[key] = {**view, xdstypes.ENDPOINT: endpoints}

    def for_node(self, reg: Registration, overrides: tuple = ()) -> dict[str, dict]:
        """`overrides`: gateway listen addresses from the node's metadata (`envoy.listen_overrides`)."""
        if self._endpoints_stale:
            self._refresh_endpoints()
        key = (reg, overrides)
        view = self._per_node.get(key)
        if view is not None:
            return view
        if self._shared is None:
            self._shared = (pm.endpoints_view(self.mesh, self.registry), pm.shared_clusters(self.mesh))
        endpoints, clusters = self._shared
        if reg.flavour == "grpc":
            if self._proxyless_endpoints is None:
                self._proxyless_endpoints = px.endpoints(endpoints)
            view = px.client_view(self.mesh, self._proxyless_endpoints)
        elif reg.flavour == "envoy":
            view = (ev.gateway_view(self.mesh, endpoints, clusters, overrides) if reg.role == "gateway"
                    else ev.sidecar_view(self.mesh, reg, endpoints, clusters))
        elif reg.role == "gateway":
            view = pm.gateway_view(self.mesh, endpoints, clusters)
        else:
            view = pm.sidecar_view(self.mesh, reg, endpoints, clusters)
        self._per_node[key] = view
        return view
