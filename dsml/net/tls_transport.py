"""The TLS transport of every dsml connection: the stdlib's ``ssl`` over memory BIOs.

:class:`TlsProtocol` runs TLS between the TCP transport beneath it and the dsml
:class:`~dsml.net.connection.Connection` above it, as Twisted's ``TLSMemoryBIOProtocol``
does, but with :class:`ssl.SSLObject` (OpenSSL called from C) instead of pyOpenSSL (cffi,
and a Python exception for every "no more data").  Measured on a worker answering
100-byte values, Twisted's TLS layer cost about 12 us of the worker's CPU per request in
Python and cffi; this one about a third of that.  It also:

- writes without waiting: Twisted's ``BufferingTLSTransport`` holds every write for a
  reactor turn (a ``callLater(0)``) to merge small ones; dsml already writes a reply's
  head and body as one piece, so the wait only cost a delayed call and an epoll round;
- sends the encrypted bytes at once when the socket is idle (as a plain connection's
  replies go, :func:`~dsml.net.twisted_private.send_now`; here through
  :func:`~dsml.net.twisted_private.sender`, straight to the socket);
- takes the common small message (a request, a reply: one record) in one step each way:
  ``dataReceived`` decrypts it with one read and hands it up, ``write`` encrypts and
  sends it, with the methods bound once and OpenSSL's own called directly
  (:func:`~dsml.net.tlsbio.ssl_core`); anything else (several records, a partial one,
  a close, a large message) takes the general path (issue #10: a worker's CPU per small
  request was about 20 us more with TLS than without, OpenSSL's own part of it, one
  record decrypted and one encrypted, about 6 us under perf);
- hands the connection the plaintext of a whole socket read in one piece (a TLS record
  holds 16 KiB at most: a 256 KiB read is one parse step instead of sixteen), and passes
  the connection's read size (:func:`~dsml.net.twisted_private.set_read_size`) down to
  the TCP transport, up to :data:`READ_MAX`;
- leaves producers to the TCP transport itself (what is written is encrypted at once, so
  the TCP transport's buffer is the only one, and its backpressure is exact).

Security is the context's (:class:`~dsml.net.tls.TlsIdentity`): TLS 1.3 only, a peer
certificate required and verified against the cluster CA on both sides.  A handshake
that fails ends the connection with that failure (after OpenSSL's alert is sent); bytes
written before the handshake finishes are sent after it; ``loseConnection`` sends
close_notify after what was written, then closes; the peer's close_notify ends the
connection after the data before it.

:class:`TlsFactory` wraps a listener's factory; :func:`tls_client_endpoint` dials.
"""

from __future__ import annotations

import ssl
import threading
from typing import Any

from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from .tlsbio import RECORD_MAX, SMALL, decrypt_available, ssl_core
from .twisted_private import sender, set_read_size

#: Plaintext bytes encrypted at a time by one write (see ``_encrypt``).
WRITE_PIECE = 256 * 1024

#: The most one socket read asks for, whatever the connection asks (1 MiB during a
#: transfer).  Each read's bytes are copied twice more here (into OpenSSL, out as
#: plaintext); at 1 MiB those buffers come from fresh memory each time (page faults):
#: a 1 GiB upload measured 3.4 s of worker CPU with 1 MiB reads, 2.1 s with 256 KiB,
#: 2.5 s with 64 or 128 KiB.
READ_MAX = 256 * 1024


