"""The net layer's bounds (issue 11), on fake transports and a task.Clock.

- Before authentication a connection may send an ``auth`` and nothing else, in at most
  PREAUTH_MAX bytes: anything else (a response frame included) closes it unread.
- Unauthenticated connections are a pool of their own: a newcomer over the cap (in all, or
  from one source address) closes the oldest, and they never take an authenticated place.
- Every answer counts against the connection's unsent output: above the transport's bound
  no further request is answered and (one-way) nothing is read until it drains; a peer
  that never drains it is cut after payload_timeout.
- A request's payload must be whole within payload_total_timeout + length/payload_min_rate.
- Lines about misbehaving peers are rate-limited (:class:`dsml.net.peerlog.PeerLog`).

:class:`TcpLikeTransport` behaves as Twisted's TCP transport does towards producers: it
pauses a streaming producer when its unsent bytes pass ``bound``, resumes it when they are
all taken, and asks a pull producer for data inside ``registerProducer`` and on each drain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from dsml.net.connection import Connection
from dsml.net.limits import Limits
from dsml.net.peerlog import PeerLog
from dsml.net.preauth import AUTH_GRACE
from dsml.net.server import ServerFactory
from dsml.protocol import codec
from dsml.protocol.codec import END, NEED_DATA, Data, Head, Parser
from dsml.protocol.limits import PREAUTH_MAX
from dsml.worker.runner import TaskLogs
from dsml.worker.storage import StorageHandler, storage_responders
from dsml.worker.store import Store

TOKEN = "secret"
VALUE_MAX = 64 * 1024
#: The unsent bytes above which the fake transport pauses a streaming producer.
BOUND = 16 * 1024
LIMITS = Limits(
    max_connections=4,
    max_unauthenticated=6,
    max_unauthenticated_per_host=3,
    auth_timeout=5.0,
    head_timeout=3.0,
    idle_timeout=30.0,
    payload_timeout=7.0,
    payload_total_timeout=20.0,
    payload_min_rate=1000.0,
)


def req(method: str, rid: int, payload: bytes = b"", **headers: str) -> bytes:
    """A well-formed request (Length added for a payload)."""
    lines = [f"{method} {rid}".encode()]
    lines += [f"{n.capitalize()}: {v}".encode() for n, v in headers.items()]
    if payload:
        lines.append(b"Length: %d" % len(payload))
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def responses(data: bytes) -> list[tuple[Head, bytes]]:
    """The whole responses in ``data``."""
    parser = Parser(codec.RESPONSE)
    parser.feed(data)
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
    return out


class TcpLikeTransport(StringTransport):
    """A StringTransport with a TCP transport's producer behaviour and a peer that reads
    only when told (:meth:`take`)."""

    def __init__(self, host: str = "192.0.2.1", port: int = 40000, bound: int = BOUND) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", host, port))
        self.bound = bound
        self.taken = 0  # bytes of value() the peer has read
        self.producer_paused = False
        #: The most unsent bytes seen at once.
        self.peak = 0

    @property
    def unsent(self) -> int:
        """Bytes written and not yet read by the peer."""
        return len(self.value()) - self.taken

    def write(self, data: bytes) -> None:
        if self.disconnecting:
            return
        super().write(data)
        self.peak = max(self.peak, self.unsent)
        if (
            self.producer is not None
            and self.streaming
            and not self.producer_paused
            and self.unsent > self.bound
        ):
            self.producer_paused = True
            self.producer.pauseProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        if not streaming:
            producer.resumeProducing()

    def take(self) -> bytes:
        """The peer reads all that is unsent; the producer hears of the drain, as on
        TCP (a paused streaming producer is resumed, a pull producer asked for more)."""
        got = self.value()[self.taken :]
        self.taken = len(self.value())
        producer = self.producer
        if producer is not None and (not self.streaming or self.producer_paused):
            self.producer_paused = False
            producer.resumeProducing()
        return got


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One real Store for the module (opening one is slow)."""
    store = Store(tmp_path_factory.mktemp("bounded") / "store", value_max=VALUE_MAX)
    yield store
    store.close()


