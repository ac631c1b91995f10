"""What a worker does when the master orders it (down the worker's link to the master).

:class:`WorkerOrders` answers ``ping``, ``replicate``, ``drop`` and ``verify``; the task
orders (``run``, ``kill``) are :class:`dsml.worker.runner.TaskOrders`.  Only the master
may call them (``ping`` anyone): the link trusts the peer it dialled as the master.

``replicate`` pushes a copy with the master's ``Grant`` for its version (the target
stores nothing else).  ``verify`` is how a client's ``corrupt`` hint is checked: this
worker re-hashes its own copy, and only if the copy is bad does it forget it and say so
to the master (:meth:`WorkerOrders.forget_bad_copy`, also what the worker's other parts
call when they find a copy bad: :meth:`dsml.worker.service.Worker.report_corrupt`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import ConnectionLost, DsmlError, NotFound
from ..net.connection import Connection
from ..net.links import Links
from ..net.responders import Reply, Responders, responder
from ..net.server import Response
from ..protocol.codec import Head
from ..protocol.methods import ALL_ROLES, Role, worker_order_methods
from .storage import StorageHandler
from .store import IndexEntry as Entry

log = Logger()

_MASTER = frozenset({Role.MASTER})

#: Failures of opening a link that mean the target cannot be reached (now): an expected
#: fault of a cluster, answered ``unreachable`` (the master's repair tries again).
_UNREACHABLE = (
    error.ConnectError,
    error.ConnectionClosed,
    error.TimeoutError,
    error.ConnectingCancelledError,
    CancelledError,
    ConnectionLost,
    OSError,
)


def order_responders(orders: WorkerOrders, tasks: object) -> Responders:
    """The table of the worker's link: the store's orders from ``orders``, ``run`` and
    ``kill`` from ``tasks`` (:class:`~dsml.worker.runner.TaskOrders`)."""
    return Responders(worker_order_methods(), orders, tasks)


class WorkerOrders:
    """Answers ``replicate`` and ``drop`` from the master, and ``ping``."""

    def __init__(
        self,
        storage: StorageHandler,
        links: Links,
        report_bad: Callable[[Entry], Deferred[bool]] | None = None,
    ) -> None:
        self.storage = storage
        self.store = storage.store
        self.links = links
        #: Tells the master of a copy forgotten as corrupt (StoreReports.bad_copy).
        self.report_bad = report_bad

    def forget_bad_copy(self, key: str, version: int | None = None) -> Deferred[bool]:
        """This worker's copy of ``key`` (at ``version``, if given) is corrupt: remove it
        from the store (no tombstone: the key is simply gone here) and tell the master
        (``bad_copy``), which forgets it and copies a good one back.  Fires True once the
        master has forgotten it, False if there was no such copy to forget or the master
        was not told (not registered: the next registration's inventory lacks it).
        Never fails (a store error is logged)."""
        try:
            held = self.store.stat(key).version
            if version is not None and held != version:
                return succeed(False)
            gone = self.store.forget(key, held)
        except NotFound:
            return succeed(False)
        except Exception:
            log.failure("forgetting the bad copy of {key!r} failed", key=key)
            return succeed(False)
        if gone is None:
            return succeed(False)
        log.warn("copy of {key!r} v{version} failed its re-hash: forgotten here", key=key,
                 version=gone.version)
        # Also as an ordinary delete report, queued behind any report of the copy's
        # store still waiting to go: that one must not bring the copy back.
        self.storage.changed("delete", gone)
        if self.report_bad is None:
            return succeed(False)
        return self.report_bad(gone)

    def check_copy(self, key: str) -> Deferred[bool]:
        """Re-hash this worker's copy of ``key`` in a thread; if it is bad, forget it and
        tell the master (:meth:`forget_bad_copy`).  Fires True if the copy is good, False
        if it was bad (or is not here)."""
        try:
            entry, check = self.store.verifier(key)
        except NotFound:
            return succeed(False)
        d = self.storage.run_in_thread(check)

        def decide(good: bool) -> Any:
            if good:
                return True
            return self.forget_bad_copy(key, entry.version).addCallback(lambda _: False)

        return d.addCallback(decide)

    @responder("verify", roles=_MASTER)
    def _verify(self, head: Head, payload: bytes, conn: Connection) -> Deferred[Reply]:
        """Re-hash the copy of ``Key``: is it ``Version`` with content ``Sha256``?"""
        h = head.headers
        key, version, sha256 = h["key"], int(h["version"]), h["sha256"]
        entry, check = self.store.verifier(key)
        if entry.version != version:
            check.close()
            raise DsmlError(
                f"{key!r} has version {entry.version}, not {version}", "stale-version"
            )
        d = self.storage.run_in_thread(check)

        def decide(good: bool) -> Any:
            if good and entry.sha256 == sha256:
                log.info("copy of {key!r} v{version} re-hashed on the master's order: good",
                         key=key, version=version)
                return Reply({"Good": 1})
            forgetting = self.forget_bad_copy(key, version)
            return forgetting.addCallback(lambda told: Reply({"Good": 0, "Told": int(told)}))

        return d.addCallback(decide)

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
        if "grant" not in h:
            raise DsmlError("replicate needs the master's Grant for the copy", "bad-header")
        entry, body = self.store.open_read(key)
        if entry.version != version:
            body.close()
            raise DsmlError(
                f"{key!r} has version {entry.version}, not {version}", "stale-version"
            )
        headers: dict[str, object] = {"Key": key, "Grant": h["grant"], "Sha256": entry.sha256}
        if entry.kind == "value":
            data = body.read()
            body.close()
            d = self.links.shared(to)
            d.addErrback(_unreachable, key, to)
            d.addCallback(lambda link: link.request("value_upload", headers, data))
        else:
            d = self.links.open(to)
            d.addErrback(_closing, body)  # the link never opened: the file is still open
            d.addErrback(_unreachable, key, to)
            d.addCallback(_push_file, headers, body, entry.size)
        return d.addCallback(lambda r: Reply({"Replicas": r.headers.get("replicas", "1")}))


def _closing(failure: Failure, body: IO[bytes]) -> Failure:
    body.close()
    return failure


def _unreachable(failure: Failure, key: str, to: str) -> Failure:
    """The link to a replicate order's target did not open: one warning line, and the
    order answered ``unreachable`` (not a bug: a worker may be down or cut off)."""
    if not failure.check(*_UNREACHABLE):
        return failure
    why = failure.getErrorMessage()
    log.warn("cannot copy {key!r} to {to}: {why}", key=key, to=to, why=why)
    raise DsmlError(f"cannot reach {to} to copy {key!r} there: {why}", "unreachable")


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
