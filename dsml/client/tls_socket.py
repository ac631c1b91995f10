"""TLS for the blocking client: a connected socket, and ``ssl`` over memory BIOs.

:class:`TlsSocket` gives :class:`~dsml.client.server.Client` what it uses of a socket
(``sendall``, ``recv``, ``close``, ``getpeercert``) over TLS.  Not ``ssl.SSLSocket``:
that one reads a TLS record with two ``read`` calls (its 5-byte header, then the rest)
after a first that finds nothing, and returns one record (16 KiB at most) per ``recv``.
Here one ``recv`` of the socket takes whatever has arrived (up to the size asked, at most
:data:`READ_MAX`), and everything in it is decrypted and returned together: a small reply
costs one syscall, as without TLS, and a download reads in pieces of many records.

A small reply (one record in one socket read) is decrypted with one read and returned
without the general loop (``recv``); a request is encrypted and written in one step
(``sendall``, trying a plain ``write(2)`` before the socket's own ``sendall``, which polls
first).  Issue #10: these steps are most of what TLS adds to the client's CPU per small
request, besides OpenSSL itself.

The context decides what is verified (:class:`~dsml.client.server.ClientTls`: TLS 1.3,
the server's certificate against the cluster CA); a failed handshake or a TLS alert
raises :class:`ssl.SSLError` (an ``OSError``), and the peer's close reads as ``b""``.
"""

from __future__ import annotations

import socket
import ssl
from os import write as os_write
from typing import Any

from ..net.tlsbio import RECORD_MAX, SMALL, decrypt_available, ssl_core

#: Bytes asked of the socket per read during the handshake.
HANDSHAKE_READ = 64 * 1024

#: The most one socket read asks for (a download asks for 1 MiB): what is read is copied
#: twice more (into OpenSSL, out as plaintext), and at 1 MiB each copy lands in fresh
#: memory; a 1 GiB download measured 2.7-3.7 s of client CPU with 1 MiB reads, about 2 s
#: with 256 KiB.
READ_MAX = 256 * 1024


