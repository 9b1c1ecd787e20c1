"""Active health checks (Cluster.health_checks): probe every endpoint on a timer and take the
ones that fail out of the balancing set until they pass again.

The decision core is pure and follows Envoy: a host added to a checked cluster is unhealthy
until its first check passes (then healthy at once); a healthy host turns unhealthy after
`unhealthy_threshold` consecutive *network* failures (refused, reset, timed out), or at once when
the host itself answers "not healthy" (an HTTP status outside `expected_statuses`, a gRPC
NOT_SERVING or error status); an unhealthy host needs `healthy_threshold` consecutive passes.
The next check waits `interval` plus up to `interval_jitter` plus up to
`interval_jitter_percent` % of the interval; the first waits up to `initial_jitter`.

`HealthChecker` is the I/O edge: one asyncio task per (cluster, endpoint), reconciled with each
config swap; verdicts land in the dataplane's `ClusterState.hc_unhealthy`, where the host set
(priority levels, panic threshold) picks them up.
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Callable

from sidecar.config.model import HealthCheck

log = logging.getLogger("protomesh.sidecar")


# ---- pure decisions -------------------------------------------------------------------------
class HostHealth:
    """Counters for one endpoint under one health check."""

    __slots__ = ("healthy", "checked", "successes", "failures", "last_failure", "checks")

    def __init__(self) -> None:
        self.healthy = False  # pending the first check counts as unhealthy, as in Envoy
        self.checked = False
        self.successes = 0  # consecutive
        self.failures = 0  # consecutive
        self.last_failure = ""
        self.checks = 0

    def record(self, ok: bool, hc: HealthCheck, network: bool = True, detail: str = "") -> bool:
        """One probe's outcome; True when the host changed between healthy and unhealthy."""
        first = not self.checked
        self.checked = True
        self.checks += 1
        if ok:
            self.failures = 0
            self.successes += 1
            if not self.healthy and (first or self.successes >= hc.healthy_threshold):
                self.healthy = True
                return True
            return False
        self.successes = 0
        self.failures += 1
        self.last_failure = detail
        if self.healthy and (not network or self.failures >= hc.unhealthy_threshold):
            self.healthy = False
            return True
        return False

    def state(self) -> dict:
        return {"state": "healthy" if self.healthy else "unhealthy" if self.checked else "pending",
                "consecutive_successes": self.successes, "consecutive_failures": self.failures,
                "checks": self.checks, "last_failure": self.last_failure}


def next_interval(hc: HealthCheck, rand: Callable[[], float]) -> float:
    delay = hc.interval_s
    if hc.interval_jitter_percent:
        delay += rand() * hc.interval_s * hc.interval_jitter_percent / 100.0
    if hc.interval_jitter_s:
        delay += rand() * hc.interval_jitter_s
    return delay


def status_expected(status: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    """Envoy's expected_statuses are half-open [start, end) ranges."""
    return any(start <= status < end for start, end in ranges)


# ---- probes (I/O) ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    network: bool = True  # a connection-level failure (counts against unhealthy_threshold)
    detail: str = ""


async def probe_tcp(host: str, port: int, hc: HealthCheck, cluster: str, channel=None) -> Outcome:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), hc.timeout_s)
    except asyncio.TimeoutError:
        return Outcome(False, True, "connect timeout")
    except OSError as exc:
        return Outcome(False, True, f"connect: {exc.strerror or exc}")
    writer.close()
    return Outcome(True)


async def probe_http(host: str, port: int, hc: HealthCheck, cluster: str, channel=None) -> Outcome:
    """GET `path` over HTTP/1.1 (Envoy's default codec for health checks), Host = the configured
    host or the cluster name; the status line decides."""
    async def go() -> Outcome:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {hc.path} HTTP/1.1\r\nhost: {hc.host or cluster}\r\n"
                         "user-agent: protomesh-health-check\r\nconnection: close\r\n\r\n".encode("latin-1"))
            line = await reader.readline()
        finally:
            writer.close()
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            return Outcome(False, True, "no HTTP status line")
        status = int(parts[1])
        if status_expected(status, hc.expected_statuses):
            return Outcome(True)
        return Outcome(False, False, f"HTTP {status}")
    try:
        return await asyncio.wait_for(go(), hc.timeout_s)
    except asyncio.TimeoutError:
        return Outcome(False, True, "timeout")
    except OSError as exc:
        return Outcome(False, True, f"connect: {exc.strerror or exc}")


