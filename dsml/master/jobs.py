"""The job manager (the seed's JobManager): a durable queue of jobs, their tasks and attempts.

Plain logic over one SQLite file (``state_dir/jobs.sqlite3``), no network: the master's
service turns requests and worker messages into calls on :class:`JobManager` and sends the
:class:`Assignment` objects it returns down the workers' connections.

Model::

    job      queued ──▶ running ──▶ succeeded | failed | cancelled
    task     waiting ──▶ queued ──▶ running ──▶ succeeded | failed | cancelled
                            ▲          │
                            └──────────┘  attempt failed / timed out / lost, attempts left
    attempt  running ──▶ succeeded | failed | timeout | lost | cancelled

* A job is a list of tasks (an array job is just many :class:`TaskSpec`, index 0..n-1).  It
  is ``queued`` until one of its tasks gets an attempt, then ``running``.
* A task is ``waiting`` while a job it comes ``after`` has not succeeded, ``queued`` when it
  may be offered to a worker, ``running`` while exactly one attempt runs it.
* Every offer of a task to a worker is a new *attempt*, with an id unique for the life of the
  state file, bound to the worker's name and incarnation (fencing: see :meth:`finished`).
  A task never has two running attempts, so at most one attempt of a task ever succeeds.
* Every way an attempt can end without success counts against ``max_attempts``: a non-zero
  exit, a timeout, a lost worker (peer-systems §4.1 and §4.14: no endless retry loops).
  While attempts remain the task goes back to the queue at its old place (its job's priority
  and submit order, its index), else it fails with the last attempt's reason.
* A job ends when all its tasks have: ``succeeded`` if all succeeded, else ``failed``.  A
  failed task does **not** stop its siblings: the rest of the job still runs and the job is
  failed at the end.  Array jobs are mostly sweeps, where the other results are wanted; a
  fail-fast option can come later.
* ``after``: a job's tasks wait until every job it names has succeeded.  If one of them fails
  or is cancelled, the job fails with reason ``dependency jN failed`` (or ``cancelled``)
  and its tasks are cancelled without ever running; this cascades down the chain.
* :meth:`cancel` ends a job at once: its unfinished tasks and their running attempts become
  ``cancelled``, results arriving later are refused, and the caller is told which
  (worker, attempt) pairs to kill.

Scheduling (:meth:`next_assignments`): a heap of the queued tasks, ordered by job priority
(higher first), then submit order, then task index.  A worker asks with its free slots and
gets tasks whose ``slots`` fit, never more than it has free (no prefetch hoarding,
peer-systems §4.10).  A task too wide for the slots left is skipped, not waited for: smaller
tasks behind it may fill the worker (so a wide task can wait behind a steady stream of
narrow ones of the same or higher priority: no slot reservation yet).  Locality: among
tasks of the *same* priority, one whose every input the worker already holds goes first,
but only within the first :data:`LOCALITY_WINDOW` queued tasks, so a remote task is never
passed over forever.

Durability (group commit): every change (a submit, an attempt created, a result, a lost
worker, a cancel) is made in memory at once and marked dirty; one ``callLater(commit_delay)``
writes everything dirty in ONE transaction (``executemany``) at ``synchronous=FULL``, and
only then fires the Deferreds that acknowledge those changes (:meth:`submit`,
:meth:`finished`, :meth:`cancel`, :meth:`committed`, :meth:`wait_for`).  A burst of
thousands of submits and results is a handful of fsyncs.  If a commit fails (disk full) the
changes stay dirty and are retried after :data:`RETRY_DELAY`; nothing is acknowledged before
it is on disk.  Reads (:meth:`job`, :meth:`jobs`) show the state in memory, which may be
one batch ahead of the disk.

:meth:`next_assignments` returns before its attempts are committed (the worker should start
at once).  If the master dies in between, the attempt is forgotten and its task is still
queued on disk: it runs again, and the worker that got the forgotten attempt is told to kill
it when it reconciles (an unknown attempt id).  That attempt does not count against
``max_attempts`` (nothing recorded it).  Attempt ids are reserved on disk in blocks of
:data:`ATTEMPT_BLOCK` ahead of use, so an id handed out before a crash is never handed out
again.

Restart: on open every job that is not final is loaded with its tasks and attempts; queued
tasks go back into the heap in their order, running attempts stay running bound to their
worker and incarnation.  Workers that come back call :meth:`reconcile` (running attempts
re-bound to the new incarnation, results that arrived while the master was down committed,
missing ones lost); the service calls :meth:`worker_lost` for those that do not return
within the heartbeat timeout.  Final jobs are evicted from memory once their final state is
committed and read back from SQLite when asked for.  A state file of an older schema
(version 1, without ``attempts.stderr_tail``) is migrated in place when opened, in the
same transaction that checks the schema.

Costs: the queue is a heap plus a sorted *front* of its :data:`LOCALITY_WINDOW` smallest
entries; :meth:`next_assignments` looks only at the front, so each task given costs one
heap pop and a scan of at most the window (no full scans, no pops and pushes back);
:meth:`finished` is O(1) plus a heap push on a retry; :meth:`worker_lost` and
:meth:`reconcile` touch only that worker's attempts; :meth:`cancel` is O(tasks of the job),
and the queue entries it leaves behind are dropped when met or compacted in bulk.

One writer: this object.  Its state changes on the reactor thread, in plain synchronous
code; a batch's rows are taken there too, and its transaction runs in a thread when the
master passes ``run_in_thread`` (one batch at a time, the connection behind a lock), so the
reactor goes on dispatching tasks and taking results through each fsync (measured: the
inline commits were a third of the master's time under a stream of short tasks, every
slot idle meanwhile).  The SQLite file is opened with an exclusive lock, like
:mod:`dsml.master.state`'s.
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Final

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import DsmlError
from ..fsutil import fsync_dir as _fsync_dir
from ..protocol import limits
from ..protocol.methods import HeaderValueError, check_key

__all__ = [
    "ATTEMPT_BLOCK",
    "JOBS_FILE",
    "LOCALITY_WINDOW",
    "MAX_STDERR_TAIL",
    "AttemptView",
    "Assignment",
    "FinishedReport",
    "JobError",
    "JobManager",
    "JobSpec",
    "JobView",
    "QueuePlace",
    "TaskSpec",
    "TaskView",
    "holds_nothing",
]

log = Logger()

#: 2 added ``attempts.stderr_tail``; a version-1 file is migrated in place when opened.
SCHEMA_VERSION: Final = 2

#: The state file's name under the master's ``state_dir``.
JOBS_FILE: Final = "jobs.sqlite3"

# -- states ------------------------------------------------------------------------------

QUEUED: Final = "queued"
RUNNING: Final = "running"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
WAITING: Final = "waiting"
LOST: Final = "lost"
TIMEOUT: Final = "timeout"

JOB_STATES: Final = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TASK_STATES: Final = (WAITING, QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ATTEMPT_STATES: Final = (RUNNING, SUCCEEDED, FAILED, LOST, TIMEOUT, CANCELLED)
FINAL: Final = frozenset({SUCCEEDED, FAILED, CANCELLED})

#: The reason a worker gives for an attempt it killed at its timeout.
REASON_TIMEOUT: Final = "timeout"
#: The reason of an attempt whose worker died.
REASON_WORKER_DIED: Final = "lost: worker died"
#: The reason of an attempt its worker did not report when it reconciled.
REASON_NOT_REPORTED: Final = "lost: not running on its worker after a reconnect"
REASON_CANCELLED: Final = "cancelled"

# -- limits ------------------------------------------------------------------------------

#: Most tasks in one job.
MAX_TASKS: Final = 100_000
#: Most slots one task may ask for (the most a worker may declare).
MAX_SLOTS: Final = limits.MAX_SLOTS
#: Longest task timeout, in seconds (30 days).
MAX_TIMEOUT: Final = 30 * 24 * 3600.0
#: Most attempts a task may be given.
MAX_ATTEMPTS: Final = 100
#: Priorities run from -MAX_PRIORITY to MAX_PRIORITY; higher runs first.
MAX_PRIORITY: Final = 1000
#: Most jobs one job may come after.
MAX_AFTER: Final = 1000
#: Longest job name, in characters.
MAX_NAME: Final = 1024
#: Longest reason kept for an attempt, in characters (a worker's text, the tail dropped).
MAX_REASON: Final = 1024
#: Longest stderr tail kept for a failed attempt, in characters (its last ones).  The
#: worker sends at most 2,048 bytes; this holds whatever a worker sends to the same.
MAX_STDERR_TAIL: Final = 2048
#: :meth:`JobManager.queue_places` counts the queued tasks ahead of a job's own only
#: while at most this many jobs are live (the count walks them all).
MAX_JOBS_COUNTED: Final = 1000

#: Locality may reorder only within this many queued tasks at the head of the queue.
LOCALITY_WINDOW: Final = 64
#: Attempt ids reserved on disk at a time (see the module docstring).
ATTEMPT_BLOCK: Final = 10_000
#: Seconds before a failed commit is retried.
RETRY_DELAY: Final = 1.0

_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_JOB_ID: Final = re.compile(r"j([1-9][0-9]{0,17})\Z")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Control characters a stderr tail may not carry (newline and tab it may).
_TAIL_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SYNC_LEVELS: Final = ("OFF", "NORMAL", "FULL", "EXTRA")

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value) WITHOUT ROWID",
    # counts: tasks per state, as JSON; exact once the job is final (live jobs are in memory).
    "CREATE TABLE IF NOT EXISTS jobs(seq INTEGER PRIMARY KEY, name TEXT NOT NULL,"
    " priority INTEGER NOT NULL, after TEXT NOT NULL, state TEXT NOT NULL,"
    " created REAL NOT NULL, started REAL, finished REAL, reason TEXT NOT NULL,"
    " ntasks INTEGER NOT NULL, counts TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state)",
    "CREATE TABLE IF NOT EXISTS tasks(job INTEGER NOT NULL, idx INTEGER NOT NULL,"
    " spec TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL,"
    " PRIMARY KEY(job, idx)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS attempts(id INTEGER PRIMARY KEY, job INTEGER NOT NULL,"
    " idx INTEGER NOT NULL, worker TEXT NOT NULL, incarnation INTEGER NOT NULL,"
    " state TEXT NOT NULL, started REAL NOT NULL, ended REAL, exit_code INTEGER,"
    " signal INTEGER, duration REAL, peak_rss INTEGER, reason TEXT NOT NULL,"
    # Last (schema 2): ALTER TABLE ADD COLUMN appends, so a migrated file has the same
    # column order as a new one and _PUT_ATTEMPT fits both.
    " stderr_tail TEXT NOT NULL DEFAULT '')",
    "CREATE INDEX IF NOT EXISTS attempts_job ON attempts(job, id)",
)

_INSERT_JOB: Final = "REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_UPDATE_JOB: Final = (
    "UPDATE jobs SET state = ?, started = ?, finished = ?, reason = ?, counts = ? WHERE seq = ?"
)
_INSERT_TASK: Final = "REPLACE INTO tasks VALUES (?, ?, ?, ?, ?)"
_UPDATE_TASK: Final = "UPDATE tasks SET state = ?, reason = ? WHERE job = ? AND idx = ?"
_PUT_ATTEMPT: Final = "REPLACE INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SET_META: Final = "REPLACE INTO meta VALUES (?, ?)"
_JOB_COLS: Final = (
    "SELECT seq, name, priority, after, state, created, started, finished, reason, ntasks,"
    " counts FROM jobs"
)
_ATTEMPT_COLS: Final = (
    "SELECT id, idx, worker, incarnation, state, started, ended, exit_code, signal,"
    " duration, peak_rss, reason, stderr_tail FROM attempts WHERE job = ? ORDER BY id"
)


# -- specs -------------------------------------------------------------------------------


def _tuple(value: Any) -> Any:
    """Turn a list (from JSON) into a tuple; leave anything else for validation."""
    return tuple(value) if isinstance(value, list) else value


def _pairs(value: Any) -> Any:
    """Turn a list of lists (from JSON) into a tuple of tuples; leave anything else."""
    if isinstance(value, (list, tuple)):
        return tuple(tuple(p) if isinstance(p, list) else p for p in value)
    return value


@attrs.frozen
class TaskSpec:
    """One command to run: what to stage in, what to collect, how much room it needs.

    Paths are relative to the task's working directory; keys are dsml keys.
    """

    #: The program and its arguments (no shell).
    command: tuple[str, ...] = attrs.field(converter=_tuple)
    #: Extra environment variables, (name, value).
    env: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    #: Keys to fetch before the run, (key, path).
    inputs: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    #: Files to upload after a successful run, (path, key).
    outputs: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    #: Worker slots the task occupies.
    slots: int = 1
    #: Wall-clock limit in seconds (enforced by the worker), or None.
    timeout: float | None = None
    #: Attempts before the task fails; every failure, timeout and lost worker counts.
    max_attempts: int = 3


@attrs.frozen
class JobSpec:
    """A job: tasks, a priority (higher first), and the jobs it must wait for."""

    name: str
    tasks: tuple[TaskSpec, ...] = attrs.field(converter=_tuple)
    priority: int = 0
    #: Job ids that must all succeed before this job's tasks are queued.
    after: tuple[str, ...] = attrs.field(default=(), converter=_tuple)


@attrs.frozen
class Assignment:
    """A task given to a worker: run ``spec`` as attempt ``attempt_id``."""

    attempt_id: int
    job_id: str
    task_index: int
    spec: TaskSpec
    #: Which attempt of the task this is, from 1 (for log names and messages).
    number: int = 1


@attrs.frozen
class FinishedReport:
    """A worker's report of an attempt that ended (see :meth:`JobManager.reconcile`)."""

    attempt_id: int
    exit_code: int | None
    signal: int | None
    duration: float
    peak_rss: int
    reason: str = ""
    #: The last lines of a failed attempt's stderr ("" for none).
    stderr_tail: str = ""


