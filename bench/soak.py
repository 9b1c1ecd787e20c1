"""Soak: the demo mesh under steady mixed load, watching every sidecar's file descriptors and RSS.

    make soak SOAK_SECONDS=300          # or: python -m bench.soak --seconds 300

Why: a leak of one socket or a few kilobytes per request does not show in a test of a hundred
requests, and a sidecar that dies of it after a day takes its service with it.  Here the whole
demo mesh (control server, users x2, orders, products, each app behind its sidecar, the gateway)
runs on 127.0.0.1 under a paced load through the gateway for N seconds:

- HTTP GET /v1/products/… on two keep-alive connections, and one more that opens a new
  connection for every request (so a leaked socket per connection shows as a growing fd count);
- gRPC GetUser (gateway → users sidecar → users) and CreateOrder (gateway → orders, whose app then
  calls users and products through its own sidecar), each on its own channel.

Every `--interval` seconds it reads /proc/<pid>/fd and VmRSS of each sidecar, the gateway and the
control server, and the load's counters.  At the end it prints the table and a verdict per
process: flat when the last sample is within the margin (`--fd-margin` descriptors,
`--rss-margin-mb` MB) of the sample taken at `--baseline-s` (60 s: start-up, pools and caches
filled).  Exit code 0 when every process is flat and no request failed, 1 otherwise.  Every load
loop is bounded by the duration and by a request count; every process is stopped by its PID.
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from demo.topology import Topology


# ---- paced load ---------------------------------------------------------------------------------------
class Loop(threading.Thread):
    """Calls `one()` `rate` times a second until stopped, the deadline, or `max_calls`."""

    def __init__(self, name: str, one, rate: float, deadline: float, max_calls: int):
        super().__init__(name=name, daemon=True)
        self.one, self.rate, self.deadline, self.max_calls = one, rate, deadline, max_calls
        self.ok = 0
        self.failed = 0
        self.samples: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        period = 1.0 / self.rate
        nxt = time.monotonic()
        for _ in range(self.max_calls):
            now = time.monotonic()
            if self.stop_event.is_set() or now > self.deadline:
                return
            if nxt > now:
                if self.stop_event.wait(nxt - now):
                    return
            nxt = max(nxt + period, time.monotonic() - 1.0)  # no catch-up burst after a stall
            try:
                self.one()
                self.ok += 1
            except Exception as exc:  # every failure is counted and a few are kept to show
                self.failed += 1
                if len(self.samples) < 5:
                    self.samples.append(f"{type(exc).__name__}: {exc}"[:200])


class KeepAlive:
    def __init__(self, port: int, fresh: bool = False):
        self.port, self.fresh, self.conn, self.n = port, fresh, None, 0

    def __call__(self) -> None:
        self.n += 1
        if self.conn is None or self.fresh:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            self.conn.request("GET", f"/v1/products/p{self.n % 3 + 1}")
            resp = self.conn.getresponse()
            body = resp.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self.conn.close()
            self.conn = None  # an idle close by the server is not a failure: the next call reconnects
            raise
        finally:
            if self.fresh and self.conn is not None:
                self.conn.close()
                self.conn = None
        if resp.status != 200 or not body:
            raise RuntimeError(f"HTTP {resp.status} {resp.getheader('x-protomesh-reason', '')}")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class Grpc:
    def __init__(self, port: int, kind: str):
        from demo.orders.v1 import orders_pb2, orders_pb2_grpc
        from demo.users.v1 import users_pb2, users_pb2_grpc
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.kind, self.n = kind, 0
        self.users = users_pb2_grpc.UsersStub(self.channel)
        self.orders = orders_pb2_grpc.OrdersStub(self.channel)
        self.users_pb2, self.orders_pb2 = users_pb2, orders_pb2

    def __call__(self) -> None:
        self.n += 1
        if self.kind == "GetUser":
            uid = str(self.n % 5 + 1)
            assert self.users.GetUser(self.users_pb2.GetUserRequest(id=uid), timeout=5).id == uid
        else:
            req = self.orders_pb2.CreateOrderRequest(user_id="2", product_id="p1", quantity=1)
            assert self.orders.CreateOrder(req, timeout=5).user.id == "2"

    def close(self) -> None:
        self.channel.close()


# ---- sampling -----------------------------------------------------------------------------------------
def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sample(procs: dict[str, int]) -> dict[str, tuple[int, float]]:
    out = {}
    for name, pid in procs.items():
        try:
            out[name] = (fd_count(pid), rss_mb(pid))
        except OSError:  # the process is gone: that is a finding in itself
            out[name] = (-1, float("nan"))
    return out


def verdict(samples: list[dict], baseline_s: float, fd_margin: int, rss_margin_mb: float) -> dict[str, dict]:
    """Per process: the sample at (or first after) `baseline_s` against the last one."""
    base = next((s for s in samples if s["t"] >= baseline_s), samples[0])
    last = samples[-1]
    out = {}
    for name, (fd0, rss0) in base["procs"].items():
        fd1, rss1 = last["procs"][name]
        flat = fd1 >= 0 and fd1 - fd0 <= fd_margin and rss1 - rss0 <= rss_margin_mb
        out[name] = {"flat": flat, "fd": (fd0, fd1), "rss_mb": (round(rss0, 1), round(rss1, 1)),
                     "base_t": base["t"], "last_t": last["t"]}
    return out


def print_table(samples: list[dict], names: list[str], loops: list[Loop]) -> None:
    head = f"{'t(s)':>5} {'requests':>9} {'failed':>6} | " + " | ".join(f"{n[:15]:>15}" for n in names)
    print("fds / RSS MB per process")
    print(head)
    print("-" * len(head))
    for s in samples:
        cells = " | ".join(f"{s['procs'][n][0]:>5} / {s['procs'][n][1]:>6.1f}" for n in names)
        print(f"{s['t']:>5.0f} {s['ok']:>9} {s['failed']:>6} | {cells}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--interval", type=float, default=10)
    ap.add_argument("--rate", type=float, default=50, help="calls per second of each of the 5 load loops")
    ap.add_argument("--baseline-s", type=float, default=60)
    ap.add_argument("--fd-margin", type=int, default=3)
    ap.add_argument("--rss-margin-mb", type=float, default=5.0)
    ap.add_argument("--workdir", help="where logs go (default: a new temporary directory)")
    ap.add_argument("--json", help="also write the samples and verdict here")
    args = ap.parse_args(argv)
    if args.seconds < args.baseline_s + args.interval:
        print(f"--seconds must be at least --baseline-s + --interval ({args.baseline_s + args.interval:g})",
              file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="protomesh-soak-"))
    topo = Topology(workdir)
    loops: list[Loop] = []
    clients = []
    samples: list[dict] = []
    try:
        print(f"starting the demo mesh in {workdir} …", flush=True)
        topo.start_all(users_replicas=2)
        procs = {"control": topo.control.pid, "gateway": topo.gateway.pid}
        procs.update({f"{i.replica}-sidecar": i.sidecar.pid for i in topo.instances})
        names = list(procs)
        t0 = time.monotonic()
        deadline = t0 + args.seconds
        max_calls = int(args.rate * args.seconds * 1.1) + 10
        clients = [KeepAlive(topo.gateway_http), KeepAlive(topo.gateway_http), KeepAlive(topo.gateway_http, fresh=True),
                   Grpc(topo.gateway_grpc, "GetUser"), Grpc(topo.gateway_grpc, "CreateOrder")]
        labels = ["http-keepalive-1", "http-keepalive-2", "http-new-conn", "grpc-GetUser", "grpc-CreateOrder"]
        loops = [Loop(label, c, args.rate, deadline, max_calls) for label, c in zip(labels, clients)]
        for loop in loops:
            loop.start()
        print(f"load: {len(loops)} loops x {args.rate:g}/s for {args.seconds:g}s; sampling every {args.interval:g}s",
              flush=True)
        k = 0
        while True:
            now = time.monotonic() - t0
            s = {"t": round(now, 1), "ok": sum(l.ok for l in loops), "failed": sum(l.failed for l in loops),
                 "procs": sample(procs)}
            samples.append(s)
            cells = "  ".join(f"{n}={fd}/{rss:.0f}MB" for n, (fd, rss) in s["procs"].items())
            print(f"[{now:5.0f}s] ok={s['ok']} failed={s['failed']}  {cells}", flush=True)
            if now >= args.seconds:
                break
            k += 1
            time.sleep(max(0.0, t0 + min(k * args.interval, args.seconds) - time.monotonic()))
    except KeyboardInterrupt:
        print("interrupted: reporting what was sampled", file=sys.stderr)
    finally:
        for loop in loops:
            loop.stop_event.set()
        for loop in loops:
            loop.join(15)
        for c in clients:
            c.close()
        topo.stop_all()
    if len(samples) < 2:
        print("not enough samples", file=sys.stderr)
        return 1
    print()
    print_table(samples, names, loops)
    result = verdict(samples, args.baseline_s, args.fd_margin, args.rss_margin_mb)
    print(f"\nverdict (sample at {result[names[0]]['base_t']:g}s vs last at {result[names[0]]['last_t']:g}s; "
          f"flat = fds within +{args.fd_margin}, RSS within +{args.rss_margin_mb:g} MB):")
    for n in names:
        r = result[n]
        print(f"  {n:<20} {'FLAT   ' if r['flat'] else 'GROWING'} fds {r['fd'][0]} -> {r['fd'][1]}, "
              f"RSS {r['rss_mb'][0]} -> {r['rss_mb'][1]} MB")
    failed = sum(l.failed for l in loops)
    ok = sum(l.ok for l in loops)
    elapsed = samples[-1]["t"]
    print(f"requests: {ok} ok ({ok / max(elapsed, 1e-9):.0f}/s), {failed} failed")
    for l in loops:
        print(f"  {l.name:<18} {l.ok:>7} ok {l.failed:>4} failed  {'; '.join(l.samples[:2])}")
    all_flat = all(r["flat"] for r in result.values())
    print(f"\nSOAK {'FLAT' if all_flat and failed == 0 else 'NOT FLAT' if not all_flat else 'FAILURES'}"
          f" (logs in {workdir})")
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": samples, "verdict": result, "ok": ok, "failed": failed,
                                               "seconds": args.seconds, "rate_per_loop": args.rate}, indent=1))
    return 0 if all_flat and failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
