"""`protomesh run [run flags] [sidecar flags] -- <app command…>`: the sidecar and its app as one unit.

Why: an app that starts before its proxy fails its first outbound calls, and a Kubernetes Job
whose app has finished never completes while a sidecar container keeps running.  This small
supervisor gives the two processes one lifecycle:

1. start `protomesh sidecar` with the given flags and wait (bounded by `--ready-timeout`) until
   its admin `/ready` answers 200; if it never does, or the sidecar exits first, the app is never
   started and the exit code and a message on stderr say why;
2. start the app with `PROTOMESH_OUTBOUND_HTTP`, `PROTOMESH_OUTBOUND_GRPC` and `PROTOMESH_ADMIN`
   in its environment;
3. SIGTERM / SIGINT / SIGHUP go to the app only.  The sidecar keeps serving meanwhile, so the app
   can finish its in-flight calls through it.  An app that has not exited `--stop-timeout`
   seconds after the first signal is killed;
4. once the app has exited, the sidecar gets SIGTERM and drains (readiness off, `--drain-delay`,
   in-flight calls finish within `--drain-timeout`), and `protomesh run` exits with the **app's**
   exit code (128+N when a signal N ended it);
5. if the sidecar dies while the app runs, the app is stopped and the exit code is 125.

Both children run in their own session, so a terminal's Ctrl-C reaches this supervisor only and
the order above holds.  This is the same contract as linkerd-await's `--shutdown`, in-process.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

EXIT_USAGE = 2
EXIT_NOT_READY = 124  # like timeout(1): the sidecar did not become ready in time
EXIT_SIDECAR_FAILED = 125  # the sidecar exited on its own (before ready, or under the app)
EXIT_APP_NOT_EXECUTABLE = 126  # shell conventions for a command that cannot run
EXIT_APP_NOT_FOUND = 127

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
POLL_S = 0.05


@dataclass
class RunOptions:
    sidecar_args: list[str]
    app_argv: list[str]
    ready_url: str
    ready_timeout_s: float = 60.0
    stop_timeout_s: float = 30.0
    drain_bound_s: float = 20.0  # how long the sidecar may take to drain before it is killed
    app_env: dict | None = None
    log_level: str = "INFO"


def _say(text: str) -> None:
    print(f"protomesh run: {text}", file=sys.stderr, flush=True)


def _local(host: str) -> str:
    """The address to reach a listener bound to `host` from this machine."""
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return host


def parse(argv: list[str], log_level: str = "INFO") -> RunOptions:
    """Split `argv` at `--`; check the sidecar flags with the sidecar's own parser.  Raises
    SystemExit(2) with a message on a usage error."""
    if "--" not in argv:
        _say("usage: protomesh run [--ready-timeout S] [--stop-timeout S] <sidecar flags> -- <app command…>")
        raise SystemExit(EXIT_USAGE)
    cut = argv.index("--")
    ours, app = argv[:cut], argv[cut + 1:]
    if not app:
        _say("no app command after --")
        raise SystemExit(EXIT_USAGE)
    p = argparse.ArgumentParser(prog="protomesh run", add_help=False)
    p.add_argument("--ready-timeout", type=float, default=60.0,
                   help="seconds the sidecar gets to become ready before giving up (the app never starts)")
    p.add_argument("--stop-timeout", type=float, default=30.0,
                   help="seconds the app gets after a forwarded signal before it is killed")
    run_args, sidecar_args = p.parse_known_args(ours)

    from protomesh.cli import build_parser  # the sidecar's flags are defined once, in the CLI
    sc = build_parser().parse_args(["sidecar", *sidecar_args])
    host, _, port = sc.admin.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        _say(f"--admin {sc.admin}: needs a fixed port (readiness is checked there)")
        raise SystemExit(EXIT_USAGE)
    env = {"PROTOMESH_OUTBOUND_HTTP": sc.outbound_http, "PROTOMESH_OUTBOUND_GRPC": sc.outbound_grpc,
           "PROTOMESH_ADMIN": f"{_local(host)}:{port}"}
    return RunOptions(sidecar_args=sidecar_args, app_argv=app,
                      ready_url=f"http://{_local(host)}:{port}/ready",
                      ready_timeout_s=run_args.ready_timeout, stop_timeout_s=run_args.stop_timeout,
                      drain_bound_s=sc.drain_delay + sc.drain_timeout + 10.0, app_env=env,
                      log_level=log_level)


def probe(url: str, timeout_s: float = 1.0) -> tuple[bool, str]:
    """(ready, why not) from a `/ready` page."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200, ""
    except urllib.error.HTTPError as err:
        return False, err.read().decode(errors="replace").strip() or f"HTTP {err.code}"
    except OSError as exc:
        return False, f"admin not answering ({getattr(exc, 'reason', exc)})"


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if this supervisor itself is killed (SIGKILL, OOM), so
    neither the app nor the sidecar outlives it.  Runs in the child between fork and exec."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _exit_code(returncode: int) -> int:
    """Popen's negative 'killed by signal N' → the shell's 128+N."""
    return 128 - returncode if returncode < 0 else returncode


