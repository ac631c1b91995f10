"""What a worker does when the master orders it (down the worker's link to the master).

:class:`WorkerOrders` answers ``ping``, ``replicate`` and ``drop``; the task orders
(``run``, ``kill``) are :class:`dsml.worker.runner.TaskOrders`.  Only the master may
call them (``ping`` anyone): the link trusts the peer it dialled as the master.
"""

from __future__ import annotations

from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import DsmlError
from ..net.connection import Connection
from ..net.links import Links
from ..net.responders import Reply, Responders, responder
from ..net.server import Response
from ..protocol.codec import Head
from ..protocol.methods import ALL_ROLES, Role, worker_order_methods
from .storage import StorageHandler

log = Logger()

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
            d.addErrback(_closing, body)  # the link never opened: the file is still open
        return d.addCallback(lambda r: Reply({"Replicas": r.headers.get("replicas", "1")}))


def _closing(failure: Failure, body: IO[bytes]) -> Failure:
    body.close()
    return failure


def _push_file(
    link: Connection, headers: dict[str, object], body: IO[bytes], size: int
) -> Deferred[Response]:
    """Stream the open ``body`` (``size`` bytes) to the link's server, then close both."""
    reply = link.request_file("file_upload", headers, body, size)

    def done(result: Any) -> Any:
        body.close()
        link.transport.loseConnection()  # type: ignore[union-attr]
        return result

    return reply.addBoth(done)
