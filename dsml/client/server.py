"""A blocking connection to one dsml storage server (the seed's Client and RPC).

One socket, one request at a time, the same sans-IO codec as the servers.  Kept lean on
purpose: a value round trip is one ``sendall`` and usually one ``recv``.  Any method is
reachable with :meth:`Client.call` (the seed's RPC ``call``); the typed methods are built
on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import ssl
import stat as stat_
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ..errors import ChecksumMismatch, ConnectionLost, DsmlError
from ..fsutil import current_umask
from ..protocol import codec, replies
from ..protocol.codec import END, NEED_DATA, Head, Parser, quick_response
from ..protocol.replies import Entry, Stored
from .liveness import monotonic, stale
from .tls_socket import TlsSocket

#: Bytes per read and per send of a file transfer.
CHUNK = 1024 * 1024

#: Bytes asked of the socket per read outside a file transfer.  Asking for CHUNK on
#: every small reply costs a large allocation per round trip.
SMALL_READ = 64 * 1024

Progress = Callable[[int], None]



def remaining_size(f: Any) -> int | None:
    """The bytes from ``f``'s position to its end: by ``fstat`` for a regular file, by
    seeking for another seekable object (``io.BytesIO``, a fsspec file); None when it
    cannot be known without reading (a pipe, a socket, a generator's wrapper)."""
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        st = None
    if st is not None and stat_.S_ISREG(st.st_mode):
        return max(0, st.st_size - f.tell())
    seekable = getattr(f, "seekable", None)
    if st is None and seekable is not None and seekable():
        here = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(here)
        return max(0, end - here)
    return None


@contextmanager
def sized_source(source: Any) -> Iterator[tuple[IO[bytes], int]]:
    """(a binary file, the bytes to send from its position) for any upload source.

    A path is opened; ``bytes`` are wrapped in a ``BytesIO`` (no copy for ``bytes``); a
    file object is used as it is, from its position, when its size can be known
    (:func:`remaining_size`).  A stream whose size cannot be known is first copied to
    an anonymous temporary file, a chunk at a time (the protocol sends ``Length`` before
    the bytes), so nothing large is ever held in memory."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            yield f, os.fstat(f.fileno()).st_size
        return
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = source if isinstance(source, bytes) else bytes(source)
        yield io.BytesIO(data), len(data)
        return
    size = remaining_size(source)
    if size is not None:
        yield source, size
        return
    with tempfile.TemporaryFile(prefix="dsml-upload-") as spool:
        shutil.copyfileobj(source, spool, CHUNK)
        size = spool.tell()
        spool.seek(0)
        yield spool, size  # type: ignore[misc]


class ClientTls:
    """A user's TLS identity for the blocking client: TLS 1.3, its certificate and key,
    the server verified against the cluster CA and required to be the master or a
    worker (by its certificate, not by host name), and not revoked."""

    def __init__(self, pki_dir: Path, name: str, kind: str = "user") -> None:
        from .. import pki

        paths = pki.identity_paths(pki_dir, kind, name)
        pki.load_key(paths.key)  # refuses a key group or others may read, naming it
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        # Servers are checked by the identity in their certificate (see _check_peer).
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=str(pki.ca_paths(pki_dir).cert))
            ctx.load_cert_chain(str(paths.cert), str(paths.key))
        except (OSError, ssl.SSLError) as e:
            raise pki.PkiError(f"cannot load {paths.cert} or the CA under {pki_dir}: {e}") \
                from None
        self.context = ctx
        self.revoked = pki.revoked_serials(pki_dir)

    def check_peer(
        self, sock: TlsSocket, where: str, kinds: tuple[str, ...] = ("master", "worker")
    ) -> None:
        """Refuse a server whose certificate is not of one of ``kinds``, or revoked."""
        cert = sock.getpeercert() or {}
        fields = {k: v for rdn in cert.get("subject", ()) for k, v in rdn}
        kind = fields.get("organizationalUnitName")
        if kind not in kinds:
            raise DsmlError(f"{where} is not a dsml server (certificate of {kind!r})",
                            "auth-failed")
        if int(cert.get("serialNumber", "0"), 16) in self.revoked:
            raise DsmlError(f"{where}'s certificate is revoked", "auth-failed")


def client_tls(config: Any, identity: str | None = None) -> ClientTls | None:
    """The user identity to present to the cluster of ``config``: None without
    ``cluster.tls``; else ``identity``, else $DSML_IDENTITY, else ``admin``, from the
    config's pki_dir."""
    if not config.cluster.tls:
        return None
    from ..pki import DEFAULT_USER, IDENTITY_ENV

    name = identity or os.environ.get(IDENTITY_ENV) or DEFAULT_USER
    return ClientTls(config.pki_dir, name)


def _readinto_by_read(f: Any) -> Callable[[memoryview], int]:
    """``readinto`` for a file object that only has ``read``."""

    def readinto(view: memoryview) -> int:
        data = f.read(len(view))
        view[: len(data)] = data
        return len(data)

    return readinto


def _stored(key: str, head: Head) -> Stored:
    return replies.stored(key, head.headers)


def _error(head: Head) -> DsmlError:
    return DsmlError(head.headers.get("message", "error"), head.headers.get("code", "internal"))


class Client:
    """A blocking connection to one dsml storage server.

    Connects and authenticates at once; raises :class:`DsmlError` (``auth-failed``,
    ``not-found``, ...) for error responses and :class:`ConnectionLost` when the server
    cannot be reached, goes away or does not answer within ``timeout`` seconds.

    A request that did not get its whole answer (a timeout, a dropped connection, a
    reply that cannot be read, an exception while a payload moved) leaves the byte
    stream unusable: the connection is closed then, and the next request opens a new
    one (authenticating again), so a late reply is never taken for a later request's.
    Only :meth:`close` makes it stay closed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        token: str | None = None,
        timeout: float | None = 60.0,
        name: str = "dsml-python",
        tls: ClientTls | None = None,
        *,
        kinds: tuple[str, ...] = ("master", "worker"),
        what: str | None = None,
        connect: Callable[..., Any] = socket.create_connection,
    ) -> None:
        #: Opens the socket (``socket.create_connection``; the simulation passes its own).
        self._dial = connect
        self.host = host
        self.port = port
        self.token = token
        self.timeout = timeout
        self.name = name
        self.tls = tls
        #: The kinds of server (by TLS certificate) this connection may reach.
        self.kinds = kinds
        #: How the server is named in errors.
        self.what = what or f"{host}:{port}"
        self._sock: Any = None
        self._parser = Parser(codec.RESPONSE, whole=True)
        self._next_id = 1
        self._read_size = SMALL_READ
        #: A request is out whose answer has not been read whole.
        self._busy = False
        #: close() was called: no reconnecting.
        self._closed = False
        self._last = monotonic()  # when the last request began
        #: The last request went out whole (its payload too): if its answer is lost, a
        #: write's outcome is not known (the server may have stored it).
        self.sent_whole = False
        self._connect()

    # -- plumbing ---------------------------------------------------------------------

    def _connect(self) -> None:
        """Open and authenticate a new connection (a new parser, ids from 1)."""
        host, port, tls = self.host, self.port, self.tls
        try:
            sock = self._dial((host, port), timeout=self.timeout)
        except OSError as e:
            raise ConnectionLost(
                f"cannot connect to {self.what}: {e.strerror or e}"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            try:
                sock = TlsSocket(sock, tls.context)  # type: ignore[assignment]
                tls.check_peer(sock, self.what, self.kinds)  # type: ignore[arg-type]
            except (OSError, DsmlError) as e:
                sock.close()
                if isinstance(e, DsmlError):
                    raise
                raise ConnectionLost(f"TLS with {self.what} failed: {e}") from None
        self._sock = sock
        # whole=True: a small reply is one event (its payload inside the Head).
        self._parser = Parser(codec.RESPONSE, whole=True)
        self._next_id = 1
        self._read_size = SMALL_READ
        self._busy = False
        try:
            self.call("auth", {"Token": self.token or "", "Client": self.name})
        except BaseException:
            self._drop()
            raise

    def _open(self) -> None:
        """Before a request: reconnect if a fault or the server (:mod:`.liveness`) closed it."""
        if self._sock is not None and stale(self._sock, self._last):
            self._drop()
        self._last = monotonic()
        if self._sock is None:
            if self._closed:
                raise ConnectionLost("connection is closed")
            self._connect()

    def _drop(self) -> None:
        """Close the connection after a fault (the next request reconnects)."""
        sock, self._sock = self._sock, None
        self._busy = False
        if sock is not None:
            sock.close()

    def _abandon(self) -> None:
        """An exception interrupts a request: if its answer was not read whole, the
        connection cannot be used again."""
        if self._busy:
            self._drop()

    def close(self) -> None:
        """Close the connection (for good: later requests raise ConnectionLost)."""
        self._closed = True
        self._drop()

    def interrupt(self) -> None:
        """From another thread: end a request blocked on this connection at once (it
        raises), and close the connection for good."""
        self._closed = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected, or already shut

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send_head(self, method: str, headers: dict[str, object], length: int) -> int:
        self._open()
        req_id = self._next_id
        self._next_id += 1
        self._busy = True
        self.sent_whole = False
        self._sendall(codec.encode_request(method, req_id, headers, length))
        self.sent_whole = length == 0
        return req_id

    def _sendall(self, data: bytes | memoryview) -> None:
        if self._sock is None:
            raise ConnectionLost("connection is closed")
        try:
            self._sock.sendall(data)
        except OSError as e:
            # Not closed here: an upload reads the server's reason, if it sent one.
            raise ConnectionLost(f"connection to {self.what} lost: {e}") from None

    def _event(self) -> Any:
        parser = self._parser
        while True:
            event = parser.next_event()
            if event is not NEED_DATA:
                return event
            parser.feed(self._recv())

    def _recv(self) -> bytes:
        if self._sock is None:
            raise ConnectionLost("connection is closed")
        try:
            data = self._sock.recv(self._read_size)
        except TimeoutError as e:
            self._drop()  # the reply may still come: never read it as another's
            within = f"within {self.timeout:g} s" if self.timeout is not None else f"({e})"
            raise ConnectionLost(
                f"no answer from {self.what} {within}: connection closed (the next "
                "request opens a new one)"
            ) from None
        except OSError as e:
            self._drop()
            raise ConnectionLost(f"connection to {self.what} lost: {e}") from None
        if not data:
            self._drop()
            raise ConnectionLost(f"{self.what} closed the connection")
        return data

    def _read_head(self, req_id: int) -> Head:
        head = self._event()
        if type(head) is not Head:
            raise DsmlError(f"unexpected {head!r} from server", "bad-frame")
        if head.id != req_id and head.id != 0:
            raise DsmlError(f"response {head.id} does not answer request {req_id}", "bad-frame")
        return head

    def _read_payload(self, head: Head) -> bytes:
        if head.body is not None:
            return head.body
        chunks = []
        while True:
            event = self._event()
            if event is END:
                return b"".join(chunks)
            chunks.append(event.data)

    def call(
        self, method: str, headers: dict[str, object], payload: bytes = b""
    ) -> tuple[Head, bytes]:
        """Send one request and wait for its answer (the seed's RPC ``call``): the
        response's head and payload, or the error response raised as :class:`DsmlError`.

        For any method the server knows, headers and a small payload as the wire carries
        them (docs/protocol.md); the typed methods below are built on it.
        """
        self._open()
        req_id = self._next_id
        self._next_id += 1
        self._busy = True
        self.sent_whole = False
        try:
            self._sendall(codec.encode_request(method, req_id, headers, payload))
            self.sent_whole = True
            return self._answer(req_id)
        except BaseException:
            self._abandon()
            raise

    def _key_call(self, method: str, key: str, payload: bytes = b"") -> tuple[Head, bytes]:
        """call() for the commonest requests (a Key header only), cheaper."""
        self._open()
        req_id = self._next_id
        self._next_id += 1
        self._busy = True
        self.sent_whole = False
        try:
            self._sendall(codec.encode_key_request(method, req_id, key, payload))
            self.sent_whole = True
            return self._answer(req_id)
        except BaseException:
            self._abandon()
            raise

    def _answer(self, req_id: int) -> tuple[Head, bytes]:
        """Read the response to ``req_id``; raise its error."""
        head = None
        if self._parser.idle:
            # Nothing buffered: a small reply usually comes whole in one read, and is
            # decoded in one step (codec.quick_response); else the parser takes it.
            data = self._recv()
            head = quick_response(data)
            if head is None:
                self._parser.feed(data)
            elif head.id != req_id and head.id != 0:
                raise DsmlError(f"response {head.id} does not answer request {req_id}", "bad-frame")
        if head is None:
            head = self._read_head(req_id)
        body = self._read_payload(head)
        self._busy = False
        if not head.ok:
            if head.id == 0 or head.headers.get("code") in ("auth-failed", "auth-required"):
                self._drop()  # the server closes it
            raise _error(head)
        return head, body

    # -- values -----------------------------------------------------------------------

    def ping(self) -> dict[str, str]:
        """Round-trip a no-op; returns the reply's headers."""
        head, _ = self.call("ping", {})
        return head.headers

    def set(
        self, key: str, value: bytes, grant: str | None = None, forward: str = ""
    ) -> Stored:
        """Store a small value (up to the server's value_max) under ``key``.

        ``grant`` and ``forward`` are for cluster writes (see :class:`ClusterClient`):
        the master's grant of the write's version (place's answer), and the workers the
        server passes the value on to.
        """
        if grant is None and not forward:
            head, _ = self._key_call("value_upload", key, value)
            return _stored(key, head)
        headers: dict[str, object] = {"Key": key}
        if grant is not None:
            headers["Grant"] = grant
        if forward:
            headers["Forward"] = forward
        head, _ = self.call("value_upload", headers, value)
        return _stored(key, head)

    def get(self, key: str) -> bytes:
        """Return the value stored under ``key``."""
        return self._key_call("value_retrieve", key)[1]

    def delete(self, key: str) -> int:
        """Delete ``key``; return the version that was deleted."""
        head, _ = self.call("delete", {"Key": key})
        return int(head.headers["version"])

    def stat(self, key: str) -> Entry:
        """Describe ``key``."""
        head, _ = self.call("stat", {"Key": key})
        h = head.headers
        return Entry(
            key, h["kind"], int(h["size"]), h["sha256"], int(h["version"]), float(h["mtime"])
        )

    def list(self, prefix: str = "", page: int = 1000) -> Iterator[Entry]:
        """Every key starting with ``prefix``, in UTF-8 byte order (fetched a page at a time)."""
        after: str | None = None
        while True:
            head, body = self.call("list", replies.list_headers(prefix, page, after))
            for line in body.decode("utf-8").splitlines():
                d = json.loads(line)
                yield Entry(d["key"], d["kind"], d["size"], d["sha256"], d["version"], d["mtime"])
                after = d["key"]
            if head.headers.get("more") != "1":
                return

    # -- files ------------------------------------------------------------------------

    def upload(
        self,
        source: Any,
        key: str,
        progress: Progress | None = None,
        sha256: str | None = None,
        grant: str | None = None,
        forward: str = "",
    ) -> Stored:
        """Stream a file to ``key``; hash it on the way and check the server's hash.

        ``source``: a path, bytes, or a binary file object read from its position to its
        end (an ``io.BytesIO`` too: see :func:`sized_source`).  With ``sha256`` the
        server itself refuses bytes that do not match it; ``grant`` and ``forward`` as
        for :meth:`set`.
        """
        with sized_source(source) as (f, size):
            return self._upload_sized(f, size, key, progress, sha256, grant, forward)

    def _upload_sized(
        self,
        f: IO[bytes],
        size: int,
        key: str,
        progress: Progress | None,
        sha256: str | None,
        grant: str | None,
        forward: str,
    ) -> Stored:
        headers: dict[str, object] = {"Key": key}
        if sha256 is not None:
            headers["Sha256"] = sha256
        if grant is not None:
            headers["Grant"] = grant
        if forward:
            headers["Forward"] = forward
        try:
            return self._upload(f, key, size, headers, progress)
        except BaseException:
            self._abandon()
            raise

    def _upload(
        self,
        f: IO[bytes],
        key: str,
        size: int,
        headers: dict[str, object],
        progress: Progress | None,
    ) -> Stored:
        req_id = self._send_head("file_upload", headers, size)
        digest = hashlib.sha256()
        remaining = size
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        readinto = getattr(f, "readinto", None) or _readinto_by_read(f)
        try:
            while remaining:
                n = readinto(view[: min(CHUNK, remaining)])
                if not n:
                    self._drop()  # the promised length cannot be sent: the framing is lost
                    raise DsmlError(
                        f"file shrank while uploading ({remaining} bytes missing)", "io"
                    )
                digest.update(view[:n])
                self._sendall(view[:n])
                remaining -= n
                if progress is not None:
                    progress(n)
            self.sent_whole = True
        except ConnectionLost:
            # The server may have refused the upload and closed: prefer its reason.
            # (The connection is closed after either way: the payload was cut short.)
            try:
                head = self._read_head(req_id)
            except DsmlError:
                raise
            if not head.ok:
                raise _error(head) from None
            raise
        head = self._read_head(req_id)
        self._read_payload(head)
        self._busy = False
        if not head.ok:
            raise _error(head)
        stored = _stored(key, head)
        if stored.sha256 != digest.hexdigest():
            raise ChecksumMismatch(
                f"server stored sha256 {stored.sha256} for {key!r}, sent {digest.hexdigest()}"
            )
        return stored

    def download_to(self, key: str, out: IO[bytes], progress: Progress | None = None) -> Entry:
        """Stream ``key`` into an open binary file; raise ChecksumMismatch on a bad hash.

        On a mismatch the bytes are already written: use :meth:`download` for a file
        that only appears when it is whole and correct.
        """
        digest = hashlib.sha256()
        try:
            h = self._retrieve(key, out, progress, digest)
        except BaseException:
            self._abandon()
            raise
        entry = Entry(key, h["kind"], int(h["size"]), h["sha256"], int(h["version"]))
        if digest.hexdigest() != entry.sha256:
            raise ChecksumMismatch(
                f"{key!r} arrived with sha256 {digest.hexdigest()}, expected {entry.sha256}"
            )
        return entry

    def _retrieve(
        self, key: str, out: IO[bytes], progress: Progress | None, digest: Any
    ) -> dict[str, str]:
        """Send ``file_retrieve`` and write its payload to ``out``; its headers."""
        req_id = self._send_head("file_retrieve", {"Key": key}, 0)
        head = self._read_head(req_id)
        if not head.ok:
            self._read_payload(head)
            self._busy = False
            raise _error(head)
        h = head.headers
        if h.get("action") != "write-file":
            raise DsmlError("server did not offer the file", "bad-frame")
        write = out.write
        self._read_size = CHUNK
        try:
            whole = head.body
            while True:
                if whole is not None:  # small: it came whole with the head, no END
                    data = whole
                else:
                    event = self._event()
                    if event is END:
                        break
                    data = event.data
                digest.update(data)
                write(data)
                if progress is not None:
                    progress(len(data))
                if whole is not None:
                    break
        finally:
            self._read_size = SMALL_READ
        self._busy = False
        return h

    def download(
        self,
        key: str,
        path: str | os.PathLike[str],
        progress: Progress | None = None,
        fsync: bool = True,
    ) -> Entry:
        """Download ``key`` to ``path``: a temporary file beside it, renamed when whole
        and verified (the seed's write_to_file); nothing is left on any error."""
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                # The user's file: the mode their umask gives (mkstemp's is 0600), as cp's.
                os.fchmod(out.fileno(), 0o666 & ~current_umask())
                entry = self.download_to(key, out, progress)
                out.flush()
                if fsync:
                    os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return entry


__all__ = ["CHUNK", "SMALL_READ", "Client", "Progress", "remaining_size", "sized_source"]

