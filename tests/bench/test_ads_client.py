"""The bench's simulated sidecar streams (`bench/control_sim.run_stream` on `bench/ads_client.py`)
against a real `protomesh control` process on loopback: they sync, ACK what the server then
counts as ACKed, see an endpoint registration, end cleanly on stop, and report connect failures
and the server's refusals the way grpc.aio did."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from bench import ads_client
from bench.control_sim import Registrant, Subscriber, marker_ports, run_stream, sim_node
from protomesh import xdstypes
from protomesh.launch import Launcher, free_port, http_ok, wait_until
from sidecar.h2 import grpcwire
from sidecar.h2.connection import H2Connection

REPO = Path(__file__).resolve().parents[2]
SERVICES = 3
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)]


class Control:
    """One `protomesh control` process; `xds` and `admin` are its addresses."""

    def __init__(self, workdir: Path, xds_port: int | None = None):
        mesh = workdir / "mesh.yaml"
        services = {"bench": {"protocol": "http"}, **{f"app-{k}": {"protocol": "http"} for k in range(SERVICES)}}
        mesh.write_text(json.dumps({"services": services}))  # YAML is a superset of JSON
        self.launcher = Launcher(workdir / "logs", env={"PYTHONPATH": str(REPO)})
        self.xds, self.admin = f"127.0.0.1:{xds_port or free_port()}", f"127.0.0.1:{free_port()}"
        self.proc = self.launcher.start("control", ["control", "--mesh", str(mesh), "--xds", self.xds,
                                                    "--admin", self.admin, "--grace", "1"])

    def wait_ready(self) -> None:
        wait_until(lambda: http_ok(f"http://{self.admin}/ready"), 30, "the control server", proc=self.proc)

    def nodes(self) -> dict[str, dict]:
        with urllib.request.urlopen(f"http://{self.admin}/nodes", timeout=5) as resp:
            return {n["node"]: n for n in json.loads(resp.read())}

    def stop(self) -> None:
        self.launcher.stop_all()


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    server = Control(tmp_path_factory.mktemp("control"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


async def eventually(predicate, timeout_s: float, what: str):
    """Poll `predicate` on the event loop until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def off_loop(fn, *args):
    """A blocking wait (a process becoming ready, a thread ending) without stalling the streams."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class Tracked:
    """One simulated sidecar and what it saw: response types, and the marker ports of EDS
    responses whose ACK `on_acked` reported."""

    def __init__(self, i: int):
        self.node_id = f"sim-{i}"
        self.sub = Subscriber(sim_node(i, SERVICES))
        self.types: set[str] = set()
        self.acked_ports: set[int] = set()
        self._ports: set[int] = set()

    def seen(self, resp) -> None:
        self.types.add(resp.type_url)
        self._ports = marker_ports(resp.resources) if resp.type_url == xdstypes.ENDPOINT else set()

    def acked(self, resp) -> None:
        self.acked_ports |= self._ports

    def run(self, xds: str, stop: asyncio.Event, **kw):
        return asyncio.ensure_future(run_stream(xds, self.sub, stop, self.seen, on_acked=self.acked, **kw))

    @property
    def synced(self) -> bool:
        return len(self.types) == 4


def in_sync(node: dict) -> bool:
    types = node["types"]
    return len(types) == 4 and all(t["acked"] == t["sent"] and not t["pending"] for t in types.values())


async def test_streams_sync_ack_and_see_an_endpoint_registration(control):
    sims = [Tracked(i) for i in range(5)]
    stop = asyncio.Event()
    tasks = [s.run(control.xds, stop) for s in sims]
    registrant = None
    try:
        await eventually(lambda: all(s.synced for s in sims) or any(t.done() for t in tasks), 20,
                         "every stream synced")
        assert all(s.synced for s in sims), [t.result() for t in tasks if t.done()]
        # The server parsed every ACK: each type it sent is ACKed at that version.
        ids = {s.node_id for s in sims}

        def server_in_sync() -> bool:
            nodes = control.nodes()
            return all(i in nodes and in_sync(nodes[i]) for i in ids)
        await eventually(server_in_sync, 10, "the server to count every stream's ACKs")

        registrant = Registrant(control.xds, 4321)
        registrant.start()
        await eventually(lambda: all(4321 in s.acked_ports for s in sims), 20,
                         "every stream to ACK the EDS holding the registered endpoint")
        assert not any(t.done() for t in tasks)
    finally:
        stop.set()
        if registrant is not None:
            await off_loop(registrant.close)
    assert await asyncio.wait_for(asyncio.gather(*tasks), 5) == [""] * len(sims)
    assert registrant.error == ""


async def test_stop_resets_the_stream_and_the_server_sees_it_go(control):
    sim = Tracked(100)
    stop = asyncio.Event()
    task = sim.run(control.xds, stop)
    await eventually(lambda: sim.synced or task.done(), 20, "the stream to sync")
    await eventually(lambda: sim.node_id in control.nodes(), 10, "the server to list the stream")
    stop.set()
    assert await asyncio.wait_for(task, 2) == ""
    await eventually(lambda: sim.node_id not in control.nodes(), 10, "the server to drop the stream")


async def test_a_closed_port_is_a_connect_error():
    error = await asyncio.wait_for(run_stream(f"127.0.0.1:{free_port()}", Subscriber(sim_node(0, 1)),
                                              asyncio.Event(), lambda r: None), 10)
    assert error.startswith("UNAVAILABLE: connect failed:"), error


async def test_stop_ends_a_wait_for_ready_connect_in_its_backoff():
    failed = asyncio.Event()

    def rand() -> float:  # drawn once the first connect was refused
        failed.set()
        return 1.0
    stopped = asyncio.get_running_loop().create_future()
    settings = ads_client.ChannelSettings(initial_s=10.0, max_s=10.0)
    connecting = asyncio.ensure_future(ads_client.connect(f"127.0.0.1:{free_port()}", stopped, settings,
                                                          wait_for_ready=True, rand=rand))
    await asyncio.wait_for(failed.wait(), 5)
    assert not connecting.done()
    stopped.set_result(None)
    assert await asyncio.wait_for(connecting, 2) is None


async def test_wait_for_ready_connects_once_the_server_is_up(tmp_path):
    port = free_port()
    sim, stop = Tracked(200), asyncio.Event()
    task = sim.run(f"127.0.0.1:{port}", stop, options=FAST_RECONNECT, wait_for_ready=True)
    server = Control(tmp_path, xds_port=port)
    try:
        await off_loop(server.wait_ready)
        assert not task.done(), task.result()  # without wait_for_ready, a refused connect ends it
        await eventually(lambda: sim.synced or task.done(), 20, "the stream to sync")
        assert sim.synced
    finally:
        stop.set()
        server.stop()
    assert await asyncio.wait_for(task, 5) == ""


async def test_a_refused_stream_ends_with_the_servers_status(control):
    error = await asyncio.wait_for(run_stream(control.xds, Subscriber(base_pb2.Node()), asyncio.Event(),
                                              lambda r: None), 10)
    assert error == "INVALID_ARGUMENT: the first DiscoveryRequest must carry node.id"


async def test_a_callback_exception_leaves_run_stream(control):
    def broken(resp):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        await asyncio.wait_for(run_stream(control.xds, Subscriber(sim_node(300, SERVICES)), asyncio.Event(),
                                          broken), 10)


def test_channel_options_that_apply_are_honoured_and_others_refused():
    s = ads_client.ChannelSettings.from_options(
        [*FAST_RECONNECT, ("grpc.max_receive_message_length", 1024), ("grpc.use_local_subchannel_pool", 1)])
    assert (s.initial_s, s.max_s, s.max_message) == (0.05, 0.2, 1024)
    with pytest.raises(ValueError, match="grpc.keepalive_time_ms"):
        ads_client.ChannelSettings.from_options([("grpc.keepalive_time_ms", 1000)])


async def test_a_listener_that_closes_without_settings_is_a_connect_error():
    """Not an HTTP/2 server: it accepts and hangs up.  The stream never opens."""
    server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        error = await asyncio.wait_for(run_stream(f"127.0.0.1:{port}", Subscriber(sim_node(0, 1)),
                                                  asyncio.Event(), lambda r: None), 10)
    finally:
        server.close()
        await server.wait_closed()
    assert error == "UNAVAILABLE: connect failed: the server closed the connection before its SETTINGS"


class TinyWindowServer(H2Connection):
    """A real HTTP/2 server (the project's own stack) that lets a client send 16 octets per
    stream before it credits them back: the client's ACK cannot leave in one write.  It answers
    the first request with one EDS and records every request it deframes."""

    def __init__(self, got: list):
        super().__init__(client=False, stream_window=16)
        self.got, self.deframer = got, grpcwire.Deframer()

    def on_request(self, st, headers, end_stream: bool) -> None:
        st.handler = self
        self.send_headers(st, [(b":status", b"200"), (b"content-type", b"application/grpc")])

    def on_data(self, st, data: bytes, end: bool) -> None:
        self.consume(st, len(data))
        for message in self.deframer.feed(data):
            self.got.append(discovery_pb2.DiscoveryRequest.FromString(message))
            if len(self.got) == 1:
                eds = discovery_pb2.DiscoveryResponse(type_url=xdstypes.ENDPOINT, version_info="v1", nonce="n1")
                self.send_data(st, grpcwire.frame_message(eds.SerializeToString()))

    def on_headers(self, st, fields, end: bool) -> None:
        pass

    def on_reset(self, st, code: int) -> None:
        pass

    def on_sent(self, st, n: int) -> None:
        pass


async def test_an_ack_held_by_flow_control_counts_as_acked_once_written():
    loop = asyncio.get_running_loop()
    got: list = []
    server = await loop.create_server(lambda: TinyWindowServer(got), "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    conn = await ads_client.connect(address, loop.create_future(), ads_client.ChannelSettings())
    acked = []
    ack = discovery_pb2.DiscoveryRequest(type_url=xdstypes.ENDPOINT, version_info="v1", response_nonce="n1",
                                         resource_names=["bench"])
    assert ack.ByteSize() > 16
    try:
        conn.open(address, [discovery_pb2.DiscoveryRequest(type_url=xdstypes.ENDPOINT, node=sim_node(0, 1))],
                  lambda resp: [ack], lambda resp: acked.append((resp.nonce, conn.written == conn.handed)))
        await eventually(lambda: acked, 10, "the ACK to be written")
        assert acked == [("n1", True)]
        await eventually(lambda: len(got) == 2, 10, "the server to receive the ACK")
        assert got[1] == ack and not conn.ended.done()
    finally:
        conn.shut()
        server.close()
        await server.wait_closed()
