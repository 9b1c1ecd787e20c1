"""Engine choice for gRPC listeners: flag over environment over default; bad values refused."""
from __future__ import annotations

import pytest

from sidecar.dataplane import Dataplane
from sidecar.listeners import grpc_engine
from sidecar.listeners.grpc import GrpcListener
from sidecar.listeners.grpc_h2 import GrpcH2Listener
from sidecar.upstream.grpc_pool import GrpcPool
from sidecar.upstream.h2_pool import H2Pool


@pytest.mark.parametrize("flag,env,want", [
    (None, {}, "h2"),
    (None, {grpc_engine.ENV: "grpcio"}, "grpcio"),
    ("h2", {grpc_engine.ENV: "grpcio"}, "h2"),
    ("grpcio", {}, "grpcio"),
])
def test_choose(flag, env, want):
    assert grpc_engine.choose(flag, env) == want


def test_unknown_engine_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"--grpc-engine: unknown gRPC engine 'nghttp2' \(fix: use one of: h2, grpcio\)"):
        grpc_engine.choose("nghttp2", {})
    with pytest.raises(ValueError, match=grpc_engine.ENV):
        grpc_engine.choose(None, {grpc_engine.ENV: "x"})



def test_the_control_server_chooses_its_xds_engine_the_same_way():
    kw = {"env": "PROTOMESH_XDS_ENGINE", "option": "--xds-engine"}
    assert grpc_engine.choose(None, {"PROTOMESH_XDS_ENGINE": "grpcio", grpc_engine.ENV: "h2"}, **kw) == "grpcio"
    with pytest.raises(ValueError, match=r"^--xds-engine: unknown gRPC engine 'x'"):
        grpc_engine.choose("x", {}, **kw)
    with pytest.raises(ValueError, match=r"^PROTOMESH_XDS_ENGINE: "):
        grpc_engine.choose(None, {"PROTOMESH_XDS_ENGINE": "x"}, **kw)


async def test_make_builds_either_engine():
    dp, pool, h2 = Dataplane("t"), GrpcPool(), H2Pool()
    built = grpc_engine.make("h2", "g", dp, pool, h2)
    assert isinstance(built, GrpcH2Listener) and built.h2pool is h2 and built.pool is pool
    assert isinstance(grpc_engine.make("grpcio", "g", dp, pool, h2), GrpcListener)
