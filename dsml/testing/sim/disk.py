"""What a worker's disk has made durable, so that a simulated power loss takes the rest.

The simulation's stores are real directories on the test machine's disk, where nothing is
ever lost.  :class:`Disk` watches the calls through which the store
(:mod:`dsml.worker.store`) makes its files durable and, when a worker's machine loses
power (:meth:`SimCluster.power_off`), undoes on its directory what a real disk might not
have kept:

- an object renamed into place whose directory was not fsynced since: the rename is
  undone (the name vanishes);
- an object whose data was not fsynced before its rename: left with no bytes, as
  delayed allocation leaves a file whose name reached the disk before its data;
- the values log beyond its last fdatasync: cut there (records appended since the
  worker's last one-second sync are lost; what a flush moved into the index stays).

It is a model of the store's own calls, not of a filesystem: SQLite's commits are taken
as durable when they return (the index's WAL under ``synchronous=NORMAL`` could lose its
last commits too; that is not modelled), and unlinks are durable at once.  It patches the
store module's ``os``, ``_fsync_dir`` and ``_fdatasync`` while installed, and passes every
call through unchanged; paths outside a registered root are not tracked.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from types import ModuleType
from typing import Any


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


class _TrackedOs:
    """The ``os`` module as the store sees it: the same, with its durability calls seen."""

    def __init__(self, real: ModuleType, disk: Disk) -> None:
        self._real = real
        self._disk = disk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def fsync(self, fd: int) -> None:
        self._real.fsync(fd)
        self._disk.synced_fd(fd)

    def rename(self, src: Any, dst: Any) -> None:
        self._real.rename(src, dst)
        self._disk.renamed(os.fspath(src), os.fspath(dst))

    def ftruncate(self, fd: int, length: int) -> None:
        self._real.ftruncate(fd, length)
        self._disk.truncated(fd, length)


class Disk:
    """The durable state of the registered roots, as far as the store's calls tell."""

    def __init__(self) -> None:
        self.roots: list[str] = []
        self._synced: set[str] = set()  # files whose data was fsynced, by path
        self._unsynced: set[str] = set()  # renamed into place before their data was
        self._dirents: dict[str, set[str]] = {}  # dir -> names renamed in, not yet fsynced
        self._log_synced: dict[str, int] = {}  # values log path -> bytes durable
        self._saved: dict[str, Any] = {}

    # -- installing --------------------------------------------------------------------

    def install(self) -> None:
        """Patch the store module (once; :meth:`uninstall` undoes it)."""
        from dsml.worker import store

        if self._saved:
            return
        self._saved = {n: getattr(store, n) for n in ("os", "_fsync_dir", "_fdatasync")}
        store.os = _TrackedOs(os, self)  # type: ignore[assignment]
        real_dir, real_data = self._saved["_fsync_dir"], self._saved["_fdatasync"]

        def fsync_dir(path: Path) -> None:
            real_dir(path)
            self._dirents.pop(os.fspath(path), None)

        def fdatasync(fd: int) -> None:
            real_data(fd)
            self.synced_log(fd)

        store._fsync_dir = fsync_dir  # type: ignore[assignment]
        store._fdatasync = fdatasync

    def uninstall(self) -> None:
        from dsml.worker import store

        for name, value in self._saved.items():
            setattr(store, name, value)
        self._saved = {}

    def watch(self, root: Path) -> None:
        """Track files under ``root`` (a worker's store directory); its values log's
        present bytes count as durable."""
        path = os.fspath(root)
        if path not in self.roots:
            self.roots.append(path)
        log = os.path.join(path, "values.log")
        try:
            self._log_synced[log] = os.path.getsize(log)
        except OSError:
            self._log_synced[log] = 0

    def _mine(self, path: str) -> bool:
        return any(path.startswith(r + os.sep) for r in self.roots)

    # -- what the store does ------------------------------------------------------------

    def synced_fd(self, fd: int) -> None:
        path = _fd_path(fd)
        if path is not None and self._mine(path):
            self._synced.add(path)

    def renamed(self, src: str, dst: str) -> None:
        if not self._mine(dst):
            return
        if src in self._synced:
            self._synced.discard(src)
        else:
            self._unsynced.add(dst)
        self._dirents.setdefault(os.path.dirname(dst), set()).add(dst)

    def synced_log(self, fd: int) -> None:
        path = _fd_path(fd)
        if path is not None and path in self._log_synced:
            self._log_synced[path] = os.fstat(fd).st_size

    def truncated(self, fd: int, length: int) -> None:
        # Taken as durable at once: lenient, like the index's commits.
        path = _fd_path(fd)
        if path is not None and path in self._log_synced:
            self._log_synced[path] = min(self._log_synced[path], length)

    # -- the power loss -----------------------------------------------------------------

    def forget(self, root: Path) -> None:
        """Forget what is tracked under ``root`` (its simulation closed)."""
        base = os.fspath(root) + os.sep
        self._synced = {p for p in self._synced if not p.startswith(base)}
        self._unsynced = {p for p in self._unsynced if not p.startswith(base)}
        self._dirents = {d: n for d, n in self._dirents.items()
                         if not (d + os.sep).startswith(base)}
        self._log_synced = {p: n for p, n in self._log_synced.items()
                            if not p.startswith(base)}

    def lose_power(self, root: Path) -> list[str]:
        """Undo under ``root`` what was not durable; returns what it did, one line each."""
        base = os.fspath(root) + os.sep
        did: list[str] = []
        for d in [d for d in self._dirents if (d + os.sep).startswith(base)]:
            for path in sorted(self._dirents.pop(d)):
                if os.path.exists(path):
                    os.unlink(path)
                    did.append(f"rename undone: {os.path.relpath(path, root)}")
                self._unsynced.discard(path)
        for path in [p for p in self._unsynced if p.startswith(base)]:
            self._unsynced.discard(path)
            if os.path.exists(path) and os.path.getsize(path) > 0:
                os.truncate(path, 0)
                did.append(f"data lost: {os.path.relpath(path, root)}")
        for log, keep in self._log_synced.items():
            if log.startswith(base) and os.path.exists(log) and os.path.getsize(log) > keep:
                did.append(f"values log cut: {os.path.getsize(log) - keep} bytes")
                os.truncate(log, keep)
        self._synced = {p for p in self._synced if not p.startswith(base)}
        return did


