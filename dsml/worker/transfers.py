"""A worker's task inputs and outputs, moved through the cluster on the reactor.

Owns :class:`TaskTransfers`, the :class:`~dsml.worker.tasks.Transfers` of a real worker:

- **Inputs.**  When the run order named the input's current version
  (:class:`~dsml.worker.tasks.InputVersion`, put there by the master at dispatch) and this
  worker's own store holds the key at exactly that version and checksum, the input is
  staged from the store with no request at all: the stored object is *copied* into the
  attempt's directory (a reflink where the filesystem can, else an in-kernel copy: see
  :func:`dsml.fsutil.copy_file`), never hard-linked, so a task that writes its input
  cannot change what the store serves.  Otherwise (no version named, no local copy, an
  older one) the key is downloaded with the :class:`~dsml.net.cluster_client.AsyncClusterClient`,
  failing over between replicas, into a temporary file renamed when verified.
- **Outputs** are uploaded with the same client (a pipeline to ``replication`` workers).
- **Retries.**  A master restart or a worker going away must not fail a task that ran
  fine: what a later try can mend (:data:`RETRYABLE`) is retried with backoff on the
  worker's clock, for :data:`TRANSFER_RETRY_FOR` seconds.

Everything runs on the reactor; only the local copy's bytes move in a thread
(``run_in_thread``), since a large copy would stall the reactor.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ..errors import DsmlError
from ..fsutil import copy_file
from ..net.cluster_client import AsyncClusterClient
from .storage import RunInThread
from .store import Store
from .tasks import InputVersion

log = Logger()

T = TypeVar("T")

#: How long a task's input or output transfer is retried when the master or a worker
#: cannot be reached (a restart), before the attempt fails.
TRANSFER_RETRY_FOR = 60.0

#: Error codes worth another try of a transfer.
RETRYABLE = frozenset({"connection", "unavailable", "no-workers", "busy", "timeout"})

#: The first wait between two tries, and the longest (the wait doubles each time).
RETRY_INITIAL = 0.2
RETRY_MAX = 5.0


class TaskTransfers:
    """Inputs staged from the local store or the cluster, outputs uploaded, with retries.

    ``client`` reaches the cluster; ``store`` is this worker's own store (read on the
    reactor thread, its object copied in ``run_in_thread``); ``clock`` paces the retries.
    """

    def __init__(
        self,
        client: AsyncClusterClient,
        store: Store,
        clock: Any,
        run_in_thread: RunInThread[Any],
        retry_for: float = TRANSFER_RETRY_FOR,
    ) -> None:
        self.client = client
        #: This worker's own store (the Transfers interface's ``store`` is the upload).
        self.local = store
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.retry_for = retry_for
        #: Inputs staged from the local store and from the network (for logs and tests).
        self.staged_locally = 0
        self.staged_remotely = 0

    def fetch(self, key: str, dest: Path, current: InputVersion | None = None) -> Deferred[None]:
        """Stage input ``key`` at ``dest``: from the local store when it holds
        ``current``, else from the cluster (temporary file + rename, checksum checked)."""
        return Deferred.fromCoroutine(self._fetch(key, dest, current))

    def store(self, src: Path, key: str) -> Deferred[None]:
        """Upload ``src`` as ``key`` with the cluster's replication."""

        async def run() -> None:
            await self._retrying(f"output {key!r}", lambda: self.client.upload_file(key, src))

        return Deferred.fromCoroutine(run())

    async def _fetch(self, key: str, dest: Path, current: InputVersion | None) -> None:
        if current is not None and await self._stage_locally(key, dest, current):
            self.staged_locally += 1
            return
        await self._retrying(
            f"input {key!r}", lambda: self.client.download_file(key, dest, fsync=False)
        )
        self.staged_remotely += 1

    async def _stage_locally(self, key: str, dest: Path, current: InputVersion) -> bool:
        """Copy the store's object of ``key`` to ``dest`` if it is ``current``; False
        (nothing written) if the store holds no such copy or the copy failed."""
        try:
            entry, body = self.local.open_read(key)
        except DsmlError:
            return False  # not here (or not readable): the network has it
        if entry.version != current.version or entry.sha256 != current.sha256:
            body.close()
            return False  # an older (or other) copy: never stage it

        def copy() -> str:
            # The thread closes the object it copies from, whatever happens: a fetch
            # cancelled meanwhile must not close (and free the number of) a descriptor
            # the copy still reads.
            try:
                return _copy_into(body, entry.size, dest)
            finally:
                body.close()

        try:
            how = await self.run_in_thread(copy)
        except OSError as e:
            log.warn(
                "input {key}: the local copy failed ({why}); fetching it instead",
                key=key, why=e.strerror or e,
            )
            return False
        log.debug("input {key} staged from the local store ({how})", key=key, how=how)
        return True

    async def _retrying(self, what: str, attempt: Callable[[], Deferred[T]]) -> T:
        """``attempt()`` until it succeeds, fails for good, or :attr:`retry_for` passes."""
        deadline = self.clock.seconds() + self.retry_for
        delay = RETRY_INITIAL
        while True:
            try:
                return await attempt()
            except DsmlError as e:
                if e.code not in RETRYABLE or self.clock.seconds() + delay > deadline:
                    raise
                log.info("{what}: {why}; trying again in {delay:g} s", what=what, why=e,
                         delay=delay)
            await deferLater(self.clock, delay)
            delay = min(delay * 2, RETRY_MAX)


def _copy_into(body: IO[bytes], size: int, dest: Path) -> str:
    """Copy ``size`` bytes of the open ``body`` to ``dest`` through a temporary file
    beside it (renamed at the end, removed on failure); returns how it copied."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        try:
            src = body.fileno()
        except (AttributeError, OSError, ValueError):  # a value: bytes in memory
            src = -1
        if src >= 0:
            how = copy_file(src, fd, size)
        else:
            body.seek(0)
            with os.fdopen(os.dup(fd), "wb") as out:
                out.write(body.read())
            how = "copy"
        copied = os.fstat(fd).st_size
        if copied != size:
            raise OSError(f"copied {copied} bytes of {size}")
        os.close(fd)
        fd = -1
        os.replace(tmp, dest)
        return how
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


__all__ = ["RETRYABLE", "TRANSFER_RETRY_FOR", "TaskTransfers"]
