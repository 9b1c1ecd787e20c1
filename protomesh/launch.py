"""Start and stop protomesh processes on this machine (used by `make demo` and the tests).

Every process is started by us, waited for with a bounded readiness check, and ended by its PID
only (SIGTERM, then SIGKILL after a grace period).  Output goes to a log file per process so a
failure can be explained by reading it.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_rng = random.Random()
_given: set[int] = set()  # never hand out the same port twice in one process (they are not bound yet)


def free_port(host: str = "127.0.0.1") -> int:
    """A free port below the kernel's ephemeral range.  A port from bind(0) comes from that range,
    which the kernel also hands out as the source port of outgoing connections — so between our
    probe and the real bind, some connection could take it (seen: "Address already in use" under
    a busy test suite).  Below the range only another listener can, and we probe that."""
    high = _ephemeral_low()
    low = max(1024, high - 12000)
    for _ in range(200):
        port = _rng.randrange(low, high)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        if len(_given) > 8000:
            _given.clear()
        _given.add(port)
        return port
    with socket.socket() as s:  # a crowded range: fall back to the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_run(n: int, host: str = "127.0.0.1") -> int:
    """The first of `n` consecutive free ports, none handed out before (a sidecar with
    `--workers n` listens on its admin port + k)."""
    for _ in range(100):
        first = free_port(host)
        rest = range(first + 1, first + n)
        if all(p not in _given and _bindable(host, p) for p in rest):
            _given.update(rest)
            return first
    raise RuntimeError(f"no run of {n} free ports found on {host}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen | None = None
    ports: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def terminate(self, timeout_s: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


class Launcher:
    """Owns the processes it starts; `stop_all` ends exactly those, newest first."""

    def __init__(self, log_dir: Path, env: dict | None = None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}

    def start(self, name: str, args: list[str], *, env: dict | None = None, **ports) -> Proc:
        """`env` adds to (or overrides) the launcher's environment for this process only."""
        argv = [sys.executable, "-m", "protomesh", *args]
        log_path = self.log_dir / f"{name}.log"
        out = open(log_path, "ab")
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                 env={**self.env, **env} if env else self.env, start_new_session=True)
        out.close()
        proc = Proc(name, argv, log_path, popen, ports)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout_s: float = 10.0) -> int | None:
        code = proc.terminate(timeout_s)
        if proc in self.procs:
            self.procs.remove(proc)
        return code

    def stop_all(self, timeout_s: float = 10.0) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc, timeout_s)


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05, proc: Proc | None = None):
    """Poll `predicate` until it returns a truthy value; raise TimeoutError saying what we waited
    for (and the process's last log lines) when the bound runs out."""
    deadline = time.monotonic() + timeout_s
    last_exc = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} while waiting for {what}:\n"
                               f"{proc.log_tail()}")
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing we wait for is not up yet
            last_exc = exc
        time.sleep(interval_s)
    detail = f" (last error: {last_exc})" if last_exc else ""
    tail = f"\n{proc.name} log:\n{proc.log_tail()}" if proc is not None else ""
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}{detail}{tail}")


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
