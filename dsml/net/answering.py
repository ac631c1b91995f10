"""Answering requests in order: one connection's requests, their responders, their replies.

:class:`Answers` takes the request events the connection parsed, finds each request's
responder among those the connection's roles allow, and sends the answers strictly in
request order (docs/protocol.md, sections 1 and 12):

- A request is answered before the next one starts: while an answer is pending, reading
  pauses (on a two-way link reading goes on, for the responses to this side's own
  requests, and the peer's next requests are held here, their bytes bounded by HELD_MAX).
- Methods a responder marks ``pipelined`` may overlap on a two-way link: each gets a slot,
  answered in order as the slots fill.
- A download is a pull producer that reads the file as the peer takes the bytes.
- Every answer counts against the connection's unsent output: while it is above the
  transport's bound (the connection's output gate is paused) the next request waits, and
  a download's payload starts only once its head has gone out.
"""

from __future__ import annotations

from collections import deque
from typing import IO, TYPE_CHECKING, Any

from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import DsmlError
from ..protocol import codec
from ..protocol.codec import Data, Head
from ..protocol.limits import MAX_SKIP
from .responders import AUTH, Call, Reply, Responder, Responders
from .twisted_private import send_now, set_read_size

if TYPE_CHECKING:
    from .connection import Connection

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

#: Bytes of held requests on a two-way link (see :meth:`Answers.must_wait`) before
#: reading pauses.
HELD_MAX = 1024 * 1024

# Answering states.
IDLE = 0  # between requests (possibly part of the next head buffered)
RECEIVING = 1  # a head was accepted; its payload is arriving
WAITING = 2  # the payload is complete; the answer is not yet fully written


