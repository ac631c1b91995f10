"""The master's durable state: one SQLite file, ``state_dir/master.sqlite3``.

Tables (the schema version lives in ``meta``)::

    meta(name, value)                         schema version, reserved version counter,
                                              the purged tombstones' watermark,
                                              the grant secret
    settings(name, value)                     cluster settings, values as JSON text
    workers(name, last_incarnation, host, port, slots, first_seen, last_seen)
    keys(key, version, size, sha256)          the current version of every live key
    replicas(key, worker, size, sha256, version)   what each worker holds, as it last said
    deleted(key, version, deleted_at)         tombstones of keys deleted through the master
    committed(key, version)                   the highest version of a key the master
                                              committed for a client (a write, a delete)

``replicas`` mirrors the workers' disks: one row per (key, worker), whatever its version.
``keys`` says which version of a key is current, so a replica row is *current* when its
version equals its key's, *stale* when older (to be trimmed), and *pending delete* when
its key has a tombstone.  A key is in at most one of ``keys`` and ``deleted``; every
replica row's key is in exactly one of them.  The version rules that maintain this are
stated in :mod:`dsml.master.directory`; :meth:`MasterState.apply_reports` carries them
out set-based, in SQL (a 100,000-entry inventory is a few statements, not 400,000), and
the rest of this module only stores and queries (and :meth:`MasterState.fall_back`
moves a lost key back to a surviving copy, by the rule stated there).  One room because
those rules hold across the tables only while every statement that touches them stands
together.

One writer: this object, on the reactor thread, in plain synchronous code (no Twisted).
The file is opened by :func:`dsml.sqlitedb.open_database`: the connection holds SQLite's
exclusive lock for its whole life, so a second master opening the same state fails at
once with :class:`StateError` instead of writing behind the first one's back (WAL mode,
the WAL index in memory, no ``-shm`` file).  A process killed with SIGKILL releases the
lock, and the next open recovers every committed transaction from the WAL.

Durability: :meth:`MasterState.transaction` commits with ``synchronous=FULL`` (the
default level, configurable) when the write acknowledges something to a client or a
worker (a replica report, a delete, an incarnation, a setting); with ``lazy=True`` it
commits with NORMAL, which survives a process crash but not a power loss, and is only used
for writes that acknowledge nothing (a worker saying it trimmed a replica, heartbeat
times), batched by the caller.  A FULL commit makes every earlier NORMAL one durable too
(the WAL is synced as a whole).

Versions: :meth:`MasterState.issue_version` hands out cluster-wide version numbers that
never go back, not even across restarts.  Versions are reserved on disk in blocks of
:data:`VERSION_BLOCK` (one FULL commit per block), and on open the counter starts at the
reservation (and above every current version and tombstone, which only issued versions
reach); a crash therefore skips the rest of a block but never reissues a number.  Nothing
a worker reports moves the counter: the master alone issues versions, and a report of a
version above the counter was never issued (:mod:`dsml.master.directory` quarantines it).
``meta`` also keeps the secret behind write grants (:mod:`dsml.protocol.grants`), made
on first open.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import attrs

from dsml.fsutil import prefix_end as _prefix_end
from dsml.protocol.grants import new_secret
from dsml.protocol.inventory import entry_digest, inventory_digest  # noqa: F401 (re-exported)
from dsml.sqlitedb import SYNC_LEVELS, Schema, open_database, sync_level, transaction

__all__ = [
    "STATE_FILE",
    "ApplyOutcome",
    "Conflict",
    "KeyRow",
    "MasterState",
    "ReplicaRow",
    "StateError",
    "WorkerRow",
]

SCHEMA_VERSION = 2

#: The state file's name under the master's ``state_dir``.
STATE_FILE = "master.sqlite3"

#: Versions reserved on disk at a time by :meth:`MasterState.issue_version`.
VERSION_BLOCK = 1000

#: SQLite's page cache, in KiB (its default is 2 MiB, a tenth of a 100,000-key directory).
CACHE_KIB = 64 * 1024

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """A 64-bit digest as SQLite's signed INTEGER."""
    return x - (1 << 64) if x >= 1 << 63 else x


#: Largest integer SQLite stores (and so the largest size or version we accept).
MAX_INT = 2**63 - 1

#: Highest version the master accepts or issues: what a header can carry (the wire
#: allows 18 digits), with room to spare; a report past it is malformed.  Anything
#: higher would wedge every later write (its Version header would be refused).
MAX_VERSION = 10**15 - 1

