"""Hand-made connections for attack tests: raw TCP or raw TLS sockets speaking the wire
protocol (docs/protocol.md) one frame at a time, and TLS contexts and certificates an
attacker could hold (another CA's, an expired one, one naming no dsml identity).

Nothing here goes through :class:`dsml.client.Client`: a test states every byte it sends,
reads every answer with the codec's response parser, and can tell an error response from
a handshake failure from a plain close.  Blocking and bounded by socket timeouts.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..protocol import codec
from ..protocol.codec import END, NEED_DATA, Head, Parser

__all__ = [
    "Closed",
    "RawConn",
    "accept_from",
    "client_context",
    "forge_certificate",
    "peer_is_process",
    "server_context",
]


class Closed(Exception):
    """The peer closed the connection (or cut it) before a whole response arrived."""


def client_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A TLS 1.3 client context trusting ``ca`` (no verification when None), presenting
    ``cert``/``key`` when given; no host name check (dsml checks identities, not names)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    if ca is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting ``cert``, requiring a client certificate
    signed by ``ca``: what an impostor on the master's address would run."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def forge_certificate(
    out_dir: Path,
    ca_cert: Path,
    ca_key: Path,
    *,
    cn: str,
    ou: str | None,
    days_valid: tuple[int, int] = (-1, 365),
    name: str = "forged",
) -> tuple[Path, Path]:
    """A leaf certificate signed by the CA at ``ca_cert``/``ca_key`` with subject
    ``OU=ou, CN=cn`` (no OU when None), valid from ``days_valid[0]`` to
    ``days_valid[1]`` days from now (both negative: already expired).  Returns the
    certificate and key paths (the key 0600)."""
    authority = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou)] if ou else []
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(authority.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days_valid[0]))
        .not_valid_after(now + datetime.timedelta(days=days_valid[1]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.chmod(0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _proc_addr(addr: tuple[str, int]) -> str:
    """``127.0.0.1:5000`` as /proc/net/tcp writes it (``0100007F:1388``)."""
    return f"{socket.inet_aton(addr[0])[::-1].hex().upper()}:{addr[1]:04X}"


def peer_is_process(sock: socket.socket, pid: int) -> bool:
    """Whether the peer of the accepted IPv4 TCP connection ``sock`` is a socket that
    process ``pid`` holds open (Linux: /proc/net/tcp and /proc/PID/fd).

    On a machine shared with other test runs, a listener on an OS-chosen port may be
    reached by someone else's process retrying an old address that had the same port;
    a test that counts connections counts only the ones of the process it started.
    """
    local, remote = _proc_addr(sock.getpeername()[:2]), _proc_addr(sock.getsockname()[:2])
    inodes = {
        fields[9]
        for line in open("/proc/net/tcp").read().splitlines()[1:]
        if (fields := line.split())[1] == local and fields[2] == remote and fields[9] != "0"
    }
    if not inodes:
        return False
    targets = {f"socket:[{inode}]" for inode in inodes}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                return True
        except OSError:
            continue
    return False


def accept_from(listener: socket.socket, pid: int) -> socket.socket:
    """The next connection ``listener`` accepts from process ``pid`` (others are closed
    unread); ``listener``'s timeout bounds each wait."""
    while True:
        conn, _ = listener.accept()
        if peer_is_process(conn, pid):
            return conn
        conn.close()


class RawConn:
    """One blocking connection, raw TCP or raw TLS, speaking the protocol by hand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._parser = Parser(codec.RESPONSE, whole=True)
        self._next_id = 1

    @classmethod
    def open(
        cls, addr: tuple[str, int], ctx: ssl.SSLContext | None = None, timeout: float = 30.0
    ) -> RawConn:
        """Connect to ``addr`` (and do the TLS handshake with ``ctx``); the handshake's
        ``ssl.SSLError`` / ``OSError`` propagate."""
        sock = socket.create_connection(addr, timeout=timeout)
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(sock)
            except BaseException:
                sock.close()
                raise
        return cls(sock)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def peer_fields(self) -> dict[str, str]:
        """The subject of the TLS peer's certificate (``commonName``, ...)."""
        assert isinstance(self.sock, ssl.SSLSocket)
        cert = self.sock.getpeercert() or {}
        return {k: v for rdn in cert.get("subject", ()) for k, v in rdn}

    def send(self, data: bytes) -> None:
        """Send bytes as they are."""
        self.sock.sendall(data)

    def request(
        self, method: str, headers: Mapping[str, object] | None = None, payload: bytes = b""
    ) -> int:
        """Send one request (the codec's encoding); its id."""
        req_id = self._next_id
        self._next_id += 1
        self.send(codec.encode_request(method, req_id, headers or {}, payload))
        return req_id

    def _recv(self) -> bytes:
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError) as e:
            raise Closed(f"cut: {e}") from None
        if not data:
            raise Closed("closed")
        return data

    def read(self) -> tuple[Head, bytes]:
        """The next response: its head and its whole payload; Closed when the peer
        closes first."""
        parser = self._parser
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                parser.feed(self._recv())
                continue
            break
        if type(event) is not Head:
            raise AssertionError(f"expected a response head, got {event!r}")
        if event.body is not None:
            return event, event.body
        chunks = []
        while True:
            more = parser.next_event()
            if more is NEED_DATA:
                parser.feed(self._recv())
            elif more is END:
                return event, b"".join(chunks)
            else:
                chunks.append(more.data)  # type: ignore[union-attr]

    def call(
        self, method: str, headers: Mapping[str, object] | None = None, payload: bytes = b""
    ) -> tuple[Head, bytes]:
        """Send a request and read its response (OK or ERROR, not raised)."""
        req_id = self.request(method, headers, payload)
        head, body = self.read()
        if head.id not in (req_id, 0):
            raise AssertionError(f"response {head.id} does not answer request {req_id}")
        return head, body

    def wait_closed(self) -> bytes:
        """Read until the peer closes (or cuts) the connection, within the socket's
        timeout; the bytes that came first.  ``socket.timeout`` if it stays open."""
        seen = []
        while True:
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
                return b"".join(seen)
            if not data:
                return b"".join(seen)
            seen.append(data)
