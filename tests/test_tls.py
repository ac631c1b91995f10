"""TLS connections without the real reactor: a handshake that never finishes is cut at the
auth deadline (task.Clock), on accepted and on dialled connections alike; the TLS
transport (dsml.net.tls_transport) between two in-memory peers (iosim); decrypting what
has arrived (dsml.net.tlsbio) at every packet size; and the blocking client's TLS
(dsml.client.tls_socket) against a stdlib TLS server on a socketpair."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from dsml import pki
from dsml.client.server import ClientTls
from dsml.client.tls_socket import TlsSocket
from dsml.net.limits import Limits
from dsml.net.links import LinkFactory
from dsml.net.responders import NO_REQUESTS
from dsml.net.server import ServerFactory
from dsml.net.tls import PeerCheck, TlsIdentity
from dsml.net.tls_transport import READ_MAX, TlsFactory
from dsml.net.tlsbio import decrypt_available
from dsml.net.twisted_private import set_read_size
from dsml.protocol.methods import Role

AUTH_TIMEOUT = 3.0
ADDR = IPv4Address("TCP", "127.0.0.1", 5555)


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a master, a worker and the admin user."""
    root = tmp_path_factory.mktemp("pki")
    pki.init_cluster(root, "127.0.0.1", [("w1", "127.0.0.1")])
    return root


def test_accepted_handshake_never_finished_is_cut_at_the_deadline(pki_dir: Path) -> None:
    """A peer that opens TCP and never completes TLS is aborted after auth_timeout, and
    counts as unauthenticated until then."""
    tls = TlsIdentity(pki_dir, "master", "master")
    clock = Clock()
    factory = ServerFactory(
        NO_REQUESTS, clock, None, Limits(auth_timeout=AUTH_TIMEOUT),
        peer_check=PeerCheck(tls, frozenset({"user", "worker"})),
    )
    proto = tls.wrap_server(factory).buildProtocol(ADDR)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert factory.unauthenticated == 1
    clock.advance(AUTH_TIMEOUT - 0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
    assert b"timeout" not in transport.value()  # nothing sent in clear


def test_dialled_handshake_never_finished_is_cut_at_the_deadline(pki_dir: Path) -> None:
    """A dialled link whose server never answers the ClientHello is cut too (a dialled
    link otherwise has no auth deadline: it trusts whom it dialled)."""
    tls = TlsIdentity(pki_dir, "worker", "w1")
    clock = Clock()
    factory = LinkFactory(
        NO_REQUESTS, clock, Limits(auth_timeout=AUTH_TIMEOUT),
        peer_roles=frozenset({Role.MASTER}),
        peer_check=PeerCheck(tls, frozenset({"master"})),
    )
    proto = TlsFactory(tls.client_context, True, factory).buildProtocol(ADDR)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert transport.value()  # the ClientHello went out
    clock.advance(AUTH_TIMEOUT + 0.1)
    assert transport.disconnecting


# -- the TLS transport (dsml.net.tls_transport) and its decryption (dsml.net.tlsbio) ------


class Collector(Protocol):
    """Keeps what arrives and how the connection ended."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost: Failure | None = None

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)

    def dataReceived(self, data: bytes) -> None:
        assert type(data) is bytes
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


def tls_pair(
    server: TlsIdentity, client: TlsIdentity, connect: bool = True
) -> tuple[Collector, Collector, Any, Any, Any]:
    """A TLS server and client over iosim's in-memory transports: (server app, client
    app, server TLS protocol, client TLS protocol, pump)."""
    s_app, c_app = Collector(), Collector()
    s_tls = TlsFactory(server.server_context, False, Factory.forProtocol(lambda: s_app))
    c_tls = TlsFactory(client.client_context, True, Factory.forProtocol(lambda: c_app))
    s_proto = s_tls.buildProtocol(ADDR)
    c_proto = c_tls.buildProtocol(ADDR)
    pump = iosim.connect(
        s_proto, iosim.FakeTransport(s_proto, True),
        c_proto, iosim.FakeTransport(c_proto, False),
        greet=connect,
    )
    return s_app, c_app, s_proto, c_proto, pump


@pytest.fixture(scope="module")
def worker_tls(pki_dir: Path) -> TlsIdentity:
    return TlsIdentity(pki_dir, "worker", "w1")


@pytest.fixture(scope="module")
def master_tls(pki_dir: Path) -> TlsIdentity:
    return TlsIdentity(pki_dir, "master", "master")


def test_bytes_written_before_the_handshake_arrive_after_it(
    worker_tls: TlsIdentity, master_tls: TlsIdentity
) -> None:
    """A client may write at once: its bytes wait for the handshake, then go whole; each
    side learns the other's verified identity from its certificate."""
    s_app, c_app, s_proto, c_proto, pump = tls_pair(worker_tls, master_tls, connect=False)
    c_proto.write(b"hello ")
    c_proto.writeSequence([b"wor", b"ld"])
    assert s_proto.getPeerCertificate() is None  # no handshake yet
    pump.flush()
    assert s_app.received == b"hello world"
    s_proto.write(b"answer")
    pump.flush()
    assert c_app.received == b"answer"
    assert worker_tls.peer_identity(s_proto).kind == "master"
    assert master_tls.peer_identity(c_proto).name == "w1"