_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS settings(name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS workers(name TEXT PRIMARY KEY,"
    " last_incarnation INTEGER NOT NULL, host TEXT, port INTEGER, slots INTEGER,"
    " first_seen REAL NOT NULL, last_seen REAL NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS keys(key TEXT PRIMARY KEY, version INTEGER NOT NULL,"
    " size INTEGER NOT NULL, sha256 TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS replicas(key TEXT NOT NULL, worker TEXT NOT NULL,"
    " size INTEGER NOT NULL, sha256 TEXT NOT NULL, version INTEGER NOT NULL,"
    " PRIMARY KEY(key, worker)) WITHOUT ROWID",
    # On (worker, version): with the primary key appended, the index alone answers
    # "which keys, at which versions, does this worker hold".
    "CREATE INDEX IF NOT EXISTS replicas_worker ON replicas(worker, version)",
    "CREATE TABLE IF NOT EXISTS deleted(key TEXT PRIMARY KEY, version INTEGER NOT NULL,"
    " deleted_at REAL NOT NULL) WITHOUT ROWID",
    # What the directory holds for each worker, digested (inventory_digest): kept up to
    # date with every write to that worker's copies, so a worker that registers again
    # with the same digest need not be reconciled.  ``clean``: none of its copies is
    # stale or of a deleted key (the triggers below clear it when the current version
    # or tombstone of a key it holds moves).  A worker without a row is reconciled.
    # (Added to schema 1 by CREATE IF NOT EXISTS: an older file gains it on open.)
    "CREATE TABLE IF NOT EXISTS inventories(worker TEXT PRIMARY KEY,"
    " digest INTEGER NOT NULL, entries INTEGER NOT NULL, clean INTEGER NOT NULL)"
    " WITHOUT ROWID",
    *(
        f"CREATE TRIGGER IF NOT EXISTS inventories_{table}_{event.lower()} AFTER {event}"
        f" ON {table} BEGIN UPDATE inventories SET clean = 0 WHERE clean AND worker IN"
        f" (SELECT worker FROM replicas WHERE key = {row}.key); END"
        for table in ("keys", "deleted")
        for event, row in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))
    ),
    # Schema 2.  A key's current version may be one only a worker reported (a write whose
    # commit never came: its outcome was unknown to the client); this row says how far
    # back the key may never go (see MasterState.fall_back).
    "CREATE TABLE IF NOT EXISTS committed(key TEXT PRIMARY KEY, version INTEGER NOT NULL)"
    " WITHOUT ROWID",
)


def _add_committed(db: sqlite3.Connection) -> None:
    """Schema 1 to 2: the ``committed`` table (created empty by _TABLES), filled with
    every current version and tombstone: a schema-1 file does not say which versions
    were committed, so all are taken as committed (no key ever falls back, as before)."""
    db.execute("INSERT OR REPLACE INTO committed SELECT key, version FROM keys")
    db.execute("INSERT OR REPLACE INTO committed SELECT key, version FROM deleted")


_SCHEMA = Schema(version=SCHEMA_VERSION, tables=_TABLES, meta=(("version", 0),),
                 migrations={1: _add_committed})

_GET_KEY = "SELECT version, size, sha256 FROM keys WHERE key = ?"
_PUT_KEY = "REPLACE INTO keys VALUES (?, ?, ?, ?)"
_DROP_KEY = "DELETE FROM keys WHERE key = ?"
_GET_TOMB = "SELECT version FROM deleted WHERE key = ?"
_PUT_TOMB = "REPLACE INTO deleted VALUES (?, ?, ?)"
_DROP_TOMB = "DELETE FROM deleted WHERE key = ?"
_PUT_REPLICA = "REPLACE INTO replicas VALUES (?, ?, ?, ?, ?)"
_DROP_REPLICA = "DELETE FROM replicas WHERE key = ? AND worker = ?"
_RETURNING = " RETURNING size, sha256, version"
_REPLICAS_OF = "SELECT worker, size, sha256, version FROM replicas WHERE key = ? ORDER BY worker"
_REPLICAS_ON = "SELECT key, size, sha256, version FROM replicas WHERE worker = ?"

# A key and its current replicas (worker NULL when it has none), in key then worker order:
# the planner walks keys in order and finds each key's replicas by primary-key prefix.
_CURRENT_COLS = (
    "SELECT k.key, k.size, k.sha256, k.version, r.worker FROM {src} AS k"
    " LEFT JOIN replicas AS r ON r.key = k.key AND r.version = k.version"
    " ORDER BY k.key, r.worker"
)
# list_keys(): a key range on the primary key (an index SEARCH, never a SCAN), then the join.
_LIST_SRC = "(SELECT key, size, sha256, version FROM keys WHERE {cond} ORDER BY key LIMIT ?)"
_LIST = {
    (excl, bounded): _CURRENT_COLS.format(
        src=_LIST_SRC.format(
            cond=("key > ?" if excl else "key >= ?") + (" AND key < ?" if bounded else "")
        )
    )
    for excl in (False, True)
    for bounded in (False, True)
}
# live_holders(): temp.live holds the live workers for one call.  All in C: one walk of
# the keys in order (or of one worker's copies), an index search per key and live worker,
# one row per matching key with its live holders joined by _SEP.
_LIVE = "CREATE TEMP TABLE IF NOT EXISTS live(worker TEXT PRIMARY KEY) WITHOUT ROWID"
_SEP = "\x1f"  # worker names hold no control characters (the directory checks)
_HOLDERS = (
    "SELECT k.key, k.size, k.sha256, k.version, group_concat(r.worker, char(31))"
    " FROM keys AS k LEFT JOIN replicas AS r ON r.key = k.key AND r.version = k.version"
    " AND +r.worker IN temp.live GROUP BY k.key HAVING count(r.worker) BETWEEN ? AND ?"
    " ORDER BY k.key"
)
# The same, among the keys of which one worker holds the current version.
_HOLDERS_WITH = (
    "SELECT k.key, k.size, k.sha256, k.version, group_concat(r.worker, char(31))"
    " FROM replicas AS mine JOIN keys AS k ON k.key = mine.key AND k.version = mine.version"
    " JOIN replicas AS r ON r.key = k.key AND r.version = k.version AND +r.worker IN temp.live"
    " WHERE mine.worker = ? GROUP BY k.key HAVING count(*) BETWEEN ? AND ? ORDER BY k.key"
)
# One worker's copies to trim: stale ones, and those of tombstoned keys (a copy's key is
# either live or tombstoned, so no current version means a tombstone).
_TRIMS = (
    "SELECT r.key, r.version, k.key IS NULL FROM replicas AS r"
    " LEFT JOIN keys AS k ON k.key = r.key"
    " WHERE r.worker = ? AND (k.key IS NULL OR r.version < k.version) ORDER BY r.key"
)
_STALE = (
    "SELECT r.key, r.worker, r.version FROM replicas AS r JOIN keys AS k ON k.key = r.key"
    " WHERE r.version < k.version{cond} ORDER BY r.key, r.worker"
)
# Driven from the tombstones (CROSS JOIN fixes the order): usually far fewer than copies.
_DOOMED = (
    "SELECT r.key, r.worker, r.version FROM deleted AS d CROSS JOIN replicas AS r"
    " ON r.key = d.key{cond} ORDER BY r.key, r.worker"
)
# Retention of tombstones, a slice of keys at a time: the slice's last key, then in
# (after, last] those set before a time whose key no worker is known to hold.
_PURGE_SLICE = "SELECT key FROM deleted WHERE key > ? ORDER BY key LIMIT 1 OFFSET ?"
_PURGE_WHERE = (
    " FROM deleted WHERE key > ?{upto} AND deleted_at < ?"
    " AND NOT EXISTS (SELECT 1 FROM replicas AS r WHERE r.key = deleted.key)"
)
_PURGE_MAX = "SELECT MAX(version)" + _PURGE_WHERE
_PURGE = "DELETE" + _PURGE_WHERE
_PURGE_COMMITTED = "DELETE FROM committed WHERE key IN (SELECT key" + _PURGE_WHERE + ")"
_COMMIT = (
    "INSERT INTO committed VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
    " SET version = excluded.version WHERE excluded.version > committed.version"
)


