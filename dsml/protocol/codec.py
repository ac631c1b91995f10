"""The sans-IO codec of the dsml wire protocol.

Bytes go in with :meth:`Parser.feed`; events come out of :meth:`Parser.next_event`:
a :class:`Head`, then the payload as :class:`Data` chunks, then :data:`END`; or a
:class:`Rejected` for a request that is well framed but invalid (its payload is skipped).
A framing error raises :class:`ProtocolError` and the parser refuses all further input.

No I/O happens here, and nothing here imports Twisted: the Twisted protocols and the
blocking client drive this same code.  See docs/protocol.md for the format.

One room because the parser, its quick paths and the encoders are one reading of the
format: every byte rule and limit is stated once here and the quick paths must agree
with the parser (a test checks), which is easiest to keep true side by side.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

from ..errors import DsmlError
from . import limits
from .methods import HeaderValueError, MethodTable

__all__ = [
    "END",
    "NEED_DATA",
    "Data",
    "Event",
    "Head",
    "Parser",
    "ProtocolError",
    "Rejected",
    "encode_head",
    "encode_request",
    "encode_response",
    "encode_key_request",
    "quick_request",
    "quick_response",
    "ResponseShape",
]

#: The version of this wire protocol; peers that differ refuse each other (register).
PROTOCOL_VERSION: Final = 1

REQUEST: Final = "request"
RESPONSE: Final = "response"
#: Both directions on one connection (a worker's link to the master): a message is a
#: request or a response according to its start line.
PEER: Final = "peer"

#: Response statuses.
OK: Final = "OK"
ERROR: Final = "ERROR"

_REQUEST_LINE = re.compile(rb"([a-z][a-z0-9_]{0,31}) ([0-9]{1,%d})\Z" % limits.MAX_ID_DIGITS)
_RESPONSE_LINE = re.compile(rb"(OK|ERROR) ([0-9]{1,%d})\Z" % limits.MAX_ID_DIGITS)
_HEADER_VALUES = rb"(?:\r\n[A-Za-z0-9-]{1,%d}: ?[^\x00-\x08\x0a-\x1f\x7f]*)*\Z" % (
    limits.MAX_HEADER_NAME
)
_REQUEST_BLOCK = re.compile(
    rb"([a-z][a-z0-9_]{0,31}) ([0-9]{1,%d})" % limits.MAX_ID_DIGITS + _HEADER_VALUES
)
_RESPONSE_BLOCK = re.compile(rb"(OK|ERROR) ([0-9]{1,%d})" % limits.MAX_ID_DIGITS + _HEADER_VALUES)
_PAIRS = re.compile(rb"\r\n([A-Za-z0-9-]+): ?([^\r]*)")
# A header line whose value has no control character other than TAB (the common case).
_HEADER_LINE_CLEAN = re.compile(
    rb"([A-Za-z0-9-]{1,%d}): ?([^\x00-\x08\x0a-\x1f\x7f]*)\Z" % limits.MAX_HEADER_NAME
)
_HEADER_LINE = re.compile(rb"([A-Za-z0-9-]{1,%d}): ?(.*)\Z" % limits.MAX_HEADER_NAME, re.DOTALL)
_LENGTH = re.compile(rb"[0-9]{1,%d}\Z" % limits.MAX_LENGTH_DIGITS)
# In a header block: a LF without its CR, a CR without its LF, or a NUL.
_BAD_HEAD_BYTE = re.compile(rb"(?<!\r)\n|\r(?!\n)|\x00")
# Within a header value: any control character other than TAB.
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CONTROL_NO_CRLF = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_METHOD = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")
_ID_LIMIT = 10**limits.MAX_ID_DIGITS
_LENGTH_LIMIT = 10**limits.MAX_LENGTH_DIGITS
_NAME = re.compile(rf"[A-Za-z0-9-]{{1,{limits.MAX_HEADER_NAME}}}\Z")

_TERMINATOR = b"\r\n\r\n"

# One request of the commonest shape and nothing else: a method, an id, one Key header
# of printable ASCII, an optional Length, the blank line (the payload follows).
_QUICK_REQUEST = re.compile(
    rb"([a-z][a-z0-9_]{0,31}) ([0-9]{1,%d})\r\nKey: ([\x20-\x7e]{1,%d})\r\n"
    rb"(?:Length: ([0-9]{1,%d})\r\n)?\r\n"
    % (limits.MAX_ID_DIGITS, limits.MAX_KEY, limits.MAX_LENGTH_DIGITS)
)
# A response whose header block is all printable ASCII (see quick_response).  Linear:
# a name stops at its colon, a value (with its optional leading space) at the CR.
_QUICK_RESPONSE = re.compile(
    rb"(OK|ERROR) ([0-9]{1,%d})((?:\r\n[A-Za-z0-9-]{1,%d}:[\x20-\x7e]*)*)\r\n\r\n"
    % (limits.MAX_ID_DIGITS, limits.MAX_HEADER_NAME)
)

#: Largest payload a ``whole=True`` parser hands over inside its Head.
WHOLE_MAX = 64 * 1024


class ProtocolError(DsmlError):
    """A framing error: the byte stream cannot be trusted any more.

    The receiver answers once with ``code`` and ``message`` and closes the connection.
    ``request_id`` is the id of the message being parsed when known, else 0.
    """

    code = "bad-frame"

    def __init__(self, message: str, code: str | None = None, request_id: int = 0) -> None:
        super().__init__(message, code)
        self.request_id = request_id


class Head:
    """The start line and headers of one message.

    ``kind`` is the method for a request (``"file_upload"``) and ``"OK"`` or ``"ERROR"``
    for a response.  ``headers`` has lowercase names; for a request it also holds the
    method under ``"method"``.  ``length`` is the payload length in bytes.

    ``body`` is None normally: the payload follows as Data events, then END.  A parser
    made with ``whole=True`` sets it to the whole payload when that is small and
    already buffered; then no Data or END follows (one event per small message).
    """

    __slots__ = ("kind", "id", "headers", "length", "body")

    def __init__(
        self, kind: str, id: int, headers: dict[str, str], length: int, body: bytes | None = None
    ) -> None:
        self.kind = kind
        self.id = id
        self.headers = headers
        self.length = length
        self.body = body

    @property
    def ok(self) -> bool:
        """For a response: whether it reports success (the seed's ack flag)."""
        return self.kind == OK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Head) and (
            (self.kind, self.id, self.headers, self.length)
            == (other.kind, other.id, other.headers, other.length)
        )

    def __repr__(self) -> str:
        return f"Head({self.kind!r}, {self.id}, {self.headers!r}, {self.length})"


