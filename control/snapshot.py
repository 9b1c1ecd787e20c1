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


# Digest per resource object.  Views share resource objects between nodes (every sidecar holds
# the same clusters and endpoints), so each is serialized and hashed once, not once per node per
# push — with thousands of streams that was the control server's main cost.  The object is kept
# beside its digest so an id is never reused while cached; the cache is cleared when it grows
# past a bound (resources of dropped views are then released).
_DIGESTS: dict[int, tuple[any_pb2.Any, bytes]] = {}
_DIGESTS_MAX = 200_000


def digest(resource: any_pb2.Any) -> bytes:
    hit = _DIGESTS.get(id(resource))
    if hit is not None and hit[0] is resource:
        return hit[1]
    if len(_DIGESTS) >= _DIGESTS_MAX:
        _DIGESTS.clear()
    d = hashlib.sha256(resource.SerializeToString(deterministic=True)).digest()
    _DIGESTS[id(resource)] = (resource, d)
    return d


def version_of(resources: dict[str, any_pb2.Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(resources):
        h.update(name.encode())
        h.update(b"\0")
        h.update(digest(resources[name]))
    return h.hexdigest()[:12]
