"""Payloads of any size over a link, both ways, in flat memory (dsml.net.calling).

A request's payload streamed from a file by a pull producer the transport paces, and a
response's payload streamed into a sink (a file that appears only when whole and
verified); the peer failing midway, a refusal before the payload went out, a 0-byte file,
a stalled response.  One dialled connection on a ``StringTransport`` and a ``Clock``: the
test plays the server, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dsml.errors import ChecksumMismatch, ConnectionLost, DsmlError
from dsml.net import calling
from dsml.net.calling import Response
from dsml.net.connection import Connection
from dsml.net.limits import Limits
from dsml.net.links import LinkFactory
from dsml.net.responders import NO_REQUESTS
from dsml.net.sinks import BytesSink, FileSink
from dsml.protocol import codec

CHUNK = 1024


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """1 KiB producer steps, so a few KiB show the pacing."""
    monkeypatch.setattr(calling, "PAYLOAD_CHUNK", CHUNK)


class Link:
    """One dialled connection on a StringTransport; the test is the server."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.clock = Clock()
        self.conn: Connection = LinkFactory(NO_REQUESTS, self.clock, limits).buildProtocol(None)
        self.transport = StringTransport()
        self.conn.makeConnection(self.transport)

    def sent(self) -> bytes:
        """Everything written so far (and forget it)."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def answer(self, req_id: int, headers: dict[str, object], payload: bytes | int = b"") -> None:
        """The server's OK response (with an int: only the head, promising that many bytes)."""
        self.conn.dataReceived(codec.encode_response(True, req_id, headers, payload))

    def refuse(self, req_id: int, code: str) -> None:
        """The server's error response."""
        self.conn.dataReceived(codec.encode_error(req_id, code, f"refused: {code}"))

    def drop(self) -> None:
        """The server goes away."""
        self.conn.connectionLost(Failure(ConnectionDone()))

    def pump(self) -> int:
        """Let the transport take what the producer writes until it is done; the steps."""
        steps = 0
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
            steps += 1
        return steps


def outcome(d: Deferred[Any]) -> Any:
    """What ``d`` fired with (a Failure for an error); AssertionError if it has not."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def pending(d: Deferred[Any]) -> bool:
    """Whether ``d`` has not fired yet."""
    return not d.called


def file_head(content: bytes, req_id: int = 1) -> dict[str, object]:
    """The headers of a file_retrieve answer for ``content``."""
    return {
        "Action": "write-file", "Kind": "file", "Size": len(content),
        "Sha256": hashlib.sha256(content).hexdigest(), "Version": 7,
    }


# -- a request's payload from a file ------------------------------------------------------


def test_a_file_payload_is_read_only_as_the_transport_takes_it(tmp_path: Path) -> None:
    """Only the head goes out at first; each time the transport asks, one chunk is read
    and written, so at most one chunk of the file is ever in memory; the Deferred fires
    with the server's answer once the payload went out whole."""
    content = bytes(range(256)) * 10 + b"tail"  # 2564 bytes: 3 chunks, the last short
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    link = Link()
    seen: list[bytes] = []
    with open(path, "rb") as f:
        d = link.conn.request_file("file_upload", {"Key": "k"}, f, len(content),
                                   on_chunk=seen.append)
        head = link.sent()
        assert head == codec.encode_request("file_upload", 1, {"Key": "k"}, len(content))
        assert f.tell() == 0  # nothing read until the transport asks
        assert link.transport.producer is not None and not link.transport.streaming
        link.transport.producer.resumeProducing()
        assert f.tell() == CHUNK and link.sent() == content[:CHUNK]
        assert link.pump() == 2
        assert link.sent() == content[CHUNK:]
        assert f.tell() == len(content)
    assert b"".join(seen) == content and max(len(c) for c in seen) == CHUNK
    assert pending(d)
    link.answer(1, {"Size": len(content)})
    assert outcome(d) == Response({"size": str(len(content))})


def test_a_zero_byte_file_sends_its_head_only(tmp_path: Path) -> None:
    """An empty file: a head with ``Length: 0`` and no producer at all."""
    link = Link()
    with open(tmp_path / "empty", "wb+") as f:
        d = link.conn.request_file("file_upload", {"Key": "k"}, f, 0)
    assert link.sent() == codec.encode_request("file_upload", 1, {"Key": "k"}, 0)
    assert link.transport.producer is None
    link.answer(1, {})
    assert isinstance(outcome(d), Response)


