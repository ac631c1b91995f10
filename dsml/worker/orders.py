"""What a worker does when the master orders it (down the worker's link to the master).

:class:`WorkerOrders` answers ``ping``, ``replicate`` and ``drop``; the task orders
(``run``, ``kill``) are :class:`dsml.worker.runner.TaskOrders`.  Only the master may
call them (``ping`` anyone): the link trusts the peer it dialled as the master.
"""

from __future__ import annotations

from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from zope.interface import implementer

from ..errors import DsmlError
from ..net.connection import Connection
from ..net.links import Links
from ..net.responders import Reply, Responders, responder
from ..net.server import Response
from ..protocol.codec import Head
from ..protocol.methods import ALL_ROLES, Role, worker_order_methods
from .storage import StorageHandler

log = Logger()

#: Bytes read from disk per step when pushing a replica to another worker.
PUSH_CHUNK = 1024 * 1024

_MASTER = frozenset({Role.MASTER})


def order_responders(orders: WorkerOrders, tasks: object) -> Responders:
    """The table of the worker's link: the store's orders from ``orders``, ``run`` and
    ``kill`` from ``tasks`` (:class:`~dsml.worker.runner.TaskOrders`)."""
    return Responders(worker_order_methods(), orders, tasks)


class WorkerOrders:
    """Answers ``replicate`` and ``drop`` from the master, and ``ping``."""

    def __init__(self, storage: StorageHandler, links: Links) -> None:
        self.storage = storage
        self.store = storage.store
        self.links = links

    @responder("ping", roles=ALL_ROLES)
    def _ping(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        return Reply()

    @responder("drop", roles=_MASTER)
    def _drop(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        """Delete ``Key`` only if it still holds ``Version`` (a newer write stays)."""
        key, version = head.headers["key"], int(head.headers["version"])
        entry = self.store.stat(key)
        if entry.version != version:
            raise DsmlError(
                f"{key!r} has version {entry.version}, not {version}: kept", "stale-version"
            )
        deleted = self.store.delete(key)
        self.storage.changed("delete", deleted)
        return Reply({"Version": deleted.version})

    @responder("replicate", roles=_MASTER)
    def _replicate(self, head: Head, payload: bytes, conn: Connection) -> Deferred[Reply]:
        """Push this worker's copy of ``Key`` (if still ``Version``) to the server at ``To``."""
        h = head.headers
        key, version, to = h["key"], int(h["version"]), h["to"]
        entry, body = self.store.open_read(key)
        if entry.version != version:
            body.close()
            raise DsmlError(
                f"{key!r} has version {entry.version}, not {version}", "stale-version"
            )
        headers: dict[str, object] = {"Key": key, "Version": version, "Sha256": entry.sha256}
        if entry.kind == "value":
            data = body.read()
            body.close()
            d = self.links.shared(to)
            d.addCallback(lambda link: link.request("value_upload", headers, data))
        else:
            d = self.links.open(to)
            d.addCallback(_push_file, headers, body, entry.size)
        return d.addCallback(lambda r: Reply({"Replicas": r.headers.get("replicas", "1")}))


def _push_file(
    link: Connection, headers: dict[str, object], body: IO[bytes], size: int
) -> Deferred[Response]:
    reply = link.request("file_upload", headers, size)
    producer = _FilePusher(link, body, size)
    # An empty file has no bytes to push: no producer (its first read of 0 bytes would
    # look like a file that shrank).
    if size:
        link.transport.registerProducer(producer, False)  # type: ignore[union-attr]

    def done(result: Any) -> Any:
        producer.stopProducing()
        link.transport.loseConnection()  # type: ignore[union-attr]
        return result

    return reply.addBoth(done)


@implementer(IPullProducer)
class _FilePusher:
    """Writes ``size`` bytes of a file to a link as its transport asks for them."""

    def __init__(self, link: Connection, body: IO[bytes], size: int) -> None:
        self.link = link
        self.body: IO[bytes] | None = body
        self.remaining = size

    def resumeProducing(self) -> None:
        if self.body is None:
            return
        chunk = self.body.read(min(PUSH_CHUNK, self.remaining))
        if not chunk:
            # The file shrank under us: the promised length cannot be met.
            self.stopProducing()
            self.link.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.remaining -= len(chunk)
        self.link.transport.write(chunk)  # type: ignore[union-attr]
        if self.remaining == 0:
            self.stopProducing()

    def stopProducing(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None
            transport = self.link.transport
            if getattr(transport, "producer", None) is self:
                transport.unregisterProducer()  # type: ignore[union-attr]
