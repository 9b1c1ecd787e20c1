"""A listener whose address changes: the new one serves, the old one drains gracefully (the
request in flight on it finishes, then it refuses connections)."""
from __future__ import annotations

import http.server
import threading
import time

from demo.topology import Topology
from protomesh.launch import free_port, http_ok, tcp_open, wait_until
from tests.integration.helpers import http_get


SLOW_ARRIVED = threading.Event()


class SlowHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path.startswith("/slow"):
            SLOW_ARRIVED.set()
            time.sleep(1.5)  # the upstream's work, not a synchronisation
        body = b"ok"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_moved_listener_drains_the_old_address(tmp_path):
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    topo = Topology(tmp_path)
    old_port, new_port = topo.gateway_http, free_port()

    def mesh(port):
        return ("services:\n"
                f"  slow: {{ protocol: http, endpoints: [\"127.0.0.1:{upstream.server_address[1]}\"], timeout: 10s }}\n"
                f"gateway:\n  http: 127.0.0.1:{port}\n  routes:\n    - {{ match: {{ path_prefix: / }}, to: slow }}\n")
    try:
        topo.write_mesh(mesh(old_port))
        topo.start_control()
        topo.start_gateway()
        wait_until(lambda: http_ok(f"http://127.0.0.1:{topo.gateway_admin}/ready"), 20, "the gateway")
        wait_until(lambda: http_get(old_port, "/fast")[0] == 200, 20, "the old address to serve")

        in_flight = {}

        def slow_call():
            in_flight["result"] = http_get(old_port, "/slow")

        caller = threading.Thread(target=slow_call)
        caller.start()
        assert SLOW_ARRIVED.wait(10), "the slow request never reached the upstream"
        topo.write_mesh(mesh(new_port))  # the move happens while that request is in flight
        wait_until(lambda: tcp_open("127.0.0.1", new_port) and http_get(new_port, "/fast")[0] == 200, 20,
                   "the new address to serve")
        caller.join(20)
        status, headers, body = in_flight["result"]
        assert (status, body) == (200, b"ok")  # the request in flight on the old listener finished
        wait_until(lambda: not tcp_open("127.0.0.1", old_port), 20, "the old address to stop accepting")
        assert topo.launcher.stop(topo.gateway) == 0
    finally:
        topo.stop_all()
        upstream.shutdown()
