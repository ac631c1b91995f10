"""The worker's durable on-disk store of files and values.

Layout under ``root``::

    index.sqlite3           one row per key (entries) plus a little metadata (meta)
    values.log              value puts not yet applied to the index (see below)
    objects/<xx>/<name>     file contents; <name> is derived from sha256(key) + a uuid
    tmp/                    files being written; emptied on every open

One room because the index, the values log with its overlay and the file commits share
one version counter and one ordering rule (a pending put is never reordered with a later
write of its key): each write path must see the others' state directly.

Files and values share one key space.  Every write of a key replaces what was
there and gets a new version from a per-store counter that never goes back, not
even across deletes and restarts.  A key is never used as a path: object names
are built from a hash of the key and a random uuid, so any string is safe.

Everything here is plain synchronous code run on the reactor thread, except
:meth:`FileWriter.prepare`, which does the slow flush/fsync/rename and is meant
to run in a worker thread; it touches no SQLite.

Values log (group commit): :meth:`Store.put_value` does not touch SQLite.  It
appends one self-checking record (length, crc32, version, mtime, key, value) to
``values.log`` with a single ``write`` on an ``O_APPEND`` descriptor, and keeps
the value in an in-memory overlay that every read consults before the index.
:meth:`Store.flush` applies the overlay to the index in one transaction and
empties the log; it runs once the log holds ``flush_every`` records or
``flush_bytes`` bytes of values, and synchronously before every other write (a
file commit, a delete), before :meth:`Store.list` / :meth:`Store.inventory`, and
on close, so a pending put is never reordered with a later write of its key and
listings are complete.  A put over a key that holds a *file* is the exception:
it flushes and writes its row directly, so the file's object is unlinked only
once the value replacing it is committed.

Durability of values:

* Process crash (kill -9): nothing acknowledged is lost.  A record is in the
  kernel's page cache once ``write`` returns, like a commit under SQLite's
  synchronous=NORMAL in WAL mode.  The next open replays the log: it reads
  records up to the first short or corrupt one (a torn tail, cut off), applies
  them in one transaction, where a record never replaces a row with a higher
  version (a crash between a flush's commit and its truncation leaves records
  the index already has), and empties the log.
* Power loss: only about the last second of acknowledged writes can be lost,
  like redis's ``appendfsync everysec``.  Every second the worker calls
  :meth:`Store.flush`, which moves every pending put into the index, then
  :meth:`Store.sync`, which makes the index durable (a WAL checkpoint, which
  fsyncs the WAL and the database, only if something was committed since the
  last one) and then fdatasyncs the log (so its truncation is durable too, and
  applied records cannot come back).  Whatever was acknowledged before a tick is
  durable once the tick is done.  Without the timer, values are only as durable
  as SQLite's NORMAL commits.

Versions: the counter lives in memory.  A put does not persist it, because the
new row (or log record) itself records the highest version issued; only when a
row is deleted (by :meth:`Store.delete` or by recovery) is the counter written
to ``meta``, in the same transaction.  On open, after the log is replayed, the
counter is therefore ``max(meta.version, max(entries.version))`` (and at least
the highest version in the log), which is never below any version issued by an
acknowledged write.  This saves writing a second page (the meta row) on every
put, which measured about a third of a put's cost.

Crash safety: a file is fsynced and renamed into ``objects/`` (and the directory
fsynced) *before* its index row is committed, so a committed row always points
at a durable object.  A crash between the two leaves an unreferenced object,
which the next open deletes (see :class:`Recovery`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import sqlite3
import struct
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import attrs

from dsml.errors import ChecksumMismatch, DsmlError, NotFound
from dsml.fsutil import PRIVATE_FILE, mkdir_private, private_dir, private_file
from dsml.fsutil import fsync_dir as _fsync_dir
from dsml.fsutil import prefix_end as _prefix_end
from dsml.protocol.limits import DEFAULT_VALUE_MAX
from dsml.sqlitedb import SYNC_LEVELS, Schema, open_database, sync_level, transaction

__all__ = [
    "ChecksumMismatch",
    "DiskFull",
    "FileWriter",
    "IndexEntry",
    "NotFound",
    "Recovery",
    "Rehash",
    "Stale",
    "Store",
    "StoreError",
    "TooLarge",
    "WrongKind",
]

SCHEMA_VERSION = 1

#: Bytes of recently used values kept in memory (see Store.get_value).
VALUE_CACHE_BYTES = 32 * 1024 * 1024

#: Bytes read at a time when a copy is re-hashed (:meth:`Store.verifier`).
_HASH_CHUNK = 1024 * 1024

#: errnos that mean "no room left": a full disk or an exhausted quota.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

#: SQLite's primary result code for "database or disk is full".
_SQLITE_FULL = 13

_TABLES = (
    "CREATE TABLE IF NOT EXISTS entries("
    " key TEXT PRIMARY KEY, kind TEXT NOT NULL, size INTEGER NOT NULL,"
    " sha256 TEXT NOT NULL, version INTEGER NOT NULL, mtime REAL NOT NULL,"
    " object TEXT, value BLOB) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value) WITHOUT ROWID",
)
_SCHEMA = Schema(version=SCHEMA_VERSION, tables=_TABLES, meta=(("version", 0),))

_SELECT_OLD = "SELECT size, object, version FROM entries WHERE key = ?"
# REPLACE rather than an upsert: the row is rewritten whole either way and the
# statement is shorter; there are no triggers or foreign keys it could upset.
_REPLACE = "REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_SET_VERSION = "UPDATE meta SET value = ? WHERE name = 'version'"
_STAT = "SELECT kind, size, sha256, version, mtime FROM entries WHERE key = ?"
_GET = "SELECT kind, size, sha256, version, mtime, object, value FROM entries WHERE key = ?"
_DELETE = "DELETE FROM entries WHERE key = ? RETURNING kind, size, sha256, version, mtime, object"

# list(): a key range on the primary key, so SQLite does an index SEARCH, never a SCAN.
_LIST_COLS = "SELECT key, kind, size, sha256, version, mtime FROM entries WHERE "
_LIST = {
    (False, False): _LIST_COLS + "key >= ? ORDER BY key LIMIT ?",
    (False, True): _LIST_COLS + "key >= ? AND key < ? ORDER BY key LIMIT ?",
    (True, False): _LIST_COLS + "key > ? ORDER BY key LIMIT ?",
    (True, True): _LIST_COLS + "key > ? AND key < ? ORDER BY key LIMIT ?",
}

_INVENTORY_PAGE = 1000

#: The SQLite index, under the store's root (opened by :func:`dsml.sqlitedb.open_database`).
INDEX_NAME = "index.sqlite3"

#: The values log, under the store's root.
LOG_NAME = "values.log"

#: How an object's temporary file is created (0600, see :data:`dsml.fsutil.PRIVATE_FILE`).
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

#: A log record's header: total length (header included), crc32 of everything
#: after the crc field, version, mtime, key length, value length.  The key's
#: UTF-8 bytes and then the value follow.
_REC = struct.Struct("<IIQdII")
_REC_SIZE = _REC.size
_REC_LEN_CRC = struct.Struct("<II")  # the first two fields ...
_REC_TAIL = struct.Struct("<QdII")  # ... and the rest, which the crc covers

# Replaying the log: a record replaces a row only if it is newer.  A record older
# than its key's row was already applied by a flush whose truncation a crash cut off.
_REPLAY = (
    "INSERT INTO entries VALUES (?, 'value', ?, ?, ?, ?, NULL, ?) ON CONFLICT(key) DO UPDATE"
    " SET kind = 'value', size = excluded.size, sha256 = excluded.sha256,"
    " version = excluded.version, mtime = excluded.mtime, object = NULL,"
    " value = excluded.value WHERE excluded.version > entries.version"
)

_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class StoreError(DsmlError):
    """A store operation failed; ``code`` is the wire error code, ``message`` one line.

    A key that holds nothing raises the shared :class:`dsml.errors.NotFound`, a file whose
    sha256 is not the announced one :class:`dsml.errors.ChecksumMismatch`: both are
    DsmlErrors but not StoreErrors.  The subclasses below are the store's own.
    """


class WrongKind(StoreError):
    """The key holds a file where a value was asked for (or the other way round)."""

    code = "wrong-kind"


class Stale(StoreError):
    """A write carries a version older than the one the key already has."""

    code = "stale-version"


class TooLarge(StoreError):
    """A value is larger than the store's ``value_max``."""

    code = "too-large"


