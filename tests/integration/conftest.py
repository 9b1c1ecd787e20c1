"""Fixtures that run the real mesh: every process started here, on 127.0.0.1, stopped by PID."""
from __future__ import annotations

import asyncio
import threading

import pytest

from demo.topology import Topology
from protomesh.collector import Collector


class CollectorThread:
    """A real OTLP/gRPC receiver on its own event loop, so blocking test code can poll it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.collector = Collector("127.0.0.1:0")
        asyncio.run_coroutine_threadsafe(self.collector.start(), self.loop).result(10)

    @property
    def endpoint(self) -> str:
        return self.collector.endpoint

    def wait_for(self, predicate, timeout: float) -> list[dict]:
        return asyncio.run_coroutine_threadsafe(self.collector.wait_for(predicate, timeout), self.loop).result(timeout + 5)

    def close(self):
        asyncio.run_coroutine_threadsafe(self.collector.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def collector():
    c = CollectorThread()
    yield c
    c.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, collector):
    """The demo mesh (2 users replicas, orders, products, gateway) shared by read-only tests."""
    topo = Topology(tmp_path_factory.mktemp("mesh"), otlp=collector.endpoint)
    try:
        topo.start_all(users_replicas=2)
        yield topo
    finally:
        topo.stop_all()


@pytest.fixture
def fresh_mesh(tmp_path):
    """A private mesh for tests that break things (no tracing)."""
    topo = Topology(tmp_path)
    try:
        yield topo
    finally:
        topo.stop_all()