@attrs.frozen
class AttemptView:
    """What is known of one attempt."""

    id: int
    worker: str
    incarnation: int
    state: str
    started: float
    ended: float | None
    exit_code: int | None
    signal: int | None
    duration: float | None
    peak_rss: int | None
    reason: str
    #: The last lines of its stderr if it failed (at most :data:`MAX_STDERR_TAIL`
    #: characters, no control characters but newline and tab), else "".
    stderr_tail: str = ""


@attrs.frozen
class TaskView:
    """One task of a job, with its attempts, oldest first."""

    index: int
    state: str
    reason: str
    attempts: tuple[AttemptView, ...]
    #: For a ``waiting`` task, the jobs it waits for ("job j3 to succeed"); else "".
    #: (Why a ``queued`` task waits depends on the workers: the router says that.)
    waiting_for: str = ""


@attrs.frozen
class QueuePlace:
    """Where a queued task stands (see :meth:`JobManager.queue_places`)."""

    #: The slots it needs.
    slots: int
    #: Queued tasks before it in the queue order; None when counting them is not cheap.
    ahead: int | None


@attrs.frozen
class JobView:
    """A job as the manager knows it now.

    ``counts`` has every task state as a key.  ``tasks`` is empty when the view was asked
    for without them (:meth:`JobManager.jobs`).
    """

    id: str
    name: str
    state: str
    priority: int
    after: tuple[str, ...]
    created: float
    started: float | None
    finished: float | None
    reason: str
    counts: dict[str, int]
    done: int
    total: int
    tasks: tuple[TaskView, ...] = ()


class JobError(DsmlError):
    """A job request that cannot be carried out: ``bad-job`` or ``not-found``."""

    code = "bad-job"


def holds_nothing(key: str) -> bool:
    """The default locality oracle: the worker holds no inputs (locality is skipped)."""
    return False


# -- in-memory records -------------------------------------------------------------------


