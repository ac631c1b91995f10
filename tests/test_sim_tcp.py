"""The simulated network's per-socket TCP model (``tcp="socket"``, :mod:`dsml.testing.sim.tcp`)
and bandwidth (``rate``), and what they let the simulation show: a pipeline hop that goes
silent mid-transfer costs the client a bounded wait (the nemesis's slow-call checker),
not the 60 s payload deadline.  All on simulated time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from dsml.errors import DsmlError
from dsml.net.links import tune_socket
from dsml.testing.sim import FakeNetwork, SimCluster
from dsml.testing.sim.tcp import RETRIES2

MiB = 1024 * 1024


class End(Protocol):
    def __init__(self) -> None:
        self.got = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.got += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


def pair(net: FakeNetwork, tuned: bool) -> tuple[Any, Any]:
    """A connection from "a" to "b"; with ``tuned``, ``a``'s end as dsml tunes a link."""
    servers: list[Any] = []

    class Server(Factory):
        def buildProtocol(self, addr: Any) -> Protocol:
            servers.append(End())
            return servers[-1]

    net.listen("b:1", Server(), "b")
    got: list[Any] = []
    net.endpoint_for("a")("b", 1).connect(Factory.forProtocol(End)).addCallback(got.append)
    net.flush()
    [client] = got
    if tuned:
        tune_socket(client.transport)
    return client, servers[0]


def run(clock: Clock, net: FakeNetwork, seconds: float) -> None:
    for _ in range(int(seconds * 10)):
        clock.advance(0.1)
        net.flush()


def test_a_tuned_end_gives_up_in_15_s_and_its_untuned_peer_stays_half_open() -> None:
    clock = Clock()
    net = FakeNetwork(clock, tcp="socket")
    a, b = pair(net, tuned=True)
    net.silence("b")
    run(clock, net, 14)
    assert a.lost is None
    run(clock, net, 2)
    assert a.lost is not None and b.lost is None  # b (idle, no keepalive) knows nothing
    net.unsilence("b")
    b.transport.write(b"late")  # its next bytes meet a reset once the path works
    run(clock, net, 1)
    assert b.lost is not None and a.got == b""


def test_an_untuned_end_with_unacknowledged_bytes_retransmits_for_tcp_retries2() -> None:
    clock = Clock()
    net = FakeNetwork(clock, tcp="socket")
    a, b = pair(net, tuned=False)
    net.silence("b")
    a.transport.write(b"x" * 1000)
    run(clock, net, 60)
    assert a.lost is None and b.lost is None  # no TCP_USER_TIMEOUT: still trying
    run(clock, net, RETRIES2 - 60 + 1)
    assert a.lost is not None and b.lost is None


def test_an_idle_untuned_connection_never_times_out() -> None:
    clock = Clock()
    net = FakeNetwork(clock, tcp="socket")
    a, b = pair(net, tuned=False)
    net.partition("a", "b")
    run(clock, net, 1200)
    assert a.lost is None and b.lost is None


def test_bandwidth_makes_a_transfer_take_time() -> None:
    clock = Clock()
    net = FakeNetwork(clock, tcp="socket", rate=MiB)
    a, b = pair(net, tuned=False)
    a.transport.write(b"y" * (2 * MiB))
    net.flush()
    assert 0 < len(b.got) < 2 * MiB
    run(clock, net, 1.0)
    assert len(b.got) < 2 * MiB
    run(clock, net, 1.5)
    assert len(b.got) == 2 * MiB


@pytest.fixture
def slow_sim(tmp_path: Path) -> Iterator[SimCluster]:
    """Three workers over 2 MiB/s links with per-socket timeouts (as the nemesis runs)."""
    sim = SimCluster(tmp_path / "c", workers=("w1", "w2", "w3"), replication=2,
                     tcp="socket", rate=2 * MiB)
    yield sim
    failures = sim.failures.messages()
    sim.close()
    assert failures == []


def test_a_hop_silenced_mid_transfer_costs_the_client_a_bounded_wait(
    slow_sim: SimCluster,
) -> None:
    """A 4 MiB upload streams at 2 MiB/s; its second hop goes silent a second in.  The
    first worker drops that hop within FORWARD_STALL (10 s) of its last byte, the client's
    bytes flow again, and the client hears within about 15 s, not after the 60 s
    payload deadline (with the fix reverted, mutation ``hop-stall``, it waits 60 s+)."""
    sim = slow_sim
    client = sim.client()
    data = bytes(i % 251 for i in range(4 * MiB))
    outcome: list[Any] = []
    start = sim.clock.seconds()
    client.upload("big", data).addBoth(outcome.append)
    sim.until(lambda: any(
        c.client_node in sim.workers and c.server_node in sim.workers
        for c in sim.net.connections
    ), timeout=5)
    sim.advance(1.0)
    [second] = [c.server_node for c in sim.net.connections
                if c.client_node in sim.workers and c.server_node in sim.workers]
    assert outcome == []
    sim.silence(second)
    sim.until(lambda: bool(outcome), timeout=300, what="the upload's answer")
    took = sim.clock.seconds() - start
    assert took < 20, took
    [answer] = outcome
    assert isinstance(answer, Failure) and answer.check(DsmlError), answer
    assert answer.value.code in ("outcome-unknown", "replication-failed"), answer.value


def test_the_blocking_client_on_the_simulated_network_resyncs_after_a_timeout(
    tmp_path: Path,
) -> None:
    """The blocking client (dsml.client.server.Client) over the simulated network: a call
    to a paused master times out; once the master answers again (its late reply on the
    way), the next call gets its own answer, not the late one (mutation
    ``client-no-resync``: "response N does not answer request N+1")."""
    from dsml.client.server import Client
    from dsml.errors import ConnectionLost
    from dsml.testing.sim.blocking import sim_connect

    sim = SimCluster(tmp_path / "c", workers=("w1", "w2"), replication=2)
    try:
        host, _, port = sim.master_addr.rpartition(":")
        client = Client(host, int(port), sim.token, 4.0, "b1",
                        connect=sim_connect(sim, "b1"))
        client.call("nodes", {})
        start = sim.clock.seconds()
        sim.pause("master")
        with pytest.raises(ConnectionLost):
            client.call("nodes", {})
        assert sim.clock.seconds() - start == pytest.approx(4.0, abs=0.2)
        sim.resume("master")
        sim.advance(1.0)
        for _ in range(3):  # each its own answer (the late one was dropped with its link)
            head, _ = client.call("nodes", {})
            assert head.id == client._next_id - 1
        client.close()
    finally:
        sim.close()
