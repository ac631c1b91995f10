"""Tests of the sans-IO wire codec (:mod:`dsml.protocol.codec`), synchronous, no Twisted.

Hypothesis properties first (round trip, any chunking, garbage, pipelining), then one
short unit test per framing or validation rule, each asserting the exact error code.
docs/protocol.md is the specification these tests hold the codec to.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsml.protocol import limits
from dsml.protocol.codec import (
    END,
    NEED_DATA,
    Data,
    Head,
    Parser,
    ProtocolError,
    Rejected,
    ResponseShape,
    encode_error,
    encode_head,
    encode_key_request,
    encode_request,
    encode_response,
    quick_request,
    quick_response,
)
from dsml.protocol.methods import check_key, storage_methods

METHODS = storage_methods()
#: A table with a tiny value limit, so "too large" values are cheap to generate.
SMALL_VALUE_MAX = 64
SMALL = storage_methods(value_max=SMALL_VALUE_MAX)

#: The request that follows a Rejected one in unit tests: it must still parse.
NEXT = b"ping 99\r\n\r\n"
NEXT_EVENTS = [Head("ping", 99, {"method": "ping"}, 0), END]

HEAVY = settings(max_examples=200, deadline=None)
LIGHT = settings(max_examples=100, deadline=None)

# A header line must hold the longest header name that carries a key ("Prefix: ") plus
# a key one byte over MAX_KEY, so that such a key is answered bad-key rather than being
# a framing error.  With MAX_LINE = MAX_KEY = 1024 this does not hold (see the report and
# docs/protocol.md, "Known issue"); the tests that need it are expected to fail until
# limits.MAX_LINE is raised, and run normally from then on.
_KEY_LINE_FITS = len("Prefix: ") + limits.MAX_KEY + 1 <= limits.MAX_LINE
_needs_key_room = pytest.mark.xfail(
    not _KEY_LINE_FITS,
    reason="limits.MAX_LINE is too small for a header line carrying a MAX_KEY-byte key",
    strict=True,
    raises=(ProtocolError, ValueError, AssertionError),
)
#: The longest key (in UTF-8 bytes) that the generated requests use.
KEY_ROOM = limits.MAX_KEY if _KEY_LINE_FITS else limits.MAX_LINE - len("Prefix: ")


# -- helpers ---------------------------------------------------------------------------


def new_parser(role: str = "request", methods=METHODS) -> Parser:
    return Parser(role, methods if role == "request" else None)


def drain(parser: Parser) -> list:
    """All events up to NEED_DATA (a ProtocolError propagates)."""
    out = []
    while (event := parser.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def parse(data: bytes, role: str = "request", methods=METHODS) -> list:
    """Feed ``data`` whole and return the events."""
    parser = new_parser(role, methods)
    parser.feed(data)
    return drain(parser)


def framing_error(data: bytes, role: str = "request", methods=METHODS) -> ProtocolError:
    """The ProtocolError that ``data`` raises (fed whole)."""
    with pytest.raises(ProtocolError) as info:
        parse(data, role, methods)
    return info.value


def assert_rejected(data: bytes, code: str, methods=METHODS) -> Rejected:
    """``data`` is one Rejected request with ``code``; the request after it parses."""
    events = parse(data + NEXT, methods=methods)
    assert len(events) == 3, events
    rejected = events[0]
    assert isinstance(rejected, Rejected), rejected
    assert rejected.code == code, rejected
    assert events[1:] == NEXT_EVENTS
    return rejected


def normalize(events: list) -> list[tuple]:
    """Events as tuples, with the Data chunks of each message joined into one."""
    out: list[tuple] = []
    for event in events:
        if isinstance(event, Head):
            out.append(("head", event.kind, event.id, event.headers, event.length))
        elif isinstance(event, Data):
            if out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + event.data)
            else:
                out.append(("data", event.data))
        elif event is END:
            out.append(("end",))
        elif isinstance(event, Rejected):
            out.append(("rejected", event.id, event.code, event.message))
        elif isinstance(event, tuple):  # ("error", code) from run()
            out.append(event)
        else:
            raise AssertionError(f"unexpected event {event!r}")
    return out


def check_grammar(events: list) -> None:
    """Events obey: (Head Data* END | Rejected)*, and Data adds up to Head.length."""
    head = None
    got = 0
    for event in events:
        if isinstance(event, Head):
            assert head is None, "Head inside a message"
            head, got = event, 0
        elif isinstance(event, Data):
            assert head is not None and event.data, "stray or empty Data"
            got += len(event.data)
            assert got <= head.length, "more payload than Length"
        elif event is END:
            assert head is not None and got == head.length, "END before the payload is complete"
            head = None
        elif isinstance(event, Rejected):
            assert head is None, "Rejected inside a message"
        elif not isinstance(event, tuple):
            raise AssertionError(f"unexpected event {event!r}")


def run(parser: Parser, chunks: list[bytes]) -> list:
    """Feed ``chunks`` one by one, draining after each; end with ("error", code) on a
    ProtocolError.  Whenever the parser waits (NEED_DATA) it holds at most one header
    block: payload bytes are handed out as they arrive and skipped bytes are dropped."""
    events: list = []
    for chunk in chunks:
        try:
            parser.feed(chunk)
            while (event := parser.next_event()) is not NEED_DATA:
                events.append(event)
        except ProtocolError as e:
            events.append(("error", e.code))
            return events
        assert parser.buffered <= limits.MAX_HEAD, parser.buffered
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets."""
    points = sorted({0, len(data), *(c for c in cuts if 0 <= c <= len(data))})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def chunked(data: bytes, rnd: random.Random, mode: str) -> list[bytes]:
    """``data`` in chunks: 1 byte each, small random sizes, or a few random cuts."""
    if mode == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    if mode == "small":
        out, i = [], 0
        while i < len(data):
            n = rnd.randint(1, 9)
            out.append(data[i : i + n])
            i += n
        return out
    return split(data, [rnd.randint(0, len(data)) for _ in range(rnd.randint(0, 12))])


# -- strategies ------------------------------------------------------------------------

_C0_DEL = "".join(chr(c) for c in range(0x20) if c != 0x09) + "\x7f"
_C1 = "".join(chr(c) for c in range(0x80, 0xA0))

#: Header value text: any UTF-8 text without control characters (TAB and C1 allowed).
header_text = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters=_C0_DEL), max_size=60
)

_key_chars = st.characters(exclude_categories=("Cs",), exclude_characters=_C0_DEL + _C1 + "\t")

