"""Active health checks: the pure state machine (tables), jitter bounds, the parser/translator
round trip, and the runner against real loopback servers (TCP, HTTP, grpc.health.v1)."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from control.model import HealthCheckSpec, Traffic
from control.translate import build
from sidecar.config.errors import ConfigError
from sidecar.config.model import Cluster, Endpoint, HealthCheck, RuntimeConfig
from sidecar.config.parse import parse_cluster
from sidecar.dataplane import Dataplane
from sidecar.upstream.health import HealthChecker, HostHealth, next_interval, status_expected
from tests.waiting import until

HC = HealthCheck("tcp", 0.05, 0.5, unhealthy_threshold=2, healthy_threshold=3)


@pytest.mark.parametrize("outcomes, healthy_after", [
    ([], [False]),  # pending: unhealthy until the first check
    ([True], [True]),  # the first pass makes a new host healthy at once
    ([False], [False]),
    ([False, True], [False, False]),  # once failed, healthy_threshold (3) passes are needed
    ([False, True, True, True], [False, False, False, True]),
    ([True, False], [True, True]),  # one network failure is under unhealthy_threshold (2)
    ([True, False, False], [True, True, False]),
    ([True, False, True, False], [True, True, True, True]),  # a pass resets the failure count
])
def test_transitions_network_failures(outcomes, healthy_after):
    h = HostHealth()
    seen = [h.healthy] if not outcomes else []
    for ok in outcomes:
        h.record(ok, HC, network=True)
        seen.append(h.healthy)
    assert seen == healthy_after


def test_an_active_failure_turns_unhealthy_at_once_and_reports_the_change():
    h = HostHealth()
    assert h.record(True, HC) is True
    assert h.record(False, HC, network=False, detail="HTTP 503") is True
    assert not h.healthy and h.state()["last_failure"] == "HTTP 503"
    assert h.record(False, HC, network=False) is False  # no change: already unhealthy


def test_interval_jitter_bounds():
    hc = HealthCheck("tcp", 10.0, 1.0, 1, 1, interval_jitter_s=2.0, interval_jitter_percent=50)
    assert next_interval(hc, lambda: 0.0) == 10.0
    assert next_interval(hc, lambda: 0.999999) == pytest.approx(10.0 + 5.0 + 2.0, abs=1e-4)


@pytest.mark.parametrize("status, ok", [(200, True), (204, True), (299, True), (300, False), (503, False)])
def test_expected_status_ranges_are_half_open(status, ok):
    assert status_expected(status, ((200, 300),)) is ok


def test_mesh_spec_round_trips_through_envoy_fields():
    spec = HealthCheckSpec("http", 2.0, 0.5, 3, 2, 0.1, 10, 1.0, "/healthz", "svc.local", ((200, 201), (204, 205)))
    c = build.apply_traffic_cluster(build.cluster("products", "round_robin", False, 1.0), Traffic(health_check=spec))
    assert c.health_checks[0].no_traffic_interval == c.health_checks[0].interval  # so Envoy checks as often
    hc = parse_cluster(c).health_checks[0]
    assert (hc.kind, hc.interval_s, hc.timeout_s, hc.unhealthy_threshold, hc.healthy_threshold) == ("http", 2.0, 0.5, 3, 2)
    assert (hc.path, hc.host, hc.expected_statuses) == ("/healthz", "svc.local", ((200, 201), (204, 205)))
    assert (hc.interval_jitter_s, hc.interval_jitter_percent, hc.initial_jitter_s) == (0.1, 10, 1.0)
    g = parse_cluster(build.apply_traffic_cluster(build.cluster("u", "round_robin", True, 1.0),
                                                  Traffic(health_check=HealthCheckSpec("grpc", service_name="demo.Users"))))
    assert g.health_checks[0].kind == "grpc" and g.health_checks[0].service_name == "demo.Users"


@pytest.mark.parametrize("mutate, where", [
    (lambda h: h.unhealthy_interval.FromSeconds(3), "health_checks[0].unhealthy_interval"),
    (lambda h: h.no_traffic_interval.FromSeconds(60), "health_checks[0].no_traffic_interval"),
    (lambda h: h.http_health_check.request_headers_to_add.add().header.key.__len__(), None),
])
def test_fields_not_honoured_are_refused_by_name(mutate, where):
    c = build.apply_traffic_cluster(build.cluster("c", "round_robin", False, 1.0),
                                    Traffic(health_check=HealthCheckSpec("http")))
    mutate(c.health_checks[0])
    with pytest.raises(ConfigError) as info:
        parse_cluster(c)
    assert info.value.where.startswith("Cluster c.health_checks[0]")
    if where:
        assert info.value.where == f"Cluster c.{where}"
    c.health_checks.append(c.health_checks[0])
    with pytest.raises(ConfigError):
        parse_cluster(c)


# ---- the runner against real servers ----------------------------------------------------------
class HttpHealth:
    """Answers every request with `self.status`."""

    def __init__(self):
        self.status = 200
        self.paths = []

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.paths.append(head.split(b" ")[1].decode())
            writer.write(b"HTTP/1.1 %d X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % self.status)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def stop(self):
        self.server.close()


def config_with(check: HealthCheck, ports: list[int], http2=False) -> RuntimeConfig:
    eps = tuple(Endpoint("127.0.0.1", p) for p in ports)
    cluster = Cluster("svc", "round_robin", http2, 1.0, False, eps, health_checks=(check,))
    return RuntimeConfig(clusters={"svc": cluster})


async def test_http_checks_take_a_failing_endpoint_out_and_bring_it_back():
    a, b = await HttpHealth().start(), await HttpHealth().start()
    dp = Dataplane("t")
    checker = HealthChecker(dp)
    dp.on_swap = checker.reconcile
    check = HealthCheck("http", 0.03, 0.5, 2, 2, path="/healthz")
    config = config_with(check, [a.port, b.port])
    try:
        dp.swap(config)
        st = dp.clusters["svc"]
        assert st.hc_unhealthy == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}  # pending first check
        await until(lambda: not st.hc_unhealthy)
        assert a.paths[0] == "/healthz"
        b.status = 503  # an active failure: out at once
        await until(lambda: st.hc_unhealthy == {f"127.0.0.1:{b.port}"})
        hosts = st.hosts(config.endpoints_for(config.clusters["svc"]), 50.0).levels[0].hosts
        assert [e.port for e in hosts] == [a.port]
        assert dp.stats.counter("health_check_transitions", (("cluster", "svc"), ("to", "unhealthy"))) == 1
        b.status = 200  # healthy_threshold (2) passes bring it back
        await until(lambda: not st.hc_unhealthy)
        assert checker.state("svc", f"127.0.0.1:{b.port}")["state"] == "healthy"
        # Panic threshold: with both unhealthy (0% < 50%), every endpoint is used again.
        a.status = b.status = 500
        await until(lambda: len(st.hc_unhealthy) == 2)
        assert st.hosts(config.endpoints_for(config.clusters["svc"]), 50.0).panic
    finally:
        await checker.close()
        a.stop()
        b.stop()


async def test_tcp_checks_count_connect_failures_against_the_threshold():
    a = await HttpHealth().start()
    dp = Dataplane("t")
    checker = HealthChecker(dp)
    dp.on_swap = checker.reconcile
    port = a.port
    try:
        dp.swap(config_with(HealthCheck("tcp", 0.03, 0.5, 3, 1), [port]))
        st = dp.clusters["svc"]
        await until(lambda: not st.hc_unhealthy)
        a.stop()
        await a.server.wait_closed()
        await until(lambda: st.hc_unhealthy == {f"127.0.0.1:{port}"})
        state = checker.state("svc", f"127.0.0.1:{port}")
        assert state["consecutive_failures"] >= 3 and "connect" in state["last_failure"]
        # Endpoints removed from the config stop being checked.
        dp.swap(RuntimeConfig(clusters={"svc": Cluster("svc", "round_robin", False, 1.0, False, ())}))
        assert checker.sessions == {} and not st.hc_unhealthy
    finally:
        await checker.close()


async def test_grpc_health_protocol():
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    dp = Dataplane("t")
    checker = HealthChecker(dp)
    dp.on_swap = checker.reconcile
    set_status = servicer.set
    try:
        r = set_status("demo.Users", health_pb2.HealthCheckResponse.SERVING)
        if asyncio.iscoroutine(r):
            await r
        dp.swap(config_with(HealthCheck("grpc", 0.03, 0.5, 2, 1, service_name="demo.Users"), [port], http2=True))
        st = dp.clusters["svc"]
        await until(lambda: not st.hc_unhealthy)
        r = set_status("demo.Users", health_pb2.HealthCheckResponse.NOT_SERVING)
        if asyncio.iscoroutine(r):
            await r
        await until(lambda: st.hc_unhealthy)
        assert checker.state("svc", f"127.0.0.1:{port}")["last_failure"] == "NOT_SERVING"
    finally:
        await checker.close()
        await server.stop(None)
