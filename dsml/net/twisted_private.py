"""Every use dsml makes of Twisted's private or undocumented attributes, in one place.

Each one buys something measured or works around a Twisted gap; each is used only through
the functions here, and :func:`missing` (run by ``tests/test_twisted_private.py``) says
which of them a Twisted upgrade took away, so that the upgrade fails loudly in the tests
rather than quietly in production.  Every function degrades to the public behaviour on a
transport that lacks the attribute (TLS, test transports).

- ``FileDescriptor.dataBuffer`` / ``_tempDataBuffer`` / ``writeSomeData``: send a small
  reply at once when nothing is queued (:func:`send_now`, and :func:`sender` for TLS).
- ``FileDescriptor.bufferSize``: how much one read asks of the socket (:func:`set_read_size`).
- ``_ReconnectingProtocolProxy._lostNotification`` (``ClientService``): stop a connection
  whose ``prepareConnection`` failed from also reporting its loss
  (:func:`forget_reconnecting_connection`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: The attributes of a TCP transport (``twisted.internet.tcp.Connection``) used here.
TRANSPORT_ATTRIBUTES = (
    "dataBuffer", "_tempDataBuffer", "writeSomeData", "bufferSize", "getHandle"
)


def send_now(transport: Any, data: bytes) -> None:
    """Write ``data``, sending it at once when nothing is queued before it.

    ``transport.write`` only queues: the bytes go out on the reactor's next pass, after
    one more epoll round and two epoll_ctl calls, measured at about 40% of the server's
    CPU per round trip of a small request.  When the transport's buffers are empty this
    sends straight away with its own ``writeSomeData`` (what ``doWrite`` would call) and
    queues only what the socket did not take.  Other transports just ``write``.
    """
    if not _direct(type(transport)):
        # A TLS transport (a ProtocolWrapper) forwards unknown attributes to the TCP
        # transport beneath it: writing there would bypass the encryption.
        transport.write(data)
        return
    try:
        idle = not transport.dataBuffer and not transport._tempDataBuffer
        write_some = transport.writeSomeData
    except AttributeError:
        idle = False
    if idle and transport.connected and not transport.disconnecting:
        sent = write_some(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


#: The most :func:`sender`'s function hands the socket itself (more goes through
#: :func:`send_now`, which sends it in the transport's own pieces).
SENDER_MAX = 64 * 1024


def sender(transport: Any) -> Callable[[bytes], None]:
    """A function that does what ``send_now(transport, data)`` does, in fewer steps.

    For the TLS transport, which sends every record it makes this way: when the TCP
    transport's buffers are empty, the bytes go straight to its socket's ``send``
    (``getHandle()``) rather than through ``send_now``, ``writeSomeData`` and
    ``untilConcludes`` (three Python calls and a memoryview less per record, on a
    path where every Python step counts: issue #10).  What the socket does not take, and
    anything when the socket fails (``EWOULDBLOCK``, a reset), goes to
    ``transport.write``: queued, and sent or reported by the transport as usual.  On a
    transport without these attributes (tests' transports): ``send_now``.
    """
    if not _direct(type(transport)) or not all(
        hasattr(transport, name) for name in ("dataBuffer", "_tempDataBuffer", "getHandle")
    ):
        return lambda data: send_now(transport, data)
    try:
        sock_send = transport.getHandle().send
    except AttributeError:
        return lambda data: send_now(transport, data)
    write = transport.write

    def send(data: bytes) -> None:
        if (
            len(data) <= SENDER_MAX
            and not transport.dataBuffer
            and not transport._tempDataBuffer
            and transport.connected
            and not transport.disconnecting
        ):
            try:
                sent = sock_send(data)
            except OSError:
                sent = 0  # the transport's own write meets it again, and reports it
            if sent != len(data):
                write(data[sent:])
            return
        send_now(transport, data)

    return send


_DIRECT: dict[type, bool] = {}


def _direct(kind: type) -> bool:
    """Whether transports of ``kind`` have their own ``writeSomeData`` (a socket's),
    not one reached through ``__getattr__`` (TLS over a socket)."""
    direct = _DIRECT.get(kind)
    if direct is None:
        direct = _DIRECT[kind] = not hasattr(kind, "__getattr__") or hasattr(
            kind, "writeSomeData"
        )
    return direct


def set_read_size(transport: Any, size: int) -> None:
    """Ask the socket for up to ``size`` bytes per read (a no-op where reads are not ours)."""
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = size


def forget_reconnecting_connection(protocol: Any) -> None:
    """Keep ``ClientService`` from hearing that this connection closed.

    ``protocol`` is what ``ClientService`` handed to ``prepareConnection`` (its proxy of
    our protocol).  When the preparation fails, ``ClientService`` counts the attempt failed
    and waits to retry, but it has no transition for then hearing that the connection
    closed: it raises ``NoTransition`` from ``connectionLost`` (an "Unhandled Error"
    traceback for every refused registration).  Call this before closing such a
    connection, and from the errback of a preparation that failed because it closed.
    """
    if hasattr(protocol, "_lostNotification"):
        protocol._lostNotification = _ignore


def _ignore(reason: object) -> None:
    """A connection-lost notification nobody must hear."""


class _NoReactor:
    """Stands in for a reactor where a transport is only inspected, never run."""


def missing() -> list[str]:
    """The private attributes above that this Twisted no longer has (empty when all is well)."""
    import socket

    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol

    gone: list[str] = []
    a, b = socket.socketpair()
    try:
        conn = tcp.Connection(a, Protocol(), reactor=_NoReactor())  # type: ignore[arg-type]
        gone += [f"tcp.Connection.{n}" for n in TRANSPORT_ATTRIBUTES if not hasattr(conn, n)]
    finally:
        a.close()
        b.close()
    try:
        from twisted.application._client_service import _ReconnectingProtocolProxy
    except ImportError:
        gone.append("twisted.application._client_service._ReconnectingProtocolProxy")
    else:
        proxy = _ReconnectingProtocolProxy(Protocol(), _ignore)
        if not hasattr(proxy, "_lostNotification"):
            gone.append("_ReconnectingProtocolProxy._lostNotification")
    return gone