#: Valid keys: odd-looking names, arbitrary unicode, and long ones up to KEY_ROOM bytes.
keys = st.one_of(
    st.sampled_from(
        [
            "../x",
            "../../etc/passwd",
            "/abs/path",
            "a b",
            " lead",
            "trail ",
            "C:\\x",
            "a: b",
            "\u00e9",
            "\u65e5\u672c\u8a9e/\u30ad\u30fc",
            "\U0001f642",
            "x" * KEY_ROOM,
        ]
    ),
    st.text(_key_chars, min_size=1, max_size=40),
    st.integers(1, KEY_ROOM).map(lambda n: "k" * n),
    st.integers(1, KEY_ROOM // 3).map(lambda n: "\u65e5" * n),
).filter(lambda k: len(k.encode()) <= KEY_ROOM)

sha256s = st.text("0123456789abcdef", min_size=64, max_size=64)
digits = st.integers(0, 10**18 - 1).map(str)


def cased(name: str) -> st.SearchStrategy[str]:
    """A header name in any of several spellings (names are case-insensitive)."""
    return st.sampled_from([name, name.lower(), name.upper(), name.swapcase()])


#: Every header name some method checks, plus the two the codec reserves.
_KNOWN = {n for spec in METHODS.specs.values() for n in spec.headers} | {"length", "method"}
extra_names = st.from_regex(r"[A-Za-z0-9-]{1,64}", fullmatch=True).filter(
    lambda n: n.lower() not in _KNOWN
)


@st.composite
def valid_requests(draw, methods=METHODS, max_payload: int = 2000):
    """(method, headers, payload) of a request that ``methods`` accepts."""
    method = draw(st.sampled_from(sorted(methods.specs)))
    headers: dict[str, str] = {}

    def put(name: str, value: str) -> None:
        headers[draw(cased(name))] = value

    if method == "auth":
        put("Token", draw(header_text))
        if draw(st.booleans()):
            put("Client", draw(header_text))
    elif method == "list":
        if draw(st.booleans()):
            put("Prefix", draw(st.one_of(st.just(""), keys)))
        if draw(st.booleans()):
            put("After", draw(keys))
        if draw(st.booleans()):
            put("Limit", draw(digits))
    elif method == "task_log":
        put("Attempt", draw(digits))
        put("Stream", draw(st.sampled_from(["stdout", "stderr"])))
        if draw(st.booleans()):
            put("Offset", draw(digits))
    elif method != "ping":
        put("Key", draw(keys))
        if method == "file_upload" and draw(st.booleans()):
            put("Sha256", draw(sha256s))
        if method in ("file_upload", "value_upload") and draw(st.booleans()):
            put("Version", draw(digits))
    # Headers a method does not know are carried through unchecked.
    for name in draw(st.lists(extra_names, max_size=2, unique_by=str.lower)):
        headers[name] = draw(header_text)
    limit = min(methods.get(method).max_payload, max_payload)
    payload = draw(st.binary(max_size=limit))
    return method, headers, payload


def expected_head(method: str, req_id: int, headers: dict, payload: bytes) -> Head:
    lowered = {name.lower(): str(value) for name, value in headers.items()}
    lowered["method"] = method
    return Head(method, req_id, lowered, len(payload))


def message_events(head: Head, payload: bytes) -> list[tuple]:
    return normalize([head, *([Data(payload)] if payload else []), END])


#: Unknown method names that still make a well-formed request line.
unknown_methods = st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True).filter(
    lambda m: SMALL.get(m) is None
)


@st.composite
def stream_items(draw, req_id: int):
    """One request for the chunking property: (bytes, expected normalized events).

    Valid requests (often with empty payloads) and requests the parser Rejects; the
    Rejected ones carry payloads that the parser must skip.
    """
    kind = draw(
        st.sampled_from(
            [
                "valid",
                "valid",
                "valid",
                "empty",
                "unknown",
                "missing",
                "bad-key",
                "bad-utf8",
                "too-large",
                "method-header",
            ]
        )
    )
    if kind in ("valid", "empty"):
        method, headers, payload = draw(valid_requests(SMALL, max_payload=300))
        if kind == "empty":
            payload = b""
        data = encode_request(method, req_id, headers, payload)
        return data, message_events(expected_head(method, req_id, headers, payload), payload)
    payload = draw(st.binary(max_size=100))
    if kind == "unknown":
        data = encode_request(draw(unknown_methods), req_id, {}, payload)
        code = "unknown-method"
    elif kind == "missing":
        method = draw(st.sampled_from(["stat", "delete", "value_upload", "auth"]))
        data = encode_request(method, req_id, {}, payload)
        code = "missing-header"
    elif kind == "bad-key":
        key = draw(st.sampled_from(["", "a\tb", "\u0085", "x\u009f"]))
        data = encode_request("value_upload", req_id, {"Key": key}, payload)
        code = "bad-key"
    elif kind == "bad-utf8":
        data = b"value_upload %d\r\nKey: \xff\xfe\r\nLength: %d\r\n\r\n" % (req_id, len(payload))
        data += payload
        code = "bad-key"
    elif kind == "too-large":
        payload = draw(st.binary(min_size=SMALL_VALUE_MAX + 1, max_size=SMALL_VALUE_MAX + 50))
        data = encode_request("value_upload", req_id, {"Key": "k"}, payload)
        code = "too-large"
    else:
        data = b"ping %d\r\nMethod: ping\r\nLength: %d\r\n\r\n" % (req_id, len(payload))
        data += payload
        code = "bad-header"
    return data, [("rejected", req_id, code, ANY)]


