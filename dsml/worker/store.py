"""The worker's durable on-disk store of files and values.

Layout under ``root``::

    index.sqlite3           one row per key (entries) plus a little metadata (meta)
    objects/<xx>/<name>     file contents; <name> is derived from sha256(key) + a uuid
    tmp/                    files being written; emptied on every open

Files and values share one key space.  Every write of a key replaces what was
there and gets a new version from a per-store counter that never goes back, not
even across deletes and restarts.  A key is never used as a path: object names
are built from a hash of the key and a random uuid, so any string is safe.

Everything here is plain synchronous code run on the reactor thread, except
:meth:`FileWriter.prepare`, which does the slow flush/fsync/rename and is meant
to run in a worker thread; it touches no SQLite.

Versions: the counter lives in memory.  A put does not persist it, because the
new row itself records the highest version issued; only when a row is deleted
(by :meth:`Store.delete` or by recovery) is the counter written to ``meta``, in
the same transaction.  On open the counter is therefore
``max(meta.version, max(entries.version))``, which is never below any version
issued by a committed write.  This saves writing a second page (the meta row)
on every put, which measured about a third of a put's cost.

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
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import attrs

from dsml.protocol.limits import DEFAULT_VALUE_MAX

__all__ = [
    "ChecksumMismatch",
    "DiskFull",
    "Entry",
    "FileWriter",
    "NotFound",
    "Recovery",
    "Store",
    "StoreError",
    "TooLarge",
    "WrongKind",
]

SCHEMA_VERSION = 1

#: errnos that mean "no room left": a full disk or an exhausted quota.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

#: SQLite's primary result code for "database or disk is full".
_SQLITE_FULL = 13

_SYNC_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries("
    " key TEXT PRIMARY KEY, kind TEXT NOT NULL, size INTEGER NOT NULL,"
    " sha256 TEXT NOT NULL, version INTEGER NOT NULL, mtime REAL NOT NULL,"
    " object TEXT, value BLOB) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value) WITHOUT ROWID",
)

_SELECT_OLD = "SELECT size, object FROM entries WHERE key = ?"
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


class StoreError(Exception):
    """A store operation failed; ``code`` is the wire error code, ``message`` one line."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(StoreError):
    """The key holds nothing."""

    code = "not-found"


class WrongKind(StoreError):
    """The key holds a file where a value was asked for (or the other way round)."""

    code = "wrong-kind"


class TooLarge(StoreError):
    """A value is larger than the store's ``value_max``."""

    code = "too-large"


class ChecksumMismatch(StoreError):
    """The sha256 of the received file is not the one the sender announced."""

    code = "checksum-mismatch"


class DiskFull(StoreError):
    """The disk (or the quota) ran out of space while writing."""

    code = "disk-full"


@attrs.frozen
class Entry:
    """What the index knows about one key."""

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


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new child) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prefix_end(prefix: str) -> str | None:
    """Return the smallest string greater than every string starting with ``prefix``.

    That is the prefix with its last character incremented, after dropping
    trailing U+10FFFF (which has no successor); None if there is no such bound
    (empty prefix, or all U+10FFFF).  Code-point order is UTF-8 byte order, which
    is how SQLite compares TEXT, so the bound is right for the index too.
    """
    for i in range(len(prefix) - 1, -1, -1):
        c = ord(prefix[i])
        if c < 0x10FFFF:
            c += 1
            if c == 0xD800:  # surrogates cannot be encoded in UTF-8; skip them
                c = 0xE000
            return prefix[:i] + chr(c)
    return None


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

    def __init__(self, store: Store, key: str) -> None:
        """Create the temp file; use :meth:`Store.begin_file` rather than this."""
        self.key = key
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
            self._file: BinaryIO = open(self._tmp_path, "xb")
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

    def commit(self, expected_sha256: str | None = None) -> Entry:
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
            entry = self._store._commit_file(self.key, self._size, digest, self._object)
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


