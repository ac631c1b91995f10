"""The Twisted privates dsml leans on (dsml.net.twisted_private) are still there and still
behave as relied on: a Twisted upgrade that changes them fails here, loudly.

A real ``tcp.Connection`` over a socketpair (no reactor runs: an inert stand-in is given),
and ClientService's real protocol proxy.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from twisted.application.internet import ClientService
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from dsml.net import twisted_private
from dsml.net.twisted_private import (
    forget_reconnecting_connection,
    send_now,
    set_read_size,
)


class _Reactor:
    """What a FileDescriptor asks of its reactor when it queues a write."""

    def __init__(self) -> None:
        self.writers: list[object] = []

    def addWriter(self, fd: object) -> None:
        self.writers.append(fd)

    def removeWriter(self, fd: object) -> None:
        self.writers.remove(fd)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[tcp.Connection, socket.socket, _Reactor]]:
    """A tcp.Connection on one end of a socketpair, the other end, its inert reactor."""
    a, b = socket.socketpair()
    reactor = _Reactor()
    conn = tcp.Connection(a, Protocol(), reactor=reactor)  # type: ignore[arg-type]
    conn.connected = 1
    b.settimeout(1)
    yield conn, b, reactor
    a.close()
    b.close()


def test_every_private_is_still_there() -> None:
    """missing() names each private attribute this Twisted lacks: none."""
    assert twisted_private.missing() == []


def test_send_now_sends_at_once_when_nothing_is_queued(tcp_pair: tuple) -> None:
    """With empty buffers the bytes go out on the spot: the peer has them, nothing is
    queued and the reactor was not asked to write later."""
    conn, peer, reactor = tcp_pair
    send_now(conn, b"OK 1\r\n\r\n")
    assert peer.recv(100) == b"OK 1\r\n\r\n"
    assert not conn.dataBuffer and not conn._tempDataBuffer
    assert reactor.writers == []


def test_send_now_queues_behind_what_is_queued(tcp_pair: tuple) -> None:
    """Bytes already queued go first: send_now only queues behind them (order kept)."""
    conn, peer, reactor = tcp_pair
    conn.write(b"first ")
    assert conn._tempDataBuffer == [b"first "]
    send_now(conn, b"second")
    assert conn._tempDataBuffer == [b"first ", b"second"]
    assert conn in reactor.writers
    conn.doWrite()  # what the reactor does when the socket can take them
    assert peer.recv(100) == b"first second"


def test_send_now_writes_on_a_transport_without_the_privates() -> None:
    """A transport without them (TLS, a test transport) is simply written to."""
    from twisted.internet.testing import StringTransport

    t = StringTransport()
    send_now(t, b"x")
    assert t.value() == b"x"


def test_set_read_size_changes_what_one_read_asks(tcp_pair: tuple) -> None:
    """bufferSize is what doRead asks of the socket; set_read_size sets it."""
    conn, peer, _ = tcp_pair
    set_read_size(conn, 5)
    assert conn.bufferSize == 5
    got: list[bytes] = []
    conn.protocol.dataReceived = got.append  # type: ignore[method-assign]
    peer.sendall(b"0123456789")
    conn.doRead()
    assert got == [b"01234"]


def test_a_forgotten_reconnecting_connection_reports_no_loss() -> None:
    """ClientService's proxy calls its loss notification from connectionLost; after
    forget_reconnecting_connection it does not (and the protocol still hears of it)."""
    from twisted.application._client_service import _ReconnectingProtocolProxy

    heard: list[object] = []
    lost: list[object] = []

    class P(Protocol):
        def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
            lost.append(reason)

    proxy = _ReconnectingProtocolProxy(P(), heard.append)
    proxy.connectionLost(Failure(ConnectionDone()))
    assert len(heard) == 1 and len(lost) == 1
    forget_reconnecting_connection(proxy)
    proxy.connectionLost(Failure(ConnectionDone()))
    assert len(heard) == 1 and len(lost) == 2
    assert ClientService is not None  # the public class that builds such proxies
