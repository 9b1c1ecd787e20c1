"""The upstreams behind the proxies, chosen so they are never the bottleneck.

nginx (one process, no master) serves both `return 200` for HTTP/1.1 and, on an h2c listener,
a canned gRPC reply for `bench.v1.Unary/Echo`: a static file holding one length-prefixed `Msg`
plus a `grpc-status: 0` trailer.  A static file answers GET only, so the POST's 405 is turned
into that file with `error_page 405 =200`.  Every gRPC call nginx served is one line in its
buffered access log, which is how successes are counted (h2load ignores `grpc-status`).
Bidi streaming needs a real gRPC server: `bench/grpc_upstream.py` on grpc.aio.
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procs

ECHO_PATH = "/bench.v1.Unary/Echo"
REPLY = b"\x0a\x02ok"  # Msg{payload: "ok"}


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def nginx_conf(root: Path, http_port: int, grpc_port: int) -> str:
    temps = " ".join(f"{d}_temp_path {root}/{d};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  {temps}
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  log_format served "$status";
  server {{
    listen 127.0.0.1:{http_port} backlog=4096;
    location / {{ return 200 "ok\\n"; }}
  }}
  server {{
    listen 127.0.0.1:{grpc_port} http2 backlog=4096;
    root {root}/html;
    access_log {root}/grpc-served.log served buffer=256k flush=1s;
    location / {{
      default_type application/grpc;
      add_trailer grpc-status 0 always;
      error_page 405 =200 /reply;
      try_files /reply =404;
    }}
  }}
}}
"""


@dataclass
class Nginx:
    proc: object
    http_port: int
    grpc_port: int
    served_log: Path

    def served(self) -> int:
        """gRPC calls nginx has answered so far (its access log flushes every second)."""
        try:
            return self.served_log.read_bytes().count(b"200\n")
        except FileNotFoundError:
            return 0


def start_nginx(p: procs.Procs, workdir: Path) -> Nginx:
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    root = workdir / "nginx"
    (root / "html").mkdir(parents=True, exist_ok=True)
    (root / "html" / "reply").write_bytes(grpc_frame(REPLY))
    http_port, grpc_port = procs.free_port(), procs.free_port()
    conf = root / "nginx.conf"
    conf.write_text(nginx_conf(root, http_port, grpc_port))
    proc = p.start("nginx", [exe, "-p", root, "-c", conf, "-e", root / "nginx-error.log"], cpus=procs.LOAD_CPU)
    procs.wait_until(lambda: procs.port_open(http_port) and procs.port_open(grpc_port), 10, "nginx", proc)
    return Nginx(proc, http_port, grpc_port, root / "grpc-served.log")


def wait_served_flushed(nginx: Nginx, timeout: float = 3.0) -> int:
    """Wait for nginx's access-log buffer to flush: the count stops moving."""
    last, deadline = -1, time.monotonic() + timeout
    time.sleep(1.2)
    while time.monotonic() < deadline:
        now = nginx.served()
        if now == last:
            return now
        last = now
        time.sleep(0.6)
    return nginx.served()


def start_grpc_upstream(p: procs.Procs, gen_dir: Path) -> tuple[object, int]:
    port = procs.free_port()
    proc = p.start("grpc-upstream", [sys.executable, "-m", "bench.grpc_upstream", "--port", port],
                   cpus=procs.LOAD_CPU, env={"PYTHONPATH": f"{gen_dir}:{Path(__file__).parent.parent}"})
    procs.wait_until(lambda: procs.port_open(port), 15, "grpc upstream", proc)
    return proc, port
