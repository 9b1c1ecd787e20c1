"""Reliability on real processes: graceful drain on SIGTERM, and a hundred mesh edits under load
with nothing failed and no stream reset.

Every load loop is bounded in count and time; every process is ours and stopped by its PID.
The figures (requests, pushes, failures) are printed; run with `-s` to see them.
"""
from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import grpc

from demo.topology import Topology, admin_json
from demo.users.v1 import users_pb2
from protomesh.launch import Proc, free_port, http_ok, tcp_open, wait_until
from tests.integration.helpers import GrpcClients, http_get

PRODUCTS_TIMEOUT = "protocol: http, lb: round_robin, timeout: 5s"
USERS_LINE = "  users:    { protocol: grpc, proto: demo/users/v1/users.proto, lb: round_robin, timeout: 5s }\n"


# ---- load generators ------------------------------------------------------------------------------
class KeepAliveLoad:
    """GETs on one persistent connection, reconnecting only when the server says `Connection:
    close` or closes an idle connection (before any byte of a response: safe to resend).
    Anything else is a failure.  Bounded in requests and seconds."""

    def __init__(self, port: int, path: str, max_requests: int = 20000, max_seconds: float = 60.0):
        self.port, self.path = port, path
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.ok = 0
        self.failures: list[str] = []
        self.closed_by_server = 0  # responses with `Connection: close`
        self.idle_closed = 0  # a reused connection closed before a response started
        self.refused = False
        self.times: list[float] = []  # completion time of each 200
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn, reused = None, False
        for _ in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() > deadline:
                break
            if conn is None:
                conn, reused = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10), False
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                resp.read()
            except ConnectionRefusedError:
                self.refused = True  # the listener is closed: the end of this load
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                conn.close()
                conn = None
                if reused:
                    self.idle_closed += 1
                    continue
                self.failures.append(f"new connection: {exc!r}")
                continue
            except OSError as exc:
                self.failures.append(repr(exc))
                conn.close()
                conn = None
                continue
            reused = True
            if resp.status == 200:
                self.ok += 1
                self.times.append(time.monotonic())
            else:
                self.failures.append(f"{resp.status} {resp.getheader('x-protomesh-reason', '')}")
            if (resp.getheader("connection") or "").lower() == "close":
                self.closed_by_server += 1
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


class UnaryLoad:
    """GetUser calls on one channel until stopped (bounded)."""

    def __init__(self, port: int, max_requests: int = 20000, max_seconds: float = 60.0):
        self.port, self.max_requests, self.max_seconds = port, max_requests, max_seconds
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        clients = GrpcClients(self.port)
        deadline = time.monotonic() + self.max_seconds
        try:
            for i in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    user = clients.get_user(str(i % 5 + 1))
                    assert user.id == str(i % 5 + 1)
                    self.ok += 1
                except grpc.RpcError as err:
                    self.failures.append(f"{err.code().name}: {err.details()}")
        finally:
            clients.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


class ChatStream:
    """One long-lived bidi `Chat` stream: a message every `every_s` until closed; replies are
    counted and their `seq` checked (a reset stream would start again at 1 or fail)."""

    def __init__(self, port: int, every_s: float = 0.05, max_messages: int = 5000, timeout_s: float = 90.0):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.every_s, self.max_messages, self.timeout_s = every_s, max_messages, timeout_s
        self.sent = 0
        self.replies: list[int] = []
        self.error: str | None = None
        self.code: grpc.StatusCode | None = None
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _requests(self):
        while self.sent < self.max_messages and not self._closing.wait(self.every_s):
            self.sent += 1
            yield users_pb2.ChatRequest(text=f"m{self.sent}")

    def _run(self) -> None:
        from demo.users.v1 import users_pb2_grpc
        stub = users_pb2_grpc.UsersStub(self.channel)
        call = stub.Chat(self._requests(), timeout=self.timeout_s)
        try:
            for reply in call:
                self.replies.append(reply.seq)
            self.code = call.code()
        except grpc.RpcError as err:
            self.code = err.code()
            self.error = f"{err.code().name}: {err.details()}"

    def start(self) -> "ChatStream":
        self._thread.start()
        return self

    def close(self, timeout_s: float = 20.0) -> None:
        """Half-close our side; the server then ends the stream with its status."""
        self._closing.set()
        self._thread.join(timeout_s)
        self.channel.close()

    def check(self) -> None:
        assert self.error is None, self.error
        assert self.code == grpc.StatusCode.OK, self.code
        assert self.replies == list(range(1, self.sent + 1)), (self.sent, self.replies[-5:])


