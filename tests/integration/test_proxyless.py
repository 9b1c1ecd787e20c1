"""A proxyless grpcio client (`xds:///users`) configured by our control server: no sidecar on the
client side, the grpc library balances across the users replicas itself and follows endpoint
changes.  The client runs in a subprocess so the bootstrap env var does not leak into this one."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time

import pytest

from demo.topology import Topology

CLIENT = r"""
import json, sys, time, grpc
from demo.users.v1 import users_pb2, users_pb2_grpc
channel = grpc.insecure_channel("xds:///users")
stub = users_pb2_grpc.UsersStub(channel)
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    try:
        who = stub.GetUser(users_pb2.GetUserRequest(id="1"), timeout=2).served_by
    except grpc.RpcError as exc:
        who = "error:" + exc.code().name
    print(who, flush=True)
    time.sleep(0.01)
"""


def bootstrap(control: str, node_id: str) -> str:
    return json.dumps({
        "xds_servers": [{"server_uri": control, "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}],
        "node": {"id": node_id, "cluster": "proxyless", "locality": {}},
    })


class ProxylessClient:
    """Runs CLIENT in a subprocess; collects who served each call."""

    def __init__(self, control: str, seconds: float = 45):
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_XDS")}
        env["GRPC_XDS_BOOTSTRAP_CONFIG"] = bootstrap(control, "proxyless-client-1")
        self.proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(seconds)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def wait_for(self, predicate, timeout_s: float, what: str) -> list[str]:
        """Read served-by lines until predicate(all lines so far) holds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.seen.append(self.lines.get(timeout=0.2))
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if predicate(self.seen):
                return self.seen
        raise TimeoutError(f"timed out waiting for {what}; last calls: {self.seen[-10:]}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def users_mesh(tmp_path):
    topo = Topology(tmp_path)
    try:
        topo.start_control(grace_s=1.0, warmup_s=0)
        for i in (1, 2):
            topo.start_instance("users", f"users-{i}", state_dir=False)
        topo.wait_ready()
        yield topo
    finally:
        topo.stop_all()


def test_proxyless_client_balances_and_follows_endpoint_changes(users_mesh):
    topo = users_mesh
    client = ProxylessClient(topo.control_addr)
    try:
        seen = client.wait_for(lambda s: {"users-1", "users-2"} <= set(s), 20, "calls to reach both replicas")
        window = seen[-20:] if len(seen) >= 20 else client.wait_for(lambda s: len(s) >= 20, 10, "20 calls")[-20:]
        assert {"users-1", "users-2"} == set(window), window  # balanced, not pinned
        # The CSDS view names the client, its flavour and its ACKed resources.
        out = subprocess.run([sys.executable, "-m", "protomesh", "status", "--control", topo.control_addr, "--json"],
                             capture_output=True, text=True, timeout=30)
        node = {n["node"]: n for n in json.loads(out.stdout)}["proxyless-client-1"]
        assert node["flavour"] == "grpc" and node["types"]["LDS"]["status"] == "ACKED", node

        topo.start_instance("users", "users-3", state_dir=False)
        mark = len(client.seen)
        client.wait_for(lambda s: "users-3" in s[mark:], 20, "the new replica to get calls")

        victim = next(i for i in topo.instances if i.replica == "users-1")
        topo.launcher.stop(victim.sidecar)
        stopped = time.monotonic()

        def users_1_gone(s):
            tail = s[-30:]
            return len(s) - mark > 30 and "users-1" not in tail and all(not w.startswith("error") for w in tail)
        client.wait_for(users_1_gone, 20, "calls to stop reaching users-1")
        assert time.monotonic() - stopped < 15
    finally:
        client.close()
