"""Attempt directories: made fresh for each attempt, kept after it, removed when old.

An attempt works in ``work_dir/run/<n>`` (:data:`RUN_DIR`), its working directory and the
home of its two logs.  When it ends, the directory becomes ``work_dir/<attempt id>`` if the
attempt left anything in it (logs, inputs, outputs, files the task made); an empty one is
removed.  A directory is never lent to a later attempt (one once was, when empty: a
process the first attempt left behind then read the next job's input and replaced its
result, and a task that swapped its directory for a symlink sent the next job there).

Nothing here follows a link a task may have planted: a name that is in the way of a new
directory is removed as what it is (a symlink is unlinked, not followed: planting
symlinks at the next names once made every later attempt fail at once), a working
directory the task replaced by a symlink or a file is dropped, not kept, and removal is
``shutil.rmtree``'s, which does not follow links.  :func:`output_problem` checks a
declared output the same way: a regular file inside the directory, with no other link.

Retention (``retention`` in etc/dsml.yaml): kept directories are removed oldest first
while there are more than ``keep_finished`` (``attempt_dirs_max_count``), while together
they hold more than ``max_bytes`` (``attempt_dirs_max_bytes``: each one's size is
measured once, when it is kept), and once they are older than ``max_age`` seconds
(``attempt_dirs_max_age``; checked at every retire and by :meth:`AttemptDirs.cleanup`,
which the owner may also call from a timer).  A directory's age is from when it was
kept (its mtime for those adopted at start-up).  At start-up, ``run/`` (attempts an
earlier run did not finish) is removed and the ``work_dir/<id>`` directories it left
count as finished, oldest first.
"""

from __future__ import annotations

import os
import shutil
import stat as stat_module
import time
from collections.abc import Callable
from pathlib import Path

from twisted.logger import Logger

from ...config import DEFAULT_ATTEMPT_DIRS_MAX_AGE, DEFAULT_ATTEMPT_DIRS_MAX_BYTES
from ...fsutil import makedirs_private, mkdir_private

log = Logger()

#: Under the work dir: the working directories of running attempts.
RUN_DIR = "run"


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (links not followed; 0 if it is gone).

    A file with other hard links is not counted: it is an input lent from the store or
    the input cache (or shared with another attempt), whose bytes are held, and bounded,
    where it came from."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if st.st_nlink == 1:
                total += st.st_size
    return total


def remove_entry(path: Path) -> None:
    """Remove ``path`` as what it is: a directory tree (links in it not followed), or a
    symlink or file (unlinked); nothing if it is gone.  Never raises."""
    try:
        if stat_module.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def output_problem(root: Path, rel: str) -> str:
    """Why the declared output ``root/rel`` may not be uploaded, or "": it must be a
    regular file, reached without a symlink out of ``root``, and have no other link (a
    hard link to a file the worker can read, its own database included, is refused)."""
    path = root / rel
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        return "missing"  # a symlink out of the directory: never upload other files
    try:
        st = os.lstat(path)
    except OSError:
        return "missing"
    if not stat_module.S_ISREG(st.st_mode):
        return "missing" if stat_module.S_ISLNK(st.st_mode) else "not a regular file"
    if st.st_nlink != 1:
        return "a link to another file (not a file of its own)"
    return ""


def read_small(root: Path, rel: str, limit: int) -> bytes | None:
    """The content of output ``root/rel`` (passed :func:`output_problem`) if it is at
    most ``limit`` bytes, else None; never through a symlink at its last step."""
    fd = os.open(root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat_module.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return None  # swapped since output_problem: read nothing (and upload fails)
        parts, size = [], 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts) if size <= limit else None
    finally:
        os.close(fd)


