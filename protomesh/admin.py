"""The admin HTTP server every protomesh process runs (aiohttp: off the data path).

`/healthz` says the process is alive, `/ready` whether it should get traffic (with the reason
when not), `/metrics` is Prometheus text, and each process adds its own JSON pages.
"""
from __future__ import annotations

import json
from typing import Callable

from aiohttp import web

JsonPage = Callable[[], object]


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, indent=2, sort_keys=True, default=str) + "\n",
                        status=status, content_type="application/json")


class AdminServer:
    def __init__(self, ready: Callable[[], tuple[bool, str]], metrics: Callable[[], str],
                 pages: dict[str, JsonPage]):
        self._ready = ready
        app = web.Application()
        app.router.add_get("/healthz", lambda _: web.Response(text="ok\n"))
        app.router.add_get("/ready", self._ready_page)
        app.router.add_get("/metrics", lambda _: web.Response(
            text=metrics(), content_type="text/plain", charset="utf-8"))
        for path, page in pages.items():
            app.router.add_get(path, lambda _, page=page: _json(page()))
        self._runner = web.AppRunner(app, access_log=None)
        self.port = 0

    async def _ready_page(self, _request) -> web.Response:
        ok, why = self._ready()
        return web.Response(text=("ready\n" if ok else f"not ready: {why}\n"), status=200 if ok else 503)

    async def start(self, host: str, port: int) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()
