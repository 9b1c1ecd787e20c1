"""wrk and h2load: command lines and the parsing of what they print.

Both always run bounded (`-d` / `-D` seconds, plus a subprocess timeout) on the load core.
"""
from __future__ import annotations

import re

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def wrk_cmd(url: str, connections: int, seconds: float) -> list[str]:
    return ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", url]


def parse_wrk(out: str) -> dict:
    res = {"requests": 0, "seconds": 0.0, "req_per_s": 0.0, "non_2xx": 0, "socket_errors": 0}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if m:
        res["requests"] = int(m.group(1))
        res["seconds"] = _ms(m.group(2) + m.group(3)) / 1000
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["req_per_s"] = float(m.group(1))
    for q in ("50", "99"):
        m = re.search(rf"^\s+{q}(?:\.000)?%\s+(\S+)", out, re.M)
        if m:
            res[f"p{q}_ms"] = _ms(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res["non_2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = sum(int(x) for x in m.groups())
    return res


def h2load_cmd(url: str, body_file: str, clients: int, streams: int, seconds: float) -> list[str]:
    return ["h2load", "-t1", f"-c{clients}", f"-m{streams}", f"-D{max(1, round(seconds))}",
            "-d", body_file, "-H", "content-type: application/grpc", "-H", "te: trailers", url]


def parse_h2load(out: str) -> dict:
    res = {"req_per_s": 0.0, "done": 0, "succeeded": 0, "failed": 0, "errored": 0, "timeout": 0}
    m = re.search(r"finished in ([\d.]+)(us|ms|s|m), ([\d.]+) req/s", out)
    if m:
        res["seconds"] = _ms(m.group(1) + m.group(2)) / 1000
        res["req_per_s"] = float(m.group(3))
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    if m:
        for key, v in zip(("done", "succeeded", "failed", "errored", "timeout"), m.groups()):
            res[key] = int(v)
    return res
