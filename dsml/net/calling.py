"""Calling out: the requests one side sends over a two-way link, and their responses.

On a two-way link (a worker's link to the master, a link between workers, a client's
link to any server) either side may send requests (docs/protocol.md, section 12).
:class:`Calls` numbers this side's requests, remembers each one's Deferred, and reads the
responses the connection routes to it (a message whose start line is ``OK``/``ERROR``),
matching them by id.

Payloads of any size move in flat memory both ways:

- :meth:`Calls.request_file` streams a request's payload from an open file through a pull
  producer (:class:`_FilePayload`): the transport asks for the next chunk only when it has
  sent the last one, so a slow peer slows the reading and never fills memory.  The
  connection's other requests wait behind it (their bytes are queued, then sent).
- A request given a :class:`ResponseSink` has its response payload handed to the sink
  chunk by chunk (the head first, with its headers and length), never joined in memory;
  without one a payload is buffered whole, up to :data:`RESPONSE_MAX`.

If the connection closes before a response is complete, its Deferred fails with
:class:`~dsml.errors.ConnectionLost` and its sink is told to ``abort`` (a file sink
removes what it wrote).  Cancelling the Deferred of a streamed request cuts the
connection (the framing promised the rest of the bytes), so such a request wants a link of
its own (:meth:`dsml.net.links.Links.open`); so does a response streamed to a sink that
may fail, since the rest of its payload cannot be skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import ConnectionLost, DsmlError
from ..protocol import codec
from ..protocol.codec import Data, Head
from .answering import READ_SIZE, READ_SIZE_LARGE
from .twisted_private import send_now, set_read_size

if TYPE_CHECKING:
    from .connection import Connection

log = Logger()

#: Largest response payload a link buffers for its own requests (replies there are
#: small: acknowledgements, listings); a larger one needs a :class:`ResponseSink`.
RESPONSE_MAX = 64 * 1024 * 1024

#: Bytes read from a file per producer step of a streamed request payload (the size the
#: servers' download producer uses: Twisted writes at most 128 KiB per reactor pass, and
#: smaller chunks cost more trips through the producer for nothing).
PAYLOAD_CHUNK = 1024 * 1024


@attrs.frozen
class Response:
    """A successful answer to a request sent over a link (``payload`` is empty when it
    went to a sink)."""

    headers: dict[str, str]
    payload: bytes = b""


class ResponseSink(Protocol):
    """Where a successful response's payload goes, chunk by chunk, instead of memory.

    ``begin`` comes first, with the response's headers and payload length; then
    ``data`` for each chunk, then ``end`` once the payload is whole.  ``end`` may raise
    (a checksum that does not match): the request's Deferred then fails with that error.
    ``abort`` comes instead of ``end`` when the payload will not be complete (the
    connection closed, the request was cancelled, ``begin`` or ``data`` raised): the sink
    must leave nothing behind.  An error response never reaches the sink.
    """

    def begin(self, headers: Mapping[str, str], length: int) -> None:
        """The response head: its headers (lowercase names) and payload length."""

    def data(self, chunk: bytes) -> None:
        """The next chunk of the payload."""

    def end(self) -> None:
        """The payload is complete."""

    def abort(self) -> None:
        """The payload will not be complete: undo what was written."""


@attrs.define(eq=False)
class _Pending:
    """One request of this side, from its sending to its response's END."""

    deferred: Deferred[Response] | None
    head: Head | None = None
    chunks: list[bytes] = attrs.field(factory=list)
    sink: ResponseSink | None = None
    #: The payload still going out (a streamed request), if any.
    body: _FilePayload | None = None
    #: The sink has been told ``begin`` and must hear ``end`` or ``abort`` once.
    sink_open: bool = False