class AttemptDirs:
    """The attempt directories under ``work_dir``.

    :param keep_finished: finished attempt directories kept; older ones are removed.
    :param max_bytes: bytes the kept directories may hold together (None: no bound;
        by default ``retention.attempt_dirs_max_bytes``'s default, 10 GiB).
    :param max_age: seconds a kept directory is kept (None: no bound; by default
        ``retention.attempt_dirs_max_age``'s default, 7 days).
    :param now: the wall clock, in seconds (file ages are wall-clock times).
    """

    def __init__(
        self,
        work_dir: Path,
        keep_finished: int,
        *,
        max_bytes: int | None = DEFAULT_ATTEMPT_DIRS_MAX_BYTES,
        max_age: float | None = DEFAULT_ATTEMPT_DIRS_MAX_AGE,
        now: Callable[[], float] = time.time,
    ) -> None:
        if keep_finished < 0 or (max_bytes is not None and max_bytes < 0):
            raise ValueError("keep_finished and max_bytes must not be negative")
        if max_age is not None and not max_age > 0:
            raise ValueError("max_age must be greater than 0")
        self.work_dir = work_dir
        self.run_root = work_dir / RUN_DIR
        self.keep_finished = keep_finished
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.now = now
        #: Finished attempts whose logs can still be read, oldest first: True if their
        #: directory is on disk (work_dir/<id>), False if they left nothing behind.
        self.kept: dict[int, bool] = {}
        #: Bytes and time kept of each kept directory (attempts in :attr:`kept`).
        self._size: dict[int, int] = {}
        self._when: dict[int, float] = {}
        #: Bytes the kept directories hold together.
        self.kept_bytes = 0
        #: Directories removed by retention since start.
        self.removed = 0
        self._next = 0

    def recover(self) -> None:
        """At start-up: drop the working directories of attempts an earlier run did not
        finish (the master counts them lost anyway), adopt its finished ones."""
        shutil.rmtree(self.run_root, ignore_errors=True)
        old = []
        for entry in self.work_dir.iterdir():
            if entry.name.lstrip("-").isdigit() and stat_module.S_ISDIR(entry.lstat().st_mode):
                old.append((entry.stat().st_mtime, int(entry.name)))
        for mtime, attempt_id in sorted(old):
            self._note(attempt_id, True, tree_size(self.work_dir / str(attempt_id)), mtime)
        self.cleanup()

    def _note(self, attempt_id: int, on_disk: bool, size: int, when: float) -> None:
        self._forget(attempt_id)
        self.kept[attempt_id] = on_disk
        self._size[attempt_id] = size
        self._when[attempt_id] = when
        self.kept_bytes += size

    def _forget(self, attempt_id: int) -> bool | None:
        """Drop an attempt from the books; whether its directory was on disk."""
        self.kept_bytes -= self._size.pop(attempt_id, 0)
        self._when.pop(attempt_id, None)
        return self.kept.pop(attempt_id, None)

    def make(self, attempt_id: int) -> Path:
        """A new, empty working directory for an attempt, ``run/<n>`` (a name not used
        before by this run; whatever is in its way is removed without being followed).
        Raises OSError."""
        if attempt_id in self.kept:  # the same id again, after a master reset
            if self._forget(attempt_id):
                remove_entry(self.work_dir / str(attempt_id))
        path = self.run_root / str(self._next)
        self._next += 1
        try:  # one mkdir in the usual case: no stat first
            mkdir_private(path)
        except FileExistsError:
            remove_entry(path)
            mkdir_private(path)
        except FileNotFoundError:  # the run dir (or the work dir) is not there yet
            makedirs_private(path)
        return path

    def retire(self, attempt_id: int, path: Path, had_inputs: bool) -> Path | None:
        """A finished attempt leaves ``path``: keep it as ``work_dir/<id>`` if it holds
        anything, else keep it empty for the next attempt; then remove the oldest kept
        beyond ``keep_finished``.  Where its directory is now, or ``None``."""
        kept = self._keep(attempt_id, path, had_inputs)
        size = 0 if kept is None else tree_size(kept)
        self._note(attempt_id, kept is not None, size, self.now())
        self.cleanup()
        return kept if kept is None or attempt_id in self.kept else None

    def _keep(self, attempt_id: int, path: Path, had_inputs: bool) -> Path | None:
        if path == self.run_root:  # it never got a directory
            return None
        try:
            if not stat_module.S_ISDIR(os.lstat(path).st_mode):
                # The task replaced its directory (by a symlink, a file): nothing kept.
                remove_entry(path)
                return None
            if not had_inputs and not os.listdir(path):
                # (Not after inputs: a cancelled fetch might still land a file in it.)
                os.rmdir(path)
                return None
            kept = self.work_dir / str(attempt_id)
            try:
                os.rename(path, kept)
            except OSError:  # kept exists (an id seen again): replace it
                remove_entry(kept)
                os.rename(path, kept)
            return kept
        except OSError as e:
            log.warn("attempt {attempt}: directory not kept: {e}", attempt=attempt_id, e=e)
            shutil.rmtree(path, ignore_errors=True)
            return None

    def cleanup(self) -> int:
        """Remove the oldest finished attempt directories while there are more than
        ``keep_finished``, while they hold more than ``max_bytes``, or while the oldest
        is older than ``max_age``; how many were removed.  O(removed)."""
        removed = 0
        oldest_allowed = None if self.max_age is None else self.now() - self.max_age
        while self.kept:
            attempt_id = next(iter(self.kept))
            if not (
                len(self.kept) > self.keep_finished
                or (self.max_bytes is not None and self.kept_bytes > self.max_bytes)
                or (oldest_allowed is not None and self._when[attempt_id] < oldest_allowed)
            ):
                break
            if self._forget(attempt_id):
                remove_entry(self.work_dir / str(attempt_id))
            removed += 1
        self.removed += removed
        return removed