_PREEXEC = _die_with_parent if sys.platform.startswith("linux") else None


class Runner:
    def __init__(self, opts: RunOptions):
        self.opts = opts
        self.sidecar: subprocess.Popen | None = None
        self.app: subprocess.Popen | None = None
        self.signals: list[int] = []

    def _on_signal(self, signum, _frame) -> None:
        self.signals.append(signum)

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in FORWARDED}
        try:
            return self._run()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            for proc in (self.app, self.sidecar):  # only on a bug: never leave a child behind
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(5)

    # ---- phases ---------------------------------------------------------------------------
    def _run(self) -> int:
        o = self.opts
        self.sidecar = subprocess.Popen(
            [sys.executable, "-m", "protomesh", "--log-level", o.log_level, "sidecar", *o.sidecar_args],
            start_new_session=True, preexec_fn=_PREEXEC)
        code = self._wait_ready()
        if code is not None:
            return code
        try:
            self.app = subprocess.Popen(o.app_argv, env={**os.environ, **(o.app_env or {})},
                                        start_new_session=True, preexec_fn=_PREEXEC)
        except FileNotFoundError:
            _say(f"app command not found: {o.app_argv[0]}")
            self._stop_sidecar()
            return EXIT_APP_NOT_FOUND
        except PermissionError:
            _say(f"app command not executable: {o.app_argv[0]}")
            self._stop_sidecar()
            return EXIT_APP_NOT_EXECUTABLE
        _say(f"sidecar (pid {self.sidecar.pid}) ready; started the app (pid {self.app.pid}): "
             f"{' '.join(o.app_argv)}")
        app_code = self._supervise()
        if app_code is None:
            return EXIT_SIDECAR_FAILED
        self._stop_sidecar()
        return app_code

    def _wait_ready(self) -> int | None:
        """None once ready; else the exit code (the sidecar was stopped)."""
        o = self.opts
        deadline = time.monotonic() + o.ready_timeout_s
        why = "not checked yet"
        while True:
            if self.signals:
                _say(f"got {signal.Signals(self.signals[0]).name} before the sidecar was ready; "
                     "stopping it, the app was never started")
                self._stop_sidecar()
                return 128 + self.signals[0]
            rc = self.sidecar.poll()
            if rc is not None:
                _say(f"the sidecar exited with code {rc} before it was ready; the app was never started")
                return EXIT_SIDECAR_FAILED
            left = deadline - time.monotonic()
            if left <= 0:
                _say(f"the sidecar was not ready within {o.ready_timeout_s:g}s ({why}); "
                     "the app was never started")
                self._stop_sidecar()
                return EXIT_NOT_READY
            ok, why = probe(o.ready_url, min(1.0, max(0.1, left)))
            if ok:
                return None
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _supervise(self) -> int | None:
        """The app's exit code, or None when the sidecar died under it (the app was stopped)."""
        app, sidecar = self.app, self.sidecar
        seen = 0
        kill_at = None
        while True:
            rc = app.poll()
            if rc is not None:
                code = _exit_code(rc)
                _say(f"the app exited with code {code}; draining the sidecar")
                return code
            src = sidecar.poll()
            if src is not None:
                _say(f"the sidecar exited with code {src} while the app was running; stopping the app")
                self._stop(app, signal.SIGTERM, self.opts.stop_timeout_s)
                return None
            while seen < len(self.signals):
                sig = self.signals[seen]
                seen += 1
                _say(f"forwarding {signal.Signals(sig).name} to the app; the sidecar serves until it exits")
                self._signal(app, sig)
                if kill_at is None:
                    kill_at = time.monotonic() + self.opts.stop_timeout_s
            if kill_at is not None and time.monotonic() > kill_at:
                _say(f"the app did not exit within {self.opts.stop_timeout_s:g}s of the signal; killing it")
                self._signal(app, signal.SIGKILL)
                kill_at = float("inf")
            time.sleep(POLL_S)

    def _stop_sidecar(self) -> None:
        rc = self._stop(self.sidecar, signal.SIGTERM, self.opts.drain_bound_s)
        if rc != 0:
            _say(f"the sidecar ended with code {rc} while draining")

    # ---- process helpers ------------------------------------------------------------------
    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        """To the child's process group (it leads its own session), like a terminal would."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            proc.send_signal(sig)

    def _stop(self, proc: subprocess.Popen, sig: int, timeout_s: float) -> int:
        if proc.poll() is None:
            self._signal(proc, sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _say(f"pid {proc.pid} did not exit within {timeout_s:g}s; killing it")
                self._signal(proc, signal.SIGKILL)
                proc.wait(10)
        return _exit_code(proc.returncode)


def main(argv: list[str], log_level: str = "INFO") -> int:
    try:
        opts = parse(argv, log_level)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return Runner(opts).run()
