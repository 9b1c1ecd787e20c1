"""The admin server: pages, readiness with its reason, bad requests, a failing page."""
import asyncio

from protomesh.admin import AdminServer


async def fetch(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    return data


async def test_pages_ready_and_errors():
    state = {"ready": (False, "waiting for the first config")}

    def broken():
        raise RuntimeError("boom")

    admin = AdminServer(lambda: state["ready"], lambda: "m_total 1\n", {"/x": lambda: {"a": 1}, "/bad": broken})
    port = await admin.start("127.0.0.1", 0)
    try:
        get = lambda path: fetch(port, f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        out = await get("/ready")
        assert out.startswith(b"HTTP/1.1 503") and b"waiting for the first config" in out
        state["ready"] = (True, "")
        assert (await get("/ready")).startswith(b"HTTP/1.1 200")
        assert b'"a": 1' in await get("/x?pretty=1")
        assert b"m_total 1" in await get("/metrics")
        assert (await get("/nope")).startswith(b"HTTP/1.1 404")
        assert (await get("/bad")).startswith(b"HTTP/1.1 500")
        assert (await fetch(port, b"POST /ready HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await fetch(port, b"GARBAGE\r\n\r\n")).startswith(b"HTTP/1.1 400")
        # keep-alive: two requests on one connection
        two = await fetch(port, b"GET /healthz HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert two.count(b"HTTP/1.1 200") == 2
    finally:
        await admin.stop()
