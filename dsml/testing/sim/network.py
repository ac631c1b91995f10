"""The simulation's in-memory network: TCP between named nodes, on one clock.

Owns :class:`FakeNetwork` (listening, dialling, moving bytes round by round, and the
faults: cut, crash, power loss, silence), a connection (:class:`FakeConnection`) and its
two ends (:class:`FakeTransport`, which behaves like Twisted's TCP transport, producers
included), and :class:`FakeEndpoint`, what a node dials with.  It knows nothing of
dsml's master or workers: any Twisted protocol factory can listen or dial here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ...net.links import EndpointFor

log = Logger()

#: Bytes a transport may hold for its peer before it pauses a streaming producer
#: registered on it (Twisted's FileDescriptor.bufferSize).
HIGH_WATER = 64 * 1024

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


@implementer(ITransport, IConsumer, IPushProducer)
class FakeTransport:
    """One end of a :class:`FakeConnection`; behaves like Twisted's TCP transport.

    ``write`` queues bytes for the peer (delivered by :meth:`FakeNetwork.flush`);
    ``pauseProducing`` stops *reading* (bytes for this end wait); ``loseConnection``
    closes once the queued bytes are delivered and no pull producer is registered;
    ``abortConnection`` closes at the next flush, dropping what is queued.  As in
    Twisted, a registered producer is stopped when the connection is lost, and
    ``protocol.connected`` is left alone (only the transport's flags change).
    """

    def __init__(
        self,
        net: FakeNetwork,
        conn: FakeConnection,
        protocol: Any,
        node: str,
        host: IPv4Address,
        peer: IPv4Address,
    ) -> None:
        self.net = net
        self.conn = conn
        self.protocol = protocol
        self.node = node
        self.host = host
        self.peer = peer
        self.out: list[bytes] = []  # written, not yet delivered to the peer
        self.out_bytes = 0
        self.reading = True
        self.producer: Any = None
        self.streaming = False
        self.producer_paused = False
        self.connected = True
        self.disconnecting = False
        self.disconnected = False
        self.aborting = False
        #: The process at this end is gone (see FakeNetwork.crash_node): nothing it does
        #: reaches the wire and nothing reaches it.
        self.dead = False
        self.sent = 0  # bytes written over the connection's life

    def __repr__(self) -> str:
        return f"<FakeTransport {self.node} -> {self.peer.host}:{self.peer.port}>"

    # ITransport

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the peer.  As in Twisted, bytes written after
        ``loseConnection`` still go out first; after an abort or the close they vanish."""
        if self.disconnected or self.aborting or self.dead or not data:
            return
        chunk = bytes(data)
        self.out.append(chunk)
        self.out_bytes += len(chunk)
        self.sent += len(chunk)
        if self.net.tap is not None:
            self.net.tap(self, chunk)
        if (
            self.producer is not None
            and self.streaming
            and not self.producer_paused
            and self.out_bytes > HIGH_WATER
        ):
            # As FileDescriptor.write: a full buffer pauses a streaming producer.
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """Queue several chunks."""
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Close after what is queued has been delivered; stop reading now."""
        if not self.disconnected and not self.dead:
            self.disconnecting = True
            self.reading = False

    def abortConnection(self) -> None:
        """Close at the next flush, dropping whatever is queued."""
        if not self.disconnected and not self.dead:
            self.disconnecting = True
            self.aborting = True
            self.reading = False

    def getPeer(self) -> IPv4Address:
        """The other end's address."""
        return self.peer

    def getHost(self) -> IPv4Address:
        """This end's address."""
        return self.host

    # IPushProducer: reading from the connection

    def pauseProducing(self) -> None:
        """Stop delivering incoming bytes to the protocol."""
        self.reading = False

    def resumeProducing(self) -> None:
        """Deliver incoming bytes again (not once the connection is closing)."""
        if not self.disconnecting and not self.disconnected and not self.dead:
            self.reading = True

    def stopProducing(self) -> None:
        """As a TCP transport: close the connection."""
        self.loseConnection()

    # IConsumer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Take a producer; a pull producer is asked for data whenever nothing is queued."""
        if self.producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer}, because producer {self.producer} "
                f"was never unregistered."
            )
        if self.disconnected or self.dead:
            producer.stopProducing()
            return
        self.producer = producer
        self.streaming = streaming
        self.producer_paused = False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        """Drop the producer."""
        self.producer = None
        self.producer_paused = False

    # ITCPTransport odds and ends the protocols touch

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Nothing to do in memory."""

    def setTcpKeepAlive(self, enabled: bool) -> None:
        """Nothing to do in memory (silent links are modelled by the network)."""

    def getTcpNoDelay(self) -> bool:
        """Always on."""
        return True

    def getTcpKeepAlive(self) -> bool:
        """Always on."""
        return True

    def logPrefix(self) -> str:
        """For log lines."""
        return f"sim:{self.node}"

    def _take(self, limit: int | None) -> bytes:
        data = b"".join(self.out)
        if limit is not None and len(data) > limit:
            data, rest = data[:limit], data[limit:]
            self.out = [rest]
            self.out_bytes = len(rest)
        else:
            self.out = []
            self.out_bytes = 0
        return data


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
    TCP_USER_TIMEOUT and keepalive make a real one).

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
    ) -> None:
        self.clock = clock
        self.connect_timeout = connect_timeout
        self.user_timeout = user_timeout
        #: Most bytes delivered per direction per round (None: all that is queued).
        self.chunk = chunk
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
                    moved = True
                elif src.out and dst.reading:
                    data = src._take(self.chunk)
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
