"""Control-plane restart storm: 200 simulated sidecars on real ADS streams, the control server
restarted on the same address, and every stream back in sync without a push storm.

The streams are state-of-the-world ADS (what `bench/control_sim.py` speaks; node identity and
subscription helpers are imported from it).  Our own sidecar defaults to Delta xDS; the server's
warm-up and push coalescing are the same code for both, and this test measures SotW.

Two worker processes run 100 streams each (`python -m tests.integration.test_storm --worker`).
Unlike `bench/control_sim.py`, a worker's stream reconnects when its stream ends, with jittered
backoff, and resumes the way a sidecar does: its first request carries the version it holds, so
the new server counts it as resumed and answers after `--warmup`.  Every stream records, per
connection, the responses it received per type (with their versions) and when it was in sync.

What is asserted, per stream, on the connection made after the restart: exactly one response per
type (four types) and no version received twice; all 200 in sync within a bound; then one
endpoint edit of mesh.yaml reaches each stream as at most one EDS response and nothing else.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is not an installed package; `make test` runs from the root
    sys.path.insert(0, str(REPO))

STREAMS = 200
WORKERS = 2
SERVICES = 10
TYPES = ("CDS", "EDS", "LDS", "RDS")


# ---- the worker: simulated sidecars that reconnect and resume ------------------------------------
class Resuming:
    """One simulated sidecar.  `conns` is a list, one entry per connection that got a response:
    {"at": start time, "counts": {type: n}, "versions": {type: [v, …]}, "synced_at": t | None}."""

    def __init__(self, i: int, xds: str):
        from bench.control_sim import Subscriber, sim_node
        self.i, self.xds = i, xds
        self.sub = Subscriber(sim_node(i, SERVICES))  # kept across connections: held versions resume
        self.conns: list[dict] = []
        self.errors: list[str] = []

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(self.i)
        while not stop.is_set():
            await self._connect_once(stop)
            if stop.is_set():
                return
            # Jittered backoff, as the sidecar's client does, so reconnects spread out.
            try:
                await asyncio.wait_for(stop.wait(), rng.uniform(0.05, 0.5))
            except asyncio.TimeoutError:
                pass

    async def _connect_once(self, stop: asyncio.Event) -> None:
        from bench.control_sim import run_stream
        from protomesh import xdstypes
        conn = {"at": time.time(), "counts": {}, "versions": {}, "synced_at": None}

        def count(resp) -> None:
            if not conn["counts"]:
                self.conns.append(conn)
            s = xdstypes.SHORT[resp.type_url]
            conn["counts"][s] = conn["counts"].get(s, 0) + 1
            conn["versions"].setdefault(s, []).append(resp.version_info)
            conn["last_rx"] = time.time()
            if conn["synced_at"] is None and set(conn["counts"]) == set(TYPES):
                conn["synced_at"] = time.time()

        opts = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 500)]
        error = await run_stream(self.xds, self.sub, stop, count, options=opts, wait_for_ready=True)
        if error and not error.startswith("CANCELLED"):
            self.errors.append(error.split(":")[0])


async def _worker(args) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.call_later(args.timeout, stop.set)
    sims = [Resuming(i, args.xds) for i in range(args.first, args.first + args.count)]
    status = Path(args.out + ".status")

    async def report():
        while not stop.is_set():
            last = [s.conns[-1] if s.conns else None for s in sims]
            status.write_text(json.dumps({
                "conns": [len(s.conns) for s in sims],
                "synced_latest": sum(1 for c in last if c and c["synced_at"]),
                "last_rx": max((c.get("last_rx", 0) for c in last if c), default=0)}))
            await asyncio.sleep(0.2)

    reporter = asyncio.ensure_future(report())
    tasks = []
    for n, s in enumerate(sims):
        tasks.append(asyncio.ensure_future(s.run(stop)))
        if n % 25 == 24:
            await asyncio.sleep(0.01)
    await asyncio.gather(*tasks, return_exceptions=True)
    reporter.cancel()
    Path(args.out).write_text(json.dumps([{"i": s.i, "conns": s.conns, "errors": s.errors[-5:]} for s in sims]))


# ---- the test --------------------------------------------------------------------------------------
def _mesh(static_port: int | None = None) -> str:
    lines = ["services:"]
    for k in range(SERVICES):
        eps = f', endpoints: ["127.0.0.1:{static_port}"]' if (k == 0 and static_port) else ""
        lines.append(f"  app-{k}: {{ protocol: http{eps} }}")
    return "\n".join(lines) + "\n"


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_two_hundred_streams_resubscribe_after_a_control_restart_without_a_push_storm(tmp_path):
    from demo.topology import admin_json
    from protomesh.launch import Launcher, free_port, http_ok, wait_until

    repo = Path(__file__).resolve().parents[2]
    launcher = Launcher(tmp_path / "logs", env={"PYTHONPATH": str(repo)})
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(_mesh())
    xds, admin = free_port(), free_port()
    warmup = float(os.environ.get("STORM_WARMUP", "2.0"))  # 0 shows what the warm-up prevents

    def start_control():
        proc = launcher.start("control", ["control", "--mesh", str(mesh), "--xds", f"127.0.0.1:{xds}",
                                          "--admin", f"127.0.0.1:{admin}", "--grace", "2",
                                          "--warmup", str(warmup), "--watch-interval", "0.1"])
        wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), 20, "the control server", proc=proc)
        return proc

    def metric(name: str) -> float:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return float("nan")

    outs = [tmp_path / f"worker-{w}.json" for w in range(WORKERS)]
    per = STREAMS // WORKERS

    def states():
        return [_read(o.with_name(o.name + ".status")) for o in outs]

    def settled(conns_wanted: int, quiet_s: float = 1.5):
        """Every stream's connection number `conns_wanted` is in sync, and nothing arrived lately."""
        st = states()
        if not all(st):
            return False
        ok = all(c == conns_wanted for s in st for c in s["conns"]) and sum(s["synced_latest"] for s in st) == STREAMS
        return ok and time.time() - max(s["last_rx"] for s in st) > quiet_s

    control = start_control()
    workers = []
    try:
        for w in range(WORKERS):
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "tests.integration.test_storm", "--worker", "--xds", f"127.0.0.1:{xds}",
                 "--first", str(w * per), "--count", str(per), "--timeout", "55", "--out", str(outs[w])],
                cwd=repo, env=launcher.env, stdout=open(tmp_path / "logs" / f"worker-{w}.log", "ab"),
                stderr=subprocess.STDOUT, start_new_session=True))
        t0 = time.monotonic()
        wait_until(lambda: settled(1), 20, "200 streams to sync with the first control server")
        connected_s = time.monotonic() - t0

        # Restart on the same address.
        launcher.stop(control)
        restarted = time.monotonic()
        control = start_control()
        up_s = time.monotonic() - restarted
        wait_until(lambda: settled(2), 20, "every stream to resubscribe and sync with the new server",
                   proc=control)
        resync_s = time.monotonic() - restarted
        pushes_restart = metric("protomesh_control_pushes_total")
        nodes = admin_json(admin, "/nodes")
        assert len(nodes) == STREAMS
        unsynced = [n["node"] for n in nodes
                    if any(t["pending"] or t["acked"] != t["sent"] for t in n["types"].values())]
        assert unsynced == [], unsynced[:5]

        # One endpoint edit after the restart: each stream gets at most one EDS response.
        mesh.write_text(_mesh(static_port=1))
        wait_until(lambda: metric("protomesh_control_pushes_total") >= pushes_restart + STREAMS, 15,
                   "the edit to reach every stream")
        time.sleep(1.5)  # anything extra (a storm) would arrive now
        pushes_edit = metric("protomesh_control_pushes_total") - pushes_restart
    finally:
        for p in workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in workers:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        launcher.stop_all()

    results = [s for o in outs for s in (_read(o) or [])]
    assert len(results) == STREAMS, f"only {len(results)} stream results"
    after = [s["conns"][1] for s in results]
    per_type = {t: {} for t in TYPES}
    for c in after:
        for t in TYPES:
            n = c["counts"].get(t, 0)
            per_type[t][n] = per_type[t].get(n, 0) + 1
    sync_lag = sorted(c["synced_at"] - c["at"] for c in after)
    reconnect_spread = max(c["at"] for c in after) - min(c["at"] for c in after)
    print(f"\n[storm] SotW, {STREAMS} streams in {WORKERS} processes: first sync {connected_s:.1f}s; control "
          f"restarted in {up_s:.1f}s; all resynced {resync_s:.1f}s after the restart (warm-up {warmup:g}s; "
          f"reconnects spread over {reconnect_spread:.1f}s; connect->in sync p50 {sync_lag[len(sync_lag) // 2]:.2f}s "
          f"max {sync_lag[-1]:.2f}s); new server's responses: {pushes_restart:.0f} for the restart "
          f"({pushes_restart / STREAMS:.2f} per stream), {pushes_edit:.0f} for one endpoint edit; "
          f"responses per stream on the new connection, per type (responses: streams; EDS includes the "
          f"edit): {per_type}")
    for s, c in zip(results, after):
        for t in TYPES:
            versions = c["versions"].get(t, [])
            # The restart: exactly one response per type.  The endpoint edit that follows: one
            # more EDS response with a new version, nothing else.
            assert len(versions) == (2 if t == "EDS" else 1), (s["i"], t, versions)
            assert len(set(versions)) == len(versions), (s["i"], t, versions)
        assert len(s["conns"]) == 2, (s["i"], "reconnected more than once", s["errors"])
    assert pushes_restart == 4 * STREAMS
    assert pushes_edit <= STREAMS  # an endpoint edit is one EDS response per stream, no more
    assert resync_s < warmup + 10


