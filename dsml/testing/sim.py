"""The whole cluster in one process, on one fake clock, over an in-memory network.

Layer 3 of the test plan (see ``design.md``): a real master and real workers (the
production wiring of :func:`dsml.master.service.build_master` and
:func:`dsml.worker.service.build_worker`: SQLite state, stores on disk, storage servers,
orders, the link to the master with its heartbeats and backoff) and an asynchronous
client, all driven by one :class:`twisted.internet.task.Clock`.  Nothing touches the
real reactor, a socket or a thread, so a run is fast and repeats exactly.

Faults are injected with the network (:class:`FakeNetwork`: cut a link, crash a node,
make a node silent) and with the cluster (:class:`SimCluster`: kill, silence, restart a
worker, restart the master)::

    sim = SimCluster(tmp_path, workers=("w1", "w2", "w3"), replication=2)
    client = sim.client()
    sim.wait(client.upload("a", b"bytes"))
    sim.kill("w1")
    assert sim.wait(client.download("a")) == b"bytes"
    sim.advance(15)            # past the grace period: re-replication
    sim.restart("w1")          # over its old store
    sim.until(lambda: all(len(w) == 2 for w in sim.replicas().values()))
    sim.close()

Time only moves when the test moves it (:meth:`SimCluster.advance`, :meth:`SimCluster.wait`,
:meth:`SimCluster.until`); after every step the network is flushed until nothing moves.

Jobs run on the production master and worker glue too, but every worker's task runner is
a :class:`FakeTaskManager`: an attempt "runs" for the simulated seconds its
:class:`FakeRun` says (scripted per attempt, by default from the task's ``SIM_*``
environment) on its worker's clock, so it dies with its worker::

    job = sim.wait(client.submit(["work"], array=4, env={"SIM_DURATION": "5"}))
    sim.kill("w1")                      # its attempts are lost, their tasks rerun
    sim.restart("w1", adopt=True)       # ... or its fake tasks go on in the new process
    assert sim.wait(client.wait(job))["state"] == "succeeded"
    sim.events("start", job), sim.results   # what the runners did, what the master took
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.application import service
from twisted.application.internet import backoffPolicy
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from ..client import ListedKey, Located, Node, Stored, job_body
from ..errors import ChecksumMismatch, DsmlError
from ..master.jobs import JobManager, JobView
from ..master.membership import ALIVE
from ..master.service import Master, build_master
from ..master.state import MasterState
from ..net.links import USER_TIMEOUT_MS, EndpointFor, Links
from ..net.server import ConnectionLost, Response, ServerLimits, ServerProtocol
from ..protocol.limits import DEFAULT_VALUE_MAX
from ..worker.link import RETRY_FACTOR, RETRY_INITIAL, RETRY_MAX, MasterLink, WorkerInfo
from ..worker.runner import WorkerJobs
from ..worker.service import Worker, build_worker
from ..worker.store import Entry, Store
from ..worker.tasks import (
    STDERR_NAME,
    STDOUT_NAME,
    TIMEOUT_PREFIX,
    AttemptLedger,
    AttemptResult,
    AttemptSpec,
    TaskError,
    tail_text,
)

log = Logger()

T = TypeVar("T")

#: Bytes a transport may hold for its peer before it pauses a streaming producer
#: registered on it (Twisted's FileDescriptor.bufferSize).
HIGH_WATER = 64 * 1024

#: Most rounds one :meth:`FakeNetwork.flush` may take before it calls the run a livelock.
MAX_ROUNDS = 100_000

#: Where the master listens in a simulated cluster; workers get the next ports in order.
MASTER_HOST = "master"
MASTER_PORT = 7000

#: Bytes per write of a simulated client's upload (the blocking client's CHUNK).
UPLOAD_CHUNK = 1024 * 1024

#: Error codes of one replica that make a reader try the next (as the blocking client).
TRY_NEXT = ("connection", "not-found", "checksum-mismatch", "internal", "busy", "timeout")


class SimTimeout(AssertionError):
    """Simulated time ran out before what a test waited for happened."""


# -- the network ----------------------------------------------------------------------


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
class Connection:
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
    """One end of a :class:`Connection`; behaves like Twisted's TCP transport.

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
        conn: Connection,
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
        self.connections: list[Connection] = []
        self.down: set[str] = set()
        #: Addresses of machines that vanished: connects there hang until the timeout.
        self.vanished: set[str] = set()
        self.silenced: dict[str, IDelayedCall | None] = {}
        self.errors: list[Failure] = []
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

    def connections_of(self, node: str) -> list[Connection]:
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

    def _expire(self, name: str) -> None:
        # TCP_USER_TIMEOUT / keepalive: unanswered links break at both ends.
        self.silenced[name] = None
        for conn in self.connections_of(name):
            self._close(conn, conn.client, error.TimeoutError(), error.TimeoutError())

    def _break(self, conn: Connection) -> None:
        self._close(conn, conn.client, error.TimeoutError(), error.TimeoutError())

    def _silent(self, conn: Connection) -> bool:
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

    def _pump(self, conn: Connection) -> bool:
        a, b = conn.client, conn.server
        for t in (a, b):
            if t.aborting:
                self._close(conn, t, error.ConnectionAborted(), error.ConnectionLost())
                return True
        moved = False
        if not self._silent(conn):
            for src, dst in ((a, b), (b, a)):
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
        conn: Connection,
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
        conn = Connection(src, listener.node, pending.addr)
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


# -- the cluster ----------------------------------------------------------------------


