"""The `protomesh` command: control, sidecar, gateway, status, demo, demo services, collector."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys


def _loop_run(coro_factory) -> int:
    """uvloop unless PROTOMESH_EVENT_LOOP=asyncio (the data path works on both; the choice is
    measured in bench/, not guessed)."""
    if os.environ.get("PROTOMESH_EVENT_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
    return asyncio.run(coro_factory())


def _addr_list(text: str) -> list[str]:
    return [a.strip() for a in text.split(",") if a.strip()]


def _labels(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--label {item!r}: write key=value")
        out[key] = value
    return out


def cmd_control(args) -> int:
    from control.app import ControlOptions, ControlServer
    from control.errors import MeshError
    from sidecar.app import install_signal_handlers
    from sidecar.listeners import grpc_engine

    if args.keepalive > 0 and args.keepalive_timeout <= 0:
        print("protomesh control: --keepalive-timeout must be above 0 while --keepalive is on "
              "(fix: give it seconds, or --keepalive 0 to turn keepalive off)", file=sys.stderr)
        return 2
    try:
        engine = grpc_engine.choose(args.xds_engine, env="PROTOMESH_XDS_ENGINE", option="--xds-engine")
        server = ControlServer(ControlOptions(mesh=args.mesh, xds=args.xds, admin=args.admin,
                                              grace_s=args.grace, warmup_s=args.warmup,
                                              watch_interval_s=args.watch_interval, xds_engine=engine,
                                              keepalive_s=args.keepalive, keepalive_timeout_s=args.keepalive_timeout))
    except (MeshError, ValueError) as exc:
        print(f"protomesh control: {exc}", file=sys.stderr)
        return 2

    async def main():
        stop = asyncio.Event()
        install_signal_handlers(stop)
        return await server.run(stop)
    return _loop_run(main)


def cmd_sidecar(args) -> int:
    from sidecar.app import Sidecar, SidecarOptions, install_signal_handlers
    from sidecar.listeners import grpc_engine

    try:
        engine = grpc_engine.choose(args.grpc_engine)
    except ValueError as exc:
        print(f"protomesh sidecar: {exc}", file=sys.stderr)
        return 2
    if not args.gateway and not args.service:
        print("protomesh sidecar: --service NAME is required (or --gateway)", file=sys.stderr)
        return 2
    opts = SidecarOptions(
        control=_addr_list(args.control), service=args.service or "", gateway=args.gateway,
        app=args.app or "", protocol=args.protocol or "", inbound=args.inbound, advertise=args.advertise or "",
        outbound_http=args.outbound_http, outbound_grpc=args.outbound_grpc, admin=args.admin,
        labels=_labels(args.label), node_id=args.node_id or "", otlp=args.otlp, sampling=args.sampling,
        state_dir=args.state_dir, access_log=None if args.access_log == "off" else args.access_log,
        drain_delay_s=args.drain_delay, drain_timeout_s=args.drain_timeout,
        workers=args.workers, worker_index=args.worker_index, grpc_engine=engine)
    if not args.gateway and not opts.app:
        print("protomesh sidecar: --app HOST:PORT (the local app) is required", file=sys.stderr)
        return 2
    if not 1 <= args.workers <= 64 or not 0 <= args.worker_index < args.workers:
        print("protomesh sidecar: --workers must be 1..64 (and --worker-index below it)", file=sys.stderr)
        return 2
    children = []
    if args.workers > 1 and args.worker_index == 0:
        from sidecar.workers import start_workers
        children = start_workers(args.raw_argv, args.workers)

    async def main():
        stop = asyncio.Event()
        install_signal_handlers(stop)
        return await Sidecar(opts).run(stop)
    code = _loop_run(main)
    if children:
        from sidecar.workers import stop_workers
        code = max(code, stop_workers(children, opts.drain_timeout_s + 5))
    return code


def cmd_status(args) -> int:
    from protomesh.status import main
    return main(args.control, args.json)


def cmd_describe(args) -> int:
    from protomesh.describe import main
    return main(args.mesh, args.target, args.json)


def cmd_service(args, rest) -> int:
    from demo.services import SERVICES
    return SERVICES[args.name](rest)


def cmd_collector(args, rest) -> int:
    from protomesh.collector import main
    return main(rest)


def cmd_demo(args, rest) -> int:
    from demo.run import main
    return main(rest)


def cmd_codegen(args, rest) -> int:
    from protomesh.codegen import main
    return main(rest)


def cmd_run(args, rest) -> int:
    from protomesh.run import main
    raw = args.raw_argv
    return main(raw[raw.index("run") + 1:], args.log_level)  # keeps `--` and the app's own flags intact


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="protomesh", description=__doc__)
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("control", help="run the xDS control server")
    c.add_argument("--mesh", required=True, help="path to mesh.yaml (watched for edits)")
    c.add_argument("--xds", default="0.0.0.0:15010", help="ADS + CSDS gRPC listen address")
    c.add_argument("--admin", default="0.0.0.0:15000", help="admin HTTP listen address")
    c.add_argument("--grace", type=float, default=5.0,
                   help="seconds a sidecar stays an endpoint after its stream ends")
    c.add_argument("--warmup", type=float, default=5.0,
                   help="after a restart, seconds before answering sidecars that already have config, "
                        "so every reconnecting sidecar re-registers first (new sidecars are answered at once)")
    c.add_argument("--watch-interval", type=float, default=0.5,
                   help="seconds between checks of mesh.yaml and its protos for edits")
    c.add_argument("--keepalive", type=float, default=30.0,
                   help="seconds of silence on a sidecar's connection before it is PINGed (0: never; "
                        "h2 engine only)")
    c.add_argument("--keepalive-timeout", type=float, default=10.0,
                   help="seconds a PING may go unanswered before the connection is closed and the "
                        "sidecar's streams end (its endpoints go after --grace)")
    c.add_argument("--xds-engine", choices=("h2", "grpcio"),
                   help="what serves ADS/CSDS: h2 (our own HTTP/2 gRPC server, the default) or grpcio "
                        "(grpc.aio); else env PROTOMESH_XDS_ENGINE")
    c.set_defaults(func=cmd_control)

    s = sub.add_parser("sidecar", help="run a sidecar (or, with --gateway, the edge gateway)")
    s.add_argument("--control", required=True, help="control server address(es), comma separated")
    s.add_argument("--service", help="the mesh service this sidecar fronts")
    s.add_argument("--gateway", action="store_true", help="run as the edge gateway")
    s.add_argument("--app", help="HOST:PORT of the local app")
    s.add_argument("--protocol", choices=("grpc", "http"), help="the app's protocol (default: from mesh.yaml)")
    s.add_argument("--inbound", default="0.0.0.0:15006", help="inbound listener (peers call this)")
    s.add_argument("--advertise", help="HOST:PORT peers use to reach the inbound listener")
    s.add_argument("--outbound-http", default="127.0.0.1:15001", help="the app's HTTP calls go here")
    s.add_argument("--outbound-grpc", default="127.0.0.1:15002", help="the app's gRPC calls go here")
    s.add_argument("--admin", default="0.0.0.0:15000")
    s.add_argument("--label", action="append", help="key=value label announced with the endpoint")
    s.add_argument("--node-id")
    s.add_argument("--otlp", help="OTLP/gRPC endpoint, e.g. http://127.0.0.1:4317")
    s.add_argument("--sampling", type=float, default=0.01,
                   help="share of new traces sampled when tracing comes from --otlp (default 0.01); "
                        "mesh.yaml telemetry.sampling wins once pushed")
    s.add_argument("--state-dir", help="persist the last ACKed config here (serve it on restart)")
    s.add_argument("--access-log", default="-", help="'-' stdout, a file path, or 'off'")
    s.add_argument("--drain-delay", type=float, default=0.0, help="seconds unready before closing listeners")
    s.add_argument("--drain-timeout", type=float, default=10.0, help="seconds in-flight calls get to finish")
    s.add_argument("--workers", type=int, default=1,
                   help="processes sharing the listeners via SO_REUSEPORT, each with its own xDS stream")
    s.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    s.add_argument("--grpc-engine", choices=("h2", "grpcio"),
                   help="gRPC listener engine: h2 (our own HTTP/2, the default) or grpcio (grpc.aio "
                        "passthrough); else env PROTOMESH_GRPC_ENGINE")
    s.set_defaults(func=cmd_sidecar)

    st = sub.add_parser("status", help="every node's ACKed/NACKed config, from the control server's CSDS")
    st.add_argument("--control", default="127.0.0.1:15010")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    d = sub.add_parser("describe", help="each rpc's effective policy and where each value came from")
    d.add_argument("target", help="SERVICE or SERVICE/Rpc (service as named in mesh.yaml)")
    d.add_argument("--mesh", required=True, help="path to mesh.yaml")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_describe)

    sv = sub.add_parser("service", help="run a demo service (users, orders, products)", add_help=False)
    sv.add_argument("name", choices=("users", "orders", "products"))
    sv.set_defaults(func=cmd_service, passthrough=True)

    r = sub.add_parser("run", add_help=False,
                       help="run the sidecar and then the app: [--ready-timeout S] [--stop-timeout S] "
                            "<sidecar flags> -- <app command…>")
    r.set_defaults(func=cmd_run, passthrough=True)

    for name, func, text in (("collector", cmd_collector, "run a local OTLP trace collector"),
                             ("demo", cmd_demo, "run the demo mesh with traffic and a summary"),
                             ("codegen", cmd_codegen, "regenerate Python code from proto/")):
        x = sub.add_parser(name, help=text, add_help=False)
        x.set_defaults(func=func, passthrough=True)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.raw_argv = list(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "passthrough", False):
        return args.func(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
