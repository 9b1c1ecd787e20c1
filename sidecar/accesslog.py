"""One JSON line per request with its outcome and reason, so no request is anonymous."""
from __future__ import annotations

import json
import sys
import time
from typing import TextIO


class AccessLog:
    def __init__(self, path: str | None):
        """`path` None disables the log, '-' writes to stdout, anything else appends to a file."""
        self._out: TextIO | None
        if path is None:
            self._out = None
        elif path == "-":
            self._out = sys.stdout
        else:
            self._out = open(path, "a", buffering=1 << 16, encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._out is None:
            return
        record["ts"] = round(time.time(), 6)
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        if self._out is not None:
            self._out.flush()

    def close(self) -> None:
        if self._out is not None and self._out is not sys.stdout:
            self._out.close()
        self._out = None