class Calls:
    """This side's requests on one connection and the responses coming back."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        #: The response whose payload is arriving (every event goes to it until its END).
        self.reading: _Pending | None = None
        #: The streamed payload going out now; requests sent meanwhile wait in _queued.
        self._body: _FilePayload | None = None
        self._queued: list[bytes] = []

    @property
    def busy(self) -> bool:
        """Requests of this side are unanswered, or a payload of its own is going out."""
        return bool(self._pending) or self.reading is not None or self._body is not None

    # -- sending ------------------------------------------------------------------------

    def request(
        self,
        method: str,
        headers: Mapping[str, object] | None = None,
        payload: bytes | int = b"",
        sink: ResponseSink | None = None,
    ) -> Deferred[Response]:
        """Send a request; see :meth:`dsml.net.connection.Connection.request`."""
        if isinstance(payload, int) and self._body is not None:
            raise RuntimeError("a payload is already streaming on this connection")
        pending, d = self._open(sink, cancellable=sink is not None)
        if pending is None:
            return d
        data = codec.encode_request(method, self._register(pending), headers or {}, payload)
        if self._body is not None:
            self._queued.append(data)  # after the payload going out
        else:
            send_now(self.conn.transport, data)
        return d

    def request_file(
        self,
        method: str,
        headers: Mapping[str, object],
        source: IO[bytes],
        length: int,
        on_chunk: Callable[[bytes], object] | None = None,
        sink: ResponseSink | None = None,
    ) -> Deferred[Response]:
        """Send a request whose payload is the next ``length`` bytes of ``source``, read a
        chunk at a time as the transport takes them; see
        :meth:`dsml.net.connection.Connection.request_file`."""
        if self._body is not None:
            raise RuntimeError("a payload is already streaming on this connection")
        if length < 0:
            raise ValueError(f"negative payload length {length}")
        pending, d = self._open(sink, cancellable=True)
        if pending is None:
            return d
        transport = self.conn.transport
        transport.write(  # type: ignore[union-attr]
            codec.encode_request(method, self._register(pending), headers, length)
        )
        if length:
            body = _FilePayload(self, source, length, on_chunk)
            pending.body = self._body = body
            # A pull producer: the transport asks for each chunk once it sent the last
            # (Twisted's TCP transport asks for the first one inside registerProducer).
            self.conn.start_producer(body)
        return d

    def _open(
        self, sink: ResponseSink | None, cancellable: bool
    ) -> tuple[_Pending | None, Deferred[Response]]:
        pending = _Pending(None, sink=sink)
        canceller = (lambda _: self._cancel(pending)) if cancellable else None
        d: Deferred[Response] = Deferred(canceller)
        pending.deferred = d
        if not self.conn.is_open:
            d.errback(ConnectionLost("connection is closed"))
            return None, d
        return pending, d

    def _register(self, pending: _Pending) -> int:
        req_id = self._next_id
        self._next_id += 1
        self._pending[req_id] = pending
        return req_id

    def _cancel(self, pending: _Pending) -> None:
        """The caller gave up on a streamed request: undo its sink, cut the connection."""
        self._fail(pending, Failure(CancelledError()))
        self.conn.abort()

    def body_sent(self, body: _FilePayload) -> None:
        """A streamed payload went out whole: the requests queued behind it follow."""
        if self._body is body:
            self._body = None
        queued, self._queued = self._queued, []
        transport = self.conn.transport
        for data in queued:
            transport.write(data)  # type: ignore[union-attr]

    def body_failed(self, body: _FilePayload, error: DsmlError) -> None:
        """A streamed payload cannot be finished (its file shrank): the length promised
        in its head cannot be met, so the connection is cut."""
        for pending in self._pending.values():
            if pending.body is body:
                self._fail(pending, Failure(error))
        self.conn.abort()

    # -- receiving ----------------------------------------------------------------------

    def on_head(self, head: Head) -> None:
        """A response head arrived (with its payload when it came whole)."""
        pending = self._pending.pop(head.id, None)
        if pending is None:
            self.conn.factory.peer_log.warn(
                "{peer}: response {id} answers no request", peer=self.conn.peer_name(), id=head.id
            )
            pending = _Pending(None)
        body = pending.body
        if body is not None and body.active:
            # Answered before its payload went out whole (a refusal): the rest is not
            # sent, and the framing it promised is broken, so the link closes after.
            body.stop()
            self._body = None
            self._queued = []
            self.conn.lose()
        pending.head = head
        sink = pending.sink if head.ok else None
        if sink is None and head.length > RESPONSE_MAX:
            self._fail(pending, Failure(DsmlError(
                f"response of {head.length} bytes exceeds {RESPONSE_MAX}", "too-large"
            )))
            self.conn.fatal("too-large", f"response of {head.length} bytes exceeds {RESPONSE_MAX}")
            return
        if sink is not None:
            pending.sink_open = True
            try:
                sink.begin(head.headers, head.length)
            except Exception:
                self._sink_failed(pending, Failure())
                return
            if head.length > READ_SIZE_LARGE:
                set_read_size(self.conn.transport, READ_SIZE_LARGE)
        self.reading = pending
        whole = head.body
        if whole is not None:
            if whole:
                self.on_event(Data(whole))
            if self.reading is pending:
                self.on_event(codec.END)

    def on_event(self, event: Any) -> None:
        """The next event of the response being read: payload bytes, or its END."""
        pending = self.reading
        assert pending is not None
        if type(event) is Data:
            if pending.sink_open:
                try:
                    pending.sink.data(event.data)  # type: ignore[union-attr]
                except Exception:
                    self._sink_failed(pending, Failure())
            else:
                pending.chunks.append(event.data)
            return
        # END: the only other event inside a response
        self.reading = None
        head = pending.head
        assert head is not None
        if pending.sink_open:
            set_read_size(self.conn.transport, READ_SIZE)
            pending.sink_open = False
            try:
                pending.sink.end()  # type: ignore[union-attr]
            except Exception:
                _fire(pending, Failure())
                return
            _fire(pending, Response(head.headers))
        elif head.ok:
            chunks = pending.chunks
            payload = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            _fire(pending, Response(head.headers, payload))
        else:
            h = head.headers
            _fire(pending, Failure(DsmlError(h.get("message", "error"), h.get("code", "internal"))))

    def _sink_failed(self, pending: _Pending, failure: Failure) -> None:
        """The sink refused the payload (its disk is full, say): the request fails with
        its error, and the connection is cut (the rest of the payload cannot be skipped
        cheaply; the sink's link is its own)."""
        if not failure.check(DsmlError, OSError):
            log.failure("a response sink failed", failure)
        if self.reading is pending:
            self.reading = None
        self._fail(pending, failure)
        self.conn.abort()

    def _fail(self, pending: _Pending, failure: Failure) -> None:
        """End ``pending`` with ``failure``: stop its payload, abort its sink, errback."""
        body = pending.body
        if body is not None and body.active:
            body.stop()
            if self._body is body:
                self._body = None
        if pending.sink_open:
            pending.sink_open = False
            try:
                pending.sink.abort()  # type: ignore[union-attr]
            except Exception:
                log.failure("aborting a response sink failed")
        _fire(pending, failure)

    def fail_all(self) -> None:
        """The connection closed: the response being read and every request still
        waiting fail with ConnectionLost (their sinks aborted)."""
        reading, self.reading = self.reading, None
        pending, self._pending = self._pending, {}
        self._queued = []
        lost = [reading] if reading is not None else []
        for p in lost + list(pending.values()):
            self._fail(p, Failure(ConnectionLost("connection lost before the reply")))
        if self._body is not None:
            self._body.stop()
            self._body = None


def _fire(pending: _Pending, result: Response | Failure) -> None:
    """Fire the request's Deferred once (a cancelled one has fired already)."""
    d = pending.deferred
    if d is None or d.called:
        return
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)


