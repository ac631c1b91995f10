"""The job state file's schema: its tables, the migrations of older files, and the
statements the :class:`~.journal.Journal` writes and reads them with.

A column added by a migration is appended (``ALTER TABLE ADD COLUMN``), so a new table
lists the columns in the order a migrated one has them, and one statement fits both.
Schema 2 added ``attempts.stderr_tail``, 3 ``jobs.owner``, 4 the data locality of each
attempt (``attempts.local``: 1 started on a worker the directory named as holding every
input, 0 not, NULL for a task without inputs or an attempt stored before) and its
job's totals (``jobs.local``, ``jobs.remote``: 0 for a job stored before).
"""

from __future__ import annotations

import sqlite3
from typing import Final

from ...sqlitedb import Schema

__all__ = ["JOBS_FILE", "SCHEMA", "SCHEMA_VERSION"]

SCHEMA_VERSION: Final = 4

#: The state file's name under the master's ``state_dir``.
JOBS_FILE: Final = "jobs.sqlite3"

TABLES: Final = (
    "CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value) WITHOUT ROWID",
    # counts: tasks per state, as JSON; exact once the job is final (live jobs are in memory).
    "CREATE TABLE IF NOT EXISTS jobs(seq INTEGER PRIMARY KEY, name TEXT NOT NULL,"
    " priority INTEGER NOT NULL, after TEXT NOT NULL, state TEXT NOT NULL,"
    " created REAL NOT NULL, started REAL, finished REAL, reason TEXT NOT NULL,"
    " ntasks INTEGER NOT NULL, counts TEXT NOT NULL,"
    " owner TEXT NOT NULL DEFAULT '',"  # schema 3
    " local INTEGER NOT NULL DEFAULT 0, remote INTEGER NOT NULL DEFAULT 0)",  # schema 4
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state)",
    "CREATE TABLE IF NOT EXISTS tasks(job INTEGER NOT NULL, idx INTEGER NOT NULL,"
    " spec TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL,"
    " PRIMARY KEY(job, idx)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS attempts(id INTEGER PRIMARY KEY, job INTEGER NOT NULL,"
    " idx INTEGER NOT NULL, worker TEXT NOT NULL, incarnation INTEGER NOT NULL,"
    " state TEXT NOT NULL, started REAL NOT NULL, ended REAL, exit_code INTEGER,"
    " signal INTEGER, duration REAL, peak_rss INTEGER, reason TEXT NOT NULL,"
    " stderr_tail TEXT NOT NULL DEFAULT '',"  # schema 2
    " local INTEGER)",  # schema 4
    "CREATE INDEX IF NOT EXISTS attempts_job ON attempts(job, id)",
    # A page of a stored job's status reads its attempts by task index; a purge deletes
    # them by task index in bounded ranges.  (Made on open of an older file too.)
    "CREATE INDEX IF NOT EXISTS attempts_task ON attempts(job, idx)",
    # A task's result carried by its worker's report (JobManager.result): made on open
    # of an older file too, so no migration.
    "CREATE TABLE IF NOT EXISTS results(job INTEGER NOT NULL, idx INTEGER NOT NULL,"
    " data BLOB NOT NULL, PRIMARY KEY(job, idx)) WITHOUT ROWID",
)


def _add_stderr_tail(db: sqlite3.Connection) -> None:
    """Schema 1 to 2: attempts get their stderr tail."""
    db.execute("ALTER TABLE attempts ADD COLUMN stderr_tail TEXT NOT NULL DEFAULT ''")


def _add_owner(db: sqlite3.Connection) -> None:
    """Schema 2 to 3: jobs get their owner ("" for the jobs already stored: unknown)."""
    db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")


def _add_locality(db: sqlite3.Connection) -> None:
    """Schema 3 to 4: attempts get their locality (unknown for those stored), jobs the
    counts of local and remote attempts (0 and 0 for those stored)."""
    db.execute("ALTER TABLE jobs ADD COLUMN local INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE jobs ADD COLUMN remote INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE attempts ADD COLUMN local INTEGER")


SCHEMA: Final = Schema(
    version=SCHEMA_VERSION,
    tables=TABLES,
    meta=(("next_job", 1), ("attempt_reserved", 0)),
    migrations={1: _add_stderr_tail, 2: _add_owner, 3: _add_locality},
)

INSERT_JOB: Final = "REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
UPDATE_JOB: Final = (
    "UPDATE jobs SET state = ?, started = ?, finished = ?, reason = ?, counts = ?,"
    " local = ?, remote = ? WHERE seq = ?"
)
INSERT_TASK: Final = "REPLACE INTO tasks VALUES (?, ?, ?, ?, ?)"
UPDATE_TASK: Final = "UPDATE tasks SET state = ?, reason = ? WHERE job = ? AND idx = ?"
PUT_ATTEMPT: Final = (
    "REPLACE INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SET_META: Final = "REPLACE INTO meta VALUES (?, ?)"
JOB_COLS: Final = (
    "SELECT seq, name, priority, after, state, created, started, finished, reason, ntasks,"
    " counts, owner, local, remote FROM jobs"
)
TASK_COLS: Final = "SELECT idx, spec, state, reason FROM tasks WHERE job = ? ORDER BY idx"
TASK_PAGE: Final = (
    "SELECT idx, state, reason, spec FROM tasks WHERE job = ? AND idx >= ? AND idx < ?"
    " ORDER BY idx"
)
_ATTEMPT_SELECT: Final = (
    "SELECT id, idx, worker, incarnation, state, started, ended, exit_code, signal,"
    " duration, peak_rss, reason, stderr_tail, local FROM attempts"
)
ATTEMPT_COLS: Final = _ATTEMPT_SELECT + " WHERE job = ? ORDER BY id"
ATTEMPT_PAGE: Final = _ATTEMPT_SELECT + " WHERE job = ? AND idx >= ? AND idx < ? ORDER BY id"


def flag(value: object) -> bool | None:
    """A stored 0/1/NULL as False/True/None."""
    return None if value is None else bool(value)