@implementer(IReactorTime)
class ProcessClock:
    """The clock of one simulated process: the shared :class:`Clock`, but the process's
    pending calls are known, so when it dies (:meth:`stop`) its timers die with it
    instead of running on in a process that no longer exists."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.running = True
        self._calls: list[IDelayedCall] = []
        self._prune_at = 256

    def seconds(self) -> float:
        """The shared time."""
        return self.clock.seconds()

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any,
                  **kw: Any) -> IDelayedCall:
        """Schedule on the shared clock (or nowhere, once the process is dead)."""
        if not self.running:
            # Never runs; cancel() and active() still work for whoever holds it.
            return DelayedCall(self.seconds() + delay, f, args, kw,
                               lambda c: None, lambda c: None, self.seconds)
        call = self.clock.callLater(delay, f, *args, **kw)
        self._calls.append(call)
        if len(self._calls) > self._prune_at:
            self._calls = [c for c in self._calls if c.active()]
            self._prune_at = max(256, 2 * len(self._calls))
        return call

    def getDelayedCalls(self) -> list[IDelayedCall]:
        """This process's pending calls."""
        return [c for c in self._calls if c.active()]

    def stop(self) -> None:
        """The process is gone: cancel its pending calls; schedule nothing more."""
        self.running = False
        calls, self._calls = self._calls, []
        for call in calls:
            if call.active():
                call.cancel()


def run_inline(fn: Callable[[], T]) -> Deferred[T]:
    """The simulation's ``run_in_thread``: run now, return a fired Deferred."""
    return maybeDeferred(fn)


class _NetListen(service.Service):
    """Listens on the fake network while running (the ListenService of the simulation)."""

    def __init__(self, net: FakeNetwork, addr: str, factory: Any, node: str) -> None:
        self.net = net
        self.addr = addr
        self.factory = factory
        self.node = node

    def startService(self) -> None:
        super().startService()
        self.net.listen(self.addr, self.factory, self.node)

    def stopService(self) -> None:
        super().stopService()
        if self.net.listeners.get(self.addr) is not None:
            if self.net.listeners[self.addr].factory is self.factory:
                self.net.stop_listening(self.addr)