# ---- a slow upstream ----------------------------------------------------------------------------------
class SlowUpstream:
    """An HTTP/1.1 server in this process that answers `/slow?ms=N` after N milliseconds."""

    def __init__(self):
        outer = self
        self.received = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                outer.received.set()
                ms = int(parse_qs(urlparse(self.path).query).get("ms", ["0"])[0])
                time.sleep(min(ms, 10000) / 1000)
                body = b'{"slow": "done"}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _with_slow_service(mesh: str, port: int) -> str:
    mesh = mesh.replace("services:\n", f"services:\n  slow:     {{ protocol: http, endpoints: [\"127.0.0.1:{port}\"],"
                                       " timeout: 30s }\n", 1)
    return mesh.replace("  routes:\n", "  routes:\n    - { name: slow, match: { path_prefix: /slow }, to: slow }\n", 1)


def _start_gateway(topo: Topology, *extra: str) -> Proc:
    topo.gateway = topo.launcher.start("gateway", [
        "sidecar", "--gateway", "--control", topo.control_addr, "--admin", f"127.0.0.1:{topo.gateway_admin}",
        "--node-id", "gateway", "--access-log", str(topo.workdir / "logs" / "gateway.access.jsonl"), *extra])
    return topo.gateway


def _ready_text(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


# ---- graceful drain ---------------------------------------------------------------------------------
def test_sigterm_drains_gracefully(fresh_mesh):
    """Gateway with --drain-delay 1.5: on SIGTERM /ready says 503 draining at once while traffic
    is still served; after the delay new connections are refused; a slow HTTP request and a
    bidi stream in flight both complete; the process exits 0."""
    topo = fresh_mesh
    slow = SlowUpstream()
    try:
        topo.write_mesh(_with_slow_service(topo.mesh_yaml(), slow.port))
        topo.start_control()
        topo.start_instance("users", "users-1")
        topo.start_instance("products", "products-1")
        gateway = _start_gateway(topo, "--drain-delay", "1.5", "--drain-timeout", "10")
        topo.wait_ready()
        topo.wait_endpoints(topo.gateway_admin, "slow", 1)
        topo.wait_endpoints(topo.gateway_admin, "products", 1)
        topo.wait_endpoints(topo.gateway_admin, "users", 1)

        slow_result: dict = {}

        def slow_call():
            conn = http.client.HTTPConnection("127.0.0.1", topo.gateway_http, timeout=20)
            try:
                conn.request("GET", "/slow/x?ms=4000")
                resp = conn.getresponse()
                slow_result.update(status=resp.status, body=resp.read(),
                                   connection=resp.getheader("connection"), done_at=time.monotonic())
            except OSError as exc:
                slow_result.update(error=repr(exc))
            finally:
                conn.close()

        load = KeepAliveLoad(topo.gateway_http, "/v1/products/p1", max_seconds=30).__enter__()
        chat = ChatStream(topo.gateway_grpc, every_s=0.1, max_messages=200).start()
        slow_thread = threading.Thread(target=slow_call, daemon=True)
        try:
            wait_until(lambda: load.ok >= 20 and len(chat.replies) >= 3, 20, "load and the stream to flow")
            slow_thread.start()
            assert slow.received.wait(10), "the slow request did not reach its upstream"
            t0 = time.monotonic()
            gateway.popen.send_signal(signal.SIGTERM)

            status, text = wait_until(lambda: (s := _ready_text(topo.gateway_admin))[0] == 503 and s, 2,
                                      "/ready to say draining")
            unready_after = time.monotonic() - t0
            assert "draining" in text and unready_after < 1.5
            # During the drain delay traffic still flows, on kept-alive and on new connections.
            ok_at_unready = load.ok
            assert http_get(topo.gateway_http, "/v1/products/p2")[0] == 200
            wait_until(lambda: load.ok > ok_at_unready + 5, 1.0, "keep-alive traffic during the drain delay")
            # After the delay the listener closes: new connections are refused, while the slow
            # request is still in flight.
            wait_until(lambda: not tcp_open("127.0.0.1", topo.gateway_http), 5, "the HTTP listener to close")
            closed_after = time.monotonic() - t0
            assert closed_after >= 1.4, closed_after
            assert "status" not in slow_result, "the slow request ended before the listener closed"
            # The stream goes on after GOAWAY: replies keep coming after the listener closed.
            sent_at_close = chat.sent
            wait_until(lambda: len(chat.replies) >= sent_at_close + 3, 10,
                       "the bidi stream to carry messages after the listener closed")
            chat.close()
            slow_thread.join(15)
            code = gateway.popen.wait(20)
            exited_after = time.monotonic() - t0
        finally:
            load.stop()
            chat.close()
        print(f"\n[drain] /ready 503 after {unready_after:.2f}s; listener closed after {closed_after:.2f}s; "
              f"exit {code} after {exited_after:.2f}s; keep-alive load: {load.ok} ok, "
              f"{load.closed_by_server} 'Connection: close', {load.idle_closed} idle closes, "
              f"{len(load.failures)} failures; bidi stream: {len(chat.replies)}/{chat.sent} replies, {chat.code}")
        assert slow_result.get("status") == 200, slow_result
        assert slow_result["body"] == b'{"slow": "done"}'
        assert (slow_result["connection"] or "").lower() == "close"  # in-flight, then Connection: close
        chat.check()
        assert chat.sent >= sent_at_close + 3  # it really spanned the drain
        assert load.failures == [], load.failures[:5]
        assert load.refused or load.closed_by_server + load.idle_closed > 0
        assert code == 0, gateway.log_tail()
    finally:
        slow.close()


# ---- hitless config changes ----------------------------------------------------------------------
_CONTROL = """
import asyncio, sys
from control.app import ControlOptions, ControlServer
from sidecar.app import install_signal_handlers

async def main():
    server = ControlServer(ControlOptions(mesh=sys.argv[1], xds=sys.argv[2], admin=sys.argv[3],
                                          grace_s=2.0, warmup_s=5.0, watch_interval_s=0.05))
    stop = asyncio.Event()
    install_signal_handlers(stop)
    return await server.run(stop)

sys.exit(asyncio.run(main()))
"""


def _start_fast_control(topo: Topology, mesh: str) -> Proc:
    """The control server polling mesh.yaml every 50 ms instead of 500 ms (the CLI has no flag
    for it), so a hundred edits fit in a bounded test.  Same classes, own process."""
    topo.write_mesh(mesh)
    log_path = topo.launcher.log_dir / "control.log"
    argv = [sys.executable, "-c", _CONTROL, str(topo.mesh_path), topo.control_addr,
            f"127.0.0.1:{topo.control_admin}"]
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=topo.launcher.env,
                                 start_new_session=True)
    proc = Proc("control", argv, log_path, popen)
    topo.launcher.procs.append(proc)
    topo.control = proc
    wait_until(lambda: http_ok(f"http://127.0.0.1:{topo.control_admin}/ready"), 20,
               "the control server to be ready", proc=proc)
    return proc


