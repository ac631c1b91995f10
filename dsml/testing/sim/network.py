"""The simulation's in-memory network: TCP between named nodes, on one clock.

Owns :class:`FakeNetwork` (listening, dialling, moving bytes round by round, and the
faults: cut, crash, power loss, silence), a connection (:class:`FakeConnection`) and its
two ends (:class:`FakeTransport`, which behaves like Twisted's TCP transport, producers
included), and :class:`FakeEndpoint`, what a node dials with.  It knows nothing of
dsml's master or workers: any Twisted protocol factory can listen or dial here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ...net.links import EndpointFor
from .tcp import TcpEnds
from .transport import HIGH_WATER, FakeTransport

log = Logger()

#: Most rounds one :meth:`FakeNetwork.flush` may take before it calls the run a livelock.
MAX_ROUNDS = 100_000


@attrs.define(eq=False)
class _Listener:
    addr: str
    node: str
    factory: Any


@attrs.define(eq=False)
class _Connecting:
    node: str
    addr: str
    factory: Any
    deferred: Deferred[Any]
    timer: IDelayedCall | None = None


@attrs.define(eq=False)
class FakeConnection:
    """One simulated TCP connection: the dialling node's end and the listening node's."""

    client_node: str
    server_node: str
    addr: str  #: the listening address it was opened to
    client: FakeTransport = attrs.field(init=False)
    server: FakeTransport = attrs.field(init=False)
    closed: bool = False

    def nodes(self) -> tuple[str, str]:
        """The two nodes it joins."""
        return self.client_node, self.server_node


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Dials ``host:port`` on a :class:`FakeNetwork` from ``node``."""

    def __init__(self, net: FakeNetwork, node: str, host: str, port: int) -> None:
        self.net = net
        self.node = node
        self.host = host
        self.port = port

    def __repr__(self) -> str:
        return f"<FakeEndpoint {self.node} -> {self.host}:{self.port}>"

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        """Connect at the next flush; ConnectionRefusedError if nothing listens there."""
        return self.net._dial(self.node, f"{self.host}:{self.port}", protocolFactory)


