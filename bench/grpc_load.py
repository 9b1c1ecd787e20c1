"""Python gRPC load generator, run as its own process; prints one JSON object on stdout.

  bidi       N streams, each sending M messages and reading M echoes (pipelined; HTTP/2 flow
             control bounds what is in flight).  Counts echoes received: success is end to end.
  unary-seq  one channel, sequential Unary/Echo calls; latency percentiles in ms.

Both are bounded in count and in time (--timeout).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc

import bench_pb2
import bench_pb2_grpc
import bench_stream_pb2_grpc


async def bidi(target: str, streams: int, messages: int, payload: int, timeout: float) -> dict:
    msg = bench_pb2.Msg(payload=b"x" * payload)
    errors: list[str] = []
    received = 0

    async def one(stub) -> None:
        nonlocal received

        async def outgoing():
            for _ in range(messages):
                yield msg
        try:
            async for _ in stub.Chat(outgoing(), timeout=timeout):
                received += 1
        except grpc.aio.AioRpcError as exc:
            errors.append(f"{exc.code().name}: {exc.details()}")

    async with grpc.aio.insecure_channel(target) as channel:
        stub = bench_stream_pb2_grpc.StreamStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 10)
        await one_warmup(stub, msg)
        start = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(one(stub) for _ in range(streams))), timeout)
        except asyncio.TimeoutError:
            errors.append("timeout")
        elapsed = time.perf_counter() - start
    return {"messages": received, "expected": streams * messages, "seconds": elapsed,
            "msgs_per_s": received / elapsed, "errors": len(errors), "error_samples": errors[:5]}


async def one_warmup(stub, msg) -> None:
    async def two():
        yield msg
        yield msg
    async for _ in stub.Chat(two(), timeout=10):
        pass


async def unary_seq(target: str, calls: int, duration: float) -> dict:
    msg = bench_pb2.Msg(payload=b"x")
    lat, errors = [], []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = bench_pb2_grpc.UnaryStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 10)
        for _ in range(50):  # warm-up: connection, upstream pool, caches
            await stub.Echo(msg, timeout=5)
        deadline = time.perf_counter() + duration
        while len(lat) + len(errors) < calls and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                await stub.Echo(msg, timeout=5)
                lat.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")
    return {"calls": len(lat), "errors": len(errors), "error_samples": errors[:5],
            "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("bidi", "unary-seq"))
    ap.add_argument("--target", required=True)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--payload", type=int, default=64)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args()
    if a.mode == "bidi":
        out = asyncio.run(bidi(a.target, a.streams, a.messages, a.payload, a.timeout))
    else:
        out = asyncio.run(unary_seq(a.target, a.calls, a.duration))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