def test_a_large_write_arrives_whole_in_few_pieces(
    worker_tls: TlsIdentity, master_tls: TlsIdentity
) -> None:
    """3 MiB written at once arrive intact; the receiver gets the records of one read
    together, not one call per 16 KiB record."""
    s_app, c_app, s_proto, c_proto, pump = tls_pair(worker_tls, master_tls)
    data = os.urandom(3 * 1024 * 1024 + 5)
    c_proto.write(data)
    pump.flush()
    assert s_app.received == data
    assert len(s_app.chunks) < len(data) // (16 * 1024) // 4


def test_lose_connection_delivers_everything_then_closes_cleanly(
    worker_tls: TlsIdentity, master_tls: TlsIdentity
) -> None:
    """Bytes written before loseConnection arrive; then both sides see a clean close."""
    s_app, c_app, s_proto, c_proto, pump = tls_pair(worker_tls, master_tls)
    s_proto.write(b"last words")
    s_proto.loseConnection()
    s_proto.write(b"dropped")  # after loseConnection, without a producer
    pump.flush()
    assert c_app.received == b"last words"
    assert c_app.lost is not None and c_app.lost.check(ConnectionDone)
    assert s_app.lost is not None and s_app.lost.check(ConnectionDone)


def test_a_certificate_from_another_ca_is_refused_before_any_data(
    tmp_path: Path, worker_tls: TlsIdentity
) -> None:
    """A client whose certificate another CA signed: the handshake fails, the
    server's application never sees a byte, both sides end with the TLS failure."""
    other = tmp_path / "other-pki"
    pki.init_cluster(other, "127.0.0.1", [("w1", "127.0.0.1")])
    stranger = TlsIdentity(other, "master", "master")
    s_app, c_app, s_proto, c_proto, pump = tls_pair(worker_tls, stranger, connect=False)
    c_proto.write(b"let me in")
    pump.flush()
    assert s_app.received == b""
    assert s_app.lost is not None and s_app.lost.check(ssl.SSLError)
    assert c_app.lost is not None  # the server's alert, or the close that follows


def test_plaintext_to_a_tls_listener_is_refused(worker_tls: TlsIdentity) -> None:
    """Bytes that are not TLS end the connection; nothing reaches the application."""
    s_app = Collector()
    proto = TlsFactory(
        worker_tls.server_context, False, Factory.forProtocol(lambda: s_app)
    ).buildProtocol(ADDR)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"ping 1 0\r\nKey: x\r\n\r\n")
    assert transport.disconnecting
    assert s_app.received == b""
    proto.connectionLost(Failure(ConnectionDone()))
    assert s_app.lost is not None and s_app.lost.check(ssl.SSLError)


def test_read_size_reaches_the_tcp_transport(worker_tls: TlsIdentity) -> None:
    """set_read_size on the TLS transport sets the TCP transport's read size beneath,
    up to READ_MAX."""
    proto = worker_tls.wrap_server(Factory.forProtocol(Collector)).buildProtocol(ADDR)
    transport = StringTransport()
    transport.bufferSize = 4096  # type: ignore[attr-defined]
    proto.makeConnection(transport)
    set_read_size(proto, 32 * 1024)
    assert transport.bufferSize == 32 * 1024  # type: ignore[attr-defined]
    set_read_size(proto, 1024 * 1024)
    assert transport.bufferSize == READ_MAX  # type: ignore[attr-defined]
    assert proto.bufferSize == READ_MAX


