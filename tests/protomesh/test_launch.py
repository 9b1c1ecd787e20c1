"""protomesh.launch port picking: below the ephemeral range, never handed out twice."""
from __future__ import annotations

import socket

from protomesh import launch


def test_a_run_of_ports_is_bindable_and_never_handed_out_again():
    first = launch.free_port_run(3)
    run = {first, first + 1, first + 2}
    for port in run:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    later = {launch.free_port() for _ in range(300)}
    assert not later & run
    assert len(later) == 300  # and no single port twice either
