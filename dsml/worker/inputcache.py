"""A worker's cache of task inputs fetched from other workers, by (key, version).

Owns :class:`InputCache`.  A sweep runs the same task hundreds of times over one dataset;
when the dataset lives on another worker, each attempt used to download its own copy
(50 attempts over a 78 MiB input left 4.5 GiB in ``tasks/``).  Now the first attempt
downloads the input once into ``cache/`` under the version and checksum the master named
at dispatch, later attempts on this worker are lent a read-only hard link to that file,
and attempts that want it while the download runs wait for that one download.

- **Only what the master named.**  An entry is keyed by ``(key, version, sha256)`` from the
  run order; a download that turns out to be another version (the key was rewritten
  meanwhile) is handed to its attempt and never cached.
- **A byte budget.**  Entries are evicted least recently used first once the cache holds
  more than ``budget`` bytes.  Evicting unlinks the cache's name only: an attempt holding
  a link keeps its bytes until its directory is recycled.  An input larger than the whole
  budget is still downloaded once per request, and not kept.
- **Never trusted across a restart.**  The directory is emptied when the cache is made: a
  file left by an earlier run may have been changed by a task since, and re-hashing a
  large cache at start-up would cost more than fetching what is needed again.
- **Tampering.**  A task running as the worker's user may ``chmod`` its link and write it;
  :meth:`InputCache.forget` drops such an entry (the caller notices, see
  :meth:`dsml.worker.transfers.TaskTransfers.release`) so no later attempt is lent it, and
  a hit whose file's inode, mtime, mode or size differ from when it was cached (a link
  kept past the attempt, written later) is fetched again.  A task that also restores the
  mtime and mode is not caught: only the isolation of tasks from the worker's user
  (issue #13) closes that, as for the store itself.  Where tasks run as another user
  (``task_user``, :mod:`dsml.worker.tasks.taskuser`) it is closed: an entry stays
  root's, 0440 to the task user's group, which may read it, not write or ``chmod`` it.

File work (emptying the directory, unlinking) is small and runs on the caller's thread;
the bytes move in the caller's download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..fsutil import private_dir

log = Logger()

#: What identifies a cached input: its key, version and sha256 as the master named them.
Ident = tuple[str, int, str]


@attrs.define
class _Entry:
    path: Path
    size: int
    #: (inode, mtime, mode, size) when it was cached: a hit whose file differs was
    #: changed behind the cache's back (a task keeping a link past its attempt) and is
    #: fetched again.
    stamp: tuple[int, int, int, int]


def _stamp_of(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_mode, st.st_size)


class InputCache:
    """Inputs downloaded once per worker, lent to attempts, within ``budget`` bytes.

    ``root`` is a directory on the same filesystem as the attempt directories (so a hard
    link can lend an entry); it is created private, or emptied if it exists.
    """

    def __init__(self, root: Path, budget: int,
                 lend: tuple[int, int | None] = (0o400, None)) -> None:
        if budget < 0:
            raise ValueError("the input cache's budget cannot be negative")
        self.root = root
        self.budget = budget
        #: An entry's mode and group (None: unchanged): read-only, to the task user's
        #: group too where tasks run as another user (:mod:`.tasks.taskuser`).
        self.lend = lend
        if root.exists():
            shutil.rmtree(root)
        private_dir(root)
        self._entries: OrderedDict[Ident, _Entry] = OrderedDict()
        self._downloads: dict[Ident, list[Deferred[Path | None]]] = {}
        #: Bytes of the entries kept; downloads made (for logs, tests and benchmarks).
        self.bytes = 0
        self.downloads = 0
        self.hits = 0

    def path_of(self, ident: Ident) -> Path:
        """Where the entry for ``ident`` lives: named by a hash of the whole identity
        (two keys with equal bytes, or one key's versions, never share a file)."""
        key, version, sha256 = ident
        name = hashlib.sha256(f"{key}\0{version}\0{sha256}".encode()).hexdigest()
        return self.root / name

    def get(
        self, ident: Ident, download: Callable[[Path], Deferred[tuple[int, str]]]
    ) -> Deferred[Path | None]:
        """The cached file for ``ident``, downloading it first if needed.

        ``download(path)`` writes the key to ``path`` (atomically) and fires with the
        ``(version, sha256)`` it got.  Fires with the entry's path, or None if what was
        downloaded is not ``ident`` (then the file at ``path_of(ident)`` is not kept:
        the caller fetches on its own).  Concurrent calls for one ``ident`` share one
        download; cancelling one caller's Deferred leaves the download to the others.
        """
        entry = self._entries.get(ident)
        if entry is not None and _stamp_of(entry.path) == entry.stamp:
            self._entries.move_to_end(ident)
            self.hits += 1
            return _fired(entry.path)
        if entry is not None:  # removed or changed behind our back: fetch it again
            log.info("input cache: {key} v{version} changed on disk; fetching it again",
                     key=ident[0], version=ident[1])
            self._drop(ident)
        waiter: Deferred[Path | None] = Deferred(lambda d: self._cancelled(ident, d))
        waiting = self._downloads.get(ident)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._downloads[ident] = [waiter]
        self.downloads += 1
        path = self.path_of(ident)
        d = download(path)
        d.addCallbacks(lambda got: self._downloaded(ident, path, got),
                       lambda f: self._failed(ident, f))
        return waiter

    def forget(self, ident: Ident) -> None:
        """Drop ``ident`` (a task changed the file through its link)."""
        if ident in self._entries:
            log.info("input cache: dropping {key} v{version}", key=ident[0], version=ident[1])
            self._drop(ident)

    def holds(self, ident: Ident) -> bool:
        return ident in self._entries

    # -- the download's end -------------------------------------------------------------

    def _downloaded(self, ident: Ident, path: Path, got: tuple[int, str]) -> None:
        waiters = self._downloads.pop(ident, [])
        if got != (ident[1], ident[2]):
            _unlink(path)  # another version than the one named: never cached
            for w in waiters:
                w.callback(None)
            return
        # Read-only: an attempt's link to it is refused writes (the owner may chmod).
        mode, group = self.lend
        if group is not None:
            os.chown(path, -1, group, follow_symlinks=False)
        os.chmod(path, mode)
        stamp = _stamp_of(path)
        if stamp is None:  # gone already
            for w in waiters:
                w.callback(None)
            return
        size = stamp[3]
        self._entries[ident] = _Entry(path, size, stamp)
        self.bytes += size
        # Lend it to every waiter first, then evict: an entry over the budget is still
        # linked by its attempts (the links were made before the caller returns).
        for w in waiters:
            w.callback(path)
        self._evict()

    def _failed(self, ident: Ident, failure: object) -> None:
        for w in self._downloads.pop(ident, []):
            w.errback(failure)

    def _cancelled(self, ident: Ident, d: Deferred[Path | None]) -> None:
        waiting = self._downloads.get(ident)
        if waiting is not None and d in waiting:
            waiting.remove(d)

    def _evict(self) -> None:
        while self.bytes > self.budget and self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, ident: Ident) -> None:
        entry = self._entries.pop(ident)
        self.bytes -= entry.size
        _unlink(entry.path)


def _fired(value: Path) -> Deferred[Path | None]:
    d: Deferred[Path | None] = Deferred()
    d.callback(value)
    return d


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


__all__ = ["Ident", "InputCache"]
