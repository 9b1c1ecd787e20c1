"""`protomesh status`: every connected node and, per resource type, its ACKed or NACKed version,
read from the control server's CSDS (envoy.service.status.v3.ClientStatusDiscoveryService)."""
from __future__ import annotations

import json

import grpc
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from google.protobuf import json_format

from protomesh import xdstypes


def fetch(control: str, timeout_s: float = 5.0) -> list[dict]:
    with grpc.insecure_channel(control) as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        resp = stub.FetchClientStatus(csds_pb2.ClientStatusRequest(exclude_resource_contents=True),
                                      timeout=timeout_s)
    return summarise(resp)


def summarise(resp: csds_pb2.ClientStatusResponse) -> list[dict]:
    nodes = []
    for cfg in resp.config:
        meta = json_format.MessageToDict(cfg.node.metadata) if cfg.node.HasField("metadata") else {}
        types: dict[str, dict] = {}
        for g in cfg.generic_xds_configs:
            short = xdstypes.SHORT.get(g.type_url, g.type_url)
            t = types.setdefault(short, {"version": g.version_info, "status": "ACKED", "resources": 0,
                                         "error": ""})
            t["resources"] += 1
            status = config_dump_shared_pb2.ClientResourceStatus.Name(g.client_status)
            if status == "NACKED":
                t["status"] = "NACKED"
                t["error"] = g.error_state.details
                t["rejected_version"] = g.error_state.version_info
            elif status != "ACKED" and t["status"] == "ACKED":
                t["status"] = status
        nodes.append({"node": cfg.node.id, "role": meta.get(xdstypes.META_ROLE, "?"),
                      "service": meta.get(xdstypes.META_SERVICE, cfg.node.cluster),
                      "flavour": meta.get(xdstypes.META_FLAVOUR, cfg.node.user_agent_name or "?"),
                      "types": types})
    return nodes


def render(nodes: list[dict]) -> str:
    if not nodes:
        return "no nodes connected\n"
    lines = [f"{'NODE':44} {'ROLE':8} {'SERVICE':10} " + " ".join(f"{t:22}" for t in ("CDS", "EDS", "LDS", "RDS"))]
    errors = []
    for n in nodes:
        cols = []
        for t in ("CDS", "EDS", "LDS", "RDS"):
            info = n["types"].get(t)
            cols.append(f"{'-':22}" if info is None else f"{info['status']} {info['version'] or '-':12}"[:22].ljust(22))
            if info and info["status"] == "NACKED":
                errors.append(f"  {n['node']} {t} rejected version {info.get('rejected_version', '?')}: {info['error']}")
        lines.append(f"{n['node'][:44]:44} {n['role']:8} {n['service'][:10]:10} " + " ".join(cols))
    if errors:
        lines.append("")
        lines.append("NACKs (the node keeps serving its last ACKed version):")
        lines.extend(errors)
    return "\n".join(lines) + "\n"


def main(control: str, as_json: bool) -> int:
    try:
        nodes = fetch(control)
    except grpc.RpcError as exc:
        print(f"protomesh status: cannot reach the control server at {control}: {exc.code().name} "
              f"{exc.details()} (fix: start `protomesh control` or pass --control HOST:PORT)")
        return 2
    print(json.dumps(nodes, indent=2) if as_json else render(nodes), end="" if not as_json else "\n")
    return 0