class Answers:
    """The requests of one connection, answered in order by the node's responders."""

    def __init__(self, conn: Connection, responders: Responders, two_way: bool) -> None:
        self.conn = conn
        self.responders = responders
        self.two_way = two_way
        self.state = IDLE
        #: The request being received or answered (its id goes into a timeout error).
        self.head: Head | None = None
        self._responder: Responder | None = None
        self._call: Call | None = None
        self._chunks: list[bytes] = []
        self._failed: DsmlError | None = None  # refused, or a streamed call that failed
        #: The download being streamed, if any (its progress is a deadline).
        self.body: _BodyProducer | None = None
        #: A download whose head is written, waiting for the output to drain.
        self.pending_body: _BodyProducer | None = None
        #: When the current request's head arrived (its payload's deadline).
        self.started = 0.0
        # Answers owed, in request order: [request id, encoded response or None].
        self.slots: deque[list[Any]] = deque()
        self._pipelined = responders.pipelined if two_way else frozenset()
        # Two-way links: the peer's requests (events) that arrived while an earlier one
        # was being answered, run when their turn comes.
        self.held: deque[Any] = deque()
        self.holding = False  # inside a held request's payload
        self.held_bytes = 0
        self.held_paused = False

    # -- holding requests on a two-way link ---------------------------------------------

    def must_hold(self, event: Any) -> bool:
        """Whether the peer's request ``event`` (or its payload) must wait its turn; if so
        it is held.  A request waits while an answer is pending, behind held ones, and
        (unless its method is pipelined) while answers are owed."""
        if self.holding:
            self.held.append(event)
            if type(event) is Data:
                self.held_bytes += len(event.data)
            elif event is codec.END:
                self.holding = False
            return True
        kind = type(event)
        if (
            self.state == WAITING
            or self.held
            or self.conn.blocked
            or (self.slots and kind is Head and event.kind not in self._pipelined)
        ):
            self.held.append(event)
            if kind is Data:
                self.held_bytes += len(event.data)
            self.holding = kind is Head and event.body is None
            return True
        return False

    def next_held(self) -> Any:
        """The oldest held event, now that its turn has come."""
        event = self.held.popleft()
        if type(event) is Data:
            self.held_bytes -= len(event.data)
        return event

    # -- requests in --------------------------------------------------------------------

    def quick(self, head: Head) -> None:
        """A whole small request decoded in one step (codec.quick_request): answer it."""
        r = self.conn.allowed.get(head.kind)
        self.head = head
        self.state = RECEIVING
        if r is None:
            e = self.responders.refusal(head.kind, self.conn.roles)
            self._send(codec.encode_error(head.id, e.code, e.message))
            return
        self._responder = r
        self._dispatch(head, head.body)  # type: ignore[arg-type]

    def on_head(self, head: Head) -> None:
        """A request head was accepted; its payload (if any) follows."""
        self.head = head
        self.state = RECEIVING
        self.started = self.conn._activity
        self._chunks = []
        self._failed = None
        self._responder = None
        if head.kind == AUTH:
            return
        conn = self.conn
        r = conn.allowed.get(head.kind)
        if r is None:
            e = self.responders.refusal(head.kind, conn.roles)
            if head.length > MAX_SKIP:  # not worth draining (as for a rejected request)
                conn.fatal(e.code, e.message, head.id)
                return
            self._failed = e
            return
        self._responder = r
        if r.spec.streamed:
            if head.length > READ_SIZE_LARGE:
                set_read_size(conn.transport, READ_SIZE_LARGE)
            try:
                self._call = r.fn(head, conn)
            except DsmlError as e:
                self._failed = e
            except OSError as e:
                self._failed = self._io_error(e, head.kind)
            except Exception:
                log.failure("opening {method} failed", method=head.kind)
                self._failed = DsmlError("internal error opening the request")

    def _io_error(self, e: OSError, method: str) -> DsmlError:
        return io_error(e, method)

    def on_data(self, chunk: bytes) -> None:
        """Payload bytes of the current request."""
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
            method = self.head.kind if self.head is not None else "?"
            if isinstance(e, DsmlError):
                self._failed = e
            elif isinstance(e, OSError):
                self._failed = self._io_error(e, method)
            else:
                self._failed = DsmlError("internal error")
                log.failure("streaming {method} failed", method=method)

    def on_end(self) -> None:
        """The current request's payload is complete: answer it."""
        head = self.head
        assert head is not None
        if self._failed is not None:
            self._send(codec.encode_error(head.id, self._failed.code, self._failed.message))
            return
        if head.kind == AUTH:
            self.conn.authenticate(head)
            return
        if self._call is not None:
            call, self._call = self._call, None
            set_read_size(self.conn.transport, READ_SIZE)
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
                result = self._responder.fn(head, payload, self.conn)  # type: ignore[union-attr]
        except DsmlError as e:
            self._send(codec.encode_error(head.id, e.code, e.message))
            return
        except OSError as e:
            err = self._io_error(e, head.kind)
            self._send(codec.encode_error(head.id, err.code, err.message))
            return
        except Exception:
            log.failure("handling {method} failed", method=head.kind)
            self._send(codec.encode_error(head.id, "internal", "internal error"))
            return
        if type(result) is bytes:  # the responder encoded it (codec.ResponseShape)
            self._send(result)
        elif isinstance(result, Deferred) and head.kind in self._pipelined:
            # Answered later, in its turn; the next request goes on meanwhile.
            slot = [head.id, None]
            self.slots.append(slot)
            result.addCallbacks(self._slot_done, self._slot_failed, (slot,), None, (slot,))
            result.addErrback(self._bug, head.kind)
            self.state = IDLE
            self.head = None
        elif isinstance(result, Deferred):
            self._wait()
            result.addCallbacks(self._reply_async, self._error_async, (head.id,), None, (head.id,))
            result.addErrback(self._bug, head.kind)
        else:
            self.send_reply(head.id, result)  # type: ignore[arg-type]

    # -- answers out --------------------------------------------------------------------

    def send_error(self, req_id: int, code: str, message: str) -> None:
        """Answer request ``req_id`` with an error (in its turn); the connection stays."""
        self._send(codec.encode_error(req_id, code, message))

    def _send(self, data: bytes) -> None:
        if data:
            if self.slots:  # earlier answers are still owed: this one waits its turn
                self.slots.append([None, data])
            else:
                send_now(self.conn.transport, data)
        self.state = IDLE
        self.head = None

    def send_reply(self, req_id: int, reply: Reply) -> None:
        """Answer request ``req_id`` with ``reply`` (streaming its body, if it has one)."""
        if reply.body is None:
            self._send(codec.encode_response(True, req_id, reply.headers, reply.payload))
            return
        transport = self.conn.transport
        transport.write(  # type: ignore[union-attr]
            codec.encode_response(True, req_id, reply.headers, reply.body_length)
        )
        if reply.body_length == 0:
            reply.body.close()
            self._send(b"")
            return
        self._wait()
        body = _BodyProducer(self, reply.body, reply.body_length)
        if self.conn.blocked:
            # The head filled the output: the payload follows once it drained.
            self.pending_body = body
            return
        self.body = body
        self.conn.start_producer(body)

    def start_body(self) -> None:
        """The output drained: stream the download that waited for it."""
        body, self.pending_body = self.pending_body, None
        if body is not None:
            body.progress = self.conn.clock.seconds()
            self.body = body
            self.conn.start_producer(body)

    def _wait(self) -> None:
        """Stop reading until the current request is answered (no unbounded buffering).

        A two-way link keeps reading (responses to its own requests must get through) and
        holds the peer's next request instead (see :meth:`must_hold`).
        """
        self.state = WAITING
        if not self.two_way:
            self.conn.transport.pauseProducing()  # type: ignore[union-attr]

    def _slot_done(self, reply: Reply, slot: list[Any]) -> None:
        if self.conn.closing:
            return
        if reply.body is not None:  # a pipelined method answers with a payload only
            reply.body.close()
            raise RuntimeError("a pipelined method answered with a body")
        slot[1] = codec.encode_response(True, slot[0], reply.headers, reply.payload)
        self._flush_slots()

    def _slot_failed(self, failure: Failure, slot: list[Any]) -> None:
        if self.conn.closing:
            return
        slot[1] = _failure_response(failure, slot[0])
        self._flush_slots()

    def _flush_slots(self) -> None:
        """Send the answers that are ready, in request order; then go on with held ones."""
        slots = self.slots
        transport = self.conn.transport
        while slots and slots[0][1] is not None:
            send_now(transport, slots.popleft()[1])
        if not slots and self.held:
            self.conn.resume()

    def _reply_async(self, reply: Reply, req_id: int) -> None:
        if self.conn.closing:
            if reply.body is not None:
                reply.body.close()
            return
        self.send_reply(req_id, reply)
        self.conn.resume()

    def _error_async(self, failure: Failure, req_id: int) -> None:
        if self.conn.closing:
            return
        self._send(_failure_response(failure, req_id))
        self.conn.resume()

    def _bug(self, failure: Failure, method: str) -> None:
        log.failure("bug while answering {method}", failure, method=method)
        if not self.conn.closing:
            self.conn.transport.abortConnection()  # type: ignore[union-attr]

    def body_done(self) -> None:
        """The download went out whole."""
        body, self.body = self.body, None
        self.conn.stop_producer(body)
        self._send(b"")
        self.conn.resume()

    def body_failed(self, why: str) -> None:
        """The download cannot be finished: the head promised its length, so the
        connection is cut (nothing else would keep the framing)."""
        log.error("{peer}: download aborted: {why}", peer=self.conn.peer_name(), why=why)
        body, self.body = self.body, None
        self.conn.stop_producer(body)
        self.conn.abort()

    def close(self) -> None:
        """The connection is gone: abort a streamed request, close a download."""
        if self._call is not None:
            call, self._call = self._call, None
            call.abort()
        for body in (self.body, self.pending_body):
            if body is not None:
                body.close()
        self.body = self.pending_body = None
        self.slots.clear()

    def abort_call(self) -> None:
        """A fatal error: the streamed request in progress will not complete."""
        if self._call is not None:
            call, self._call = self._call, None
            call.abort()


