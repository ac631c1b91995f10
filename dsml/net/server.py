"""The Twisted server side of the dsml protocol.

:class:`ServerProtocol` is thin: it feeds bytes to the sans-IO parser, enforces the
connection rules (authenticate first, deadlines, connection limits, one request at a time
in order) and hands each request to a :class:`Handler`, which decides.  Replies are either
small (headers plus bytes) or a file streamed with a pull producer, so a download of any
size keeps memory flat and honours the peer's pace.
"""

from __future__ import annotations

import hmac
from collections import deque
from collections.abc import Callable
from typing import IO, Any, Protocol, runtime_checkable

import attrs
from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import DsmlError
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
from ..protocol.methods import MethodTable

log = Logger()

#: Bytes read from a file per producer step on a download.  Twisted writes at most
#: 128 KiB per reactor pass; 16 KiB chunks (FileSender's) halve throughput, 1 MiB does not.
BODY_CHUNK = 1024 * 1024

#: Bytes asked of the socket per read between large uploads (Twisted's default).
READ_SIZE = 64 * 1024

#: Bytes asked per read while a large streamed payload arrives: fewer trips through
#: the reactor and the parser per GiB.  Not the default, because asking for 1 MiB on
#: every small request costs a large allocation per read.
READ_SIZE_LARGE = 1024 * 1024


@attrs.frozen
class ServerLimits:
    """Connection rules of one server (the ``limits`` section of the config)."""

    max_connections: int = 1024
    max_unauthenticated: int = 64
    auth_timeout: float = 10.0
    head_timeout: float = 10.0
    idle_timeout: float = 60.0
    payload_timeout: float = 60.0


#: Bytes of held peer requests (see ServerProtocol._route_peer_event) before reading
#: pauses.
HELD_MAX = 1024 * 1024

#: Largest response payload a peer link accepts for its own requests (replies there
#: are small: acknowledgements, listings).
RESPONSE_MAX = 64 * 1024 * 1024


class ConnectionLost(DsmlError):
    """The link closed before the peer answered."""

    code = "connection"


@attrs.frozen
class Response:
    """A successful answer to a request sent over a peer link."""

    headers: dict[str, str]
    payload: bytes = b""


@attrs.define
class _Pending:
    deferred: Deferred[Response] | None
    head: Head | None = None
    chunks: list[bytes] = attrs.field(factory=list)


@attrs.define
class Reply:
    """A successful answer: headers, then ``payload`` or ``body_length`` bytes of ``body``."""

    headers: dict[str, object] = attrs.field(factory=dict)
    payload: bytes = b""
    body: IO[bytes] | None = None
    body_length: int = 0


class Call(Protocol):
    """A request whose payload the handler takes chunk by chunk (a file upload)."""

    def data(self, chunk: bytes) -> None:
        """Take the next payload chunk; raise DsmlError to fail the request."""

    def end(self) -> Reply | Deferred[Reply]:
        """The payload is complete: answer, now or later."""

    def abort(self) -> None:
        """The request will not complete (peer gone, error): clean up, leave nothing."""


@runtime_checkable
class Handler(Protocol):
    """What a server does with requests; one instance serves every connection."""

    methods: MethodTable

    def handle(
        self, head: Head, payload: bytes, conn: ServerProtocol
    ) -> Reply | bytes | Deferred[Reply]:
        """Answer a request whose payload arrived whole (methods not marked streamed).

        The answer is a Reply, later (a Deferred), or the whole response already
        encoded (bytes, made with codec.ResponseShape: for the hottest methods).
        """

    def open(self, head: Head, conn: ServerProtocol) -> Call:
        """Start a streamed request (methods marked streamed)."""


# Connection states.
_IDLE = 0  # between requests (possibly part of the next head buffered)
_RECEIVING = 1  # a head was accepted; its payload is arriving
_WAITING = 2  # the payload is complete; the reply is not yet fully written