class _Any:
    def __eq__(self, other: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()

#: Heads that are framing errors: the parser raises ProtocolError("bad-frame").
BAD_FRAMES = [
    b"ping 1\nX: y\r\n\r\n",
    b"PING 1\r\n\r\n",
    b"ping 1\r\nLength: +5\r\n\r\nhello",
    b"ping 1\r\nX: a\rb\r\n\r\n",
    b"ping 1\r\nX: a\x00b\r\n\r\n",
    b"ping 1\r\nKey: a\r\nkey: b\r\n\r\n",
    b"ping 1\r\nX: " + b"a" * limits.MAX_LINE + b"\r\n\r\n",
    b"\r\n\r\n",
]


@st.composite
def request_streams(draw):
    """Several pipelined requests, perhaps ended by a framing error, with the events
    they must produce."""
    n = draw(st.integers(1, 6))
    data, expected = b"", []
    for req_id in range(1, n + 1):
        d, e = draw(stream_items(req_id))
        data += d
        expected += e
    if draw(st.integers(0, 3)) == 0:
        data += draw(st.sampled_from(BAD_FRAMES)) + b"ping 1000\r\n\r\n"
        expected.append(("error", "bad-frame"))
    return data, expected


@st.composite
def responses(draw, req_id: int = -1):
    """(bytes, expected Head, payload) of a response from encode_response or encode_error."""
    if req_id < 0:
        req_id = draw(st.integers(0, 10**limits.MAX_ID_DIGITS - 1))
    if draw(st.integers(0, 2)) == 0:
        code = draw(st.sampled_from(["not-found", "bad-key", "internal", "too-large"]))
        message = draw(header_text)
        data = encode_error(req_id, code, message)
        return data, Head("ERROR", req_id, {"code": code, "message": message}, 0), b""
    ok = draw(st.booleans())
    names = draw(st.lists(extra_names, max_size=6, unique_by=str.lower))
    headers = {name: draw(st.one_of(header_text, st.integers(0, 2**63).map(str))) for name in names}
    payload = draw(st.binary(max_size=300))
    data = encode_response(ok, req_id, headers, payload)
    lowered = {name.lower(): value for name, value in headers.items()}
    return data, Head("OK" if ok else "ERROR", req_id, lowered, len(payload)), payload


# -- properties: round trip --------------------------------------------------------------


@HEAVY
@given(request=valid_requests(), req_id=st.integers(0, 10**limits.MAX_ID_DIGITS - 1))
def test_request_round_trip(request, req_id):
    """Any valid request encodes and parses back to an equal Head (lowercase header
    names plus "method") followed by the same payload bytes and END."""
    method, headers, payload = request
    events = parse(encode_request(method, req_id, headers, payload))
    assert normalize(events) == message_events(
        expected_head(method, req_id, headers, payload), payload
    )


@HEAVY
@given(response=responses())
def test_response_round_trip(response):
    """Any response from encode_response or encode_error parses back, through a
    response parser, to an equal Head and the same payload."""
    data, head, payload = response
    assert normalize(parse(data, role="response")) == message_events(head, payload)


@LIGHT
@given(
    headers=st.dictionaries(st.text(max_size=70), st.text(max_size=80), max_size=5),
    length=st.integers(-5, 10**limits.MAX_LENGTH_DIGITS + 5),
)
def test_encode_head_output_always_parses(headers, length):
    """encode_head either refuses its arguments with ValueError or produces a head that
    the parser accepts with exactly those headers: it never emits a framing error."""
    try:
        data = encode_head("OK 7", headers, length)
    except ValueError:
        return
    events = parse(data, role="response")
    lowered = {name.lower(): value for name, value in headers.items()}
    assert events[0] == Head("OK", 7, lowered, length)


@LIGHT
@given(message=st.text(max_size=1500), req_id=st.integers(0, 10**12 - 1))
def test_encode_error_always_parses(message, req_id):
    """encode_error accepts any text (controls, CR/LF, surrogates, long multibyte text)
    and produces one ERROR response carrying a single-line, control-free Message that
    fits a header line; control characters become spaces."""
    (head, end) = parse(encode_error(req_id, "internal", message), role="response")
    assert end is END
    assert head.kind == "ERROR" and head.id == req_id and set(head.headers) == {"code", "message"}
    got = head.headers["message"]
    assert len(got.encode()) <= limits.MAX_LINE - len("Message: ")
    clean = "".join(
        " " if c in _C0_DEL else "?" if "\ud800" <= c <= "\udfff" else c for c in message
    )
    assert clean.startswith(got)
    if len(clean.encode()) <= limits.MAX_LINE - 16:
        assert got == clean


# -- properties: chunking and pipelining ----------------------------------------------------


@HEAVY
@given(
    stream=request_streams(),
    rnd=st.randoms(use_true_random=False),
    mode=st.sampled_from(["bytes", "small", "cuts", "cuts"]),
)
def test_any_chunking_gives_the_same_events(stream, rnd, mode):
    """Several pipelined requests (valid ones, empty payloads, Rejected ones whose
    payloads are skipped, perhaps a final framing error) give the expected events in
    order, whether fed whole or split at arbitrary points (down to 1-byte chunks);
    only the Data chunking may differ, so payloads are compared joined per message."""
    data, expected = stream
    whole = run(Parser("request", SMALL), [data])
    check_grammar(whole)
    assert normalize(whole) == expected
    pieces = run(Parser("request", SMALL), chunked(data, rnd, mode))
    check_grammar(pieces)
    assert normalize(pieces) == normalize(whole)


@LIGHT
@given(
    items=st.lists(responses(req_id=0), min_size=1, max_size=5),
    rnd=st.randoms(use_true_random=False),
    mode=st.sampled_from(["bytes", "small", "cuts"]),
)
def test_pipelined_responses_come_out_in_order(items, rnd, mode):
    """Responses pipelined on one connection come out in the order they went in, with
    their payloads, however the bytes are chunked."""
    data, expected = b"", []
    for i, (_, head, payload) in enumerate(items):
        head.id = i
        if head.kind == "ERROR" and set(head.headers) == {"code", "message"}:
            data += encode_error(i, head.headers["code"], head.headers["message"])
        else:
            data += encode_response(head.kind == "OK", i, head.headers, payload)
        expected += message_events(head, payload)
    events = run(Parser("response"), chunked(data, rnd, mode))
    check_grammar(events)
    assert normalize(events) == expected


# -- properties: garbage --------------------------------------------------------------------

_VALID = [
    encode_request("value_upload", 3, {"Key": "a/b"}, b"0123456789"),
    encode_request("ping", 4, {}),
    encode_request("list", 5, {"Prefix": "x", "Limit": 10}),
    encode_response(True, 6, {"Version": 9}, b"payload"),
    encode_error(7, "not-found", "key 'x' not found"),
]


@st.composite
def garbage(draw):
    """Hostile input: random bytes, a valid prefix plus random bytes, a valid message with
    one byte changed, or a short random pattern repeated past MAX_HEAD."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=600))
    if kind == 1:
        prefix = draw(st.sampled_from(_VALID))
        return prefix[: draw(st.integers(0, len(prefix)))] + draw(st.binary(max_size=300))
    if kind == 2:
        msg = bytearray(b"".join(draw(st.lists(st.sampled_from(_VALID), min_size=1, max_size=3))))
        msg[draw(st.integers(0, len(msg) - 1))] = draw(st.integers(0, 255))
        return bytes(msg)
    start = draw(st.sampled_from([b"", b"ping 1\r\n", b"OK 1\r\n", b"stat 2\r\nKey: x\r\n"]))
    unit = draw(
        st.sampled_from([b"a", b"X: y\r\n", b"\r\n", b"Length: 1\r\n"])
        | st.binary(min_size=1, max_size=40)
    )
    return start + unit * draw(st.integers(1, (limits.MAX_HEAD + 2000) // len(unit)))


@HEAVY
@given(
    data=garbage(),
    role=st.sampled_from(["request", "response"]),
    rnd=st.randoms(use_true_random=False),
    mode=st.sampled_from(["bytes", "small", "cuts"]),
)
def test_garbage_only_raises_protocol_error(data, role, rnd, mode):
    """Arbitrary bytes in arbitrary chunks never raise anything but ProtocolError, the
    events obey the grammar, and whenever the parser asks for more data it holds at most
    one header block (MAX_HEAD bytes), so memory stays bounded.  Once ProtocolError is
    raised, every further feed and next_event raise it again."""
    if mode == "bytes" and len(data) > 3000:
        mode = "cuts"
    parser = new_parser(role, SMALL)
    events = run(parser, chunked(data, rnd, mode))
    check_grammar(events)
    if events and isinstance(events[-1], tuple):
        code = events[-1][1]
        for action in (lambda: parser.feed(b"ping 1\r\n\r\n"), parser.next_event):
            with pytest.raises(ProtocolError) as info:
                action()
            assert info.value.code == code
        assert parser.buffered == 0


def test_waiting_head_never_buffers_more_than_max_head():
    """A peer that trickles a header block one byte at a time is cut off as soon as the
    block passes MAX_HEAD; until then the parser holds no more than what was fed."""
    parser = new_parser()
    line = b"X-Pad: " + b"a" * 993 + b"\r\n"  # 1002 bytes per header line
    data = b"ping 1\r\n" + line * 20
    fed = 0
    with pytest.raises(ProtocolError) as info:
        for i in range(len(data)):
            parser.feed(data[i : i + 1])
            fed += 1
            assert parser.next_event() is NEED_DATA
            assert parser.buffered == fed <= limits.MAX_HEAD
    assert info.value.code == "bad-frame"
    assert fed == limits.MAX_HEAD + 1


def test_payload_is_handed_out_as_it_arrives():
    """In the payload state every fed byte comes straight out as Data: nothing is
    accumulated however large the declared Length."""
    parser = new_parser()
    parser.feed(encode_request("file_upload", 1, {"Key": "big"}, 10**limits.MAX_LENGTH_DIGITS - 1))
    assert isinstance(parser.next_event(), Head)
    for size in (1, 1000, 65536):
        parser.feed(b"x" * size)
        assert parser.next_event() == Data(b"x" * size)
        assert parser.buffered == 0
        assert parser.next_event() is NEED_DATA


# -- unit tests: pipelining ------------------------------------------------------------------


def test_requests_come_out_in_order():
    """Pipelined requests come out in the order they went in, each complete before the
    next starts."""
    data = b"".join(encode_request("value_upload", i, {"Key": f"k{i}"}, b"v" * i) for i in range(5))
    events = normalize(parse(data))
    heads = [e for e in events if e[0] == "head"]
    assert [h[2] for h in heads] == [0, 1, 2, 3, 4]
    assert events[:2] == [
        ("head", "value_upload", 0, {"key": "k0", "method": "value_upload"}, 0),
        ("end",),
    ]


def test_zero_length_payload_gives_head_then_end_at_once():
    """A request without payload yields Head then END at once, with no Data, and the
    parser is idle afterwards."""
    parser = new_parser()
    parser.feed(b"value_upload 1\r\nKey: k\r\n\r\n")
    assert parser.next_event() == Head("value_upload", 1, {"key": "k", "method": "value_upload"}, 0)
    assert parser.next_event() is END
    assert parser.next_event() is NEED_DATA
    assert parser.idle


def test_explicit_length_zero_is_no_payload():
    """``Length: 0`` is the same as no Length header, even for a method without payload."""
    assert parse(b"ping 1\r\nLength: 0\r\n\r\n") == [Head("ping", 1, {"method": "ping"}, 0), END]


def test_idle_only_between_messages():
    """``idle`` is true only with nothing buffered and no message in progress."""
    parser = new_parser()
    assert parser.idle
    parser.feed(b"value_upload 1\r\nKey: k\r\nLength: 2\r\n\r\na")
    assert not parser.idle
    drain(parser)
    assert not parser.idle
    parser.feed(b"b")
    assert normalize(drain(parser)) == [("data", b"b"), ("end",)]
    assert parser.idle


# -- unit tests: line and block limits ---------------------------------------------------------


def pad_line(n: int, name: str = "X-Pad") -> bytes:
    """A header line of exactly ``n`` bytes (without its CRLF)."""
    head = name.encode() + b": "
    return head + b"a" * (n - len(head))


def test_line_of_max_line_bytes_is_accepted():
    """A header line of exactly MAX_LINE bytes is fine."""
    events = parse(b"ping 1\r\n" + pad_line(limits.MAX_LINE) + b"\r\n\r\n")
    assert events[0].headers["x-pad"] == "a" * (limits.MAX_LINE - 7)


def test_line_longer_than_max_line_in_complete_head():
    """A complete head with a header line over MAX_LINE bytes is a framing error."""
    e = framing_error(b"ping 1\r\n" + pad_line(limits.MAX_LINE + 1) + b"\r\n\r\n")
    assert e.code == "bad-frame" and "line longer" in e.message


def test_line_longer_than_max_line_that_never_ends():
    """A line that keeps growing without CRLF fails as soon as it passes MAX_LINE (plus a
    CR that may still get its LF), without waiting for the end of the head."""
    parser = new_parser()
    parser.feed(b"ping 1\r\n" + pad_line(limits.MAX_LINE) + b"\r")
    assert parser.next_event() is NEED_DATA
    parser.feed(b"a")
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    assert info.value.code == "bad-frame"


def test_start_line_that_never_ends():
    """A first line without CRLF fails once it passes MAX_LINE."""
    parser = new_parser()
    parser.feed(b"a" * (limits.MAX_LINE + 2))
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    assert info.value.code == "bad-frame"


def head_of_size(total: int) -> bytes:
    """A ping request whose header block (blank line included) is ``total`` bytes."""
    lines, room, i = [b"ping 1"], total - len(b"ping 1") - 4, 0
    while room:
        n = min(1000, room - 2) if room - 2 > 1000 + 12 else room - 2
        lines.append(pad_line(n, f"X-{i}"))
        room -= n + 2
        i += 1
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    assert len(head) == total
    return head


def test_header_block_of_max_head_bytes_is_accepted():
    """A header block of exactly MAX_HEAD bytes is fine."""
    assert parse(head_of_size(limits.MAX_HEAD))[-1] is END


def test_header_block_over_max_head():
    """A complete header block over MAX_HEAD bytes is a framing error."""
    e = framing_error(head_of_size(limits.MAX_HEAD + 1))
    assert e.code == "bad-frame" and "header block larger" in e.message


def test_header_block_over_max_head_that_never_ends():
    """An unfinished header block fails as soon as it passes MAX_HEAD bytes."""
    parser = new_parser()
    head = head_of_size(limits.MAX_HEAD + 100)
    parser.feed(head[: limits.MAX_HEAD])
    assert parser.next_event() is NEED_DATA
    parser.feed(head[limits.MAX_HEAD : limits.MAX_HEAD + 1])
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    assert info.value.code == "bad-frame"


def test_max_headers_header_lines_are_accepted():
    """MAX_HEADERS header lines (Length included) are fine."""
    lines = [b"X-%d: v" % i for i in range(limits.MAX_HEADERS)]
    assert parse(b"ping 1\r\n" + b"\r\n".join(lines) + b"\r\n\r\n")[-1] is END


def test_more_than_max_headers():
    """One header line more than MAX_HEADERS is a framing error."""
    lines = [b"X-%d: v" % i for i in range(limits.MAX_HEADERS + 1)]
    e = framing_error(b"ping 1\r\n" + b"\r\n".join(lines) + b"\r\n\r\n")
    assert e.code == "bad-frame" and "header lines" in e.message


# -- unit tests: Length ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"-1",
        b"+5",
        b"0x10",
        b"1_0",
        b" 5",
        b"5 ",
        b"1 0",
        b"\t5",
        b"1" * 13,
        b"",
        "\uff15".encode(),
        "\u0661".encode(),
        b"5.0",
        b"1e3",
    ],
    ids=[
        "negative",
        "signed",
        "hex",
        "underscore",
        "leading-space",
        "trailing-space",
        "inner-space",
        "tab",
        "13-digits",
        "empty",
        "fullwidth-digit",
        "arabic-digit",
        "decimal",
        "exponent",
    ],
)
def test_length_must_be_plain_ascii_digits(value):
    """Length is 1 to 12 ASCII digits and nothing else (``int()`` would accept several
    of these): anything else is a framing error."""
    e = framing_error(b"value_upload 1\r\nKey: k\r\nLength: " + value + b"\r\n\r\nxxxxx")
    assert e.code == "bad-frame" and "Length" in e.message


def test_length_of_twelve_digits_is_accepted():
    """The largest Length has MAX_LENGTH_DIGITS digits; leading zeros are allowed."""
    events = parse(b"file_upload 1\r\nKey: k\r\nLength: 999999999999\r\n\r\n")
    assert events[0].length == 10**12 - 1
    assert parse(b"value_upload 1\r\nKey: k\r\nLength: 002\r\n\r\nab")[0].length == 2


@pytest.mark.parametrize("second", [b"Length: 5", b"length: 5", b"LENGTH: 3"])
def test_duplicate_length(second):
    """Two Length headers, equal or not, in any case, are a framing error (the
    request-smuggling pattern)."""
    e = framing_error(b"value_upload 1\r\nKey: k\r\nLength: 5\r\n" + second + b"\r\n\r\nhello")
    assert e.code == "bad-frame" and "duplicate" in e.message


def test_duplicate_header_case_insensitive():
    """The same header twice (``Key`` and ``key``) is a framing error."""
    e = framing_error(b"stat 1\r\nKey: a\r\nkey: a\r\n\r\n")
    assert e.code == "bad-frame" and "duplicate" in e.message


# -- unit tests: bytes in the head ----------------------------------------------------------------


def test_bare_lf_in_start_line():
    """A start line ended by LF alone is a framing error, detected at once."""
    assert framing_error(b"ping 1\n\r\n").code == "bad-frame"
    parser = new_parser()
    parser.feed(b"ping 1\n")
    with pytest.raises(ProtocolError) as info:
        parser.next_event()
    assert info.value.code == "bad-frame" and "bare LF" in info.value.message


def test_bare_lf_in_header():
    """A header line ended by LF alone is a framing error."""
    e = framing_error(b"stat 1\r\nKey: a\nX: b\r\n\r\n")
    assert e.code == "bad-frame" and "bare LF" in e.message


def test_cr_alone():
    """A CR not followed by LF is a framing error; a CR at the end of the bytes so far
    waits for its LF."""
    e = framing_error(b"stat 1\r\nKey: a\rb\r\n\r\n")
    assert e.code == "bad-frame" and "CR without LF" in e.message
    parser = new_parser()
    parser.feed(b"ping 1\r")
    assert parser.next_event() is NEED_DATA
    parser.feed(b"x")
    with pytest.raises(ProtocolError):
        parser.next_event()


def test_nul_in_header_value():
    """A NUL byte anywhere in the head is a framing error."""
    e = framing_error(b"stat 1\r\nKey: a\x00b\r\n\r\n")
    assert e.code == "bad-frame" and "NUL" in e.message


@pytest.mark.parametrize("char", [b"\x01", b"\x0b", b"\x0c", b"\x1b", b"\x1f", b"\x7f"])
def test_control_character_in_value(char):
    """A control character (other than TAB) in a header value is a framing error."""
    e = framing_error(b"stat 1\r\nX: a" + char + b"b\r\nKey: k\r\n\r\n")
    assert e.code == "bad-frame" and "control character" in e.message


def test_tab_in_value_is_allowed():
    """TAB is the one control character a header value may hold."""
    assert parse(b"ping 1\r\nX: a\tb\r\n\r\n")[0].headers["x"] == "a\tb"


def test_value_keeps_spaces_after_the_first():
    """One optional space after the colon is dropped; the rest of the value is kept."""
    head = parse(b"ping 1\r\nA:x\r\nB:  y \r\nC: \r\n\r\n")[0]
    assert head.headers == {"a": "x", "b": " y ", "c": "", "method": "ping"}


@pytest.mark.parametrize(
    "line",
    [b"X : y", b" X: y", b"X", b"X-\xc3\xa9: y", b"x" * 65 + b": y", b": y", b"X_Y: y"],
    ids=[
        "space-before-colon",
        "leading-space",
        "no-colon",
        "non-ascii-name",
        "long-name",
        "empty-name",
        "underscore",
    ],
)
def test_malformed_header_line(line):
    """A header line must be ``Name: value`` with a name of 1-64 of [A-Za-z0-9-]."""
    e = framing_error(b"ping 1\r\n" + line + b"\r\n\r\n")
    assert e.code == "bad-frame" and e.request_id == 1


# -- unit tests: start lines -------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"PING 1",
        b"Ping 1",
        b"ping",
        b"ping ",
        b"ping  1",
        b"ping 1 ",
        b" ping 1",
        b"ping x",
        b"ping -1",
        b"ping 1234567890123",
        b"1ping 1",
        b"ping\t1",
        b"a" * 33 + b" 1",
        b"GET / HTTP/1.1",
        b"",
    ],
    ids=[
        "upper",
        "capitalised",
        "no-id",
        "empty-id",
        "two-spaces",
        "trailing-space",
        "leading-space",
        "non-digit-id",
        "negative-id",
        "13-digit-id",
        "digit-first",
        "tab",
        "long-method",
        "http",
        "empty",
    ],
)
def test_malformed_request_line(line):
    """A request line is ``method SP id``: a lowercase method and 1-12 digits."""
    e = framing_error(line + b"\r\n\r\n")
    assert e.code == "bad-frame"


def test_twelve_digit_id_is_accepted():
    """An id has up to MAX_ID_DIGITS digits."""
    assert parse(b"ping 999999999999\r\n\r\n")[0].id == 10**12 - 1


@pytest.mark.parametrize(
    "line", [b"ok 1", b"OK", b"OK x", b"DONE 1", b"OK 1234567890123", b"ping 1", b"ERROR  1"]
)
def test_malformed_status_line(line):
    """A status line is ``OK SP id`` or ``ERROR SP id``."""
    assert framing_error(line + b"\r\n\r\n", role="response").code == "bad-frame"


def test_response_header_not_utf8():
    """A response header that is not UTF-8 is a framing error (a client cannot reject it)."""
    assert framing_error(b"OK 1\r\nX: \xff\r\n\r\n", role="response").code == "bad-frame"


def test_error_response_is_ok_false():
    """``Head.ok`` tells an OK response from an ERROR one."""
    ok, _, err, _ = parse(encode_response(True, 1, {}) + encode_error(2, "x", "y"), "response")
    assert ok.ok and not err.ok


# -- unit tests: request-level errors (Rejected) ------------------------------------------


def test_unknown_method():
    """An unknown method is Rejected with unknown-method; its payload (here shaped like a
    request) is skipped and the next request parses."""
    payload = b"ping 5\r\n\r\n"
    data = b"frobnicate 7\r\nLength: %d\r\n\r\n" % len(payload) + payload
    rejected = assert_rejected(data, "unknown-method")
    assert rejected.id == 7 and "frobnicate" in rejected.message


@pytest.mark.parametrize(
    ("method", "header"),
    [("stat", "key"), ("delete", "key"), ("file_upload", "key"), ("auth", "token")],
)
def test_missing_required_header(method, header):
    """A request without a header its method requires is Rejected with missing-header,
    and the message names the header."""
    rejected = assert_rejected(b"%s 1\r\n\r\n" % method.encode(), "missing-header")
    assert repr(header) in rejected.message


@pytest.mark.parametrize(
    "key",
    [
        b"",
        b"a\tb",
        "\u0085".encode(),
        "x\u009fy".encode(),
        b"\xff\xfe",
        b"a\xc3",
        pytest.param(b"k" * (limits.MAX_KEY + 1), marks=_needs_key_room),
    ],
    ids=["empty", "tab", "c1-nel", "c1-apc", "not-utf8", "truncated-utf8", "over-max-key"],
)
def test_bad_key(key):
    """A key that is empty, holds a control character (TAB, C1), is not UTF-8 or is over
    MAX_KEY bytes is Rejected with bad-key; the payload is skipped."""
    data = b"value_upload 1\r\nKey: " + key + b"\r\nLength: 3\r\n\r\nabc"
    assert_rejected(data, "bad-key")


@pytest.mark.parametrize(
    ("name", "value"),
    [(b"After", b""), (b"After", b"\xff"), (b"Prefix", b"a\x85"), (b"Prefix", b"\t")],
)
def test_bad_list_key_headers(name, value):
    """Prefix and After are keys too (Prefix may be empty): bad ones are bad-key."""
    assert_rejected(b"list 1\r\n" + name + b": " + value + b"\r\n\r\n", "bad-key")


def test_empty_prefix_is_allowed():
    """An empty Prefix lists everything."""
    assert parse(b"list 1\r\nPrefix: \r\n\r\n")[0].headers["prefix"] == ""


@pytest.mark.parametrize(
    "data",
    [
        b"file_upload 1\r\nKey: k\r\nSha256: " + b"A" * 64 + b"\r\n\r\n",
        b"file_upload 1\r\nKey: k\r\nSha256: abc\r\n\r\n",
        b"list 1\r\nLimit: -1\r\n\r\n",
        b"list 1\r\nLimit: ten\r\n\r\n",
        b"auth 1\r\nToken: \xff\r\n\r\n",
    ],
    ids=["sha256-upper", "sha256-short", "limit-negative", "limit-word", "token-not-utf8"],
)
def test_bad_header_value(data):
    """A header whose value has the wrong form is Rejected with bad-header."""
    assert_rejected(data, "bad-header")


@pytest.mark.parametrize("name", [b"Method", b"method", b"METHOD"])
def test_method_header_is_rejected(name):
    """``Method`` is reserved (the parser puts the method there): a request sending it is
    Rejected with bad-header."""
    assert_rejected(b"ping 1\r\n" + name + b": stat\r\n\r\n", "bad-header")


def test_value_upload_over_the_limit():
    """A value payload over value_max is Rejected with too-large before any of it is read;
    the payload is skipped; exactly value_max is accepted."""
    limit = limits.DEFAULT_VALUE_MAX
    data = encode_request("value_upload", 1, {"Key": "k"}, b"v" * (limit + 1))
    rejected = assert_rejected(data, "too-large")
    assert str(limit) in rejected.message
    events = normalize(parse(encode_request("value_upload", 2, {"Key": "k"}, b"v" * limit)))
    assert events[1] == ("data", b"v" * limit)


def test_payload_for_a_method_without_one():
    """A payload on a method that takes none is Rejected with too-large and skipped."""
    assert_rejected(b"stat 1\r\nKey: k\r\nLength: 3\r\n\r\nabc", "too-large")


def test_skip_up_to_max_skip():
    """A Rejected request's payload of exactly MAX_SKIP bytes is skipped, in any chunks,
    without being buffered, and the next request parses."""
    parser = new_parser()
    parser.feed(b"frobnicate 1\r\nLength: %d\r\n\r\n" % limits.MAX_SKIP)
    assert parser.next_event().code == "unknown-method"
    chunk = bytes(1024 * 1024)
    for _ in range(limits.MAX_SKIP // len(chunk)):
        parser.feed(chunk)
        assert parser.next_event() is NEED_DATA
        assert parser.buffered == 0
    parser.feed(NEXT)
    assert drain(parser) == NEXT_EVENTS


def test_payload_over_max_skip_is_a_framing_error():
    """A Rejected request whose payload is over MAX_SKIP is not worth draining: it raises
    ProtocolError with the rejection's code and the request's id."""
    e = framing_error(b"frobnicate 4\r\nLength: %d\r\n\r\n" % (limits.MAX_SKIP + 1))
    assert e.code == "unknown-method" and e.request_id == 4


def test_protocol_error_is_sticky():
    """After a ProtocolError the parser refuses everything: feed and next_event raise
    the same error again, and nothing stays buffered."""
    parser = new_parser()
    parser.feed(b"ping 3\r\nX: \x01\r\n\r\n" + NEXT)
    with pytest.raises(ProtocolError) as first:
        parser.next_event()
    assert first.value.request_id == 3
    for action in (lambda: parser.feed(NEXT), parser.next_event):
        with pytest.raises(ProtocolError) as again:
            action()
        assert again.value is first.value
    assert parser.buffered == 0


def test_parser_arguments():
    """A parser is for requests (with a method table) or responses."""
    with pytest.raises(ValueError):
        Parser("request")
    with pytest.raises(ValueError):
        Parser("sideways", METHODS)


# -- unit tests: keys ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "../x",
        "../../etc/passwd",
        "/abs",
        "a b",
        " ",
        "a:b",
        "\u00e9\u00e8",
        "\U0001f642",
        "x\u00a0y",
    ],
)
def test_odd_keys_are_plain_names(key):
    """Keys that look like paths or hold spaces or unicode are ordinary keys."""
    assert parse(encode_request("stat", 1, {"Key": key}))[0].headers["key"] == key
    assert check_key(key) == key


@_needs_key_room
def test_longest_key_round_trips():
    """A key of exactly MAX_KEY bytes fits in Key, Prefix and After headers."""
    key = "\u00e9" * (limits.MAX_KEY // 2)
    assert len(key.encode()) == limits.MAX_KEY
    head = parse(encode_request("list", 1, {"Prefix": key, "After": key}))[0]
    assert head.headers["prefix"] == head.headers["after"] == key
    assert parse(encode_request("stat", 2, {"Key": key}))[0].headers["key"] == key


# -- unit tests: serializers ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\r\nKey: x", "a\x00", "a\x01", "a\x7f"])
def test_encode_head_refuses_control_characters(value):
    """encode_head refuses CR, LF, NUL and other control characters in a value."""
    with pytest.raises(ValueError):
        encode_head("ping 1", {"X": value}, 0)


@pytest.mark.parametrize(
    "name", ["Length", "length", "LENGTH", "Method", "", "Bad Name", "a:b", "x" * 65, "\u00e9"]
)
def test_encode_head_refuses_bad_names(name):
    """encode_head refuses a Length or Method header (Length comes from the payload) and
    any name outside [A-Za-z0-9-]{1,64}."""
    with pytest.raises(ValueError):
        encode_head("ping 1", {name: "1"}, 0)


def test_encode_head_refuses_what_the_parser_would_refuse():
    """encode_head refuses duplicate names, over-long lines, a bad start line and a bad
    length, instead of sending the peer a framing error."""
    for start, headers, length in [
        ("ping 1", {"Key": "a", "KEY": "b"}, 0),
        ("ping 1", {"X": "a" * limits.MAX_LINE}, 0),
        ("ping 1\r\nKey: x", {}, 0),
        ("ping -1", {}, 0),
        ("ping 1", {}, -1),
        ("ping 1", {}, 10**limits.MAX_LENGTH_DIGITS),
    ]:
        with pytest.raises(ValueError):
            encode_head(start, headers, length)


def test_encode_head_adds_length():
    """encode_head writes Length only for a non-empty payload; encode_request with an int
    returns only the head (the caller streams the payload)."""
    assert encode_head("ping 1", {}, 0) == b"ping 1\r\n\r\n"
    assert encode_request("file_upload", 2, {"Key": "k"}, 5) == (
        b"file_upload 2\r\nKey: k\r\nLength: 5\r\n\r\n"
    )
    assert encode_response(True, 3, {"A": 1}, b"xy") == b"OK 3\r\nA: 1\r\nLength: 2\r\n\r\nxy"


def test_encode_error_sanitises_message():
    """encode_error turns CR, LF and other controls into spaces and keeps multibyte text,
    so an error message can never inject a header; the result parses."""
    message = "line one\r\nKey: injected\x00 \u2014 \u00fcn\u00efc\u00f6d\u00e9 \u2713\U0001f642"
    (head, _) = parse(encode_error(5, "bad-key", message), role="response")
    assert head == Head(
        "ERROR",
        5,
        {
            "code": "bad-key",
            "message": (
                "line one  Key: injected  \u2014 \u00fcn\u00efc\u00f6d\u00e9 \u2713\U0001f642"
            ),
        },
        0,
    )


def test_encode_error_truncates_on_a_character_boundary():
    """A long multibyte message is cut to fit one header line, never inside a character."""
    (head, _) = parse(encode_error(1, "internal", "\u20ac" * 2000), role="response")
    message = head.headers["message"]
    assert message and set(message) == {"\u20ac"}
    assert len(message.encode()) <= limits.MAX_LINE - len("Message: ")


# -- the worked example of docs/protocol.md ------------------------------------------------


def test_worked_example_in_the_docs():
    """The byte-for-byte example of docs/protocol.md section 11 is what the serializers
    produce, and it parses back to the requests and responses it describes."""
    digest = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    request = (
        b"auth 1\r\nToken: s3cret\r\nClient: example\r\n\r\n"
        b"value_upload 2\r\nKey: greeting\r\nLength: 5\r\n\r\nhello"
        b"ping 3\r\n\r\n"
    )
    response = (
        b"OK 1\r\n\r\n"
        b"OK 2\r\nVersion: 7\r\n"
        b"Sha256: 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824\r\n"
        b"Size: 5\r\n\r\n"
        b"OK 3\r\n\r\n"
    )
    assert request == (
        encode_request("auth", 1, {"Token": "s3cret", "Client": "example"})
        + encode_request("value_upload", 2, {"Key": "greeting"}, b"hello")
        + encode_request("ping", 3, {})
    )
    assert response == (
        encode_response(True, 1, {})
        + encode_response(True, 2, {"Version": 7, "Sha256": digest, "Size": 5})
        + encode_response(True, 3, {})
    )
    assert len(request) == 101 and len(response) == 119
    assert [e[:3] for e in normalize(parse(request))] == [
        ("head", "auth", 1),
        ("end",),
        ("head", "value_upload", 2),
        ("data", b"hello"),
        ("end",),
        ("head", "ping", 3),
        ("end",),
    ]
    assert [e[:3] for e in normalize(parse(response, role="response"))] == [
        ("head", "OK", 1),
        ("end",),
        ("head", "OK", 2),
        ("end",),
        ("head", "OK", 3),
        ("end",),
    ]
    assert encode_error(4, "not-found", "key 'nope' not found") == (
        b"ERROR 4\r\nCode: not-found\r\nMessage: key 'nope' not found\r\n\r\n"
    )


# -- quick_request: a shortcut that must agree with the parser -------------------------


def whole_parse(data: bytes, methods=METHODS) -> tuple[list, bool]:
    """Events of a ``whole=True`` request parser fed ``data`` alone, and whether it is idle
    after them (None for the events on a framing error)."""
    parser = Parser("request", methods, whole=True)
    parser.feed(data)
    try:
        return drain(parser), parser.idle
    except ProtocolError:
        return None, False


def assert_agrees(data: bytes, methods=METHODS) -> Head | None:
    """If quick_request takes ``data``, the parser gives that same Head and nothing else."""
    head = quick_request(data, methods)
    if head is not None:
        events, idle = whole_parse(data, methods)
        assert events == [head], (data, events)
        assert events[0].body == head.body
        assert idle
    return head


_ascii_keys = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1)


@st.composite
def quick_shaped(draw):
    """Bytes near the quick shape: canonical small requests, then maybe one edit."""
    method = draw(st.sampled_from(sorted(SMALL.specs)))
    key = draw(st.one_of(_ascii_keys, keys, st.just("k" * (limits.MAX_KEY + 1))))
    payload = draw(st.binary(max_size=SMALL_VALUE_MAX + 2))
    data = bytearray(
        b"%s %d\r\nKey: %s\r\n" % (method.encode(), draw(st.integers(0, 10**13)), key.encode())
    )
    if payload or draw(st.booleans()):
        data += b"Length: %s\r\n" % draw(
            st.sampled_from(
                [b"%d" % len(payload), b"0%d" % len(payload), b"%d" % (len(payload) + 1)]
            )
        )
    data += b"\r\n" + payload
    edit = draw(st.integers(0, 4))
    if edit == 1 and data:  # one byte changed
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif edit == 2:  # cut short
        del data[draw(st.integers(0, len(data))) :]
    elif edit == 3:  # something after it
        data += draw(st.binary(min_size=1, max_size=20))
    return bytes(data)


@HEAVY
@given(data=quick_shaped() | garbage())
def test_quick_request_agrees_with_the_parser(data):
    assert_agrees(data, SMALL)


@LIGHT
@given(request=valid_requests(), req_id=st.integers(0, 10**limits.MAX_ID_DIGITS - 1))
def test_quick_request_agrees_on_every_valid_request(request, req_id):
    method, headers, payload = request
    assert_agrees(encode_request(method, req_id, headers, payload))


@LIGHT
@given(
    method=st.sampled_from(["value_upload", "value_retrieve", "stat", "delete"]),
    key=_ascii_keys.filter(lambda k: len(k) <= limits.MAX_KEY),
    payload=st.binary(max_size=SMALL_VALUE_MAX),
    req_id=st.integers(0, 10**limits.MAX_ID_DIGITS - 1),
)
def test_quick_request_takes_what_clients_send(method, key, payload, req_id):
    """The shortcut is taken for the requests the clients send most (else it is dead code)."""
    if method != "value_upload":
        payload = b""
    head = assert_agrees(encode_request(method, req_id, {"Key": key}, payload), SMALL)
    assert head is not None
    assert (head.kind, head.id, head.headers["key"], head.body) == (method, req_id, key, payload)


def test_quick_request_leaves_everything_else_to_the_parser():
    for data in [
        b"value_retrieve 1\r\nKey: k\r\n",  # no blank line yet
        b"value_retrieve 1\r\nKey: k\r\n\r\nping 2\r\n\r\n",  # two requests
        b"value_upload 1\r\nKey: k\r\nLength: 3\r\n\r\nab",  # payload not all here
        b"value_upload 1\r\nKey: k\r\nVersion: 3\r\nLength: 1\r\n\r\nx",  # more headers
        b"value_retrieve 1\r\nkey: k\r\n\r\n",  # another spelling
        b"value_retrieve 1\r\nKey: \xc3\xa9\r\n\r\n",  # not ASCII
        b"value_retrieve 1\r\nKey: " + b"k" * (limits.MAX_KEY + 1) + b"\r\n\r\n",  # too long
        b"file_upload 1\r\nKey: k\r\nLength: 1\r\n\r\nx",  # streamed
        b"auth 1\r\nKey: k\r\n\r\n",  # requires other headers
        b"nosuch 1\r\nKey: k\r\n\r\n",  # unknown method
    ]:
        assert quick_request(data, METHODS) is None, data
    big = encode_request("value_upload", 1, {"Key": "k"}, b"x" * (SMALL_VALUE_MAX + 1))
    assert quick_request(big, SMALL) is None


# -- ResponseShape: the hot replies, encoded cheaply ------------------------------------

_shape_values = st.one_of(
    st.integers(0, 10**18), st.text("0123456789abcdefXYZ", min_size=1, max_size=2100)
)


@LIGHT
@given(
    names=st.lists(extra_names, min_size=1, max_size=4, unique_by=str.lower),
    data=st.data(),
    req_id=st.integers(0, 10**limits.MAX_ID_DIGITS - 1),
    payload=st.binary(max_size=200),
)
def test_response_shape_encodes_what_encode_response_does(names, data, req_id, payload):
    values = tuple(data.draw(_shape_values) for _ in names)
    shape = ResponseShape(*names)
    try:
        expected = encode_response(True, req_id, dict(zip(names, values, strict=True)), payload)
    except ValueError:  # a line too long: the shape refuses it too
        with pytest.raises(ValueError):
            shape.encode(req_id, values, payload)
        return
    assert shape.encode(req_id, values, payload) == expected


def test_response_shape_refuses_what_could_break_the_framing():
    shape = ResponseShape("Version", "Sha256")
    for bad in ["a\r\nX: y", "a b", "", "\u00e9", "a\x00"]:
        with pytest.raises(ValueError):
            shape.encode(1, (1, bad))
    with pytest.raises(ValueError):
        shape.encode(-1, (1, "ab"))
    for names in [("Length",), ("Version", "version"), ("bad name",), ("Method",)]:
        with pytest.raises(ValueError):
            ResponseShape(*names)


# -- the client's shortcuts: encode_key_request and quick_response -----------------------


@LIGHT
@given(
    method=st.sampled_from(["value_upload", "value_retrieve", "stat", "delete", "file_retrieve"]),
    key=st.one_of(keys, _ascii_keys, st.just(""), st.just("a\tb"), st.just("k" * 1025)),
    payload=st.binary(max_size=100),
    req_id=st.integers(0, 10**limits.MAX_ID_DIGITS - 1),
)
def test_encode_key_request_is_encode_request(method, key, payload, req_id):
    try:
        expected = encode_request(method, req_id, {"Key": key}, payload)
    except ValueError:
        with pytest.raises(ValueError):
            encode_key_request(method, req_id, key, payload)
        return
    assert encode_key_request(method, req_id, key, payload) == expected


def assert_response_agrees(data: bytes) -> Head | None:
    """If quick_response takes ``data``, a whole=True response parser agrees."""
    head = quick_response(data)
    if head is not None:
        parser = Parser("response", whole=True)
        parser.feed(data)
        events = drain(parser)
        assert events == [head], (data, events)
        assert events[0].body == head.body
        assert parser.idle
    return head


@st.composite
def response_shaped(draw):
    """A response (maybe with odd headers), then maybe one edit."""
    data = bytearray(draw(responses())[0])
    if draw(st.booleans()):
        name = draw(st.sampled_from([b"Length", b"length", b"X", b"Version"]))
        value = draw(st.sampled_from([b"0", b"1", b"01", b"-1", b"x", b"\xc3\xa9", b""]))
        at = data.find(b"\r\n")
        data[at:at] = b"\r\n" + name + b": " + value
    edit = draw(st.integers(0, 4))
    if edit == 1 and data:
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif edit == 2:
        del data[draw(st.integers(0, len(data))) :]
    elif edit == 3:
        data += draw(st.binary(min_size=1, max_size=20))
    return bytes(data)


@HEAVY
@given(data=response_shaped() | garbage())
def test_quick_response_agrees_with_the_parser(data):
    assert_response_agrees(data)


def test_quick_response_takes_the_common_replies():
    for data in [
        encode_response(True, 5, {"Version": 3}, b"value"),
        encode_response(True, 6, {"Version": 3, "Sha256": "ab" * 32, "Size": 5}),
        encode_error(7, "not-found", "key 'x' not found"),
    ]:
        head = assert_response_agrees(data)
        assert head is not None, data
    for data in [
        encode_response(True, 5, {"Version": 3}, b"value")[:-1],  # payload still coming
        encode_response(True, 5, {"Version": 3}) * 2,  # two responses
        encode_error(7, "not-found", "key '\u00e9' not found"),  # not ASCII: the parser
    ]:
        assert quick_response(data) is None, data


def test_quick_decoders_stay_linear_on_a_huge_header_block():
    """Many headers and no end: an earlier quick_response regex backtracked
    exponentially here (two ways to match each ': '), hanging hypothesis."""
    for unit in [b"X: y\r\n", b"X:  \r\n", b"\r\n"]:
        block = unit * ((limits.MAX_HEAD + 2000) // len(unit))
        assert quick_response(b"OK 1\r\n" + block) is None
        assert quick_request(b"value_upload 1\r\nKey: k\r\n" + block, METHODS) is None
