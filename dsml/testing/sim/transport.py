"""One end of a simulated TCP connection (:class:`FakeTransport`): what a protocol on
the in-memory network (:mod:`.network`) writes to, reads through and closes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from zope.interface import implementer

from .tcp import FakeSocket

if TYPE_CHECKING:
    from .network import FakeConnection, FakeNetwork

#: Bytes a transport may hold for its peer before it pauses a streaming producer
#: registered on it (Twisted's FileDescriptor.bufferSize).
HIGH_WATER = 64 * 1024


@implementer(ITransport, IConsumer, IPushProducer)
class FakeTransport:
    """One end of a :class:`FakeConnection`; behaves like Twisted's TCP transport.

    ``write`` queues bytes for the peer (delivered by :meth:`FakeNetwork.flush`);
    ``pauseProducing`` stops *reading* (bytes for this end wait); ``loseConnection``
    closes once the queued bytes are delivered and no pull producer is registered;
    ``abortConnection`` closes at the next flush, dropping what is queued.  As in
    Twisted, a registered producer is stopped when the connection is lost, and
    ``protocol.connected`` is left alone (only the transport's flags change).
    """

    def __init__(
        self,
        net: FakeNetwork,
        conn: FakeConnection,
        protocol: Any,
        node: str,
        host: IPv4Address,
        peer: IPv4Address,
    ) -> None:
        self.net = net
        self.conn = conn
        self.protocol = protocol
        self.node = node
        self.host = host
        self.peer = peer
        self.out: list[bytes] = []  # written, not yet delivered to the peer
        self.out_bytes = 0
        self.reading = True
        self.producer: Any = None
        self.streaming = False
        self.producer_paused = False
        self.connected = True
        self.disconnecting = False
        self.disconnected = False
        self.aborting = False
        #: The process at this end is gone (see FakeNetwork.crash_node): nothing it does
        #: reaches the wire and nothing reaches it.
        self.dead = False
        self.sent = 0  # bytes written over the connection's life
        self.socket = FakeSocket()  # the options set on it (tune_socket)
        #: Bytes it may still send at ``credit_at`` (see FakeNetwork.rate).
        self.credit = 0.0
        self.credit_at: float | None = None

    def __repr__(self) -> str:
        return f"<FakeTransport {self.node} -> {self.peer.host}:{self.peer.port}>"

    # ITransport

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the peer.  As in Twisted, bytes written after
        ``loseConnection`` still go out first; after an abort or the close they vanish."""
        if self.disconnected or self.aborting or self.dead or not data:
            return
        chunk = bytes(data)
        self.out.append(chunk)
        self.out_bytes += len(chunk)
        self.sent += len(chunk)
        if self.net.tap is not None:
            self.net.tap(self, chunk)
        if (
            self.producer is not None
            and self.streaming
            and not self.producer_paused
            and self.out_bytes > HIGH_WATER
        ):
            # As FileDescriptor.write: a full buffer pauses a streaming producer.
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """Queue several chunks."""
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Close after what is queued has been delivered; stop reading now."""
        if not self.disconnected and not self.dead:
            self.disconnecting = True
            self.reading = False

    def abortConnection(self) -> None:
        """Close at the next flush, dropping whatever is queued."""
        if not self.disconnected and not self.dead:
            self.disconnecting = True
            self.aborting = True
            self.reading = False

    def getPeer(self) -> IPv4Address:
        """The other end's address."""
        return self.peer

    def getHost(self) -> IPv4Address:
        """This end's address."""
        return self.host

    # IPushProducer: reading from the connection

    def pauseProducing(self) -> None:
        """Stop delivering incoming bytes to the protocol."""
        self.reading = False

    def resumeProducing(self) -> None:
        """Deliver incoming bytes again (not once the connection is closing)."""
        if not self.disconnecting and not self.disconnected and not self.dead:
            self.reading = True

    def stopProducing(self) -> None:
        """As a TCP transport: close the connection."""
        self.loseConnection()

    # IConsumer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Take a producer; a pull producer is asked for data whenever nothing is queued."""
        if self.producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer}, because producer {self.producer} "
                f"was never unregistered."
            )
        if self.disconnected or self.dead:
            producer.stopProducing()
            return
        self.producer = producer
        self.streaming = streaming
        self.producer_paused = False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        """Drop the producer."""
        self.producer = None
        self.producer_paused = False

    # ITCPTransport odds and ends the protocols touch

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Nothing to do in memory."""

    def setTcpKeepAlive(self, enabled: bool) -> None:
        """SO_KEEPALIVE (it matters with ``FakeNetwork(tcp="socket")``)."""
        self.socket.keepalive = enabled

    def getHandle(self) -> FakeSocket:
        """The "socket": it keeps the options set on it (see :mod:`.tcp`)."""
        return self.socket

    def getTcpNoDelay(self) -> bool:
        """Always on."""
        return True

    def getTcpKeepAlive(self) -> bool:
        return self.socket.keepalive

    def logPrefix(self) -> str:
        """For log lines."""
        return f"sim:{self.node}"

    def _take(self, limit: int | None) -> bytes:
        data = b"".join(self.out)
        if limit is not None and len(data) > limit:
            data, rest = data[:limit], data[limit:]
            self.out = [rest]
            self.out_bytes = len(rest)
        else:
            self.out = []
            self.out_bytes = 0
        return data


__all__ = ["HIGH_WATER", "FakeTransport"]
