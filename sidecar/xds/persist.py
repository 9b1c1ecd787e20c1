"""The last ACKed resources on disk, so a sidecar restarted while the control server is down
still serves.  Written atomically (temp file + rename) after each accepted update."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from protomesh import xdstypes

log = logging.getLogger("protomesh.sidecar.xds")


class LastGood:
    def __init__(self, path: Path):
        self.path = path

    def save(self, store) -> None:
        # One DiscoveryResponse per type, length-prefixed, in push order.
        chunks = []
        for type_url in xdstypes.PUSH_ORDER:
            st = store.types[type_url]
            if not st.version:
                continue
            data = discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=st.version,
                                                   resources=list(st.raw.values())).SerializeToString()
            chunks.append(len(data).to_bytes(4, "big") + data)
        tmp = self.path.with_suffix(".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"".join(chunks))
        os.replace(tmp, self.path)

    def load(self) -> dict[str, tuple[str, list]]:
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        out = {}
        pos = 0
        try:
            while pos < len(blob):
                size = int.from_bytes(blob[pos:pos + 4], "big")
                resp = discovery_pb2.DiscoveryResponse.FromString(blob[pos + 4:pos + 4 + size])
                pos += 4 + size
                out[resp.type_url] = (resp.version_info, list(resp.resources))
        except DecodeError as exc:
            log.warning("ignoring corrupt persisted config %s: %s", self.path, exc)
            return {}
        return out
