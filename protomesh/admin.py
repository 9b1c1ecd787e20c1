"""The admin HTTP server every protomesh process runs, off the data path.

`/healthz` says the process is alive, `/ready` whether it should get traffic (with the reason
when not), `/metrics` is Prometheus text, and each process adds its own JSON pages.

Why not aiohttp: these few GET pages are all the admin server does, and importing aiohttp (with
yarl, multidict, email, attrs …) costs a sidecar several MB of resident memory that every pod
pays.  The request parser is httptools (llhttp), which the data path loads anyway.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

import httptools

log = logging.getLogger("protomesh.admin")

JsonPage = Callable[[], object]
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            500: b"Internal Server Error", 503: b"Service Unavailable"}
_MAX_REQUEST = 64 * 1024


class AdminServer:
    def __init__(self, ready: Callable[[], tuple[bool, str]], metrics: Callable[[], str],
                 pages: dict[str, JsonPage]):
        self._ready = ready
        self._metrics = metrics
        self._pages = pages
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request.  Pure apart from calling the pages."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/ready":
            ok, why = self._ready()
            return (200, "text/plain", b"ready\n") if ok else (503, "text/plain", f"not ready: {why}\n".encode())
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics().encode()
        page = self._pages.get(path)
        if page is None:
            listing = "\n".join(["/healthz", "/ready", "/metrics", *self._pages])
            return 404, "text/plain", f"no page {path}; pages:\n{listing}\n".encode()
        body = json.dumps(page(), indent=2, sort_keys=True, default=str) + "\n"
        return 200, "application/json", body.encode()

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _AdminConnection(self), host, port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


class _AdminConnection(asyncio.Protocol):
    def __init__(self, admin: AdminServer):
        self.admin = admin
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.url = b""
        self.size = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.size += len(data)
        try:
            if self.size > _MAX_REQUEST:
                raise httptools.HttpParserError("request too large")
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._write(400, "text/plain", f"bad request: {exc}\n".encode(), keep_alive=False, head=False)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode("latin-1")
        path = self.url.decode("latin-1").partition("?")[0]
        self.url = b""
        self.size = 0
        try:
            status, ctype, body = self.admin.respond(method, path)
        except Exception as exc:  # a broken page must not take the admin server down
            log.exception("admin page %s failed", path)
            status, ctype, body = 500, "text/plain", f"internal error: {exc!r}\n".encode()
        self._write(status, ctype, body, keep_alive=self.parser.should_keep_alive(), head=method == "HEAD")

    def _write(self, status: int, ctype: str, body: bytes, keep_alive: bool, head: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head_bytes = (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
                      % (status, _REASONS.get(status, b""), ctype.encode(), len(body),
                         b"" if keep_alive else b"connection: close\r\n"))
        self.transport.write(head_bytes if head else head_bytes + body)
        if not keep_alive:
            self.transport.close()
