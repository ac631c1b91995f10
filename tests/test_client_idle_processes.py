"""A client whose connection the master closed while it was unused (its idle timeout)
serves its next request on a new connection, not ConnectionLost (a fit of gigabytes
waits on another connection for longer than the master's minute of idle timeout)."""

from __future__ import annotations

import select
from pathlib import Path

import pytest

import dsml
from dsml.localcluster import LocalCluster
from dsml.testing.poll import poll

pytestmark = pytest.mark.processes


def test_a_request_after_the_server_closed_the_idle_connection_reconnects(
    tmp_path: Path,
) -> None:
    # The connection's timer first fires at the authentication deadline and only then
    # re-arms for the idle one: a short auth_timeout too, or the close waits its 10 s.
    with LocalCluster(tmp_path, workers=("w1",),
                      extra={"limits": {"idle_timeout": 1.0, "auth_timeout": 2.0}}) as c:
        c.start_all()
        with dsml.connect(c.config_path) as client:
            assert [n.name for n in client.nodes()] == ["w1"]
            sock = client.master._sock  # noqa: SLF001
            # The master's close arrives: the socket reads (EOF) with nothing asked.
            poll(lambda: True if select.select([sock], [], [], 0)[0] else None,
                 "the master to close the idle connection", 30)
            assert [n.name for n in client.nodes()] == ["w1"]  # a new connection
            assert client.master._sock is not sock  # noqa: SLF001