def _mesh_for(topo: Topology, step: int, static: str) -> str:
    """Edit `step` of the cycle; each step flips one thing the gateway sees, in turn: an extra
    route (RDS), the users lb policy (CDS), the products timeout (RDS), a static products
    endpoint (EDS).  Step 0 is the starting mesh."""
    route, lb, timeout, endpoint = ((step + 3 - k) // 4 % 2 for k in range(4))
    text = topo.mesh_yaml(products_endpoints=[static] if endpoint else None)
    # users: no route timeout, because a route timeout bounds a whole gRPC stream (as in Envoy)
    # and the bidi stream here lives across all edits.
    users = USERS_LINE.replace("timeout: 5s", "timeout: 0s")
    if lb:
        users = users.replace("lb: round_robin", "lb: least_request")
    assert USERS_LINE in text and PRODUCTS_TIMEOUT in text, "demo/topology.py's mesh changed; update the edits"
    text = text.replace(USERS_LINE, users)
    if timeout:
        text = text.replace(PRODUCTS_TIMEOUT, PRODUCTS_TIMEOUT.replace("5s", "4s"))
    if route:
        text = text.replace("  routes:\n", "  routes:\n    - { name: products-v2, match: { path_prefix: /v2/products },"
                                           " to: products, rewrite_prefix: /v1/products }\n", 1)
    return text


def _gateway_state(topo: Topology) -> dict | None:
    return next((n for n in admin_json(topo.control_admin, "/nodes") if n["node"] == "gateway"), None)


def test_a_hundred_mesh_edits_under_load_fail_nothing(fresh_mesh):
    topo = fresh_mesh
    edits, budget_s = 100, 55.0
    spare = free_port()
    extra = topo.launcher.start("products-static", ["service", "products", "--listen", f"127.0.0.1:{spare}",
                                                     "--replica", "products-static"])
    wait_until(lambda: tcp_open("127.0.0.1", spare), 20, "the static products app", proc=extra)
    static = f"127.0.0.1:{spare}"
    _start_fast_control(topo, _mesh_for(topo, 0, static))
    topo.start_instance("users", "users-1")
    topo.start_instance("products", "products-1")
    topo.start_gateway()
    topo.wait_ready()
    topo.wait_endpoints(topo.gateway_admin, "users", 1)
    topo.wait_endpoints(topo.gateway_admin, "products", 1)

    def acked(previous: tuple | None):
        node = _gateway_state(topo)
        if node is None or len(node["types"]) < 4:
            return None
        types = node["types"]
        if any(t["pending"] or t["nacked"] or t["acked"] != t["sent"] for t in types.values()):
            return None
        versions = tuple(types[k]["acked"] for k in ("CDS", "EDS", "LDS", "RDS"))
        return versions if versions != previous else None

    versions = wait_until(lambda: acked(None), 20, "the gateway to ACK its first config")
    sends_before = sum(t["sends"] for t in _gateway_state(topo)["types"].values())
    started = time.monotonic()
    with KeepAliveLoad(topo.gateway_http, "/v1/products/p1", max_seconds=budget_s + 10) as http_load, \
            UnaryLoad(topo.gateway_grpc, max_seconds=budget_s + 10) as grpc_load:
        chat = ChatStream(topo.gateway_grpc, every_s=0.05, max_messages=2000, timeout_s=budget_s + 30).start()
        try:
            wait_until(lambda: http_load.ok >= 20 and grpc_load.ok >= 20 and len(chat.replies) >= 5, 20,
                       "load to flow")
            route_hits = 0
            for step in range(1, edits + 1):
                left = budget_s - (time.monotonic() - started)
                assert left > 0, f"only {step - 1} edits within {budget_s}s"
                topo.write_mesh(_mesh_for(topo, step, static))
                versions = wait_until(lambda: acked(versions), min(10.0, left),
                                      f"edit {step} to be pushed to and ACKed by the gateway")
                if step % 8 == 1:  # the added route really serves (steps 1, 9, 17, … add it)
                    status = http_get(topo.gateway_http, "/v2/products/p3")[0]
                    assert status == 200, f"edit {step}: /v2/products answered {status}"
                    route_hits += 1
            elapsed = time.monotonic() - started
            time.sleep(0.3)  # load keeps flowing on the final config
        finally:
            chat.close()
    node = _gateway_state(topo)
    pushes = sum(t["sends"] for t in node["types"].values()) - sends_before
    status = subprocess.run([sys.executable, "-m", "protomesh", "status", "--control", topo.control_addr,
                             "--json"], capture_output=True, text=True, timeout=30)
    print(f"\n[hitless] {edits} mesh.yaml edits in {elapsed:.1f}s, {pushes} xDS responses to the gateway, "
          f"all ACKed; HTTP keep-alive {http_load.ok} ok / {len(http_load.failures)} failed "
          f"({http_load.closed_by_server + http_load.idle_closed} reconnects); gRPC unary {grpc_load.ok} ok / "
          f"{len(grpc_load.failures)} failed; bidi stream {len(chat.replies)}/{chat.sent} replies on one "
          f"stream, {chat.code.name if chat.code else None}")
    assert http_load.failures == [], http_load.failures[:5]
    assert grpc_load.failures == [], grpc_load.failures[:5]
    assert http_load.closed_by_server + http_load.idle_closed == 0  # no connection was ever closed
    chat.check()
    assert pushes >= edits
    assert route_hits == (edits + 7) // 8
    assert status.returncode == 0 and "NACKED" not in status.stdout, status.stdout