# ---- the simulator's first-connect retries (bench/control_sim.py) ---------------------------------
def test_retry_decision_is_bounded_in_count_and_time():
    from bench.control_sim import RetryPolicy, next_attempt_delay
    policy = RetryPolicy(attempts=3, budget_s=10.0)
    assert next_attempt_delay(policy, 1, 0.0, 0.4) == 0.4
    assert next_attempt_delay(policy, 3, 0.0, 0.4) is None   # attempts used up
    assert next_attempt_delay(policy, 1, 9.8, 0.4) is None   # would start past the budget


async def test_a_stream_whose_first_connect_fails_retries_until_the_server_is_up(tmp_path):
    """The server starts only after the first attempts failed: the stream gets its config on a
    retry, and says how many it needed."""
    import grpc
    from bench.control_sim import RetryPolicy, Subscriber, run_stream_with_retry, sim_node
    from control.model import load_mesh
    from control.registry import Registry
    from control.server import ControlPlane
    from control.views import Views
    from control.wire import add_ads_to_server
    from protomesh.launch import free_port

    (tmp_path / "mesh.yaml").write_text(_mesh())
    port, stop, got = free_port(), asyncio.Event(), []
    sub = Subscriber(sim_node(0, SERVICES))

    def seen(resp):
        got.append(resp.type_url)
        if len(set(got)) == 4:
            stop.set()
    policy = RetryPolicy(attempts=20, budget_s=15.0, base_s=0.05, cap_s=0.2)
    client = asyncio.ensure_future(run_stream_with_retry(f"127.0.0.1:{port}", sub, stop, seen, policy))
    await asyncio.sleep(0.5)
    registry = Registry()
    plane = ControlPlane(Views(load_mesh(str(tmp_path / "mesh.yaml")), registry), registry, debounce_s=0.01)
    server = grpc.aio.server()
    add_ads_to_server(plane, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        error, retries = await asyncio.wait_for(client, 20)
    finally:
        stop.set()
        await server.stop(grace=None)
    assert error == "" and set(got) >= {"type.googleapis.com/envoy.config.cluster.v3.Cluster"}
    assert len(set(got)) == 4 and retries >= 1


async def test_a_stream_gives_up_after_its_attempts():
    from bench.control_sim import RetryPolicy, Subscriber, run_stream_with_retry, sim_node
    from protomesh.launch import free_port
    policy = RetryPolicy(attempts=3, budget_s=10.0, base_s=0.01, cap_s=0.05)
    error, retries = await asyncio.wait_for(run_stream_with_retry(
        f"127.0.0.1:{free_port()}", Subscriber(sim_node(0, SERVICES)), asyncio.Event(), lambda r: None, policy), 30)
    assert error.startswith("UNAVAILABLE") and retries == 2


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", required=True)
    ap.add_argument("--xds", required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=55)
    ap.add_argument("--out", required=True)
    asyncio.run(_worker(ap.parse_args()))