class Server:
    """A storage server's factory (one-way, or two-way as the master's) on a Clock."""

    def __init__(self, store: Store, two_way: bool = False) -> None:
        self.clock = Clock()
        self.store = store
        handler = StorageHandler(store, _inline)
        self.factory = ServerFactory(
            storage_responders(handler, TaskLogs(None), VALUE_MAX),
            self.clock,
            token=TOKEN,
            limits=LIMITS,
            two_way=two_way,
        )
        self.lines: list[dict[str, Any]] = []
        self.factory.peer_log = PeerLog(self.clock, Logger(observer=self.lines.append))

    def connect(
        self, authenticated: bool = True, host: str = "192.0.2.1", bound: int = BOUND
    ) -> tuple[Connection, TcpLikeTransport]:
        """A new connection from ``host``; authenticated (its output taken) if asked."""
        proto = self.factory.buildProtocol(None)
        t = TcpLikeTransport(host, bound=bound)
        proto.makeConnection(t)
        if authenticated:
            proto.dataReceived(req("auth", 1, token=TOKEN))
            [(head, _)] = responses(t.take())
            assert head.ok
        return proto, t


def _inline(fn: Any) -> Any:
    from twisted.internet import defer

    try:
        return defer.succeed(fn())
    except BaseException:
        return defer.fail()


@pytest.fixture
def server(shared_store: Store) -> Iterator[Server]:
    """A fresh factory over the shared store, emptied afterwards."""
    yield Server(shared_store)
    for entry in list(shared_store.inventory()):
        shared_store.delete(entry.key)


def closed_with(t: TcpLikeTransport, code: str) -> bool:
    """The last thing written is an ERROR ``code`` and the connection is closing."""
    got = responses(t.value())
    return bool(got) and got[-1][0].headers.get("code") == code and t.disconnecting


# == before authentication =================================================================


@pytest.mark.parametrize("two_way", [False, True], ids=["one-way", "two-way"])
def test_response_frame_before_auth_closes_unread(shared_store: Store, two_way: bool) -> None:
    """A response frame promising 60 MB before auth: auth-required, closed, nothing of its
    payload kept (on a two-way server it used to be buffered as a response)."""
    server = Server(shared_store, two_way=two_way)
    proto, t = server.connect(authenticated=False)
    proto.dataReceived(b"OK 1\r\nLength: 60000001\r\n\r\n" + b"x" * 4000)
    proto.dataReceived(b"x" * 4000)
    assert t.disconnecting
    assert proto.parser.buffered <= PREAUTH_MAX
    if not two_way:
        assert responses(t.value())[-1][0].headers["code"] == "bad-frame"
    else:
        assert closed_with(t, "auth-required")
        assert proto.calls is not None and proto.calls.reading is None
    assert server.factory.unauthenticated == 0


def test_request_before_auth_closes_and_is_never_dispatched(server: Server) -> None:
    """A storage request before auth: auth-required, closed, nothing stored."""
    proto, t = server.connect(authenticated=False)
    proto.dataReceived(req("value_upload", 2, b"v", key="k"))
    assert closed_with(t, "auth-required")
    assert server.store.count == 0


def test_more_than_preauth_max_before_auth_closes(server: Server) -> None:
    """A head that never ends within PREAUTH_MAX bytes (well under the 16 KiB head limit):
    closed as soon as the bytes pass the bound."""
    proto, t = server.connect(authenticated=False)
    pad = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    sent = len(b"auth 1\r\n")
    proto.dataReceived(b"auth 1\r\n")
    while sent <= PREAUTH_MAX:
        assert not t.disconnecting
        proto.dataReceived(pad)
        sent += len(pad)
    assert closed_with(t, "auth-required")


