"""Wiring of the master process.

For now the master authenticates connections and answers ``ping``; membership, the data
directory and jobs build on this listener.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service

from ..config import Config
from ..errors import DsmlError
from ..net.listen import ListenService
from ..net.server import Reply, ServerFactory, ServerProtocol
from ..protocol.codec import Head
from ..protocol.methods import MethodTable, storage_methods
from ..worker.service import server_limits

#: The file, under the master's state_dir, that says where it listens.
ADDR_FILE = "master.addr"


class MasterHandler:
    """The master's request handler (ping only, so far)."""

    def __init__(self) -> None:
        base = storage_methods()
        self.methods = MethodTable({"auth": base.specs["auth"], "ping": base.specs["ping"]})

    def handle(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        """Answer a request."""
        if head.kind == "ping":
            return Reply({"Role": "master"})
        raise DsmlError(f"method {head.kind!r} is not served here", "unknown-method")

    def open(self, head: Head, conn: ServerProtocol) -> Any:
        """The master takes no streamed requests."""
        raise DsmlError(f"method {head.kind!r} is not served here", "unknown-method")


def make_master_service(config: Config, reactor: Any) -> service.MultiService:
    """Build the master's services."""
    mc = config.master
    mc.state_dir.mkdir(parents=True, exist_ok=True)
    factory = ServerFactory(MasterHandler(), reactor, config.cluster.token, server_limits(config))
    top = service.MultiService()
    top.setName("dsml-master")
    ListenService(
        reactor, mc.host, mc.port, factory, mc.state_dir / ADDR_FILE, "dsml master"
    ).setServiceParent(top)
    return top
