"""Process plumbing shared by the demo services: flags, event loop, signals, tracing setup.

Why: ``protomesh service <name>`` runs each service as its own process under a sidecar; they
must all stop the same way (SIGTERM/SIGINT → graceful stop → exit 0) and take the same
tracing flags, so that lives here once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger("demo.services")


def default_replica() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def parse_hostport(value: str) -> tuple[str, int]:
    """'127.0.0.1:50051' → ('127.0.0.1', 50051); '[::1]:80' works too."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def hostport_arg(value: str) -> str:
    parse_hostport(value)
    return value


XDS_SCHEME = "xds:///"


def grpc_target_arg(value: str) -> str:
    """HOST:PORT, or ``xds:///NAME`` for a proxyless channel: grpc's own xDS resolver then finds
    NAME's endpoints, given a bootstrap in ``GRPC_XDS_BOOTSTRAP`` / ``GRPC_XDS_BOOTSTRAP_CONFIG``."""
    if value.startswith(XDS_SCHEME):
        name = value[len(XDS_SCHEME):]
        if not name or "/" in name or any(c.isspace() for c in name):
            raise argparse.ArgumentTypeError(f"expected xds:///NAME, got {value!r}")
        return value
    return hostport_arg(value)


def sampling_arg(value: str) -> float:
    try:
        ratio = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}") from None
    if not 0.0 <= ratio <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}")
    return ratio


def base_parser(service: str, default_listen: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"protomesh service {service}", description=description)
    parser.add_argument(
        "--listen", type=hostport_arg, default=default_listen,
        help=f"HOST:PORT to serve on (default {default_listen}; port 0 picks a free one)",
    )
    parser.add_argument(
        "--replica", default=None,
        help="name reported in served_by / x-served-by (default: hostname-pid)",
    )
    parser.add_argument(
        "--otlp", default=None, metavar="URL",
        help="OTLP/gRPC endpoint for spans, e.g. http://127.0.0.1:4317 (default: no export)",
    )
    parser.add_argument(
        "--sampling", type=sampling_arg, default=1.0,
        help="head sampling ratio for traces started here, 0..1 (default 1.0)",
    )
    return parser


def run_service(
    service_name: str,
    args: argparse.Namespace,
    serve: Callable[[asyncio.Event], Awaitable[None]],
) -> int:
    """Set up tracing, run ``serve(stop)`` until SIGTERM/SIGINT, flush spans.

    Returns 0 after a signalled stop, 1 when the service cannot start (e.g. its port is taken).
    """
    from protomesh.telemetry import setup_tracing, shutdown_tracing

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    setup_tracing(service_name, args.otlp, args.sampling)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    try:
        run_event_loop(_main())
    except OSError as exc:  # typically the port is taken: say so, no traceback
        log.error("%s: %s", service_name, exc)
        return 1
    finally:
        shutdown_tracing()
    return 0


def run_event_loop(coro: Awaitable[None]) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is a speed-up, not a requirement
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def announce(service: str, replica: str, host: str, port: int) -> None:
    """One parseable stdout line once the port is bound (tests and scripts wait for it)."""
    print(f"{service} replica={replica} listening on {host}:{port}", flush=True)
    log.info("%s replica %s listening on %s:%d", service, replica, host, port)


class GrpcServer:
    """A started grpc.aio server with health and reflection; ``stop`` drains it."""

    def __init__(self, server: grpc.aio.Server, port: int, replica: str, health: Any) -> None:
        self.server, self.port, self.replica, self._health = server, port, replica, health
        self._on_stop: list[Callable[[], Awaitable[None]]] = []

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` after the server has drained (close clients it used)."""
        self._on_stop.append(callback)

    async def stop(self, grace: float = 5.0) -> None:
        # NOT_SERVING first, so health-checking sidecars stop sending new calls while the
        # calls in flight get ``grace`` seconds to finish.
        await self._health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for callback in reversed(self._on_stop):
            await callback()


async def start_grpc_server(
    listen: str,
    replica: str,
    service_names: list[str],
    register: Callable[[grpc.aio.Server], None],
) -> GrpcServer:
    """Bind ``listen`` (port 0 allowed), register the services plus health and reflection."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from demo.services.tracing import ServerTracingInterceptor

    # No SO_REUSEPORT: a second replica on a taken port must fail, not silently share it.
    server = grpc.aio.server(
        interceptors=[ServerTracingInterceptor()], options=[("grpc.so_reuseport", 0)]
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:  # grpcio raises rather than returning 0 in recent versions
        raise OSError(f"cannot listen on {listen}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return GrpcServer(server, port, replica, health_servicer)


async def serve_until(stop: asyncio.Event, running: Any, grace: float = 5.0) -> None:
    """Wait for ``stop``, then stop ``running`` gracefully."""
    try:
        await stop.wait()
    finally:
        await running.stop(grace)
