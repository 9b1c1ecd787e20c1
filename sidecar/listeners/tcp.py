"""L4 proxy listener (Envoy's TcpProxy network filter): each accepted connection is joined to a
connection to one endpoint of the listener's cluster, and bytes are relayed both ways.

- The endpoint is chosen like an HTTP request's: the cluster's balancer over its host set, so
  active health checks, outlier ejection, priorities and the panic threshold apply.
- A failed or timed-out connect (the cluster's `connect_timeout`) is reported to outlier
  detection as a gateway failure and, within `max_connect_attempts`, another endpoint is tried;
  a successful connect counts as a success.  A connection that finds no endpoint is closed at once
  and logged with its reason (`no_healthy_upstream`, `upstream_unavailable`).
- Half-close both ways: an EOF from one side is passed on as a FIN to the other, which may keep
  sending; the pair closes when both directions have ended, or when either side resets.
- Backpressure: a direction reads again only once the other side's transport has drained.
- `idle_timeout` (Envoy's default: 1 hour) closes a pair with no bytes either way for that long.
"""
from __future__ import annotations

import asyncio
import logging
import time

from sidecar.dataplane import Dataplane

log = logging.getLogger("protomesh.sidecar")
CHUNK = 64 * 1024


class TcpListener:
    def __init__(self, name: str, dataplane: Dataplane):
        self.name = name
        self.dataplane = dataplane
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        self._server = await asyncio.start_server(self._accept, host, port, reuse_port=reuse_port or None)
        self.port = self._server.sockets[0].getsockname()[1]

    def connections(self) -> int:
        return len(self._conns)

    async def _accept(self, reader, writer) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()  # closed by drain/close: nobody awaits this task
        finally:
            self._conns.discard(task)

    def _pick(self, st, cluster, tried: set):
        dp = self.dataplane
        dp.sweep_all()
        hosts = st.hosts(dp.config.endpoints_for(cluster), cluster.panic_threshold).pick_level(dp.rand)
        fresh = tuple(h for h in hosts if h.address not in tried) or hosts
        return st.balancer.pick(fresh)

    def _report(self, st, cluster_name: str, address: str, status: int) -> None:
        if st.outlier is not None and st.outlier.record(address, status, self.dataplane.clock()):
            st.changed()
            self.dataplane.stats.inc("outlier_ejections", (("cluster", cluster_name),))

    async def _serve(self, reader, writer) -> None:
        dp = self.dataplane
        start = time.perf_counter()
        peer = writer.get_extra_info("peername") or ("", 0)
        record = {"listener": self.name, "protocol": "tcp", "peer": f"{peer[0]}:{peer[1]}", "cluster": "",
                  "upstream": "", "reason": "", "bytes_in": 0, "bytes_out": 0, "attempts": 0}
        config = dp.config
        spec = config.listeners.get(self.name)
        up_writer = None
        ep = st = None
        try:
            if spec is None or spec.tcp is None:
                record["reason"] = "config_pending"
                return
            record["cluster"] = name = spec.tcp.cluster
            cluster, st = config.clusters.get(name), dp.clusters.get(name)
            if cluster is None or st is None:
                record["reason"] = "cluster_not_found"
                return
            tried: set = set()
            for _ in range(spec.tcp.max_connect_attempts):
                ep = self._pick(st, cluster, tried)
                if ep is None:
                    record["reason"] = "no_healthy_upstream"
                    return
                record["attempts"] += 1
                try:
                    up_reader, up_writer = await asyncio.wait_for(
                        asyncio.open_connection(ep.host, ep.port), cluster.connect_timeout_s)
                    break
                except (OSError, asyncio.TimeoutError) as exc:
                    self._report(st, name, ep.address, 504 if isinstance(exc, asyncio.TimeoutError) else 503)
                    st.balancer.release(ep)
                    tried.add(ep.address)
                    ep = None
                    record["reason"] = "upstream_unavailable"
            if up_writer is None:
                return
            record["reason"] = ""
            record["upstream"] = ep.address
            self._report(st, name, ep.address, 200)
            await self._relay(reader, writer, up_reader, up_writer, spec.tcp.idle_timeout_s, record)
        finally:
            if ep is not None and st is not None:
                st.balancer.release(ep)
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
            ms = (time.perf_counter() - start) * 1000.0
            dp.stats.inc("tcp_connections", (("listener", self.name), ("cluster", record["cluster"] or "-"),
                                             ("reason", record["reason"] or "ok")))
            dp.stats.inc("tcp_bytes", (("listener", self.name), ("direction", "in")), record["bytes_in"])
            dp.stats.inc("tcp_bytes", (("listener", self.name), ("direction", "out")), record["bytes_out"])
            if record["reason"]:
                dp.stats.inc("local_replies", (("listener", self.name), ("reason", record["reason"])))
            record["duration_ms"] = round(ms, 3)
            dp.access_log.write(record)

    async def _relay(self, reader, writer, up_reader, up_writer, idle_s, record) -> None:
        loop = asyncio.get_running_loop()
        last = [loop.time()]

        async def pipe(src, dst, key):
            try:
                while True:
                    data = await src.read(CHUNK)
                    if not data:
                        break
                    last[0] = loop.time()
                    record[key] += len(data)
                    dst.write(data)
                    await dst.drain()  # backpressure: read no more until the other side takes it
                if dst.can_write_eof() and not dst.is_closing():
                    dst.write_eof()  # half-close: pass the FIN on, keep the other direction open
            except (ConnectionError, OSError):
                writer.transport.abort()  # a reset on one side resets both
                up_writer.transport.abort()

        pumps = asyncio.gather(pipe(reader, up_writer, "bytes_in"), pipe(up_reader, writer, "bytes_out"))
        if idle_s is None:
            await pumps
            return
        while True:
            left = last[0] + idle_s - loop.time()
            if left <= 0:
                record["reason"] = "idle_timeout"
                writer.transport.abort()
                up_writer.transport.abort()
                await asyncio.gather(pumps, return_exceptions=True)
                return
            try:
                await asyncio.wait_for(asyncio.shield(pumps), left)
                return
            except asyncio.TimeoutError:
                continue

    async def drain(self, timeout_s: float) -> None:
        """Stop accepting; connections in flight get up to `timeout_s` to end by themselves."""
        if self._server is not None:
            self._server.close()
        conns = list(self._conns)
        if conns:
            await asyncio.wait(conns, timeout=timeout_s)
        for task in conns:
            task.cancel()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