class TlsSocket:
    """A TLS 1.3 client connection over ``sock`` (connected, blocking or with a
    timeout); the handshake runs in the constructor."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self._sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=False)
        self._eof = False
        # A small request and its reply go through these, bound once: the socket's and
        # BIOs' methods, and OpenSSL's own (tlsbio.ssl_core: no ssl.py frame per call).
        core = ssl_core(self._tls)
        self._core = core
        self._tls_read = core.read
        self._tls_write = core.write
        self._tls_pending = core.pending
        self._in_write = self._in.write
        self._out_read = self._out.read
        self._sock_recv = sock.recv
        self._sock_recv_into = sock.recv_into
        # A transfer's reads and decryption go through these, allocated at its first
        # read and reused: no fresh (and, for the plaintext, zeroed) buffer per read.
        self._raw: memoryview | None = None
        self._scratch: bytearray | None = None
        self._sock_sendall = sock.sendall
        self._fileno = sock.fileno
        while not self._handshake_step():
            self._send_out()
            data = sock.recv(HANDSHAKE_READ)
            if not data:
                raise ssl.SSLEOFError("the server closed the connection during the handshake")
            self._in.write(data)
        self._send_out()  # our certificate and Finished
        #: Nothing is buffered (in the BIO or OpenSSL) and the server has not closed:
        #: recv() starts with the socket.
        self._idle = not (self._in.pending or self._tls_pending())

    def _handshake_step(self) -> bool:
        """Advance the handshake with what has arrived; True once it is done."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def _send_out(self) -> None:
        if self._out.pending:
            self._sock.sendall(self._out.read())

    def sendall(self, data: bytes | memoryview) -> None:
        """Encrypt ``data`` and send it all."""
        done = self._tls_write(data)
        if done != len(data):  # a memory BIO takes all; loop should it not
            view = memoryview(data).cast("B")
            while done < len(view):
                done += self._tls_write(view[done:])
        out = self._out_read()
        # First a plain write(2): a socket with a timeout polls before every send,
        # a syscall (about a microsecond, measured on a socketpair) that an idle
        # socket's send never needs.  What it does not take (EAGAIN: the socket's
        # buffer is full) goes through sendall, which waits as usual.  fileno() is -1
        # once the socket is closed (EBADF).
        try:
            sent = os_write(self._fileno(), out)
        except BlockingIOError:
            sent = 0
        if sent != len(out):
            self._sock_sendall(memoryview(out)[sent:])

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes of plaintext: all that can be decrypted from what has
        arrived, after waiting for at least one byte; ``b""`` once the server closed."""
        first = b""
        if self._idle and 0 < size < READ_MAX:
            # Nothing buffered (the common case): one socket read, and a small reply
            # (one record) decrypted in one read.
            raw = self._sock_recv(size if size < READ_MAX else READ_MAX)
            if not raw:
                self._eof = True
                self._idle = False
                return b""
            self._in_write(raw)
            if len(raw) <= SMALL:
                # Plaintext is shorter than its record (unless the record began in an
                # earlier read: then its rest is pending, read below).
                n = len(raw) if len(raw) < size else size
                try:
                    first = self._tls_read(n)
                except ssl.SSLWantReadError:
                    pass  # a partial record: wait for its end, below
                except ssl.SSLZeroReturnError:
                    first = b""
                    self._eof = True
                else:
                    if not first:
                        self._eof = True  # close_notify (read returns b"" then)
                    elif (
                        not self._in.pending
                        and not self._out.pending
                        and (len(first) < n or not self._tls_pending())
                    ):
                        # All read (a short read ends at the record's end), and OpenSSL
                        # has nothing to send: still idle.
                        return first
        try:
            return self._recv_more(size, first)
        finally:
            self._idle = not (self._eof or self._in.pending or self._tls_pending())

    def _recv_more(self, size: int, first: bytes) -> bytes:
        """recv() when bytes are buffered, after ``first`` (decrypted already), a large
        reply, a partial record, or the end."""
        if first:
            if len(first) < size and (self._in.pending or self._tls_pending()):
                return first + self._decrypt(size - len(first))
            if self._out.pending:
                self._send_out()  # OpenSSL's answer to a post-handshake message
            return first
        while True:
            if self._in.pending or self._tls_pending() or self._eof:
                data = self._decrypt(size)
                if data or self._eof:
                    return data
            if size < READ_MAX:
                raw = self._sock_recv(size)
                if not raw:
                    self._eof = True
                    return b""
                self._in_write(raw)
                continue
            # A transfer: read into this socket's own buffer, reused.
            buf = self._raw
            if buf is None:
                buf = self._raw = memoryview(bytearray(READ_MAX))
            n = self._sock_recv_into(buf, READ_MAX)
            if not n:
                self._eof = True
                return b""
            self._in_write(buf[:n])

    def _decrypt(self, size: int) -> bytes:
        scratch = None
        if size >= READ_MAX:
            scratch = self._scratch
            if scratch is None:
                scratch = self._scratch = bytearray(READ_MAX + RECORD_MAX)
        data, ended = decrypt_available(self._core, self._in, size, scratch)
        if ended:
            self._eof = True
        if self._out.pending:
            self._send_out()  # OpenSSL's answer to a post-handshake message
        return data

    def getpeercert(self) -> dict[str, Any]:
        """The server's (verified) certificate, as :meth:`ssl.SSLSocket.getpeercert`."""
        return self._tls.getpeercert() or {}

    def shutdown(self, how: int) -> None:
        """Shut the socket under the TLS (another thread's blocked read ends at once)."""
        self._sock.shutdown(how)

    def close(self) -> None:
        """Close the socket (no close_notify: the connection is dropped either way)."""
        self._sock.close()


__all__ = ["TlsSocket"]
