"""Versioned resource sets.  A version is a hash of the content, so rebuilding an unchanged view
yields the same version and nothing is pushed; a changed view yields a new one."""
from __future__ import annotations

import hashlib
from google.protobuf import any_pb2


def select(resources: dict[str, any_pb2.Any], names: frozenset[str] | None) -> dict[str, any_pb2.Any]:
    """The resources a subscription asks for; `names` None is a wildcard (everything)."""
    if names is None:
        return resources
    return {n: r for n, r in resources.items() if n in names}


def version_of(resources: dict[str, any_pb2.Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(resources):
        h.update(name.encode())
        h.update(b"\0")
        h.update(resources[name].SerializeToString(deterministic=True))
        h.update(b"\1")
    return h.hexdigest()[:12]