#: The one model every simulation in this process shares (the store module is patched
#: while any simulation is open: :func:`acquire`, :func:`release`).
DISK = Disk()
_users = [0]


def acquire() -> Disk:
    if _users[0] == 0:
        DISK.install()
    _users[0] += 1
    return DISK


def release(roots: list[Path]) -> None:
    for root in roots:
        path = os.fspath(root)
        if path in DISK.roots:
            DISK.roots.remove(path)
        DISK.forget(root)
    _users[0] -= 1
    if _users[0] == 0:
        DISK.uninstall()


def break_store(store: Any, fault: str | None) -> None:
    """Make ``store``'s disk fail as :meth:`SimCluster.disk_fault` says (None: mend it)."""
    for method in ("put_value", "begin_file", "get_value", "open_read"):
        store.__dict__.pop(method, None)  # the class's own again
    if fault is None:
        return

    def full(*args: Any, **kw: Any) -> Any:
        from ...worker.store import DiskFull

        raise DiskFull("no space left on device (simulated)")

    def io(*args: Any, **kw: Any) -> Any:
        raise OSError(errno.EIO, "input/output error (simulated)")

    for method in ("put_value", "begin_file"):
        setattr(store, method, full if fault == "full" else io)
    if fault == "io":
        for method in ("get_value", "open_read"):
            setattr(store, method, io)


# -- the master's SQLite state under a power loss ----------------------------------------
#
# The master's state file runs in WAL mode; a commit that acknowledges something is made
# at synchronous=FULL (the WAL is fsynced before the commit returns), one that
# acknowledges nothing at NORMAL (the WAL is fsynced only before a checkpoint).  A process
# crash loses nothing committed either way; a power loss loses the NORMAL commits since
# the last FULL one or checkpoint.  (The jobs file commits only at FULL: nothing of it.)


def watch_wal(state: Any) -> None:
    """After each outermost commit of ``state`` (a MasterState) at the acknowledging
    level, note how far its WAL is durable (see :func:`lose_wal`)."""
    plain = state.transaction

    @contextlib.contextmanager
    def transaction(lazy: bool = False) -> Any:
        outer = not state.in_transaction
        with plain(lazy):
            yield
        if outer and not lazy:
            state.wal_durable = _wal_now(Path(state.path))

    state.transaction = transaction
    state.wal_durable = _wal_now(Path(state.path))


def _wal_now(path: Path) -> tuple[bytes, int, tuple[int, int]]:
    """(the WAL's salt, its size, the database file's size and mtime)."""
    wal = Path(f"{path}-wal")
    head = b""
    size = 0
    if wal.exists():
        with wal.open("rb") as f:
            head = f.read(32)
        size = wal.stat().st_size
    st = path.stat()
    return head[16:24], size, (st.st_size, st.st_mtime_ns)


def lose_wal(state: Any) -> tuple[Any, int]:
    """A power loss of the master's machine: what its state file will hold.  Returns a
    function that puts that back once the state is closed (closing checkpoints the whole
    WAL into the database), and how many WAL bytes the power loss took."""
    path = Path(state.path)
    wal = Path(f"{path}-wal")
    salt, size, db_stat = getattr(state, "wal_durable", (b"", 0, (0, 0)))
    data = wal.read_bytes() if wal.exists() else b""
    st = path.stat()
    if (st.st_size, st.st_mtime_ns) != db_stat:
        keep = len(data)  # a checkpoint ran since: it synced the WAL first
    elif len(data) >= 32 and data[16:24] == salt:
        keep = min(size, len(data))
    else:
        keep = 0  # the WAL started again since the last durable commit: none of it synced
    db = path.read_bytes()
    kept = data[:keep]

    def restore() -> None:
        path.write_bytes(db)
        if kept:
            wal.write_bytes(kept)
        else:
            wal.unlink(missing_ok=True)
        Path(f"{path}-shm").unlink(missing_ok=True)

    return restore, len(data) - keep
