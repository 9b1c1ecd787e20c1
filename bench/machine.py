"""What the numbers were measured on."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from bench import envoy

ROOT = Path(__file__).resolve().parent.parent


def _cmd(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=ROOT)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    try:
        envoy_v = envoy.envoy_version()
    except (RuntimeError, OSError, subprocess.SubprocessError):
        envoy_v = "not installed"
    commit = _cmd(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(_cmd(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {
        "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "envoy": envoy_v,
        "nginx": _cmd(["nginx", "-v"]).split("/")[-1],
        "wrk": _cmd(["wrk", "-v"]).split()[1] if _cmd(["wrk", "-v"]) else "",
        "h2load": _cmd(["h2load", "--version"]).split("/")[-1],
        "protomesh_commit": commit + ("+local changes" if dirty else ""),
    }
