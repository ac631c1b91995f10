"""The storage server through the real protocol class: StringTransport, Clock, real Store.

No sockets and no reactor.  Every bad-input case is one short test that states what the
server does and checks it with :func:`assert_rejected` (the error code of the last
response, whether the connection was closed, and whether the request reached the
handler) plus :func:`assert_nothing_stored`.  The idea is twisted.web's
``assertRequestRejected``.  One Store serves the whole module (opening one costs ~0.2 s);
the ``server`` fixture empties it after every test.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dsml.net.responders import Responders
from dsml.net.server import BODY_CHUNK, ServerFactory, ServerLimits, ServerProtocol
from dsml.protocol import codec, limits
from dsml.protocol.codec import END, NEED_DATA, Data, Head, Parser
from dsml.worker.runner import TaskLogs
from dsml.worker.storage import StorageHandler, storage_responders
from dsml.worker.store import Store

TOKEN = "secret"
VALUE_MAX = 1024
LIMITS = ServerLimits(
    max_connections=3,
    max_unauthenticated=2,
    auth_timeout=5.0,
    head_timeout=3.0,
    idle_timeout=30.0,
    payload_timeout=7.0,
)


# -- building requests ------------------------------------------------------------------


def raw(*lines: bytes, payload: bytes = b"") -> bytes:
    """A request exactly as given: lines joined by CRLF, the blank line, then payload."""
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def req(method: str, rid: int, payload: bytes = b"", **headers: str | bytes) -> bytes:
    """A well-formed request; Length is added when the payload is not empty."""
    lines = [f"{method} {rid}".encode()]
    for name, value in headers.items():
        lines.append(name.capitalize().encode() + b": " + _b(value))
    if payload:
        lines.append(b"Length: %d" % len(payload))
    return raw(*lines, payload=payload)


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the harness ------------------------------------------------------------------------


def run_inline(fn: Callable[[], Any]) -> defer.Deferred[Any]:
    """run_in_thread for tests: run now, answer with an already-fired Deferred."""
    try:
        return defer.succeed(fn())
    except BaseException:
        return defer.fail()


class Deferring:
    """run_in_thread whose Deferreds fire only when the test calls :meth:`run_all`."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], Any], defer.Deferred[Any]]] = []

    def __call__(self, fn: Callable[[], Any]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append((fn, d))
        return d

    def run_all(self) -> None:
        while self.pending:
            fn, d = self.pending.pop(0)
            try:
                result = fn()
            except BaseException:
                d.errback()
            else:
                d.callback(result)


class RecordingFactory(ServerFactory):
    """The real factory over the real storage responders, each wrapped to note the id of
    every request it is given (in ``dispatched``)."""

    def __init__(self, handler: StorageHandler, clock: Clock) -> None:
        self.dispatched: list[int] = []
        base = storage_responders(handler, TaskLogs(None), VALUE_MAX)
        table = Responders.of(
            base.methods, [attrs.evolve(r, fn=self._recording(r.fn)) for r in base]
        )
        super().__init__(table, clock, token=TOKEN, limits=LIMITS)

    def _recording(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(head: Head, *rest: Any) -> Any:
            self.dispatched.append(head.id)
            return fn(head, *rest)

        return recorded


class Server:
    """One storage server: the shared Store, a fresh Clock, handler and factory."""

    def __init__(self, store: Store, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.root = store.root
        self.clock = Clock()
        self.store = store
        self.handler = StorageHandler(self.store, run_inline)
        self.factory = RecordingFactory(self.handler, self.clock)

    def connect(self, authenticated: bool = True) -> tuple[ServerProtocol, StringTransport]:
        """A new connection; authenticated (and its output cleared) unless told otherwise."""
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        if authenticated:
            proto.dataReceived(req("auth", 1, token=TOKEN))
            [(head, _)] = responses(transport)
            assert head.ok and head.id == 1
            transport.clear()
        return proto, transport


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One real Store under pytest's tmp dir for the module.

    Opening a store creates its 256 object directories, which costs ~0.2 s here; a
    fresh store per test would make this file slow.  :func:`server` empties it
    between tests instead.
    """
    store = Store(tmp_path_factory.mktemp("server") / "store", value_max=VALUE_MAX)
    yield store
    store.close()


@pytest.fixture
def server(shared_store: Store) -> Iterator[Server]:
    """An empty store served by a fresh factory on a fresh Clock."""
    assert shared_store.count == 0
    yield Server(shared_store, shared_store.root.parent)
    # Empty the store for the next test, whatever this one left behind.
    for entry in list(shared_store.inventory()):
        shared_store.delete(entry.key)
    for path in stored_files_in(shared_store):
        path.unlink()


def responses(transport: StringTransport, complete: bool = True) -> list[tuple[Head, bytes]]:
    """Everything the server wrote, decoded: (head, payload) per whole response.

    ``complete``: the output must not end in the middle of a response.
    """
    parser = Parser(codec.RESPONSE)
    parser.feed(transport.value())
    out: list[tuple[Head, bytes]] = []
    head: Head | None = None
    chunks: list[bytes] = []
    while (event := parser.next_event()) is not NEED_DATA:
        if isinstance(event, Head):
            head, chunks = event, []
        elif isinstance(event, Data):
            chunks.append(event.data)
        elif event is END:
            assert head is not None
            out.append((head, b"".join(chunks)))
    assert parser.idle or not complete, "the server wrote a partial response"
    return out


def summary(transport: StringTransport) -> list[tuple[str, int, str, bytes]]:
    """(status, id, error code, payload) of each response."""
    return [(h.kind, h.id, h.headers.get("code", ""), p) for h, p in responses(transport)]


def assert_rejected(
    proto: ServerProtocol,
    transport: StringTransport,
    code: str,
    closed: bool,
    dispatched: bool = False,
) -> Head:
    """The last response is an ERROR ``code`` for a request the handler never saw.

    ``dispatched``: the handler did see it (and refused it, or it timed out there).

    ``closed``: the server hung up, and reads nothing more (the connection is then
    finished with connectionLost, as a real transport would).  Otherwise the
    connection still serves: a ping right after is answered.
    """
    got = responses(transport)
    assert got, "no response written"
    head, payload = got[-1]
    assert (head.kind, head.headers.get("code")) == ("ERROR", code), head
    assert head.headers.get("message")
    assert payload == b""
    assert transport.disconnecting is closed
    if head.id:
        seen = head.id in proto.factory.dispatched  # type: ignore[attr-defined]
        assert seen is dispatched
    written = len(transport.value())
    proto.dataReceived(req("ping", 4242))
    if closed:
        assert len(transport.value()) == written, "a closed connection answered"
        proto.connectionLost(Failure(ConnectionDone()))
    else:
        last, _ = responses(transport)[-1]
        assert (last.kind, last.id) == ("OK", 4242)
    return head


def stored_files_in(store: Store) -> list[Path]:
    """Every regular file under a store's tmp/ and objects/."""
    return [
        Path(top, name)
        for d in ("tmp", "objects")
        for top, _, names in os.walk(store.root / d)
        for name in names
    ]


def stored_files(server: Server) -> list[Path]:
    return stored_files_in(server.store)


def assert_nothing_stored_in(store: Store) -> None:
    """No key in the index and no file in tmp/ or objects/."""
    assert store.count == 0
    assert store.list() == []
    assert stored_files_in(store) == []


def assert_nothing_stored(server: Server) -> None:
    assert_nothing_stored_in(server.store)


def drain(transport: StringTransport) -> int:
    """Pull a streamed download through as a slow peer would; return the steps taken."""
    steps = 0
    while transport.producer is not None and not transport.streaming:  # the download's
        transport.producer.resumeProducing()
        steps += 1
        assert steps < 1000
    return steps


def upload_file(server: Server, key: str, data: bytes, rid: int = 50) -> Head:
    """Upload a file on a fresh connection and return the OK head."""
    proto, transport = server.connect()
    proto.dataReceived(req("file_upload", rid, data, key=key, sha256=sha(data)))
    [(head, _)] = responses(transport)
    assert head.ok, head
    return head


# == framing errors: answered bad-frame, connection closed =================================


def test_header_line_over_max_line(server: Server) -> None:
    """A header line one byte over MAX_LINE is a framing error: bad-frame, closed."""
    proto, t = server.connect()
    line = b"X-Pad: " + b"a" * (limits.MAX_LINE - 6)
    assert len(line) == limits.MAX_LINE + 1
    proto.dataReceived(raw(b"ping 2", line))
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_header_line_at_max_line_is_accepted(server: Server) -> None:
    """The boundary: a header line of exactly MAX_LINE bytes is fine."""
    proto, t = server.connect()
    line = b"X-Pad: " + b"a" * (limits.MAX_LINE - 7)
    proto.dataReceived(raw(b"ping 2", line))
    assert summary(t) == [("OK", 2, "", b"")]


def test_overlong_line_is_refused_before_its_end(server: Server) -> None:
    """A line that can no longer fit is refused as it arrives, without waiting for CRLF."""
    proto, t = server.connect()
    proto.dataReceived(b"ping 2\r\nX-Pad: " + b"a" * (2 * limits.MAX_LINE))
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_header_block_over_max_head(server: Server) -> None:
    """A complete header block larger than MAX_HEAD: bad-frame, closed."""
    proto, t = server.connect()
    proto.dataReceived(head_of_size(limits.MAX_HEAD + 1))
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_header_block_at_max_head_is_accepted(server: Server) -> None:
    """The boundary: a header block of exactly MAX_HEAD bytes (blank line included) is fine."""
    proto, t = server.connect()
    proto.dataReceived(head_of_size(limits.MAX_HEAD))
    assert summary(t) == [("OK", 2, "", b"")]


def test_endless_header_block_is_refused_at_max_head(server: Server) -> None:
    """Header lines that never end are refused once MAX_HEAD bytes are buffered."""
    proto, t = server.connect()
    proto.dataReceived(b"ping 2\r\n")
    for i in range(limits.MAX_HEAD // 1000 + 1):
        assert not t.disconnecting
        proto.dataReceived(b"X-%d: " % i + b"a" * 1000 + b"\r\n")
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_too_many_headers(server: Server) -> None:
    """MAX_HEADERS + 1 header lines: bad-frame, closed."""
    proto, t = server.connect()
    extra = [b"X-%d: 1" % i for i in range(limits.MAX_HEADERS + 1)]
    proto.dataReceived(raw(b"ping 2", *extra))
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_max_headers_is_accepted(server: Server) -> None:
    """The boundary: exactly MAX_HEADERS header lines are fine."""
    proto, t = server.connect()
    extra = [b"X-%d: 1" % i for i in range(limits.MAX_HEADERS)]
    proto.dataReceived(raw(b"ping 2", *extra))
    assert summary(t) == [("OK", 2, "", b"")]


def head_of_size(size: int) -> bytes:
    """A ping 2 whose header block (final blank line included) is ``size`` bytes."""
    lines = [b"ping 2"]
    room = size - len(b"ping 2") - 4  # each header line costs its length + 2
    i = 0
    while room > 0:
        n = min(1000, room - 2)
        if room - (n + 2) in (1, 2):  # leave no remainder too short for a line
            n -= 10
        lines.append((b"X-%02d: " % i + b"a" * 1000)[:n])
        room -= n + 2
        i += 1
    block = raw(*lines)
    assert len(block) == size
    return block


def _bad_length(server: Server, value: bytes) -> None:
    proto, t = server.connect()
    proto.dataReceived(raw(b"value_upload 2", b"Key: k", b"Length: " + value) + b"hello")
    head = assert_rejected(proto, t, "bad-frame", closed=True)
    assert head.id == 2 and "Length" in head.headers["message"]
    assert_nothing_stored(server)


def test_length_negative(server: Server) -> None:
    """Length: -5 is not digits: bad-frame, closed."""
    _bad_length(server, b"-5")


def test_length_signed(server: Server) -> None:
    """Length: +5 (a sign int() would accept): bad-frame, closed."""
    _bad_length(server, b"+5")


def test_length_hex(server: Server) -> None:
    """Length: 0x5: bad-frame, closed."""
    _bad_length(server, b"0x5")


def test_length_underscore(server: Server) -> None:
    """Length: 1_0 (which int() accepts): bad-frame, closed."""
    _bad_length(server, b"1_0")


def test_length_inner_space(server: Server) -> None:
    """Length: 1 0: bad-frame, closed."""
    _bad_length(server, b"1 0")


def test_length_extra_leading_space(server: Server) -> None:
    """Two spaces after the colon leave a space in the value: bad-frame, closed."""
    _bad_length(server, b" 5")


def test_length_trailing_space(server: Server) -> None:
    """Length: 5 followed by a space: bad-frame, closed."""
    _bad_length(server, b"5 ")


def test_length_13_digits(server: Server) -> None:
    """A Length of MAX_LENGTH_DIGITS + 1 digits: bad-frame, closed."""
    _bad_length(server, b"1" * (limits.MAX_LENGTH_DIGITS + 1))


def test_length_empty(server: Server) -> None:
    """Length with an empty value: bad-frame, closed."""
    _bad_length(server, b"")


def test_length_non_ascii_digit(server: Server) -> None:
    """Length in non-ASCII digits (Arabic-Indic five, which int() accepts): bad-frame."""
    _bad_length(server, "\u0665".encode())


def test_duplicate_length_same_value(server: Server) -> None:
    """Two Length headers, even equal: bad-frame, closed (no request smuggling)."""
    proto, t = server.connect()
    proto.dataReceived(raw(b"value_upload 2", b"Key: k", b"Length: 5", b"Length: 5") + b"hello")
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_duplicate_length_conflicting(server: Server) -> None:
    """Length: 5 and Length: 0 (either way round): bad-frame, closed."""
    proto, t = server.connect()
    proto.dataReceived(raw(b"value_upload 2", b"Key: k", b"length: 0", b"LENGTH: 5") + b"hello")
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_duplicate_other_header(server: Server) -> None:
    """Key twice (different case, different values): bad-frame, closed."""
    proto, t = server.connect()
    proto.dataReceived(raw(b"value_upload 2", b"Key: a", b"key: b", b"Length: 1") + b"x")
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_bare_lf(server: Server) -> None:
    """Lines ending in LF alone: bad-frame, closed."""
    proto, t = server.connect()
    proto.dataReceived(b"value_upload 2\nKey: k\nLength: 1\n\nx")
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_bare_lf_inside_crlf_block(server: Server) -> None:
    """One LF without CR among CRLF lines: bad-frame, closed."""
    proto, t = server.connect()
    proto.dataReceived(b"value_upload 2\r\nKey: k\nLength: 1\r\n\r\nx")
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_cr_without_lf(server: Server) -> None:
    """A CR not followed by LF: bad-frame, closed."""
    proto, t = server.connect()
    proto.dataReceived(b"value_upload 2\r\nKey: k\rLength: 1\r\n\r\nx")
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_nul_in_header(server: Server) -> None:
    """A NUL byte in the header block: bad-frame, closed."""
    proto, t = server.connect()
    proto.dataReceived(raw(b"value_upload 2", b"Key: k\x00", b"Length: 1", payload=b"x"))
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_control_char_in_value(server: Server) -> None:
    """A control character (ESC) in a header value: bad-frame, closed."""
    proto, t = server.connect()
    proto.dataReceived(raw(b"ping 2", b"X-Note: a\x1bb"))
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_del_in_value(server: Server) -> None:
    """DEL (0x7f) in a header value: bad-frame, closed."""
    proto, t = server.connect()
    proto.dataReceived(raw(b"ping 2", b"X-Note: a\x7fb"))
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


MALFORMED_REQUEST_LINES = {
    "upper": b"PING 2",
    "no-id": b"ping",
    "word-id": b"ping two",
    "two-spaces": b"ping  2",
    "trailing-space": b"ping 2 ",
    "leading-space": b" ping 2",
    "negative-id": b"ping -2",
    "13-digit-id": b"ping 1234567890123",
    "tab": b"ping\t2",
    "non-ascii": "p\u00e9ng 2".encode(),
}


@pytest.mark.parametrize(
    "line", list(MALFORMED_REQUEST_LINES.values()), ids=list(MALFORMED_REQUEST_LINES)
)
def test_malformed_request_line(server: Server, line: bytes) -> None:
    """A request line other than `method id`: bad-frame, closed, answered with id 0."""
    proto, t = server.connect()
    proto.dataReceived(raw(line))
    head = assert_rejected(proto, t, "bad-frame", closed=True)
    assert head.id == 0
    assert_nothing_stored(server)


def test_malformed_header_line(server: Server) -> None:
    """A header line without a colon: bad-frame, closed."""
    proto, t = server.connect()
    proto.dataReceived(raw(b"stat 2", b"Key k"))
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_header_name_with_bad_character(server: Server) -> None:
    """A header name with an underscore (not letters, digits, dash): bad-frame, closed."""
    proto, t = server.connect()
    proto.dataReceived(raw(b"stat 2", b"Key: k", b"X_Under: 1"))
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_header_name_too_long(server: Server) -> None:
    """A header name of MAX_HEADER_NAME + 1 characters: bad-frame, closed."""
    proto, t = server.connect()
    proto.dataReceived(raw(b"ping 2", b"X" * (limits.MAX_HEADER_NAME + 1) + b": 1"))
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_key_with_ascii_control_char(server: Server) -> None:
    """A key with a C0 control byte breaks the framing rules: bad-frame, closed."""
    proto, t = server.connect()
    proto.dataReceived(raw(b"value_upload 2", b"Key: a\x01b", b"Length: 1", payload=b"x"))
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert_nothing_stored(server)


def test_value_length_beyond_skip_limit(server: Server) -> None:
    """A too-large value the server would have to drain beyond MAX_SKIP: too-large, closed."""
    proto, t = server.connect()
    proto.dataReceived(raw(b"value_upload 2", b"Key: k", b"Length: %d" % (limits.MAX_SKIP + 1)))
    assert_rejected(proto, t, "too-large", closed=True)
    assert_nothing_stored(server)


# == well framed but invalid: answered, connection kept ===================================


def test_unknown_method(server: Server) -> None:
    """An unknown method: unknown-method, kept; the next request works."""
    proto, t = server.connect()
    proto.dataReceived(req("frobnicate", 2))
    head = assert_rejected(proto, t, "unknown-method", closed=False)
    assert head.id == 2 and "frobnicate" in head.headers["message"]
    proto.dataReceived(req("value_upload", 3, b"v", key="k"))
    assert responses(t)[-1][0].ok


def test_unknown_method_payload_is_skipped(server: Server) -> None:
    """An unknown method's payload is skipped unread, even if it looks like a request."""
    proto, t = server.connect()
    smuggled = req("value_upload", 3, b"evil", key="k")
    proto.dataReceived(req("frobnicate", 2, smuggled))
    assert_rejected(proto, t, "unknown-method", closed=False)
    assert [h.id for h, _ in responses(t)] == [2, 4242]
    assert_nothing_stored(server)


def test_missing_key_header(server: Server) -> None:
    """value_upload without Key: missing-header naming 'key', kept, payload skipped."""
    proto, t = server.connect()
    proto.dataReceived(req("value_upload", 2, b"hello"))
    head = assert_rejected(proto, t, "missing-header", closed=False)
    assert "'key'" in head.headers["message"]
    assert_nothing_stored(server)


def test_reserved_method_header(server: Server) -> None:
    """A header named Method (reserved for the parser): bad-header, kept."""
    proto, t = server.connect()
    proto.dataReceived(raw(b"stat 2", b"Key: k", b"Method: delete"))
    assert_rejected(proto, t, "bad-header", closed=False)
    assert_nothing_stored(server)


def test_value_over_value_max(server: Server) -> None:
    """A value over value_max: too-large, kept, payload skipped, next request works."""
    proto, t = server.connect()
    big = b"x" * (VALUE_MAX + 1)
    proto.dataReceived(req("value_upload", 2, big, key="k"))
    head = assert_rejected(proto, t, "too-large", closed=False)
    assert head.id == 2
    assert_nothing_stored(server)
    proto.dataReceived(req("value_upload", 3, b"x" * VALUE_MAX, key="k"))
    assert responses(t)[-1][0].ok
    assert server.store.get_value("k")[1] == b"x" * VALUE_MAX


def test_value_over_value_max_split_payload(server: Server) -> None:
    """The skipped payload may arrive in pieces; the request after it is still parsed."""
    proto, t = server.connect()
    big = req("value_upload", 2, b"y" * (VALUE_MAX + 100), key="k")
    for i in range(0, len(big), 97):
        proto.dataReceived(big[i : i + 97])
    assert_rejected(proto, t, "too-large", closed=False)
    assert_nothing_stored(server)


def test_payload_on_method_without_payload(server: Server) -> None:
    """stat with a payload: too-large, kept, the payload skipped."""
    proto, t = server.connect()
    proto.dataReceived(req("stat", 2, b"abc", key="k"))
    assert_rejected(proto, t, "too-large", closed=False)
    assert_nothing_stored(server)


def test_non_utf8_key(server: Server) -> None:
    """Key bytes that are not UTF-8: bad-key, kept."""
    proto, t = server.connect()
    proto.dataReceived(req("value_upload", 2, b"v", key=b"\xff\xfekey"))
    assert_rejected(proto, t, "bad-key", closed=False)
    assert_nothing_stored(server)


def test_utf8_encoded_surrogate_key(server: Server) -> None:
    """A UTF-8-encoded surrogate (CESU style) in a key: bad-key, kept."""
    proto, t = server.connect()
    proto.dataReceived(req("file_upload", 2, b"v", key=b"a\xed\xa0\x80"))
    assert_rejected(proto, t, "bad-key", closed=False)
    assert_nothing_stored(server)


def test_key_with_tab(server: Server) -> None:
    """A tab passes the framing but not the key rules: bad-key, kept."""
    proto, t = server.connect()
    proto.dataReceived(req("value_upload", 2, b"v", key="a\tb"))
    assert_rejected(proto, t, "bad-key", closed=False)
    assert_nothing_stored(server)


def test_key_with_c1_control(server: Server) -> None:
    """A C1 control (U+0085, NEL) in a key: bad-key, kept."""
    proto, t = server.connect()
    proto.dataReceived(req("file_upload", 2, b"v", key="a\u0085b"))
    assert_rejected(proto, t, "bad-key", closed=False)
    assert_nothing_stored(server)


def test_empty_key(server: Server) -> None:
    """An empty Key: bad-key, kept."""
    proto, t = server.connect()
    proto.dataReceived(req("value_upload", 2, b"v", key=""))
    assert_rejected(proto, t, "bad-key", closed=False)
    assert_nothing_stored(server)


def test_non_utf8_other_header(server: Server) -> None:
    """Non-UTF-8 bytes in a header other than a key: bad-header, kept."""
    proto, t = server.connect()
    proto.dataReceived(raw(b"ping 2", b"X-Note: \xff"))
    assert_rejected(proto, t, "bad-header", closed=False)


def test_bad_sha256_header(server: Server) -> None:
    """file_upload with an uppercase Sha256: bad-header, kept, payload skipped, no temp file."""
    proto, t = server.connect()
    proto.dataReceived(req("file_upload", 2, b"data", key="k", sha256=sha(b"data").upper()))
    assert_rejected(proto, t, "bad-header", closed=False)
    assert_nothing_stored(server)


def test_list_limit_not_a_number(server: Server) -> None:
    """list with Limit: -1: bad-header, kept."""
    proto, t = server.connect()
    proto.dataReceived(req("list", 2, limit="-1"))
    assert_rejected(proto, t, "bad-header", closed=False)


def test_list_limit_zero(server: Server) -> None:
    """list with Limit: 0 (well formed, refused by the handler): bad-header, kept."""
    proto, t = server.connect()
    proto.dataReceived(req("list", 2, limit="0"))
    got = responses(t)
    assert (got[-1][0].kind, got[-1][0].headers["code"]) == ("ERROR", "bad-header")
    assert got[-1][0].id == 2 and not t.disconnecting


# == authentication ========================================================================


def test_request_before_auth(server: Server) -> None:
    """Any request before auth: auth-required, closed."""
    proto, t = server.connect(authenticated=False)
    proto.dataReceived(req("ping", 2))
    assert_rejected(proto, t, "auth-required", closed=True)


def test_value_upload_before_auth(server: Server) -> None:
    """A value_upload with payload before auth: auth-required, closed, nothing stored."""
    proto, t = server.connect(authenticated=False)
    proto.dataReceived(req("value_upload", 2, b"hello", key="k"))
    assert_rejected(proto, t, "auth-required", closed=True)
    assert_nothing_stored(server)


def test_file_upload_before_auth(server: Server) -> None:
    """A file_upload before auth is never opened: no temp file, nothing stored."""
    proto, t = server.connect(authenticated=False)
    proto.dataReceived(req("file_upload", 2, b"hello" * 100, key="k"))
    assert_rejected(proto, t, "auth-required", closed=True)
    assert_nothing_stored(server)


def test_invalid_request_before_auth(server: Server) -> None:
    """A well-framed but invalid request before auth: auth-required, closed."""
    proto, t = server.connect(authenticated=False)
    proto.dataReceived(req("frobnicate", 2))
    assert_rejected(proto, t, "auth-required", closed=True)


def test_wrong_token(server: Server) -> None:
    """auth with the wrong token: auth-failed, closed."""
    proto, t = server.connect(authenticated=False)
    proto.dataReceived(req("auth", 2, token="guess"))
    assert_rejected(proto, t, "auth-failed", closed=True)


def test_token_prefix(server: Server) -> None:
    """A prefix of the token is not the token: auth-failed, closed."""
    proto, t = server.connect(authenticated=False)
    proto.dataReceived(req("auth", 2, token=TOKEN[:-1]))
    assert_rejected(proto, t, "auth-failed", closed=True)


def test_auth_missing_token(server: Server) -> None:
    """auth without a Token header: missing-header naming it, not authenticated, closed."""
    proto, t = server.connect(authenticated=False)
    proto.dataReceived(req("auth", 2, client="me"))
    head = assert_rejected(proto, t, "missing-header", closed=True)
    assert "token" in head.headers["message"]
    assert head.id == 2


def test_reauth_with_wrong_token(server: Server) -> None:
    """A second auth with a wrong token on an authenticated connection: auth-failed, closed."""
    proto, t = server.connect()
    proto.dataReceived(req("auth", 2, token="nope"))
    assert_rejected(proto, t, "auth-failed", closed=True)


def test_request_pipelined_after_auth(server: Server) -> None:
    """auth and a request in one write: both answered, in order."""
    proto, t = server.connect(authenticated=False)
    proto.dataReceived(req("auth", 1, token=TOKEN) + req("value_upload", 2, b"v", key="k"))
    assert [(h.kind, h.id) for h, _ in responses(t)] == [("OK", 1), ("OK", 2)]


# == the peer goes away ====================================================================


def test_peer_vanishes_mid_file_upload(server: Server) -> None:
    """connectionLost halfway through a file payload: no entry, tmp/ empty."""
    proto, t = server.connect()
    data = b"z" * 10_000
    request = req("file_upload", 2, data, key="k")
    proto.dataReceived(request[: len(request) - len(data) // 2])
    assert list((server.root / "tmp").iterdir()), "the upload should be under way"
    proto.connectionLost(Failure(ConnectionLost()))
    assert t.value() == b""
    assert_nothing_stored(server)
    assert server.factory.connections == 0


def test_peer_vanishes_mid_value_upload(server: Server) -> None:
    """connectionLost halfway through a value payload: nothing stored."""
    proto, t = server.connect()
    request = req("value_upload", 2, b"v" * 500, key="k")
    proto.dataReceived(request[:-250])
    proto.connectionLost(Failure(ConnectionLost()))
    assert t.value() == b""
    assert_nothing_stored(server)


def test_peer_vanishes_mid_download(server: Server) -> None:
    """connectionLost in the middle of a streamed download closes the file quietly."""
    upload_file(server, "k", b"d" * (BODY_CHUNK + 10))
    proto, t = server.connect()
    proto.dataReceived(req("file_retrieve", 2, key="k"))
    body = t.producer
    assert body is not None and t.streaming is False
    body.resumeProducing()
    proto.connectionLost(Failure(ConnectionLost()))
    assert body.body is None  # the file is closed


# == deadlines =============================================================================


def test_half_header_block_times_out(server: Server) -> None:
    """Half a header block then silence: nothing before head_timeout, then timeout, closed."""
    proto, t = server.connect()
    proto.dataReceived(b"value_upload 2\r\nKey: k\r\n")
    server.clock.advance(LIMITS.head_timeout - 0.1)
    assert t.value() == b"" and not t.disconnecting
    server.clock.advance(0.1)
    assert_rejected(proto, t, "timeout", closed=True)
    assert_nothing_stored(server)


def test_trickled_header_block_times_out(server: Server) -> None:
    """A byte a second does not extend the header deadline (slowloris)."""
    proto, t = server.connect()
    for byte in b"value_upload 2\r\n":
        proto.dataReceived(bytes([byte]))
        server.clock.advance(0.5)
        if t.disconnecting:
            break
    assert server.clock.seconds() <= LIMITS.head_timeout
    assert_rejected(proto, t, "timeout", closed=True)


def test_silent_connection_closed_at_auth_timeout(server: Server) -> None:
    """Never authenticating: nothing before auth_timeout, then timeout, closed."""
    proto, t = server.connect(authenticated=False)
    server.clock.advance(LIMITS.auth_timeout - 0.1)
    assert t.value() == b"" and not t.disconnecting
    server.clock.advance(0.1)
    assert_rejected(proto, t, "timeout", closed=True)
    assert server.factory.unauthenticated == 0


def test_chatty_unauthenticated_connection_closed_at_auth_timeout(server: Server) -> None:
    """Bytes that never complete an auth do not extend the auth deadline."""
    proto, t = server.connect(authenticated=False)
    for _ in range(int(LIMITS.auth_timeout)):
        proto.dataReceived(b"a")
        server.clock.advance(1)
    assert_rejected(proto, t, "timeout", closed=True)


def test_idle_connection_closed_at_idle_timeout(server: Server) -> None:
    """An idle authenticated connection is closed (silently) at idle_timeout, not before."""
    proto, t = server.connect()
    server.clock.advance(LIMITS.idle_timeout - 0.1)
    assert not t.disconnecting
    server.clock.advance(0.1)
    assert t.disconnecting and t.value() == b""
    proto.connectionLost(Failure(ConnectionDone()))
    assert server.factory.connections == 0
    assert not server.clock.getDelayedCalls()


def test_activity_postpones_idle_timeout(server: Server) -> None:
    """The idle deadline counts from the last request."""
    proto, t = server.connect()
    server.clock.advance(LIMITS.idle_timeout - 1)
    proto.dataReceived(req("ping", 2))
    server.clock.advance(LIMITS.idle_timeout - 0.1)
    assert not t.disconnecting
    server.clock.advance(0.1)
    assert t.disconnecting


def test_stalled_file_upload_times_out(server: Server) -> None:
    """A file payload that stalls: timeout after payload_timeout, closed, nothing left."""
    proto, t = server.connect()
    data = b"s" * 4096
    request = req("file_upload", 2, data, key="k")
    proto.dataReceived(request[:-1000])
    server.clock.advance(LIMITS.payload_timeout - 0.1)
    assert t.value() == b"" and not t.disconnecting
    server.clock.advance(0.1)
    head = assert_rejected(proto, t, "timeout", closed=True, dispatched=True)
    assert head.id == 2
    assert_nothing_stored(server)


def test_slow_file_upload_is_not_timed_out(server: Server) -> None:
    """A payload that keeps moving may take longer than payload_timeout in total."""
    proto, t = server.connect()
    data = b"q" * 1000
    proto.dataReceived(req("file_upload", 2, data, key="k", sha256=sha(data))[: -len(data)])
    for i in range(0, len(data), 100):
        server.clock.advance(LIMITS.payload_timeout - 1)
        proto.dataReceived(data[i : i + 100])
    assert summary(t)[0][:2] == ("OK", 2)
    assert server.store.stat("k").size == 1000


def test_partial_head_after_pending_reply_times_out(server: Server) -> None:
    """Half a head sent while a reply was pending gets head_timeout once the reply is out
    (not the longer idle_timeout: Connection.resume starts the head's deadline)."""
    deferring = Deferring()
    server.handler.run_in_thread = deferring
    proto, t = server.connect()
    proto.dataReceived(req("file_upload", 2, b"x", key="k") + b"ping 3\r\nX-A: 1\r\n")
    server.clock.advance(1)
    deferring.run_all()
    server.clock.advance(LIMITS.head_timeout - 0.1)
    assert summary(t) == [("OK", 2, "", b"")] and not t.disconnecting
    server.clock.advance(0.1)
    assert_rejected(proto, t, "timeout", closed=True)


def test_stalled_download_is_aborted(server: Server) -> None:
    """A peer that stops reading a download is cut off after payload_timeout."""
    upload_file(server, "k", b"d" * 100)
    proto, t = server.connect()
    proto.dataReceived(req("file_retrieve", 2, key="k"))
    assert t.producer is not None
    server.clock.advance(LIMITS.payload_timeout - 0.1)
    assert not t.disconnecting
    server.clock.advance(0.1)
    assert t.disconnecting
    proto.connectionLost(Failure(ConnectionLost()))


# == connection limits =====================================================================


def test_too_many_connections(server: Server) -> None:
    """One connection over max_connections: busy, closed; its slot is given back."""
    conns = [server.connect() for _ in range(LIMITS.max_connections)]
    proto, t = server.connect(authenticated=False)
    assert_rejected(proto, t, "busy", closed=True)
    assert server.factory.connections == LIMITS.max_connections
    conns[0][0].connectionLost(Failure(ConnectionDone()))
    proto, t = server.connect()
    assert not t.disconnecting


def test_too_many_unauthenticated(server: Server) -> None:
    """One unauthenticated connection over max_unauthenticated closes the oldest one
    once it has had its grace (tests/test_bounded_net.py holds the rest of the pool's
    rules)."""
    from dsml.net.preauth import AUTH_GRACE

    waiting = [server.connect(authenticated=False) for _ in range(LIMITS.max_unauthenticated)]
    server.clock.advance(AUTH_GRACE)
    proto, t = server.connect(authenticated=False)
    server.clock.advance(0)  # judged a reactor turn later
    assert not t.disconnecting and t.value() == b""
    assert waiting[0][1].disconnecting and not waiting[1][1].disconnecting


# == checksums and versions ================================================================


def test_file_upload_wrong_sha256(server: Server) -> None:
    """A wrong Sha256: checksum-mismatch, kept; the previous version is intact."""
    old = upload_file(server, "k", b"old contents")
    proto, t = server.connect()
    proto.dataReceived(req("file_upload", 2, b"new contents", key="k", sha256=sha(b"other")))
    assert_rejected(proto, t, "checksum-mismatch", closed=False, dispatched=True)
    entry = server.store.stat("k")
    assert (entry.version, entry.sha256) == (int(old.headers["version"]), sha(b"old contents"))
    assert len(stored_files(server)) == 1  # the old object only; no temp file left
    proto.dataReceived(req("file_retrieve", 3, key="k"))
    drain(t)
    assert responses(t)[-1][1] == b"old contents"


def test_framing_error_after_good_pipelined_request(server: Server) -> None:
    """A good request then garbage in one write: the good one is answered first."""
    proto, t = server.connect()
    proto.dataReceived(req("value_upload", 2, b"v", key="k") + b"garbage\r\n\r\n")
    assert [(h.kind, h.id) for h, _ in responses(t)] == [("OK", 2), ("ERROR", 0)]
    assert_rejected(proto, t, "bad-frame", closed=True)
    assert server.store.get_value("k")[1] == b"v"


# == path-like keys are plain names ========================================================


@pytest.mark.parametrize("key", ["../../etc/passwd", "/etc/passwd", "..", ".", "a/../../b"])
def test_path_like_keys_are_ordinary(server: Server, key: str) -> None:
    """Path-like keys are stored and retrieved as names; nothing lands outside the store."""
    proto, t = server.connect()
    proto.dataReceived(req("value_upload", 2, b"value", key=key))
    proto.dataReceived(req("value_retrieve", 3, key=key))
    proto.dataReceived(req("file_upload", 4, b"file", key=key + "f"))
    proto.dataReceived(req("file_retrieve", 5, key=key + "f"))
    drain(t)
    got = responses(t)
    assert [h.ok for h, _ in got] == [True] * 4
    assert (got[1][1], got[3][1]) == (b"value", b"file")
    assert [e.key for e in server.store.list()] == sorted([key, key + "f"])
    for path in server.tmp_path.rglob("*"):
        assert path.is_relative_to(server.root), path
    assert [p.parent.parent.name for p in stored_files(server)] == ["objects"]


#: Whether a header line can carry a MAX_KEY-byte key (and one byte more, to refuse it).
KEY_LINE_FITS = len("Key: ") + limits.MAX_KEY + 1 <= limits.MAX_LINE
needs_key_room = pytest.mark.xfail(
    not KEY_LINE_FITS,
    reason="limits.MAX_LINE is too small for a header line carrying a MAX_KEY-byte key: "
    "such a line is a framing error (bad-frame, closed) before the key is checked",
    strict=True,
    raises=AssertionError,
)


@needs_key_room
def test_key_over_1kib(server: Server) -> None:
    """A key of MAX_KEY + 1 bytes: bad-key, kept."""
    proto, t = server.connect()
    key = b"k" * (limits.MAX_KEY + 1)
    proto.dataReceived(raw(b"value_upload 2", b"Key: " + key, b"Length: 1", payload=b"x"))
    assert_rejected(proto, t, "bad-key", closed=False)
    assert_nothing_stored(server)


@needs_key_room
def test_key_of_max_key_bytes(server: Server) -> None:
    """A key of exactly MAX_KEY bytes is stored."""
    proto, t = server.connect()
    key = "k" * limits.MAX_KEY
    proto.dataReceived(req("value_upload", 2, b"v", key=key))
    assert summary(t) == [("OK", 2, "", b"")]
    assert server.store.list()[0].key == key


# == positive paths ========================================================================


def test_ping(server: Server) -> None:
    """ping answers OK with its id and no payload."""
    proto, t = server.connect()
    proto.dataReceived(req("ping", 77))
    assert summary(t) == [("OK", 77, "", b"")]


def test_pipelined_requests_answered_in_order(server: Server) -> None:
    """Many requests in one write are answered in order, ids matching."""
    proto, t = server.connect()
    batch = b"".join(
        req("value_upload", 100 + i, b"%d" % i, key=f"k{i}") for i in range(20)
    ) + b"".join(req("value_retrieve", 200 + i, key=f"k{i}") for i in range(20))
    proto.dataReceived(batch)
    got = responses(t)
    assert [h.id for h, _ in got] == [100 + i for i in range(20)] + [200 + i for i in range(20)]
    assert all(h.ok for h, _ in got)
    assert [p for _, p in got[20:]] == [b"%d" % i for i in range(20)]


def test_pipelined_files_and_values_in_one_write(server: Server) -> None:
    """Uploads, a streamed download and later requests in one write stay in order."""
    proto, t = server.connect()
    proto.dataReceived(
        req("file_upload", 2, b"F" * 3000, key="f")
        + req("file_retrieve", 3, key="f")
        + req("value_upload", 4, b"v", key="v")
        + req("stat", 5, key="v")
    )
    assert [h.id for h, _ in responses(t, complete=False)] == [2]  # the download waits
    drain(t)
    got = responses(t)
    assert [(h.kind, h.id) for h, _ in got] == [("OK", 2), ("OK", 3), ("OK", 4), ("OK", 5)]
    assert got[1][1] == b"F" * 3000


class PullingTransport(StringTransport):
    """Pulls a pull producer once inside registerProducer, as Twisted's TCP transport does."""

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        if not streaming:
            producer.resumeProducing()


def test_long_pipeline_of_small_downloads(server: Server) -> None:
    """Thousands of pipelined small downloads, each finished inside registerProducer,
    are answered by one loop: no recursion per request (Connection._pump never nests)."""
    upload_file(server, "k", b"tiny")
    proto = server.factory.buildProtocol(None)
    t = PullingTransport()
    proto.makeConnection(t)
    n = 3000
    proto.dataReceived(
        req("auth", 1, token=TOKEN)
        + b"".join(req("file_retrieve", 10 + i, key="k") for i in range(n))
    )
    got = responses(t)
    assert [h.id for h, _ in got] == [1] + [10 + i for i in range(n)]
    assert all(p == b"tiny" for _, p in got[1:])
    assert t.streaming and t.producerState == "producing"  # only the output gate is left


def test_long_pipeline_of_uploads_answered_inline(server: Server) -> None:
    """Pipelined file uploads whose Deferreds fire at once are answered without nesting."""
    proto, t = server.connect()
    n = 200
    proto.dataReceived(b"".join(req("file_upload", 10 + i, b"f", key=f"k{i}") for i in range(n)))
    assert [(h.kind, h.id) for h, _ in responses(t)] == [("OK", 10 + i) for i in range(n)]


PIPELINE = (
    req("ping", 10)
    + req("value_upload", 11, b"hello", key="a")
    + req("value_retrieve", 12, key="a")
    + req("frobnicate", 13, b"junk")
    + req("delete", 14, key="a")
    + req("value_retrieve", 15, key="a")
)
PIPELINE_ANSWERS = [
    ("OK", 10, "", b""),
    ("OK", 11, "", b""),
    ("OK", 12, "", b"hello"),
    ("ERROR", 13, "unknown-method", b""),
    ("OK", 14, "", b""),
    ("ERROR", 15, "not-found", b""),
]


def test_pipeline_split_at_every_byte_boundary(server: Server) -> None:
    """A short pipeline cut in two at every offset gets the same answers."""
    for cut in range(len(PIPELINE) + 1):
        proto, t = server.connect()
        proto.dataReceived(PIPELINE[:cut])
        proto.dataReceived(PIPELINE[cut:])
        assert summary(t) == PIPELINE_ANSWERS, cut
        proto.connectionLost(Failure(ConnectionDone()))


def test_pipeline_one_byte_at_a_time(server: Server) -> None:
    """The same pipeline fed a byte at a time gets the same answers."""
    proto, t = server.connect()
    for i in range(len(PIPELINE)):
        proto.dataReceived(PIPELINE[i : i + 1])
    assert summary(t) == PIPELINE_ANSWERS


def test_zero_length_value(server: Server) -> None:
    """An empty value is stored and retrieved as empty."""
    proto, t = server.connect()
    proto.dataReceived(req("value_upload", 2, key="k") + req("value_retrieve", 3, key="k"))
    got = responses(t)
    assert [(h.kind, h.id, p) for h, p in got] == [("OK", 2, b""), ("OK", 3, b"")]
    assert got[0][0].headers["size"] == "0" and got[0][0].headers["sha256"] == sha(b"")


def test_zero_length_file(server: Server) -> None:
    """An empty file round-trips; its download needs no producer."""
    proto, t = server.connect()
    proto.dataReceived(req("file_upload", 2, key="k", sha256=sha(b"")))
    proto.dataReceived(req("file_retrieve", 3, key="k"))
    assert t.streaming  # no download producer: only the output gate
    got = responses(t)
    assert [(h.kind, h.id, p) for h, p in got] == [("OK", 2, b""), ("OK", 3, b"")]
    assert got[1][0].headers["size"] == "0"


def test_file_round_trip_streamed(server: Server) -> None:
    """A multi-chunk file uploads in pieces and downloads through the pull producer."""
    data = bytes(range(256)) * (BODY_CHUNK * 5 // 2 // 256)
    proto, t = server.connect()
    request = req("file_upload", 2, data, key="big", sha256=sha(data))
    for i in range(0, len(request), 300_000):
        proto.dataReceived(request[i : i + 300_000])
    [(up, _)] = responses(t)
    assert up.ok and up.headers["size"] == str(len(data)) and up.headers["sha256"] == sha(data)
    t.clear()
    proto.dataReceived(req("file_retrieve", 3, key="big"))
    assert t.producerState == "paused"  # reads nothing more while the download runs
    assert drain(t) == 3
    assert t.producerState == "producing"
    [(head, payload)] = responses(t)
    assert head.ok and head.id == 3
    assert head.headers["action"] == "write-file"
    assert head.headers["size"] == str(len(data))
    assert head.headers["sha256"] == sha(data)
    assert head.headers["version"] == up.headers["version"]
    assert payload == data
    assert list((server.root / "tmp").iterdir()) == []


def test_list_prefix_and_paging(server: Server) -> None:
    """list with Prefix and Limit pages with More: 1 and After."""
    proto, t = server.connect()
    for i, key in enumerate(["a/1", "a/2", "a/3", "b/1"]):
        proto.dataReceived(req("value_upload", 10 + i, b"x" * i, key=key))
    t.clear()
    proto.dataReceived(req("list", 20, prefix="a/", limit="2"))
    proto.dataReceived(req("list", 21, prefix="a/", limit="2", after="a/2"))
    (h1, p1), (h2, p2) = responses(t)
    page1 = [json.loads(line) for line in p1.decode().splitlines()]
    page2 = [json.loads(line) for line in p2.decode().splitlines()]
    assert [e["key"] for e in page1] == ["a/1", "a/2"] and h1.headers.get("more") == "1"
    assert [e["key"] for e in page2] == ["a/3"] and "more" not in h2.headers
    assert page2[0]["size"] == 2 and page2[0]["kind"] == "value"


def test_list_empty(server: Server) -> None:
    """list on an empty store: OK, no payload, no More."""
    proto, t = server.connect()
    proto.dataReceived(req("list", 2))
    [(head, payload)] = responses(t)
    assert head.ok and payload == b"" and "more" not in head.headers


def test_stat(server: Server) -> None:
    """stat reports kind, size, sha256, version and mtime."""
    up = upload_file(server, "k", b"12345")
    proto, t = server.connect()
    proto.dataReceived(req("stat", 2, key="k"))
    [(head, _)] = responses(t)
    assert head.ok
    h = head.headers
    assert (h["kind"], h["size"], h["sha256"]) == ("file", "5", sha(b"12345"))
    assert h["version"] == up.headers["version"]
    assert float(h["mtime"]) > 0


def test_stat_missing(server: Server) -> None:
    """stat of a missing key: not-found, kept."""
    proto, t = server.connect()
    proto.dataReceived(req("stat", 2, key="nope"))
    assert summary(t) == [("ERROR", 2, "not-found", b"")]
    assert not t.disconnecting


def test_delete_then_retrieve(server: Server) -> None:
    """After delete, file_retrieve is not-found and the object is gone."""
    upload_file(server, "k", b"contents")
    proto, t = server.connect()
    proto.dataReceived(req("delete", 2, key="k") + req("file_retrieve", 3, key="k"))
    assert summary(t) == [("OK", 2, "", b""), ("ERROR", 3, "not-found", b"")]
    assert_nothing_stored(server)


def test_value_retrieve_of_a_file(server: Server) -> None:
    """value_retrieve of a key holding a file: wrong-kind, kept."""
    upload_file(server, "k", b"file")
    proto, t = server.connect()
    proto.dataReceived(req("value_retrieve", 2, key="k"))
    assert summary(t) == [("ERROR", 2, "wrong-kind", b"")]


def test_overwrite_gets_a_higher_version(server: Server) -> None:
    """Each write of a key returns a higher version; the last one wins."""
    proto, t = server.connect()
    proto.dataReceived(req("value_upload", 2, b"one", key="k"))
    proto.dataReceived(req("file_upload", 3, b"two", key="k"))
    proto.dataReceived(req("value_upload", 4, b"three", key="k"))
    proto.dataReceived(req("value_retrieve", 5, key="k"))
    got = responses(t)
    versions = [int(h.headers["version"]) for h, _ in got]
    assert versions[0] < versions[1] < versions[2] == versions[3]
    assert got[3][1] == b"three"
    assert stored_files(server) == []  # the file's object went with the overwrite


def test_transport_paused_while_reply_pending(server: Server) -> None:
    """While a reply is pending the transport is paused; later requests wait their turn."""
    deferring = Deferring()
    server.handler.run_in_thread = deferring
    proto, t = server.connect()
    proto.dataReceived(req("file_upload", 2, b"data", key="f"))
    assert t.producerState == "paused" and t.value() == b""
    assert len(deferring.pending) == 1
    proto.dataReceived(req("ping", 3) + req("value_upload", 4, b"v", key="v"))
    assert t.value() == b"" and server.store.count == 0  # nothing ran ahead
    deferring.run_all()
    assert [(h.kind, h.id) for h, _ in responses(t)] == [("OK", 2), ("OK", 3), ("OK", 4)]
    assert t.producerState == "producing"
    assert server.store.count == 2


def test_failed_pending_reply_then_pipeline(server: Server) -> None:
    """A pending upload that fails (checksum) is answered, then the pipeline goes on."""
    deferring = Deferring()
    server.handler.run_in_thread = deferring
    proto, t = server.connect()
    proto.dataReceived(req("file_upload", 2, b"data", key="f", sha256=sha(b"x")) + req("ping", 3))
    assert t.producerState == "paused" and t.value() == b""
    deferring.run_all()
    assert summary(t) == [("ERROR", 2, "checksum-mismatch", b""), ("OK", 3, "", b"")]
    assert t.producerState == "producing"
    assert_nothing_stored(server)


def test_peer_gone_while_reply_pending(server: Server) -> None:
    """If the peer leaves while a reply is pending, the late reply is dropped quietly."""
    deferring = Deferring()
    server.handler.run_in_thread = deferring
    proto, t = server.connect()
    proto.dataReceived(req("file_upload", 2, b"data", key="f"))
    proto.connectionLost(Failure(ConnectionLost()))
    deferring.run_all()
    assert t.value() == b""
    assert list((server.root / "tmp").iterdir()) == []
