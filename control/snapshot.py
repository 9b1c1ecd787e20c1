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


# Selection and version per (resource dict, subscribed names).  Every sidecar subscribes to the
# same EDS names of the same shared endpoints dict, and each stream asks for its versions on
# every request it sends (ACKs included), so the same answer was hashed thousands of times per
# push.  View dicts are never mutated once built (a change builds new ones), so the identity of
# the dict plus the names is a sound key; the dict is kept in the entry so its id is not reused.
# Views drop the entries of dicts they stop serving (`forget`, `forget_all`), so the memo does
# not keep old generations of endpoints alive.
_SELECTIONS: dict[tuple[int, frozenset[str] | None], tuple[dict, dict, str]] = {}
_KEYS_BY_DICT: dict[int, list[tuple]] = {}
_SELECTIONS_MAX = 50_000


def selection(resources: dict[str, any_pb2.Any], names: frozenset[str] | None) -> tuple[dict[str, any_pb2.Any], str]:
    """`select(resources, names)` and its `version_of`, memoised."""
    key = (id(resources), names)
    hit = _SELECTIONS.get(key)
    if hit is not None and hit[0] is resources:
        return hit[1], hit[2]
    chosen = select(resources, names)
    version = version_of(chosen)
    if len(_SELECTIONS) >= _SELECTIONS_MAX:
        forget_all()
    _SELECTIONS[key] = (resources, chosen, version)
    _KEYS_BY_DICT.setdefault(id(resources), []).append(key)
    return chosen, version


def forget(resources: dict) -> None:
    """Drop what is memoised about a dict the views no longer serve (replaced endpoints)."""
    for key in _KEYS_BY_DICT.pop(id(resources), ()):
        hit = _SELECTIONS.get(key)
        if hit is not None and hit[0] is resources:
            del _SELECTIONS[key]


def forget_all() -> None:
    """Drop every memo: the views were rebuilt."""
    _SELECTIONS.clear()
    _KEYS_BY_DICT.clear()
    _CHANGES.clear()


# A few entries per push (one per distinct history); a small bound keeps old generations from
# being held.  A miss only costs recomputing a comparison and one more encoding of a response.
_CHANGES: dict[tuple[int, int], tuple[dict, dict, dict]] = {}
_CHANGES_MAX = 64


def changed_since(held: dict[str, any_pb2.Any], current: dict[str, any_pb2.Any]) -> dict[str, any_pb2.Any]:
    """The resources of `current` a client holding `held` lacks or holds in another content.
    Memoised like `selection` (both arguments are memoised selections, shared by the streams
    that hold the same), so streams with the same history get the same dict object — which lets
    `wire.SharedResponses` encode their response once."""
    key = (id(held), id(current))
    hit = _CHANGES.get(key)
    if hit is not None and hit[0] is held and hit[1] is current:
        return hit[2]
    out = {n: r for n, r in current.items()
           if n not in held or (held[n] is not r and digest(held[n]) != digest(r))}
    if len(_CHANGES) >= _CHANGES_MAX:
        _CHANGES.clear()
    _CHANGES[key] = (held, current, out)
    return out
