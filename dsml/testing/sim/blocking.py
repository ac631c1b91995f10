"""A blocking socket on the simulated network, for the blocking client.

:class:`dsml.client.server.Client` reads and writes a socket itself (no reactor).  Given
``connect=sim_connect(sim, node)``, it dials the simulated network instead: its
``recv`` moves the simulation's clock (0.1 s steps, the network flushed after each, so
everything else in the cluster goes on meanwhile) until bytes come, the peer closes, or
the socket's timeout passes (``TimeoutError``, as a real socket's).  Only call it from
outside the clock's callbacks: it advances the clock itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

#: Simulated seconds per step while a blocking call waits.
STEP = 0.1


class SimSocket:
    """What the blocking client needs of a socket, over a simulated connection."""

    def __init__(self, sim: Any, node: str, host: str, port: int,
                 timeout: float | None) -> None:
        self.sim = sim
        self.timeout = timeout
        self.buf = bytearray()
        self.ended = False
        self.transport: Any = None
        owner = self

        class Reader(Protocol):
            def dataReceived(self, data: bytes) -> None:
                owner.buf += data

            def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
                owner.ended = True

        got: list[Any] = []
        sim.net.endpoint_for(node)(host, port).connect(
            Factory.forProtocol(Reader)).addBoth(got.append)
        self._wait(lambda: bool(got))
        if isinstance(got[0], Failure):
            raise ConnectionRefusedError(got[0].getErrorMessage())
        self.transport = got[0].transport

    def _wait(self, ready: Callable[[], bool]) -> None:
        sim = self.sim
        end = sim.clock.seconds() + (self.timeout if self.timeout is not None else 1e9)
        sim.flush()
        while not ready():
            if sim.clock.seconds() >= end - 1e-9:
                raise TimeoutError("timed out")
            sim.clock.advance(STEP)
            sim.flush()

    def setsockopt(self, *args: Any) -> None:
        """Nothing to set in memory."""

    def sendall(self, data: bytes | memoryview) -> None:
        if self.ended or self.transport is None:
            raise ConnectionResetError("connection reset")
        self.transport.write(bytes(data))

    def recv(self, size: int) -> bytes:
        self._wait(lambda: bool(self.buf) or self.ended)
        data = bytes(self.buf[:size])
        del self.buf[:size]
        return data

    def close(self) -> None:
        if self.transport is not None and not self.ended:
            self.transport.loseConnection()


def sim_connect(sim: Any, node: str) -> Callable[..., SimSocket]:
    """A ``socket.create_connection`` for the blocking client, from ``node``."""

    def connect(addr: tuple[str, int], timeout: float | None = None) -> SimSocket:
        return SimSocket(sim, node, addr[0], addr[1], timeout)

    return connect


__all__ = ["STEP", "SimSocket", "sim_connect"]