class DiskFull(StoreError):
    """The disk (or the quota) ran out of space while writing."""

    code = "disk-full"


class IndexEntry(NamedTuple):
    """What the index knows about one key.

    A NamedTuple, not an attrs class: one is made per value write, and a frozen attrs
    instance measured twice the cost to create (it sets each field through
    object.__setattr__).
    """

    key: str
    kind: str  #: "file" or "value"
    size: int
    sha256: str  #: 64 lowercase hex digits
    version: int
    mtime: float  #: seconds since the epoch, when this version was written


@attrs.frozen
class Recovery:
    """What the last open cleaned up after a crash."""

    tmp_removed: int = 0  #: entries found (and removed) in tmp/
    orphans_removed: int = 0  #: objects no index row referenced (removed)
    missing_objects: int = 0  #: index rows whose object was gone (rows removed)
    log_records_replayed: int = 0  #: good records read from values.log (and applied)
    log_bytes_dropped: int = 0  #: bytes of a torn or corrupt tail cut off values.log


def _db_error(exc: sqlite3.Error, key: str) -> Exception:
    """Translate SQLite's "disk is full" into DiskFull; leave anything else alone."""
    if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "is full" in str(exc):
        return DiskFull(f"disk full while storing key {key!r}")
    return exc


class FileWriter:
    """One file being received for ``key``: write chunks, prepare, then commit or abort.

    ``write``, ``commit`` and ``abort`` run on the reactor thread; ``prepare``
    (flush, fsync, rename into ``objects/``) is meant for a worker thread.
    """

    def __init__(self, store: Store, key: str, version: int | None = None) -> None:
        """Create the temp file; use :meth:`Store.begin_file` rather than this."""
        self.key = key
        self.version = version
        self._store = store
        self._tmp_path = store.root / "tmp" / uuid.uuid4().hex
        # The key only contributes a hash: the name is safe whatever the key is,
        # and the uuid keeps two writers of one key apart.
        name = hashlib.sha256(key.encode()).hexdigest()[:40] + "-" + uuid.uuid4().hex
        self._object = name
        self._obj_dir = store.root / "objects" / name[:2]
        self._obj_path = self._obj_dir / name
        self._hasher = hashlib.sha256()
        self._size = 0
        self._digest: str | None = None
        # States: open -> preparing -> prepared -> committed, or -> aborted.
        # The lock only guards transitions, because prepare() runs in another
        # thread and abort() may come from the reactor while it is running.
        self._lock = threading.Lock()
        self._state = "open"
        try:
            # 0600 whatever the umask: the object is this file, renamed.
            fd = os.open(self._tmp_path, _NEW_FILE, PRIVATE_FILE)
            self._file: BinaryIO = os.fdopen(fd, "wb")
        except OSError as e:
            self._state = "aborted"
            raise self._os_error(e) from e

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    @property
    def sha256(self) -> str:
        """Hex sha256 of the bytes written so far."""
        if self._digest is not None:
            return self._digest
        return self._hasher.hexdigest()

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; raise DiskFull (after cleaning up) if the disk is full."""
        if self._state != "open":
            raise ValueError(f"writer for key {self.key!r} is {self._state}")
        try:
            self._file.write(chunk)
        except OSError as e:
            self.abort()
            raise self._os_error(e) from e
        self._hasher.update(chunk)
        self._size += len(chunk)

    def prepare(self) -> None:
        """Flush, fsync and move the data into ``objects/``; thread-safe, no SQLite.

        After this the object is durable but not yet in the index; :meth:`commit`
        publishes it.  Raises DiskFull (after cleaning up) if the disk is full.
        """
        with self._lock:
            if self._state != "open":
                raise ValueError(f"writer for key {self.key!r} is {self._state}")
            self._state = "preparing"
        try:
            f = self._file
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.rename(self._tmp_path, self._obj_path)
            _fsync_dir(self._obj_dir)
        except OSError as e:
            with self._lock:
                self._state = "aborted"
            self._remove()
            raise self._os_error(e) from e
        with self._lock:
            aborted = self._state == "aborted"  # abort() came in while we worked
            if not aborted:
                self._digest = self._hasher.hexdigest()
                self._state = "prepared"
        if aborted:
            self._remove()
            raise ValueError(f"writer for key {self.key!r} was aborted")

    def commit(self, expected_sha256: str | None = None) -> IndexEntry:
        """Publish the prepared file as the new version of the key and return its entry.

        If ``expected_sha256`` is given and differs, the object is removed, the
        key keeps its previous version, and ChecksumMismatch is raised.
        """
        if self._state != "prepared":
            raise ValueError(f"writer for key {self.key!r} is {self._state}, not prepared")
        digest = self._digest
        assert digest is not None
        if expected_sha256 is not None and expected_sha256.lower() != digest:
            self.abort()
            raise ChecksumMismatch(
                f"checksum mismatch for key {self.key!r}: "
                f"expected {expected_sha256}, received {digest}"
            )
        try:
            entry = self._store._commit_file(
                self.key, self._size, digest, self._object, self.version
            )
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return entry

    def abort(self) -> None:
        """Throw the file away; idempotent, and a no-op once committed."""
        with self._lock:
            state = self._state
            if state in ("aborted", "committed"):
                return
            self._state = "aborted"
        if state == "preparing":
            return  # prepare() sees the new state when it finishes and cleans up
        self._remove()

    def _remove(self) -> None:
        """Close the temp file and delete it and the object, wherever the data is."""
        try:
            self._file.close()
        except OSError:
            pass  # a failed flush on close; the file is going away anyway
        for path in (self._tmp_path, self._obj_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _os_error(self, exc: OSError) -> Exception:
        """Translate ENOSPC/EDQUOT into DiskFull; leave any other OSError alone."""
        if exc.errno in _FULL_ERRNOS:
            return DiskFull(f"disk full while writing key {self.key!r}")
        return exc


class Rehash:
    """A re-hash of one stored copy, ready to run in any thread (see :meth:`Store.verifier`)."""

    def __init__(self, entry: IndexEntry, body: BinaryIO | None) -> None:
        self.entry = entry
        self._body = body

    def __call__(self) -> bool:
        """Read the copy to its end: True if it still hashes to its entry's sha256."""
        body, self._body = self._body, None
        if body is None:
            return False
        digest = hashlib.sha256()
        size = 0
        try:
            with body:
                while chunk := body.read(_HASH_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError:
            return False
        return size == self.entry.size and digest.hexdigest() == self.entry.sha256

    def close(self) -> None:
        """Give the copy up unread."""
        body, self._body = self._body, None
        if body is not None:
            body.close()


class Store:
    """The worker's files and values: an SQLite index, one object file per file,
    and a log of the value puts not yet applied to the index."""

    def __init__(
        self,
        root: Path | str,
        value_max: int = DEFAULT_VALUE_MAX,
        synchronous: str = "NORMAL",
        flush_every: int = 1000,
        flush_bytes: int = 16 << 20,
    ) -> None:
        """Open (creating if needed) the store at ``root`` and clean up after any crash.

        ``synchronous`` is SQLite's level for ordinary commits; NORMAL in WAL mode
        survives a process crash.  File commits always use at least FULL.
        ``flush_every`` and ``flush_bytes`` bound the values log: once it holds
        that many records, or that many bytes of values, :meth:`flush` runs.
        """
        synchronous = sync_level(synchronous)
        if flush_every < 1:
            raise ValueError(f"flush_every must be at least 1, not {flush_every!r}")
        self.root = Path(root)
        self.value_max = value_max
        self.flush_every = flush_every
        self.flush_bytes = flush_bytes
        # Value puts not yet in the index, newest per key; always values, and always
        # newer than the key's row, since every other write flushes first.
        self._pending: dict[str, tuple[IndexEntry, bytes]] = {}
        # Recently read or written values, most recent last, up to cache_max bytes:
        # a hot value is served from memory instead of an SQLite query.  Every write
        # of a key (put, file, delete) updates or drops its entry, so it is never stale.
        self._cache: OrderedDict[str, tuple[IndexEntry, bytes]] = OrderedDict()
        self._cache_bytes = 0
        self.cache_max = VALUE_CACHE_BYTES
        self._log_fd = -1
        self._log_size = 0  # bytes in values.log, all of them whole records
        self._log_records = 0  # records appended since the last flush
        self._log_bytes = 0  # value bytes appended since the last flush
        self._dirty = False  # something was committed with NORMAL since the last sync()
        self._closed = False
        self._sync = synchronous
        # File commits need FULL so a power loss cannot drop the row of a durable
        # object (recovery would then delete the object as an orphan).
        self._file_sync = "FULL" if SYNC_LEVELS.index(synchronous) < 2 else synchronous
        self._count = 0
        self._bytes = 0

        # Owner-only (0700), whatever the umask; an older install's open root is
        # tightened with everything in it (dsml.fsutil.private_dir).
        created = False
        for path in (self.root, self.root / "objects", self.root / "tmp"):
            if not path.is_dir():
                created = True
            private_dir(path)
        if created:
            _fsync_dir(self.root)

        db, meta = open_database(
            self.root / INDEX_NAME,
            what="store",
            schema=_SCHEMA,
            synchronous=synchronous,
            error=StoreError,
        )
        self._db = db
        # Completed from the entries table once recovery is done (below).
        self._version: int = meta["version"]
        #: Whether this store has ever served a cluster (see :meth:`mark_joined`).
        self.joined: bool = bool(meta.get("joined", 0))
        try:
            log_path = self.root / LOG_NAME
            log_new = not log_path.exists()
            self._log_fd = private_file(log_path, os.O_WRONLY | os.O_APPEND)
            if log_new:
                _fsync_dir(self.root)
            # The log first: recovery below must see the index complete.
            replayed, dropped, log_top = self._replay_log(log_path)
            self.recovered = attrs.evolve(
                self._recover(), log_records_replayed=replayed, log_bytes_dropped=dropped
            )
            count, total, top = db.execute(
                "SELECT count(*), total(size), max(version) FROM entries"
            ).fetchone()
            self._count = count
            self._bytes = int(total)
            # See the module docstring: puts do not update meta's counter.
            self._version = max(self._version, top or 0, log_top)
        except BaseException:
            if self._log_fd >= 0:
                os.close(self._log_fd)
            db.close()
            raise

    # -- opening -----------------------------------------------------------------------

    def _replay_log(self, path: Path) -> tuple[int, int, int]:
        """Apply the good records of the values log to the index, then empty the log.

        Reads records up to the first short or corrupt one (a write a crash cut
        off) and cuts the log there.  The newest record of each key replaces the
        key's row unless that row is newer.  Returns the number of good records,
        the bytes dropped, and the highest version seen.
        """
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            return 0, 0, 0
        view = memoryview(data)
        end = len(data)
        rows: dict[str, tuple[str, int, str, int, float, bytes]] = {}
        off = records = top = 0
        while end - off >= _REC_SIZE:
            total, crc, version, mtime, klen, vlen = _REC.unpack_from(data, off)
            if total != _REC_SIZE + klen + vlen or total > end - off:
                break
            if zlib.crc32(view[off + 8 : off + total]) != crc:
                break
            start = off + _REC_SIZE
            try:
                key = data[start : start + klen].decode()
            except UnicodeDecodeError:
                break
            value = data[start + klen : off + total]
            old = rows.get(key)
            if old is None or version > old[3]:
                rows[key] = (key, vlen, hashlib.sha256(value).hexdigest(), version, mtime, value)
            top = max(top, version)
            records += 1
            off += total
        dropped = end - off
        if dropped:
            # Cut the torn tail now, so that records appended after a failure
            # below would still follow good ones.
            os.ftruncate(self._log_fd, off)
        if rows:
            db = self._db
            # At least FULL: the log is emptied right after, so this commit must
            # not be one a power loss can undo.
            db.execute(f"PRAGMA synchronous={self._file_sync}")
            try:
                with transaction(db):
                    db.executemany(_REPLAY, rows.values())
            finally:
                db.execute(f"PRAGMA synchronous={self._sync}")
        os.ftruncate(self._log_fd, 0)
        return records, dropped, top

    def _recover(self) -> Recovery:
        """Empty tmp/, delete unreferenced objects, drop rows whose object is gone."""
        tmp_removed = 0
        with os.scandir(self.root / "tmp") as it:
            for item in it:
                if item.is_dir(follow_symlinks=False):
                    shutil.rmtree(item.path)
                else:
                    os.unlink(item.path)
                tmp_removed += 1

        referenced = {
            name
            for (name,) in self._db.execute("SELECT object FROM entries WHERE object IS NOT NULL")
        }
        objects = self.root / "objects"
        orphans = 0
        found: set[str] = set()
        subdirs: set[str] = set()
        with os.scandir(objects) as it:
            for sub in it:
                if not sub.is_dir(follow_symlinks=False):
                    os.unlink(sub.path)  # nothing we write lives directly in objects/
                    orphans += 1
                    continue
                subdirs.add(sub.name)
                with os.scandir(sub.path) as files:
                    for f in files:
                        if f.name in referenced and f.name[:2] == sub.name:
                            found.add(f.name)
                        elif f.is_dir(follow_symlinks=False):
                            shutil.rmtree(f.path)
                            orphans += 1
                        else:
                            os.unlink(f.path)
                            orphans += 1

        # Create all 256 object directories up front (and make them durable once),
        # so prepare() never has to create one and fsync objects/ as well.
        missing_dirs = {f"{i:02x}" for i in range(256)} - subdirs
        for name in missing_dirs:
            mkdir_private(objects / name)
        if missing_dirs:
            _fsync_dir(objects)

        # A row without its object can only come from outside interference (the
        # object is durable before its row is committed).  It cannot be served,
        # and must not be reported to the master, so drop it.
        missing = referenced - found
        if missing:
            self.flush()  # a no-op on open, where the log was replayed just before
            with transaction(self._db):
                # Save the counter first: a dropped row might hold the highest version.
                self._db.execute(
                    "UPDATE meta SET value = max(value, "
                    "(SELECT coalesce(max(version), 0) FROM entries)) WHERE name = 'version'"
                )
                self._db.executemany(
                    "DELETE FROM entries WHERE object = ?", [(name,) for name in missing]
                )
        return Recovery(tmp_removed, orphans, len(missing))

    # -- writing -----------------------------------------------------------------------

    def _write_row(
        self,
        key: str,
        kind: str,
        size: int,
        digest: str,
        obj: str | None,
        value: bytes | None,
        requested: int | None = None,
    ) -> IndexEntry:
        """Replace the key's row with a new version.

        Updates the in-memory totals and unlinks the previous object, if any,
        after the commit.
        """
        # Pending puts first, so that none of them can land after this write.
        self.flush()
        self._cache_drop(key)
        mtime = time.time()
        execute = self._db.execute
        try:
            # Two autocommit statements, no BEGIN/COMMIT: the SELECT only reads,
            # the REPLACE is the one write (the new row also carries the counter),
            # and nothing else runs on this connection in between.
            old = execute(_SELECT_OLD, (key,)).fetchone()
            version = self._allocate(key, old[2] if old is not None else None, requested)
            execute(_REPLACE, (key, kind, size, digest, version, mtime, obj, value))
        except sqlite3.Error as e:
            raise _db_error(e, key) from e
        self._dirty = True
        if old is None:
            self._count += 1
            self._bytes += size
        else:
            self._bytes += size - old[0]
            if old[1] is not None:
                self._unlink_object(old[1])
        return IndexEntry(key, kind, size, digest, version, mtime)

    def _allocate(self, key: str, current: int | None, requested: int | None) -> int:
        """The version of a new write of ``key``.

        Without ``requested`` the store's own counter gives the next number.  A cluster
        gives the master's version instead, so every replica of one write carries the
        same number; one older than what the key holds is refused (a late copy must
        never replace a newer write), an equal one rewrites the same version.
        """
        if requested is None:
            version = self._version + 1
        else:
            if current is not None and current > requested:
                raise Stale(
                    f"key {key!r} already has version {current}, newer than {requested}"
                )
            version = requested
        # Bumped before the commit: a failed write just skips a number, never reuses one.
        self._version = max(self._version, version)
        return version

    def put_value(self, key: str, data: bytes, version: int | None = None) -> IndexEntry:
        """Store ``data`` as the value of ``key``, replacing whatever it held.

        Appends one record to the values log and returns; see the module docstring.
        ``version``: the version to store it under (the master's, in a cluster);
        by default the store's own next number.  Raises Stale if the key already
        holds a newer version.
        """
        size = len(data)
        if size > self.value_max:
            raise TooLarge(
                f"value for key {key!r} is {size} bytes, more than the limit of {self.value_max}"
            )
        if type(data) is not bytes:
            data = bytes(data)  # the overlay keeps it: no buffer that may change
        pending = self._pending
        prev = pending.get(key)
        if prev is None:
            # The cache holds only values and drops a key on every change: as good
            # as the index, without a query.
            prev = self._cache.get(key)
        if prev is not None:
            old_size = prev[0].size
            old_version: int | None = prev[0].version
        else:
            try:
                old = self._db.execute(_SELECT_OLD, (key,)).fetchone()
            except sqlite3.Error as e:
                raise _db_error(e, key) from e
            if old is None:
                old_size = -1
                old_version = None
            elif old[1] is not None:
                # The key holds a file.  Write the row directly (after a flush), so
                # the object is unlinked only once the value is in the index.
                digest = hashlib.sha256(data).hexdigest()
                return self._write_row(key, "value", size, digest, None, data, version)
            else:
                old_size = old[0]
                old_version = old[2]
        kb = key.encode()
        if version is None:  # the common case of _allocate, inline
            version = self._version = self._version + 1
        else:
            version = self._allocate(key, old_version, version)
        mtime = time.time()
        tail = _REC_TAIL.pack(version, mtime, len(kb), size)
        crc = zlib.crc32(data, zlib.crc32(kb, zlib.crc32(tail)))
        total = _REC_SIZE + len(kb) + size
        record = b"".join((_REC_LEN_CRC.pack(total, crc), tail, kb, data))
        # One write on an O_APPEND descriptor: the record lands whole at the end.
        try:
            written = os.write(self._log_fd, record)
        except OSError as e:
            raise self._append_failed(key, e) from e
        if written != total:
            raise self._append_failed(key, None)
        self._log_size += total
        entry = IndexEntry(key, "value", size, hashlib.sha256(data).hexdigest(), version, mtime)
        pending[key] = (entry, data)
        # The overlay serves it now; a cached older copy must go (the first read after
        # the flush caches it again).
        if key in self._cache:
            self._cache_drop(key)
        if old_size < 0:
            self._count += 1
            self._bytes += size
        else:
            self._bytes += size - old_size
        self._log_records += 1
        self._log_bytes += size
        if self._log_records >= self.flush_every or self._log_bytes >= self.flush_bytes:
            try:
                self.flush()
            except (StoreError, sqlite3.Error, OSError):
                # This put is done: it is in the log and the overlay.  The puts
                # stay pending, and the next flush (the next write's, or the
                # worker's timer) tries again and reports the error.
                pass
        return entry

    def _append_failed(self, key: str, exc: OSError | None) -> Exception:
        """Cut a partly written record off the log; return the error to raise.

        ``exc`` is the write's error, or None for a short write, which a regular
        file only does when it runs out of room.
        """
        try:
            # So that the next record follows whole ones, not a torn one.
            os.ftruncate(self._log_fd, self._log_size)
        except OSError:
            pass  # then the next open cuts the log at the torn record
        if exc is None or exc.errno in _FULL_ERRNOS:
            return DiskFull(f"disk full while storing key {key!r}")
        return exc

    def flush(self) -> None:
        """Apply the pending value puts to the index in one transaction; empty the log.

        Cheap when nothing is pending.  On failure (say the disk is full) the puts
        stay pending and in the log, readable as before.
        """
        pending = self._pending
        if pending:
            rows = [
                (key, "value", e.size, e.sha256, e.version, e.mtime, None, data)
                for key, (e, data) in pending.items()
            ]
            db = self._db
            try:
                with transaction(db):
                    db.executemany(_REPLACE, rows)
            except sqlite3.Error as e:
                raise _db_error(e, rows[0][0]) from e
            # Just written, so likely read (or rewritten) again soon: keep them cached.
            for key, item in pending.items():
                self._cache_put(key, item)
            pending.clear()
            self._dirty = True
        if self._log_size:
            # If this fails, the records stay (the index has them: replaying them
            # is a no-op) and the next flush tries again.
            os.ftruncate(self._log_fd, 0)
            self._log_size = 0
        self._log_records = 0
        self._log_bytes = 0

    def sync(self) -> None:
        """Make every acknowledged write durable against a power loss.

        Checkpoints the index's WAL (fsyncing it and the database) if anything
        was committed with synchronous NORMAL since the last call, then fdatasyncs
        the values log.  The worker calls :meth:`flush` and this every second.
        """
        if self._dirty:
            # PASSIVE never waits, and with the exclusive lock nothing can hold
            # it back: every frame is checkpointed.
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self._dirty = False
        _fdatasync(self._log_fd)

    def begin_file(self, key: str, version: int | None = None) -> FileWriter:
        """Start receiving a file for ``key``; nothing changes until the writer commits.

        ``version``: as for :meth:`put_value`.
        """
        return FileWriter(self, key, version)

    def _commit_file(
        self, key: str, size: int, digest: str, obj: str, version: int | None = None
    ) -> IndexEntry:
        """Index a prepared object; called by :meth:`FileWriter.commit`."""
        # Pending puts go first, with the ordinary level: the FULL commit of the
        # file's row below syncs their WAL frames as well.
        self.flush()
        if self._file_sync == self._sync:
            return self._write_row(key, "file", size, digest, obj, None, version)
        self._db.execute(f"PRAGMA synchronous={self._file_sync}")
        try:
            return self._write_row(key, "file", size, digest, obj, None, version)
        finally:
            self._db.execute(f"PRAGMA synchronous={self._sync}")

    def delete(self, key: str) -> IndexEntry:
        """Remove ``key`` and return the entry it held; NotFound if it held nothing."""
        self.flush()
        self._cache_drop(key)
        db = self._db
        try:
            with transaction(db):
                # fetchall(), not fetchone(): the statement only completes once
                # RETURNING has produced all its rows.
                rows = db.execute(_DELETE, (key,)).fetchall()
                if rows:
                    # The deleted row may have held the highest version: persist the
                    # counter with the delete so a restart cannot issue it again.
                    db.execute(_SET_VERSION, (self._version,))
        except sqlite3.Error as e:
            raise _db_error(e, key) from e
        if not rows:
            raise NotFound(f"key {key!r} not found")
        self._dirty = True
        kind, size, digest, version, mtime, obj = rows[0]
        self._count -= 1
        self._bytes -= size
        if obj is not None:
            self._unlink_object(obj)
        return IndexEntry(key, kind, size, digest, version, mtime)

    def _unlink_object(self, name: str) -> None:
        """Delete an object no row references any more.

        No directory fsync: if a crash forgets the unlink, recovery removes the
        object as an orphan.
        """
        try:
            os.unlink(self.root / "objects" / name[:2] / name)
        except FileNotFoundError:
            pass

    # -- reading -----------------------------------------------------------------------

    def stat(self, key: str) -> IndexEntry:
        """Return the entry of ``key``; NotFound if it holds nothing."""
        pending = self._pending.get(key)
        if pending is not None:
            return pending[0]
        row = self._db.execute(_STAT, (key,)).fetchone()
        if row is None:
            raise NotFound(f"key {key!r} not found")
        return IndexEntry(key, *row)

    def get_value(self, key: str) -> tuple[IndexEntry, bytes]:
        """Return the entry and bytes of a value; NotFound, or WrongKind for a file."""
        pending = self._pending.get(key)
        if pending is not None:
            return pending
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        row = self._db.execute(_GET, (key,)).fetchone()
        if row is None:
            raise NotFound(f"key {key!r} not found")
        kind, size, digest, version, mtime, _obj, value = row
        if kind != "value":
            raise WrongKind(f"key {key!r} holds a {kind}, not a value")
        found = IndexEntry(key, kind, size, digest, version, mtime), value
        self._cache_put(key, found)
        return found

    def _cache_put(self, key: str, item: tuple[IndexEntry, bytes]) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            self._cache_bytes -= len(old[1])
        size = len(item[1])
        if size > self.cache_max // 8:
            return  # a few large values must not push out many small ones
        self._cache[key] = item
        self._cache_bytes += size
        while self._cache_bytes > self.cache_max:
            _, (_, evicted) = self._cache.popitem(last=False)
            self._cache_bytes -= len(evicted)

    def _cache_drop(self, key: str) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            self._cache_bytes -= len(old[1])

    def open_read(self, key: str) -> tuple[IndexEntry, BinaryIO]:
        """Return the entry of ``key`` and a binary stream of its content.

        A file's stream is its object opened for reading: it keeps reading this
        version even if a later write replaces (and unlinks) it.  The caller closes it.
        """
        pending = self._pending.get(key)
        if pending is not None:
            return pending[0], io.BytesIO(pending[1])
        row = self._db.execute(_GET, (key,)).fetchone()
        if row is None:
            raise NotFound(f"key {key!r} not found")
        kind, size, digest, version, mtime, obj, value = row
        entry = IndexEntry(key, kind, size, digest, version, mtime)
        if obj is None:
            return entry, io.BytesIO(value)
        return entry, open(self.root / "objects" / obj[:2] / obj, "rb")

    # -- checking ----------------------------------------------------------------------

    def verifier(self, key: str) -> tuple[IndexEntry, Rehash]:
        """The entry of ``key`` and a :class:`Rehash` of its content.

        The lookup runs here (the reactor thread, like every index access); the rehash
        touches no SQLite, so it may run in any thread: calling it re-reads the object
        (or the value) and returns True if its sha256 and size match the entry's, False
        if they do not or the object is gone.  Call it once, or ``close()`` it.
        NotFound if ``key`` holds nothing.
        """
        try:
            entry, body = self.open_read(key)
        except FileNotFoundError:  # the object is gone: a re-hash fails
            entry = self.stat(key)
            return entry, Rehash(entry, None)
        return entry, Rehash(entry, body)

    def verify(self, key: str) -> bool:
        """Re-hash ``key``'s content now, in the caller's thread: True if it still
        matches the sha256 stored with it (False: corrupt, or its object is gone).

        Blocks for the whole read: for a large file call :meth:`verifier` on the
        reactor thread and run its function in a thread instead.  NotFound if ``key``
        holds nothing.
        """
        return self.verifier(key)[1]()

    def mark_joined(self) -> None:
        """Remember, durably, that this store serves a cluster: from now on its worker
        stores only writes whose version the master granted (a standalone store, never
        registered with a master, numbers its writes itself)."""
        if self.joined:
            return
        with transaction(self._db):
            self._db.execute("REPLACE INTO meta VALUES ('joined', 1)")
        self.joined = True

    def forget(self, key: str, version: int) -> IndexEntry | None:
        """Remove ``key`` (a copy found corrupt) if it still holds ``version``; return
        the entry removed, or None if the key holds another version or nothing.  Like
        :meth:`delete`, no tombstone is kept: the store simply no longer has the key."""
        try:
            if self.stat(key).version != version:
                return None
            return self.delete(key)
        except NotFound:
            return None

    def list(
        self, prefix: str = "", after: str | None = None, limit: int = 1000
    ) -> list[IndexEntry]:
        """Return up to ``limit`` entries whose key starts with ``prefix`` and is > ``after``.

        Sorted by key in UTF-8 byte order; one range search of the primary key,
        after a :meth:`flush` so pending puts are listed too.
        """
        if limit <= 0:
            return []
        self.flush()
        # Python compares str by code point, which is the same order as UTF-8 bytes.
        if after is not None and after >= prefix:
            low_exclusive, low = True, after
        else:
            low_exclusive, low = False, prefix
        high = _prefix_end(prefix)
        params: tuple[object, ...] = (low, limit) if high is None else (low, high, limit)
        rows = self._db.execute(_LIST[low_exclusive, high is not None], params)
        return [IndexEntry(*row) for row in rows]

    def inventory(self) -> Iterator[IndexEntry]:
        """Yield every entry, in key order.

        Reads page by page rather than holding one cursor open, so writes may
        interleave with a slow consumer.
        """
        after: str | None = None
        while True:
            page = self.list(after=after, limit=_INVENTORY_PAGE)
            yield from page
            if len(page) < _INVENTORY_PAGE:
                return
            after = page[-1].key

    @property
    def count(self) -> int:
        """Number of keys stored."""
        return self._count

    @property
    def stored_bytes(self) -> int:
        """Total size of all files and values stored."""
        return self._bytes

    @property
    def last_version(self) -> int:
        """The last version number issued."""
        return self._version

    def close(self) -> None:
        """Flush, then close the log and the index; the store is unusable afterwards.

        Idempotent.  If the flush fails, the pending puts stay in the log and the
        next open applies them.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            os.close(self._log_fd)
            self._db.close()
