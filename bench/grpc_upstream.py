"""The Python gRPC upstream: Unary/Echo and Stream/Chat (echo every message back).

Runs as its own process (`python -m bench.grpc_upstream --port P`, with the generated code on
PYTHONPATH).  Used for bidi streaming, which nginx cannot serve.
"""
from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

import bench_pb2_grpc
import bench_stream_pb2_grpc


class Unary(bench_pb2_grpc.UnaryServicer):
    async def Echo(self, request, context):
        return request


class Stream(bench_stream_pb2_grpc.StreamServicer):
    async def Chat(self, request_iterator, context):
        async for msg in request_iterator:
            yield msg


async def main(port: int) -> None:
    server = grpc.aio.server()
    bench_pb2_grpc.add_UnaryServicer_to_server(Unary(), server)
    bench_stream_pb2_grpc.add_StreamServicer_to_server(Stream(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    asyncio.run(main(ap.parse_args().port))
