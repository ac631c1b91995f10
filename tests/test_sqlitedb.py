"""The one SQLite opener: lock, WAL, pragmas, schema creation, migration and check.

Each store's own behaviour on open (job state, master state, worker index) is tested with
the store; here the opener itself, and that all three refuse a file another process holds.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from dsml.master.jobs import JOBS_FILE, JobError, JobManager
from dsml.master.state import STATE_FILE, MasterState, StateError
from dsml.sqlitedb import Schema, open_database, sync_level
from dsml.worker.store import INDEX_NAME, Store, StoreError


class OpenError(Exception):
    """The error the tests' owner raises."""


TABLES = (
    "CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS t(x)",
)


def open_at(path: Path, schema: Schema, synchronous: str = "NORMAL") -> sqlite3.Connection:
    db, _meta = open_database(
        path, what="test file", schema=schema, synchronous=synchronous, error=OpenError
    )
    return db


def test_a_new_file_is_created_in_wal_with_its_meta(tmp_path: Path) -> None:
    """A new file (its directory made too) gets its tables, the schema row and the seeded
    meta rows; it is in WAL mode at the asked level, with no -shm file."""
    path = tmp_path / "sub" / "f.sqlite3"
    db, meta = open_database(
        path,
        what="test file",
        schema=Schema(3, TABLES, meta=(("counter", 7),)),
        synchronous="full",
        error=OpenError,
        cache_kib=1024,
    )
    try:
        assert meta == {"schema": 3, "counter": 7}
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert db.execute("PRAGMA cache_size").fetchone()[0] == -1024
        db.execute("INSERT INTO t VALUES (1)")
        assert not (tmp_path / "sub" / "f.sqlite3-shm").exists()
    finally:
        db.close()


def test_a_bad_level_is_a_value_error() -> None:
    assert sync_level("normal") == "NORMAL"
    with pytest.raises(ValueError, match="synchronous must be one of"):
        sync_level("sometimes")


def test_older_versions_are_migrated_step_by_step_in_one_transaction(tmp_path: Path) -> None:
    """Each migration turns version k into k+1; the file ends at the current version."""
    path = tmp_path / "f.sqlite3"
    open_at(path, Schema(1, TABLES)).close()
    steps: list[int] = []

    def step(k: int) -> Callable[[sqlite3.Connection], None]:
        def migrate(db: sqlite3.Connection) -> None:
            steps.append(k)
            db.execute(f"ALTER TABLE t ADD COLUMN c{k}")

        return migrate

    db = open_at(path, Schema(3, TABLES, migrations={1: step(1), 2: step(2)}))
    try:
        assert steps == [1, 2]
        cols = [row[1] for row in db.execute("PRAGMA table_info(t)")]
        assert cols == ["x", "c1", "c2"]
        assert db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == (3,)
    finally:
        db.close()


def test_a_failing_migration_leaves_the_file_at_its_old_version(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite3"
    open_at(path, Schema(1, TABLES)).close()

    def half(db: sqlite3.Connection) -> None:
        db.execute("ALTER TABLE t ADD COLUMN c1")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        open_at(path, Schema(2, TABLES, migrations={1: half}))
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone() == (1,)
        assert [row[1] for row in db.execute("PRAGMA table_info(t)")] == ["x"]
    finally:
        db.close()


def test_an_unknown_version_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite3"
    open_at(path, Schema(5, TABLES)).close()
    refused = r"test file '.*f\.sqlite3' has schema 5, this code knows 4"
    with pytest.raises(OpenError, match=refused):
        open_at(path, Schema(4, TABLES))
    open_at(path, Schema(5, TABLES)).close()  # refused, not harmed


_HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    kind, path = sys.argv[1], Path(sys.argv[2])
    if kind == "jobs":
        from twisted.internet.task import Clock
        from dsml.master.jobs import JobManager
        held = JobManager(path, Clock(), synchronous="NORMAL")
    elif kind == "state":
        from dsml.master.state import MasterState
        held = MasterState(path, synchronous="NORMAL")
    else:
        from dsml.worker.store import Store
        held = Store(path)
    print("held", flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize(
    ("kind", "file", "error", "what"),
    [
        ("jobs", JOBS_FILE, JobError, "job state"),
        ("state", STATE_FILE, StateError, "master state"),
        ("store", INDEX_NAME, StoreError, "store"),
    ],
)
def test_every_store_refuses_a_file_another_process_holds(
    tmp_path: Path, kind: str, file: str, error: type[Exception], what: str
) -> None:
    """While another process holds it, opening fails at once with the store's own error,
    naming the file; once that process is gone, it opens."""

    def open_it() -> JobManager | MasterState | Store:
        if kind == "jobs":
            return JobManager(tmp_path, Clock(), synchronous="NORMAL")
        if kind == "state":
            return MasterState(tmp_path, synchronous="NORMAL")
        return Store(tmp_path)

    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, kind, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(error, match=f"{what} '.*{file}' is in use by another process"):
            open_it()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    open_it().close()