def test_auth_followed_by_a_large_pipelined_request_is_not_cut(server: Server) -> None:
    """Bytes behind a complete auth are the authenticated peer's: a pipelined value of
    several times PREAUTH_MAX in the same read is taken."""
    proto, t = server.connect(authenticated=False)
    value = b"v" * (4 * PREAUTH_MAX)
    proto.dataReceived(req("auth", 1, token=TOKEN) + req("value_upload", 2, value, key="k"))
    assert [(h.kind, h.id) for h, _ in responses(t.value())] == [("OK", 1), ("OK", 2)]
    assert not t.disconnecting


def test_twenty_thousand_bad_frames_make_one_log_line(shared_store: Store) -> None:
    """20,000 tiny response frames in one write before auth: closed at the first, one
    line logged."""
    server = Server(shared_store, two_way=True)
    proto, t = server.connect(authenticated=False)
    proto.dataReceived(b"OK 1\r\n\r\n" * 20_000)
    assert closed_with(t, "auth-required")
    assert len(server.lines) == 1


def test_peer_lines_are_rate_limited() -> None:
    """PeerLog lets `burst` lines through, counts the rest, and says how many it left
    out once the rate allows again."""
    clock = Clock()
    lines: list[dict[str, Any]] = []
    plog = PeerLog(clock, Logger(observer=lines.append), burst=5, period=10.0)
    for i in range(1000):
        plog.warn("bad peer {i}", i=i)
    assert [e["i"] for e in lines] == [0, 1, 2, 3, 4]
    clock.advance(2.0)  # one line earned back
    plog.warn("bad peer {i}", i=1000)
    assert lines[5]["n"] == 995 and lines[6]["i"] == 1000
    assert len(lines) == 7


def test_bad_frames_on_many_connections_are_rate_limited(server: Server) -> None:
    """One bad frame on each of 500 connections: a bounded number of log lines."""
    for i in range(500):
        proto, t = server.connect(authenticated=False, host=f"198.51.100.{i % 250}")
        proto.dataReceived(b"frobnicate 1\r\n\r\n")
        assert t.disconnecting
        proto.connectionLost(Failure(ConnectionDone()))
    assert len(server.lines) <= 25


# == the unauthenticated pool ==============================================================


def test_a_new_unauthenticated_connection_closes_the_oldest(server: Server) -> None:
    """Over max_unauthenticated the oldest unauthenticated connection that has had its
    grace is closed (across source addresses), not the newcomer."""
    conns = [
        server.connect(authenticated=False, host=f"203.0.113.{i}")
        for i in range(LIMITS.max_unauthenticated)
    ]
    assert not any(t.disconnecting for _, t in conns)
    server.clock.advance(AUTH_GRACE)
    proto, t = server.connect(authenticated=False, host="203.0.113.200")
    assert not any(t.disconnecting for _, t in conns)  # judged a reactor turn later
    server.clock.advance(0)
    assert not t.disconnecting
    assert [t.disconnecting for _, t in conns] == [True] + [False] * (len(conns) - 1)
    assert server.factory.unauthenticated == LIMITS.max_unauthenticated
    conns[0][0].connectionLost(Failure(ConnectionDone()))  # counted once only
    assert server.factory.unauthenticated == LIMITS.max_unauthenticated


def test_one_address_closes_only_its_own_oldest(server: Server) -> None:
    """Over max_unauthenticated_per_host from one address: that address's oldest goes;
    another address's connection is left alone."""
    other = server.connect(authenticated=False, host="198.51.100.7")
    mine = [server.connect(authenticated=False) for _ in range(LIMITS.max_unauthenticated_per_host)]
    server.clock.advance(AUTH_GRACE)
    newest = server.connect(authenticated=False)
    server.clock.advance(0)
    assert mine[0][1].disconnecting and not mine[1][1].disconnecting
    assert not other[1].disconnecting and not newest[1].disconnecting