@implementer(ILogObserver)
class FailureLog:
    """Keeps every ``log.failure`` event (bugs, not bad input) while installed."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if "log_failure" in event:
            self.events.append(event)

    def messages(self) -> list[str]:
        """One line per failure: what was logged and the exception."""
        from twisted.logger import formatEvent

        return [
            f"{formatEvent(e)}: {e['log_failure'].getErrorMessage()}" for e in self.events
        ]


# -- tasks without processes ----------------------------------------------------------


#: SIGTERM: how a fake attempt that was cancelled or timed out "died".
SIGTERM = 15


@attrs.frozen
class FakeRun:
    """How one fake attempt goes: it "runs" ``duration`` simulated seconds, then exits.

    ``reason`` None means the usual one: ``""`` for exit 0 with no signal, ``"exit N"``,
    ``"killed by signal N"``.  ``stdout`` and ``stderr`` are written to its logs when it
    starts; a failed attempt's result carries the tail of ``stderr``, as a real one's does.
    """

    duration: float = 1.0
    exit_code: int | None = 0
    signal: int | None = None
    reason: str | None = None
    stdout: bytes = b""
    stderr: bytes = b""

    def result(self, attempt_id: int, duration: float) -> AttemptResult:
        """The result of an attempt that ran to its end."""
        reason = self.reason
        if reason is None:
            if self.signal is not None:
                reason = f"killed by signal {self.signal}"
            elif self.exit_code != 0:
                reason = f"exit {self.exit_code}"
            else:
                reason = ""
        return AttemptResult(
            attempt_id, self.exit_code, self.signal, duration, 0, reason,
            tail_text(self.stderr) if reason else "",
        )


#: Decides how an attempt goes: ``script(worker name, spec)``.
Script = Callable[[str, AttemptSpec], FakeRun]


def default_script(worker: str, spec: AttemptSpec) -> FakeRun:
    """The task's own environment says: ``SIM_DURATION`` seconds (1 by default), then exit
    ``SIM_EXIT`` (0 by default); ``SIM_STDOUT`` and ``SIM_STDERR`` are what it prints."""
    env = dict(spec.env)
    return FakeRun(
        duration=float(env.get("SIM_DURATION", 1.0)),
        exit_code=int(env.get("SIM_EXIT", 0)),
        stdout=env.get("SIM_STDOUT", "").encode(),
        stderr=env.get("SIM_STDERR", "").encode(),
    )


@attrs.frozen
class TaskEvent:
    """Something a fake task runner did: ``start``, ``cancel`` (told to stop), ``end``
    (reported a result), ``adopt`` (a new worker process took over the attempt)."""

    time: float
    worker: str
    what: str
    attempt_id: int
    job_id: str
    task_index: int
    result: AttemptResult | None = None


@attrs.define(eq=False)
class _FakeAttempt:
    spec: AttemptSpec
    run: FakeRun
    started: float
    ends_at: float
    timer: IDelayedCall | None = None
    stop_reason: str = ""


@attrs.frozen
class Orphan:
    """An attempt still "running" when its worker process died (see
    :meth:`FakeTaskManager.orphans`): it may be adopted by the next process."""

    spec: AttemptSpec
    run: FakeRun
    started: float
    ends_at: float


class FakeTaskManager(AttemptLedger):
    """The :class:`~dsml.worker.tasks.TaskManager` of a simulated worker: no processes.

    Same interface as the glue (:class:`~dsml.worker.runner.WorkerJobs`) uses: ``start``,
    ``cancel``, ``free_slots``, ``running``, ``finished_results``, ``ack``, ``logs``,
    ``stop``, with the same refusals (``busy``, ``duplicate``, ``bad-task``,
    ``stopping``).  An attempt "runs" for the :class:`FakeRun` that ``script`` gives it,
    on the worker's :class:`ProcessClock` (so a killed worker's attempts die with it), is
    killed at its ``timeout``, ends a ``kill_delay`` after :meth:`cancel`, and then
    reports through ``on_result`` like the real one.  Its inputs and outputs are not
    moved, only recorded (:attr:`inputs`, :attr:`outputs`); its logs are real files.
    Every start, cancel and end is appended to ``events``.
    """

    def __init__(
        self,
        clock: ProcessClock,
        *,
        name: str,
        slots: int,
        work_dir: Path,
        on_result: Callable[[AttemptResult], None],
        script: Script = default_script,
        events: list[TaskEvent] | None = None,
        on_change: Callable[[], None] = lambda: None,
        kill_delay: float = 0.0,
    ) -> None:
        self.clock = clock
        self.name = name
        self.slots = slots
        self.work_dir = Path(work_dir)
        self.on_result = on_result
        self.on_change = on_change
        self.script = script
        self.events: list[TaskEvent] = [] if events is None else events
        #: Seconds from :meth:`cancel` to the attempt's end (SIGTERM to exit).
        self.kill_delay = kill_delay
        #: The most slots ever held at once.
        self.peak = 0
        #: Attempt ids :meth:`cancel` was called for (known or not), in order.
        self.cancelled: list[int] = []
        #: Inputs and outputs of every attempt started, by attempt id.
        self.inputs: dict[int, tuple[tuple[str, str], ...]] = {}
        self.outputs: dict[int, tuple[tuple[str, str], ...]] = {}
        self._active: dict[int, _FakeAttempt] = {}
        self._results: dict[int, AttemptResult] = {}
        self._kept: set[int] = set()
        self._done: dict[int, Deferred[None]] = {}
        self._stopping = False
        self.work_dir.mkdir(parents=True, exist_ok=True)

    # -- what the glue asks ---------------------------------------------------------

    def used(self) -> int:
        """Slots held by attempts."""
        return self.slots - self.free_slots()

    def start(self, spec: AttemptSpec) -> None:
        """Take the attempt (TaskError as the real one refuses) and start its run."""
        if self._stopping:
            raise TaskError("the worker is stopping", "stopping")
        aid = spec.attempt_id
        if aid in self._active or aid in self._results:
            raise TaskError(f"attempt {aid} already ran here", "duplicate")
        if not spec.command or not spec.command[0]:
            raise TaskError("empty command", "bad-task")
        if spec.slots < 1 or spec.slots > self.slots:
            raise TaskError(f"needs {spec.slots} slots; this worker has {self.slots}", "bad-task")
        free = self.free_slots()
        if spec.slots > free:
            raise TaskError(f"busy: {spec.slots} slots wanted, {free} free", "busy")
        run = self.script(self.name, spec)
        now = self.clock.seconds()
        att = _FakeAttempt(spec, run, now, now + run.duration)
        self._begin(att)
        self.inputs[aid] = spec.inputs
        self.outputs[aid] = spec.outputs
        d = self.work_dir / str(aid)
        d.mkdir(parents=True, exist_ok=True)
        (d / STDOUT_NAME).write_bytes(run.stdout)
        (d / STDERR_NAME).write_bytes(run.stderr)
        self._event("start", att)
        self._notify_change()

    def _begin(self, att: _FakeAttempt) -> None:
        """Hold its slots and arm its end (or its timeout)."""
        spec = att.spec
        self._active[spec.attempt_id] = att
        self._done[spec.attempt_id] = Deferred()
        self.peak = max(self.peak, self.used())
        left = max(0.0, att.ends_at - self.clock.seconds())
        limit = None if spec.timeout is None else att.started + spec.timeout - self.clock.seconds()
        if limit is not None and limit < left:
            att.timer = self.clock.callLater(
                max(0.0, limit), self._stop, att, f"{TIMEOUT_PREFIX}{spec.timeout:g} s", 0.0
            )
        else:
            att.timer = self.clock.callLater(left, self._exited, att)

    def cancel(self, attempt_id: int, reason: str = "cancelled") -> None:
        """Stop an attempt: it ends ``kill_delay`` later with ``reason``.  Unknown or
        finished attempts are ignored (as the real one does)."""
        self.cancelled.append(attempt_id)
        att = self._active.get(attempt_id)
        if att is not None:
            self._event("cancel", att)
            self._stop(att, reason, self.kill_delay)

    def stop(self) -> Deferred[None]:
        """Refuse new attempts; stop the running ones ("worker stopping")."""
        self._stopping = True
        waiting = list(self._done.values())
        for att in list(self._active.values()):
            self._stop(att, "worker stopping", 0.0)
        if not waiting:
            return succeed(None)
        return DeferredList(waiting).addCallback(lambda _: None)

    # -- for the simulation ---------------------------------------------------------

    def orphans(self) -> list[Orphan]:
        """The attempts running now, with the end their script gave them (taken by
        :meth:`SimCluster.kill` before the process dies)."""
        return [
            Orphan(a.spec, a.run, a.started, a.ends_at)
            for a in self._active.values()
            if not a.stop_reason
        ]

    def adopt(self, orphans: Iterable[Orphan]) -> None:
        """Take over attempts an earlier process of this worker left running: they go on
        to their scripted end; one that ended meanwhile has its result waiting to be sent."""
        for o in orphans:
            att = _FakeAttempt(o.spec, o.run, o.started, o.ends_at)
            self._event("adopt", att)
            if o.ends_at <= self.clock.seconds():
                self._active[o.spec.attempt_id] = att
                self._done[o.spec.attempt_id] = Deferred()
                self._finish(att, o.run.result(o.spec.attempt_id, o.run.duration))
            else:
                self._begin(att)

    # -- the runs -------------------------------------------------------------------

    def _exited(self, att: _FakeAttempt) -> None:
        att.timer = None
        self._finish(att, att.run.result(att.spec.attempt_id, att.run.duration))

    def _stop(self, att: _FakeAttempt, reason: str, delay: float) -> None:
        if att.stop_reason or att.spec.attempt_id not in self._active:
            return
        att.stop_reason = reason
        if att.timer is not None and att.timer.active():
            att.timer.cancel()
        att.timer = self.clock.callLater(delay, self._killed, att)

    def _killed(self, att: _FakeAttempt) -> None:
        att.timer = None
        duration = self.clock.seconds() - att.started
        self._finish(
            att,
            AttemptResult(att.spec.attempt_id, None, SIGTERM, duration, 0, att.stop_reason,
                          tail_text(att.run.stderr)),
        )

    def _finish(self, att: _FakeAttempt, result: AttemptResult) -> None:
        aid = att.spec.attempt_id
        del self._active[aid]
        self._results[aid] = result
        self._kept.add(aid)
        self._event("end", att, result)
        self._notify_change()
        try:
            self.on_result(result)
        except Exception:
            log.failure("on_result failed for attempt {attempt}", attempt=aid)
        self._done.pop(aid).callback(None)

    def _event(self, what: str, att: _FakeAttempt, result: AttemptResult | None = None) -> None:
        s = att.spec
        self.events.append(
            TaskEvent(self.clock.seconds(), self.name, what, s.attempt_id, s.job_id,
                      s.task_index, result)
        )

    def _notify_change(self) -> None:
        try:
            self.on_change()
        except Exception:
            log.failure("on_change failed")


@attrs.frozen
class ResultSeen:
    """A result the master was given (``JobManager.finished``): taken or refused."""

    time: float
    attempt_id: int
    worker: str
    incarnation: int
    taken: bool
    reason: str


class SimCluster:
    """A master and named workers over a :class:`FakeNetwork`, on one :class:`Clock`.

    Worker ``name`` listens at ``name:<port>`` and keeps its store under
    ``root/name/store``; the master listens at ``master:7000`` with its state in
    ``root/master``.  Everything is the production code, built by
    :func:`~dsml.master.service.build_master` and
    :func:`~dsml.worker.service.build_worker`; only the clock, the network and
    ``run_in_thread`` (inline) are simulated.  Workers report a free disk of ``disk``
    minus what they store, so placement does not depend on the machine running the test,
    and back off with a jitter drawn from ``random.Random(seed)``.  ``chunk`` caps the
    bytes a connection delivers per round (every message then arrives in pieces);
    ``user_timeout`` is how long a silent link lasts (TCP_USER_TIMEOUT, keepalive).

    With ``start`` (the default) the master and every worker start and the constructor
    returns once every worker is registered.

    Jobs: every worker runs tasks with a :class:`FakeTaskManager` (no processes) whose
    attempts go as :attr:`script` says (by default, as their ``SIM_*`` environment says:
    see :func:`default_script`); ``slots`` may give each worker its own number.  What the
    runners do is in :attr:`task_events`, what the master made of each result in
    :attr:`results`; :attr:`checks` run after every step (say, to assert an invariant
    at every simulated instant).
    """

    def __init__(
        self,
        root: Path | str,
        workers: Iterable[str] = ("w1", "w2", "w3"),
        replication: int = 2,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        *,
        token: str = "sim-token",
        value_max: int = DEFAULT_VALUE_MAX,
        slots: int | Mapping[str, int] = 2,
        disk: int = 10**12,
        seed: int = 0,
        user_timeout: float | None = USER_TIMEOUT_MS / 1000,
        limits: ServerLimits | None = None,
        chunk: int | None = None,
        start: bool = True,
        script: Script = default_script,
    ) -> None:
        self.root = Path(root)
        self.clock = Clock()
        self.net = FakeNetwork(self.clock, user_timeout=user_timeout, chunk=chunk)
        self.names = list(workers)
        self.replication = replication
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.token = token
        self.value_max = value_max
        self.slots = slots
        self.disk = disk
        self.limits = limits or ServerLimits()
        self.random = random.Random(seed)
        self.master_addr = f"{MASTER_HOST}:{MASTER_PORT}"
        self.ports = {name: MASTER_PORT + 1 + i for i, name in enumerate(self.names)}
        #: The running master (None while it is down).
        self.master: Master | None = None
        #: The running workers, by name.
        self.workers: dict[str, Worker] = {}
        #: The clock of each running process ("master" and worker names).
        self.clocks: dict[str, ProcessClock] = {}
        self._boots = itertools.count(1)
        self._clients = itertools.count(1)
        #: How each fake attempt goes (may be replaced at any time).
        self.script = script
        #: The task runner of each running worker.
        self.runners: dict[str, FakeTaskManager] = {}
        #: Everything every task runner did, in order.
        self.task_events: list[TaskEvent] = []
        #: Every result the master was given, taken or refused, in order.
        self.results: list[ResultSeen] = []
        #: Called after every step of the clock (once the network has settled).
        self.checks: list[Callable[[], None]] = []
        #: Attempts each dead worker process left "running" (see :meth:`restart`).
        self._orphans: dict[str, list[Orphan]] = {}
        self.failures = FailureLog()
        globalLogPublisher.addObserver(self.failures)
        if start:
            self.start()

    # -- life ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the master and every worker; wait until all are registered."""
        self.start_master()
        for name in self.names:
            self.start_worker(name)
        self.wait_registered()

    def close(self) -> None:
        """Stop everything (as crashes: nothing more runs) and close stores and state."""
        for name in list(self.workers):
            self.kill(name)
        if self.master is not None:
            self.kill_master()
        globalLogPublisher.removeObserver(self.failures)

    def __enter__(self) -> SimCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def addr(self, name: str) -> str:
        """The storage address of worker ``name``."""
        return f"{name}:{self.ports[name]}"

    def start_master(self) -> Master:
        """Start the master over its state directory (created on first start)."""
        if self.master is not None:
            raise RuntimeError("the master is already running")
        state_dir = self.root / "master"
        state_dir.mkdir(parents=True, exist_ok=True)
        self.net.revive(MASTER_HOST)
        clock = ProcessClock(self.clock)
        master = build_master(
            state=MasterState(state_dir / "master.sqlite3"),
            clock=clock,
            monotonic=self.clock.seconds,
            replication=self.replication,
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_timeout=self.heartbeat_timeout,
            token=self.token,
            limits=self.limits,
            listen=lambda factory: _NetListen(self.net, self.master_addr, factory, MASTER_HOST),
            now=self.clock.seconds,
        )
        self._watch_results(master.jobs)
        master.service.startService()
        self.master = master
        self.clocks[MASTER_HOST] = clock
        return master

    def _watch_results(self, jobs: JobManager) -> None:
        """Record in :attr:`results` every result ``jobs`` is given, taken or refused."""
        finished = jobs.finished

        def watched(attempt_id: int, worker: str, incarnation: int, **kw: Any) -> Any:
            d = finished(attempt_id, worker, incarnation, **kw)
            # A refused result fires False at once; a taken one fires once committed.
            refused = d.called and d.result is False
            self.results.append(
                ResultSeen(self.clock.seconds(), attempt_id, worker, incarnation,
                           not refused, str(kw.get("reason", "")))
            )
            return d

        jobs.finished = watched  # type: ignore[method-assign]

    def kill_master(self) -> None:
        """The master process dies: its links close, its state is closed (what it had
        not committed yet is lost, as in a crash)."""
        master = self._master()
        self.net.crash_node(MASTER_HOST)
        master.jobs.close(flush=False)  # a crash: the pending batch never reaches disk
        master.service.stopService()
        self.clocks.pop(MASTER_HOST).stop()
        self.master = None

    def restart_master(self, downtime: float = 0.0) -> Master:
        """Kill the master, wait ``downtime`` seconds, start it again over the same state.

        Workers find it again by themselves (backoff, then a new registration)."""
        self.kill_master()
        if downtime:
            self.advance(downtime)
        return self.start_master()

    def start_worker(self, name: str, adopt: bool = False) -> Worker:
        """Start worker ``name`` (a new process: a new boot id) over its store directory.

        With ``adopt``, the attempts its last process left running go on in this one
        (as task processes that outlived their worker), to their scripted end; those that
        ended meanwhile have their results waiting to be sent.  Without, they are gone."""
        if name in self.workers:
            raise RuntimeError(f"worker {name} is already running")
        self.net.revive(name)
        self.net.unsilence(name)
        (self.root / name).mkdir(parents=True, exist_ok=True)
        store = Store(self.root / name / "store", value_max=self.value_max)
        endpoint_for = self.net.endpoint_for(name)
        addr = self.addr(name)
        clock = ProcessClock(self.clock)
        slots = self.worker_slots(name)
        jobs = WorkerJobs(clock)
        runner = FakeTaskManager(
            clock,
            name=name,
            slots=slots,
            work_dir=self.root / name / "tasks",
            on_result=jobs.on_result,
            script=lambda worker, spec: self.script(worker, spec),
            events=self.task_events,
        )
        jobs.tasks = runner  # type: ignore[assignment]
        orphans = self._orphans.pop(name, [])
        if adopt:
            runner.adopt(orphans)
        worker = build_worker(
            jobs=jobs,
            store=store,
            clock=clock,
            endpoint_for=endpoint_for,
            master_endpoint=endpoint_for(MASTER_HOST, MASTER_PORT),
            token=self.token,
            info=WorkerInfo(name, name, self.ports[name], slots,
                            boot=f"sim-{next(self._boots)}"),
            value_max=self.value_max,
            heartbeat_interval=self.heartbeat_interval,
            limits=self.limits,
            run_in_thread=run_inline,
            listen=lambda factory, _master: _NetListen(self.net, addr, factory, name),
            free_disk=lambda: max(0, self.disk - store.stored_bytes),
            retry_policy=backoffPolicy(
                initialDelay=RETRY_INITIAL,
                maxDelay=RETRY_MAX,
                factor=RETRY_FACTOR,
                jitter=self.random.random,
            ),
        )
        worker.service.startService()
        self.workers[name] = worker
        self.clocks[name] = clock
        self.runners[name] = runner
        return worker

    def worker_slots(self, name: str) -> int:
        """The task slots worker ``name`` declares."""
        if isinstance(self.slots, Mapping):
            return int(self.slots.get(name, 2))
        return self.slots

    def kill(self, name: str, half_open: bool = False) -> None:
        """Worker ``name``'s process dies: its connections close (the master sees it dead
        at once), its timers stop, its store is closed as a crash leaves it.

        With ``half_open`` its machine vanishes instead (power loss): nobody sees its
        connections close, so the master only notices the missed heartbeats."""
        worker = self.workers.pop(name)
        self._orphans[name] = self.runners.pop(name).orphans()
        self.net.crash_node(name, half_open=half_open)
        worker.service.stopService()
        self.clocks.pop(name).stop()

    def power_off(self, name: str) -> None:
        """``kill(name, half_open=True)``."""
        self.kill(name, half_open=True)

    def restart(self, name: str, adopt: bool = False) -> Worker:
        """A new process of worker ``name`` over its old store (killing the old one if it
        still runs); it registers by itself.  ``adopt``: see :meth:`start_worker`."""
        if name in self.workers:
            self.kill(name)
        return self.start_worker(name, adopt)

    def silence(self, name: str) -> None:
        """Worker (or ``master``) ``name`` goes silent: bytes are held, nothing closes."""
        self.net.silence(name)

    def unsilence(self, name: str) -> None:
        """The network of ``name`` works again."""
        self.net.unsilence(name)

    # -- time ---------------------------------------------------------------------

    def flush(self) -> None:
        """Deliver everything that can move without time passing, then run the checks."""
        self.net.flush()
        for check in self.checks:
            check()

    def advance(self, seconds: float, step: float = 0.1) -> None:
        """Move the clock ``seconds`` forward in steps of ``step``, flushing the network
        after each."""
        self.flush()
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.flush()

    def wait(
        self,
        d: Deferred[T] | Coroutine[Any, Any, T],
        timeout: float = 60.0,
        step: float = 0.1,
    ) -> T:
        """Advance the clock until ``d`` fires; return its result or raise its error.

        :class:`SimTimeout` if it has not fired within ``timeout`` simulated seconds."""
        if not isinstance(d, Deferred):
            d = Deferred.fromCoroutine(d)
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        self.flush()
        end = self.clock.seconds() + timeout
        while not outcome:
            if self.clock.seconds() >= end - 1e-9:
                raise SimTimeout(f"not done after {timeout:g} simulated seconds")
            self.clock.advance(step)
            self.flush()
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[no-any-return]

    def until(
        self,
        predicate: Callable[[], Any],
        timeout: float = 60.0,
        step: float = 0.1,
        what: str = "",
    ) -> float:
        """Advance until ``predicate()`` is true; return the simulated seconds it took.

        :class:`SimTimeout` (naming ``what``) if it stays false for ``timeout`` seconds."""
        self.flush()
        start = self.clock.seconds()
        end = start + timeout
        while not predicate():
            if self.clock.seconds() >= end - 1e-9:
                raise SimTimeout(
                    f"{what or 'condition'} still false after {timeout:g} simulated seconds"
                )
            self.clock.advance(step)
            self.flush()
        return self.clock.seconds() - start

    def wait_registered(self, names: Iterable[str] | None = None, timeout: float = 60.0) -> None:
        """Advance until the named running workers (all by default) are registered and
        alive on the running master."""
        wanted = list(self.workers if names is None else names)
        self.until(
            lambda: all(self.registered(n) for n in wanted),
            timeout,
            what=f"registration of {', '.join(wanted)}",
        )

    # -- looking inside -----------------------------------------------------------

    def _master(self) -> Master:
        if self.master is None:
            raise RuntimeError("the master is not running")
        return self.master

    def registered(self, name: str) -> bool:
        """True if worker ``name`` runs and the master has it alive at its incarnation."""
        worker = self.workers.get(name)
        if worker is None or self.master is None:
            return False
        record = self.master.membership.get(name)
        return (
            record is not None
            and record.state == ALIVE
            and worker.master.incarnation == record.incarnation
        )

    def link(self, name: str) -> MasterLink:
        """Worker ``name``'s link to the master."""
        return self.workers[name].master

    def state(self, name: str) -> str | None:
        """The master's view of worker ``name``: alive, suspect, dead (None: unknown)."""
        record = self._master().membership.get(name)
        return None if record is None else record.state

    def replicas(self, prefix: str = "", live: bool = False) -> dict[str, set[str]]:
        """The master's directory: each live key and the workers holding its current
        version (with ``live``, only workers the master does not count as dead; the
        directory remembers a dead worker's copies, since it may come back)."""
        master = self._master()
        rows = master.directory.list(prefix, None, 10**9)
        out = {key: set(workers) for key, _, _, _, workers in rows}
        if live:
            alive = {r.name for r in master.membership.live()}
            out = {key: workers & alive for key, workers in out.items()}
        return out

    def stored(self, name: str) -> dict[str, Entry]:
        """What running worker ``name`` has in its store, by key."""
        return {e.key: e for e in self.workers[name].store.inventory()}

    def holders(self) -> dict[str, set[str]]:
        """Each key any running worker stores, and which running workers store it."""
        out: dict[str, set[str]] = {}
        for name in self.workers:
            for key in self.stored(name):
                out.setdefault(key, set()).add(name)
        return out

    def read(self, name: str, key: str) -> bytes:
        """The bytes running worker ``name`` stores for ``key``."""
        _, body = self.workers[name].store.open_read(key)
        with body:
            return body.read()

    def object_path(self, name: str, key: str) -> Path:
        """The file holding ``key`` on running worker ``name`` (a file, not a value)."""
        _, body = self.workers[name].store.open_read(key)
        with body:
            path = getattr(body, "name", None)
        if not isinstance(path, str):
            raise ValueError(f"{key!r} on {name} is a value, not a file")
        return Path(path)

    def job(self, job_id: str) -> JobView:
        """The running master's view of a job, with its tasks and attempts."""
        return self._master().jobs.job(job_id)

    def events(self, what: str = "start", job_id: str | None = None) -> list[TaskEvent]:
        """The task runners' events of one kind (of one job), in order."""
        return [
            e for e in self.task_events
            if e.what == what and (job_id is None or e.job_id == job_id)
        ]

    def client(self, name: str | None = None) -> SimClient:
        """A new client node on the network."""
        return SimClient(
            self.clock,
            self.net.endpoint_for(name or f"client{next(self._clients)}"),
            self.master_addr,
            self.token,
            name or "sim-client",
        )


