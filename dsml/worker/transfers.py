"""A worker's task inputs and outputs, moved through the cluster on the reactor.

Owns :class:`TaskTransfers`, the :class:`~dsml.worker.tasks.Transfers` of a real worker:

- **Inputs.**  When the run order named the input's current version
  (:class:`~dsml.worker.tasks.InputVersion`, put there by the master at dispatch) and this
  worker's own store holds the key at exactly that version and checksum, the input is
  staged from the store with no request at all, and without copying its bytes where it
  can: a reflink first (the task may even write its copy), else a *read-only hard link*
  to the very object the version check opened (``linkat`` through ``/proc/self/fd``, so a
  write replacing the key meanwhile cannot slip another object in), the inode made 0400
  so a task's accidental write is refused; else (another filesystem, no ``/proc``) a copy
  (:func:`dsml.fsutil.copy_file`).  Store objects are never written after their rename,
  so the link is a stable snapshot of that version.  A task running as the worker's user
  could still ``chmod`` and write it (not one running as another user, ``task_user``:
  the object is then root's, 0440 to that user's group, :mod:`.tasks.taskuser`);
  :meth:`TaskTransfers.release`, called when the attempt ends, notices any change of
  the inode (its ctime, mtime, mode or size moved), re-hashes the object, and if it no
  longer matches hands the key to ``report_corrupt`` (the worker drops its copy and
  tells the master, which repairs it from the others).
  Otherwise, when a version was named and the worker has an
  :class:`~dsml.worker.inputcache.InputCache`, the key is downloaded once into the cache
  by (key, version, checksum) and lent the same way (a read-only hard link): a sweep's
  hundred attempts on this worker transfer it once.  With no version named the key is
  downloaded straight into the attempt's directory with the
  :class:`~dsml.net.cluster_client.AsyncClusterClient`, failing over between replicas,
  into a temporary file renamed when verified.
- **Outputs** are uploaded with the same client (a pipeline to ``replication`` workers).
- **Retries.**  A master restart or a worker going away must not fail a task that ran
  fine: what a later try can mend (:data:`RETRYABLE`) is retried with backoff on the
  worker's clock, for :data:`TRANSFER_RETRY_FOR` seconds.

Everything runs on the reactor; only the local staging and a re-hash run in a thread
(``run_in_thread``), since a large copy or hash would stall the reactor.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ..errors import DsmlError
from ..fsutil import FICLONE, copy_file
from ..net.cluster_client import AsyncClusterClient
from .inputcache import Ident, InputCache
from .storage import RunInThread
from .store import Store
from .tasks import InputVersion

log = Logger()

T = TypeVar("T")

#: How long a task's input or output transfer is retried when the master or a worker
#: cannot be reached (a restart), before the attempt fails.
TRANSFER_RETRY_FOR = 60.0

#: Error codes worth another try of a transfer.
# outcome-unknown: the write may or may not land; a retry is a newer version either way.
RETRYABLE = frozenset(
    {"connection", "unavailable", "no-workers", "busy", "timeout", "outcome-unknown"}
)

#: The first wait between two tries, and the longest (the wait doubles each time).
RETRY_INITIAL = 0.2
RETRY_MAX = 5.0

#: Read size of the re-hash of a changed input.
_HASH_CHUNK = 1024 * 1024


@attrs.frozen
class _Linked:
    """An input hard-linked from the store: what :meth:`TaskTransfers.release` checks."""

    key: str
    sha256: str
    #: The store's object (the link's other name) and its inode.
    obj: str
    ino: int
    #: What a write (or the ``chmod`` one needs first) moves.  Not the ctime: every other
    #: link to the same object (another attempt staging it, a directory recycled) moves it.
    stamp: tuple[int, int, int]
    #: Lent from the input cache (then a change only drops the entry), not the store.
    cached: Ident | None = None


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_mode, st.st_size)


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
        report_corrupt: Callable[[str], object] | None = None,
        cache: InputCache | None = None,
        lend: tuple[int, int | None] = (0o400, None),
    ) -> None:
        self.client = client
        #: The mode and group (None: unchanged) of a store object lent by a link: 0400,
        #: or 0440 to the group of the user tasks run as (:mod:`.tasks.taskuser`).
        self.lend = lend
        #: This worker's own store (the Transfers interface's ``store`` is the upload).
        self.local = store
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.retry_for = retry_for
        #: Told the key when a task turned out to have changed the store's object through
        #: its read-only link (the worker drops its copy and tells the master).
        self.report_corrupt = report_corrupt
        #: Remote inputs kept by (key, version, checksum), or None to fetch each time.
        self.cache = cache
        #: Inputs hard-linked from the store or the cache, by their path in an attempt's
        #: directory.
        self._linked: dict[Path, _Linked] = {}
        #: Inputs staged from the local store, from the network (through the cache or
        #: not), and lent from the cache (for logs and tests).
        self.staged_locally = 0
        self.staged_remotely = 0
        self.staged_cached = 0

    def fetch(self, key: str, dest: Path, current: InputVersion | None = None) -> Deferred[None]:
        """Stage input ``key`` at ``dest``: from the local store when it holds
        ``current``, else from the cluster (temporary file + rename, checksum checked)."""
        return Deferred.fromCoroutine(self._fetch(key, dest, current))

    def store(self, src: Path, key: str, attempt: int | None = None) -> Deferred[None]:
        """Upload ``src`` as ``key`` with the cluster's replication; as the output of
        ``attempt`` when given (the master refuses it, ``fenced``, once that attempt no
        longer runs: a paused worker's late output never replaces the retry's)."""

        async def run() -> None:
            await self._retrying(
                f"output {key!r}", lambda: self.client.upload_file(key, src, attempt)
            )

        return Deferred.fromCoroutine(run())

    async def _fetch(self, key: str, dest: Path, current: InputVersion | None) -> None:
        if current is not None and await self._stage_locally(key, dest, current):
            self.staged_locally += 1
            return
        if current is not None and self.cache is not None:
            if await self._stage_cached(key, dest, current):
                self.staged_cached += 1
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

        def stage() -> tuple[str, os.stat_result | None]:
            # The thread closes the object it stages from, whatever happens: a fetch
            # cancelled meanwhile must not close (and free the number of) a descriptor
            # the copy still reads.
            try:
                return _stage_into(body, entry.size, dest, self.lend)
            finally:
                body.close()

        try:
            how, linked = await self.run_in_thread(stage)
        except OSError as e:
            log.warn(
                "input {key}: the local copy failed ({why}); fetching it instead",
                key=key, why=e.strerror or e,
            )
            return False
        if linked is not None:
            self._linked[dest] = _Linked(key, entry.sha256, body.name, linked.st_ino,
                                         _stamp(linked))
        log.debug("input {key} staged from the local store ({how})", key=key, how=how)
        return True

    async def _stage_cached(self, key: str, dest: Path, current: InputVersion) -> bool:
        """Lend ``dest`` the cache's file of ``key`` at ``current``, downloading it into
        the cache first if it is not there; False if the cache cannot serve it (another
        version came, or no link could be made): then fetch on our own."""
        assert self.cache is not None
        ident = (key, current.version, current.sha256)

        def download(path: Path) -> Deferred[tuple[int, str]]:
            async def run() -> tuple[int, str]:
                entry = await self._retrying(
                    f"input {key!r}",
                    lambda: self.client.download_file(key, path, fsync=False),
                )
                self.staged_remotely += 1
                return (entry.version, entry.sha256)

            return Deferred.fromCoroutine(run())

        path = await self.cache.get(ident, download)
        if path is None:
            return False
        # On the reactor thread, at once: a link is one system call, and the cache may
        # evict the entry's name as soon as its waiters have returned.
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        os.unlink(tmp)
        try:
            os.link(path, tmp)
            st = os.stat(tmp)
            os.replace(tmp, dest)
        except OSError as e:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            log.warn("input {key}: cannot link the cached copy ({why}); fetching it",
                     key=key, why=e.strerror or e)
            return False
        self._linked[dest] = _Linked(key, current.sha256, str(path), st.st_ino, _stamp(st),
                                     cached=ident)
        log.debug("input {key} staged from the input cache", key=key)
        return True

    def release(self, dest: Path) -> Deferred[bool]:
        """The attempt that staged ``dest`` has ended: if ``dest`` was hard-linked from
        the store and the object was changed through it, re-hash the object and, when it
        no longer matches, hand the key to :attr:`report_corrupt`.  Fires with False
        only when the store's copy was found corrupt."""
        linked = self._linked.pop(dest, None)
        if linked is None:
            return succeed(True)
        try:
            st = os.stat(linked.obj)
        except OSError:
            return succeed(True)  # the store moved on: the old object is the task's alone
        if st.st_ino != linked.ino or _stamp(st) == linked.stamp:
            return succeed(True)
        if linked.cached is not None:
            if self.cache is not None:
                log.warn("input {key}: the task changed its link to the input cache; "
                         "dropping the cached copy", key=linked.key)
                self.cache.forget(linked.cached)
            return succeed(True)
        log.warn(
            "input {key}: its read-only link to the store was changed by the task; "
            "re-hashing the store's copy", key=linked.key,
        )

        def checked(ok: bool) -> bool:
            if not ok:
                log.error("input {key}: the store's copy no longer matches its checksum",
                          key=linked.key)
                if self.report_corrupt is not None:
                    self.report_corrupt(linked.key)
            return ok

        d = self.run_in_thread(lambda: _sha256_of(linked.obj) == linked.sha256)
        d.addCallback(checked)
        return d

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


