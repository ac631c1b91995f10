"""What a worker does when the master asks (over the worker's link to the master)."""

from __future__ import annotations

from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from zope.interface import implementer

from ..errors import DsmlError
from ..net.links import Links
from ..net.server import Reply, Response, ServerProtocol
from ..protocol.codec import Head
from ..protocol.methods import worker_order_methods
from .storage import StorageHandler
from .store import StoreError

log = Logger()

#: Bytes read from disk per step when pushing a replica to another worker.
PUSH_CHUNK = 1024 * 1024


class WorkerOrders:
    """Handles ``replicate`` and ``drop`` from the master, and ``ping``."""

    def __init__(self, storage: StorageHandler, links: Links, jobs: Any = None) -> None:
        self.storage = storage
        self.store = storage.store
        self.links = links
        #: The worker's side of jobs (dsml.worker.runner.WorkerJobs), if it runs tasks.
        self.jobs = jobs
        self.methods = worker_order_methods()

    def handle(self, head: Head, payload: bytes, conn: ServerProtocol) -> Any:
        """Answer an order."""
        h = head.headers
        try:
            if head.kind == "ping":
                return Reply()
            if head.kind == "drop":
                return self._drop(h["key"], int(h["version"]))
            if head.kind == "replicate":
                return self._replicate(h["key"], int(h["version"]), h["to"])
            if head.kind in ("run", "kill"):
                if self.jobs is None:
                    raise DsmlError("this worker runs no tasks", "unknown-method")
                return getattr(self.jobs, head.kind)(head, payload)
        except StoreError as e:
            raise DsmlError(e.message, e.code) from None
        raise DsmlError(f"unknown order {head.kind!r}", "unknown-method")

    def open(self, head: Head, conn: ServerProtocol) -> Any:
        """Orders carry no streamed payloads."""
        raise DsmlError("orders take no streamed payload", "unknown-method")

    def _drop(self, key: str, version: int) -> Reply:
        """Delete ``key`` only if it still holds ``version`` (a newer write stays)."""
        entry = self.store.stat(key)
        if entry.version != version:
            raise DsmlError(
                f"{key!r} has version {entry.version}, not {version}: kept", "stale-version"
            )
        deleted = self.store.delete(key)
        self.storage.changed("delete", deleted)
        return Reply({"Version": deleted.version})

    def _replicate(self, key: str, version: int, to: str) -> Deferred[Reply]:
        """Push this worker's copy of ``key`` (if still ``version``) to the server at ``to``."""
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
    link: ServerProtocol, headers: dict[str, object], body: IO[bytes], size: int
) -> Deferred[Response]:
    reply = link.request("file_upload", headers, size)
    producer = _FilePusher(link, body, size)
    if size:
        link.transport.registerProducer(producer, False)  # type: ignore[union-attr]
    # Fix (tests/test_cluster_sim.py): an empty file has no bytes to push.  Its pusher
    # read 0 bytes, took that for "the file shrank" and aborted the link, so an empty
    # file was never re-replicated (the repairer retried it forever).

    def done(result: Any) -> Any:
        producer.stopProducing()
        link.transport.loseConnection()  # type: ignore[union-attr]
        return result

    return reply.addBoth(done)


@implementer(IPullProducer)
class _FilePusher:
    """Writes ``size`` bytes of a file to a link as its transport asks for them."""

    def __init__(self, link: ServerProtocol, body: IO[bytes], size: int) -> None:
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