# -- the client -----------------------------------------------------------------------


class SimClient:
    """An asynchronous client of the cluster: what :class:`dsml.client.ClusterClient`
    does, over Twisted links.

    Every method returns a Deferred (run it with :meth:`SimCluster.wait`).  Uploads
    stream to the first placed worker with ``Forward`` naming the rest and the master's
    ``Version``, then ``commit`` to the master; reads fail over across the replicas the
    master lists, and a copy whose bytes do not match its checksum is reported to the
    master as ``corrupt``.  Jobs: :meth:`submit`, :meth:`status`, :meth:`wait`,
    :meth:`cancel`, :meth:`jobs`, :meth:`logs`, with the JSON of ``ClusterClient``.
    """

    def __init__(
        self,
        clock: Any,
        endpoint_for: EndpointFor,
        master_addr: str,
        token: str | None,
        name: str = "sim-client",
    ) -> None:
        self.clock = clock
        self.links = Links(clock, endpoint_for, token, name=name)
        self.master_addr = master_addr
        #: (key, worker) of every copy this client found corrupt.
        self.corrupt_found: list[tuple[str, str]] = []

    # -- plumbing -----------------------------------------------------------------

    async def _master(
        self, method: str, headers: dict[str, object], payload: bytes = b""
    ) -> Response:
        link = await self.links.shared(self.master_addr)
        return await link.request(method, headers, payload)

    async def _each_replica(self, key: str, read: Callable[[ServerProtocol], Any]) -> Any:
        located = await self.located(key)
        last: Exception | None = None
        for name, addr in located.replicas:
            try:
                link = await self.links.shared(addr)
                return await read(link)
            except ChecksumMismatch as e:
                self.corrupt_found.append((key, name))
                await self._master("corrupt", {"Key": key, "Worker": name})
                last = e
            except DsmlError as e:
                if e.code not in TRY_NEXT:
                    raise
                last = e
            except (error.ConnectError, error.ConnectionLost, error.TimeoutError) as e:
                last = e
        raise last or DsmlError(f"no replica of {key!r} could be read", "unavailable")

    # -- where --------------------------------------------------------------------

    def place(self, key: str, size: int) -> Deferred[tuple[int, list[tuple[str, str]]]]:
        """The master's version for a new write of ``key`` and the workers to write to."""

        async def run() -> tuple[int, list[tuple[str, str]]]:
            r = await self._master("place", {"Key": key, "Size": size})
            return int(r.headers["version"]), _pairs(r.headers["workers"])

        return Deferred.fromCoroutine(run())

    async def located(self, key: str) -> Located:
        """Where ``key``'s current version lives (a coroutine; see :meth:`locate`)."""
        r = await self._master("locate", {"Key": key})
        h = r.headers
        return Located(
            key, int(h["size"]), h["sha256"], int(h["version"]), tuple(_pairs(h["replicas"]))
        )

    def locate(self, key: str) -> Deferred[Located]:
        """Where ``key``'s current version lives, best replica first."""
        return Deferred.fromCoroutine(self.located(key))

    # -- writes -------------------------------------------------------------------

    def upload(self, key: str, data: bytes) -> Deferred[Stored]:
        """Store ``data`` as the file ``key`` on the placed workers (a pipeline), then
        record it with the master; fires once both are done."""
        return Deferred.fromCoroutine(self._upload(key, data))

    async def _upload(self, key: str, data: bytes) -> Stored:
        version, workers = await self.place(key, len(data))
        digest = hashlib.sha256(data).hexdigest()
        headers: dict[str, object] = {"Key": key, "Version": version, "Sha256": digest}
        if len(workers) > 1:
            headers["Forward"] = ",".join(addr for _, addr in workers[1:])
        link = await self.links.open(workers[0][1])
        try:
            answer = link.request("file_upload", headers, len(data))
            transport = link.transport
            for i in range(0, len(data), UPLOAD_CHUNK):
                transport.write(data[i : i + UPLOAD_CHUNK])  # type: ignore[union-attr]
            response = await answer
        finally:
            link.transport.loseConnection()  # type: ignore[union-attr]
        stored = _stored(key, response)
        if stored.sha256 != digest:
            raise ChecksumMismatch(f"{key!r} stored with sha256 {stored.sha256}, sent {digest}")
        await self._commit(key, stored, workers)
        return stored

    def set(self, key: str, value: bytes) -> Deferred[Stored]:
        """Store the small value ``value`` under ``key`` on the placed workers."""

        async def run() -> Stored:
            version, workers = await self.place(key, len(value))
            headers: dict[str, object] = {"Key": key, "Version": version}
            if len(workers) > 1:
                headers["Forward"] = ",".join(addr for _, addr in workers[1:])
            link = await self.links.shared(workers[0][1])
            stored = _stored(key, await link.request("value_upload", headers, value))
            await self._commit(key, stored, workers)
            return stored

        return Deferred.fromCoroutine(run())

    async def _commit(self, key: str, stored: Stored, workers: list[tuple[str, str]]) -> None:
        await self._master(
            "commit",
            {
                "Key": key,
                "Size": stored.size,
                "Sha256": stored.sha256,
                "Version": stored.version,
                "Workers": ",".join(name for name, _ in workers),
            },
        )

    def remove(self, key: str) -> Deferred[int]:
        """Delete ``key`` everywhere (through the master); the version deleted."""

        async def run() -> int:
            r = await self._master("remove", {"Key": key})
            return int(r.headers["version"])

        return Deferred.fromCoroutine(run())

    # -- reads --------------------------------------------------------------------

    def download(self, key: str) -> Deferred[bytes]:
        """The bytes of the file ``key``, from the first replica that serves them whole
        and matching their checksum."""

        async def read(link: ServerProtocol) -> bytes:
            r = await link.request("file_retrieve", {"Key": key})
            digest = hashlib.sha256(r.payload).hexdigest()
            if digest != r.headers.get("sha256"):
                raise ChecksumMismatch(
                    f"{key!r} arrived with sha256 {digest}, expected {r.headers.get('sha256')}"
                )
            return r.payload

        return Deferred.fromCoroutine(self._each_replica(key, read))

    def get(self, key: str) -> Deferred[bytes]:
        """The value ``key``, from the first replica that answers."""

        async def read(link: ServerProtocol) -> bytes:
            r = await link.request("value_retrieve", {"Key": key})
            return r.payload

        return Deferred.fromCoroutine(self._each_replica(key, read))

    def ls(self, prefix: str = "", page: int = 1000) -> Deferred[list[ListedKey]]:
        """Every key under ``prefix`` with its replicas, from the master's directory."""

        async def run() -> list[ListedKey]:
            out: list[ListedKey] = []
            after: str | None = None
            while True:
                headers: dict[str, object] = {"Limit": page}
                if prefix:
                    headers["Prefix"] = prefix
                if after is not None:
                    headers["After"] = after
                r = await self._master("list", headers)
                for line in r.payload.decode().splitlines():
                    d = json.loads(line)
                    out.append(
                        ListedKey(d["key"], d["size"], d["sha256"], d["version"],
                                  tuple(d["replicas"]))
                    )
                    after = d["key"]
                if r.headers.get("more") != "1":
                    return out

        return Deferred.fromCoroutine(run())

    def nodes(self) -> Deferred[list[Node]]:
        """Every worker the master knows, with its state."""

        async def run() -> list[Node]:
            r = await self._master("nodes", {})
            return [Node(**json.loads(line)) for line in r.payload.decode().splitlines() if line]

        return Deferred.fromCoroutine(run())

    # -- jobs ---------------------------------------------------------------------

    def submit(
        self,
        command: list[str] | None = None,
        *,
        name: str = "",
        tasks: list[dict[str, Any]] | None = None,
        array: int = 1,
        slots: int = 1,
        timeout: float | None = None,
        max_attempts: int = 3,
        priority: int = 0,
        after: list[str] | tuple[str, ...] = (),
        inputs: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
        outputs: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
        env: dict[str, str] | None = None,
    ) -> Deferred[str]:
        """Submit a job (the JSON of :meth:`ClusterClient.submit`); fires with its id once
        the master has it durably."""
        body = job_body(
            command, name=name, tasks=tasks, array=array, slots=slots, timeout=timeout,
            max_attempts=max_attempts, priority=priority, after=after, inputs=inputs,
            outputs=outputs, env=env,
        )

        async def run() -> str:
            r = await self._master("submit", {}, body)
            return r.headers["job"]

        return Deferred.fromCoroutine(run())

    def jobs(self, limit: int = 100) -> Deferred[list[dict[str, Any]]]:
        """Recent jobs, newest first (without their tasks)."""

        async def run() -> list[dict[str, Any]]:
            r = await self._master("jobs", {"Limit": limit})
            return [json.loads(line) for line in r.payload.decode().splitlines() if line]

        return Deferred.fromCoroutine(run())

    def status(self, job_id: str) -> Deferred[dict[str, Any]]:
        """A job with its tasks and every attempt (as ``dsml status`` shows it)."""

        async def run() -> dict[str, Any]:
            r = await self._master("status", {"Job": job_id})
            return json.loads(r.payload)  # type: ignore[no-any-return]

        return Deferred.fromCoroutine(run())

    def cancel(self, job_id: str) -> Deferred[int]:
        """Cancel a job; fires with how many running attempts were told to stop."""

        async def run() -> int:
            r = await self._master("cancel", {"Job": job_id})
            return int(r.headers.get("killed", "0"))

        return Deferred.fromCoroutine(run())

    def wait(self, job_id: str, timeout: float | None = None, step: int = 30) -> Deferred[
        dict[str, Any]
    ]:
        """Fires with the job's status once it has ended (or ``timeout`` simulated seconds
        have passed), asking the master ``step`` seconds at a time."""

        async def run() -> dict[str, Any]:
            deadline = None if timeout is None else self.clock.seconds() + timeout
            while True:
                left = step if deadline is None else deadline - self.clock.seconds()
                ask = max(1, min(step, int(left)))
                r = await self._master("wait", {"Job": job_id, "Timeout": ask})
                if r.headers.get("final") == "1":
                    return json.loads(r.payload)  # type: ignore[no-any-return]
                if deadline is not None and self.clock.seconds() >= deadline:
                    return json.loads(r.payload)  # type: ignore[no-any-return]

        return Deferred.fromCoroutine(run())

    def logs(
        self, job_id: str, task: int = 0, attempt: int | None = None, stream: str = "stdout"
    ) -> Deferred[bytes]:
        """An attempt's stdout or stderr (the task's last attempt by default), whole."""

        async def run() -> bytes:
            headers: dict[str, object] = {"Job": job_id, "Task": task}
            if attempt is not None:
                headers["Attempt"] = attempt
            r = await self._master("logs", headers)
            attempt_id, addr = int(r.headers["attempt"]), r.headers["worker"].partition("=")[2]
            link = await self.links.shared(addr)
            chunks, offset = [], 0
            while True:
                got = await link.request(
                    "task_log", {"Attempt": attempt_id, "Stream": stream, "Offset": offset}
                )
                chunks.append(got.payload)
                offset += len(got.payload)
                if not got.payload or offset >= int(got.headers["size"]):
                    return b"".join(chunks)

        return Deferred.fromCoroutine(run())

    def close(self) -> None:
        """Close the client's shared links."""
        self.links.close()


def _stored(key: str, r: Response) -> Stored:
    h = r.headers
    return Stored(key, int(h["size"]), h["sha256"], int(h["version"]), int(h.get("replicas", "1")))


def _pairs(text: str) -> list[tuple[str, str]]:
    """``name=host:port,...`` to [(name, host:port)]."""
    out = []
    for item in text.split(","):
        name, _, addr = item.partition("=")
        out.append((name, addr))
    return out


__all__ = [
    "Connection",
    "ConnectionLost",
    "FailureLog",
    "FakeEndpoint",
    "FakeNetwork",
    "FakeRun",
    "FakeTaskManager",
    "FakeTransport",
    "Orphan",
    "ProcessClock",
    "ResultSeen",
    "Script",
    "SimClient",
    "SimCluster",
    "SimTimeout",
    "TaskEvent",
    "default_script",
    "run_inline",
]
