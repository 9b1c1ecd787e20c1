"""Shared hypothesis settings for the fuzz tests.

`make test` runs each property with a small, derandomized example budget (the same inputs every
run, so CI is stable and a failure reproduces).  `make fuzz` sets PROTOMESH_FUZZ_EXAMPLES to a
larger number and switches to random exploration, which is where new bugs are found; hypothesis
then prints the failing example and a `@reproduce_failure` blob.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_LONG = os.environ.get("PROTOMESH_FUZZ_EXAMPLES")


def fuzz_settings(quick: int) -> settings:
    """`quick`: examples for `make test` (keep each test within ~10 s)."""
    return settings(
        max_examples=int(_LONG) if _LONG else quick,
        deadline=None,
        derandomize=not _LONG,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
        print_blob=True,
    )
