"""Per-node resource views, computed once per mesh generation and shared between nodes."""
from __future__ import annotations

from control.model import Mesh
from control.registry import Registration, Registry
from control.translate import protomesh as pm


class Views:
    def __init__(self, mesh: Mesh, registry: Registry):
        self.mesh = mesh
        self.registry = registry
        self.generation = 0
        self._shared: tuple | None = None
        self._per_node: dict[Registration, dict] = {}

    def invalidate(self, mesh: Mesh | None = None) -> None:
        if mesh is not None:
            self.mesh = mesh
        self.generation += 1
        self._shared = None
        self._per_node.clear()

    def for_node(self, reg: Registration) -> dict[str, dict]:
        view = self._per_node.get(reg)
        if view is not None:
            return view
        if self._shared is None:
            self._shared = (pm.endpoints_view(self.mesh, self.registry), pm.shared_clusters(self.mesh))
        endpoints, clusters = self._shared
        if reg.role == "gateway":
            view = pm.gateway_view(self.mesh, endpoints, clusters)
        else:
            view = pm.sidecar_view(self.mesh, reg, endpoints, clusters)
        self._per_node[reg] = view
        return view
