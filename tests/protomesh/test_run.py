"""`protomesh run`: the sidecar first, the app only once it is ready, signals to the app, the
app's exit code after the sidecar drained.  Real processes on 127.0.0.1: a control server and a
products app with its own sidecar (the upstream), and `protomesh run` fronting a tiny app."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from demo.topology import Topology
from protomesh.launch import free_port, tcp_open, wait_until
from protomesh.run import EXIT_NOT_READY, EXIT_SIDECAR_FAILED, RunOptions, _exit_code, parse

# The app's outbound call: products through the local sidecar's outbound HTTP listener.
CALL = textwrap.dedent("""
    import http.client, os, sys
    def call(path="/v1/products/p1"):
        host, port = os.environ["PROTOMESH_OUTBOUND_HTTP"].rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=10)
        c.request("GET", path, headers={"Host": "products"})
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, body
    def ready():
        host, port = os.environ["PROTOMESH_ADMIN"].rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=5)
        c.request("GET", "/ready")
        return c.getresponse().status
""")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """Control server + products app behind its sidecar (what the app under `run` calls)."""
    topo = Topology(tmp_path_factory.mktemp("run"))
    try:
        topo.start_control()
        topo.start_instance("products", "products-1")
        topo.wait_ready()
        yield topo
    finally:
        topo.stop_all()


def _sidecar_flags(topo: Topology, control: str | None = None) -> tuple[list[str], int]:
    admin = free_port()
    flags = ["--service", "orders", "--app", f"127.0.0.1:{free_port()}",
             "--control", control or topo.control_addr, "--inbound", f"127.0.0.1:{free_port()}",
             "--outbound-http", f"127.0.0.1:{free_port()}", "--outbound-grpc", f"127.0.0.1:{free_port()}",
             "--admin", f"127.0.0.1:{admin}", "--access-log", "off", "--drain-timeout", "5"]
    return flags, admin


def _run(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "protomesh", "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _finish(proc: subprocess.Popen, timeout_s: float = 60.0) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(5)
        raise AssertionError(f"protomesh run did not finish within {timeout_s}s:\n{err[-3000:]}")
    return proc.returncode, out, err


def test_app_runs_after_ready_calls_through_the_sidecar_and_its_exit_code_wins(upstream, tmp_path):
    flags, admin = _sidecar_flags(upstream)
    app = CALL + textwrap.dedent("""
        if ready() != 200:
            sys.exit(4)                     # started before the sidecar was ready
        status, body = call()
        print("APP", status, body.decode())
        sys.exit(3 if status == 200 and b'"p1"' in body else 5)
    """)
    code, out, err = _finish(_run([*flags, "--", sys.executable, "-c", app]))
    assert code == 3, err[-3000:]
    assert "APP 200" in out
    assert "the app exited with code 3; draining the sidecar" in err
    assert "draining: readiness off" in err  # the sidecar drained before run exited
    assert not tcp_open("127.0.0.1", admin)  # and it is gone


def test_signal_goes_to_the_app_first_and_the_sidecar_serves_until_it_exits(upstream, tmp_path):
    """A Kubernetes-style stop: SIGTERM to `run`.  The app finishes work through the sidecar
    *after* the signal (the sidecar must still route), then exits; its code comes back."""
    flags, _ = _sidecar_flags(upstream)
    marker = tmp_path / "started"
    app = CALL + textwrap.dedent(f"""
        import pathlib, signal, time
        got = []
        signal.signal(signal.SIGTERM, lambda *a: got.append(1))
        pathlib.Path({str(marker)!r}).write_text("x")
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)                       # in-flight work keeps going for a while
        status, _ = call()
        sys.exit(7 if got and status == 200 else 6)
    """)
    proc = _run([*flags, "--", sys.executable, "-c", app])
    wait_until(lambda: marker.exists(), 30, "the app to start")
    proc.send_signal(signal.SIGTERM)
    code, _, err = _finish(proc)
    assert code == 7, err[-3000:]
    assert "forwarding SIGTERM to the app" in err
    assert err.index("forwarding SIGTERM") < err.index("the app exited with code 7") < err.index(
        "draining: readiness off")


def test_sidecar_never_ready_means_the_app_never_starts(tmp_path):
    dead_control = f"127.0.0.1:{free_port()}"  # nothing listens there
    marker = tmp_path / "app-ran"
    flags = ["--service", "orders", "--app", f"127.0.0.1:{free_port()}", "--control", dead_control,
             "--inbound", f"127.0.0.1:{free_port()}", "--outbound-http", f"127.0.0.1:{free_port()}",
             "--outbound-grpc", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}",
             "--access-log", "off"]
    started = time.monotonic()
    code, _, err = _finish(_run(["--ready-timeout", "5", *flags, "--", sys.executable, "-c",
                                 f"open({str(marker)!r}, 'w').write('ran')"]))
    assert code == EXIT_NOT_READY, err[-3000:]
    assert "not ready within 5s (" in err
    # The reason is the sidecar's own /ready text (on a very slow start: that admin never answered).
    assert "waiting for the first config from the control server" in err or "admin not answering" in err
    assert "the app was never started" in err
    assert not marker.exists()
    assert time.monotonic() - started < 30


def test_sidecar_that_exits_before_ready_fails_the_run(tmp_path):
    flags = ["--service", "orders", "--app", "127.0.0.1:1", "--control", "127.0.0.1:1",
             "--admin", f"127.0.0.1:{free_port()}", "--workers", "0"]  # refused by the sidecar itself
    code, _, err = _finish(_run([*flags, "--", sys.executable, "-c", "raise SystemExit(0)"]))
    assert code == EXIT_SIDECAR_FAILED
    assert "exited with code 2 before it was ready" in err


def test_sidecar_dying_under_the_app_stops_the_app_and_says_so(upstream, tmp_path):
    flags, admin = _sidecar_flags(upstream)
    marker, started = tmp_path / "stopped", tmp_path / "started"
    app = textwrap.dedent(f"""
        import pathlib, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).write_text("x"), sys.exit(0)))
        pathlib.Path({str(started)!r}).write_text("x")
        time.sleep(60)
    """)
    proc = _run([*flags, "--", sys.executable, "-c", app])
    wait_until(lambda: tcp_open("127.0.0.1", admin), 30, "the sidecar's admin port")
    # The sidecar is a child of the `run` we started; its pid is in run's "ready" line on stderr.
    line = ""
    deadline = time.monotonic() + 30
    while "ready; started the app" not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
    sidecar_pid = int(line.split("sidecar (pid ")[1].split(")")[0])
    wait_until(started.exists, 30, "the app to install its SIGTERM handler")
    os.kill(sidecar_pid, signal.SIGKILL)
    code, _, err = _finish(proc)
    assert code == EXIT_SIDECAR_FAILED, err[-3000:]
    assert "the sidecar exited with code -9 while the app was running; stopping the app" in err
    assert marker.exists()  # the app got SIGTERM, not a silent kill


def test_usage_errors_and_exit_codes(capsys):
    for argv in (["--service", "x"], ["--service", "x", "--control", "a:1", "--"],
                 ["--service", "x", "--control", "a:1", "--admin", "0.0.0.0:0", "--", "true"]):
        with pytest.raises(SystemExit) as exc:
            parse(argv)
        assert exc.value.code == 2
    opts = parse(["--ready-timeout", "3", "--service", "x", "--control", "a:1", "--admin", "0.0.0.0:9901",
                  "--drain-delay", "2", "--", "app", "--ready-timeout", "9", "--"])
    assert isinstance(opts, RunOptions)
    assert opts.app_argv == ["app", "--ready-timeout", "9", "--"]  # the app's own flags untouched
    assert opts.ready_timeout_s == 3 and opts.ready_url == "http://127.0.0.1:9901/ready"
    assert opts.drain_bound_s == 2 + 10 + 10
    assert opts.app_env["PROTOMESH_OUTBOUND_HTTP"] == "127.0.0.1:15001"
    assert _exit_code(3) == 3 and _exit_code(-signal.SIGTERM) == 143
