"""Which engine runs a sidecar's gRPC listeners.

  h2      our own HTTP/2 on asyncio Protocols (sidecar/h2, listeners/grpc_h2.py): frames are
          relayed between connections inside their callbacks; ~10x the calls per CPU-second
          of grpc.aio as a passthrough.  The default.
  grpcio  grpc.aio generic passthrough (listeners/grpc.py), kept as the fallback and for
          side-by-side comparison.

Chosen per process: `--grpc-engine`, else PROTOMESH_GRPC_ENGINE, else the default.  Both
engines take the same constructor and lifecycle (start, drain, close, port, inflight), so the
listener manager only asks `make`.
"""
from __future__ import annotations

import os

ENGINES = ("h2", "grpcio")
DEFAULT = "h2"
ENV = "PROTOMESH_GRPC_ENGINE"


def choose(flag: str | None = None, environ=os.environ, env: str = ENV, option: str = "--grpc-engine") -> str:
    """The engine to run; a bad value is refused with what would have been accepted.  The
    control server chooses its xDS engine the same way (`--xds-engine`, PROTOMESH_XDS_ENGINE)."""
    value = flag or environ.get(env) or DEFAULT
    if value not in ENGINES:
        source = option if flag else env
        raise ValueError(f"{source}: unknown gRPC engine {value!r} (fix: use one of: {', '.join(ENGINES)})")
    return value


def make(engine: str, name: str, dataplane, grpc_pool, h2_pool):
    """A gRPC listener of that engine (not started)."""
    if engine == "grpcio":
        from sidecar.listeners.grpc import GrpcListener
        return GrpcListener(name, dataplane, grpc_pool)
    from sidecar.listeners.grpc_h2 import GrpcH2Listener
    return GrpcH2Listener(name, dataplane, grpc_pool, h2_pool)
