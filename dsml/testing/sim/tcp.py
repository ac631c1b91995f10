"""When each end of a simulated TCP connection gives up on a broken path, as Linux does.

With ``FakeNetwork(tcp="socket")`` a link does not simply break ``user_timeout`` seconds
after its path did (the older, uniform model): each end decides by its own socket
options, which the production code sets through ``transport.getHandle()``
(:func:`dsml.net.links.tune_socket`: keepalive 5 s + 5 x 2 s and TCP_USER_TIMEOUT 15 s on
the links it dials and on the master's worker links), and on whether it has bytes the
peer has not acknowledged:

- with TCP_USER_TIMEOUT, an end that sends (or probes, with keepalive) into a dead path
  gives up after that many seconds;
- without it, an end with unacknowledged bytes gives up after Linux's ``tcp_retries2``
  (15 retransmissions, about 924.6 s); an idle end with keepalive after its probes
  (``idle + interval x count``, 7200 + 75 x 9 s by default); an idle end without
  keepalive never (only the application's own deadlines end it);
- an end that gave up is gone, but its peer may still think the connection open
  (half-open) until the path works again and the peer sends or probes: then a reset.
  A machine that lost power (:meth:`FakeNetwork.crash_node` with ``half_open``) resets
  its old connections in the same way once it runs again.

:class:`TcpEnds` is driven by the network every :data:`TICK` simulated seconds.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from twisted.internet import error

if TYPE_CHECKING:
    from .network import FakeConnection, FakeNetwork, FakeTransport

#: How often (simulated seconds) the ends of broken connections are looked at.
TICK = 0.5
#: Seconds an end with unacknowledged bytes retransmits before it gives up, without
#: TCP_USER_TIMEOUT (Linux: tcp_retries2 = 15, RTO from 200 ms doubling to 120 s).
RETRIES2 = 924.6
#: Linux's keepalive defaults: idle seconds, probe interval, probes.
KEEPALIVE_DEFAULTS = (7200.0, 75.0, 9)


class FakeSocket:
    """What ``transport.getHandle()`` returns in the simulation: it keeps the options
    set on it (all that :func:`~dsml.net.links.tune_socket` does with a socket)."""

    def __init__(self) -> None:
        self.keepalive = False
        self.options: dict[int, int] = {}

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if level == socket.SOL_SOCKET and option == socket.SO_KEEPALIVE:
            self.keepalive = bool(value)
        else:
            self.options[option] = value

    def getsockopt(self, level: int, option: int) -> int:
        if level == socket.SOL_SOCKET and option == socket.SO_KEEPALIVE:
            return int(self.keepalive)
        return self.options.get(option, 0)

    def user_timeout(self) -> float | None:
        ms = self.options.get(getattr(socket, "TCP_USER_TIMEOUT", -1), 0)
        return ms / 1000.0 if ms else None

    def keepalive_after(self) -> float | None:
        """Seconds of silence after which keepalive declares the peer dead (None: off)."""
        if not self.keepalive:
            return None
        idle, interval, count = KEEPALIVE_DEFAULTS
        opts = self.options
        idle = opts.get(getattr(socket, "TCP_KEEPIDLE", -1), idle)
        interval = opts.get(getattr(socket, "TCP_KEEPINTVL", -1), interval)
        count = opts.get(getattr(socket, "TCP_KEEPCNT", -1), count)
        return float(idle + interval * count)

    def gives_up_after(self, sending: bool) -> float | None:
        """Seconds after its path broke (or after its first unacknowledged byte) that an
        end with these options gives up; None: never (while it stays idle)."""
        user = self.user_timeout()
        keep = self.keepalive_after()
        if sending:
            return user if user is not None else RETRIES2
        if keep is None:
            return None
        return max(user, keep) if user is not None else keep


class TcpEnds:
    """The per-end TCP model of a :class:`FakeNetwork` (see the module)."""

    def __init__(self, net: FakeNetwork) -> None:
        self.net = net
        #: Per end: when its path broke, when it first had unacknowledged bytes.
        self.broken: dict[FakeTransport, float] = {}
        self.unacked: dict[FakeTransport, float] = {}
        #: Ends that gave up (their peers may not know yet).
        self.gone: set[FakeTransport] = set()
        net.clock.callLater(TICK, self.tick)

    def sent_into_void(self, t: FakeTransport) -> None:
        """``t`` sent bytes its peer will never acknowledge (a dead or gone peer)."""
        self.unacked.setdefault(t, self.net.clock.seconds())

    def _path_broken(self, conn: FakeConnection, end: FakeTransport) -> bool:
        net = self.net
        peer = conn.server if end is conn.client else conn.client
        if net._silent(conn):
            return True
        if net._blocked(end.node, peer.node) or net._blocked(peer.node, end.node):
            return True
        # A machine that vanished answers nothing until it runs again.
        return peer.dead and peer not in self.gone and peer.node in net.down

    def tick(self) -> None:
        net = self.net
        now = net.clock.seconds()
        net.clock.callLater(TICK, self.tick)
        for conn in list(net.connections):
            if conn.closed:
                continue
            for end in (conn.client, conn.server):
                if end.dead or conn.closed:
                    continue
                peer = conn.server if end is conn.client else conn.client
                if self._path_broken(conn, end):
                    since = self.broken.setdefault(end, now)
                    if end.out:
                        self.unacked.setdefault(end, now)
                    sending = end in self.unacked
                    after = _socket(end).gives_up_after(sending)
                    start = self.unacked[end] if sending else since
                    if after is not None and now - start >= after - 1e-9:
                        self._give_up(conn, end)
                    continue
                self.broken.pop(end, None)
                if not peer.dead:
                    self.unacked.pop(end, None)
                    continue
                # The path works, the peer's end is gone (it gave up, or its machine
                # restarted): whatever this end sends or probes is answered by a reset.
                if end.out or end in self.unacked or _socket(end).keepalive:
                    self._reset(conn, end)
        live = {t for c in net.connections for t in (c.client, c.server)}
        for marks in (self.broken, self.unacked):
            for t in [t for t in marks if t not in live]:
                del marks[t]
        self.gone &= live

    def _give_up(self, conn: FakeConnection, end: FakeTransport) -> None:
        peer = conn.server if end is conn.client else conn.client
        self.broken.pop(end, None)
        self.unacked.pop(end, None)
        if peer.dead:
            self.net._close(conn, end, error.TimeoutError(), error.TimeoutError())
            return
        # Half-open: this end hears ETIMEDOUT; the peer still thinks all is well.
        self.gone.add(end)
        end.connected = False
        end.disconnected = True
        end.reading = False
        end.out = []
        end.out_bytes = 0
        producer, end.producer = end.producer, None
        end.dead = True
        if producer is not None:
            try:
                producer.stopProducing()
            except Exception:
                self.net._error(f"stopProducing of {producer!r}")
        try:
            end.protocol.connectionLost(_failure(error.TimeoutError()))
        except Exception:
            self.net._error(f"connectionLost on {end!r}")

    def _reset(self, conn: FakeConnection, end: FakeTransport) -> None:
        self.unacked.pop(end, None)
        self.net._close(conn, end, error.ConnectionLost("connection reset by peer"),
                        error.ConnectionLost())


def _socket(t: FakeTransport) -> FakeSocket:
    return t.getHandle()


def _failure(e: Exception) -> Any:
    from twisted.python.failure import Failure

    return Failure(e)


__all__ = ["KEEPALIVE_DEFAULTS", "RETRIES2", "TICK", "FakeSocket", "TcpEnds"]
