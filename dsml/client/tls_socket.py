"""TLS for the blocking client: a connected socket, and ``ssl`` over memory BIOs.

:class:`TlsSocket` gives :class:`~dsml.client.server.Client` what it uses of a socket
(``sendall``, ``recv``, ``close``, ``getpeercert``) over TLS.  Not ``ssl.SSLSocket``:
that one reads a TLS record with two ``read`` calls (its 5-byte header, then the rest)
after a first that finds nothing, and returns one record (16 KiB at most) per ``recv``.
Here one ``recv`` of the socket takes whatever has arrived (up to the size asked, at most
:data:`READ_MAX`), and everything in it is decrypted and returned together: a small reply
costs one syscall, as without TLS, and a download reads in pieces of many records.

The context decides what is verified (:class:`~dsml.client.server.ClientTls`: TLS 1.3,
the server's certificate against the cluster CA); a failed handshake or a TLS alert
raises :class:`ssl.SSLError` (an ``OSError``), and the peer's close reads as ``b""``.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from ..net.tlsbio import decrypt_available

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
        while not self._handshake_step():
            self._send_out()
            data = sock.recv(HANDSHAKE_READ)
            if not data:
                raise ssl.SSLEOFError("the server closed the connection during the handshake")
            self._in.write(data)
        self._send_out()  # our certificate and Finished

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
        view = memoryview(data)
        done = self._tls.write(view)
        while done < len(view):  # a memory BIO takes all; loop should it not
            done += self._tls.write(view[done:])
        self._sock.sendall(self._out.read())

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes of plaintext: all that can be decrypted from what has
        arrived, after waiting for at least one byte; ``b""`` once the server closed."""
        while True:
            if self._in.pending or self._tls.pending() or self._eof:
                data = self._decrypt(size)
                if data or self._eof:
                    return data
            raw = self._sock.recv(min(size, READ_MAX))
            if not raw:
                self._eof = True
                return b""
            self._in.write(raw)

    def _decrypt(self, size: int) -> bytes:
        data, ended = decrypt_available(self._tls, self._in, size)
        if ended:
            self._eof = True
        if self._out.pending:
            self._send_out()  # OpenSSL's answer to a post-handshake message
        return data

    def getpeercert(self) -> dict[str, Any]:
        """The server's (verified) certificate, as :meth:`ssl.SSLSocket.getpeercert`."""
        return self._tls.getpeercert() or {}

    def close(self) -> None:
        """Close the socket (no close_notify: the connection is dropped either way)."""
        self._sock.close()


__all__ = ["TlsSocket"]
