"""The worker's storage server (the seed's WorkerServer): requests in, store operations out.

The handler decides and the :class:`~dsml.worker.store.Store` keeps the bytes; the
protocol in :mod:`dsml.net.server` moves them.  A file upload streams into the store's
temporary file while hashing; the fsync and rename run in a thread so the reactor keeps
serving, and the index commit comes back to the reactor thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

from ..errors import DsmlError
from ..net.server import Reply, ServerProtocol
from ..protocol.codec import Head
from ..protocol.limits import DEFAULT_VALUE_MAX
from ..protocol.methods import MethodTable, storage_methods
from .store import Entry, FileWriter, Store, StoreError

T = TypeVar("T")

#: Largest page a ``list`` request may ask for.
LIST_MAX = 10_000
LIST_DEFAULT = 1_000

RunInThread = Callable[[Callable[[], T]], "Deferred[T]"]


def entry_headers(entry: Entry) -> dict[str, object]:
    """The headers that describe a stored entry in a reply."""
    return {
        "Kind": entry.kind,
        "Size": entry.size,
        "Sha256": entry.sha256,
        "Version": entry.version,
    }


def entry_json(entry: Entry) -> dict[str, Any]:
    """One line of a ``list`` reply."""
    return {
        "key": entry.key,
        "kind": entry.kind,
        "size": entry.size,
        "sha256": entry.sha256,
        "version": entry.version,
        "mtime": entry.mtime,
    }


def _wire(e: StoreError) -> DsmlError:
    return DsmlError(e.message, e.code)


class StorageHandler:
    """Answers the storage methods of :func:`dsml.protocol.methods.storage_methods`.

    ``run_in_thread`` runs a blocking function off the reactor thread and returns a
    Deferred of its result (``deferToThreadPool`` in production; inline in tests).
    """

    def __init__(
        self,
        store: Store,
        run_in_thread: RunInThread[Any],
        value_max: int = DEFAULT_VALUE_MAX,
    ) -> None:
        self.store = store
        self.run_in_thread = run_in_thread
        self.methods: MethodTable = storage_methods(value_max)
        self._handlers: dict[str, Callable[[Head, bytes], Reply]] = {
            "ping": self._ping,
            "value_upload": self._value_upload,
            "value_retrieve": self._value_retrieve,
            "file_retrieve": self._file_retrieve,
            "delete": self._delete,
            "stat": self._stat,
            "list": self._list,
        }

    def handle(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        """Answer a buffered request."""
        fn = self._handlers.get(head.kind)
        if fn is None:
            raise DsmlError(f"method {head.kind!r} is not served here", "unknown-method")
        try:
            return fn(head, payload)
        except StoreError as e:
            raise _wire(e) from None

    def open(self, head: Head, conn: ServerProtocol) -> Upload:
        """Start a file upload."""
        if head.kind != "file_upload":
            raise DsmlError(f"method {head.kind!r} is not streamed here", "unknown-method")
        try:
            writer = self.store.begin_file(head.headers["key"])
        except StoreError as e:
            raise _wire(e) from None
        return Upload(self, writer, head.headers.get("sha256"))

    # -- buffered methods -------------------------------------------------------------

    def _ping(self, head: Head, payload: bytes) -> Reply:
        return Reply()

    def _value_upload(self, head: Head, payload: bytes) -> Reply:
        entry = self.store.put_value(head.headers["key"], payload)
        return Reply({"Version": entry.version, "Sha256": entry.sha256, "Size": entry.size})

    def _value_retrieve(self, head: Head, payload: bytes) -> Reply:
        entry, value = self.store.get_value(head.headers["key"])
        return Reply({"Version": entry.version}, value)

    def _file_retrieve(self, head: Head, payload: bytes) -> Reply:
        entry, body = self.store.open_read(head.headers["key"])
        headers = entry_headers(entry)
        headers["Action"] = "write-file"
        return Reply(headers, body=body, body_length=entry.size)

    def _delete(self, head: Head, payload: bytes) -> Reply:
        entry = self.store.delete(head.headers["key"])
        return Reply({"Version": entry.version})

    def _stat(self, head: Head, payload: bytes) -> Reply:
        entry = self.store.stat(head.headers["key"])
        headers = entry_headers(entry)
        headers["Mtime"] = f"{entry.mtime:.6f}"
        return Reply(headers)

    def _list(self, head: Head, payload: bytes) -> Reply:
        limit = int(head.headers.get("limit", LIST_DEFAULT))
        if not 1 <= limit <= LIST_MAX:
            raise DsmlError(f"Limit must be from 1 to {LIST_MAX}", "bad-header")
        entries = self.store.list(
            head.headers.get("prefix", ""), head.headers.get("after"), limit + 1
        )
        more = len(entries) > limit
        lines = [json.dumps(entry_json(e), ensure_ascii=False) for e in entries[:limit]]
        body = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
        return Reply({"More": 1} if more else {}, body)


class Upload:
    """One file upload in flight: chunks go to the store's temporary file."""

    def __init__(self, handler: StorageHandler, writer: FileWriter, expected: str | None) -> None:
        self.handler = handler
        self.writer = writer
        self.expected = expected

    def data(self, chunk: bytes) -> None:
        """Write and hash the next chunk."""
        try:
            self.writer.write(chunk)
        except StoreError as e:
            raise _wire(e) from None

    def end(self) -> Deferred[Reply]:
        """fsync and rename in a thread, then commit to the index here."""
        d = self.handler.run_in_thread(self.writer.prepare)
        d.addCallback(self._commit)
        d.addErrback(self._failed)
        return d

    def _commit(self, _: object) -> Reply:
        entry = self.writer.commit(self.expected)
        return Reply({"Size": entry.size, "Sha256": entry.sha256, "Version": entry.version})

    def _failed(self, failure: Any) -> None:
        self.writer.abort()
        if failure.check(StoreError):
            raise _wire(failure.value)
        failure.raiseException()

    def abort(self) -> None:
        """The upload will not complete: remove its temporary file."""
        self.writer.abort()
