"""Upstream faults through a real gateway process: an endpoint that hangs, a connection reset in
the middle of a response body, upstreams that stop reading or whose client stops reading
(half-open), and connection refused.  Each fault ends in a retry elsewhere, a timeout, or a
reasoned error; none is presented as a complete response, none grows the gateway's memory or file
descriptors without bound, and after each the gateway still serves.

The faulty upstreams are small socket servers in this process (threads), each doing exactly one
wrong thing; they are static endpoints of mesh.yaml services, so the gateway reaches them the way
it reaches a service without a sidecar.  Every loop is bounded in count and time.  Run with `-s`
for the figures.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from demo.topology import Topology
from protomesh.launch import free_port, http_ok, wait_until

MB = 1 << 20


# ---- upstreams that misbehave ----------------------------------------------------------------------
class Good:
    """A correct HTTP/1.1 upstream: 200 and a short JSON body for any GET or POST."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                n = int(self.headers.get("content-length") or 0)
                if n:
                    self.rfile.read(n)
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Faulty:
    """Accepts connections and hands each to `mode`:
    - "hang": never reads, never answers (the connection stays open until the peer closes it);
    - "reset-length" / "reset-chunked": reads the request head, sends the head and part of the
      body of a 200 (Content-Length 100000, or chunked), then resets the connection (RST);
    - "firehose": reads the request head, then sends a chunked body as fast as the peer takes it,
      up to `cap` bytes or until a send blocks for 3 s, counting what it sent."""

    def __init__(self, mode: str, cap: int = 256 * MB):
        self.mode, self.cap = mode, cap
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.sent = 0
        self.blocked = threading.Event()
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self.conns.append(conn)
            if self.mode != "hang":
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_head(conn: socket.socket) -> bool:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                return False
            data += chunk
        return True

    def _serve(self, conn: socket.socket):
        try:
            if not self._read_head(conn):
                return
            if self.mode == "reset-length":
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100000\r\n\r\n"
                             + b"x" * 4000)
            elif self.mode == "reset-chunked":
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
                             + b"fa0\r\n" + b"x" * 4000 + b"\r\n")
            elif self.mode == "firehose":
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                chunk = b"%x\r\n" % 65536 + b"y" * 65536 + b"\r\n"
                conn.settimeout(3)
                while self.sent < self.cap and not self._stop.is_set():
                    try:
                        conn.sendall(chunk)
                    except socket.timeout:
                        self.blocked.set()  # the gateway stopped reading: backpressure reached us
                        # Hold the connection (still not reading) until the peer goes away.
                        conn.settimeout(0.2)
                        while not self._stop.is_set():
                            try:
                                if conn.recv(1) == b"":
                                    return
                            except socket.timeout:
                                continue
                            except OSError:
                                return
                        return
                    except OSError:
                        return
                    self.sent += 65536
                return
            time.sleep(0.2)  # let the partial response reach the gateway before the reset
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        finally:
            if self.mode != "firehose" or self._stop.is_set():
                conn.close()

    def close(self):
        self._stop.set()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        self.sock.close()


# ---- process figures ----------------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---- the mesh ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    good, hang = Good(), Faulty("hang")
    reset_len, reset_chunked, firehose = Faulty("reset-length"), Faulty("reset-chunked"), Faulty("firehose")
    refused = free_port()  # nothing listens here
    topo = Topology(tmp_path_factory.mktemp("faults"))
    retries = "retries: { retry_on: [connect-failure, reset, 5xx], attempts: 2, per_try_timeout: 300ms }"
    services = {
        "good": f'endpoints: ["127.0.0.1:{good.port}"], timeout: 5s',
        "hangretry": f'endpoints: ["127.0.0.1:{hang.port}", "127.0.0.1:{good.port}"], timeout: 5s, {retries}',
        "hangonly": f'endpoints: ["127.0.0.1:{hang.port}"], timeout: 500ms',
        "resetlen": f'endpoints: ["127.0.0.1:{reset_len.port}"], timeout: 5s',
        "resetchunk": f'endpoints: ["127.0.0.1:{reset_chunked.port}"], timeout: 5s',
        "stall": f'endpoints: ["127.0.0.1:{hang.port}"], timeout: 2s',
        "firehose": f'endpoints: ["127.0.0.1:{firehose.port}"], timeout: 30s',
        "refusedretry": f'endpoints: ["127.0.0.1:{refused}", "127.0.0.1:{good.port}"], timeout: 5s, {retries}',
        "refusedonly": f'endpoints: ["127.0.0.1:{refused}"], timeout: 5s',
    }
    text = "services:\n" + "".join(f"  {n}: {{ protocol: http, lb: round_robin, {v} }}\n" for n, v in services.items())
    # A short stream idle timeout so a stalled exchange is released within the test's bounds.
    text += f"gateway:\n  http: 127.0.0.1:{topo.gateway_http}\n  stream_idle_timeout: 4s\n  routes:\n"
    text += "".join(f"    - {{ name: {n}, match: {{ path_prefix: /{n}/ }}, to: {n} }}\n" for n in services)
    topo.write_mesh(text)
    try:
        topo.start_control()
        topo.start_gateway()
        topo.wait_ready()
        for name in services:
            topo.wait_endpoints(topo.gateway_admin, name, 2 if name.endswith("retry") else 1)
        topo.fault = {"good": good, "hang": hang, "reset_len": reset_len, "reset_chunked": reset_chunked,
                      "firehose": firehose}
        yield topo
    finally:
        topo.stop_all()
        for s in (good, hang, reset_len, reset_chunked, firehose):
            s.close()