def io_error(e: OSError, method: str) -> DsmlError:
    """The answer to a request whose disk (or other system) call failed: EIO, ENOSPC,
    EROFS are the machine's faults, not bugs: ``io-error`` and one warning line, no
    traceback (a bug's own OSError is told apart by its message in that line)."""
    log.warn("{method}: a system call failed: {why}", method=method, why=e)
    return DsmlError(f"the server's disk or system failed: {e.strerror or e}", "io-error")


def _failure_response(failure: Failure, req_id: int) -> bytes:
    """The error response for a request whose responder failed (logged unless a DsmlError)."""
    if failure.check(DsmlError):
        e = failure.value
        return codec.encode_error(req_id, e.code, e.message)  # type: ignore[union-attr]
    if failure.check(OSError):
        err = io_error(failure.value, "request")  # type: ignore[arg-type]
        return codec.encode_error(req_id, err.code, err.message)
    log.failure("request failed", failure)
    return codec.encode_error(req_id, "internal", "internal error")


@implementer(interfaces.IPullProducer)
class _BodyProducer:
    """Streams ``length`` bytes of a file to the transport as the peer takes them."""

    def __init__(self, answers: Answers, body: IO[bytes], length: int) -> None:
        self.answers = answers
        self.clock = answers.conn.clock
        self.body: IO[bytes] | None = body
        self.remaining = length
        self.progress = self.clock.seconds()

    def resumeProducing(self) -> None:
        if self.body is None:
            return
        self.progress = self.clock.seconds()
        chunk = self.body.read(min(BODY_CHUNK, self.remaining))
        if not chunk:
            self.close()
            self.answers.body_failed(f"file ended {self.remaining} bytes early")
            return
        self.remaining -= len(chunk)
        self.answers.conn.transport.write(chunk)  # type: ignore[union-attr]
        if self.remaining == 0:
            self.close()
            self.answers.body_done()

    def stopProducing(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (at the end, or when the connection goes)."""
        if self.body is not None:
            self.body.close()
            self.body = None