class ServerProtocol(TwistedProtocol):
    """One server connection: parse, check, dispatch, answer in order."""

    def __init__(self, factory: ServerFactory) -> None:
        self.factory = factory
        self.clock = factory.clock
        self.handler = factory.handler
        self.limits = factory.limits
        self.peer = factory.peer
        self.parser = Parser(
            codec.PEER if self.peer else codec.REQUEST, factory.handler.methods, whole=True
        )
        # Small requests may skip the event loop (not on a peer link: its requests
        # and responses interleave, see _route_peer_event).
        self._quick = not self.peer
        # The side that opened a peer link trusts requests coming back over it.
        self.authenticated = factory.initiator
        self.client_name = ""
        self._state = _IDLE
        self._head: Head | None = None
        self._call: Call | None = None
        self._chunks: list[bytes] = []
        self._failed: DsmlError | None = None  # a streamed call that failed mid-payload
        self._body: _BodyProducer | None = None
        self._timer: interfaces.IDelayedCall | None = None
        self._connected_at = 0.0
        self._activity = 0.0
        self._head_started: float | None = None
        self._closing = False
        self._counted_unauth = False
        self._pumping = False  # _pump() is on the stack (see _resume)
        # Peer links: requests this side sent, by id, and the response being read.
        self._next_out_id = 1
        self._calls: dict[int, _Pending] = {}
        self._response: _Pending | None = None
        # Peer requests (events) that arrived while the previous one was being answered.
        self._held: deque[Any] = deque()
        self._holding = False  # inside a held request's payload
        self._held_bytes = 0
        self._held_paused = False
        # Peer links: methods the handler lets overlap (``handler.pipelined``), and the
        # answers owed, in request order: [request id, encoded response or None].
        self._pipelined: frozenset[str] = (
            frozenset(getattr(factory.handler, "pipelined", ())) if self.peer else frozenset()
        )
        self._slots: deque[list[Any]] = deque()

    # -- connection life --------------------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        now = self.clock.seconds()
        self._connected_at = self._activity = now
        f.connections += 1
        if not self.authenticated:
            f.unauthenticated += 1
            self._counted_unauth = True
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = READ_SIZE  # type: ignore[union-attr]
        if hasattr(self.transport, "setTcpNoDelay"):
            # Replies are small and latency-bound: never hold one back for Nagle.
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        if f.connections > self.limits.max_connections:
            self._fatal("busy", f"too many connections (limit {self.limits.max_connections})")
            return
        if f.unauthenticated > self.limits.max_unauthenticated:
            self._fatal(
                "busy",
                f"too many unauthenticated connections (limit {self.limits.max_unauthenticated})",
            )
            return
        self._arm()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        f = self.factory
        f.connections -= 1
        if self._counted_unauth:
            f.unauthenticated -= 1
            self._counted_unauth = False
        self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._call is not None:
            call, self._call = self._call, None
            call.abort()
        if self._body is not None:
            self._body.close()
            self._body = None
        self._slots.clear()
        calls, self._calls = self._calls, {}
        for pending in calls.values():
            pending.deferred.errback(ConnectionLost("connection lost before the reply"))
        if self.peer:
            self.factory.lost(self)

    # -- input ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        head = None
        if self._quick and self._state == _IDLE and self.authenticated and self.parser.idle:
            # The common small request, whole in one read: decoded in one step and
            # answered without the event loop below (codec.quick_request).
            head = quick_request(data, self.handler.methods)
        if head is not None:
            self._activity = self.clock.seconds()
            self._head = head
            self._state = _RECEIVING
            self._dispatch(head, head.body)  # type: ignore[arg-type]
        else:
            try:
                self.parser.feed(data)
            except ProtocolError:
                return
            self._activity = self.clock.seconds()
            self._pump()
        if not self._closing:
            if self._state == _IDLE and self.parser.buffered and self._head_started is None:
                self._head_started = self._activity
            # Activity only moves deadlines later, and a timer that fires early re-arms
            # itself; only a partial head (a 10 s deadline, earlier than the idle one) or
            # no timer at all needs work here.  (Measured: calling _arm on every read
            # was about a tenth of the server's time on small requests.)
            timer = self._timer
            if timer is None or self._head_started is not None or not timer.active():
                self._arm()

    def _pump(self) -> None:
        # Fix (tests/test_server.py): never nest.  A reply can complete inside the loop
        # (an already-fired Deferred; Twisted's TCP transport pulls a small download to
        # the end inside registerProducer), and _resume() used to call _pump() again from
        # there: one stack level per pipelined request, RecursionError after a few
        # hundred small file_retrieves.  Now _resume() leaves it to the running loop.
        if self._pumping:
            return
        self._pumping = True
        try:
            self._pump_events()
        finally:
            self._pumping = False

    def _pump_events(self) -> None:
        parser = self.parser
        peer = self.peer
        held = self._held
        while not self._closing:
            if held and self._state != _WAITING and not self._slots:
                event: Any = held.popleft()
                if type(event) is Data:
                    self._held_bytes -= len(event.data)
            elif self._state == _WAITING and not peer:
                return
            else:
                try:
                    event = parser.next_event()
                except ProtocolError as e:
                    self._fatal(e.code, e.message, e.request_id)
                    return
                if event is NEED_DATA:
                    return
                if peer and self._route_peer_event(event):
                    continue
            kind = type(event)
            if kind is Data:
                self._on_data(event.data)
            elif event is END:
                self._on_end()
            elif kind is Head:
                self._on_head(event)
                body = event.body
                if body is not None and not self._closing:
                    # A small message that arrived whole: no Data or END follows.
                    if body:
                        self._on_data(body)
                    self._on_end()
            else:
                self._on_rejected(event)

    def _route_peer_event(self, event: Any) -> bool:
        """On a peer link, take responses and hold requests that must wait their turn.

        Responses to our own requests are delivered at once, even while the peer's
        current request waits for its answer (its handler may be waiting on one of
        them).  A request that arrives meanwhile is held, with its payload, and run when
        its turn comes; past HELD_MAX held bytes the transport pauses.  Returns True
        when the event was taken here.
        """
        if self._response is not None:
            self._on_response_event(event)
            return True
        kind = type(event)
        if self._holding:
            self._held.append(event)
            if kind is Data:
                self._held_bytes += len(event.data)
            elif event is END:
                self._holding = False
        elif kind is Head and event.kind in (codec.OK, codec.ERROR):
            self._on_response_head(event)
            if event.body is not None:
                if event.body:
                    self._on_response_event(Data(event.body))
                self._on_response_event(END)
            return True
        elif (
            self._state == _WAITING
            or self._held
            or (self._slots and kind is Head and event.kind not in self._pipelined)
        ):
            # (A request that may not overlap waits for every answer still owed.)
            self._held.append(event)
            if kind is Data:
                self._held_bytes += len(event.data)
            self._holding = kind is Head and event.body is None
        else:
            return False
        if self._held_bytes > HELD_MAX and not self._held_paused:
            self._held_paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]
        return True

    # -- peer links: requests from this side ------------------------------------------

    def request(
        self, method: str, headers: dict[str, object] | None = None, payload: bytes | int = b""
    ) -> Deferred[Response]:
        """Send a request to the peer; the Deferred fires with its :class:`Response`
        or fails with :class:`DsmlError` (its error code) or :class:`ConnectionLost`.

        With an int ``payload`` only the head goes out, promising that many bytes,
        which the caller then writes to ``self.transport`` itself (a streamed upload).
        """
        if not self.peer:
            raise RuntimeError("request() needs a peer link (ServerFactory(peer=True))")
        d: Deferred[Response] = Deferred()
        if self._closing or not self.connected:
            d.errback(ConnectionLost("connection is closed"))
            return d
        req_id = self._next_out_id
        self._next_out_id += 1
        self._calls[req_id] = _Pending(d)
        _write_now(self.transport, codec.encode_request(method, req_id, headers or {}, payload))
        return d

    def _on_response_head(self, head: Head) -> None:
        if head.length > RESPONSE_MAX:
            self._fatal("too-large", f"response of {head.length} bytes exceeds {RESPONSE_MAX}")
            return
        pending = self._calls.pop(head.id, None)
        if pending is None:
            log.warn("{peer}: response {id} answers no request", peer=self._peer(), id=head.id)
            pending = _Pending(None)
        pending.head = head
        self._response = pending

    def _on_response_event(self, event: Any) -> None:
        pending = self._response
        assert pending is not None
        if type(event) is Data:
            pending.chunks.append(event.data)
            return
        # END: the only other event inside a response
        self._response = None
        d = pending.deferred
        if d is None:
            return
        head = pending.head
        assert head is not None
        payload = b"".join(pending.chunks)
        if head.ok:
            d.callback(Response(head.headers, payload))
        else:
            h = head.headers
            d.errback(DsmlError(h.get("message", "error"), h.get("code", "internal")))

    def _on_head(self, head: Head) -> None:
        self._head_started = None
        self._head = head
        self._state = _RECEIVING
        self._chunks = []
        self._failed = None
        if not self.authenticated and head.kind != "auth":
            self._fatal("auth-required", "authenticate first (send auth with Token)", head.id)
            return
        spec = self.handler.methods.get(head.kind)
        if spec is not None and spec.streamed:
            if head.length > READ_SIZE_LARGE and hasattr(self.transport, "bufferSize"):
                self.transport.bufferSize = READ_SIZE_LARGE  # type: ignore[union-attr]
            try:
                self._call = self.handler.open(head, self)
            except DsmlError as e:
                self._failed = e
            except Exception:
                log.failure("opening {method} failed", method=head.kind)
                self._failed = DsmlError("internal error opening the request")

    def _on_data(self, chunk: bytes) -> None:
        if self._failed is not None:
            return
        call = self._call
        if call is None:
            self._chunks.append(chunk)
            return
        try:
            call.data(chunk)
        except Exception as e:
            self._call = None
            call.abort()
            self._failed = e if isinstance(e, DsmlError) else DsmlError("internal error")
            if not isinstance(e, DsmlError):
                log.failure("streaming {method} failed", method=self._head and self._head.kind)

    def _on_end(self) -> None:
        head = self._head
        assert head is not None
        if self._failed is not None:
            self._finish_error(head.id, self._failed.code, self._failed.message)
            return
        if head.kind == "auth":
            self._authenticate(head)
            return
        if self._call is not None:
            call, self._call = self._call, None
            if hasattr(self.transport, "bufferSize"):
                self.transport.bufferSize = READ_SIZE  # type: ignore[union-attr]
            self._dispatch(head, None, call)
        else:
            chunks = self._chunks
            self._chunks = []
            self._dispatch(head, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _dispatch(self, head: Head, payload: bytes | None, call: Call | None = None) -> None:
        """Run a whole request (or end a streamed one) and answer it, now or later."""
        try:
            if call is not None:
                result = call.end()
            else:
                result = self.handler.handle(head, payload, self)  # type: ignore[arg-type]
        except DsmlError as e:
            self._finish_error(head.id, e.code, e.message)
            return
        except Exception:
            log.failure("handling {method} failed", method=head.kind)
            self._finish_error(head.id, "internal", "internal error")
            return
        if type(result) is bytes:  # the handler encoded it (codec.ResponseShape)
            self._send(result)
        elif isinstance(result, Deferred) and head.kind in self._pipelined:
            # Answered later, in its turn; the next request goes on meanwhile.
            slot = [head.id, None]
            self._slots.append(slot)
            result.addCallbacks(self._slot_done, self._slot_failed, (slot,), None, (slot,))
            result.addErrback(self._bug, head.kind)
            self._state = _IDLE
            self._head = None
        elif isinstance(result, Deferred):
            self._wait()
            result.addCallbacks(self._reply_async, self._error_async, (head.id,), None, (head.id,))
            result.addErrback(self._bug, head.kind)
        else:
            self._send_reply(head.id, result)  # type: ignore[arg-type]

    def _on_rejected(self, event: Rejected) -> None:
        if not self.authenticated:
            if event.method == "auth":  # a malformed auth: say what is wrong with it
                self._fatal(event.code, event.message, event.id)
            else:
                self._fatal("auth-required", "authenticate first (send auth with Token)", event.id)
            return
        self._send(codec.encode_error(event.id, event.code, event.message))

    def _authenticate(self, head: Head) -> None:
        expected = self.factory.token
        given = head.headers.get("token", "")
        if expected is not None and not hmac.compare_digest(
            given.encode("utf-8"), expected.encode("utf-8")
        ):
            log.warn("{peer}: wrong token", peer=self._peer())
            self._fatal("auth-failed", "wrong token", head.id)
            return
        if not self.authenticated:
            self.authenticated = True
            self.client_name = head.headers.get("client", "")
            if self._counted_unauth:
                self.factory.unauthenticated -= 1
                self._counted_unauth = False
        self._send_reply(head.id, Reply())

    # -- output -----------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if data:
            if self._slots:  # earlier answers are still owed: this one waits its turn
                self._slots.append([None, data])
            else:
                _write_now(self.transport, data)
        self._state = _IDLE
        self._head = None

    def _slot_done(self, reply: Reply, slot: list[Any]) -> None:
        if self._closing:
            return
        if reply.body is not None:  # a pipelined method answers with a payload only
            reply.body.close()
            raise RuntimeError("a pipelined method answered with a body")
        slot[1] = codec.encode_response(True, slot[0], reply.headers, reply.payload)
        self._flush_slots()

    def _slot_failed(self, failure: Failure, slot: list[Any]) -> None:
        if self._closing:
            return
        slot[1] = _failure_response(failure, slot[0])
        self._flush_slots()

    def _flush_slots(self) -> None:
        """Send the answers that are ready, in request order; then go on with held ones."""
        slots = self._slots
        while slots and slots[0][1] is not None:
            _write_now(self.transport, slots.popleft()[1])
        if not slots and self._held:
            self._resume()

    def _wait(self) -> None:
        """Stop reading until the current request is answered (no unbounded buffering).

        A peer link keeps reading (responses to our own requests must get through) and
        pauses only when the peer's next request arrives (see _pump_events).
        """
        self._state = _WAITING
        if not self.peer:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _send_reply(self, req_id: int, reply: Reply) -> None:
        if reply.body is None:
            self._send(codec.encode_response(True, req_id, reply.headers, reply.payload))
            return
        self.transport.write(  # type: ignore[union-attr]
            codec.encode_response(True, req_id, reply.headers, reply.body_length)
        )
        if reply.body_length == 0:
            reply.body.close()
            self._send(b"")
            return
        self._wait()
        self._body = _BodyProducer(self, reply.body, reply.body_length)
        self.transport.registerProducer(self._body, False)  # type: ignore[union-attr]

    def _finish_error(self, req_id: int, code: str, message: str) -> None:
        self._send(codec.encode_error(req_id, code, message))

    def _reply_async(self, reply: Reply, req_id: int) -> None:
        if self._closing:
            if reply.body is not None:
                reply.body.close()
            return
        self._send_reply(req_id, reply)
        self._resume()

    def _error_async(self, failure: Failure, req_id: int) -> None:
        if self._closing:
            return
        self._send(_failure_response(failure, req_id))
        self._resume()

    def _bug(self, failure: Failure, method: str) -> None:
        log.failure("bug while answering {method}", failure, method=method)
        if not self._closing:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _body_done(self) -> None:
        self._body = None
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self._send(b"")
        self._resume()

    def _body_failed(self, why: str) -> None:
        # The head promised body_length bytes; anything else breaks the framing.
        log.error("{peer}: download aborted: {why}", peer=self._peer(), why=why)
        self._body = None
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self._closing = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _resume(self) -> None:
        """The current request is answered: go on with pipelined bytes already buffered."""
        if self._closing or self._state == _WAITING:
            return
        self._activity = self.clock.seconds()
        self._held_paused = False
        self.transport.resumeProducing()  # type: ignore[union-attr]
        if self._pumping:
            return  # fix: the running _pump() loop goes on with the next request
        self._pump()
        if not self._closing:
            # Fix (tests/test_server.py): a partial head that arrived while the reply was
            # pending gets the header deadline, as in dataReceived (it got only idle_timeout).
            if self._state == _IDLE and self.parser.buffered and self._head_started is None:
                self._head_started = self._activity
            self._arm()

    def _fatal(self, code: str, message: str, req_id: int = 0) -> None:
        """Answer once and close: the byte stream (or the peer) cannot be trusted."""
        if self._closing:
            return
        log.warn(
            "{peer}: closing: {code}: {message}", peer=self._peer(), code=code, message=message
        )
        self._closing = True
        if self._call is not None:
            call, self._call = self._call, None
            call.abort()
        self.transport.write(codec.encode_error(req_id, code, message))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _peer(self) -> str:
        try:
            p = self.transport.getPeer()  # type: ignore[union-attr]
            return f"{p.host}:{p.port}"
        except Exception:
            return "peer"

    # -- deadlines --------------------------------------------------------------------

    def _deadline(self) -> tuple[float, str] | None:
        lim = self.limits
        if not self.authenticated:
            return self._connected_at + lim.auth_timeout, "authentication"
        if self._state == _IDLE:
            if self._head_started is not None:
                return self._head_started + lim.head_timeout, "header block"
            return self._activity + lim.idle_timeout, "idle"
        if self._state == _RECEIVING:
            return self._activity + lim.payload_timeout, "payload"
        if self._body is not None:
            return self._body.progress + lim.payload_timeout, "download"
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
        if self._closing:
            return
        d = self._deadline()
        if d is None:
            return
        when, what = d
        if self.clock.seconds() < when:
            self._arm()
            return
        if what == "idle":
            log.info("{peer}: closing idle connection", peer=self._peer())
            self._closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        limit = {
            "authentication": self.limits.auth_timeout,
            "header block": self.limits.head_timeout,
        }.get(what, self.limits.payload_timeout)
        message = f"{what} not complete within {limit:g} s"
        if what == "download":
            log.warn("{peer}: closing: {message}", peer=self._peer(), message=message)
            self._closing = True
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._fatal("timeout", message, self._head.id if self._head else 0)


def _failure_response(failure: Failure, req_id: int) -> bytes:
    """The error response for a request whose handler failed (logged unless a DsmlError)."""
    if failure.check(DsmlError):
        e = failure.value
        return codec.encode_error(req_id, e.code, e.message)  # type: ignore[union-attr]
    log.failure("request failed", failure)
    return codec.encode_error(req_id, "internal", "internal error")


def _write_now(transport: Any, data: bytes) -> None:
    """Write ``data``, sending it at once when nothing is queued before it.

    ``transport.write`` only queues: the bytes go out on the reactor's next pass, after
    one more epoll round and two epoll_ctl calls.  For a small reply to a request that
    is measured to cost about 40% of the server's CPU per round trip, so when the
    transport's buffers are empty we send straight away with its own ``writeSomeData``
    (what ``doWrite`` would call) and queue only what the socket did not take.
    Transports without those attributes (TLS, test transports) just ``write``.
    """
    try:
        idle = not transport.dataBuffer and not transport._tempDataBuffer
        write_some = transport.writeSomeData
    except AttributeError:
        idle = False
    if idle and transport.connected and not transport.disconnecting:
        sent = write_some(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


@implementer(interfaces.IPullProducer)
class _BodyProducer:
    """Streams ``length`` bytes of a file to the transport as the peer takes them."""

    def __init__(self, proto: ServerProtocol, body: IO[bytes], length: int) -> None:
        self.proto = proto
        self.body = body
        self.remaining = length
        self.progress = proto.clock.seconds()

    def resumeProducing(self) -> None:
        if self.body is None:
            return
        self.progress = self.proto.clock.seconds()
        chunk = self.body.read(min(BODY_CHUNK, self.remaining))
        if not chunk:
            self.close()
            self.proto._body_failed(f"file ended {self.remaining} bytes early")
            return
        self.remaining -= len(chunk)
        self.proto.transport.write(chunk)  # type: ignore[union-attr]
        if self.remaining == 0:
            self.close()
            self.proto._body_done()

    def stopProducing(self) -> None:
        self.close()

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None  # type: ignore[assignment]


class ServerFactory(Factory):
    """Builds a :class:`ServerProtocol` per connection; holds what they share.

    ``peer=True`` makes each connection a two-way link: either side may send requests
    (:meth:`ServerProtocol.request`).  ``initiator=True`` is for the side that opens
    such a link (a worker dialling the master): it authenticates itself with a request
    and trusts the requests that come back.  ``on_lost`` hears of each closed peer link.
    """

    def __init__(
        self,
        handler: Handler,
        clock: Any,
        token: str | None = None,
        limits: ServerLimits | None = None,
        peer: bool = False,
        initiator: bool = False,
        on_lost: Callable[[ServerProtocol], None] | None = None,
    ) -> None:
        self.handler = handler
        self.clock = clock
        self.token = token
        self.limits = limits or ServerLimits()
        self.peer = peer or initiator
        self.initiator = initiator
        self.on_lost = on_lost
        self.connections = 0
        self.unauthenticated = 0
        self.noisy = False  # no "Starting factory" line per outgoing link

    def lost(self, proto: ServerProtocol) -> None:
        """A peer link closed."""
        if self.on_lost is not None:
            try:
                self.on_lost(proto)
            except Exception:
                log.failure("on_lost callback failed")

    def buildProtocol(self, addr: Any) -> ServerProtocol:
        return ServerProtocol(self)


# A small convenience for handlers: map method names to bound methods.
HandleFn = Callable[[Head, bytes, ServerProtocol], "Reply | Deferred[Reply]"]
