"""Opening dsml's SQLite files: one way for the job state, the master's state and a
worker's index.

:func:`open_database` owns what the three share: the connection's settings, the lock,
the journal mode, the pragmas, and the schema version kept in a ``meta(name, value)``
table.  What each file holds (its tables, its counters) stays with its owner.

* **One process per file.**  The connection takes SQLite's exclusive lock
  (``locking_mode=EXCLUSIVE``) at once and keeps it for its whole life, so a second
  process opening the same file fails with the owner's error, naming the file, instead of
  writing behind the first one's back.  A process killed with SIGKILL releases the lock,
  and the next open recovers every committed transaction from the WAL.
* **WAL or nothing.**  The lock is taken before WAL mode is set: SQLite then keeps the WAL
  index in memory (no ``-shm`` file).  A file that cannot be put in WAL mode is refused.
  The WAL is truncated back to :data:`JOURNAL_SIZE_LIMIT` after a checkpoint (a big
  reconcile can grow it to tens of MiB).
* **The schema version** is the ``schema`` row of ``meta``.  Opening creates the tables
  if they are missing, seeds ``meta``, and migrates an older file in place, all in one
  transaction: a crash leaves the file whole at its old version.  A version this code
  does not know is refused.
* **Durable names.**  Once the file and its WAL exist, their directory is fsynced.
* **Owner-only.**  The file is created 0600 before SQLite opens it (SQLite would use the
  umask), so its WAL, made with the database's mode, is 0600 too; a missing directory is
  made 0700 (:mod:`dsml.fsutil`).

One connection, no thread of its own: ``check_same_thread=False`` lets an owner hand its
commits to a thread, behind its own lock.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, NamedTuple

import attrs
from twisted.logger import Logger

from .fsutil import PRIVATE_FILE, fsync_dir, makedirs_private, private_file

__all__ = [
    "JOURNAL_SIZE_LIMIT",
    "SYNC_LEVELS",
    "Opened",
    "Schema",
    "open_database",
    "sync_level",
    "transaction",
]

log = Logger()

#: SQLite's ``synchronous`` levels, weakest first.
SYNC_LEVELS: Final = ("OFF", "NORMAL", "FULL", "EXTRA")

#: Bytes the WAL is truncated back to after a checkpoint.
JOURNAL_SIZE_LIMIT: Final = 64 * 1024 * 1024

#: Turns a version-k file into a version-k+1 one, inside the opening transaction.
Migration = Callable[[sqlite3.Connection], None]


def sync_level(level: str) -> str:
    """``level`` in capitals, if it is one of :data:`SYNC_LEVELS`; else ValueError."""
    upper = level.upper()
    if upper not in SYNC_LEVELS:
        raise ValueError(f"synchronous must be one of {SYNC_LEVELS}, not {upper!r}")
    return upper


@attrs.frozen
class Schema:
    """A file's tables, the version they make, and how older versions become it."""

    #: The version this code writes and reads.
    version: int
    #: ``CREATE ... IF NOT EXISTS`` statements, ``meta(name PRIMARY KEY, value)`` among them.
    tables: tuple[str, ...]
    #: Rows a new ``meta`` starts with (besides ``schema``), as (name, value).
    meta: tuple[tuple[str, object], ...] = ()
    #: ``migrations[k]`` turns a version-k file into version k+1.
    migrations: Mapping[int, Migration] = attrs.field(factory=dict)


class Opened(NamedTuple):
    """An open database and its ``meta`` rows as they were after the schema check."""

    db: sqlite3.Connection
    meta: dict[str, Any]


def open_database(
    path: Path,
    *,
    what: str,
    schema: Schema,
    synchronous: str,
    error: Callable[[str], Exception],
    cache_kib: int | None = None,
    temp_store_memory: bool = False,
) -> Opened:
    """Open (creating if needed) the SQLite file ``path`` for this process alone.

    ``what`` names the file in messages ("job state"); ``error`` makes the owner's
    exception from a one-line message, raised when another process holds the file, when
    WAL mode cannot be had, or when the schema is one this code does not know.
    ``synchronous`` is the connection's level.  ``cache_kib`` sets SQLite's page cache
    (None: its default, 2 MiB); ``temp_store_memory`` keeps temporary tables in memory.
    The file is created 0600 and a missing parent directory 0700, whatever the umask.
    """
    level = sync_level(synchronous)
    name = str(path)
    _private_files(path)
    # timeout=0: a file held by another process is an immediate, clear error.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    try:
        # EXCLUSIVE before WAL: the WAL index then lives in memory (no -shm file), and
        # nobody else can open the file while we hold it.
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if "locked" in str(e):
                raise error(f"{what} {name!r} is in use by another process") from None
            raise
        if mode.lower() != "wal":
            raise error(f"{what} {name!r} cannot use WAL mode ({mode})")
        db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        db.execute(f"PRAGMA synchronous={level}")
        if temp_store_memory:
            db.execute("PRAGMA temp_store=MEMORY")
        if cache_kib is not None:
            db.execute(f"PRAGMA cache_size={-cache_kib}")
        meta = _init_schema(db, schema, what, name, error)
        # The database and its WAL now exist: make their directory entries durable.
        fsync_dir(path.parent)
    except BaseException:
        db.close()
        raise
    return Opened(db, meta)


def _private_files(path: Path) -> None:
    """Create ``path`` (and its directory) owner-only before SQLite opens it.

    SQLite creates a database with the process umask (0644 under the usual 022), and
    its ``-wal`` (and ``-shm``, ``-journal``) with the database's own mode: so the file
    is made here, empty (an empty file is an empty database), as 0600, and an older
    install's more open file and its companions are tightened.
    """
    if not path.parent.is_dir():
        makedirs_private(path.parent)
    os.close(private_file(path, os.O_RDWR))
    for suffix in ("-wal", "-shm", "-journal"):
        try:
            companion = os.stat(f"{path}{suffix}")
        except FileNotFoundError:
            continue
        if companion.st_mode & 0o077:
            os.chmod(f"{path}{suffix}", PRIVATE_FILE)


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One explicit transaction on ``db`` (opened with ``isolation_level=None``): BEGIN,
    the body, COMMIT; on any exception ROLLBACK (if one is still open) and re-raise."""
    db.execute("BEGIN")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _init_schema(
    db: sqlite3.Connection,
    schema: Schema,
    what: str,
    name: str,
    error: Callable[[str], Exception],
) -> dict[str, Any]:
    """Create, seed and migrate in one transaction, then check the version."""
    with transaction(db):
        for statement in schema.tables:
            db.execute(statement)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (schema.version,))
        for row in schema.meta:
            db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", row)
        (found,) = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        version = found
        while version in schema.migrations:
            schema.migrations[version](db)
            version += 1
        if version != found:
            db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (version,))
    if version != found:
        log.info(
            "{what} {name} migrated from schema {old} to {new}",
            what=what,
            name=name,
            old=found,
            new=version,
        )
    meta = dict(db.execute("SELECT name, value FROM meta"))
    if meta["schema"] != schema.version:
        raise error(
            f"{what} {name!r} has schema {meta['schema']!r}, this code knows {schema.version}"
        )
    return meta