class FakePort:
    """A listening port's accepting, as the pool pauses and resumes it."""

    def __init__(self) -> None:
        self.reading = True
        self.stops = 0
        self.numberAccepts = 300  # Twisted's accept loop, grown by a flood

    def stopReading(self) -> None:
        self.reading = False
        self.stops += 1

    def startReading(self) -> None:
        self.reading = True


def test_a_crowd_of_young_connections_pauses_accepting_instead_of_closing(
    server: Server,
) -> None:
    """A crowd arriving at once (more than the pool holds, before any has been read):
    nobody is pushed out; the listener stops accepting until the pool is back under its
    cap, here because one authenticated."""
    port = FakePort()
    server.factory.attach_port(port)
    n = LIMITS.max_unauthenticated + 2
    conns = [server.connect(authenticated=False, host=f"203.0.113.{i}") for i in range(n)]
    assert not any(t.disconnecting for _, t in conns)
    assert not port.reading and server.factory.preauth.paused
    for proto, t in conns[:2]:
        proto.dataReceived(req("auth", 1, token=TOKEN))
        [(head, _)] = responses(t.take())
        assert head.ok
    assert port.reading and port.stops == 1
    assert port.numberAccepts == LIMITS.max_unauthenticated  # a pool's worth per read
    assert server.factory.unauthenticated == LIMITS.max_unauthenticated


def test_a_pool_full_of_young_connections_makes_room_once_they_had_their_grace(
    server: Server,
) -> None:
    """Paused while every connection is young; when the oldest has had its grace, those
    over the cap are closed, oldest first, and accepting resumes."""
    port = FakePort()
    server.factory.attach_port(port)
    conns = [server.connect(authenticated=False, host=f"203.0.113.{i}")
             for i in range(LIMITS.max_unauthenticated)]
    server.clock.advance(AUTH_GRACE / 2)
    late = [server.connect(authenticated=False, host=f"198.51.100.{i}") for i in range(2)]
    assert not port.reading and not any(t.disconnecting for _, t in conns + late)
    server.clock.advance(AUTH_GRACE / 2)
    assert [t.disconnecting for _, t in conns] == [True, True] + [False] * (len(conns) - 2)
    assert not any(t.disconnecting for _, t in late)
    assert port.reading
    assert server.factory.unauthenticated == LIMITS.max_unauthenticated


def test_after_a_stall_an_auth_already_sent_is_read_before_anyone_is_judged(
    server: Server,
) -> None:
    """The reactor stalled past the grace while the oldest's auth waited in its socket:
    the newcomer that arrives as it wakes does not close that connection at once; the
    auth is read first, and the next oldest idle one goes instead."""
    conns = [server.connect(authenticated=False, host=f"203.0.113.{i}")
             for i in range(LIMITS.max_unauthenticated)]
    server.clock.advance(4 * AUTH_GRACE)  # a stall: no reactor turn meanwhile
    server.connect(authenticated=False, host="198.51.100.1")  # accepted as it wakes
    first, t0 = conns[0]
    assert not t0.disconnecting
    first.dataReceived(req("auth", 1, token=TOKEN))  # read in the same turn
    [(head, _)] = responses(t0.take())
    assert head.ok
    server.clock.advance(0)  # the next turn: room is made among those still waiting
    assert not t0.disconnecting
    assert not any(t.disconnecting for _, t in conns[1:])  # one left the pool: room
    server.clock.advance(AUTH_GRACE)
    server.connect(authenticated=False, host="198.51.100.2")
    server.clock.advance(0)
    assert conns[1][1].disconnecting and not any(t.disconnecting for _, t in conns[2:])


def test_past_four_times_the_cap_the_oldest_goes_whatever_its_age(server: Server) -> None:
    """One accept burst can take many connections at once: past HARD_FACTOR times the
    cap the oldest is closed at once, so the pool's memory stays bounded."""
    from dsml.net.preauth import HARD_FACTOR

    hard = HARD_FACTOR * LIMITS.max_unauthenticated
    conns = [server.connect(authenticated=False, host=f"203.0.113.{i}")
             for i in range(hard + 3)]
    assert [t.disconnecting for _, t in conns] == [True] * 3 + [False] * (len(conns) - 3)
    assert server.factory.unauthenticated == hard


