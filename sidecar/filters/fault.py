"""Fault injection (Envoy's `envoy.filters.http.fault`, HTTPFault): delay and abort a share of a
route's requests, or those that ask for it by header when `header_delay` / `header_abort` is set.

Config arrives per route as `typed_per_filter_config["envoy.filters.http.fault"]` (the control
server puts an empty HTTPFault on the listener, as Envoy needs the filter in the chain).  As in
Envoy, the delay comes first and the abort is decided after it; an abort answers locally with the
configured status and reason `fault_abort`; a delay holds the request before any endpoint is
picked, so it neither counts against the route timeout nor occupies an upstream.

Headers honoured when enabled (Envoy's names): `x-envoy-fault-delay-request` (ms),
`x-envoy-fault-delay-request-percentage`, `x-envoy-fault-abort-request` (HTTP status),
`x-envoy-fault-abort-grpc-request` (gRPC status), `x-envoy-fault-abort-request-percentage`.
A percentage header is a numerator over the configured denominator, capped at the configured one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.type.v3 import percent_pb2

from sidecar.call import Reply
from sidecar.config.errors import ConfigError

FILTER_NAME = "envoy.filters.http.fault"
TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"

DELAY_HEADER = "x-envoy-fault-delay-request"
DELAY_PERCENT_HEADER = "x-envoy-fault-delay-request-percentage"
ABORT_HEADER = "x-envoy-fault-abort-request"
ABORT_GRPC_HEADER = "x-envoy-fault-abort-grpc-request"
ABORT_PERCENT_HEADER = "x-envoy-fault-abort-request-percentage"

_DENOMINATORS = {percent_pb2.FractionalPercent.HUNDRED: 100,
                 percent_pb2.FractionalPercent.TEN_THOUSAND: 10_000,
                 percent_pb2.FractionalPercent.MILLION: 1_000_000}


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    delay_s: float | None = None  # fixed delay; None with header_delay: the header decides
    header_delay: bool = False
    delay_share: tuple[int, int] = (0, 100)  # numerator, denominator
    abort_status: int | None = None
    abort_grpc_status: int | None = None
    header_abort: bool = False
    abort_share: tuple[int, int] = (0, 100)

    @property
    def delays(self) -> bool:
        return self.delay_s is not None or self.header_delay

    @property
    def aborts(self) -> bool:
        return self.abort_status is not None or self.abort_grpc_status is not None or self.header_abort


@dataclass(frozen=True, slots=True)
class Hold:
    """The listener's instruction: hold the request this long, then route it again."""

    delay_s: float


def _share(fp, where: str) -> tuple[int, int]:
    den = _DENOMINATORS.get(fp.denominator)
    if den is None:
        raise ConfigError(where + ".denominator", f"unknown value {fp.denominator}")
    return min(fp.numerator, den), den


def parse(anyv, where: str) -> FaultPolicy:
    """HTTPFault → FaultPolicy; fields we do not honour are refused by name."""
    from sidecar.config.parse import _only, _seconds, unpack_any
    msg = unpack_any(anyv, fault_pb2.HTTPFault, where)
    _only(msg, {"delay", "abort"}, where)
    kw: dict = {}
    if msg.HasField("delay"):
        d = msg.delay
        _only(d, {"fixed_delay", "header_delay", "percentage"}, where + ".delay")
        kind = d.WhichOneof("fault_delay_secifier")
        if kind == "fixed_delay":
            kw["delay_s"] = _seconds(d.fixed_delay)
        elif kind == "header_delay":
            kw["header_delay"] = True
        else:
            raise ConfigError(where + ".delay", "needs fixed_delay or header_delay")
        kw["delay_share"] = _share(d.percentage, where + ".delay.percentage")
    if msg.HasField("abort"):
        a = msg.abort
        _only(a, {"http_status", "grpc_status", "header_abort", "percentage"}, where + ".abort")
        kind = a.WhichOneof("error_type")
        if kind == "http_status":
            if not 200 <= a.http_status < 600:
                raise ConfigError(where + ".abort.http_status", f"{a.http_status} is not in [200, 600)")
            kw["abort_status"] = a.http_status
        elif kind == "grpc_status":
            kw["abort_grpc_status"] = a.grpc_status
        elif kind == "header_abort":
            kw["header_abort"] = True
        else:
            raise ConfigError(where + ".abort", "needs http_status, grpc_status or header_abort")
        kw["abort_share"] = _share(a.percentage, where + ".abort.percentage")
    return FaultPolicy(**kw)