class FakeNetwork:
    """In-memory TCP between named nodes, on a clock.

    A node listens with :meth:`listen` and dials with the endpoints of
    :meth:`endpoint_for`.  Nothing moves until :meth:`flush`, which runs what is due on
    the clock now, completes pending connects, delivers queued bytes, drives pull
    producers and closes connections, round after round, until nothing moves.

    Faults: :meth:`cut` (close every connection to an address), :meth:`drop_node`
    (close every connection of a node; it stays up), :meth:`crash_node` (the node's
    process is gone: its peers see their connections close, or with ``half_open`` see
    nothing at all; the node itself hears nothing more; connects to it fail until
    :meth:`revive`), and
    :meth:`silence` (bytes to and from the node are held, connects to and from it hang
    until ``connect_timeout``; after ``user_timeout`` its connections break, as
    TCP_USER_TIMEOUT and keepalive make a real one).  With ``tcp="socket"`` instead
    each end gives up by its own socket options and unacknowledged bytes, and its
    peer may stay half-open (:mod:`.tcp`; ``user_timeout`` is then unused).

    Exceptions raised by protocol callbacks are logged and kept in :attr:`errors`; one
    raised by ``dataReceived`` closes that connection, as in Twisted.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        connect_timeout: float = 10.0,
        user_timeout: float | None = None,
        chunk: int | None = None,
        max_rounds: int = MAX_ROUNDS,
        tcp: str = "uniform",
        rate: float | None = None,
    ) -> None:
        self.clock = clock
        self.connect_timeout = connect_timeout
        self.user_timeout = user_timeout if tcp == "uniform" else None
        self.tcp = TcpEnds(self) if tcp == "socket" else None
        #: Most bytes delivered per direction per round (None: all that is queued).
        self.chunk = chunk
        #: Bytes per simulated second each direction of a connection carries (None: any
        #: number at once): with it a transfer takes time, and a fault can come mid-way.
        self.rate = rate
        self.max_rounds = max_rounds
        self.listeners: dict[str, _Listener] = {}
        self.connections: list[FakeConnection] = []
        self.down: set[str] = set()
        #: Addresses of machines that vanished: connects there hang until the timeout.
        self.vanished: set[str] = set()
        self.silenced: dict[str, IDelayedCall | None] = {}
        #: Directions blocked by :meth:`partition`: (from node, to node) -> the timer
        #: that breaks their connections after ``user_timeout`` (None once it has).
        self.blocked: dict[tuple[str, str], IDelayedCall | None] = {}
        self.errors: list[Failure] = []
        #: Called with (transport, bytes) for every write (a recorder, say); or None.
        self.tap: Callable[[FakeTransport, bytes], None] | None = None
        self._connecting: list[_Connecting] = []
        self._ports = itertools.count(40000)

    # -- nodes ----------------------------------------------------------------------

    def listen(self, addr: str, factory: Any, node: str) -> None:
        """Serve ``factory`` at ``addr`` (``host:port``) on behalf of ``node``."""
        if addr in self.listeners:
            raise error.CannotListenError(None, addr, "address already in use")
        self.listeners[addr] = _Listener(addr, node, factory)
        self.vanished.discard(addr)

    def stop_listening(self, addr: str) -> None:
        """Stop serving ``addr``; open connections stay."""
        self.listeners.pop(addr, None)

    def endpoint_for(self, node: str) -> EndpointFor:
        """The ``endpoint_for(host, port)`` function of ``node`` (see :class:`Links`)."""
        return lambda host, port: FakeEndpoint(self, node, host, port)

    def connections_of(self, node: str) -> list[FakeConnection]:
        """Open connections with ``node`` at either end."""
        return [c for c in self.connections if node in c.nodes()]

    # -- faults ---------------------------------------------------------------------

    def cut(self, addr: str) -> None:
        """Close every connection to ``addr``; both ends see connectionLost."""
        for conn in [c for c in self.connections if c.addr == addr]:
            self._close(conn, conn.server, error.ConnectionLost(), error.ConnectionLost())

    def drop_node(self, name: str) -> None:
        """Close every connection of ``name``; both ends see connectionLost.  The node
        stays up: it may reconnect at once."""
        for conn in self.connections_of(name):
            self._close(conn, conn.client, error.ConnectionLost(), error.ConnectionLost())

    def crash_node(self, name: str, half_open: bool = False) -> None:
        """``name``'s process is gone: its own protocols hear nothing more (no callbacks
        run in a dead process), its listeners go, and connects to or from it are refused
        until :meth:`revive`.

        Its peers see their connections close at once (the kernel of a killed process
        resets them), or with ``half_open`` (the machine lost power, the cable was
        pulled) they see nothing: what they send vanishes, until they close the
        connection themselves (an idle timeout) or ``user_timeout`` breaks it, and
        connects to its addresses hang until ``connect_timeout`` (nothing answers)."""
        self.down.add(name)
        if self.tcp is not None and not half_open:
            self._last_words(name)
        for addr in [a for a, lst in self.listeners.items() if lst.node == name]:
            del self.listeners[addr]
            if half_open:
                self.vanished.add(addr)
        for conn in self.connections_of(name):
            for t in (conn.client, conn.server):
                if t.node == name and not t.dead:
                    t.dead = True
                    t.reading = False
                    t.producer = None
                    t.out = []
                    t.out_bytes = 0
            if half_open and not (conn.client.dead and conn.server.dead):
                if self.user_timeout is not None:
                    self.clock.callLater(self.user_timeout, self._break, conn)
                continue
            self._close(conn, conn.client, error.ConnectionLost(), error.ConnectionLost())
        for pending in [p for p in self._connecting if p.node == name]:
            # The dialling process is gone: its Deferred never fires.
            self._connecting.remove(pending)
            if pending.timer is not None and pending.timer.active():
                pending.timer.cancel()
        self.silenced.pop(name, None)

    def _last_words(self, name: str) -> None:
        """What a killed process wrote before it died is in its kernel's buffers, which
        still send it (then the FIN): its peers read it, unless the path is cut."""
        for conn in self.connections_of(name):
            for src, dst in ((conn.client, conn.server), (conn.server, conn.client)):
                if (src.node != name or not src.out or dst.dead or not dst.reading
                        or self._silent(conn) or self._blocked(src.node, dst.node)):
                    continue
                try:
                    dst.protocol.dataReceived(src._take(None))
                except Exception:
                    self._error(f"dataReceived on {dst!r}")

    def revive(self, name: str) -> None:
        """A crashed node may run (and be reached) again."""
        self.down.discard(name)

    def silence(self, name: str) -> None:
        """Hold every byte to and from ``name`` (its links go quiet, nothing closes)."""
        if name in self.silenced:
            return
        timer = None
        if self.user_timeout is not None:
            timer = self.clock.callLater(self.user_timeout, self._expire, name)
        self.silenced[name] = timer

    def unsilence(self, name: str) -> None:
        """Deliver again what was held, and what follows."""
        timer = self.silenced.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def partition(self, a: str, b: str, one_way: bool = False) -> None:
        """Bytes from ``a`` to ``b`` (and, unless ``one_way``, from ``b`` to ``a``) are
        held; connects between them hang until ``connect_timeout`` (a SYN or its answer
        is lost either way); after ``user_timeout`` their connections break (the side
        whose bytes go unacknowledged gives up; with TCP both ends then see a reset)."""
        for pair in ((a, b),) if one_way else ((a, b), (b, a)):
            if pair in self.blocked:
                continue
            timer = None
            if self.user_timeout is not None:
                timer = self.clock.callLater(self.user_timeout, self._expire_pair, pair)
            self.blocked[pair] = timer

    def heal(self, a: str, b: str) -> None:
        """Undo :meth:`partition` between ``a`` and ``b`` (both directions)."""
        for pair in ((a, b), (b, a)):
            timer = self.blocked.pop(pair, None)
            if timer is not None and timer.active():
                timer.cancel()

    def _expire_pair(self, pair: tuple[str, str]) -> None:
        self.blocked[pair] = None
        for conn in self.connections_of(pair[0]):
            if pair[1] in conn.nodes():
                self._close(conn, conn.client, error.TimeoutError(), error.TimeoutError())

    def _blocked(self, src: str, dst: str) -> bool:
        return bool(self.blocked) and (src, dst) in self.blocked

    def _expire(self, name: str) -> None:
        # TCP_USER_TIMEOUT / keepalive: unanswered links break at both ends.
        self.silenced[name] = None
        for conn in self.connections_of(name):
            self._close(conn, conn.client, error.TimeoutError(), error.TimeoutError())

    def _break(self, conn: FakeConnection) -> None:
        self._close(conn, conn.client, error.TimeoutError(), error.TimeoutError())

    def _silent(self, conn: FakeConnection) -> bool:
        return conn.client_node in self.silenced or conn.server_node in self.silenced

    # -- moving bytes ---------------------------------------------------------------

    def flush(self) -> None:
        """Run rounds until nothing moves; RuntimeError past ``max_rounds`` (a livelock)."""
        for _ in range(self.max_rounds):
            if not self._round():
                return
        raise RuntimeError(f"the network did not settle within {self.max_rounds} rounds")

    def _round(self) -> bool:
        self.clock.advance(0)  # what is due now (callLater(0), expired deadlines)
        moved = False
        for pending in list(self._connecting):
            if self._establish(pending):
                moved = True
        for conn in list(self.connections):
            if not conn.closed and self._pump(conn):
                moved = True
        return moved

    def _pump(self, conn: FakeConnection) -> bool:
        a, b = conn.client, conn.server
        for t in (a, b):
            if t.aborting:
                self._close(conn, t, error.ConnectionAborted(), error.ConnectionLost())
                return True
        moved = False
        if not self._silent(conn):
            for src, dst in ((a, b), (b, a)):
                if src.out and self._blocked(src.node, dst.node):
                    continue
                if src.out and dst.dead:
                    src._take(None)  # to a machine that is gone
                    if self.tcp is not None:
                        self.tcp.sent_into_void(src)
                    moved = True
                elif src.out and dst.reading:
                    limit = self._budget(src)
                    if limit == 0:
                        continue  # this direction's bandwidth is spent until time passes
                    data = src._take(limit)
                    src.credit -= len(data)
                    moved = True
                    try:
                        dst.protocol.dataReceived(data)
                    except Exception:
                        self._error(f"dataReceived on {dst!r}")
                        self._close(conn, dst, error.ConnectionLost(), error.ConnectionLost())
                    if conn.closed:
                        return True
        for t in (a, b):
            p = t.producer
            if p is None or t.disconnected:
                continue
            if t.streaming:
                if t.producer_paused and not t.out:
                    t.producer_paused = False
                    p.resumeProducing()
                    moved = True
            elif not t.out:
                try:
                    p.resumeProducing()
                except Exception:
                    self._error(f"resumeProducing of {p!r}")
                    t.abortConnection()
                if t.out or t.producer is not p or t.disconnecting:
                    moved = True
            if conn.closed:
                return True
        for t in (a, b):
            if (
                t.disconnecting
                and not t.out
                and (t.producer is None or (t.streaming and not t.producer_paused))
            ):
                self._close(conn, t, error.ConnectionDone(), error.ConnectionDone())
                return True
        return moved

    def _budget(self, t: FakeTransport) -> int | None:
        """Bytes ``t`` may send now (None: no bound)."""
        if self.rate is None:
            return self.chunk
        now = self.clock.seconds()
        burst = max(self.rate * 0.1, HIGH_WATER)
        if t.credit_at is None:
            t.credit = burst
        elif now > t.credit_at:
            t.credit = min(burst, t.credit + self.rate * (now - t.credit_at))
        t.credit_at = now
        n = max(0, int(t.credit))
        return n if self.chunk is None else min(n, self.chunk)

    def _close(
        self,
        conn: FakeConnection,
        first: FakeTransport,
        first_reason: Exception,
        second_reason: Exception,
    ) -> None:
        """Close ``conn``; ``first``'s end hears of it first (a dead end hears nothing)."""
        if conn.closed:
            return
        conn.closed = True
        self.connections.remove(conn)
        second = conn.server if first is conn.client else conn.client
        ends = ((first, first_reason), (second, second_reason))
        for t, _ in ends:
            t.connected = False
            t.disconnected = True
            t.reading = False
            t.out = []
            t.out_bytes = 0
        for t, reason in ends:
            producer, t.producer = t.producer, None
            if t.dead:
                continue
            if producer is not None:
                try:
                    producer.stopProducing()
                except Exception:
                    self._error(f"stopProducing of {producer!r}")
            try:
                t.protocol.connectionLost(Failure(reason))
            except Exception:
                self._error(f"connectionLost on {t!r}")

    # -- connecting -----------------------------------------------------------------

    def _dial(self, node: str, addr: str, factory: Any) -> Deferred[Any]:
        pending: _Connecting

        def cancel(d: Deferred[Any]) -> None:
            if pending in self._connecting:
                self._connecting.remove(pending)
            if pending.timer is not None and pending.timer.active():
                pending.timer.cancel()

        d: Deferred[Any] = Deferred(cancel)
        pending = _Connecting(node, addr, factory, d)
        if node in self.down:
            d.errback(error.ConnectionRefusedError(f"{node} is down"))
            return d
        pending.timer = self.clock.callLater(self.connect_timeout, self._timed_out, pending)
        self._connecting.append(pending)
        return d

    def _timed_out(self, pending: _Connecting) -> None:
        if pending in self._connecting:
            self._connecting.remove(pending)
            pending.deferred.errback(error.TCPTimedOutError(f"connect to {pending.addr}"))

    def _establish(self, pending: _Connecting) -> bool:
        """Complete or refuse a pending connect; False if it must keep waiting (silence)."""
        listener = self.listeners.get(pending.addr)
        src = pending.node
        if listener is not None and (src in self.silenced or listener.node in self.silenced):
            return False  # SYNs go unanswered: wait for the connect timeout
        if listener is not None and (
            self._blocked(src, listener.node) or self._blocked(listener.node, src)
        ):
            return False  # partitioned: the SYN or its answer is lost
        if listener is None and pending.addr in self.vanished:
            return False
        self._connecting.remove(pending)
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        d = pending.deferred
        if listener is None or listener.node in self.down or src in self.down:
            d.errback(error.ConnectionRefusedError(f"nothing listens at {pending.addr}"))
            return True
        host, _, port = pending.addr.rpartition(":")
        server_addr = IPv4Address("TCP", host, int(port))
        client_addr = IPv4Address("TCP", src, next(self._ports))
        server_proto = listener.factory.buildProtocol(client_addr)
        if server_proto is None:
            d.errback(error.ConnectionRefusedError(f"{pending.addr} refused the connection"))
            return True
        client_proto = pending.factory.buildProtocol(server_addr)
        if client_proto is None:
            d.errback(error.ConnectError(f"{src}'s factory built no protocol"))
            return True
        conn = FakeConnection(src, listener.node, pending.addr)
        conn.server = FakeTransport(self, conn, server_proto, listener.node, server_addr,
                                    client_addr)
        conn.client = FakeTransport(self, conn, client_proto, src, client_addr, server_addr)
        self.connections.append(conn)
        for proto, t in ((server_proto, conn.server), (client_proto, conn.client)):
            try:
                proto.makeConnection(t)
            except Exception:
                self._error(f"makeConnection on {t!r}")
                t.abortConnection()
        d.callback(client_proto)
        return True

    def _error(self, what: str) -> None:
        failure = Failure()
        self.errors.append(failure)
        log.failure("simulated network: {what} raised", failure, what=what)



__all__ = [
    "HIGH_WATER",
    "MAX_ROUNDS",
    "FakeConnection",
    "FakeEndpoint",
    "FakeNetwork",
    "FakeTransport",
]
