"""Compile bench/proto/*.proto into the run's scratch dir (nothing generated is committed).

Processes that need the messages get that dir on PYTHONPATH and `import bench_pb2`, `bench_stream_pb2_grpc`.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).parent / "proto"


def generate(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out}",
                    f"--grpc_python_out={out}", str(PROTO_DIR / "bench.proto"), str(PROTO_DIR / "bench_stream.proto")], check=True)
    return out