class Data:
    """One chunk of a payload, in order."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Data) and self.data == other.data

    def __repr__(self) -> str:
        return f"Data({len(self.data)} bytes)"


class _End:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: The payload of the last Head is complete.
END: Final = _End()
#: No complete event is buffered; feed more bytes.
NEED_DATA: Final = _NeedData()


class Rejected:
    """A well-framed request that is invalid: answer ``code``/``message`` and carry on.

    The parser skips the request's payload by itself; no Data or END follows.
    """

    __slots__ = ("id", "code", "message", "method")

    def __init__(self, id: int, code: str, message: str, method: str) -> None:
        self.id = id
        self.code = code
        self.message = message
        self.method = method

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rejected) and (self.id, self.code, self.message) == (
            other.id,
            other.code,
            other.message,
        )

    def __repr__(self) -> str:
        return f"Rejected({self.id}, {self.code!r}, {self.message!r})"


Event = Head | Data | _End | Rejected | _NeedData

_S_HEAD = 0
_S_PAYLOAD = 1
_S_SKIP = 2
_S_END = 3
_S_BROKEN = 4


class Parser:
    """An incremental parser for one direction of one connection.

    ``role`` is ``"request"`` on a server (it parses requests and checks them against
    ``methods``) and ``"response"`` on a client.  Memory is bounded: at most one header
    block (MAX_HEAD) plus whatever was fed and not yet taken as events; payload bytes are
    handed out as they arrive, never accumulated.
    """

    def __init__(
        self, role: str = REQUEST, methods: MethodTable | None = None, whole: bool = False
    ) -> None:
        if role not in (REQUEST, RESPONSE, PEER):
            raise ValueError(f"role must be {REQUEST!r}, {RESPONSE!r} or {PEER!r}")
        if role != RESPONSE and methods is None:
            raise ValueError("a request parser needs a method table")
        self._role = role
        self._methods = methods
        self._whole = whole
        self._buf = bytearray()
        self._state = _S_HEAD
        self._remaining = 0  # payload bytes still to come, in PAYLOAD or SKIP
        self._scanned = 0  # bytes of _buf already searched for the terminator
        self._error: ProtocolError | None = None
        self._pending: Event | None = None
        # Payload bytes fed as a bytes object while nothing else was buffered: handed
        # out as they are, without copying them through _buf (uploads and downloads
        # would otherwise copy every byte twice).
        self._direct: bytes | None = None

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet handed out as events."""
        return len(self._buf) + (len(self._direct) if self._direct is not None else 0)

    @property
    def idle(self) -> bool:
        """True between messages with nothing buffered (a clean place to close)."""
        return (
            self._state == _S_HEAD
            and not self._buf
            and self._direct is None
            and self._pending is None
        )

    def feed(self, data: bytes) -> None:
        """Add bytes received from the peer (any chunking)."""
        if self._error is not None:
            raise self._error
        if not data:
            return
        if self._direct is not None:
            self._buf += self._direct
            self._direct = None
        elif self._state == _S_PAYLOAD and not self._buf and type(data) is bytes:
            self._direct = data
            return
        self._buf += data

    def next_event(self) -> Event:
        """Return the next event, or NEED_DATA; raise ProtocolError on a framing error."""
        if self._error is not None:
            raise self._error
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event
        try:
            return self._next()
        except ProtocolError as e:
            self._error = e
            self._state = _S_BROKEN
            self._buf = bytearray()
            self._direct = None
            raise

    def _next(self) -> Event:
        state = self._state
        if state == _S_PAYLOAD:
            direct = self._direct
            if direct is not None:
                self._direct = None
                n = self._remaining
                if len(direct) > n:
                    self._buf += memoryview(direct)[n:]
                    direct = direct[:n]
                self._remaining -= len(direct)
                if self._remaining == 0:
                    self._state = _S_HEAD
                    self._pending = END
                return Data(direct)
            buf = self._buf
            if not buf:
                return NEED_DATA
            n = self._remaining
            if len(buf) <= n:
                chunk = bytes(buf)
                buf.clear()
            else:
                chunk = bytes(buf[:n])
                del buf[:n]
            self._remaining -= len(chunk)
            if self._remaining == 0:
                self._state = _S_HEAD
                self._pending = END
            return Data(chunk)
        if state == _S_END:
            self._state = _S_HEAD
            return END
        if state == _S_SKIP:
            take = min(self._remaining, len(self._buf))
            del self._buf[:take]
            self._remaining -= take
            if self._remaining:
                return NEED_DATA
            self._state = _S_HEAD
        return self._parse_head()

    def _parse_head(self) -> Event:
        buf = self._buf
        if not buf:
            return NEED_DATA
        end = buf.find(_TERMINATOR, max(0, self._scanned - 3))
        if end < 0:
            self._check_partial_head()
            self._scanned = len(buf)
            return NEED_DATA
        self._scanned = 0
        if end + 4 > limits.MAX_HEAD:
            raise ProtocolError(f"header block larger than {limits.MAX_HEAD} bytes")
        block = bytes(buf[:end])
        del buf[: end + 4]
        return self._decode_head(block)

    def _check_partial_head(self) -> None:
        """Fail early on a header block that can never become valid."""
        buf = self._buf
        bad = _BAD_HEAD_BYTE.search(buf, max(0, self._scanned - 1))
        # A CR at the very end may still get its LF.
        if bad is not None and not (bad.group() == b"\r" and bad.end() == len(buf)):
            raise ProtocolError(_describe_bad_byte(bad.group()))
        if len(buf) > limits.MAX_HEAD:
            raise ProtocolError(f"header block larger than {limits.MAX_HEAD} bytes")
        line_start = buf.rfind(b"\r\n") + 2 if b"\r\n" in buf else 0
        if len(buf) - line_start > limits.MAX_LINE + 1:
            raise ProtocolError(f"header line longer than {limits.MAX_LINE} bytes")

    def _decode_head(self, block: bytes) -> Event:
        # Fast path: one regex validates a well-formed block of ordinary size, one
        # findall splits it.  Anything unusual takes the slow path below, which
        # names the exact problem.
        if len(block) <= limits.MAX_LINE:
            role = self._role
            m = _RESPONSE_BLOCK.match(block) if role == RESPONSE else _REQUEST_BLOCK.match(block)
            is_response = role == RESPONSE
            if m is None and role == PEER:
                m = _RESPONSE_BLOCK.match(block)
                is_response = True
            if m is not None:
                found = _plain_headers(_PAIRS.findall(block, m.end(2)))
                if found is not None:
                    return self._finish_head(
                        m.group(1).decode("ascii"), int(m.group(2)), *found, None, is_response
                    )
        return self._decode_head_slowly(block)

    def _decode_head_slowly(self, block: bytes) -> Event:
        lines = block.split(b"\r\n")
        # Every CR and LF must belong to a CRLF, and no NUL: three C-speed scans; the
        # regex that names the culprit runs only when one fails.
        crlf = len(lines) - 1
        if block.count(b"\n") != crlf or block.count(b"\r") != crlf or b"\x00" in block:
            bad = _BAD_HEAD_BYTE.search(block)
            assert bad is not None
            raise ProtocolError(_describe_bad_byte(bad.group()))
        if crlf > limits.MAX_HEADERS:
            raise ProtocolError(f"more than {limits.MAX_HEADERS} header lines")
        long_lines = len(block) > limits.MAX_LINE  # else no line can be too long
        start = lines[0]
        if long_lines and len(start) > limits.MAX_LINE:
            raise ProtocolError(f"header line longer than {limits.MAX_LINE} bytes")
        role = self._role
        m = _RESPONSE_LINE.match(start) if role == RESPONSE else _REQUEST_LINE.match(start)
        is_response = role == RESPONSE
        if m is None and role == PEER:
            m = _RESPONSE_LINE.match(start)
            is_response = True
        if m is None:
            what = {REQUEST: "request line", RESPONSE: "status line"}.get(role, "start line")
            raise ProtocolError(f"malformed {what}")
        kind = m.group(1).decode("ascii")
        req_id = int(m.group(2))
        headers: dict[str, str] = {}
        raw_length: bytes | None = None
        not_utf8: str | None = None
        for line in lines[1:]:
            if long_lines and len(line) > limits.MAX_LINE:
                raise ProtocolError(
                    f"header line longer than {limits.MAX_LINE} bytes", request_id=req_id
                )
            hm = _HEADER_LINE_CLEAN.match(line)
            if hm is None:
                hm = _HEADER_LINE.match(line)
                if hm is None:
                    raise ProtocolError("malformed header line", request_id=req_id)
                name = hm.group(1).decode("ascii").lower()
                raise ProtocolError(f"control character in header {name!r}", request_id=req_id)
            name = hm.group(1).lower().decode("ascii")
            raw = hm.group(2)
            if name in headers or (name == "length" and raw_length is not None):
                raise ProtocolError(f"duplicate header {name!r}", request_id=req_id)
            if name == "length":
                if not _LENGTH.match(raw):
                    raise ProtocolError(
                        f"Length must be 1 to {limits.MAX_LENGTH_DIGITS} ASCII digits",
                        request_id=req_id,
                    )
                raw_length = raw
                continue
            try:
                headers[name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                headers[name] = raw.decode("utf-8", "replace")
                not_utf8 = not_utf8 or name
        return self._finish_head(kind, req_id, headers, raw_length, not_utf8, is_response)

    def _finish_head(
        self,
        kind: str,
        req_id: int,
        headers: dict[str, str],
        raw_length: bytes | None,
        not_utf8: str | None,
        is_response: bool,
    ) -> Event:
        length = int(raw_length) if raw_length is not None else 0
        if is_response:
            if not_utf8 is not None:
                raise ProtocolError(f"header {not_utf8!r} is not UTF-8", request_id=req_id)
            return self._start_payload(Head(kind, req_id, headers, length))

        problem = self._check_request(kind, headers, length, not_utf8)
        if problem is not None:
            code, message = problem
            if length > limits.MAX_SKIP:
                raise ProtocolError(message, code, req_id)
            self._state = _S_SKIP
            self._remaining = length
            return Rejected(req_id, code, message, kind)
        headers["method"] = kind
        return self._start_payload(Head(kind, req_id, headers, length))

    def _check_request(
        self, method: str, headers: dict[str, str], length: int, not_utf8: str | None
    ) -> tuple[str, str] | None:
        assert self._methods is not None
        spec = self._methods.get(method)
        if spec is None:
            return "unknown-method", f"unknown method {method!r}"
        if "method" in headers:
            return "bad-header", "header 'method' is reserved"
        if not_utf8 is not None:
            code = "bad-key" if not_utf8 in ("key", "prefix", "after") else "bad-header"
            return code, f"header {not_utf8!r} is not UTF-8"
        for name in spec.required:
            if name not in headers:
                return "missing-header", f"{method} requires header {name!r}"
        validators = spec.headers
        for name, value in headers.items():
            check = validators.get(name)
            if check is not None:
                try:
                    check(value)
                except HeaderValueError as e:
                    return e.code, f"header {name!r}: {e.message}"
        if length > spec.max_payload:
            if spec.max_payload == 0:
                return "too-large", f"{method} takes no payload"
            return "too-large", f"payload of {length} bytes exceeds {spec.max_payload} for {method}"
        return None

    def _start_payload(self, head: Head) -> Head:
        n = head.length
        if self._whole and n <= WHOLE_MAX and len(self._buf) >= n:
            # The whole (small) payload is here: one event instead of three.
            buf = self._buf
            if n:
                head.body = bytes(buf[:n])
                del buf[:n]
            else:
                head.body = b""
            return head
        if n:
            self._state = _S_PAYLOAD
            self._remaining = head.length
        else:
            self._state = _S_END
        return head


def quick_request(data: bytes, methods: MethodTable) -> Head | None:
    """Decode ``data`` in one step if it is exactly one small request of the common shape.

    The shape: ``METHOD ID``, a ``Key`` header of printable ASCII, an optional
    ``Length``, the blank line and exactly that many payload bytes (at most WHOLE_MAX),
    for a known, buffered method whose only required header is ``key``, with a key its
    validator accepts and a payload within the method's limit.  That is nearly every
    ``value_retrieve``, ``value_upload``, ``stat`` and ``delete`` a client sends.

    Returns the Head (with the payload in ``body``) that a ``whole=True`` request parser
    fed ``data`` alone would return, or None for anything else, which the caller feeds
    to its Parser: this is a shortcut with no rules of its own (tests/test_codec.py
    checks by hypothesis that it agrees with the parser on any input).  It measured
    about 25 us less server CPU per small request than the parser's general path.
    """
    m = _QUICK_REQUEST.match(data)
    if m is None:
        return None
    kind_b, id_b, key_b, length_b = m.groups()
    start = m.end()
    length = int(length_b) if length_b is not None else 0
    if start + length != len(data) or length > WHOLE_MAX:
        return None
    kind = kind_b.decode("ascii")
    spec = methods.get(kind)
    if spec is None or spec.streamed or length > spec.max_payload or spec.required != _KEY_ONLY:
        return None
    key = key_b.decode("ascii")
    try:
        spec.headers["key"](key)
    except HeaderValueError:
        return None
    return Head(kind, int(id_b), {"key": key, "method": kind}, length, data[start:])


_KEY_ONLY: Final = frozenset(["key"])


def quick_response(data: bytes) -> Head | None:
    """Decode ``data`` in one step if it is exactly one small response in plain ASCII.

    The client's side of :func:`quick_request`: a status line, headers of printable
    ASCII (at most MAX_LINE bytes in all), an optional Length and exactly that many
    payload bytes (at most WHOLE_MAX).  Returns the Head a ``whole=True`` response
    parser fed ``data`` alone would return, or None for anything else (feed that to
    the Parser, which decides); tests/test_codec.py checks they agree.
    """
    m = _QUICK_RESPONSE.match(data, 0, limits.MAX_LINE)
    if m is None:
        return None
    found = _plain_headers(_PAIRS.findall(m.group(3)))
    if found is None:
        return None
    headers, raw_length = found
    start = m.end()
    length = int(raw_length) if raw_length is not None else 0
    if start + length != len(data) or length > WHOLE_MAX:
        return None
    return Head(m.group(1).decode("ascii"), int(m.group(2)), headers, length, data[start:])


def _plain_headers(
    pairs: list[tuple[bytes, bytes]],
) -> tuple[dict[str, str], bytes | None] | None:
    """The headers (lowercase names) and raw Length of a well-formed block's pairs, or
    None if anything is unusual (too many, a name twice, a bad Length, a value not
    UTF-8): the caller's slow path then names the problem."""
    if len(pairs) > limits.MAX_HEADERS:
        return None
    headers: dict[str, str] = {}
    raw_length: bytes | None = None
    try:
        for k, v in pairs:
            name = k.lower().decode("ascii")
            if name in headers:
                return None
            if name == "length":
                if raw_length is not None or not _LENGTH.match(v):
                    return None
                raw_length = v
            else:
                headers[name] = v.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return headers, raw_length


def _describe_bad_byte(b: bytes) -> str:
    if b == b"\n":
        return "bare LF in header block (lines end with CRLF)"
    if b == b"\r":
        return "CR without LF in header block"
    return "NUL byte in header block"


def encode_head(start: str, headers: Mapping[str, object], length: int) -> bytes:
    """Serialize a start line and headers; add Length when ``length`` is not zero.

    Raises ValueError for anything the receiving parser would take as a framing error
    (bad start line, bad or duplicate name, control character, line or block too long),
    so a bad argument fails here instead of closing the peer's connection.
    """
    raw_start = start.encode("utf-8")
    if not (_REQUEST_LINE.match(raw_start) or _RESPONSE_LINE.match(raw_start)):
        raise ValueError(f"bad start line {start!r}")
    return _encode_head(start, headers, length)


# Header names already checked once; a bounded memo keeps the hot path to a set lookup.
_GOOD_NAMES: set[str] = set()
_GOOD_METHODS: set[str] = set()
_MAX_MEMO = 1024


def _check_names(names: Iterable[str]) -> None:
    for name in names:
        if name in _GOOD_NAMES:
            continue
        if not _NAME.match(name) or name.lower() in ("length", "method"):
            raise ValueError(f"bad or duplicate header name {name!r}")
        if len(_GOOD_NAMES) < _MAX_MEMO:
            _GOOD_NAMES.add(name)


def _encode_head(start: str, headers: Mapping[str, object], length: int) -> bytes:
    """encode_head for a start line the caller has already checked."""
    if type(length) is not int or not 0 <= length < _LENGTH_LIMIT:
        raise ValueError(f"bad payload length {length!r}")
    n = len(headers)
    if n:
        if not _GOOD_NAMES.issuperset(headers):
            _check_names(headers)
        if n > 1 and len({name.lower() for name in headers}) != n:
            raise ValueError(f"duplicate header names in {list(headers)!r}")
        if n + (1 if length else 0) > limits.MAX_HEADERS:
            raise ValueError(f"more than {limits.MAX_HEADERS} header lines")
        text = "".join([f"\r\n{name}: {value}" for name, value in headers.items()])
        # The n CRLFs we put there must be the only CRs and LFs, and no other control
        # character may appear: three C-speed scans instead of one per value.
        if text.count("\n") != n or text.count("\r") != n or _CONTROL_NO_CRLF.search(text):
            raise ValueError("header values may not contain control characters")
    else:
        text = ""
    if length:
        head = f"{start}{text}\r\nLength: {length}\r\n\r\n".encode()
    else:
        head = f"{start}{text}\r\n\r\n".encode()
    if len(head) > limits.MAX_LINE:  # else no line can be too long
        if len(head) > limits.MAX_HEAD:
            raise ValueError(f"header block larger than {limits.MAX_HEAD} bytes")
        for line in head.split(b"\r\n"):
            if len(line) > limits.MAX_LINE:
                # The name only: the value may be a secret (a Token).
                name = line.partition(b":")[0][:40].decode("ascii", "replace")
                raise ValueError(f"header line {name!r} is longer than {limits.MAX_LINE} bytes")
    return head


def encode_request(
    method: str, req_id: int, headers: Mapping[str, object], payload: bytes | int = b""
) -> bytes:
    """Serialize a request.

    ``payload`` is the payload bytes (returned after the head), or an int: the length of
    a payload the caller will stream itself (only the head is returned).
    """
    if method not in _GOOD_METHODS:
        if not _METHOD.match(method):
            raise ValueError(f"bad method name {method!r}")
        if len(_GOOD_METHODS) < _MAX_MEMO:
            _GOOD_METHODS.add(method)
    if type(req_id) is not int or not 0 <= req_id < _ID_LIMIT:
        raise ValueError(f"bad request id {req_id!r}")
    if isinstance(payload, int):
        return _encode_head(f"{method} {req_id}", headers, payload)
    return _encode_head(f"{method} {req_id}", headers, len(payload)) + payload


def encode_key_request(method: str, req_id: int, key: str, payload: bytes = b"") -> bytes:
    """``encode_request(method, req_id, {"Key": key}, payload)``, cheaper for the common
    key (printable ASCII, at most MAX_KEY bytes); the same bytes either way."""
    if (
        method in _GOOD_METHODS
        and key.isascii()
        and key.isprintable()
        and 0 < len(key) <= limits.MAX_KEY
        and type(req_id) is int
        and 0 <= req_id < _ID_LIMIT
        and type(payload) is bytes
    ):
        if payload:
            return b"%s %d\r\nKey: %s\r\nLength: %d\r\n\r\n%s" % (
                method.encode(), req_id, key.encode(), len(payload), payload
            )
        return b"%s %d\r\nKey: %s\r\n\r\n" % (method.encode(), req_id, key.encode())
    return encode_request(method, req_id, {"Key": key}, payload)


def encode_response(
    ok: bool, req_id: int, headers: Mapping[str, object], payload: bytes | int = b""
) -> bytes:
    """Serialize a response (``payload`` as for :func:`encode_request`)."""
    if type(req_id) is not int or not 0 <= req_id < _ID_LIMIT:
        raise ValueError(f"bad request id {req_id!r}")
    start = f"OK {req_id}" if ok else f"ERROR {req_id}"
    if isinstance(payload, int):
        return _encode_head(start, headers, payload)
    return _encode_head(start, headers, len(payload)) + payload


class ResponseShape:
    """An OK response that always carries the same headers, encoded cheaply.

    For a server's hottest replies (a value's get and set): the names are checked once,
    here, and :meth:`encode` takes values that cannot break the framing (ints, or ASCII
    letters and digits such as a hex digest) and returns the bytes
    :func:`encode_response` would, in about a third of its time.
    """

    __slots__ = ("_names", "_format")

    def __init__(self, *names: str) -> None:
        _check_names(names)
        if len({name.lower() for name in names}) != len(names):
            raise ValueError(f"duplicate header names in {names!r}")
        if len(names) + 1 > limits.MAX_HEADERS:
            raise ValueError(f"more than {limits.MAX_HEADERS} header lines")
        self._names = names
        self._format = "OK %d" + "".join(f"\r\n{name}: %s" for name in names)

    def encode(self, req_id: int, values: tuple[int | str, ...], payload: bytes = b"") -> bytes:
        """The response to request ``req_id`` with these header values and payload."""
        if type(req_id) is not int or not 0 <= req_id < _ID_LIMIT:
            raise ValueError(f"bad request id {req_id!r}")
        for value in values:
            if type(value) is not int and not (value.isascii() and value.isalnum()):
                raise ValueError(f"header value {value!r} is not an int or alphanumeric")
        head = self._format % (req_id, *values)
        if len(head) > limits.MAX_LINE - 32:  # long values: let the general encoder check
            headers = dict(zip(self._names, values, strict=True))
            return encode_response(True, req_id, headers, payload)
        n = len(payload)
        if n:
            return f"{head}\r\nLength: {n}\r\n\r\n".encode() + payload
        return f"{head}\r\n\r\n".encode()


def encode_error(req_id: int, code: str, message: str) -> bytes:
    """Serialize an error response with its code and one-line message."""
    message = _CONTROL.sub(" ", message)
    raw = message.encode("utf-8", "replace")[: limits.MAX_LINE - 16]
    message = raw.decode("utf-8", "ignore")
    return encode_response(False, req_id, {"Code": code, "Message": message})