def test_the_peer_failing_midway_fails_the_request_and_stops_reading() -> None:
    """The connection drops after one chunk: the Deferred fails with ConnectionLost and
    the file is not read any further."""
    source = io.BytesIO(b"x" * (5 * CHUNK))
    link = Link()
    d = link.conn.request_file("file_upload", {"Key": "k"}, source, 5 * CHUNK)
    producer = link.transport.producer
    producer.resumeProducing()
    link.drop()
    assert outcome(d).check(ConnectionLost)
    producer.resumeProducing()  # a late call from the transport: nothing happens
    assert source.tell() == CHUNK


def test_requests_sent_meanwhile_go_out_after_the_payload() -> None:
    """A small request made while a payload streams waits behind it on the wire (its
    bytes would otherwise land inside the payload)."""
    link = Link()
    d = link.conn.request_file("file_upload", {"Key": "k"}, io.BytesIO(b"ab" * CHUNK), 2 * CHUNK)
    link.sent()
    ping = link.conn.request("ping")
    link.transport.producer.resumeProducing()
    assert link.sent() == b"ab" * (CHUNK // 2)
    link.pump()
    assert link.sent() == b"ab" * (CHUNK // 2) + codec.encode_request("ping", 2, {})
    link.answer(1, {})
    link.answer(2, {})
    assert isinstance(outcome(d), Response) and isinstance(outcome(ping), Response)


def test_a_refusal_before_the_payload_ends_stops_it_and_closes() -> None:
    """The server refuses after the head (say ``forbidden``): the request fails with its
    code, the rest of the file is not sent, and the link closes (the head promised the
    rest of the bytes)."""
    source = io.BytesIO(b"y" * (4 * CHUNK))
    link = Link()
    d = link.conn.request_file("file_upload", {"Key": "k"}, source, 4 * CHUNK)
    link.transport.producer.resumeProducing()
    link.refuse(1, "forbidden")
    assert outcome(d).value.code == "forbidden"
    assert link.transport.producer is None and link.transport.disconnecting
    assert source.tell() == CHUNK


def test_a_file_that_shrank_fails_with_io_and_cuts_the_link() -> None:
    """Fewer bytes than promised: the framing cannot be kept, so the link is cut."""
    link = Link()
    d = link.conn.request_file("file_upload", {"Key": "k"}, io.BytesIO(b"z" * 10), 100)
    link.pump()
    failure = outcome(d)
    assert failure.check(DsmlError) and failure.value.code == "io"
    assert link.transport.disconnecting


# -- a response's payload into a sink -----------------------------------------------------


def test_a_download_reaches_its_file_only_when_whole_and_verified(tmp_path: Path) -> None:
    """The head first (the sink opens a temporary file beside the target), then the
    chunks as they come; the target appears at the end, with the right bytes."""
    content = b"0123456789" * 1000
    target = tmp_path / "out.bin"
    link = Link()
    d = link.conn.request("file_retrieve", {"Key": "k"}, sink=FileSink(target))
    link.answer(1, file_head(content), len(content))
    [tmp] = tmp_path.iterdir()
    assert tmp.name.startswith(".out.bin.") and tmp.name.endswith(".part")
    for i in range(0, len(content), 3000):
        link.conn.dataReceived(content[i : i + 3000])
        if i + 3000 < len(content):
            assert not target.exists() and pending(d)
    response = outcome(d)
    assert response.headers["version"] == "7" and response.payload == b""
    assert target.read_bytes() == content
    assert list(tmp_path.iterdir()) == [target]


def test_the_peer_failing_mid_download_leaves_nothing(tmp_path: Path) -> None:
    """Half the payload, then the connection drops: ConnectionLost, and neither the target
    nor the temporary file is left."""
    content = b"a" * 5000
    link = Link()
    d = link.conn.request("file_retrieve", {"Key": "k"}, sink=FileSink(tmp_path / "out"))
    link.answer(1, file_head(content), len(content))
    link.conn.dataReceived(content[:2500])
    link.drop()
    assert outcome(d).check(ConnectionLost)
    assert list(tmp_path.iterdir()) == []


def test_a_zero_byte_download_makes_an_empty_file(tmp_path: Path) -> None:
    """An empty file is a head with ``Length: 0``: the target is created, empty."""
    link = Link()
    d = link.conn.request("file_retrieve", {"Key": "k"}, sink=FileSink(tmp_path / "empty"))
    link.answer(1, file_head(b""))
    assert isinstance(outcome(d), Response)
    assert (tmp_path / "empty").read_bytes() == b""
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_bytes_that_do_not_match_their_checksum_are_not_kept(tmp_path: Path) -> None:
    """A payload whose hash is not the head's ``Sha256``: ChecksumMismatch, nothing left;
    the link stays usable (the message was read whole)."""
    link = Link()
    d = link.conn.request("file_retrieve", {"Key": "k"}, sink=FileSink(tmp_path / "out"))
    link.answer(1, file_head(b"the real bytes"), b"other bytes!!!")
    assert outcome(d).check(ChecksumMismatch)
    assert list(tmp_path.iterdir()) == []
    assert link.conn.is_open


def test_an_error_answer_never_reaches_the_sink(tmp_path: Path) -> None:
    """``not-found``: the request fails with the code, no file is made."""
    link = Link()
    d = link.conn.request("file_retrieve", {"Key": "k"}, sink=FileSink(tmp_path / "out"))
    link.refuse(1, "not-found")
    assert outcome(d).value.code == "not-found"
    assert list(tmp_path.iterdir()) == []


def test_cancelling_a_download_removes_its_file_and_cuts_the_link(tmp_path: Path) -> None:
    """The caller gives up midway: CancelledError, the temporary file goes at once, and
    the link is cut (the rest of the payload cannot be skipped)."""
    link = Link()
    d = link.conn.request("file_retrieve", {"Key": "k"}, sink=FileSink(tmp_path / "out"))
    link.answer(1, file_head(b"b" * 100), 100)
    link.conn.dataReceived(b"b" * 10)
    d.cancel()
    assert outcome(d).check(CancelledError)
    assert list(tmp_path.iterdir()) == []
    assert link.transport.disconnecting
    link.drop()  # the close that follows fires nothing twice


def test_a_stalled_download_is_cut_after_the_payload_timeout(tmp_path: Path) -> None:
    """A response whose payload stops coming is cut after ``payload_timeout`` without a
    byte (the link's idle rule does not apply while it waits for its answers)."""
    link = Link(Limits(idle_timeout=300.0, payload_timeout=60.0))
    d = link.conn.request("file_retrieve", {"Key": "k"}, sink=FileSink(tmp_path / "out"))
    link.answer(1, file_head(b"c" * 100), 100)
    link.clock.advance(59)
    link.conn.dataReceived(b"c" * 10)
    link.clock.advance(59)
    assert not link.transport.disconnecting  # progress moved the deadline
    link.clock.advance(2)
    assert link.transport.disconnecting
    link.drop()
    assert outcome(d).check(ConnectionLost)
    assert list(tmp_path.iterdir()) == []


def test_a_request_waiting_for_its_answer_is_not_idle() -> None:
    """A link whose request is still unanswered (a long pipeline upload, a held
    ``wait``) is not closed as idle; once answered, the idle rule is back."""
    link = Link(Limits(idle_timeout=300.0))
    d = link.conn.request("wait", {"Job": "j1"})
    link.clock.advance(600)
    assert not link.transport.disconnecting
    link.answer(1, {"Final": 1})
    assert isinstance(outcome(d), Response)
    link.clock.advance(301)
    assert link.transport.disconnecting


def test_a_large_answer_goes_to_a_sink_past_the_buffer_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a sink an answer over RESPONSE_MAX is refused (``too-large``); with one it
    streams through whatever its size."""
    monkeypatch.setattr(calling, "RESPONSE_MAX", 64)
    content = b"d" * 200
    link = Link()
    sink = BytesSink()
    d = link.conn.request("file_retrieve", {"Key": "k"}, sink=sink)
    link.answer(1, file_head(content), content)
    assert isinstance(outcome(d), Response) and sink.value == content
    buffered = link.conn.request("file_retrieve", {"Key": "k"})
    link.answer(2, file_head(content), content)
    assert outcome(buffered).value.code == "too-large"