async def probe_grpc(host: str, port: int, hc: HealthCheck, cluster: str, channel=None) -> Outcome:
    """grpc.health.v1.Health/Check for `service_name`; only SERVING passes."""
    import grpc
    from grpc_health.v1 import health_pb2
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                response_deserializer=health_pb2.HealthCheckResponse.FromString)
    try:
        resp = await check(health_pb2.HealthCheckRequest(service=hc.service_name), timeout=hc.timeout_s)
    except grpc.aio.AioRpcError as err:
        code = err.code()
        network = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return Outcome(False, network, f"grpc {code.name}")
    if resp.status == health_pb2.HealthCheckResponse.SERVING:
        return Outcome(True)
    return Outcome(False, False, health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


PROBES = {"tcp": probe_tcp, "http": probe_http, "grpc": probe_grpc}


# ---- runner ---------------------------------------------------------------------------------
class _Session:
    __slots__ = ("cluster", "address", "check", "health", "task", "channel")

    def __init__(self, cluster: str, address: str, check: HealthCheck, health: HostHealth):
        self.cluster, self.address, self.check, self.health = cluster, address, check, health
        self.task: asyncio.Task | None = None
        self.channel = None


class HealthChecker:
    """One probing task per endpoint of every cluster that has a health check."""

    def __init__(self, dataplane, rand: Callable[[], float] = random.random, probes=None):
        self.dataplane = dataplane
        self.rand = rand
        self.probes = probes or PROBES
        self.sessions: dict[tuple[str, str], _Session] = {}

    def reconcile(self, config) -> None:
        """Called with every config swap: start sessions for new endpoints (pending = unhealthy),
        keep the verdicts of endpoints still present, stop the rest."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        wanted: dict[tuple[str, str], HealthCheck] = {}
        for name, cluster in config.clusters.items():
            if cluster.health_checks:
                hc = cluster.health_checks[0]
                for ep in config.endpoints_for(cluster):
                    wanted[(name, ep.address)] = hc
        for key in [k for k in self.sessions if k not in wanted]:
            self._stop(self.sessions.pop(key))
        for key, hc in wanted.items():
            sess = self.sessions.get(key)
            if sess is not None and sess.check == hc:
                continue
            health = sess.health if sess is not None and sess.check.kind == hc.kind else HostHealth()
            if sess is not None:
                self._stop(sess)
            sess = self.sessions[key] = _Session(key[0], key[1], hc, health)
            sess.task = asyncio.ensure_future(self._run(sess))
        for name, st in self.dataplane.clusters.items():
            unhealthy = {addr for (c, addr), s in self.sessions.items() if c == name and not s.health.healthy}
            if unhealthy != st.hc_unhealthy:
                st.hc_unhealthy = unhealthy
                st.changed()

    def _stop(self, sess: _Session) -> None:
        if sess.task is not None:
            sess.task.cancel()
        if sess.channel is not None:
            asyncio.ensure_future(sess.channel.close(grace=None))
            sess.channel = None

    async def _run(self, sess: _Session) -> None:
        hc = sess.check
        host, _, port = sess.address.rpartition(":")
        probe = self.probes[hc.kind]
        if hc.kind == "grpc" and self.probes is PROBES:
            import grpc
            opts = [("grpc.enable_retries", 0)]
            if hc.authority:
                opts.append(("grpc.default_authority", hc.authority))
            sess.channel = grpc.aio.insecure_channel(sess.address, options=opts)
        await asyncio.sleep(self.rand() * hc.initial_jitter_s)
        while True:
            try:
                out = await probe(host.strip("[]"), int(port), hc, sess.cluster, sess.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a probe bug must not end the checking
                out = Outcome(False, True, f"probe error: {exc!r}")
            self._apply(sess, out)
            await asyncio.sleep(next_interval(hc, self.rand))

    def _apply(self, sess: _Session, out: Outcome) -> None:
        if self.sessions.get((sess.cluster, sess.address)) is not sess:
            return  # replaced while probing
        stats = self.dataplane.stats
        stats.inc("health_checks", (("cluster", sess.cluster), ("result", "success" if out.ok else "failure")))
        if not sess.health.record(out.ok, sess.check, out.network, out.detail):
            return
        st = self.dataplane.clusters.get(sess.cluster)
        healthy = sess.health.healthy
        stats.inc("health_check_transitions", (("cluster", sess.cluster),
                                               ("to", "healthy" if healthy else "unhealthy")))
        log.info("health check: %s endpoint %s is now %s%s", sess.cluster, sess.address,
                 "healthy" if healthy else "unhealthy", "" if healthy else f" ({out.detail})")
        if st is None:
            return
        if healthy:
            st.hc_unhealthy.discard(sess.address)
        else:
            st.hc_unhealthy.add(sess.address)
        st.changed()

    def state(self, cluster: str, address: str) -> dict | None:
        sess = self.sessions.get((cluster, address))
        return None if sess is None else sess.health.state()

    async def close(self) -> None:
        sessions = list(self.sessions.values())
        self.sessions.clear()
        for sess in sessions:
            self._stop(sess)
        await asyncio.gather(*(s.task for s in sessions if s.task is not None), return_exceptions=True)