@attrs.define(eq=False)
class _Attempt:
    """One attempt of a task, as held in memory (a row of ``attempts``)."""

    id: int
    task: _Task
    worker: str
    incarnation: int
    state: str
    started: float
    ended: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    duration: float | None = None
    peak_rss: int | None = None
    reason: str = ""
    stderr_tail: str = ""

    def view(self) -> AttemptView:
        return AttemptView(
            self.id,
            self.worker,
            self.incarnation,
            self.state,
            self.started,
            self.ended,
            self.exit_code,
            self.signal,
            self.duration,
            self.peak_rss,
            self.reason,
            self.stderr_tail,
        )

    def row(self) -> tuple[object, ...]:
        t = self.task
        return (
            self.id,
            t.job.seq,
            t.index,
            self.worker,
            self.incarnation,
            self.state,
            self.started,
            self.ended,
            self.exit_code,
            self.signal,
            self.duration,
            self.peak_rss,
            self.reason,
            self.stderr_tail,
        )


@attrs.define(eq=False)
class _Task:
    """One task of a live job, with all its attempts (a row of ``tasks``)."""

    job: _Job
    index: int
    spec: TaskSpec
    state: str
    reason: str = ""
    attempts: list[_Attempt] = attrs.Factory(list)
    #: The running attempt, if any.
    current: _Attempt | None = None

    def view(self, waiting_for: str = "") -> TaskView:
        """Its view; ``waiting_for`` is its job's sentence, kept only if it is waiting."""
        return TaskView(
            self.index,
            self.state,
            self.reason,
            tuple(a.view() for a in self.attempts),
            waiting_for if self.state == WAITING else "",
        )


@attrs.define(eq=False)
class _Job:
    """A live (or just finished, not yet committed) job, with its tasks."""

    seq: int
    name: str
    priority: int
    after: tuple[str, ...]
    state: str
    created: float
    started: float | None = None
    finished: float | None = None
    reason: str = ""
    tasks: list[_Task] = attrs.Factory(list)
    counts: dict[str, int] = attrs.Factory(lambda: dict.fromkeys(TASK_STATES, 0))
    #: Sequence numbers of the jobs it still waits for.
    pending: set[int] = attrs.Factory(set)
    #: True once its rows are committed (until then, a flush inserts it whole).
    stored: bool = False
    #: Deferreds of :meth:`JobManager.wait_for`.
    waiters: list[Deferred[JobView]] = attrs.Factory(list)

    @property
    def id(self) -> str:
        return f"j{self.seq}"

    @property
    def done(self) -> int:
        c = self.counts
        return c[SUCCEEDED] + c[FAILED] + c[CANCELLED]

    def waiting_for(self) -> str:
        """What its waiting tasks wait for: "job j3 to succeed", "jobs j3, j5 to succeed"."""
        ids = [f"j{seq}" for seq in sorted(self.pending)] or list(self.after)
        if len(ids) == 1:
            return f"job {ids[0]} to succeed"
        return f"jobs {', '.join(ids)} to succeed"

    def view(self, tasks: bool = True) -> JobView:
        # One sentence for all its waiting tasks (they wait for the same jobs).
        why = self.waiting_for() if tasks and self.counts[WAITING] else ""
        return JobView(
            id=self.id,
            name=self.name,
            state=self.state,
            priority=self.priority,
            after=self.after,
            created=self.created,
            started=self.started,
            finished=self.finished,
            reason=self.reason,
            counts=dict(self.counts),
            done=self.done,
            total=len(self.tasks),
            tasks=tuple(t.view(why) for t in self.tasks) if tasks else (),
        )

    def update_row(self) -> tuple[object, ...]:
        return (
            self.state,
            self.started,
            self.finished,
            self.reason,
            json.dumps(self.counts, separators=(",", ":")),
            self.seq,
        )

    def insert_row(self) -> tuple[object, ...]:
        return (
            self.seq,
            self.name,
            self.priority,
            json.dumps(list(self.after)),
            self.state,
            self.created,
            self.started,
            self.finished,
            self.reason,
            len(self.tasks),
            json.dumps(self.counts, separators=(",", ":")),
        )


#: A heap entry: (-priority, job seq, task index, task).  The first three are unique.
_Entry = tuple[int, int, int, _Task]


# -- spec encoding and validation ----------------------------------------------------------


def _spec_json(spec: TaskSpec) -> str:
    """The stored form of a task spec (defaults left out)."""
    d: dict[str, object] = {"command": spec.command}
    if spec.env:
        d["env"] = spec.env
    if spec.inputs:
        d["inputs"] = spec.inputs
    if spec.outputs:
        d["outputs"] = spec.outputs
    if spec.slots != 1:
        d["slots"] = spec.slots
    if spec.timeout is not None:
        d["timeout"] = spec.timeout
    if spec.max_attempts != 3:
        d["max_attempts"] = spec.max_attempts
    return json.dumps(d, separators=(",", ":"))


def _spec_from_json(text: str) -> TaskSpec:
    return TaskSpec(**json.loads(text))


def _bad(message: str) -> JobError:
    return JobError(message, "bad-job")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text(value: object, what: str) -> str:
    """A string with no NUL (no exec argument or environment entry can hold one)."""
    if not isinstance(value, str):
        raise _bad(f"{what} must be a string")
    if "\x00" in value:
        raise _bad(f"{what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{what} is not valid UTF-8") from None
    return value


def _check_path(value: object, what: str) -> None:
    """A relative path inside the task's working directory."""
    path = _check_text(value, what)
    if not path:
        raise _bad(f"{what} is empty")
    pure = PurePosixPath(path)
    if pure.is_absolute():
        raise _bad(f"{what} {path!r} is absolute; paths are relative to the task's directory")
    if ".." in pure.parts:
        raise _bad(f"{what} {path!r} contains '..'")
    if not pure.parts or pure.parts == (".",):
        raise _bad(f"{what} {path!r} names the task's directory itself")