def parse_listener_level(anyv, where: str) -> None:
    """The filter in the listener's chain must inject nothing itself: faults are per route."""
    from sidecar.config.parse import unpack_any
    msg = unpack_any(anyv, fault_pb2.HTTPFault, where)
    for fd, _ in msg.ListFields():
        raise ConfigError(f"{where}.{fd.name}", "is set but not supported by the protomesh sidecar on the "
                          "listener (put faults on routes with typed_per_filter_config)")


def inject(p: FaultPolicy, call, rand: Callable[[], float], stats=None) -> "Hold | Reply | None":
    """The route's faults for one call, across its (at most two) routing passes: the first may
    return a Hold; the pass after the hold decides the abort (Envoy: delay, then abort)."""
    state = call.extra.get("fault")
    if state == "done":
        return None
    if state is None:
        delay = delay_for(p, call.headers, rand)
        if delay > 0:
            call.extra["fault"] = "held"
            if stats is not None:
                stats.inc("faults_injected", (("route", call.route_name), ("kind", "delay")))
            return Hold(delay)
    call.extra["fault"] = "done"
    reply = abort_for(p, call.headers, call.protocol == "grpc", rand)
    if reply is not None and stats is not None:
        stats.inc("faults_injected", (("route", call.route_name), ("kind", "abort")))
    return reply


# ---- decisions (pure) -------------------------------------------------------------------------
def _rolled(share: tuple[int, int], header: str | None, rand: Callable[[], float]) -> bool:
    num, den = share
    if header is not None:
        try:
            num = min(num, max(int(header), 0))
        except ValueError:
            pass
    return num > 0 and rand() * den < num


def delay_for(p: FaultPolicy, headers: Mapping[str, str], rand: Callable[[], float]) -> float:
    """Seconds to hold the request (0: none)."""
    if not p.delays:
        return 0.0
    if p.header_delay:
        raw = headers.get(DELAY_HEADER)
        try:
            delay = int(raw) / 1000.0 if raw is not None else 0.0
        except ValueError:
            delay = 0.0
        if delay <= 0:
            return 0.0
    else:
        delay = p.delay_s or 0.0
    return delay if _rolled(p.delay_share, headers.get(DELAY_PERCENT_HEADER), rand) else 0.0


def abort_for(p: FaultPolicy, headers: Mapping[str, str], grpc: bool,
              rand: Callable[[], float]) -> Reply | None:
    if not p.aborts:
        return None
    status, gstatus = p.abort_status, p.abort_grpc_status
    if p.header_abort:
        status, gstatus = _int(headers.get(ABORT_HEADER)), _int(headers.get(ABORT_GRPC_HEADER))
        if status is not None and not 200 <= status < 600:
            status = None
        if gstatus is not None and not 0 <= gstatus <= 16:
            gstatus = None
        if status is None and gstatus is None:
            return None
    if not _rolled(p.abort_share, headers.get(ABORT_PERCENT_HEADER), rand):
        return None
    if gstatus is None:
        gstatus = grpc_of_http(status)
    if status is None:
        status = http_of_grpc(gstatus)
    return Reply(status, gstatus, "fault_abort", "fault filter abort")


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def grpc_of_http(status: int) -> int:
    """Envoy's Grpc::Utility::httpToGrpcStatus."""
    return {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}.get(status, 2)


def http_of_grpc(code: int) -> int:
    return {0: 200, 1: 499, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 11: 400,
            12: 501, 14: 503, 16: 401}.get(code, 500)