# apply_reports(): the directory's version rules over a batch of reports in temp.inv,
# set-based (one pass in C per statement instead of several statements per report).
# ok: 1 to apply, 2 already recorded exactly, 0 left alone (rejected, or refused below).
_INV = (
    "CREATE TEMP TABLE IF NOT EXISTS inv(key TEXT PRIMARY KEY, size INTEGER, sha256 TEXT,"
    " version INTEGER, ok INTEGER NOT NULL) WITHOUT ROWID"
)
_INV_ADD = "INSERT INTO temp.inv VALUES (?, ?, ?, ?, 1)"
_INV_KEEP = "INSERT INTO temp.inv VALUES (?, NULL, NULL, NULL, 0)"
# A copy recorded exactly as reported needs nothing: when it was recorded, its key's
# current version or tombstone became at least its version, and neither goes back.
_INV_SAME = (
    "UPDATE temp.inv SET ok = 2 WHERE ok = 1 AND EXISTS (SELECT 1 FROM replicas AS r"
    " WHERE r.key = inv.key AND r.worker = ? AND r.version = inv.version"
    " AND r.size = inv.size AND r.sha256 = inv.sha256)"
)
# Another content for the key's current version: refused.
_INV_CONFLICTS = (
    "SELECT i.key, i.size, i.sha256, i.version, k.size, k.sha256 FROM temp.inv AS i"
    " JOIN keys AS k ON k.key = i.key WHERE i.ok = 1 AND i.version = k.version"
    " AND (i.size <> k.size OR i.sha256 <> k.sha256) ORDER BY i.key"
)
_INV_REFUSE = "UPDATE temp.inv SET ok = 0 WHERE key = ?"
# A key unknown here reported at or below the forgotten tombstones' watermark may be one
# deleted and then forgotten: it is tombstoned again (set at time 0, so the next purge
# forgets it again once the copy is trimmed), not made live.
_INV_REBURY = (
    "INSERT INTO deleted SELECT i.key, ?, 0.0 FROM temp.inv AS i"
    " WHERE i.ok = 1 AND i.version <= ?"
    " AND NOT EXISTS (SELECT 1 FROM keys AS k WHERE k.key = i.key)"
    " AND NOT EXISTS (SELECT 1 FROM deleted AS d WHERE d.key = i.key)"
)
# A version above the tombstone's is a write after the delete: the tombstone goes ...
_INV_UNBURY = (
    "DELETE FROM deleted WHERE key IN (SELECT i.key FROM temp.inv AS i"
    " JOIN deleted AS d ON d.key = i.key WHERE i.ok = 1 AND i.version > d.version)"
)
# ... and then a report becomes current if its key has no tombstone (any left is at or
# above the report's version) and no current version at or above the report's.
_INV_KEYS = (
    "INSERT INTO keys SELECT key, version, size, sha256 FROM temp.inv AS i"
    " WHERE i.ok = 1 AND NOT EXISTS (SELECT 1 FROM deleted AS d WHERE d.key = i.key)"
    " ON CONFLICT(key) DO UPDATE SET version = excluded.version, size = excluded.size,"
    " sha256 = excluded.sha256 WHERE excluded.version > keys.version"
)
# Every report is a copy the worker holds, whatever its verdict.
_INV_REPLICAS = (
    "REPLACE INTO replicas SELECT key, ?, size, sha256, version FROM temp.inv WHERE ok = 1"
)
_INV_APPLIED = "SELECT key, size, sha256, version FROM temp.inv WHERE ok = 1"
# The worker's copies that the reports to apply replace (for its digest).  CROSS JOIN
# fixes the order: a primary-key search per report, never a walk of the worker's copies.
_INV_BEFORE = (
    "SELECT r.key, r.size, r.sha256, r.version FROM temp.inv AS i CROSS JOIN replicas AS r"
    " ON r.key = i.key AND r.worker = ? WHERE i.ok = 1"
)
# Reports to apply that will not be current copies (stale, or of a deleted key).
_INV_DIRTY = (
    "SELECT count(*) FROM temp.inv AS i WHERE i.ok = 1 AND NOT EXISTS"
    " (SELECT 1 FROM keys AS k WHERE k.key = i.key AND k.version = i.version)"
)
_INV_GONE = (
    "DELETE FROM replicas WHERE worker = ? AND key NOT IN (SELECT key FROM temp.inv)"
    " RETURNING key"
)

