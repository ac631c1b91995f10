"""Outgoing links to other dsml servers (worker to worker, worker to master).

A link is a :class:`~dsml.net.server.ServerProtocol` opened with ``initiator=True``: it
authenticates with a request, may send requests of its own, and answers the requests of
the other side with its handler.  :class:`Links` opens them through an endpoint factory,
so the same code runs over real TCP and over the in-memory network of the tests.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from ..protocol.methods import MethodTable
from .server import ConnectionLost, Reply, ServerFactory, ServerLimits, ServerProtocol

log = Logger()

EndpointFor = Callable[[str, int], IStreamClientEndpoint]

#: How long a silently cut link may go unnoticed (TCP_USER_TIMEOUT): without it a link
#: whose peer vanished stays "up" for about 15 minutes of retransmissions.
USER_TIMEOUT_MS = 15_000


def tcp_endpoint_for(reactor: Any) -> EndpointFor:
    """Endpoints over real TCP."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

    def endpoint_for(host: str, port: int) -> IStreamClientEndpoint:
        if ":" in host:
            return TCP6ClientEndpoint(reactor, host.strip("[]"), port, timeout=10)
        return TCP4ClientEndpoint(reactor, host, port, timeout=10)

    return endpoint_for


def split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) to a pair."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def tune_socket(transport: Any) -> None:
    """Keepalive and TCP_USER_TIMEOUT on a long-lived link, where the OS allows."""
    try:
        transport.setTcpKeepAlive(True)
        sock = transport.getHandle()
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 5)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    except (AttributeError, OSError):
        pass  # not a TCP socket (tests), or an OS without the option


class NoOrders:
    """The handler of a link whose other side never sends requests (a pure client)."""

    methods = MethodTable()

    def handle(self, head: Any, payload: bytes, conn: ServerProtocol) -> Reply:
        """Never called: the empty method table rejects every request."""
        raise AssertionError("no requests expected")

    def open(self, head: Any, conn: ServerProtocol) -> Any:
        """Never called."""
        raise AssertionError("no requests expected")


class Links:
    """Opens authenticated links and keeps one shared link per address for small requests."""

    def __init__(
        self,
        clock: Any,
        endpoint_for: EndpointFor,
        token: str | None,
        name: str = "dsml",
        handler: Any = None,
        limits: ServerLimits | None = None,
    ) -> None:
        self.clock = clock
        self.endpoint_for = endpoint_for
        self.token = token
        self.name = name
        self.handler = handler if handler is not None else NoOrders()
        self.limits = limits or ServerLimits(idle_timeout=300.0)
        self._shared: dict[str, ServerProtocol] = {}
        self._waiting: dict[str, list[Deferred[ServerProtocol]]] = {}

    def open(self, addr: str, handler: Any = None) -> Deferred[ServerProtocol]:
        """A new link to ``addr``, authenticated; for a streamed request of its own."""
        host, port = split_addr(addr)
        factory = ServerFactory(
            handler if handler is not None else self.handler,
            self.clock,
            None,
            self.limits,
            initiator=True,
        )
        d: Deferred[ServerProtocol] = self.endpoint_for(host, port).connect(factory)

        def authenticate(proto: ServerProtocol) -> Deferred[ServerProtocol]:
            tune_socket(proto.transport)
            auth = proto.request("auth", {"Token": self.token or "", "Client": self.name})

            def failed(f: Any) -> Any:
                proto.transport.loseConnection()  # type: ignore[union-attr]
                return f

            return auth.addCallbacks(lambda _: proto, failed)

        return d.addCallback(authenticate)

    def shared(self, addr: str) -> Deferred[ServerProtocol]:
        """The shared link to ``addr`` (opened on first use, reopened after a loss).

        Only for requests whose payload goes out in one write (request()), so requests
        of several callers never interleave on the wire.
        """
        mine: Deferred[ServerProtocol] = Deferred()
        current = self._shared.get(addr)
        if isinstance(current, ServerProtocol):
            # Fix (tests/test_cluster_sim.py): ``current.connected`` is the protocol's
            # flag, which Twisted sets on connect and never clears, and a link closed by
            # the peer has ``disconnecting`` false: a dead link was handed out forever
            # ("connection is closed") once its peer restarted or closed it idle.  The
            # transport's flag and the protocol's own closing state say it is gone.
            transport = current.transport
            if (
                getattr(transport, "connected", False)
                and not transport.disconnecting  # type: ignore[union-attr]
                and not current._closing
            ):
                mine.callback(current)
                return mine
            current = None
        waiters = self._waiting.get(addr)
        if waiters is not None:
            waiters.append(mine)
            return mine
        waiters = self._waiting[addr] = [mine]

        def done(result: Any) -> None:
            del self._waiting[addr]
            if isinstance(result, ServerProtocol):
                self._shared[addr] = result
                for w in waiters:
                    w.callback(result)
            else:
                self._shared.pop(addr, None)
                for w in waiters:
                    w.errback(result)

        self.open(addr).addBoth(done)
        return mine

    def close(self) -> None:
        """Close the shared links."""
        for link in list(self._shared.values()):
            if isinstance(link, ServerProtocol) and link.connected:
                link.transport.loseConnection()  # type: ignore[union-attr]
        self._shared.clear()


__all__ = ["ConnectionLost", "EndpointFor", "Links", "NoOrders", "split_addr", "tcp_endpoint_for"]
