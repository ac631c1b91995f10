"""Outgoing links to other dsml servers (worker to worker, worker to master).

A link is a :class:`~dsml.net.connection.Connection` built by a :class:`LinkFactory`: it
authenticates with a request, sends requests of its own, and answers the requests of the
other side with its responders.  :class:`Links` opens them through an endpoint factory,
so the same code runs over real TCP and over the in-memory network of the tests.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from ..errors import ConnectionLost
from ..protocol.methods import Role
from .connection import Connection, ConnectionFactory
from .limits import Limits
from .responders import NO_REQUESTS, Responders

if TYPE_CHECKING:
    from .tls import PeerCheck, TlsIdentity

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


def tls_endpoint_for(endpoint_for: EndpointFor, tls: TlsIdentity | None) -> EndpointFor:
    """``endpoint_for`` with TLS on every endpoint it makes (unchanged without ``tls``)."""
    if tls is None:
        return endpoint_for

    def tls_for(host: str, port: int) -> IStreamClientEndpoint:
        return tls.wrap_endpoint(endpoint_for(host, port))

    return tls_for


def split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) to a pair."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def join_addr(host: str, port: int) -> str:
    """A pair to ``host:port`` (``[v6]:port`` for an IPv6 host)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(IStreamClientEndpoint)
class AddressEndpoint:
    """Dials whatever ``address()`` says at each connect (``host:port``): a peer that
    may move between connects, such as a master found through its address file.  An
    address that cannot be had fails the connect with ConnectionError."""

    def __init__(self, endpoint_for: EndpointFor, address: Callable[[], str]) -> None:
        self.endpoint_for = endpoint_for
        self.address = address

    def connect(self, factory: Any) -> Deferred[Any]:
        """Connect ``factory`` to the address as it is now."""
        try:
            host, port = split_addr(self.address())
        except (OSError, ValueError) as e:
            return fail(ConnectionError(f"no address to dial: {e}"))
        return self.endpoint_for(host, port).connect(factory)  # type: ignore[no-any-return]


def tune_socket(transport: Any) -> None:
    """Keepalive and TCP_USER_TIMEOUT on a long-lived link, where the OS allows (through
    a TLS transport too: :class:`~dsml.net.tls_transport.TlsProtocol` passes both calls
    to the TCP connection beneath it)."""
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


class LinkFactory(ConnectionFactory):
    """Builds the dialling side of a two-way link (a worker to the master, to another
    worker, a test client to anyone).

    The side that dials knows whom it dialled: the peer's requests coming back over the
    link are trusted as ``peer_roles`` without an ``auth`` (the side that accepts still
    demands one, which this side sends as its first request).  ``responders`` answers
    them (:data:`~dsml.net.responders.NO_REQUESTS` when the peer sends none).
    """

    def __init__(
        self,
        responders: Responders,
        clock: Any,
        limits: Limits | None = None,
        *,
        peer_roles: frozenset[Role] = frozenset(),
        on_lost: Callable[[Connection], None] | None = None,
        peer_check: PeerCheck | None = None,
    ) -> None:
        super().__init__(
            responders, clock, limits, None, two_way=True, dialled=peer_roles, on_lost=on_lost,
            peer_check=peer_check,
        )


class Links:
    """Opens authenticated links and keeps one shared link per address for small requests."""

    def __init__(
        self,
        clock: Any,
        endpoint_for: EndpointFor,
        token: str | None,
        name: str = "dsml",
        responders: Responders = NO_REQUESTS,
        limits: Limits | None = None,
        peer_roles: frozenset[Role] = frozenset(),
        peer_check: PeerCheck | None = None,
    ) -> None:
        self.clock = clock
        #: Over TLS (``endpoint_for`` then wraps TLS), what a peer's certificate must say.
        self.peer_check = peer_check
        self.endpoint_for = endpoint_for
        self.token = token
        self.name = name
        self.responders = responders
        self.limits = limits or Limits(idle_timeout=300.0)
        self.peer_roles = peer_roles
        self._shared: dict[str, Connection] = {}
        self._waiting: dict[str, list[Deferred[Connection]]] = {}

    def open(self, addr: str) -> Deferred[Connection]:
        """A new link to ``addr``, authenticated; for a streamed request of its own."""
        host, port = split_addr(addr)
        # A factory per link: its connection counts are this link's alone.
        factory = LinkFactory(
            self.responders, self.clock, self.limits, peer_roles=self.peer_roles,
            peer_check=self.peer_check,
        )
        d: Deferred[Connection] = self.endpoint_for(host, port).connect(factory)

        def authenticate(link: Connection) -> Deferred[Connection]:
            tune_socket(link.transport)
            auth = link.request("auth", {"Token": self.token or "", "Client": self.name})

            def failed(f: Any) -> Any:
                link.transport.loseConnection()  # type: ignore[union-attr]
                return f

            return auth.addCallbacks(lambda _: link, failed)

        return d.addCallback(authenticate)

    def shared(self, addr: str) -> Deferred[Connection]:
        """The shared link to ``addr`` (opened on first use, reopened after a loss).

        Only for requests whose payload goes out in one write (request()), so requests
        of several callers never interleave on the wire.
        """
        mine: Deferred[Connection] = Deferred()
        current = self._shared.get(addr)
        if isinstance(current, Connection):
            # A link is alive while its transport is connected and not disconnecting and
            # the connection itself is not closing.  (The protocol's own ``connected`` is
            # set on connect and never cleared, and a link the peer closed is not
            # ``disconnecting``: neither says a link is gone.)
            transport = current.transport
            if (
                getattr(transport, "connected", False)
                and not transport.disconnecting  # type: ignore[union-attr]
                and not current.closing
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
            if isinstance(result, Connection):
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
            if isinstance(link, Connection) and link.connected:
                link.transport.loseConnection()  # type: ignore[union-attr]
        self._shared.clear()


__all__ = [
    "AddressEndpoint",
    "ConnectionLost",
    "EndpointFor",
    "LinkFactory",
    "Links",
    "join_addr",
    "split_addr",
    "tcp_endpoint_for",
    "tls_endpoint_for",
    "tune_socket",
]
