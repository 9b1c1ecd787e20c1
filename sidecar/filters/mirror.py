"""Request mirroring (RouteAction.request_mirror_policies): send a sampled copy of a request to a
shadow cluster and throw its answer away.

Why it can never hurt the caller: the copy is sent from its own task after the caller's request
has been handed to the primary upstream; nothing waits for it; its failures are only counted; at
most MAX_IN_FLIGHT copies run at once per process (more are dropped and counted); the shadow
endpoint is picked with the cluster's balancer and health, but takes no circuit-breaker slots.

HTTP: the copy carries the request exactly as the primary got it, with the Host suffixed
`-shadow` like Envoy does, and `connection: close`; a body too large for the retry buffer (64 KiB)
is not mirrored.  gRPC: unary-request rpcs (unary, server streaming) are mirrored with the same
metadata; client-streaming and bidi rpcs are not (the request stream cannot be read twice).
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("protomesh.sidecar")

MAX_IN_FLIGHT = 64
SHADOW_TIMEOUT_S = 5.0
_in_flight = 0
_tasks: set = set()


def shadow_host(host: str) -> str:
    """Envoy's shadow authority: `-shadow` after the host, before any port."""
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and (not name.startswith("[") or name.endswith("]")):
        return f"{name}-shadow:{port}"
    return f"{host}-shadow"


def shadow_head(head: bytes) -> bytes:
    """The primary's request head with the Host changed and the connection closed after."""
    lines = head.split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname == b"host":
            line = b"host: " + shadow_host(value.strip().decode("latin-1")).encode("latin-1")
        elif lname in (b"connection", b"keep-alive"):
            continue
        out.append(line)
    out.append(b"connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"


def sampled(dp, route) -> list[str]:
    """The mirror clusters this request goes to (each policy rolls on its own)."""
    return [m.cluster for m in route.mirrors if m.fraction >= 1.0 or dp.rand() < m.fraction]


def _endpoint(dp, cluster_name: str):
    cluster = dp.config.clusters.get(cluster_name)
    st = dp.clusters.get(cluster_name)
    if cluster is None or st is None:
        return None, None
    hosts = st.hosts(dp.config.endpoints_for(cluster), cluster.panic_threshold).pick_level(dp.rand)
    ep = st.balancer.pick(hosts)
    return (st, ep) if ep is not None else (None, None)


def _spawn(dp, cluster: str, coro_factory) -> None:
    global _in_flight
    if _in_flight >= MAX_IN_FLIGHT:
        dp.stats.inc("mirror_requests", (("cluster", cluster), ("result", "dropped")))
        return
    st, ep = _endpoint(dp, cluster)
    if ep is None:
        dp.stats.inc("mirror_requests", (("cluster", cluster), ("result", "no_endpoint")))
        return
    _in_flight += 1

    async def run():
        global _in_flight
        result = "sent"
        try:
            await asyncio.wait_for(coro_factory(ep), SHADOW_TIMEOUT_S)
        except asyncio.TimeoutError:
            result = "timeout"
        except Exception as exc:  # the shadow's trouble is only counted
            result = "failed"
            log.debug("mirror to %s %s failed: %r", cluster, ep.address, exc)
        finally:
            _in_flight -= 1
            st.balancer.release(ep)
            dp.stats.inc("mirror_requests", (("cluster", cluster), ("result", result)))
    task = asyncio.ensure_future(run())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def send_http(dp, call, target, parts: tuple) -> None:
    """`parts` is everything sent to the primary: the head first, then the (framed) body."""
    for cluster in sampled(dp, target.route):
        head = shadow_head(parts[0])

        async def go(ep, head=head):
            reader, writer = await asyncio.open_connection(ep.host, ep.port)
            try:
                writer.write(head)
                writer.writelines(parts[1:])
                await writer.drain()
                while await reader.read(65536):
                    pass  # the answer is discarded; connection: close ends it
            finally:
                writer.close()
        _spawn(dp, cluster, go)


def send_grpc(dp, pool, call, target, shape: str, request: bytes, metadata: tuple) -> None:
    if shape not in ("unary_unary", "unary_stream"):
        return
    for cluster in sampled(dp, target.route):
        async def go(ep):
            rpc = getattr(pool.channel(ep.address), shape)(target.path)(
                request, timeout=SHADOW_TIMEOUT_S, metadata=metadata)
            if shape == "unary_unary":
                await rpc
            else:
                async for _ in rpc:
                    pass
        _spawn(dp, cluster, go)
