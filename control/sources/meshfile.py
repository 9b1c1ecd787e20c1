"""Watch mesh.yaml (and the protos it names) and hand each valid edit to the control plane.

Polling (every `interval_s`) keeps this dependency-free and works on every filesystem and in
containers with mounted ConfigMaps (which change by symlink swap, invisible to some inotify
setups).  A broken edit keeps the old mesh in force and is reported with file, field and fix.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Callable

from control.errors import MeshError
from control.model import Mesh, load_mesh

log = logging.getLogger("protomesh.control")


def _fingerprint(mesh_path: Path, mesh: Mesh | None) -> str:
    h = hashlib.sha256()
    files = [mesh_path]
    if mesh is not None:
        for svc in mesh.services.values():
            for proto in svc.protos:
                files.extend(Path(p) / proto for p in mesh.proto_paths)
    for f in files:
        try:
            h.update(f.read_bytes())
        except OSError:
            h.update(b"missing:" + str(f).encode())
    return h.hexdigest()


class MeshWatcher:
    def __init__(self, path: str | Path, on_mesh: Callable[[Mesh], None], interval_s: float = 0.5):
        self.path = Path(path)
        self.on_mesh = on_mesh
        self.interval_s = interval_s
        self.mesh: Mesh | None = None
        self.error = ""
        self.reloads = 0
        self.rejected = 0
        self._seen = ""

    def load_initial(self) -> Mesh:
        """Raises MeshError: a control server does not start on a broken mesh."""
        self.mesh = load_mesh(self.path)
        self._seen = _fingerprint(self.path, self.mesh)
        return self.mesh

    def check(self) -> bool:
        """Reload if the files changed; returns True when a new mesh was applied."""
        fp = _fingerprint(self.path, self.mesh)
        if fp == self._seen:
            return False
        self._seen = fp
        try:
            mesh = load_mesh(self.path)
        except MeshError as exc:
            self.error = str(exc)
            self.rejected += 1
            log.error("mesh edit rejected, the previous mesh stays in force: %s", exc)
            return False
        self.error = ""
        self.mesh = mesh
        self.reloads += 1
        self._seen = _fingerprint(self.path, mesh)
        log.info("mesh reloaded from %s (%d services)", self.path, len(mesh.services))
        self.on_mesh(mesh)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.check()
            except Exception:  # a bug here must not end the watch: later edits still apply
                self.error = "internal error while reloading (see the control server log)"
                self.rejected += 1
                log.exception("mesh reload failed; the previous mesh stays in force")
