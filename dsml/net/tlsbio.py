"""Decrypting what has arrived in a TLS memory BIO, shared by both TLS transports.

No Twisted here: the blocking client (:mod:`dsml.client.tls_socket`) and the Twisted
transport (:mod:`dsml.net.tls_transport`) both call :func:`decrypt_available`.

OpenSSL returns one TLS record (16 KiB at most) per read.  ``SSLObject.read(n)`` makes a
new ``n``-byte object per record and shrinks it: measured at three times the cost of
AES-GCM itself on a 1 GiB download.  Here the records are read into one buffer sized by
what has arrived (plaintext is never longer than its ciphertext; plus one record, which
OpenSSL may have begun reading from the BIO earlier), and copied out once.
"""

from __future__ import annotations

import ssl
from typing import Any

#: Plaintext bytes one TLS record holds at most.
RECORD_MAX = 16 * 1024

#: Up to this many bytes arrived, records are read as bytes of their own (cheaper than
#: a buffer for a small request or reply).
SMALL = 4096


def ssl_core(tls: ssl.SSLObject) -> Any:
    """The C object under ``tls`` (``ssl.SSLObject._sslobj``, an ``_ssl._SSLSocket``),
    whose ``read``, ``write``, ``pending`` and ``do_handshake`` are what ``tls``'s own
    (Python methods in ``ssl.py``) call, with the same arguments, results and errors.

    Called directly they save a Python frame each, several per small message on each
    side of a connection; a private attribute of the stdlib, so ``tls`` itself stands in
    should a Python release take it away (``tests/test_tls.py`` checks it is there).
    """
    core = getattr(tls, "_sslobj", None)
    if core is None or not all(
        hasattr(core, name) for name in ("read", "write", "pending", "do_handshake")
    ):
        return tls
    return core


def decrypt_available(
    tls: ssl.SSLObject | Any,
    incoming: ssl.MemoryBIO,
    limit: int | None = None,
    scratch: bytearray | None = None,
) -> tuple[bytes, bool]:
    """All the plaintext that has arrived in ``incoming`` (at most ``limit`` bytes, the
    rest left for the next call), and whether the peer's close_notify came after it.
    Raises :class:`ssl.SSLError` for bytes that are not TLS from the peer (a bad record,
    an alert), as OpenSSL reports it.  ``tls`` may be an :class:`ssl.SSLObject` or its
    :func:`ssl_core`.

    ``scratch``: a buffer the records are read into when it is large enough (the
    caller's own, reused from call to call: no fresh, zeroed buffer per call); the
    result is always a copy of its own.
    """
    avail = incoming.pending + tls.pending()
    if avail <= 0:
        return b"", False
    if limit is None:
        limit = avail + RECORD_MAX
    read = tls.read
    ended = False
    if avail <= SMALL:
        # A small message (a request, a reply): a read or two of that size.
        parts = []
        got = 0
        while got < limit:
            try:
                chunk = read(min(avail, limit - got))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                ended = True
                break
            if not chunk:
                ended = True
                break
            parts.append(chunk)
            got += len(chunk)
            if not incoming.pending and not tls.pending():
                break
        return (parts[0] if len(parts) == 1 else b"".join(parts)), ended
    # OpenSSL takes a record's bytes out of the BIO as they come: the end of a record
    # begun in an earlier call may be here, so one record more than has arrived.
    size = min(avail + RECORD_MAX, limit)
    if scratch is not None and len(scratch) >= size:
        buf = scratch
    else:
        buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        try:
            n = read(min(RECORD_MAX, size - got), view[got:])
        except ssl.SSLWantReadError:
            break  # the rest is a record not yet whole
        except ssl.SSLZeroReturnError:
            ended = True
            break
        if not n:
            ended = True  # close_notify (read returns 0 then)
            break
        got += n
        if not incoming.pending and not tls.pending():
            break  # all read: no need to hear OpenSSL's "want read" (an exception)
    data = bytes(view[:got]) if got < len(buf) else bytes(buf)
    view.release()
    return data, ended


__all__ = ["RECORD_MAX", "SMALL", "decrypt_available", "ssl_core"]