def test_a_links_keepalive_reaches_the_tcp_socket_beneath_tls(worker_tls: TlsIdentity) -> None:
    """tune_socket on a TLS link sets keepalive and TCP_USER_TIMEOUT on the TCP socket
    beneath (a long-lived link must notice a peer that vanished)."""
    import socket

    from dsml.net.links import USER_TIMEOUT_MS, tune_socket

    class Tcp(StringTransport):
        keepalive = False

        def setTcpKeepAlive(self, on: bool) -> None:  # noqa: N802 - Twisted's name
            self.keepalive = on

        def getHandle(self) -> socket.socket:  # noqa: N802 - Twisted's name
            return self.sock

    proto = worker_tls.wrap_server(Factory.forProtocol(Collector)).buildProtocol(ADDR)
    tcp = Tcp()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp.sock:
        proto.makeConnection(tcp)
        tune_socket(proto)
        assert tcp.keepalive
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            got = tcp.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            assert got == USER_TIMEOUT_MS


def test_a_producer_runs_on_the_tcp_transport_and_close_waits_for_it(
    worker_tls: TlsIdentity, master_tls: TlsIdentity
) -> None:
    """A pull producer registered on the TLS transport is driven by the TCP transport;
    loseConnection while it is registered closes only after it is unregistered."""
    s_app, c_app, s_proto, c_proto, pump = tls_pair(worker_tls, master_tls)
    pieces = [b"a" * 100_000, b"b" * 100_000]

    @implementer(IPullProducer)
    class Pieces:
        def resumeProducing(self) -> None:
            if pieces:
                s_proto.write(pieces.pop(0))

        def stopProducing(self) -> None:
            pieces.clear()

    s_proto.registerProducer(Pieces(), False)
    s_proto.loseConnection()
    pump.flush()
    assert c_app.lost is None  # the producer is still registered
    while pieces:
        s_proto.transport.producer.resumeProducing()
    s_proto.unregisterProducer()
    pump.flush()
    assert c_app.received == b"a" * 100_000 + b"b" * 100_000
    assert c_app.lost is not None and c_app.lost.check(ConnectionDone)


def _memory_pair(worker_tls: TlsIdentity, master_tls: TlsIdentity) -> tuple[Any, ...]:
    """Two SSLObjects over memory BIOs, handshake done: (sender, its outgoing BIO,
    receiver, its incoming BIO)."""
    si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = worker_tls.server_context.wrap_bio(si, so, server_side=True)
    client = master_tls.client_context.wrap_bio(ci, co)
    for _ in range(4):
        for side, out, into in ((client, co, si), (server, so, ci)):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            into.write(out.read())
    return server, so, client, ci


@pytest.mark.parametrize("scratch", [False, True])
@pytest.mark.parametrize("piece", [1, 5, 700, 4096, 4097, 16 * 1024 + 22, 50_000, 1 << 20])
def test_decrypt_available_at_every_packet_size(
    worker_tls: TlsIdentity, master_tls: TlsIdentity, piece: int, scratch: bool
) -> None:
    """However the records are cut into reads (a record begun in one read and ended in a
    small next one included), all the plaintext comes out, in order, and the peer's
    close is seen after it; read through a reused scratch buffer too (each result a
    copy of its own, not a view of the buffer)."""
    buf = bytearray(READ_MAX + 2 * 16 * 1024) if scratch else None
    sender, out, receiver, incoming = _memory_pair(worker_tls, master_tls)
    plain = os.urandom(40_000) + b"small" + os.urandom(70_000)
    sender.write(plain[:40_000])
    sender.write(plain[40_000:40_005])
    sender.write(plain[40_005:])
    try:
        sender.unwrap()
    except ssl.SSLWantReadError:
        pass
    wire = out.read()
    got = []
    ended = False
    for i in range(0, len(wire), piece):
        incoming.write(wire[i : i + piece])
        data, ended = decrypt_available(receiver, incoming, None, buf)
        assert type(data) is bytes
        got.append(data)
    assert b"".join(got) == plain
    assert ended


def test_decrypt_available_keeps_what_is_over_the_limit(
    worker_tls: TlsIdentity, master_tls: TlsIdentity
) -> None:
    """With a limit, the rest stays for the next call: nothing is lost."""
    sender, out, receiver, incoming = _memory_pair(worker_tls, master_tls)
    plain = os.urandom(100_000)
    sender.write(plain)
    incoming.write(out.read())
    first, _ = decrypt_available(receiver, incoming, 30_000)
    assert len(first) == 30_000
    rest = []
    while True:
        data, _ = decrypt_available(receiver, incoming, 30_000)
        if not data:
            break
        rest.append(data)
    assert first + b"".join(rest) == plain


