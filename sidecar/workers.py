"""`--workers N`: N sidecar processes share the listening sockets through SO_REUSEPORT.

Python runs one core's worth of proxying per process; more processes use more cores, as
Envoy's worker threads do.  Worker 0 (the process the user started) starts workers 1..N-1 as
children with the same arguments, each with its own xDS stream (so all hold the same view) and
admin port (worker 0's + k); the control server counts them as one endpoint because they
advertise one address.  SIGTERM to worker 0 drains itself and then its children.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import sys

log = logging.getLogger("protomesh.sidecar")


def start_workers(argv: list[str], workers: int) -> list[subprocess.Popen]:
    """`argv`: the command line worker 0 was started with (after the program name)."""
    children = []
    for k in range(1, workers):
        children.append(subprocess.Popen([sys.executable, "-m", "protomesh", *argv, "--worker-index", str(k)]))
    log.info("started %d worker processes: %s", len(children), [c.pid for c in children])
    return children


def stop_workers(children: list[subprocess.Popen], timeout_s: float) -> int:
    """Drain every child (SIGTERM), wait for it; the worst exit code wins."""
    for c in children:
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    code = 0
    for c in children:
        try:
            code = max(code, c.wait(timeout_s))
        except subprocess.TimeoutExpired:
            c.kill()
            code = max(code, c.wait(5) or 1)
    return code