def test_unauthenticated_connections_never_keep_an_authenticated_one_out(
    server: Server,
) -> None:
    """With the unauthenticated pool full (and kept full), a client still connects and
    authenticates, up to max_connections authenticated ones."""
    for i in range(3 * LIMITS.max_unauthenticated):
        server.connect(authenticated=False, host=f"203.0.113.{i}")
    clients = [server.connect() for _ in range(LIMITS.max_connections)]
    assert not any(t.disconnecting for _, t in clients)
    assert server.factory.authenticated == LIMITS.max_connections
    proto, t = server.connect(authenticated=False)
    assert closed_with(t, "busy")  # no authenticated place left: told at once
    clients[0][0].connectionLost(Failure(ConnectionDone()))
    proto, t = server.connect()
    assert not t.disconnecting


# == output backpressure ===================================================================


def test_pipelined_value_reads_stop_at_the_output_bound(server: Server) -> None:
    """200 pipelined value_retrieve of a 60 KiB value, never read: one answer goes out,
    then nothing more is answered or read until the peer takes it; all 200 come in turn."""
    value = b"V" * (60 * 1024)
    proto, t = server.connect()
    proto.dataReceived(req("value_upload", 2, value, key="big"))
    assert responses(t.take())[0][0].ok
    t.clear()
    t.taken = 0
    proto.dataReceived(b"".join(req("value_retrieve", 10 + i, key="big") for i in range(200)))
    assert len(responses(t.value()[t.taken :])) == 1
    assert t.producerState == "paused"  # reading stopped
    assert t.peak <= BOUND + len(value) + 200
    got = 1
    for _ in range(400):
        if got == 200:
            break
        t.take()
        got = len(responses(t.value()))
        assert t.unsent <= BOUND + len(value) + 200
    assert got == 200
    assert t.peak <= BOUND + len(value) + 200


def test_pipelined_small_downloads_stop_at_the_output_bound(server: Server) -> None:
    """Pipelined file_retrieve of a small file (finished inside registerProducer, as on
    TCP), never read: the unsent output stays within the bound plus one file."""
    data = b"F" * (40 * 1024)
    proto, t = server.connect()
    proto.dataReceived(
        req("file_upload", 2, data, key="f", sha256=hashlib.sha256(data).hexdigest())
    )
    assert responses(t.take())[0][0].ok
    t.clear()
    t.taken = 0
    proto.dataReceived(b"".join(req("file_retrieve", 10 + i, key="f") for i in range(100)))
    assert t.peak <= BOUND + 2 * len(data)
    got = len(responses(t.value()[t.taken :]))
    assert got < 5
    for _ in range(400):
        if got == 100:
            break
        t.take()
        got = len(responses(t.value()))
    assert got == 100
    assert t.peak <= BOUND + 2 * len(data)
    assert t.streaming  # the output gate is back


def test_output_never_taken_is_cut_after_payload_timeout(server: Server) -> None:
    """A peer that never reads what it asked for: cut (aborted) payload_timeout after the
    output went over the bound, and nothing more answered meanwhile."""
    value = b"V" * (30 * 1024)
    proto, t = server.connect()
    proto.dataReceived(req("value_upload", 2, value, key="v"))
    t.take()
    proto.dataReceived(req("value_retrieve", 3, key="v") + req("ping", 4))
    assert [h.id for h, _ in responses(t.value()[t.taken :])] == [3]
    server.clock.advance(LIMITS.payload_timeout - 0.1)
    assert not t.disconnecting
    server.clock.advance(0.1)
    assert t.disconnecting and t.disconnected  # aborted
    assert [h.id for h, _ in responses(t.value()[t.taken :])] == [3]