def _stage_into(
    body: IO[bytes], size: int, dest: Path, lend: tuple[int, int | None] = (0o400, None)
) -> tuple[str, os.stat_result | None]:
    """Put the ``size`` bytes of the open store object ``body`` at ``dest`` through a
    temporary name beside it (renamed at the end, removed on failure): a reflink, else a
    read-only hard link to ``body`` itself (with the object's status after linking),
    else a copy.  Returns how, and the status for a link."""
    try:
        src = body.fileno()
    except (AttributeError, OSError, ValueError):  # a value: bytes in memory
        src = -1
    if src >= 0 and size > 0:
        linked = _link_readonly(src, size, dest, lend)
        if linked is not None:
            return linked
    return _copy_into(body, src, size, dest), None


def _link_readonly(
    src: int, size: int, dest: Path, lend: tuple[int, int | None] = (0o400, None)
) -> tuple[str, os.stat_result | None] | None:
    """A reflink of ``src`` at ``dest``, else a hard link to it made read-only; None if
    neither can be made here (another filesystem, no ``/proc``, the object unlinked)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        try:
            fcntl.ioctl(fd, FICLONE, src)
            cloned = True
        except OSError:
            cloned = False
        os.close(fd)
        fd = -1
        if cloned and os.stat(tmp).st_size == size:
            os.replace(tmp, dest)
            return "clone", None
        os.unlink(tmp)
        try:
            # 0400 first (0440 to the task user's group): the store never writes an
            # object after its rename, and a task opening its input for writing is then
            # refused instead of changing the store.
            mode, group = lend
            if group is not None:
                os.fchown(src, -1, group)
            os.fchmod(src, mode)
            # The very inode the version check opened, not whatever the object's name
            # holds now: linkat(AT_SYMLINK_FOLLOW) of the descriptor's /proc link (a
            # directory descriptor makes Python call linkat, not link, which would not
            # follow it).
            fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.link(str(src), tmp, src_dir_fd=fds, follow_symlinks=True)
            finally:
                os.close(fds)
        except OSError:
            return None
        st = os.fstat(src)
        if st.st_size != size:
            os.unlink(tmp)
            return None
        os.replace(tmp, dest)
        return "link", st
    except BaseException:
        _discard(fd, tmp)
        raise


def _discard(fd: int, tmp: str) -> None:
    """Close ``fd`` (if still open, >= 0) and remove ``tmp`` (if there): a stage that
    failed leaves nothing behind."""
    if fd >= 0:
        os.close(fd)
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_into(body: IO[bytes], src: int, size: int, dest: Path) -> str:
    """Copy ``size`` bytes of the open ``body`` (descriptor ``src``, or -1 for bytes in
    memory) to ``dest`` through a temporary file beside it (renamed at the end, removed
    on failure); returns how it copied."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
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
        _discard(fd, tmp)
        raise


__all__ = ["RETRYABLE", "TRANSFER_RETRY_FOR", "TaskTransfers"]