@implementer(IPullProducer)
class _FilePayload:
    """Writes ``length`` bytes of an open file to the connection as its transport asks.

    ``on_chunk`` sees every chunk as it goes out (to hash it).  The file stays the
    caller's to close; this only stops reading it.
    """

    def __init__(
        self,
        calls: Calls,
        source: IO[bytes],
        length: int,
        on_chunk: Callable[[bytes], object] | None,
    ) -> None:
        self.calls = calls
        self.source: IO[bytes] | None = source
        self.remaining = length
        self.on_chunk = on_chunk

    @property
    def active(self) -> bool:
        """Still sending."""
        return self.source is not None

    def resumeProducing(self) -> None:  # noqa: N802 - Twisted's name
        """The transport sent what it had: read and write the next chunk."""
        source = self.source
        if source is None:
            return
        try:
            chunk = source.read(min(PAYLOAD_CHUNK, self.remaining))
        except OSError as e:
            self.stop()
            self.calls.body_failed(self, DsmlError(f"reading the file failed: {e}", "io"))
            return
        if not chunk:
            missing = self.remaining
            self.stop()
            self.calls.body_failed(
                self, DsmlError(f"file shrank while sending ({missing} bytes missing)", "io")
            )
            return
        self.remaining -= len(chunk)
        if self.on_chunk is not None:
            self.on_chunk(chunk)
        transport = self.calls.conn.transport
        transport.write(chunk)  # type: ignore[union-attr]
        if self.remaining == 0:
            self.stop()
            self.calls.body_sent(self)

    def stopProducing(self) -> None:  # noqa: N802 - Twisted's name
        """The connection is gone: read no more."""
        self.source = None

    def stop(self) -> None:
        """Stop sending and let go of the transport."""
        self.source = None
        self.calls.conn.stop_producer(self)
