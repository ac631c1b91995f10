"""One dsml connection: framing, authentication, deadlines and limits.

:class:`Connection` is the Twisted protocol of every dsml connection, accepted or dialled.
It feeds bytes to the sans-IO parser and enforces the connection's rules
(docs/protocol.md, sections 7 and 8): authenticate first, the deadlines on the clock it is
given, the connection limits, one framing error closes.  What it parses goes to its parts:

- :class:`~dsml.net.answering.Answers` answers the peer's requests in order, from the
  responders its roles allow (:attr:`Connection.roles`, set by authentication);
- on a two-way link, :class:`~dsml.net.calling.Calls` sends this side's own requests
  (:meth:`Connection.request`, :meth:`Connection.request_file` for a payload streamed
  from a file) and reads their responses (into memory, or chunk by chunk into a sink).

The factories say which side it is: :class:`~dsml.net.server.ServerFactory` for accepted
connections, :class:`~dsml.net.links.LinkFactory` for dialled links.

Bounds (docs/protocol.md, section 8): before it has authenticated a connection may send
an ``auth`` and nothing else, in at most PREAUTH_MAX bytes; unauthenticated connections
are a pool of their own (the factory's), where a newcomer over the cap closes the oldest,
so they never keep an authenticated peer out; an accepted connection's unsent output is
watched by a push producer registered with its transport (:class:`_OutputGate`), and
while it is above the transport's bound no further request is answered and (one-way)
nothing is read.

One room because these rules all read and change the same few fields of one connection
(authenticated, closing, the answering state, the deadline timer, the gate) on every
read and every answer; split apart, each would reach into the others' state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any

from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..protocol import codec
from ..protocol.codec import (
    END,
    NEED_DATA,
    Data,
    Head,
    Parser,
    ProtocolError,
    Rejected,
    quick_request,
)
from ..protocol.limits import PREAUTH_MAX
from ..protocol.methods import Role
from .answering import HELD_MAX, IDLE, READ_SIZE, RECEIVING, WAITING, Answers
from .calling import Calls, Response, ResponseSink
from .limits import Limits
from .peerlog import PeerLog
from .preauth import PreauthPool
from .responders import AUTH, Reply, Responder, Responders
from .twisted_private import set_read_size

if TYPE_CHECKING:
    from ..pki import Identity
    from .tls import PeerCheck

log = Logger()

#: Decides who a connection is from its ``auth`` request: the roles it may act as, or
#: None for credentials that do not hold (answered ``auth-failed``, then closed).
Authenticate = Callable[[Head], "frozenset[Role] | None"]

_NO_ROLES: frozenset[Role] = frozenset()


class ConnectionFactory(Factory):
    """What the connections of one listener or one set of links share.

    ``two_way``: either side may send requests (:meth:`Connection.request`).
    ``dialled``: the roles of the peer this side dialled, which it trusts without an
    ``auth`` (None for accepted connections, which must authenticate).
    ``on_lost`` hears of each closed two-way connection.
    ``peer_check``: the connection runs over TLS and its peer is who its certificate
    says (:class:`~dsml.net.tls.PeerCheck`): an accepted connection then holds the
    certificate's role instead of authenticating with a token; a dialled one is cut
    unless the peer is of a kind it expects.
    """

    def __init__(
        self,
        responders: Responders,
        clock: Any,
        limits: Limits | None,
        authenticate: Authenticate | None,
        *,
        two_way: bool,
        dialled: frozenset[Role] | None,
        on_lost: Callable[[Connection], None] | None,
        peer_check: PeerCheck | None = None,
    ) -> None:
        self.responders = responders
        self.peer_check = peer_check
        self.clock = clock
        self.limits = limits or Limits()
        self.authenticate = authenticate
        self.two_way = two_way
        self.dialled = dialled
        self.on_lost = on_lost
        #: Open connections, authenticated or not.
        self.connections = 0
        #: Authenticated connections (at most ``limits.max_connections``).
        self.authenticated = 0
        #: Lines about misbehaving peers go through here (rate-limited).
        self.peer_log = PeerLog(clock)
        #: Connections not authenticated yet (see :mod:`.preauth`).
        self.preauth = PreauthPool(clock, self.limits, self.evict)
        self.noisy = False  # no "Starting factory" line per outgoing link

    @property
    def unauthenticated(self) -> int:
        """Connections that have not authenticated yet."""
        return len(self.preauth)

    def attach_port(self, port: Any) -> None:
        """A port listening with this factory: paused while the unauthenticated pool is
        full of young connections (:mod:`.preauth`)."""
        self.preauth.attach(port)

    def admit_unauthenticated(self, conn: Connection, host: str) -> None:
        """Count ``conn`` among the unauthenticated (:class:`~.preauth.PreauthPool`)."""
        self.preauth.admit(conn, host)

    def evict(self, conn: Connection, where: str, limit: int) -> None:
        """Close the unauthenticated connection ``conn`` to make room for a newer one."""
        self.peer_log.info(
            "{peer}: closed: the oldest of more than {limit} unauthenticated connections "
            "{where}", peer=conn.peer_name(), limit=limit, where=where,
        )
        conn.abort()

    def forget_unauthenticated(self, conn: Connection) -> None:
        """``conn`` authenticated or closed: it leaves the unauthenticated pool."""
        self.preauth.forget(conn)

    def lost(self, conn: Connection) -> None:
        """A two-way connection closed."""
        if self.on_lost is not None:
            try:
                self.on_lost(conn)
            except Exception:
                log.failure("on_lost callback failed")

    def buildProtocol(self, addr: Any) -> Connection:
        return Connection(self)

    def stopFactory(self) -> None:
        self.preauth.stop()


class Connection(TwistedProtocol):
    """One connection: parse, check the connection's rules, hand requests and responses on."""

    def __init__(self, factory: ConnectionFactory) -> None:
        self.factory = factory
        self.clock = factory.clock
        self.limits = factory.limits
        self.two_way = factory.two_way
        responders = factory.responders
        self.methods = responders.methods
        self.parser = Parser(
            codec.PEER if self.two_way else codec.REQUEST, responders.methods, whole=True
        )
        # Small requests may skip the event loop (not on a two-way link: its requests
        # and responses interleave, see _route).
        self._quick = not self.two_way
        dialled = factory.dialled
        #: Whether the peer is known: it authenticated, or this side dialled it.
        self.authenticated = dialled is not None
        #: What the peer may act as (docs/protocol.md, section 9): set by authentication.
        self.roles: frozenset[Role] = dialled if dialled is not None else _NO_ROLES
        #: The responders those roles may call, by method.
        self.allowed: Mapping[str, Responder] = responders.allowed(self.roles)
        #: The peer's own name for itself (the ``Client`` header of its auth).
        self.client_name = ""
        #: Over TLS, the identity in the peer's verified certificate (None until the
        #: first bytes after the handshake, and without TLS).
        self.identity: Identity | None = None
        #: Over TLS, until the peer's certificate has been checked: nothing is read and
        #: the auth deadline runs (it covers the handshake).
        self._tls_pending = factory.peer_check is not None
        self.answers = Answers(self, responders, self.two_way)
        self.calls: Calls | None = Calls(self) if self.two_way else None
        #: Set once the connection is closing or closed: nothing more is read or sent.
        self.closing = False
        self._timer: interfaces.IDelayedCall | None = None
        self._connected_at = 0.0
        self._activity = 0.0
        self._head_started: float | None = None
        self._counted_auth = False
        self._pumping = False  # _pump() is on the stack (see resume)
        #: The source address (set when connected), for the per-address pool.
        self.peer_host = ""
        self._preauth_bytes = 0
        # Accepted connections watch their unsent output with a push producer; a
        # producer of their own (a download) takes its place while it runs.
        self._gate: _OutputGate | None = _OutputGate(self) if dialled is None else None
        self._gate_on = False
        self._producer: Any = None
        #: The unsent output is above the transport's bound (the gate was paused).
        self.blocked = False
        self._blocked_since = 0.0

    @property
    def is_open(self) -> bool:
        """Connected and not closing: requests may still be sent."""
        return bool(self.connected) and not self.closing

    # -- connection life --------------------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        now = self.clock.seconds()
        self._connected_at = self._activity = now
        f.connections += 1
        try:
            self.peer_host = str(self.transport.getPeer().host)  # type: ignore[union-attr]
        except Exception:
            self.peer_host = "?"
        if hasattr(self.transport, "setTcpNoDelay"):
            # Replies are small and latency-bound: never hold one back for Nagle.
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        if self._gate is not None:
            self._hold_gate()
        limit = self.limits.max_connections
        if self.authenticated:
            set_read_size(self.transport, READ_SIZE)
            f.authenticated += 1
            self._counted_auth = True
            if f.authenticated > limit:
                self.fatal("busy", f"too many connections (limit {limit})")
                return
        else:
            # Small reads until authenticated: a peer that has not said who it is gets
            # no more than PREAUTH_MAX bytes of this process's memory.
            set_read_size(self.transport, PREAUTH_MAX)
            if f.authenticated >= limit:
                # No place for it once authenticated.
                self.fatal("busy", f"too many connections (limit {limit})")
                return
            f.admit_unauthenticated(self, self.peer_host)
            if self.closing:
                return
        self._arm()

    def _authenticated(self, roles: frozenset[Role]) -> bool:
        """The peer proved who it is: it leaves the unauthenticated pool for a place
        among the authenticated (False, and closed ``busy``, when there is none)."""
        self.roles = roles
        self.allowed = self.factory.responders.allowed(roles)
        if self.authenticated:
            return True
        f = self.factory
        self.authenticated = True
        f.forget_unauthenticated(self)
        set_read_size(self.transport, READ_SIZE)
        f.authenticated += 1
        self._counted_auth = True
        limit = self.limits.max_connections
        if f.authenticated > limit:
            self.fatal("busy", f"too many connections (limit {limit})")
            return False
        return True

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        f = self.factory
        f.connections -= 1
        f.forget_unauthenticated(self)
        if self._counted_auth:
            f.authenticated -= 1
            self._counted_auth = False
        self.closing = True
        self._gate_on = False
        self._producer = None
        self.blocked = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.answers.close()
        if self.calls is not None:
            self.calls.fail_all()
        if self.two_way:
            f.lost(self)

    # -- calling out --------------------------------------------------------------------

    def request(
        self,
        method: str,
        headers: Mapping[str, object] | None = None,
        payload: bytes | int = b"",
        *,
        sink: ResponseSink | None = None,
    ) -> Deferred[Response]:
        """Send a request to the peer; the Deferred fires with its :class:`Response`
        or fails with :class:`DsmlError` (its error code) or :class:`ConnectionLost`.

        With an int ``payload`` only the head goes out, promising that many bytes,
        which the caller then writes to ``self.transport`` itself (a payload relayed as
        it arrives).  With a ``sink`` a successful response's payload goes to the sink
        chunk by chunk instead of memory (:class:`~dsml.net.calling.ResponseSink`), and
        cancelling the Deferred cuts the connection.
        """
        if self.calls is None:
            raise RuntimeError("request() needs a two-way connection")
        return self.calls.request(method, headers, payload, sink)

    def request_file(
        self,
        method: str,
        headers: Mapping[str, object],
        source: IO[bytes],
        length: int,
        *,
        on_chunk: Callable[[bytes], object] | None = None,
        sink: ResponseSink | None = None,
    ) -> Deferred[Response]:
        """Send a request whose payload is the next ``length`` bytes of the open file
        ``source``, streamed by a pull producer as the transport takes them (flat
        memory, whatever the size); ``on_chunk`` sees each chunk as it goes (to hash it).

        Fails with ``io`` if the file ends early (the connection is then cut: its head
        promised the length).  A response that comes before the payload went out whole
        (a refusal) stops it and closes the connection.  Cancelling the Deferred cuts
        the connection: use a link of its own (:meth:`dsml.net.links.Links.open`).
        ``source`` stays the caller's to close, once the Deferred has fired.
        """
        if self.calls is None:
            raise RuntimeError("request_file() needs a two-way connection")
        return self.calls.request_file(method, headers, source, length, on_chunk, sink)

    # -- input ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        if self._tls_pending and not self._identify():
            return
        if not self.authenticated:
            self._preauth_bytes += len(data)
        head = None
        answers = self.answers
        if (
            self._quick
            and answers.state == IDLE
            and self.authenticated
            and not self.blocked
            and self.parser.idle
        ):
            # The common small request, whole in one read: decoded in one step and
            # answered without the event loop below (codec.quick_request).
            head = quick_request(data, self.methods)
        if head is not None:
            self._activity = self.clock.seconds()
            answers.quick(head)
        else:
            try:
                self.parser.feed(data)
            except ProtocolError:
                return
            self._activity = self.clock.seconds()
            self._pump()
        if not self.authenticated and self._preauth_bytes > PREAUTH_MAX and not self.closing:
            # Whatever it is, it is not an auth: buffer none of it.
            self.fatal(
                "auth-required",
                f"more than {PREAUTH_MAX} bytes before authenticating (send auth first)",
            )
            return
        if not self.closing:
            if answers.state == IDLE and self.parser.buffered and self._head_started is None:
                self._head_started = self._activity
            # Activity only moves deadlines later, and a timer that fires early re-arms
            # itself; only a partial head or a response arriving (deadlines earlier than
            # the idle one) or no timer at all needs work here: calling _arm on every
            # read measured about a tenth of the server's time on small requests.
            timer = self._timer
            if (
                timer is None
                or self._head_started is not None
                or not timer.active()
                or (self.calls is not None and self.calls.reading is not None)
            ):
                self._arm()

    def _pump(self) -> None:
        # Never nested: an answer can complete inside the loop (an already-fired
        # Deferred; Twisted's TCP transport pulls a small download to its end inside
        # registerProducer), and resume() then leaves the next request to the running
        # loop instead of recursing (one stack level per pipelined request).
        if self._pumping:
            return
        self._pumping = True
        try:
            self._pump_events()
        finally:
            self._pumping = False

    def _pump_events(self) -> None:
        parser = self.parser
        answers = self.answers
        two_way = self.two_way
        held = answers.held
        while not self.closing:
            if held and answers.state != WAITING and not answers.slots and not self.blocked:
                event: Any = answers.next_held()
            elif answers.state == WAITING and not two_way:
                return
            elif self.blocked and answers.state == IDLE and not two_way:
                return  # the gate's resumeProducing goes on (see _output_drained)
            else:
                try:
                    event = parser.next_event()
                except ProtocolError as e:
                    self.fatal(e.code, e.message, e.request_id)
                    return
                if event is NEED_DATA:
                    return
                if not self.authenticated:
                    if not self._may_come_first(event):
                        return
                elif two_way and self._route(event):
                    continue
            kind = type(event)
            if kind is Data:
                answers.on_data(event.data)
            elif event is END:
                answers.on_end()
            elif kind is Head:
                self._head_started = None
                if not self.authenticated and event.kind != AUTH:
                    self._refuse_unauthenticated(event)
                    return
                answers.on_head(event)
                body = event.body
                if body is not None and not self.closing:
                    # A small message that arrived whole: no Data or END follows.
                    if body:
                        answers.on_data(body)
                    answers.on_end()
            else:
                self._on_rejected(event)

    def _route(self, event: Any) -> bool:
        """On a two-way link, take responses and hold requests that must wait their turn.

        Responses to this side's requests are delivered at once, even while the peer's
        current request waits for its answer (its responder may be waiting on one of
        them).  A request that arrives meanwhile is held, with its payload, and run when
        its turn comes; past HELD_MAX held bytes the transport pauses.  Returns True
        when the event was taken here.
        """
        calls = self.calls
        assert calls is not None
        if calls.reading is not None:
            calls.on_event(event)
            return True
        answers = self.answers
        if type(event) is Head and event.kind in (codec.OK, codec.ERROR) and not answers.holding:
            calls.on_head(event)
            return True
        if not answers.must_hold(event):
            return False
        if answers.held_bytes > HELD_MAX and not answers.held_paused:
            answers.held_paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]
        return True

    def _identify(self) -> bool:
        """The handshake is done (bytes arrived through it): take the peer's identity
        from its certificate, or close.  An accepted connection gets the certificate's
        role; a dialled one keeps the roles of whom it dialled, if the peer is of a
        kind it expects."""
        from .tls import PeerRefused, roles_of

        check = self.factory.peer_check
        assert check is not None
        self._tls_pending = False
        try:
            ident = check.identify(self.transport)
        except PeerRefused as e:
            self.factory.peer_log.warn(
                "{peer}: refusing TLS peer: {why}", peer=self.peer_name(), why=str(e)
            )
            if self.factory.dialled is not None:
                self.abort()
            else:
                self.fatal("forbidden", f"certificate refused: {e}")
            return False
        self.identity = ident
        self.client_name = str(ident)
        if not self.authenticated:
            return self._authenticated(roles_of(ident))
        return True

    def _may_come_first(self, event: Any) -> bool:
        """Before authentication only an ``auth`` request (or its rejection, which says
        what is wrong with it) is taken; anything else, a response frame included, is
        answered ``auth-required`` and closes the connection, its payload unread."""
        kind = type(event)
        if (kind is Head and event.kind == AUTH) or (kind is Rejected and event.method == AUTH):
            return True
        if kind is Head:
            self._refuse_unauthenticated(event)
        else:
            self.fatal("auth-required", "authenticate first (send auth with Token)",
                       getattr(event, "id", 0))
        return False

    def _refuse_unauthenticated(self, head: Head) -> None:
        self.answers.head = head
        self.answers.state = RECEIVING
        self.fatal("auth-required", "authenticate first (send auth with Token)", head.id)

    def _on_rejected(self, event: Rejected) -> None:
        if not self.authenticated:
            if event.method == AUTH:  # a malformed auth: say what is wrong with it
                self.fatal(event.code, event.message, event.id)
            else:
                self.fatal("auth-required", "authenticate first (send auth with Token)", event.id)
            return
        self.answers.send_error(event.id, event.code, event.message)

    def authenticate(self, head: Head) -> None:
        """Answer an ``auth`` request: the roles it grants, or auth-failed and close.

        Over TLS the certificate already said who the peer is: ``auth`` is answered
        without looking at the token and changes nothing (a client may still send it).
        """
        if self.identity is not None:
            self.answers.send_reply(head.id, Reply())
            return
        check = self.factory.authenticate
        # A dialled link has no authenticator: the peer it dialled keeps its roles.
        roles = check(head) if check is not None else self.roles
        if roles is None:
            self.factory.peer_log.warn("{peer}: wrong token", peer=self.peer_name())
            self.fatal("auth-failed", "wrong token", head.id)
            return
        if not self.authenticated:
            self.client_name = head.headers.get("client", "")
        if not self._authenticated(roles):
            return
        self.answers.send_reply(head.id, Reply())

    # -- after an answer, and closing ---------------------------------------------------

    def resume(self) -> None:
        """The current request is answered: go on with pipelined bytes already buffered."""
        if self.closing or self.answers.state == WAITING or self.blocked:
            return  # (a blocked connection goes on when its output drains)
        self._activity = self.clock.seconds()
        self.answers.held_paused = False
        self.transport.resumeProducing()  # type: ignore[union-attr]
        if self._pumping:
            return  # the running _pump() loop goes on with the next request
        self._pump()
        if not self.closing:
            # A partial head that arrived while the answer was pending gets the header
            # deadline, as in dataReceived.
            if self.answers.state == IDLE and self.parser.buffered and self._head_started is None:
                self._head_started = self._activity
            self._arm()

    def fatal(self, code: str, message: str, req_id: int = 0) -> None:
        """Answer once and close: the byte stream (or the peer) cannot be trusted."""
        if self.closing:
            return
        if self._tls_pending:
            # No TLS session to answer in yet; a TLS close would wait for the
            # handshake, which may never finish: cut.
            self.factory.peer_log.warn(
                "{peer}: closing before the TLS handshake ended: {code}: {message}",
                peer=self.peer_name(), code=code, message=message,
            )
            self.abort()
            return
        self.factory.peer_log.warn(
            "{peer}: closing: {code}: {message}", peer=self.peer_name(), code=code, message=message
        )
        self.closing = True
        self.answers.abort_call()
        self.transport.write(codec.encode_error(req_id, code, message))  # type: ignore[union-attr]
        self.lose()

    def lose(self) -> None:
        """Close once the output is written (the gate let go first: a transport holding
        a producer waits for it before it closes)."""
        self.closing = True
        self.factory.forget_unauthenticated(self)
        self._release_gate()
        self.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self) -> None:
        """Cut the connection at once, without a word (the framing cannot be kept)."""
        self.closing = True
        self.factory.forget_unauthenticated(self)
        self.transport.abortConnection()  # type: ignore[union-attr]

    # -- output: the gate and the producers ---------------------------------------------

    def _hold_gate(self) -> None:
        gate = self._gate
        if gate is None or self._gate_on or self._producer is not None or self.closing:
            return
        self._gate_on = True
        self.transport.registerProducer(gate, True)  # type: ignore[union-attr]

    def _release_gate(self) -> None:
        if self._gate_on:
            self._gate_on = False
            self.blocked = False
            self.transport.unregisterProducer()  # type: ignore[union-attr]

    def start_producer(self, producer: Any, streaming: bool = False) -> None:
        """Register ``producer`` (a download, a streamed payload) with the transport in
        the gate's place; it paces its own output until :meth:`stop_producer`."""
        self._release_gate()
        self._producer = producer
        self.transport.registerProducer(producer, streaming)  # type: ignore[union-attr]

    def stop_producer(self, producer: Any) -> None:
        """``producer`` is done: unregister it (if it is the one registered) and put the
        gate back."""
        if self._producer is not producer:
            return
        self._producer = None
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        if not self.closing:
            self._hold_gate()

    def _output_full(self) -> None:
        """The transport's unsent output went above its bound: answer nothing more
        (and, one-way, read nothing more) until it drains."""
        if self.closing:
            return
        self.blocked = True
        self._blocked_since = self.clock.seconds()
        if not self.two_way:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self._arm()

    def _output_drained(self) -> None:
        """The transport sent what it held: go on with a download that waited for it,
        or with the next requests."""
        if self.closing or getattr(self.transport, "disconnecting", False):
            # Closing: a transport holding a producer would wait for it to close.
            self._release_gate()
            return
        if not self.blocked:
            return
        self.blocked = False
        answers = self.answers
        if answers.pending_body is not None:
            answers.start_body()
            return
        if answers.state == WAITING:
            return  # the answer pending resumes the connection when it is sent
        self.resume()

    def peer_name(self) -> str:
        """``host:port`` of the peer, for logs."""
        try:
            p = self.transport.getPeer()  # type: ignore[union-attr]
            return f"{p.host}:{p.port}"
        except Exception:
            return "peer"

    # -- deadlines --------------------------------------------------------------------

    def _deadline(self) -> tuple[float, str] | None:
        lim = self.limits
        if not self.authenticated or self._tls_pending:
            # Over TLS this covers the handshake, on dialled links too.
            return self._connected_at + lim.auth_timeout, "authentication"
        if self.blocked:
            # The peer does not take what it was sent: its output must drain in time.
            return self._blocked_since + lim.payload_timeout, "output"
        state = self.answers.state
        if state == IDLE:
            if self._head_started is not None:
                return self._head_started + lim.head_timeout, "header block"
            calls = self.calls
            if calls is not None and calls.busy:
                # Not idle while this side waits for its own answers: a response whose
                # payload is arriving must keep coming; one not begun yet (a pipeline
                # upload being written, a held ``wait``) is the peer's to bound.
                if calls.reading is not None:
                    return self._activity + lim.payload_timeout, "response"
                return None
            return self._activity + lim.idle_timeout, "idle"
        if state == RECEIVING:
            when = self._activity + lim.payload_timeout
            head = self.answers.head
            if head is not None and head.length and lim.payload_min_rate > 0:
                # However it trickles, a payload must be whole in a bounded time.
                total = (
                    self.answers.started
                    + lim.payload_total_timeout
                    + head.length / lim.payload_min_rate
                )
                if total < when:
                    return total, "whole payload"
            return when, "payload"
        body = self.answers.body
        if body is not None:
            return body.progress + lim.payload_timeout, "download"
        return None

    def _arm(self) -> None:
        """Make sure a timer fires no later than the current deadline.

        Deadlines move forward with activity; the timer is not moved on every byte but
        re-armed when it fires early (cheap on the hot path).
        """
        d = self._deadline()
        if d is None:
            return
        when = d[0]
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return
            timer.cancel()
        self._timer = self.clock.callLater(max(0.0, when - self.clock.seconds()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closing:
            return
        d = self._deadline()
        if d is None:
            return
        when, what = d
        if self.clock.seconds() < when:
            self._arm()
            return
        if what == "idle":
            self.factory.peer_log.info("{peer}: closing idle connection", peer=self.peer_name())
            self.lose()
            return
        limit = {
            "authentication": self.limits.auth_timeout,
            "header block": self.limits.head_timeout,
        }.get(what, self.limits.payload_timeout)
        message = f"{what} not complete within {limit:g} s"
        if what == "whole payload":
            message = f"payload not whole within {when - self.answers.started:.0f} s"
        if what in ("download", "response", "output"):
            self.factory.peer_log.warn(
                "{peer}: closing: {message}", peer=self.peer_name(), message=message
            )
            self.abort()
            return
        head = self.answers.head
        self.fatal("timeout", message, head.id if head else 0)


@implementer(interfaces.IPushProducer)
class _OutputGate:
    """Registered with an accepted connection's transport as a streaming producer: the
    transport pauses it when its unsent output goes above its bound and resumes it when
    it has sent it all, and the connection answers (and reads) accordingly."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def pauseProducing(self) -> None:  # noqa: N802 - Twisted's name
        """Too much unsent output."""
        if self.conn._gate_on:
            self.conn._output_full()

    def resumeProducing(self) -> None:  # noqa: N802 - Twisted's name
        """The output drained."""
        if self.conn._gate_on:
            self.conn._output_drained()

    def stopProducing(self) -> None:  # noqa: N802 - Twisted's name
        """The connection is gone (connectionLost follows)."""