def test_decrypt_available_reports_a_corrupt_record(
    worker_tls: TlsIdentity, master_tls: TlsIdentity
) -> None:
    """A record altered on the way fails its authentication tag: an SSLError."""
    sender, out, receiver, incoming = _memory_pair(worker_tls, master_tls)
    sender.write(b"x" * 10_000)
    wire = bytearray(out.read())
    wire[100] ^= 1
    incoming.write(bytes(wire))
    with pytest.raises(ssl.SSLError):
        decrypt_available(receiver, incoming)


# -- the blocking client's TLS (dsml.client.tls_socket) ------------------------------------


def _serve_one(sock: socket.socket, context: ssl.SSLContext, script: Any) -> threading.Thread:
    """A TLS server on one end of a socketpair, in a thread: the handshake, then
    ``script(tls_socket)``; errors are kept on the thread (``.error``)."""

    def run() -> None:
        try:
            with context.wrap_socket(sock, server_side=True) as tls:
                script(tls)
        except Exception as e:  # reported by the test through .error
            thread.error = e  # type: ignore[attr-defined]

    thread = threading.Thread(target=run, daemon=True)
    thread.error = None  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_tls_socket_round_trips_small_and_large(
    worker_tls: TlsIdentity, pki_dir: Path
) -> None:
    """A request and its answer, then 3 MiB from the server: all intact; the large
    answer comes in reads of many records each; the server's close reads as b""."""
    big = os.urandom(3 * 1024 * 1024)

    def script(tls: ssl.SSLSocket) -> None:
        assert tls.recv(100) == b"ping"
        tls.sendall(b"pong")
        assert tls.recv(100) == b"more"
        tls.sendall(big)

    a, b = socket.socketpair()
    a.settimeout(30)
    thread = _serve_one(b, worker_tls.server_context, script)
    client = ClientTls(pki_dir, "admin")
    sock = TlsSocket(a, client.context)
    try:
        client.check_peer(sock, "w1")  # the certificate names a worker
        sock.sendall(b"ping")
        assert sock.recv(65536) == b"pong"
        sock.sendall(b"more")
        pieces = []
        while sum(map(len, pieces)) < len(big):
            pieces.append(sock.recv(1024 * 1024))
        thread.join(30)
        assert thread.error is None  # type: ignore[attr-defined]
        assert b"".join(pieces) == big
        assert len(pieces) < len(big) // (16 * 1024)
        assert sock.recv(65536) == b""
    finally:
        sock.close()


def test_tls_socket_refuses_a_server_of_another_ca(tmp_path: Path, pki_dir: Path) -> None:
    """A server whose certificate another CA signed fails the handshake: SSLError."""
    other = tmp_path / "other-pki"
    pki.init_cluster(other, "127.0.0.1", [("w1", "127.0.0.1")])
    stranger = TlsIdentity(other, "worker", "w1")
    a, b = socket.socketpair()
    a.settimeout(30)
    thread = _serve_one(b, stranger.server_context, lambda tls: None)
    try:
        with pytest.raises(ssl.SSLError):
            TlsSocket(a, ClientTls(pki_dir, "admin").context)
    finally:
        a.close()
        thread.join(30)


# -- the small message's fast paths (issue #10) ----------------------------------------


def test_ssl_core_is_the_stdlib_objects_c_half(
    worker_tls: TlsIdentity, master_tls: TlsIdentity
) -> None:
    """tlsbio.ssl_core finds ``SSLObject._sslobj`` (a private attribute of the stdlib: a
    Python release without it would quietly cost a frame per call; this says so loudly),
    and it reads, writes and reports pending bytes as the SSLObject does."""
    from dsml.net.tlsbio import ssl_core

    sender, out, receiver, incoming = _memory_pair(worker_tls, master_tls)
    core = ssl_core(receiver)
    assert core is not receiver
    assert type(core).__module__ == "_ssl"
    assert ssl_core(sender).write(b"hello") == 5
    incoming.write(out.read())
    assert core.read(3) == b"hel"
    assert core.pending() == 2 == receiver.pending()
    assert core.read(100) == b"lo"
    with pytest.raises(ssl.SSLWantReadError):
        core.read(100)


