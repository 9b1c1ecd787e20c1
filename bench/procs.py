"""Child processes of one bench run: started pinned, logged to the scratch dir, stopped by PID.

Every process the benchmark starts goes through `Procs.start`, and `Procs.stop_all` (called from
a `finally` in run.py, Ctrl-C included) stops each one by its own PID: SIGTERM, then SIGKILL.
"""
from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from protomesh import launch

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CPU = "0"  # the proxy under test owns this core
LOAD_CPU = "1"   # load generators and upstreams share this one


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Procs:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], cpus: str | None = None, env: dict | None = None,
              stdout=None) -> subprocess.Popen:
        cmd = (["taskset", "-c", cpus] if cpus is not None else []) + [str(a) for a in argv]
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=stdout or log, stderr=log, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=str(Path(__file__).parent.parent),
                                preexec_fn=_raise_nofile)
        log.close()
        self.running.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 8.0) -> None:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            self.stop(proc)


def run_pinned(argv: list[str], cpus: str, timeout: float, log: Path | None = None) -> str:
    """Run a load generator to completion (bounded by `timeout`) and return its stdout."""
    out = subprocess.run(["taskset", "-c", cpus, *map(str, argv)], capture_output=True, text=True,
                         timeout=timeout, preexec_fn=_raise_nofile)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(map(str, argv))}\n{out.stdout}\n{out.stderr}\n")
    if out.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {out.returncode}: {out.stderr.strip()[-400:]}")
    return out.stdout


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of the process, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_mb(pid: int) -> dict:
    """Current resident set (VmRSS) and its peak so far (VmHWM), in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def free_port() -> int:
    """A port below the kernel's ephemeral range, never the same twice in a run (see
    protomesh.launch.free_port: a bind(0) port can be taken by an outgoing connection's source
    port before the real bind)."""
    return launch.free_port()


def free_port_run(n: int) -> int:
    """The first of `n` consecutive free ports (`--workers n` listens on admin port + k)."""
    return launch.free_port_run(n)


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode} (see its log)")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f}s")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _system_busy_s() -> float:
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def _children_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class CpuWatch:
    """CPU the machine spent during a run on anything but the watched PIDs and the load generator
    (a finished child).  Other work on this shared 2-core box shows up here as `foreign_cpu_s`."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.start = (_system_busy_s(), _children_s(), [cpu_seconds(p) for p in pids])

    def foreign_cpu_s(self) -> float:
        busy0, kids0, own0 = self.start
        own = sum(cpu_seconds(p) - c for p, c in zip(self.pids, own0))
        return max(0.0, (_system_busy_s() - busy0) - (_children_s() - kids0) - own)