# The repairer's reads, each bounded: a slice of a table in key order (an index search
# from the cursor, never a whole scan), one worker's copies in index order from a cursor on
# (version, key), and the whole picture of a batch of keys (their current version and
# every copy, whatever its version) through temp.batch.
# The end of a slice of a table: the limit-th key after the cursor (an index walk).
_SLICE_END = "SELECT key FROM {table} WHERE key > ? ORDER BY key LIMIT 1 OFFSET ?"
_SLICE_LAST = "SELECT max(key) FROM {table} WHERE key > ?"
# In a slice of the live keys, those whose copies are not as they should be: fewer
# current copies than low or more than high, or any stale copy.  All in C.
_KEYS_OFF = (
    "SELECT k.key FROM keys AS k LEFT JOIN replicas AS r ON r.key = k.key"
    " WHERE k.key > ? AND k.key <= ? GROUP BY k.key"
    " HAVING sum(r.version = k.version) NOT BETWEEN ? AND ? OR sum(r.version < k.version) > 0"
)
# In a slice of the tombstones, those of which some worker still holds a copy.
_TOMBS_HELD = (
    "SELECT d.key FROM deleted AS d WHERE d.key > ? AND d.key <= ?"
    " AND EXISTS (SELECT 1 FROM replicas AS r WHERE r.key = d.key)"
)
_HELD_AFTER = (
    "SELECT version, key FROM replicas WHERE worker = ? AND (version, key) > (?, ?)"
    " ORDER BY version, key LIMIT ?"
)
_BATCH = "CREATE TEMP TABLE IF NOT EXISTS batch(key TEXT PRIMARY KEY) WITHOUT ROWID"
_EXAMINE = (
    "SELECT b.key, k.version, k.size, k.sha256, r.worker, r.version FROM temp.batch AS b"
    " LEFT JOIN keys AS k ON k.key = b.key LEFT JOIN replicas AS r ON r.key = b.key"
    " ORDER BY b.key, r.worker"
)


class StateError(Exception):
    """The state file cannot be used (held by another process, unknown schema, ...)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class KeyRow(NamedTuple):
    """The current version of a live key."""

    version: int
    size: int
    sha256: str


class ReplicaRow(NamedTuple):
    """One worker's copy of one key, as the worker last reported it."""

    key: str
    worker: str
    size: int
    sha256: str
    version: int


class Conflict(NamedTuple):
    """A report of a key's current version with another content than the directory's."""

    key: str
    size: int
    sha256: str
    version: int
    known_size: int
    known_sha256: str


@attrs.frozen
class ApplyOutcome:
    """What :meth:`MasterState.apply_reports` did."""

    unchanged: int  #: reports the directory already had exactly
    applied: int  #: reports recorded (new or changed copies)
    removed: int  #: copies of the worker missing from a full inventory, forgotten
    conflicts: tuple[Conflict, ...]  #: reports refused (another content, same version)
    #: Keys whose copies on the worker were recorded, changed or forgotten.
    changed: tuple[str, ...] = ()


@attrs.frozen
class WorkerRow:
    """What the master remembers of a worker name across restarts."""

    name: str
    last_incarnation: int
    host: str | None
    port: int | None
    slots: int | None
    first_seen: float
    last_seen: float