def _check_job_key(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise _bad(f"{what} must be a string")
    try:
        check_key(value)
    except HeaderValueError as e:
        raise _bad(f"{what} {value[:80]!r}: {e.message}") from None


def _check_pairs(value: object, what: str) -> tuple[tuple[object, object], ...]:
    if not isinstance(value, tuple):
        raise _bad(f"{what} must be a list of pairs")
    for p in value:
        if not isinstance(p, tuple) or len(p) != 2:
            raise _bad(f"{what} must be a list of pairs")
    return value


def _check_task(i: int, t: object) -> None:
    """Raise a ``bad-job`` JobError naming task ``i`` and what is wrong with it."""
    w = f"task {i}:"
    if not isinstance(t, TaskSpec):
        raise _bad(f"{w} not a task spec")
    if not isinstance(t.command, tuple) or not t.command:
        raise _bad(f"{w} command is empty")
    for arg in t.command:
        _check_text(arg, f"{w} command argument")
    if not t.command[0]:
        raise _bad(f"{w} the program name is empty")
    seen: set[object] = set()
    for name, value in _check_pairs(t.env, f"{w} env"):
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise _bad(f"{w} environment name {name!r} is not [A-Za-z_][A-Za-z0-9_]*")
        if name in seen:
            raise _bad(f"{w} environment name {name!r} given twice")
        seen.add(name)
        _check_text(value, f"{w} environment value of {name}")
    for key, path in _check_pairs(t.inputs, f"{w} inputs"):
        _check_job_key(key, f"{w} input key")
        _check_path(path, f"{w} input path")
    for path, key in _check_pairs(t.outputs, f"{w} outputs"):
        _check_path(path, f"{w} output path")
        _check_job_key(key, f"{w} output key")
    if not _is_int(t.slots) or not 1 <= t.slots <= MAX_SLOTS:
        raise _bad(f"{w} slots must be an integer from 1 to {MAX_SLOTS}, not {t.slots!r}")
    if t.timeout is not None:
        ok = isinstance(t.timeout, (int, float)) and not isinstance(t.timeout, bool)
        if not ok or not 0 < t.timeout <= MAX_TIMEOUT:  # also refuses NaN
            raise _bad(
                f"{w} timeout must be more than 0 and at most {MAX_TIMEOUT:.0f} seconds,"
                f" not {t.timeout!r}"
            )
    if not _is_int(t.max_attempts) or not 1 <= t.max_attempts <= MAX_ATTEMPTS:
        raise _bad(
            f"{w} max_attempts must be an integer from 1 to {MAX_ATTEMPTS}, not {t.max_attempts!r}"
        )


# -- the manager -------------------------------------------------------------------------


class JobManager:
    """Jobs, tasks and attempts, in memory and in SQLite; see the module docstring."""

    def __init__(
        self,
        path: Path | str,
        clock: IReactorTime,
        *,
        commit_delay: float = 0.002,
        synchronous: str = "FULL",
        run_in_thread: Callable[[Callable[[], None]], Deferred[None]] | None = None,
    ) -> None:
        """Open (creating if needed) the job state at ``path`` and load the live jobs.

        ``path`` is the SQLite file, or an existing directory to hold :data:`JOBS_FILE`.
        ``clock`` schedules the group commits and gives the times recorded.  Changes are
        committed ``commit_delay`` seconds after the first one of a batch, at the
        ``synchronous`` level (FULL; tests may lower it).  ``run_in_thread`` runs a
        function in a thread and returns a Deferred of its end (``deferToThreadPool``):
        the group commits then run there, so the reactor goes on dispatching while one
        waits for its fsync; without it they run inline (tests, simulations).
        """
        synchronous = synchronous.upper()
        if synchronous not in _SYNC_LEVELS:
            raise ValueError(f"synchronous must be one of {_SYNC_LEVELS}, not {synchronous!r}")
        path = Path(path)
        if path.is_dir():
            path = path / JOBS_FILE
        self.path = path
        self.clock = clock
        self.commit_delay = commit_delay
        #: Transactions committed since open (group commits and attempt-id reservations).
        self.commits = 0
        self._closed = False
        self._call: IDelayedCall | None = None
        self._run_in_thread = run_in_thread
        #: The batch being committed in a thread (its acks and finalized jobs), if any.
        self._in_flight: _Batch | None = None
        #: Held while anyone uses the connection: a commit in its thread, or a read or
        #: reservation on the reactor thread (which then waits for the commit).
        self._db_lock = threading.Lock()

        # Live state.
        self._jobs: dict[int, _Job] = {}
        self._heap: list[_Entry] = []
        self._front: list[_Entry] = []
        #: Heap and front entries of tasks that left the queue other than by being given.
        self._dead = 0
        self._running: dict[int, _Attempt] = {}
        self._by_worker: dict[str, set[int]] = {}
        self._dependents: dict[int, list[_Job]] = {}
        #: Queued tasks, and those of them that name inputs (locality is only worth a look
        #: when some do).
        self._nqueued = 0
        self._queued_inputs = 0

        # The next batch.
        self._new_jobs: list[_Job] = []
        self._dirty_jobs: set[_Job] = set()
        self._dirty_tasks: set[_Task] = set()
        self._dirty_attempts: set[_Attempt] = set()
        self._acks: list[tuple[Deferred[Any], object]] = []
        self._finalized: list[_Job] = []

        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
        self._db = db
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            try:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as e:
                if "locked" in str(e):
                    raise JobError(
                        f"job state {str(path)!r} is in use by another process", "internal"
                    ) from None
                raise
            if mode.lower() != "wal":
                raise JobError(f"job state {str(path)!r} cannot use WAL mode ({mode})", "internal")
            db.execute("PRAGMA journal_size_limit=67108864")
            db.execute(f"PRAGMA synchronous={synchronous}")
            db.execute("PRAGMA cache_size=-65536")
            self._init_schema()
            _fsync_dir(path.parent)
            self._load()
        except BaseException:
            db.close()
            raise

    # -- opening -------------------------------------------------------------------------

    def _init_schema(self) -> None:
        """Create the tables, check the schema, load the counters, reserve attempt ids."""
        db = self._db
        with self._transaction():
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('next_job', 1)")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('attempt_reserved', 0)")
            (schema,) = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            if schema == 1:
                # In the same transaction: a crash leaves the file at version 1, whole.
                db.execute(
                    "ALTER TABLE attempts ADD COLUMN stderr_tail TEXT NOT NULL DEFAULT ''"
                )
                db.execute(_SET_META, ("schema", 2))
                log.info("jobs: {path} migrated from schema 1 to 2", path=str(self.path))
        meta = dict(db.execute("SELECT name, value FROM meta"))
        if meta["schema"] != SCHEMA_VERSION:
            raise JobError(
                f"job state {str(self.path)!r} has schema {meta['schema']!r},"
                f" this code knows {SCHEMA_VERSION}",
                "internal",
            )
        (top_job,) = db.execute("SELECT coalesce(max(seq), 0) FROM jobs").fetchone()
        (top_attempt,) = db.execute("SELECT coalesce(max(id), 0) FROM attempts").fetchone()
        self._next_job: int = max(int(meta["next_job"]), top_job + 1)
        #: Every id at or below this may have been handed out before; never reuse one.
        self._reserved: int = max(int(meta["attempt_reserved"]), top_attempt)
        self._next_attempt: int = self._reserved + 1
        self._reserve_now()

    def _load(self) -> None:
        """Bring every job that is not final back into memory (see the module docstring)."""
        db = self._db
        rows = list(
            db.execute(_JOB_COLS + " WHERE state IN (?, ?) ORDER BY seq", (QUEUED, RUNNING))
        )
        for seq, name, prio, after, state, created, started, finished, reason, _n, _c in rows:
            job = _Job(
                seq,
                name,
                prio,
                tuple(json.loads(after)),
                state,
                created,
                started,
                finished,
                reason,
                stored=True,
            )
            for idx, spec, tstate, treason in db.execute(
                "SELECT idx, spec, state, reason FROM tasks WHERE job = ? ORDER BY idx", (seq,)
            ):
                job.tasks.append(_Task(job, idx, _spec_from_json(spec), tstate, treason))
                job.counts[tstate] += 1
            for aid, idx, worker, inc, astate, *rest in db.execute(_ATTEMPT_COLS, (seq,)):
                task = job.tasks[idx]
                a = _Attempt(aid, task, worker, inc, astate, *rest)
                task.attempts.append(a)
                if astate == RUNNING:
                    task.current = a
                    self._running[aid] = a
                    self._by_worker.setdefault(worker, set()).add(aid)
            self._jobs[seq] = job
            for task in job.tasks:
                if task.state == QUEUED:
                    self._heap.append((-job.priority, seq, task.index, task))
                    self._nqueued += 1
                    if task.spec.inputs:
                        self._queued_inputs += 1
        heapq.heapify(self._heap)
        # Dependencies: re-evaluated from scratch, so a crash between a job's end and its
        # dependents' release (they commit together, but be safe) heals itself.
        for job in list(self._jobs.values()):
            if job.state in FINAL:
                continue
            if job.counts[WAITING]:
                self._wire_dependencies(job)
            elif job.done == len(job.tasks):
                self._maybe_done(job)
        log.info(
            "jobs: loaded {jobs} live jobs, {queued} queued tasks, {running} running attempts",
            jobs=len(self._jobs),
            queued=self._nqueued,
            running=len(self._running),
        )

    def _dep_state(self, job_id: str) -> str | None:
        """The state of job ``job_id`` (in memory or stored), None if unknown."""
        seq = _parse_job_id(job_id)
        if seq is None:
            return None
        job = self._jobs.get(seq)
        if job is not None:
            return job.state
        rows = self._read("SELECT state FROM jobs WHERE seq = ?", (seq,))
        return None if not rows else str(rows[0][0])

    def _wire_dependencies(self, job: _Job) -> None:
        """Make a job whose tasks wait wait for its unfinished dependencies, or end it."""
        for dep in job.after:
            state = self._dep_state(dep)
            if state is None or state in (FAILED, CANCELLED):
                self._fail_dependent(job, f"dependency {dep} {state or 'missing'}")
                return
        for dep in job.after:
            seq = _parse_job_id(dep)
            assert seq is not None
            if self._dep_state(dep) != SUCCEEDED and seq not in job.pending:
                job.pending.add(seq)
                self._dependents.setdefault(seq, []).append(job)
        if not job.pending:
            self._release(job)

    # -- submitting ----------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> Deferred[str]:
        """Add a job; the Deferred fires with its id once the job and its tasks are committed.

        Bad input raises :class:`JobError` at once (``bad-job``, or ``not-found`` for an
        unknown ``after`` id) and nothing is stored.
        """
        self._check_open()
        self._validate(spec)
        now = self.clock.seconds()
        job = _Job(self._next_job, spec.name, spec.priority, spec.after, QUEUED, now)
        self._next_job += 1
        failed_dep = None
        for dep in spec.after:
            state = self._dep_state(dep)
            if state in (FAILED, CANCELLED):
                failed_dep = f"dependency {dep} {state}"
                break
        blocked = failed_dep is None and any(self._dep_state(d) != SUCCEEDED for d in spec.after)
        first = WAITING if blocked or failed_dep else QUEUED
        job.tasks = [_Task(job, i, t, first) for i, t in enumerate(spec.tasks)]
        job.counts[first] = len(job.tasks)
        self._jobs[job.seq] = job
        self._new_jobs.append(job)
        if failed_dep is not None:
            self._fail_dependent(job, failed_dep)
        elif blocked:
            self._wire_dependencies(job)
        else:
            self._enqueue_all(job)
        d: Deferred[str] = Deferred()
        self._acks.append((d, job.id))
        self._schedule()
        log.info(
            "job {job} ({name!r}) submitted: {n} tasks, priority {priority}",
            job=job.id,
            name=job.name,
            n=len(job.tasks),
            priority=job.priority,
        )
        return d

    def _validate(self, spec: JobSpec) -> None:
        """Raise a JobError for anything :meth:`submit` must refuse."""
        if not isinstance(spec, JobSpec):
            raise _bad("not a job spec")
        name = spec.name
        if not isinstance(name, str) or len(name) > MAX_NAME or _CONTROL.search(name):
            raise _bad(f"job name must be text of at most {MAX_NAME} characters, no controls")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad("job name is not valid UTF-8") from None
        if not _is_int(spec.priority) or not -MAX_PRIORITY <= spec.priority <= MAX_PRIORITY:
            raise _bad(
                f"priority must be an integer from {-MAX_PRIORITY} to {MAX_PRIORITY},"
                f" not {spec.priority!r}"
            )
        tasks = spec.tasks
        if not isinstance(tasks, tuple) or not tasks:
            raise _bad("a job needs at least one task")
        if len(tasks) > MAX_TASKS:
            raise _bad(f"a job has at most {MAX_TASKS} tasks, not {len(tasks)}")
        for i, t in enumerate(tasks):
            _check_task(i, t)
        if not isinstance(spec.after, tuple) or len(spec.after) > MAX_AFTER:
            raise _bad(f"after must be a list of at most {MAX_AFTER} job ids")
        for dep in spec.after:
            if not isinstance(dep, str) or self._dep_state(dep) is None:
                raise JobError(f"after: no job {str(dep)[:80]!r}", "not-found")

    # -- scheduling ----------------------------------------------------------------------

    def next_assignments(
        self,
        worker: str,
        incarnation: int,
        free_slots: int,
        holds: Callable[[str], bool] = holds_nothing,
        *,
        local_only: bool = False,
    ) -> list[Assignment]:
        """Give ``worker`` (at ``incarnation``) queued tasks that fit in ``free_slots``.

        Highest priority first, then submit order, then task index; tasks too wide for the
        slots left are skipped.  Among tasks of one priority, one whose inputs the worker
        all holds (``holds(key)``) goes first, within the first :data:`LOCALITY_WINDOW`
        queued tasks.  Each task given is a new running attempt, effective at once in
        memory and committed with the next batch.

        With ``local_only``, only such local tasks are given (never one of a lower priority
        than the first task that fits): the dispatcher offers local work to every worker
        first, so a task goes to a holder of its inputs when one is free.  (Added for the
        locality fix of :meth:`~dsml.master.jobrouter.JobRouter.dispatch`.)
        """
        self._check_open()
        if free_slots <= 0 or not self._nqueued:
            return []
        local = holds is not holds_nothing and self._queued_inputs > 0
        if local_only and not local:
            return []
        cache: dict[str, bool] = {}
        memo: dict[_Task, bool] = {}

        def is_local(task: _Task) -> bool:
            known = memo.get(task)
            if known is not None:
                return known
            inputs = task.spec.inputs
            result = bool(inputs)
            for key, _ in inputs:
                held = cache.get(key)
                if held is None:
                    held = cache[key] = bool(holds(key))
                if not held:
                    result = False
                    break
            memo[task] = result
            return result

        out: list[Assignment] = []
        front = self._front
        free = free_slots
        while free > 0:
            self._fill_front()
            first = None
            for i, entry in enumerate(front):
                spec = entry[3].spec
                if entry[3].state != QUEUED:
                    first = -1  # a cancelled task's entry: drop them all, look again
                    break
                if spec.slots <= free:
                    first = i
                    break
            if first is None:
                break  # nothing in the window fits
            if first == -1:
                front[:] = [e for e in front if e[3].state == QUEUED]
                continue
            pick: int | None = first
            if local:
                top = front[first][0]
                pick = None if local_only else first
                for i in range(first, len(front)):
                    entry = front[i]
                    if entry[0] != top:
                        break  # locality never beats priority
                    task = entry[3]
                    if task.state == QUEUED and task.spec.slots <= free and is_local(task):
                        pick = i
                        break
            if pick is None:
                break  # local_only: nothing local fits
            task = front.pop(pick)[3]
            free -= task.spec.slots
            out.append(self._start(task, worker, incarnation))
        return out

    # The queue is two parts: ``_front``, a sorted list of (at most LOCALITY_WINDOW) entries
    # that are all smaller than every entry of ``_heap``, and the heap.  The scheduler only
    # looks at the front, so finding the first task that fits, or the first local one, never
    # pops and pushes back; the heap refills the front one pop per task given.  Entries of
    # tasks that are no longer queued (cancelled) are dropped when met.

    def _fill_front(self) -> None:
        front, heap = self._front, self._heap
        while len(front) < LOCALITY_WINDOW and heap:
            entry = heapq.heappop(heap)
            if entry[3].state == QUEUED:
                front.append(entry)

    def _push(self, task: _Task) -> None:
        """Put a queued task in the queue at its place."""
        entry = (-task.job.priority, task.job.seq, task.index, task)
        front = self._front
        if front and entry < front[-1]:
            bisect.insort(front, entry)
            if len(front) > LOCALITY_WINDOW:
                heapq.heappush(self._heap, front.pop())
        else:
            heapq.heappush(self._heap, entry)

    def _push_all(self, job: _Job, tasks: Iterable[_Task]) -> None:
        """Put many queued tasks of a job in the queue (the front goes back to the heap)."""
        heap = self._heap
        for entry in self._front:
            heapq.heappush(heap, entry)
        self._front.clear()
        key = -job.priority
        for task in tasks:
            heapq.heappush(heap, (key, job.seq, task.index, task))

    def _compact(self) -> None:
        """Drop the entries of tasks no longer queued once they outnumber the queued ones."""
        if self._dead > 1024 and self._dead > self._nqueued:
            live = [e for e in self._heap + self._front if e[3].state == QUEUED]
            heapq.heapify(live)
            self._heap = live
            self._front.clear()
            self._dead = 0

    def _start(self, task: _Task, worker: str, incarnation: int) -> Assignment:
        """Create a running attempt of a queued task on ``worker``."""
        aid = self._next_attempt
        if aid > self._reserved:
            self._reserve_now()
        self._next_attempt += 1
        now = self.clock.seconds()
        a = _Attempt(aid, task, worker, incarnation, RUNNING, now)
        task.attempts.append(a)
        task.current = a
        self._running[aid] = a
        self._by_worker.setdefault(worker, set()).add(aid)
        self._dirty_attempts.add(a)
        self._set_state(task, RUNNING)
        job = task.job
        if job.state == QUEUED:
            job.state = RUNNING
            job.started = now
            self._job_dirty(job)
        return Assignment(aid, job.id, task.index, task.spec, len(task.attempts))

    # -- results -------------------------------------------------------------------------

    def finished(
        self,
        attempt_id: int,
        worker: str,
        incarnation: int,
        *,
        exit_code: int | None,
        signal: int | None,
        duration: float,
        peak_rss: int,
        reason: str = "",
        stderr_tail: str = "",
    ) -> Deferred[bool]:
        """Record the end of an attempt; fires True once committed, False if refused.

        Fencing: refused, with nothing changed, unless the attempt is running and was given
        to exactly this worker and incarnation.  Exit code 0 with no signal succeeds the
        task; anything else fails the attempt (``timeout`` when ``reason`` is "timeout")
        and requeues the task while it has attempts left, else fails it.  A worker that
        fails an attempt after a zero exit (say, an output upload failed) reports
        ``exit_code=None`` with the reason.  ``stderr_tail``, the last lines of a failed
        attempt's stderr, is kept (its last :data:`MAX_STDERR_TAIL` characters, control
        characters but newline and tab replaced) unless the attempt succeeded.
        """
        self._check_open()
        a = self._running.get(attempt_id)
        if a is None or a.worker != worker or a.incarnation != incarnation:
            log.debug(
                "refused result of attempt {attempt} from {worker}#{incarnation}",
                attempt=attempt_id,
                worker=worker,
                incarnation=incarnation,
            )
            return succeed(False)
        self._complete(a, exit_code, signal, duration, peak_rss, reason, stderr_tail)
        d: Deferred[bool] = Deferred()
        self._acks.append((d, True))
        self._schedule()
        return d

    def _complete(
        self,
        a: _Attempt,
        exit_code: int | None,
        signal: int | None,
        duration: float,
        peak_rss: int,
        reason: str,
        stderr_tail: str = "",
    ) -> None:
        """Commit a running attempt's result (already fenced)."""
        reason = _storable(str(reason)[:MAX_REASON])
        a.exit_code = exit_code
        a.signal = signal
        a.duration = duration
        a.peak_rss = peak_rss
        # The worker's TaskManager says "timeout after N s"; a non-empty reason is a
        # failure even with exit code 0 (say, a declared output was missing).
        if reason == REASON_TIMEOUT or reason.startswith(REASON_TIMEOUT + " after "):
            state = TIMEOUT
        elif exit_code == 0 and signal is None and not reason:
            state = SUCCEEDED
        else:
            state = FAILED
            if not reason:
                if signal is not None:
                    reason = f"killed by signal {signal}"
                elif exit_code is not None:
                    reason = f"exit code {exit_code}"
                else:
                    reason = "failed"
        if state != SUCCEEDED:
            a.stderr_tail = _clean_tail(stderr_tail)
        self._end_attempt(a, state, reason)

    def worker_lost(self, worker: str, incarnation: int) -> list[int]:
        """``worker`` at ``incarnation`` (or earlier) died: its running attempts are lost.

        Each lost attempt counts against its task's ``max_attempts``: the task is requeued
        while attempts remain, else it fails with reason "lost: worker died".  Attempts of
        a later incarnation of the same name are not touched.  Returns the lost attempt ids.
        """
        self._check_open()
        lost = sorted(
            aid
            for aid in self._by_worker.get(worker, ())
            if self._running[aid].incarnation <= incarnation
        )
        for aid in lost:
            self._end_attempt(self._running[aid], LOST, REASON_WORKER_DIED)
        if lost:
            log.info(
                "worker {worker}#{incarnation} lost: attempts {attempts} lost",
                worker=worker,
                incarnation=incarnation,
                attempts=lost,
            )
        return lost

    def reconcile(
        self,
        worker: str,
        incarnation: int,
        running: Iterable[int],
        finished: Iterable[FinishedReport],
    ) -> list[int]:
        """Match a (re-)registering worker's attempts with the master's; return ids to kill.

        Call it when ``worker`` registers at ``incarnation``, before it is offered work.
        For the master's running attempts on that worker name from this or an earlier
        incarnation: one the worker reports *finished* is committed as if by
        :meth:`finished`; one it reports *running* is re-bound to ``incarnation`` and stays
        running; one it does not report is lost (counting against attempts).  Attempts it
        reports running that the master does not hold as running there (cancelled, lost,
        finished, unknown) are returned: the worker should kill them.  Use
        :meth:`committed` to learn when the changes are on disk.
        """
        self._check_open()
        done: set[int] = set()
        for rep in finished:
            done.add(rep.attempt_id)
            a = self._running.get(rep.attempt_id)
            if a is not None and a.worker == worker and a.incarnation <= incarnation:
                self._complete(
                    a, rep.exit_code, rep.signal, rep.duration, rep.peak_rss, rep.reason,
                    rep.stderr_tail,
                )
        kill: list[int] = []
        reported: set[int] = set()
        for aid in running:
            if aid in done or aid in reported:
                continue
            reported.add(aid)
            a = self._running.get(aid)
            if a is None or a.worker != worker or a.incarnation > incarnation:
                kill.append(aid)
            elif a.incarnation != incarnation:
                a.incarnation = incarnation
                self._dirty_attempts.add(a)
                self._schedule()
        missing = sorted(
            aid
            for aid in self._by_worker.get(worker, ())
            if aid not in reported and self._running[aid].incarnation <= incarnation
        )
        for aid in missing:
            self._end_attempt(self._running[aid], LOST, REASON_NOT_REPORTED)
        if kill or missing or done:
            log.info(
                "worker {worker}#{incarnation} reconciled: {n} running kept, results {done},"
                " lost {missing}, to kill {kill}",
                worker=worker,
                incarnation=incarnation,
                n=len(reported) - len(kill),
                done=sorted(done),
                missing=missing,
                kill=kill,
            )
        return sorted(kill)

    def _end_attempt(self, a: _Attempt, state: str, reason: str) -> None:
        """End a running attempt and move its task on (succeeded, requeued or failed)."""
        a.state = state
        a.ended = self.clock.seconds()
        a.reason = reason
        del self._running[a.id]
        mine = self._by_worker[a.worker]
        mine.discard(a.id)
        if not mine:
            del self._by_worker[a.worker]
        self._dirty_attempts.add(a)
        task = a.task
        task.current = None
        if state == CANCELLED:
            return  # the caller moves the task
        if state == SUCCEEDED:
            task.reason = ""
            self._set_state(task, SUCCEEDED)
        elif len(task.attempts) < task.spec.max_attempts:
            self._set_state(task, QUEUED)
            self._push(task)
            log.debug(
                "task {job}[{index}] requeued after attempt {attempt} {state}: {reason}",
                job=task.job.id,
                index=task.index,
                attempt=a.id,
                state=state,
                reason=reason,
            )
            return
        else:
            task.reason = reason
            self._set_state(task, FAILED)
            job = task.job
            if not job.reason:
                job.reason = f"task {task.index} failed: {reason}"
            log.info(
                "task {job}[{index}] failed after {n} attempts: {reason}",
                job=job.id,
                index=task.index,
                n=len(task.attempts),
                reason=reason,
            )
        self._maybe_done(task.job)

    # -- cancelling ----------------------------------------------------------------------

    def cancel(self, job_id: str) -> Deferred[list[tuple[str, int]]]:
        """Cancel a job; fires, once committed, with the (worker, attempt id) to kill.

        Its unfinished tasks and their running attempts become ``cancelled``; results
        for those attempts are refused from now on.  Cancelling a final job changes
        nothing and fires with no attempts.  An unknown id raises ``not-found``.
        """
        self._check_open()
        seq = _parse_job_id(job_id)
        job = self._jobs.get(seq) if seq is not None else None
        if job is None:
            if self._dep_state(job_id) is None:
                raise JobError(f"no job {job_id[:80]!r}", "not-found")
            return succeed([])
        if job.state in FINAL:
            return succeed([])
        kill: list[tuple[str, int]] = []
        for task in job.tasks:
            if task.state in FINAL:
                continue
            a = task.current
            if a is not None:
                kill.append((a.worker, a.id))
                self._end_attempt(a, CANCELLED, REASON_CANCELLED)
            task.reason = REASON_CANCELLED
            self._set_state(task, CANCELLED)
        self._end_job(job, CANCELLED, REASON_CANCELLED)
        self._compact()
        d: Deferred[list[tuple[str, int]]] = Deferred()
        self._acks.append((d, kill))
        self._schedule()
        log.info("job {job} cancelled; {n} running attempts to kill", job=job.id, n=len(kill))
        return d

    # -- job and task state --------------------------------------------------------------

    def _set_state(self, task: _Task, state: str) -> None:
        """Move a task to ``state``: counts, the inputs counter, the dirty set."""
        old = task.state
        job = task.job
        job.counts[old] -= 1
        job.counts[state] += 1
        delta = (state == QUEUED) - (old == QUEUED)
        if delta < 0 and state != RUNNING:
            self._dead += 1
        if delta:
            self._nqueued += delta
            if task.spec.inputs:
                self._queued_inputs += delta
        task.state = state
        if job.stored:
            self._dirty_tasks.add(task)
        self._schedule()

    def _job_dirty(self, job: _Job) -> None:
        if job.stored:
            self._dirty_jobs.add(job)
        self._schedule()

    def _enqueue_all(self, job: _Job) -> None:
        """Queue every task of a new job whose tasks were created queued."""
        self._push_all(job, job.tasks)
        for task in job.tasks:
            self._nqueued += 1
            if task.spec.inputs:
                self._queued_inputs += 1

    def _release(self, job: _Job) -> None:
        """Every dependency of ``job`` succeeded: its waiting tasks are queued."""
        released = [task for task in job.tasks if task.state == WAITING]
        for task in released:
            self._set_state(task, QUEUED)
        self._push_all(job, released)
        log.debug("job {job}: dependencies succeeded, tasks queued", job=job.id)

    def _fail_dependent(self, job: _Job, reason: str) -> None:
        """A dependency of ``job`` will never succeed: cancel its tasks, fail the job."""
        for task in job.tasks:
            if task.state not in FINAL:
                task.reason = reason
                self._set_state(task, CANCELLED)
        self._end_job(job, FAILED, reason)

    def _maybe_done(self, job: _Job) -> None:
        """End ``job`` if all its tasks have ended."""
        if job.state in FINAL or job.done < len(job.tasks):
            return
        if job.counts[FAILED] or job.counts[CANCELLED]:
            self._end_job(job, FAILED, job.reason or "a task failed")
        else:
            self._end_job(job, SUCCEEDED, "")

    def _end_job(self, job: _Job, state: str, reason: str) -> None:
        """Give ``job`` its final state and settle the jobs that come after it."""
        work = [(job, state, reason)]
        while work:
            j, s, r = work.pop()
            if j.state in FINAL:
                continue
            j.state = s
            j.reason = r
            j.finished = self.clock.seconds()
            self._job_dirty(j)
            self._finalized.append(j)
            log.info("job {job} {state}{why}", job=j.id, state=s, why=f": {r}" if r else "")
            for d in self._dependents.pop(j.seq, ()):
                if d.state in FINAL:
                    continue
                if s == SUCCEEDED:
                    d.pending.discard(j.seq)
                    if not d.pending:
                        self._release(d)
                else:
                    why = f"dependency {j.id} {s}"
                    for task in d.tasks:
                        if task.state not in FINAL:
                            task.reason = why
                            self._set_state(task, CANCELLED)
                    work.append((d, FAILED, why))

    # -- reading -------------------------------------------------------------------------

    def job(self, job_id: str, *, tasks: bool = True) -> JobView:
        """The job ``job_id`` with its tasks and their attempts (``tasks=False``: without).

        Raises ``not-found`` for an unknown id.
        """
        self._check_open()
        seq = _parse_job_id(job_id)
        if seq is not None:
            job = self._jobs.get(seq)
            if job is not None:
                return job.view(tasks)
            rows = self._read(_JOB_COLS + " WHERE seq = ?", (seq,))
            if rows:
                return self._stored_view(rows[0], tasks)
        raise JobError(f"no job {str(job_id)[:80]!r}", "not-found")

    def jobs(self, limit: int = 100) -> list[JobView]:
        """The ``limit`` most recent jobs, newest first, without their tasks."""
        self._check_open()
        if limit <= 0:
            return []
        views = {seq: job.view(False) for seq, job in self._jobs.items()}
        for row in self._read(_JOB_COLS + " ORDER BY seq DESC LIMIT ?", (limit,)):
            if row[0] not in views:
                views[row[0]] = self._stored_view(row, False)
        return [views[seq] for seq in sorted(views, reverse=True)[:limit]]

    def _stored_view(self, row: tuple[Any, ...], tasks: bool) -> JobView:
        seq, name, prio, after, state, created, started, finished, reason, ntasks, counts = row
        counts = json.loads(counts)
        task_views: tuple[TaskView, ...] = ()
        if tasks:
            attempts: dict[int, list[AttemptView]] = {}
            for aid, idx, *rest in self._read(_ATTEMPT_COLS, (seq,)):
                attempts.setdefault(idx, []).append(AttemptView(aid, *rest))
            task_views = tuple(
                TaskView(idx, tstate, treason, tuple(attempts.get(idx, ())))
                for idx, tstate, treason in self._read(
                    "SELECT idx, state, reason FROM tasks WHERE job = ? ORDER BY idx", (seq,)
                )
            )
        return JobView(
            id=f"j{seq}",
            name=name,
            state=state,
            priority=prio,
            after=tuple(json.loads(after)),
            created=created,
            started=started,
            finished=finished,
            reason=reason,
            counts=counts,
            done=counts[SUCCEEDED] + counts[FAILED] + counts[CANCELLED],
            total=ntasks,
            tasks=task_views,
        )

    def wait_for(self, job_id: str) -> Deferred[JobView]:
        """Fire with the job's view once its final state is committed (at once if it is)."""
        self._check_open()
        seq = _parse_job_id(job_id)
        job = self._jobs.get(seq) if seq is not None else None
        if job is None:
            return succeed(self.job(job_id))  # stored final, or not-found
        d: Deferred[JobView] = Deferred()
        job.waiters.append(d)
        return d

    def queue_places(self, job_id: str) -> dict[int, QueuePlace]:
        """Where each queued task of a live job stands, by task index ({} for none).

        ``ahead`` counts the queued tasks before the task in the queue order (priority,
        submit order, index): its own job's, counted over its tasks, and other jobs',
        counted over the live jobs, only while there are at most
        :data:`MAX_JOBS_COUNTED` (else it is None).  So it costs O(tasks of the job)
        plus at most that many jobs, never a walk of the queue.  (The order is the
        queue's, not a promise: a wider task ahead may be passed, locality may reorder
        a window.)
        """
        self._check_open()
        seq = _parse_job_id(job_id)
        job = self._jobs.get(seq) if seq is not None else None
        if job is None or not job.counts[QUEUED]:
            return {}
        before: int | None = None
        if len(self._jobs) <= MAX_JOBS_COUNTED:
            key = (-job.priority, job.seq)
            before = sum(
                j.counts[QUEUED] for j in self._jobs.values() if (-j.priority, j.seq) < key
            )
        places: dict[int, QueuePlace] = {}
        mine = 0
        for task in job.tasks:
            if task.state == QUEUED:
                places[task.index] = QueuePlace(
                    task.spec.slots, None if before is None else before + mine
                )
                mine += 1
        return places

    def running_attempts(self, worker: str) -> list[int]:
        """The attempts the master holds as running on ``worker`` (any incarnation)."""
        return sorted(self._by_worker.get(worker, ()))

    def slots_of(self, attempt_id: int) -> int:
        """The slots the running attempt ``attempt_id`` occupies (0 if it is not running)."""
        a = self._running.get(attempt_id)
        return 0 if a is None else a.task.spec.slots

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def queued(self) -> int:
        """How many tasks are queued (ready to be offered to a worker)."""
        return self._nqueued

    # -- committing ----------------------------------------------------------------------

    def committed(self) -> Deferred[None]:
        """Fire once every change made so far is committed (at once if none is pending)."""
        if not self._pending():
            if self._in_flight is None:
                return succeed(None)
            d: Deferred[None] = Deferred()
            self._in_flight.acks.append((d, None))  # every change so far is in it
            return d
        d = Deferred()
        self._acks.append((d, None))
        self._schedule()
        return d

    def flush(self) -> None:
        """Start the pending batch's commit now (the timer would, ``commit_delay`` later).

        Inline without ``run_in_thread``; with it, the commit runs in its thread (or after
        the one in progress): wait for :meth:`committed` to know it is on disk.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._flush()

    def _pending(self) -> bool:
        return bool(
            self._new_jobs
            or self._dirty_jobs
            or self._dirty_tasks
            or self._dirty_attempts
            or self._acks
            or self._finalized
        )

    def _schedule(self) -> None:
        if self._call is None and not self._closed:
            self._call = self.clock.callLater(self.commit_delay, self._flush)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction: commit on success (counted), roll back on an exception."""
        db = self._db
        db.execute("BEGIN")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.commits += 1

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Rows of a query on the reactor thread (waits for a commit in progress)."""
        with self._db_lock:
            return self._db.execute(sql, args).fetchall()

    def _reserve_now(self) -> None:
        """Reserve the next block of attempt ids on disk, in a transaction of its own.

        Rare (the group commits reserve ahead); it waits for a commit in progress.
        """
        top = self._next_attempt - 1 + ATTEMPT_BLOCK
        with self._db_lock, self._transaction():
            self._db.execute(_SET_META, ("attempt_reserved", top))
        self._reserved = top

    def _flush(self) -> None:
        """Write the batch in one transaction, then acknowledge it (see the module docstring).

        The rows are taken here, on the reactor thread; the transaction runs in a thread
        if there is ``run_in_thread`` (one at a time: changes made meanwhile wait for the
        next batch, ``commit_delay`` after this one ends), else inline.
        """
        self._call = None
        if self._closed or self._in_flight is not None or not self._pending():
            return
        batch = self._take_batch()
        self._in_flight = batch
        if self._run_in_thread is None:
            try:
                self._write(batch)
            except Exception:
                self._failed(batch, Failure())
            else:
                self._written(batch)
            return
        d = self._run_in_thread(lambda: self._write(batch))
        d.addCallbacks(lambda _: self._written(batch), lambda f: self._failed(batch, f))
        d.addErrback(lambda f: log.failure("jobs: acknowledging a commit failed", f))

    def _take_batch(self) -> _Batch:
        """Move everything dirty into a batch, with the rows that record it."""
        new_jobs = [j for j in self._new_jobs if not j.stored]
        # Keep a block of attempt ids reserved ahead, so assignments rarely reserve inline.
        reserve = None
        if self._reserved - self._next_attempt < ATTEMPT_BLOCK // 2:
            reserve = self._next_attempt - 1 + ATTEMPT_BLOCK
        batch = _Batch(
            new_jobs=new_jobs,
            dirty_jobs=self._dirty_jobs,
            dirty_tasks=self._dirty_tasks,
            dirty_attempts=self._dirty_attempts,
            acks=self._acks,
            finalized=self._finalized,
            reserve=reserve,
            next_job=self._next_job,
            job_rows=[j.insert_row() for j in new_jobs],
            task_rows=[
                (j.seq, t.index, _spec_json(t.spec), t.state, t.reason)
                for j in new_jobs
                for t in j.tasks
            ],
            job_updates=[j.update_row() for j in self._dirty_jobs],
            task_updates=[(t.state, t.reason, t.job.seq, t.index) for t in self._dirty_tasks],
            attempt_rows=[a.row() for a in self._dirty_attempts],
        )
        self._new_jobs = []
        self._dirty_jobs = set()
        self._dirty_tasks = set()
        self._dirty_attempts = set()
        self._acks = []
        self._finalized = []
        return batch

    def _write(self, batch: _Batch) -> None:
        """The transaction of one batch (in a thread, or inline), unless close() wrote it
        already or the manager was closed without flushing (a crash, for tests)."""
        with self._db_lock:
            if batch.written or self._closed:
                return
            self._write_locked(batch)
            batch.written = True

    def _write_locked(self, batch: _Batch) -> None:
        db = self._db
        with self._transaction():
            if batch.job_rows:
                db.executemany(_INSERT_JOB, batch.job_rows)
                db.executemany(_INSERT_TASK, batch.task_rows)
                db.execute(_SET_META, ("next_job", batch.next_job))
            if batch.job_updates:
                db.executemany(_UPDATE_JOB, batch.job_updates)
            if batch.task_updates:
                db.executemany(_UPDATE_TASK, batch.task_updates)
            if batch.attempt_rows:
                db.executemany(_PUT_ATTEMPT, batch.attempt_rows)
            if batch.reserve is not None:
                db.execute(_SET_META, ("attempt_reserved", batch.reserve))

    def _failed(self, batch: _Batch, failure: Failure) -> None:
        """Nothing of the batch was acknowledged: it all becomes dirty again, to retry."""
        self._in_flight = None
        log.failure("jobs: commit failed; retrying in {delay} s", failure, delay=RETRY_DELAY)
        self._new_jobs = batch.new_jobs + self._new_jobs
        self._dirty_jobs |= batch.dirty_jobs
        self._dirty_tasks |= batch.dirty_tasks
        self._dirty_attempts |= batch.dirty_attempts
        self._acks = batch.acks + self._acks
        self._finalized = batch.finalized + self._finalized
        if not self._closed and self._call is None:
            self._call = self.clock.callLater(max(RETRY_DELAY, self.commit_delay), self._flush)

    def _written(self, batch: _Batch) -> None:
        """The batch is on disk: acknowledge it, and start the next one if changes wait."""
        self._in_flight = None
        if batch.reserve is not None:
            self._reserved = max(self._reserved, batch.reserve)
        for j in batch.new_jobs:
            j.stored = True
        for d, value in batch.acks:
            d.callback(value)
        for job in batch.finalized:
            # Its final state is on disk: read it from there from now on.
            if self._jobs.get(job.seq) is job:
                del self._jobs[job.seq]
            waiters, job.waiters = job.waiters, []
            if waiters:
                view = job.view()
                for w in waiters:
                    w.callback(view)
        if self._pending():
            # Changes made during the commit: their batch follows commit_delay later, as
            # any batch does (at once, measured, made a commit per task or two under a
            # stream of short tasks, each some hundreds of us of SQLite CPU; a worker's
            # next results do not wait for it: task_result requests overlap).
            self._schedule()

    # -- closing -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise JobError("the job manager is closed", "internal")

    def close(self, flush: bool = True) -> None:
        """Commit what is pending and close the database; idempotent.

        ``flush=False`` drops the pending batch unacknowledged, as a crash would (for
        tests and simulations of a master dying).
        """
        if self._closed:
            return
        if flush:
            # A batch handed to a thread: wait for its commit (the lock), or write it
            # here if the thread has not begun; its acknowledgement still comes from
            # the thread's end.  Then what is left, inline.
            self._run_in_thread = None
            batch, self._in_flight = self._in_flight, None
            if batch is not None:
                with self._db_lock:
                    if not batch.written:
                        try:
                            self._write_locked(batch)
                            batch.written = True
                        except Exception:
                            log.failure("jobs: the last commit failed")
            self.flush()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._closed = True
        with self._db_lock:
            self._db.close()


@attrs.define(eq=False)
class _Batch:
    """One group commit: the objects it records (made dirty again if it fails), the
    Deferreds it acknowledges, and its rows, taken on the reactor thread."""

    new_jobs: list[_Job]
    dirty_jobs: set[_Job]
    dirty_tasks: set[_Task]
    dirty_attempts: set[_Attempt]
    acks: list[tuple[Deferred[Any], object]]
    finalized: list[_Job]
    reserve: int | None
    next_job: int
    job_rows: list[tuple[Any, ...]]
    task_rows: list[tuple[Any, ...]]
    job_updates: list[tuple[Any, ...]]
    task_updates: list[tuple[Any, ...]]
    attempt_rows: list[tuple[Any, ...]]
    written: bool = False


def _storable(text: str) -> str:
    """``text`` with what SQLite cannot store as UTF-8 (lone surrogates, which JSON's
    ``\\ud800`` escapes make) replaced by "?".  A worker's text that could not be
    stored would fail every later group commit with it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def _clean_tail(text: object) -> str:
    """A worker's stderr tail as kept: its last :data:`MAX_STDERR_TAIL` characters,
    control characters but newline and tab replaced by U+FFFD ("" if not text)."""
    if not isinstance(text, str) or not text:
        return ""
    return _TAIL_CONTROL.sub("\ufffd", _storable(text[-MAX_STDERR_TAIL:]))


def _parse_job_id(job_id: object) -> int | None:
    """The sequence number of a job id like ``j17``, or None if it is not one."""
    if not isinstance(job_id, str):
        return None
    m = _JOB_ID.match(job_id)
    return int(m.group(1)) if m else None