def request(port: int, method: str, path: str, timeout: float = 10.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        t0 = time.monotonic()
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body, time.monotonic() - t0
    finally:
        conn.close()


def still_serving(topo: Topology) -> None:
    assert topo.gateway.alive(), topo.gateway.log_tail()
    for _ in range(5):
        status, _, body, _ = request(topo.gateway_http, "GET", "/good/x")
        assert (status, body) == (200, b'{"ok": true}')
    assert http_ok(f"http://127.0.0.1:{topo.gateway_admin}/ready")


def access_records(topo: Topology, route: str, n: int, timeout: float = 5.0) -> list[dict]:
    path = topo.workdir / "logs" / "gateway.access.jsonl"

    def read():
        recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        recs = [r for r in recs if r.get("route") == route]
        return recs if len(recs) >= n else None
    return wait_until(read, timeout, f"{n} access-log records for route {route}")


# ---- the faults -------------------------------------------------------------------------------------
def test_hanging_endpoint_is_retried_elsewhere_after_the_per_try_timeout(faults):
    topo = faults
    results = [request(topo.gateway_http, "GET", f"/hangretry/{i}") for i in range(10)]
    slow = [r for r in results if r[3] >= 0.28]
    print(f"\n[faults] hanging endpoint + good endpoint, per-try 300 ms: {sum(r[0] == 200 for r in results)}/10 "
          f"answered 200, {len(slow)} of them after a per-try timeout "
          f"(max {max(r[3] for r in results) * 1000:.0f} ms)")
    assert all(r[0] == 200 and r[2] == b'{"ok": true}' for r in results), [r[:2] for r in results]
    assert slow, "no request went to the hanging endpoint first (round robin over two)"
    assert all(r[3] < 2.0 for r in results)
    recs = access_records(topo, "hangretry", 10)
    assert any(r["attempts"] >= 2 and r["status"] == 200 for r in recs), recs[:3]
    still_serving(topo)


def test_hanging_endpoint_alone_gets_a_reasoned_504(faults):
    topo = faults
    status, headers, body, took = request(topo.gateway_http, "GET", "/hangonly/x")
    print(f"\n[faults] hanging endpoint alone, route timeout 500 ms: {status} "
          f"{headers.get('x-protomesh-reason')} after {took * 1000:.0f} ms")
    assert status == 504
    assert headers["x-protomesh-reason"].startswith("upstream_timeout")
    assert json.loads(body)["error"] == "upstream_timeout"
    assert 0.45 <= took < 3.0
    assert access_records(topo, "hangonly", 1)[-1]["reason"] == "upstream_timeout"
    still_serving(topo)


@pytest.mark.parametrize("route,framing", [("resetlen", "content-length"), ("resetchunk", "chunked")])
def test_reset_mid_body_is_an_aborted_response_not_a_short_200(faults, route, framing):
    topo = faults
    conn = http.client.HTTPConnection("127.0.0.1", topo.gateway_http, timeout=10)
    try:
        conn.request("GET", f"/{route}/x")
        resp = conn.getresponse()
        status = resp.status
        with pytest.raises((http.client.IncompleteRead, ConnectionResetError)) as err:
            resp.read()
    finally:
        conn.close()
    got = len(err.value.partial) if isinstance(err.value, http.client.IncompleteRead) else 0
    print(f"\n[faults] reset mid-body ({framing}): client saw {status} then "
          f"{type(err.value).__name__} after {got} body bytes")
    assert status == 200  # the head had gone out: the abort is the only honest signal left
    rec = access_records(topo, route, 1)[-1]
    assert rec["reason"] == "upstream_reset_after_response_started", rec
    still_serving(topo)


def _stalled_upload(topo: Topology) -> dict:
    """Offer a 256 MB chunked upload to the `stall` route (an endpoint that accepts and never
    reads) until a send blocks for 2 s; then close the client socket."""
    pid = topo.gateway.pid
    out = {"rss0": rss_mb(pid), "fd0": fds(pid), "sent": 0, "blocked": False}
    s = socket.create_connection(("127.0.0.1", topo.gateway_http))
    chunk = b"%x\r\n" % 65536 + b"z" * 65536 + b"\r\n"
    try:
        s.sendall(b"POST /stall/upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        s.settimeout(2.0)
        deadline = time.monotonic() + 20
        while out["sent"] < 256 * MB and time.monotonic() < deadline:
            try:
                out["sent"] += s.send(chunk)
            except socket.timeout:
                out["blocked"] = True
                break
        out["rss_held"] = rss_mb(pid)
    finally:
        s.close()
    return out


def test_upstream_that_stops_reading_backpressures_the_client(faults):
    """A chunked upload to an endpoint that accepts and never reads: the gateway stops reading
    the client once the buffers between are full and holds little memory meanwhile."""
    topo = faults
    r = _stalled_upload(topo)
    print(f"\n[faults] upstream stops reading: client blocked after {r['sent'] / MB:.1f} MB of 256 MB; "
          f"gateway RSS {r['rss0']:.1f} -> {r['rss_held']:.1f} MB while blocked")
    assert r["blocked"], f"the client sent {r['sent'] / MB:.0f} MB without being slowed down"
    assert r["sent"] < 64 * MB
    assert r["rss_held"] - r["rss0"] < 24
    still_serving(topo)


def test_a_stalled_upload_is_released_after_the_client_gives_up(faults):
    topo = faults
    r = _stalled_upload(topo)
    pid = topo.gateway.pid
    # No bytes either way for the gateway's 4 s stream idle timeout (the client blocked 2 s before
    # it closed): both connections are released, with the reason in the access log.
    wait_until(lambda: fds(pid) <= r["fd0"], 8, f"the gateway's fds to return to {r['fd0']} (now {fds(pid)})")
    rec = access_records(topo, "stall", 1)[-1]
    assert rec["reason"] == "stream_idle_timeout", rec


def test_client_that_stops_reading_backpressures_the_upstream(faults):
    """The other half-open direction: an upstream sending an endless body to a client that has
    stopped reading.  The gateway stops reading the upstream; nothing piles up in between."""
    topo = faults
    fire = topo.fault["firehose"]
    pid = topo.gateway.pid
    rss0, fd0 = rss_mb(pid), fds(pid)
    s = socket.create_connection(("127.0.0.1", topo.gateway_http))
    try:
        s.sendall(b"GET /firehose/x HTTP/1.1\r\nhost: x\r\n\r\n")
        assert fire.blocked.wait(20), f"the upstream sent {fire.sent / MB:.0f} MB without being slowed"
        rss_held = rss_mb(pid)
    finally:
        s.close()
    print(f"\n[faults] client stops reading: upstream blocked after {fire.sent / MB:.1f} MB; "
          f"gateway RSS {rss0:.1f} -> {rss_held:.1f} MB while blocked")
    assert fire.sent < 64 * MB
    assert rss_held - rss0 < 24
    wait_until(lambda: fds(pid) <= fd0, 10, f"the gateway's fds to return to {fd0} (now {fds(pid)})")
    recs = access_records(topo, "firehose", 1)
    assert recs[-1]["reason"] == "downstream_reset", recs[-1]
    still_serving(topo)


def test_connection_refused_is_retried_elsewhere_or_a_reasoned_503(faults):
    topo = faults
    retried = [request(topo.gateway_http, "GET", f"/refusedretry/{i}") for i in range(10)]
    status, headers, body, _ = request(topo.gateway_http, "GET", "/refusedonly/x")
    print(f"\n[faults] connection refused: with a second endpoint and retries "
          f"{sum(r[0] == 200 for r in retried)}/10 answered 200; alone: {status} {headers.get('x-protomesh-reason')}")
    assert all(r[0] == 200 for r in retried), [r[:2] for r in retried]
    assert status == 503
    assert headers["x-protomesh-reason"].startswith("upstream_unavailable")
    assert json.loads(body)["error"] == "upstream_unavailable"
    recs = access_records(topo, "refusedretry", 10)
    assert any(r["attempts"] >= 2 for r in recs)
    assert access_records(topo, "refusedonly", 1)[-1]["reason"] == "upstream_unavailable"
    still_serving(topo)