class MasterState:
    """The master's SQLite state; see the module docstring.

    Low-level: each method runs one or a few statements.  Group writes that belong
    together in :meth:`transaction`; a write outside one commits on its own at the
    connection's current level.  The consistency rules between tables are the caller's
    (:class:`dsml.master.directory.Directory`).
    """

    def __init__(self, path: Path | str, synchronous: str = "FULL") -> None:
        """Open (creating if needed) the state at ``path``.

        ``path`` is the SQLite file, or an existing directory to hold :data:`STATE_FILE`.
        ``synchronous`` is the level of acknowledging commits (FULL; tests may lower it);
        lazy commits use NORMAL, or this level if it is lower.
        """
        synchronous = sync_level(synchronous)
        path = Path(path)
        if path.is_dir():
            path = path / STATE_FILE
        self.path = path
        self._sync = synchronous
        self._lazy_sync = SYNC_LEVELS[min(1, SYNC_LEVELS.index(synchronous))]
        self._closed = False
        self._level = synchronous
        #: Transactions committed since open: callers can skip a scan when it has
        #: not moved (and nothing else they depend on has changed either).
        self.generation = 0
        # temp_store: apply_reports' batch table.
        db, meta = open_database(
            path,
            what="master state",
            schema=_SCHEMA,
            synchronous=synchronous,
            error=StateError,
            cache_kib=CACHE_KIB,
            temp_store_memory=True,
        )
        self._db = db
        try:
            # Not replicas: a worker's claim never moves the counter.  Keys and
            # tombstones only hold versions issued here (an older state's may hold
            # more: starting above them keeps new writes newer than what is current).
            top = db.execute(
                "SELECT max(coalesce((SELECT max(version) FROM keys), 0),"
                " coalesce((SELECT max(version) FROM deleted), 0))"
            ).fetchone()[0]
            row = db.execute("SELECT value FROM meta WHERE name = 'grant_secret'").fetchone()
            if row is None:
                secret = new_secret()
                with transaction(db):
                    db.execute("INSERT INTO meta VALUES ('grant_secret', ?)", (secret,))
            else:
                secret = str(row[0])
        except BaseException:
            db.close()
            raise
        #: The highest version reserved on disk; issue_version() stays at or below it.
        self._reserved: int = meta["version"]
        #: The highest version issued (at or below the reservation, after a restart
        #: the reservation itself).
        self._version: int = min(max(self._reserved, top), MAX_VERSION)
        #: The secret of write grants (hex), kept across restarts.
        self.grant_secret: str = secret

    # -- transactions ------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, lazy: bool = False) -> Iterator[None]:
        """Run the body in one transaction; commit on success, roll back on an exception.

        Commits at the acknowledging level (FULL) unless ``lazy``.  Nested use joins the
        outer transaction (which then decides the level).
        """
        db = self._db
        if db.in_transaction:
            yield
            return
        level = self._lazy_sync if lazy else self._sync
        if level != self._level:
            db.execute(f"PRAGMA synchronous={level}")
            self._level = level
        with transaction(db):
            yield
        self.generation += 1

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """Run the body as one unit inside the current transaction: on an exception its
        writes are undone (and the exception re-raised), the transaction goes on.
        Outside a transaction, the same as :meth:`transaction`."""
        db = self._db
        if not db.in_transaction:
            with self.transaction():
                yield
            return
        db.execute("SAVEPOINT unit")
        try:
            yield
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK TO unit")
                db.execute("RELEASE unit")
            raise
        db.execute("RELEASE unit")

    @property
    def in_transaction(self) -> bool:
        """True inside :meth:`transaction`."""
        return self._db.in_transaction

    # -- settings ----------------------------------------------------------------------

    def get_setting(self, name: str, default: Any = None) -> Any:
        """The value of setting ``name`` (as set: JSON types round-trip), or ``default``."""
        row = self._db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_setting(self, name: str, value: Any) -> None:
        """Set ``name`` to ``value`` (anything JSON can encode), durably."""
        text = json.dumps(value, sort_keys=True, allow_nan=False)
        with self.transaction():
            self._db.execute("REPLACE INTO settings VALUES (?, ?)", (name, text))

    def settings(self) -> dict[str, Any]:
        """Every setting."""
        return {name: json.loads(v) for name, v in self._db.execute("SELECT * FROM settings")}

    # -- workers -----------------------------------------------------------------------

    def next_incarnation(self, name: str, now: float | None = None) -> int:
        """Return a new incarnation for worker ``name``, higher than any before, durably.

        Strictly increasing per name, across restarts: the number is committed before
        it is returned.
        """
        now = time.time() if now is None else now
        with self.transaction():
            row = self._db.execute(
                "INSERT INTO workers VALUES (?, 1, NULL, NULL, NULL, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET last_incarnation = last_incarnation + 1"
                " RETURNING last_incarnation",
                (name, now, now),
            ).fetchall()
        return row[0][0]

    def record_worker(
        self,
        name: str,
        incarnation: int,
        host: str | None,
        port: int | None,
        slots: int | None,
        now: float | None = None,
    ) -> None:
        """Remember a registration of ``name``, durably.

        ``last_incarnation`` only moves up (a lower ``incarnation`` leaves it), so
        :meth:`next_incarnation` stays above every incarnation ever recorded.
        """
        now = time.time() if now is None else now
        with self.transaction():
            self._db.execute(
                "INSERT INTO workers VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE"
                " SET last_incarnation = max(last_incarnation, excluded.last_incarnation),"
                " host = excluded.host, port = excluded.port, slots = excluded.slots,"
                " last_seen = max(last_seen, excluded.last_seen)",
                (name, incarnation, host, port, slots, now, now),
            )

    def touch_workers(self, seen: Mapping[str, float]) -> None:
        """Record last-seen times of known workers, in one lazy (NORMAL) commit.

        For heartbeats, batched by the caller: a lost update only makes a time older.
        """
        if not seen:
            return
        with self.transaction(lazy=True):
            self._db.executemany(
                "UPDATE workers SET last_seen = max(last_seen, ?) WHERE name = ?",
                [(when, name) for name, when in seen.items()],
            )

    def worker(self, name: str) -> WorkerRow | None:
        """The row of worker ``name``, or None."""
        row = self._db.execute("SELECT * FROM workers WHERE name = ?", (name,)).fetchone()
        return None if row is None else WorkerRow(*row)

    def workers(self) -> list[WorkerRow]:
        """Every worker ever recorded, by name."""
        return [WorkerRow(*r) for r in self._db.execute("SELECT * FROM workers ORDER BY name")]

    # -- versions ----------------------------------------------------------------------

    def issue_version(self) -> int:
        """Return a new cluster-wide version, higher than any issued or stored before."""
        version = self._version + 1
        if version > MAX_VERSION:
            raise StateError(f"versions are used up (the limit is {MAX_VERSION})")
        if version > self._reserved:
            reserved = version + VERSION_BLOCK - 1
            with self.transaction():
                self._db.execute("UPDATE meta SET value = ? WHERE name = 'version'", (reserved,))
            self._reserved = reserved
        self._version = version
        return version

    @property
    def last_version(self) -> int:
        """The highest version issued: no version above it was ever handed out."""
        return self._version

    # -- keys and tombstones -----------------------------------------------------------

    def get_key(self, key: str) -> KeyRow | None:
        """The current version of ``key``, or None if it is not live."""
        row = self._db.execute(_GET_KEY, (key,)).fetchone()
        return None if row is None else KeyRow(*row)

    def put_key(self, key: str, version: int, size: int, sha256: str) -> None:
        """Make ``version`` the current version of ``key``."""
        self._db.execute(_PUT_KEY, (key, version, size, sha256))

    def drop_key(self, key: str) -> None:
        """Forget the current version of ``key``."""
        self._db.execute(_DROP_KEY, (key,))

    def get_tombstone(self, key: str) -> int | None:
        """The version at which ``key`` was deleted, or None."""
        row = self._db.execute(_GET_TOMB, (key,)).fetchone()
        return None if row is None else row[0]

    def put_tombstone(self, key: str, version: int, when: float) -> None:
        """Record that ``key`` was deleted at ``version`` (at time ``when``)."""
        self._db.execute(_PUT_TOMB, (key, version, when))

    def drop_tombstone(self, key: str) -> None:
        """Forget the tombstone of ``key`` (a newer version replaced it)."""
        self._db.execute(_DROP_TOMB, (key,))

    def committed_version(self, key: str) -> int:
        """The highest version of ``key`` committed for a client (0: none)."""
        row = self._db.execute("SELECT version FROM committed WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def commit_version(self, key: str, version: int) -> None:
        """Note that ``version`` of ``key`` was committed for a client (a write the
        client was told succeeded, or a delete): the key never goes back behind it."""
        self._db.execute(_COMMIT, (key, version))

    def fall_back(self, key: str, survivors: Collection[str]) -> KeyRow | None:
        """Move a lost key back to its newest surviving copy, if it may go back.

        When no worker of ``survivors`` holds ``key``'s current version and that version
        was never committed (only a worker reported it: the client was told the write
        failed or its outcome was unknown), the newest copy on ``survivors`` of an older
        version, at or above the committed one, becomes current, and the copies above it
        (on workers not among ``survivors``) are forgotten: a worker that comes back
        with one reports it again, and it becomes current again as any newer report
        does.  Returns the new current version, or None if nothing moved (the key is
        not live, still has a surviving current copy, or may not go back)."""
        # Read first (one writer: nothing moves in between), write only if it moves.
        cur = self.get_key(key)
        if cur is None:
            return None
        floor = self.committed_version(key)
        rows = self.replicas_of(key)
        if cur.version <= floor or any(
            r.version == cur.version and r.worker in survivors for r in rows
        ):
            return None
        older = [r for r in rows if floor <= r.version < cur.version and r.worker in survivors]
        if not older:
            return None
        best = max(older, key=lambda r: (r.version, r.worker))
        with self.transaction():
            for r in rows:
                if r.version > best.version:
                    self.drop_replicas(r.worker, [key])
            self.put_key(key, best.version, best.size, best.sha256)
        return KeyRow(best.version, best.size, best.sha256)

    def tombstones(self) -> list[tuple[str, int, float]]:
        """Every tombstone: (key, version, deleted_at), by key."""
        return list(self._db.execute("SELECT * FROM deleted ORDER BY key"))

    # -- replicas ----------------------------------------------------------------------

    def put_replica(self, key: str, worker: str, size: int, sha256: str, version: int) -> None:
        """Record that ``worker`` holds ``key`` at ``version`` (replacing what it held)."""
        self._forget_digest(worker)  # first: a crash in between leaves no stale digest
        self._db.execute(_PUT_REPLICA, (key, worker, size, sha256, version))

    def drop_replica(self, key: str, worker: str) -> bool:
        """Forget ``worker``'s copy of ``key``; False if there was none."""
        with self.transaction(lazy=True):
            gone = self._db.execute(_DROP_REPLICA + _RETURNING, (key, worker)).fetchall()
            if gone:
                self._digest_change(worker, [(key, *row) for row in gone], ())
        return bool(gone)

    def drop_replicas(self, worker: str, keys: Iterable[str]) -> int:
        """Forget ``worker``'s copies of ``keys``; return how many there were."""
        self._forget_digest(worker)
        cur = self._db.executemany(_DROP_REPLICA, ((key, worker) for key in keys))
        return cur.rowcount

    def _forget_digest(self, worker: str) -> None:
        self._db.execute("DELETE FROM inventories WHERE worker = ?", (worker,))

    def apply_reports(
        self,
        worker: str,
        reports: Iterable[tuple[str, int, str, int]],
        keep: Iterable[str] = (),
        full: bool = False,
    ) -> ApplyOutcome:
        """Apply ``worker``'s reports of copies (key, size, sha256, version) by the version rules.

        The rules of :mod:`dsml.master.directory`, set-based: every report is recorded
        as ``worker``'s copy; it becomes its key's current version if it is above the
        current one and above any tombstone (a tombstone below it goes); a report of the
        current version with another size or sha256 is refused (returned as a conflict,
        nothing recorded).  The reports must be well formed and name distinct keys, none
        of them in ``keep``.  If ``full``, the reports are ``worker``'s whole inventory:
        its other copies are forgotten, except those of the keys in ``keep`` (entries the
        caller rejected, left as they were).

        Runs inside the caller's transaction, or in its own (acknowledging) one.
        """
        db = self._db
        with self.transaction():
            db.execute(_INV)
            db.execute("DELETE FROM temp.inv")
            db.executemany(_INV_ADD, reports)
            db.executemany(_INV_KEEP, ((key,) for key in keep))
            unchanged = db.execute(_INV_SAME, (worker,)).rowcount
            conflicts = tuple(Conflict(*row) for row in db.execute(_INV_CONFLICTS))
            if conflicts:
                db.executemany(_INV_REFUSE, ((c.key,) for c in conflicts))
            forgotten = self.forgotten_below
            if forgotten:
                db.execute(_INV_REBURY, (forgotten, forgotten))
            db.execute(_INV_UNBURY)
            db.execute(_INV_KEYS)
            digested = not full and self.inventory(worker) is not None
            if digested:
                # The copies replaced, for the worker's digest (a full inventory is
                # digested again from scratch by its caller: Directory.reconcile).
                before = db.execute(_INV_BEFORE, (worker,)).fetchall()
                dirty = db.execute(_INV_DIRTY).fetchone()[0] > 0
            else:
                self._forget_digest(worker)
            rows = db.execute(_INV_APPLIED).fetchall()
            changed = [row[0] for row in rows]
            applied = db.execute(_INV_REPLICAS, (worker,)).rowcount
            gone = [row[0] for row in db.execute(_INV_GONE, (worker,))] if full else []
            if digested:
                self._digest_change(worker, before, rows, dirty)
            db.execute("DELETE FROM temp.inv")
        return ApplyOutcome(unchanged, applied, len(gone), conflicts, tuple(changed + gone))

    # -- inventory digests -------------------------------------------------------------

    def inventory(self, worker: str) -> tuple[int, int, bool] | None:
        """(digest, entries, clean) of what the directory holds for ``worker`` (see the
        ``inventories`` table), or None if it is not kept for it."""
        row = self._db.execute(
            "SELECT digest, entries, clean FROM inventories WHERE worker = ?", (worker,)
        ).fetchone()
        return None if row is None else (row[0] & _MASK64, int(row[1]), bool(row[2]))

    def set_clean(self, worker: str) -> None:
        """Note that none of ``worker``'s copies is stale or of a deleted key."""
        self._db.execute("UPDATE inventories SET clean = 1 WHERE worker = ?", (worker,))

    def digest_worker(
        self, worker: str, clean: bool, copies: Iterable[Sequence[Any]] | None = None
    ) -> None:
        """Digest ``worker``'s copies from scratch (after a full reconcile): ``copies``
        if the caller knows them exactly (key, size, sha256, version), else as read."""
        if copies is None:
            copies = self._db.execute(_REPLICAS_ON, (worker,))
        digest = 0
        entries = 0
        for key, size, sha256, version in copies:
            digest ^= entry_digest(key, size, sha256, version)
            entries += 1
        self._db.execute(
            "REPLACE INTO inventories VALUES (?, ?, ?, ?)",
            (worker, _signed(digest), entries, int(clean)),
        )

    def forget_digest(self, worker: str) -> None:
        """Keep no digest of ``worker``'s copies (its registrations reconcile)."""
        self._forget_digest(worker)

    def _digest_change(self, worker: str, out: Iterable[Sequence[Any]],
                       into: Iterable[Sequence[Any]], dirty: bool = False) -> None:
        """Copies of ``worker`` (key, size, sha256, version) gone (``out``) and recorded
        (``into``): its digest follows, inside the caller's transaction."""
        row = self._db.execute(
            "SELECT digest, entries FROM inventories WHERE worker = ?", (worker,)
        ).fetchone()
        if row is None:
            return
        digest, entries = row[0] & _MASK64, row[1]
        for key, size, sha256, version in out:
            digest ^= entry_digest(key, size, sha256, version)
            entries -= 1
        for key, size, sha256, version in into:
            digest ^= entry_digest(key, size, sha256, version)
            entries += 1
        self._db.execute(
            "UPDATE inventories SET digest = ?, entries = ?, clean = clean AND ?"
            " WHERE worker = ?", (_signed(digest), entries, int(not dirty), worker),
        )

    def get_replica(self, key: str, worker: str) -> ReplicaRow | None:
        """``worker``'s copy of ``key``, or None."""
        row = self._db.execute(
            "SELECT size, sha256, version FROM replicas WHERE key = ? AND worker = ?",
            (key, worker),
        ).fetchone()
        return None if row is None else ReplicaRow(key, worker, *row)

    def replicas_of(self, key: str) -> list[ReplicaRow]:
        """Every copy of ``key`` (any version), by worker."""
        return [ReplicaRow(key, *r) for r in self._db.execute(_REPLICAS_OF, (key,))]

    def replicas_on(self, worker: str) -> dict[str, tuple[int, str, int]]:
        """Every copy ``worker`` holds: key -> (size, sha256, version)."""
        return {
            key: (size, digest, version)
            for key, size, digest, version in self._db.execute(_REPLICAS_ON, (worker,))
        }

    def stale_rows(self, worker: str | None = None) -> list[tuple[str, str, int]]:
        """Copies older than their key's current version: (key, worker, version)."""
        if worker is None:
            return list(self._db.execute(_STALE.format(cond="")))
        return list(self._db.execute(_STALE.format(cond=" AND r.worker = ?"), (worker,)))

    def doomed_rows(self, worker: str | None = None) -> list[tuple[str, str, int]]:
        """Copies of tombstoned keys: (key, worker, version)."""
        if worker is None:
            return list(self._db.execute(_DOOMED.format(cond="")))
        return list(self._db.execute(_DOOMED.format(cond=" AND r.worker = ?"), (worker,)))

    @property
    def forgotten_below(self) -> int:
        """The highest version of a tombstone purged so far (0: none): a key unknown
        here reported at or below it is treated as deleted (see :meth:`apply_reports`)."""
        row = self._db.execute(
            "SELECT value FROM meta WHERE name = 'tombstones_forgotten'").fetchone()
        return 0 if row is None else int(row[0])

    def purge_tombstones(
        self, before: float, after: str = "", limit: int = 1000
    ) -> tuple[int, str | None]:
        """Drop, among the next ``limit`` tombstones by key after ``after``, those set
        before ``before`` whose key no worker is known to hold; raise the watermark of
        :attr:`forgotten_below` to the highest version dropped, in the same transaction.

        Returns how many went and the key to go on after (None: the walk is over).  A
        purge is no acknowledgement: it commits lazily (one lost to a power cut is
        done again by the next walk).
        """
        db = self._db
        row = db.execute(_PURGE_SLICE, (after, max(0, limit - 1))).fetchone()
        if row is None:  # the last slice: every key after ``after``
            upto, args = "", (after, before)
        else:
            upto, args = " AND key <= ?", (after, row[0], before)
        with self.transaction(lazy=True):
            top = db.execute(_PURGE_MAX.format(upto=upto), args).fetchone()[0]
            db.execute(_PURGE_COMMITTED.format(upto=upto), args)
            n = db.execute(_PURGE.format(upto=upto), args).rowcount
            if top is not None and top > self.forgotten_below:
                db.execute("INSERT INTO meta VALUES ('tombstones_forgotten', ?)"
                           " ON CONFLICT(name) DO UPDATE SET value = excluded.value", (top,))
        return n, (row[0] if row is not None else None)

    def trim_rows(self, worker: str) -> list[tuple[str, int, bool]]:
        """``worker``'s stale copies and copies of tombstoned keys, by key.

        Each as (key, version, True if the key is tombstoned).
        """
        return [(k, v, bool(d)) for k, v, d in self._db.execute(_TRIMS, (worker,))]

    def live_holders(
        self, live: Iterable[str], low: int, high: int, holder: str | None = None
    ) -> list[tuple[str, int, str, int, list[str]]]:
        """Live keys with ``low`` to ``high`` copies of their current version on ``live``.

        Each as (key, size, sha256, version, the live workers holding the current
        version, by name), by key.  With ``holder``, only keys of which that worker holds the
        current version.  One pass over the keys (or over ``holder``'s copies) in SQL.
        """
        db = self._db
        db.execute(_LIVE)
        db.execute("DELETE FROM temp.live")
        db.executemany("INSERT OR IGNORE INTO temp.live VALUES (?)", ((w,) for w in live))
        if holder is None:
            rows = db.execute(_HOLDERS, (low, high))
        else:
            rows = db.execute(_HOLDERS_WITH, (holder, low, high))
        out = [
            (key, size, digest, version, sorted(workers.split(_SEP)) if workers else [])
            for key, size, digest, version, workers in rows
        ]
        db.execute("DELETE FROM temp.live")
        return out

    def keys_off(
        self, after: str, limit: int, low: int, high: int, tombstones: bool = False
    ) -> tuple[list[str], str | None]:
        """In the next ``limit`` live keys after ``after``, those with fewer than ``low``
        or more than ``high`` current copies or with a stale copy (with ``tombstones``:
        in the next tombstones, those some worker still holds).

        Returns them and the cursor for the next slice (None at the end): one walk of
        ``limit`` keys in SQL, whatever few it returns.
        """
        table = "deleted" if tombstones else "keys"
        db = self._db
        row = db.execute(_SLICE_END.format(table=table), (after, limit - 1)).fetchone()
        if row is None:
            row = db.execute(_SLICE_LAST.format(table=table), (after,)).fetchone()
            if row is None or row[0] is None:
                return [], None
        end = row[0]
        if tombstones:
            keys = [r[0] for r in db.execute(_TOMBS_HELD, (after, end))]
        else:
            keys = [r[0] for r in db.execute(_KEYS_OFF, (after, end, low, high))]
        return keys, end

    def held_after(
        self, worker: str, after: tuple[int, str], limit: int
    ) -> list[tuple[int, str]]:
        """Up to ``limit`` of ``worker``'s copies after ``after``, as (version, key).

        In the order of the ``replicas_worker`` index, so a cursor on the last row walks
        one worker's copies in slices, each an index search.
        """
        return list(self._db.execute(_HELD_AFTER, (worker, after[0], after[1], limit)))

    def examine(
        self, keys: Iterable[str]
    ) -> list[tuple[str, int | None, int | None, str | None, str | None, int | None]]:
        """Everything about a batch of keys: (key, current version, size, sha256, worker,
        that worker's version), one row per copy (worker None when there is none; the
        current version None when the key is not live), by key then worker."""
        db = self._db
        db.execute(_BATCH)
        db.execute("DELETE FROM temp.batch")
        db.executemany("INSERT OR IGNORE INTO temp.batch VALUES (?)", ((k,) for k in keys))
        rows = list(db.execute(_EXAMINE))
        db.execute("DELETE FROM temp.batch")
        return rows

    def list_keys(
        self, prefix: str = "", after: str | None = None, limit: int = 1000
    ) -> list[tuple[str, int, str, int, list[str]]]:
        """Up to ``limit`` live keys starting with ``prefix`` and greater than ``after``.

        Each as (key, size, sha256, version, workers holding the current version), in
        key order (UTF-8 byte order); one range search of the primary key.
        """
        if limit <= 0:
            return []
        if after is not None and after >= prefix:
            excl, low = True, after
        else:
            excl, low = False, prefix
        high = _prefix_end(prefix)
        params: tuple[object, ...] = (low, limit) if high is None else (low, high, limit)
        out: list[tuple[str, int, str, int, list[str]]] = []
        for key, size, digest, version, worker in self._db.execute(
            _LIST[excl, high is not None], params
        ):
            if not out or out[-1][0] != key:
                out.append((key, size, digest, version, []))
            if worker is not None:
                out[-1][4].append(worker)
        return out

    def counts(self) -> tuple[int, int, int]:
        """(live keys, current copies, bytes of the live keys' current versions)."""
        db = self._db
        keys, total = db.execute("SELECT count(*), total(size) FROM keys").fetchone()
        (replicas,) = db.execute(
            "SELECT count(*) FROM replicas AS r JOIN keys AS k"
            " ON k.key = r.key AND k.version = r.version"
        ).fetchone()
        return keys, replicas, int(total)

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the database (a checkpoint empties the WAL); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._db.close()
