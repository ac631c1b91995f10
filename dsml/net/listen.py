"""A service that listens on a TCP address and tells where it listens."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger

log = Logger()

#: The kernel's queue of connections not yet accepted (capped by net.core.somaxconn):
#: Twisted's default of 50 dropped a crowd of workers redialling a restarted master,
#: who then waited for their SYN's retransmission (a second or more).
LISTEN_BACKLOG = 1024


def write_addr_file(path: Path, host: str, port: int) -> None:
    """Write ``host:port`` to ``path`` atomically, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{host}:{port}\n")
    os.replace(tmp, path)


def read_addr_file(path: Path) -> tuple[str, int]:
    """Read back what :func:`write_addr_file` wrote."""
    host, _, port = path.read_text().strip().rpartition(":")
    return host, int(port)


class ListenService(service.Service):
    """Listen on ``host:port`` (port 0: the OS chooses) when the service starts.

    Listening happens in ``privilegedStartService``, synchronously, so a port that is
    taken fails the start (twistd exits with the error) instead of running deaf.  Once
    listening, the real address goes to ``addr_file`` (for tests and tools that asked
    for port 0) and to the log.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        factory: Factory,
        addr_file: Path | None = None,
        what: str = "dsml",
        on_listening: Callable[[IListeningPort], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.factory = factory
        self.addr_file = addr_file
        self.what = what
        self.on_listening = on_listening
        self.listening: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        self.listening = self.reactor.listenTCP(
            self.port, self.factory, backlog=LISTEN_BACKLOG, interface=self.host)
        # The connection pool pauses accepting while it is full of connections too young
        # to push out (dsml.net.preauth): those waiting meanwhile are in the listen queue.
        inner = getattr(self.factory, "wrappedFactory", self.factory)
        if hasattr(inner, "attach_port"):
            inner.attach_port(self.listening)
        addr = self.listening.getHost()
        if self.addr_file is not None:
            write_addr_file(self.addr_file, self.host, addr.port)
        log.info(
            "{what} listening on {host}:{port}", what=self.what, host=self.host, port=addr.port
        )
        if self.on_listening is not None:
            self.on_listening(self.listening)
        super().privilegedStartService()

    def startService(self) -> None:
        if self.listening is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        if self.addr_file is not None:
            try:
                self.addr_file.unlink()
            except FileNotFoundError:
                pass
        if self.listening is not None:
            port, self.listening = self.listening, None
            return maybeDeferred(port.stopListening)
        return None