class Store:
    """The worker's files and values: an SQLite index plus one object file per file."""

    def __init__(
        self,
        root: Path | str,
        value_max: int = DEFAULT_VALUE_MAX,
        synchronous: str = "NORMAL",
    ) -> None:
        """Open (creating if needed) the store at ``root`` and clean up after any crash.

        ``synchronous`` is SQLite's level for ordinary commits; NORMAL in WAL mode
        survives a process crash.  File commits always use at least FULL.
        """
        synchronous = synchronous.upper()
        if synchronous not in _SYNC_LEVELS:
            raise ValueError(f"synchronous must be one of {_SYNC_LEVELS}, not {synchronous!r}")
        self.root = Path(root)
        self.value_max = value_max
        self._sync = synchronous
        # File commits need FULL so a power loss cannot drop the row of a durable
        # object (recovery would then delete the object as an orphan).
        self._file_sync = "FULL" if _SYNC_LEVELS.index(synchronous) < 2 else synchronous
        self._count = 0
        self._bytes = 0

        created = False
        for path in (self.root, self.root / "objects", self.root / "tmp"):
            if not path.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                created = True
        if created:
            _fsync_dir(self.root)

        db = sqlite3.connect(
            self.root / "index.sqlite3", isolation_level=None, check_same_thread=False
        )
        self._db = db
        try:
            # EXCLUSIVE before WAL: then SQLite keeps the WAL index in memory and
            # needs no -shm file; nobody else may open the index anyway.
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            self._init_schema()
            self.recovered = self._recover()
            count, total, top = db.execute(
                "SELECT count(*), total(size), max(version) FROM entries"
            ).fetchone()
            self._count = count
            self._bytes = int(total)
            # See the module docstring: puts do not update meta's counter.
            self._version = max(self._version, top or 0)
        except BaseException:
            db.close()
            raise

    # -- opening -----------------------------------------------------------------------

    def _init_schema(self) -> None:
        """Create the tables on first open, check the schema, and load the version counter."""
        db = self._db
        db.execute("BEGIN")
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        db.execute("INSERT OR IGNORE INTO meta VALUES ('version', 0)")
        db.execute("COMMIT")
        meta = dict(db.execute("SELECT name, value FROM meta"))
        if meta["schema"] != SCHEMA_VERSION:
            raise StoreError(
                f"store {str(self.root)!r} has schema {meta['schema']!r}, "
                f"this code knows {SCHEMA_VERSION}"
            )
        # Completed from the entries table once recovery is done (see __init__).
        self._version: int = meta["version"]

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
            (objects / name).mkdir()
        if missing_dirs:
            _fsync_dir(objects)

        # A row without its object can only come from outside interference (the
        # object is durable before its row is committed).  It cannot be served,
        # and must not be reported to the master, so drop it.
        missing = referenced - found
        if missing:
            self._db.execute("BEGIN")
            # Save the counter first: a dropped row might hold the highest version.
            self._db.execute(
                "UPDATE meta SET value = max(value, "
                "(SELECT coalesce(max(version), 0) FROM entries)) WHERE name = 'version'"
            )
            self._db.executemany(
                "DELETE FROM entries WHERE object = ?", [(name,) for name in missing]
            )
            self._db.execute("COMMIT")
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
    ) -> Entry:
        """Replace the key's row with a new version.

        Updates the in-memory totals and unlinks the previous object, if any,
        after the commit.
        """
        version = self._version + 1
        # Bumped before the commit: a failed write just skips a number, never reuses one.
        self._version = version
        mtime = time.time()
        execute = self._db.execute
        try:
            # Two autocommit statements, no BEGIN/COMMIT: the SELECT only reads,
            # the REPLACE is the one write (the new row also carries the counter),
            # and nothing else runs on this connection in between.
            old = execute(_SELECT_OLD, (key,)).fetchone()
            execute(_REPLACE, (key, kind, size, digest, version, mtime, obj, value))
        except sqlite3.Error as e:
            raise _db_error(e, key) from e
        if old is None:
            self._count += 1
            self._bytes += size
        else:
            self._bytes += size - old[0]
            if old[1] is not None:
                self._unlink_object(old[1])
        return Entry(key, kind, size, digest, version, mtime)

    def put_value(self, key: str, data: bytes) -> Entry:
        """Store ``data`` as the value of ``key``, replacing whatever it held."""
        size = len(data)
        if size > self.value_max:
            raise TooLarge(
                f"value for key {key!r} is {size} bytes, more than the limit of {self.value_max}"
            )
        return self._write_row(key, "value", size, hashlib.sha256(data).hexdigest(), None, data)

    def begin_file(self, key: str) -> FileWriter:
        """Start receiving a file for ``key``; nothing changes until the writer commits."""
        return FileWriter(self, key)

    def _commit_file(self, key: str, size: int, digest: str, obj: str) -> Entry:
        """Index a prepared object; called by :meth:`FileWriter.commit`."""
        if self._file_sync == self._sync:
            return self._write_row(key, "file", size, digest, obj, None)
        self._db.execute(f"PRAGMA synchronous={self._file_sync}")
        try:
            return self._write_row(key, "file", size, digest, obj, None)
        finally:
            self._db.execute(f"PRAGMA synchronous={self._sync}")

    def delete(self, key: str) -> Entry:
        """Remove ``key`` and return the entry it held; NotFound if it held nothing."""
        db = self._db
        try:
            db.execute("BEGIN")
            # fetchall(), not fetchone(): the statement only completes once
            # RETURNING has produced all its rows.
            rows = db.execute(_DELETE, (key,)).fetchall()
            if rows:
                # The deleted row may have held the highest version: persist the
                # counter with the delete so a restart cannot issue it again.
                db.execute(_SET_VERSION, (self._version,))
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise _db_error(e, key) from e
        if not rows:
            raise NotFound(f"key {key!r} not found")
        kind, size, digest, version, mtime, obj = rows[0]
        self._count -= 1
        self._bytes -= size
        if obj is not None:
            self._unlink_object(obj)
        return Entry(key, kind, size, digest, version, mtime)

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

    def stat(self, key: str) -> Entry:
        """Return the entry of ``key``; NotFound if it holds nothing."""
        row = self._db.execute(_STAT, (key,)).fetchone()
        if row is None:
            raise NotFound(f"key {key!r} not found")
        return Entry(key, *row)

    def get_value(self, key: str) -> tuple[Entry, bytes]:
        """Return the entry and bytes of a value; NotFound, or WrongKind for a file."""
        row = self._db.execute(_GET, (key,)).fetchone()
        if row is None:
            raise NotFound(f"key {key!r} not found")
        kind, size, digest, version, mtime, _obj, value = row
        if kind != "value":
            raise WrongKind(f"key {key!r} holds a {kind}, not a value")
        return Entry(key, kind, size, digest, version, mtime), value

    def open_read(self, key: str) -> tuple[Entry, BinaryIO]:
        """Return the entry of ``key`` and a binary stream of its content.

        A file's stream is its object opened for reading: it keeps reading this
        version even if a later write replaces (and unlinks) it.  The caller closes it.
        """
        row = self._db.execute(_GET, (key,)).fetchone()
        if row is None:
            raise NotFound(f"key {key!r} not found")
        kind, size, digest, version, mtime, obj, value = row
        entry = Entry(key, kind, size, digest, version, mtime)
        if obj is None:
            return entry, io.BytesIO(value)
        return entry, open(self.root / "objects" / obj[:2] / obj, "rb")

    def list(self, prefix: str = "", after: str | None = None, limit: int = 1000) -> list[Entry]:
        """Return up to ``limit`` entries whose key starts with ``prefix`` and is > ``after``.

        Sorted by key in UTF-8 byte order; one range search of the primary key.
        """
        if limit <= 0:
            return []
        # Python compares str by code point, which is the same order as UTF-8 bytes.
        if after is not None and after >= prefix:
            low_exclusive, low = True, after
        else:
            low_exclusive, low = False, prefix
        high = _prefix_end(prefix)
        params: tuple[object, ...] = (low, limit) if high is None else (low, high, limit)
        rows = self._db.execute(_LIST[low_exclusive, high is not None], params)
        return [Entry(*row) for row in rows]

    def inventory(self) -> Iterator[Entry]:
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
        """Close the index; the store is unusable afterwards.  Idempotent."""
        self._db.close()