class TlsProtocol(ProtocolWrapper):
    """TLS over the TCP transport beneath, for the protocol above (``wrappedProtocol``).

    It is the wrapped protocol's transport: ``write``, ``writeSequence``,
    ``loseConnection``, ``abortConnection``, the producer methods and
    ``getPeerCertificate`` are TLS-aware; anything else (``getPeer``, ``setTcpNoDelay``,
    ``pauseProducing``, ...) is the TCP transport's.
    """

    factory: TlsFactory

    def __init__(self, factory: TlsFactory, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = factory.context.wrap_bio(
            self._incoming, self._outgoing, server_side=not factory.is_client
        )
        # The small message's path (dataReceived, write) calls these, bound once: the
        # BIOs' methods and OpenSSL's own (tlsbio.ssl_core: no ssl.py frame per call).
        core = ssl_core(self._tls)
        self._core = core
        self._tls_read = core.read
        self._tls_write = core.write
        self._tls_pending = core.pending
        self._in_write = self._incoming.write
        self._out_read = self._outgoing.read
        self._send: Any = None  # twisted_private.sender of the TCP transport
        self._handshake_done = False
        #: The handshake is done and TLS not over: the small message's path is open.
        self._open = False
        self._early: list[bytes] = []  # written before the handshake finished
        self._producer: Any = None
        self._ended = False  # TLS is over: closed, failed or aborted; nothing more goes out
        self._aborted = False
        self._reason: Failure | None = None

    # -- connection life --------------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        # Encrypted bytes go out at once when the socket is idle (as a plain
        # connection's replies do, twisted_private.send_now), in as few steps as can be.
        self._send = sender(transport)
        # ProtocolWrapper: take the transport's interfaces, register with the factory,
        # connect the wrapped protocol (with this as its transport).
        super().makeConnection(transport)
        if not self._ended:
            self._handshake()  # a client's ClientHello goes out here

    def dataReceived(self, data: bytes) -> None:
        if self._open and len(data) <= SMALL:
            # The common case, a small request or reply in one record: one read, no
            # loop, handed up at once.  Anything else (more records, a partial one, the
            # peer's close_notify, OpenSSL having something to send) goes on in _read.
            self._in_write(data)
            try:
                # Plaintext is shorter than its record: len(data) takes a whole one
                # (unless it began in an earlier read: then the rest is pending below).
                plain = self._tls_read(len(data))
            except ssl.SSLWantReadError:
                self._read()  # a partial record (its end comes later), or no record
                return
            except ssl.SSLZeroReturnError:
                self._shutdown()  # the peer's close_notify: answer with ours, close
                return
            except ssl.SSLError:
                self._fail(Failure())
                return
            if not plain:
                if data:
                    self._shutdown()  # close_notify (read returns b"" then)
                return
            # All of it read?  Nothing left in the BIO, nothing for OpenSSL to send, and
            # none of the record left (a short read ends at the record's end: no need
            # to ask OpenSSL).
            if (
                not self._incoming.pending
                and not self._outgoing.pending
                and (len(plain) < len(data) or not self._tls_pending())
            ):
                self.wrappedProtocol.dataReceived(plain)
                return
            self._read(plain)
            return
        if self._ended:
            return
        self._incoming.write(data)
        if not self._handshake_done and not self._handshake():
            return
        self._read()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._ended = True
        self._open = False
        if self.wrappedProtocol is None:
            return  # already reported (ProtocolWrapper lets go of it then)
        reason, self._reason = self._reason or reason, None
        super().connectionLost(reason)

    def _handshake(self) -> bool:
        """Advance the handshake; True once it is done (the early writes then go out)."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, ValueError):
            self._fail(Failure())
            return False
        self._handshake_done = True
        self._open = True
        self._flush()  # a client's Finished (and its certificate)
        early, self._early = self._early, []
        if early:
            self._encrypt(b"".join(early))
        if self.disconnecting and self._producer is None and not self._ended:
            self._shutdown()
        return not self._ended

    def _read(self, first: bytes = b"") -> None:
        """Decrypt what has arrived and hand it up in one piece (after ``first``, already
        decrypted); then act on a TLS close or failure found behind it."""
        end: Failure | None = None
        try:
            data, clean_end = decrypt_available(self._core, self._incoming, None, _scratch())
        except ssl.SSLError:
            data, clean_end, end = b"", False, Failure()
        if first:
            data = first + data if data else first
        if data and not self._aborted:
            self.wrappedProtocol.dataReceived(data)
        if end is not None:
            self._fail(end)
        elif clean_end and not self._ended:
            self._shutdown()  # answer with ours, then close
        elif not self._ended and self._outgoing.pending:
            self._flush()  # anything OpenSSL had to say (a TLS 1.3 key update)

    # -- writing ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._open and not self.disconnecting and len(data) <= WRITE_PIECE:
            # The common case (a reply, a request): encrypted and sent in one step.
            try:
                done = self._tls_write(data)
            except ssl.SSLError:
                self._fail(Failure())
                return
            if done == len(data):  # a memory BIO takes it all
                self._send(self._out_read())
                return
            self._flush()
            data = data[done:]
        # As Twisted's transports: after loseConnection only a producer may still write.
        if self._ended or (self.disconnecting and self._producer is None):
            return
        if not self._handshake_done:
            self._early.append(bytes(data))
            return
        self._encrypt(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def _encrypt(self, data: bytes) -> None:
        tls = self._core
        if len(data) <= WRITE_PIECE:  # a reply, a request: the common case, in one step
            try:
                done = tls.write(data)
            except ssl.SSLError:
                self._fail(Failure())
                return
            if done == len(data):  # a memory BIO takes it all
                self._flush()
                return
            data = data[done:]
        view = memoryview(data)
        total = len(view)
        done = 0
        # In pieces: each piece's records go out (or queue) before the next is
        # encrypted, so a large write never holds its whole ciphertext at once, nor
        # copies it again when the socket takes only part of it.
        while done < total:
            try:
                done += tls.write(view[done : done + WRITE_PIECE])
            except ssl.SSLError:
                self._fail(Failure())
                return
            self._flush()

    def _flush(self) -> None:
        """Send what OpenSSL has produced: at once when the socket is idle."""
        out = self._outgoing
        if out.pending and self._send is not None:
            self._send(out.read())

    # -- closing ----------------------------------------------------------------------

    def loseConnection(self) -> None:
        """Send close_notify after what was written (and after a producer's last
        write), then close the TCP connection."""
        if self.disconnecting or self._ended:
            return
        self.disconnecting = True
        if not self._handshake_done and not self._early:
            # Nothing to say and no session to say it in: as Twisted, abort.
            self.abortConnection()
            return
        if self._handshake_done and self._producer is None:
            self._shutdown()
        # else: after the handshake (_handshake) or the producer (unregisterProducer)

    def abortConnection(self) -> None:
        """Close at once: nothing more is read, written or delivered."""
        self._aborted = True
        self._ended = True
        self._open = False
        self.disconnecting = True
        self.transport.abortConnection()

    def _shutdown(self) -> None:
        """Send close_notify and close; the peer's close_notify is not waited for."""
        self._ended = True
        self._open = False
        try:
            self._tls.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # SSLWantReadError: ours is sent, the peer's has not come (nor need it)
        self._flush()
        self.transport.loseConnection()

    def _fail(self, failure: Failure) -> None:
        """End the connection with ``failure`` (after OpenSSL's alert, if any)."""
        if self._ended:
            return
        if self._reason is None:
            self._reason = failure
        self._ended = True
        self._open = False
        self.disconnecting = True
        self._flush()
        self.transport.loseConnection()

    # -- producers --------------------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """The TCP transport drives the producer: what it writes is encrypted at once."""
        if self._ended:
            producer.stopProducing()
            return
        self._producer = producer
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self._producer is None:
            return
        self._producer = None
        self.transport.unregisterProducer()
        if self.disconnecting and not self._ended and self._handshake_done:
            self._shutdown()

    # -- about the connection ------------------------------------------------------------

    def getPeerCertificate(self) -> x509.Certificate | None:
        """The peer's certificate (verified against the CA during the handshake), or
        None before the handshake ends."""
        if not self._handshake_done:
            return None
        der = self._tls.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None

    def getHandle(self) -> Any:
        """The TCP socket beneath (for socket options such as keepalive)."""
        return self.transport.getHandle()

    @property
    def bufferSize(self) -> int:
        """How much one read asks of the socket: the TCP transport's."""
        return int(getattr(self.transport, "bufferSize", 0))

    @bufferSize.setter
    def bufferSize(self, size: int) -> None:
        set_read_size(self.transport, min(size, READ_MAX))

    def logPrefix(self) -> str:
        return f"{ProtocolWrapper.logPrefix(self)} (TLS)"


_local = threading.local()


def _scratch() -> bytearray:
    """The buffer this thread's connections decrypt a large read into (one at a time:
    its plaintext is copied out before any is handed up), instead of a fresh, zeroed
    one per read."""
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(READ_MAX + 2 * RECORD_MAX)
    return buf


class TlsFactory(WrappingFactory):
    """Wraps ``wrappedFactory``'s protocols in TLS with ``context`` (an
    :class:`ssl.SSLContext` for the server side, or the client side if ``is_client``)."""

    protocol = TlsProtocol
    noisy = False

    def __init__(self, context: ssl.SSLContext, is_client: bool, wrappedFactory: Any) -> None:
        super().__init__(wrappedFactory)
        self.context = context
        self.is_client = is_client


@implementer(IStreamClientEndpoint)
class _TlsClientEndpoint:
    """Dials ``endpoint`` and runs TLS (client side) over it; ``connect`` fires with
    the application's protocol, as ``wrapClientTLS``'s does."""

    def __init__(self, context: ssl.SSLContext, endpoint: IStreamClientEndpoint) -> None:
        self._context = context
        self._endpoint = endpoint

    def connect(self, factory: Any) -> Deferred[Any]:
        d = self._endpoint.connect(TlsFactory(self._context, True, factory))
        d.addCallback(lambda wrapper: wrapper.wrappedProtocol)
        return d


def tls_client_endpoint(
    context: ssl.SSLContext, endpoint: IStreamClientEndpoint
) -> IStreamClientEndpoint:
    """``endpoint`` with TLS on top, client side (``wrapClientTLS``'s role)."""
    return _TlsClientEndpoint(context, endpoint)


__all__ = ["READ_MAX", "TlsFactory", "TlsProtocol", "tls_client_endpoint"]
