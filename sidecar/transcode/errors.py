"""The two ways transcoding fails: bad configuration (NACK it) and a bad request (answer it)."""
from __future__ import annotations


class TranscodeConfigError(ValueError):
    """A descriptor set or google.api.http rule that cannot be served; ``where`` names it."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


class TranscodeError(Exception):
    """A request (or upstream reply) that cannot be transcoded.

    ``http_status`` is what the client should get; ``reason`` is a short machine-readable tag
    for ``x-protomesh-reason`` and the access log; ``message`` is for humans.
    """

    def __init__(self, http_status: int, message: str, reason: str = "bad_request") -> None:
        super().__init__(message)
        self.http_status, self.message, self.reason = http_status, message, reason
