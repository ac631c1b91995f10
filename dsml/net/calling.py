"""Calling out: the requests one side sends over a two-way link, and their responses.

On a two-way link (a worker's link to the master, a link between workers) either side
may send requests (docs/protocol.md, section 12).  :class:`Calls` numbers this side's
requests, remembers each one's Deferred, and reads the responses the connection routes
to it (a message whose start line is ``OK``/``ERROR``), matching them by id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..errors import ConnectionLost, DsmlError
from ..protocol import codec
from ..protocol.codec import Data, Head
from .twisted_private import send_now

if TYPE_CHECKING:
    from .connection import Connection

log = Logger()

#: Largest response payload a link accepts for its own requests (replies there are
#: small: acknowledgements, listings).
RESPONSE_MAX = 64 * 1024 * 1024


@attrs.frozen
class Response:
    """A successful answer to a request sent over a link."""

    headers: dict[str, str]
    payload: bytes = b""


@attrs.define
class _Pending:
    deferred: Deferred[Response] | None
    head: Head | None = None
    chunks: list[bytes] = attrs.field(factory=list)


class Calls:
    """This side's requests on one connection and the responses coming back."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        #: The response whose payload is arriving (every event goes to it until its END).
        self.reading: _Pending | None = None

    def request(
        self, method: str, headers: dict[str, object] | None = None, payload: bytes | int = b""
    ) -> Deferred[Response]:
        """Send a request; see :meth:`dsml.net.connection.Connection.request`."""
        d: Deferred[Response] = Deferred()
        conn = self.conn
        if not conn.is_open:
            d.errback(ConnectionLost("connection is closed"))
            return d
        req_id = self._next_id
        self._next_id += 1
        self._pending[req_id] = _Pending(d)
        send_now(conn.transport, codec.encode_request(method, req_id, headers or {}, payload))
        return d

    def on_head(self, head: Head) -> None:
        """A response head arrived (with its payload when it came whole)."""
        if head.length > RESPONSE_MAX:
            self.conn.fatal("too-large", f"response of {head.length} bytes exceeds {RESPONSE_MAX}")
            return
        pending = self._pending.pop(head.id, None)
        if pending is None:
            log.warn("{peer}: response {id} answers no request", peer=self.conn.peer_name(),
                     id=head.id)
            pending = _Pending(None)
        pending.head = head
        self.reading = pending
        body = head.body
        if body is not None:
            if body:
                self.on_event(Data(body))
            self.on_event(codec.END)

    def on_event(self, event: Any) -> None:
        """The next event of the response being read: payload bytes, or its END."""
        pending = self.reading
        assert pending is not None
        if type(event) is Data:
            pending.chunks.append(event.data)
            return
        # END: the only other event inside a response
        self.reading = None
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

    def fail_all(self) -> None:
        """The connection closed: every request still waiting fails with ConnectionLost."""
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if p.deferred is not None:
                p.deferred.errback(ConnectionLost("connection lost before the reply"))