def test_two_way_holds_requests_while_blocked_and_answers_them_after(
    shared_store: Store,
) -> None:
    """On a two-way connection (the master's) blocked output holds the peer's next
    requests (reading goes on for responses) and answers them once it drains."""
    server = Server(shared_store, two_way=True)
    proto, t = server.connect()
    value = b"W" * (30 * 1024)
    proto.dataReceived(req("value_upload", 2, value, key="w") + req("value_retrieve", 3, key="w"))
    proto.dataReceived(req("ping", 4) + req("ping", 5))
    assert [h.id for h, _ in responses(t.value()[t.taken :])] == [2, 3]
    assert t.producerState == "producing"  # still reading
    assert [h.id for h, _ in responses(t.take())] == [2, 3]
    assert [h.id for h, _ in responses(t.take())] == [4, 5]
    shared_store.delete("w")


# == payload deadlines =====================================================================


def test_trickling_payload_is_cut_at_its_total_deadline(server: Server) -> None:
    """A value trickling one byte per payload_timeout/2 keeps the progress deadline but
    not the total one: timeout at payload_total_timeout + length/payload_min_rate."""
    value = b"t" * 10_000
    proto, t = server.connect()
    proto.dataReceived(req("value_upload", 2, value, key="t")[: -len(value)])
    total = LIMITS.payload_total_timeout + len(value) / LIMITS.payload_min_rate
    elapsed = 0.0
    step = LIMITS.payload_timeout / 2
    while elapsed + step < total:
        proto.dataReceived(b"t")
        server.clock.advance(step)
        elapsed += step
        assert not t.disconnecting
    server.clock.advance(total - elapsed)
    assert closed_with(t, "timeout")
    assert "not whole" in responses(t.value())[-1][0].headers["message"]
    assert server.store.count == 0


def test_a_payload_at_the_minimum_rate_completes(server: Server) -> None:
    """A payload that keeps the minimum rate is taken, though it takes longer than
    payload_timeout."""
    value = b"r" * 10_000
    proto, t = server.connect()
    proto.dataReceived(req("value_upload", 2, value, key="r")[: -len(value)])
    for i in range(0, len(value), 5000):
        server.clock.advance(5.0)
        proto.dataReceived(value[i : i + 5000])
    [(head, _)] = responses(t.take())
    assert head.ok


def test_tls_handshakes_in_progress_are_in_the_unauthenticated_pool(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Over TLS a connection is unauthenticated until its handshake is done: handshakes
    that never finish fill the same pool, a newer one closes the oldest, and each is cut
    at the auth deadline at the latest."""
    from dsml import pki
    from dsml.net.responders import NO_REQUESTS
    from dsml.net.tls import PeerCheck, TlsIdentity

    root = tmp_path_factory.mktemp("pki")
    pki.init_cluster(root, "127.0.0.1", [("w1", "127.0.0.1")])
    tls = TlsIdentity(root, "master", "master")
    clock = Clock()
    factory = ServerFactory(
        NO_REQUESTS, clock, None, LIMITS, peer_check=PeerCheck(tls, frozenset({"user"}))
    )
    wrapped = tls.wrap_server(factory)
    transports = []
    for i in range(LIMITS.max_unauthenticated + 1):
        if i == LIMITS.max_unauthenticated:
            clock.advance(AUTH_GRACE)  # the others have had their grace
        addr = IPv4Address("TCP", f"203.0.113.{i}", 5555)
        proto = wrapped.buildProtocol(addr)
        t = StringTransport(peerAddress=addr)
        proto.makeConnection(t)
        transports.append(t)
    clock.advance(0)
    assert [t.disconnecting for t in transports] == [True] + [False] * LIMITS.max_unauthenticated
    assert factory.unauthenticated == LIMITS.max_unauthenticated
    clock.advance(LIMITS.auth_timeout)  # the last one's deadline, too
    assert all(t.disconnecting for t in transports)
    assert b"timeout" not in b"".join(t.value() for t in transports)  # nothing in clear
