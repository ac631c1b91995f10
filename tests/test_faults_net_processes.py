"""Faults on the network with real processes (issue #12): the blocking client after a reply
that came later than its timeout, from a master and a worker that were stopped (SIGSTOP)
and then went on (SIGCONT)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsml.client import ClusterClient, ConnectionLost, DsmlError
from dsml.localcluster import LocalCluster
from dsml.testing.poll import poll

pytestmark = pytest.mark.processes

#: The client's timeout: a stopped process answers later than this.
TIMEOUT = 1.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A master and one worker; always stopped (and continued first), whatever happens."""
    c = LocalCluster(tmp_path / "cluster", workers=("w1",), extra={"cluster": {"replication": 1}})
    try:
        c.start("master")
        c.start("w1")
        yield c
    finally:
        c.stop()  # sends SIGCONT before SIGTERM
        for proc in c.procs.values():
            assert proc.poll() is not None, "a process outlived its test"


def registered(client: ClusterClient) -> bool:
    return any(n.name == "w1" and n.state == "alive" for n in client.nodes())


def test_cluster_client_goes_on_after_a_late_reply(cluster: LocalCluster) -> None:
    """A request to a stopped master fails with ConnectionLost once the client's timeout
    passes, and a read from a stopped worker (its only replica) fails too; once each goes
    on (and sends its late reply), the same client's next requests get their own
    answers, not the late ones."""
    host, port = cluster.address("master")
    with ClusterClient(host, port, cluster.token, timeout=TIMEOUT) as client:
        poll(lambda: registered(client) or None, "w1's registration", 30)
        client.set("k", b"the value")

        cluster.kill("master", signal.SIGSTOP)
        try:
            with pytest.raises(ConnectionLost, match="no answer from the master"):
                client.locate("k")
        finally:
            cluster.kill("master", signal.SIGCONT)
        assert client.locate("k").version >= 1  # not the late reply to the first locate
        assert client.get("k") == b"the value"

        cluster.kill("w1", signal.SIGSTOP)
        try:
            with pytest.raises(DsmlError):  # its only replica did not answer in time
                client.get("k")
        finally:
            cluster.kill("w1", signal.SIGCONT)
        assert client.get("k") == b"the value"
        assert client.ping()["role"] == "master"