def _tls_server_on_a_string_transport(
    worker_tls: TlsIdentity, master_tls: TlsIdentity
) -> tuple[Collector, Any, StringTransport, Any, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A server TlsProtocol on a StringTransport, its handshake done with an SSLObject
    client over memory BIOs: (app, protocol, transport, client, client's incoming,
    client's outgoing)."""
    app = Collector()
    proto = worker_tls.wrap_server(Factory.forProtocol(lambda: app)).buildProtocol(ADDR)
    transport = StringTransport()
    proto.makeConnection(transport)
    ci, co = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = master_tls.client_context.wrap_bio(ci, co)
    for _ in range(4):
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        if co.pending:
            proto.dataReceived(co.read())
        ci.write(transport.value())
        transport.clear()
    assert proto.getPeerCertificate() is not None
    return app, proto, transport, client, ci, co


def test_small_records_through_the_transport_however_they_are_cut(
    worker_tls: TlsIdentity, master_tls: TlsIdentity
) -> None:
    """Small requests, as the fast path in dataReceived takes them: one record a read;
    a record cut anywhere into two reads; two records in one read; and a record with
    the peer's close_notify behind it.  All arrive, in order, and the close is clean
    (ours sent, the TCP connection closed)."""
    app, proto, transport, client, ci, co = _tls_server_on_a_string_transport(
        worker_tls, master_tls
    )
    client.write(b"first request")
    proto.dataReceived(co.read())
    assert app.chunks == [b"first request"]  # one record, one call, as it came
    proto.dataReceived(b"")  # nothing: nothing happens
    assert not transport.disconnecting
    record = b"x" * 90 + b"split"
    expected = [b"first request"]
    client.write(record)
    wire = co.read()
    proto.dataReceived(wire)
    expected.append(record)
    for cut in range(1, len(wire)):  # the same record, cut at every byte
        client.write(record)
        wire = co.read()
        proto.dataReceived(wire[:cut])
        proto.dataReceived(wire[cut:])
        expected.append(record)
    client.write(b"two ")
    client.write(b"records")
    proto.dataReceived(co.read())
    expected.append(b"two records")
    client.write(b"last")
    try:
        client.unwrap()
    except ssl.SSLWantReadError:
        pass
    proto.dataReceived(co.read())
    expected.append(b"last")
    assert app.received == b"".join(expected)
    assert transport.disconnecting  # the peer's close_notify: ours, then close
    ci.write(transport.value())
    client.unwrap()  # ours arrived: the client's unwrap completes
    proto.connectionLost(Failure(ConnectionDone()))
    assert app.lost is not None and app.lost.check(ConnectionDone)


def test_a_close_notify_alone_and_a_corrupt_small_record(
    worker_tls: TlsIdentity, master_tls: TlsIdentity
) -> None:
    """The peer's close_notify arriving alone closes cleanly; a small record altered on
    the way ends the connection with the TLS failure, delivering nothing of it."""
    app, proto, transport, client, ci, co = _tls_server_on_a_string_transport(
        worker_tls, master_tls
    )
    try:
        client.unwrap()
    except ssl.SSLWantReadError:
        pass
    proto.dataReceived(co.read())
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    assert app.lost is not None and app.lost.check(ConnectionDone)

    app, proto, transport, client, ci, co = _tls_server_on_a_string_transport(
        worker_tls, master_tls
    )
    client.write(b"good")
    proto.dataReceived(co.read())
    client.write(b"x" * 100)
    wire = bytearray(co.read())
    wire[30] ^= 1
    proto.dataReceived(bytes(wire))
    assert app.received == b"good"
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    assert app.lost is not None and app.lost.check(ssl.SSLError)


def test_small_writes_go_out_as_records_at_once(
    worker_tls: TlsIdentity, master_tls: TlsIdentity
) -> None:
    """A small write after the handshake is one record on the TCP transport at once;
    after loseConnection, writes are dropped and close_notify goes out."""
    app, proto, transport, client, ci, co = _tls_server_on_a_string_transport(
        worker_tls, master_tls
    )
    proto.write(b"reply one")
    proto.writeSequence([b"reply ", b"two"])
    ci.write(transport.value())
    transport.clear()
    assert client.read(100) == b"reply one"
    assert client.read(100) == b"reply two"
    proto.loseConnection()
    proto.write(b"dropped")
    ci.write(transport.value())
    try:
        closed = client.read(100) == b""  # close_notify, with nothing before it
    except ssl.SSLZeroReturnError:
        closed = True
    assert closed
    assert transport.disconnecting


def test_sender_writes_to_an_idle_socket_and_queues_the_rest() -> None:
    """twisted_private.sender: on a real TCP transport with nothing queued, bytes go to
    the socket at once; with something queued, behind it (the transport's write)."""
    from twisted.internet import tcp

    from dsml.net.twisted_private import sender

    class Reactor:
        def addWriter(self, w: object) -> None:  # noqa: N802 - Twisted's name
            self.writer = w

        def removeWriter(self, w: object) -> None:  # noqa: N802 - Twisted's name
            pass

    a, b = socket.socketpair()
    try:
        conn = tcp.Connection(a, Protocol(), reactor=Reactor())  # type: ignore[arg-type]
        conn.connected = True
        send = sender(conn)
        send(b"now")
        b.settimeout(5)
        assert b.recv(100) == b"now"
        conn.write(b"queued ")
        send(b"after")
        assert conn.dataBuffer or conn._tempDataBuffer
        conn.doWrite()
        assert b.recv(100) == b"queued after"
    finally:
        a.close()
        b.close()
    plain = StringTransport()
    sender(plain)(b"to a test transport")
    assert plain.value() == b"to a test transport"


def _raw_tls_server(sock: socket.socket, context: ssl.SSLContext, script: Any) -> threading.Thread:
    """A TLS server over memory BIOs on one end of a socketpair, in a thread: the
    handshake, then ``script(records, send)``: ``records(*chunks)`` encrypts each chunk
    as a record and returns the bytes, ``send`` sends raw bytes; errors on ``.error``."""

    def run() -> None:
        try:
            inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = context.wrap_bio(inc, out, server_side=True)
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if out.pending:
                        sock.sendall(out.read())
                    inc.write(sock.recv(65536))
            if out.pending:
                sock.sendall(out.read())
            while True:  # the client's Finished (and certificate), and its first record
                try:
                    if tls.read(100) == b"go":
                        break
                except ssl.SSLWantReadError:
                    inc.write(sock.recv(65536))

            def records(*chunks: bytes) -> bytes:
                for c in chunks:
                    tls.write(c)
                return out.read()

            script(records, sock.sendall, tls, out)
        except Exception as e:  # reported by the test through .error
            thread.error = e  # type: ignore[attr-defined]

    thread = threading.Thread(target=run, daemon=True)
    thread.error = None  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_tls_socket_small_replies_however_they_are_cut(
    worker_tls: TlsIdentity, pki_dir: Path
) -> None:
    """The client's recv: a record cut into two socket reads, two records in one read,
    a record with close_notify behind it; then b"" for good."""
    import time

    def script(records: Any, send: Any, tls: Any, out: Any) -> None:
        wire = records(b"pong")
        send(wire[:7])
        time.sleep(0.2)  # the client reads the first piece alone
        send(wire[7:])
        time.sleep(0.2)
        send(records(b"two ", b"records"))
        time.sleep(0.2)
        tls.write(b"last")
        try:
            tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        send(out.read())

    a, b = socket.socketpair()
    a.settimeout(30)
    thread = _raw_tls_server(b, worker_tls.server_context, script)
    sock = TlsSocket(a, ClientTls(pki_dir, "admin").context)
    try:
        sock.sendall(b"go")
        assert sock.recv(65536) == b"pong"
        got = b""
        while len(got) < len(b"two records"):
            got += sock.recv(65536)
        assert got == b"two records"
        got = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            got += data
        assert got == b"last"
        assert sock.recv(65536) == b""
        thread.join(30)
        assert thread.error is None  # type: ignore[attr-defined]
    finally:
        sock.close()
        b.close()


def test_tls_socket_sends_more_than_the_socket_buffer_holds(
    worker_tls: TlsIdentity, pki_dir: Path
) -> None:
    """A send larger than the socket's buffer: the first write takes part of it, the
    rest waits for the reader; all of it arrives intact."""
    big = os.urandom(5 * 1024 * 1024)
    got: list[bytes] = []

    def script(tls: ssl.SSLSocket) -> None:
        import time

        time.sleep(0.3)  # the client's first write fills the buffer meanwhile
        n = 0
        while n < len(big):
            data = tls.recv(1024 * 1024)
            got.append(data)
            n += len(data)
        tls.sendall(b"done")

    a, b = socket.socketpair()
    a.settimeout(30)
    thread = _serve_one(b, worker_tls.server_context, script)
    sock = TlsSocket(a, ClientTls(pki_dir, "admin").context)
    try:
        sock.sendall(big)
        assert sock.recv(100) == b"done"
        thread.join(30)
        assert thread.error is None  # type: ignore[attr-defined]
        assert b"".join(got) == big
    finally:
        sock.close()
