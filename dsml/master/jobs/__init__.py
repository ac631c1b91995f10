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

A job is a list of tasks; every offer of a task to a worker is a new attempt, fenced by
the worker's name and incarnation; every way an attempt can end without success counts
against ``max_attempts``; a job ends when all its tasks have; ``after`` makes a job wait
for others to succeed; a cancel ends a job at once.  Scheduling is by priority, then
submit order, then task index, with locality in a window at the head of the queue.
Every change is made in memory at once and acknowledged once a group commit has put it
on disk; on restart the live jobs are loaded back and workers reconcile their attempts.

Bounded (issue 11): no call does more than a slice of work on the reactor whatever a
job's size.  A big submit (or a compact ``array`` spec) is checked, made and queued in
slices, one per reactor turn; a job's view is read a page of tasks at a time; the counts
by state are kept as tasks move; finished jobs are purged by age and count, their rows
deleted in bounded batches (:meth:`JobManager.purge`).

The rooms:

* :mod:`.model`: specs, assignments, reports, views, limits, spec checks (plain values).
* :mod:`.states`: the states as enums, the tables of which state may follow which.
* :mod:`.records`: the live jobs, tasks and attempts as held in memory, with their rows.
* :mod:`.queue`: the priority queue with its locality window, and queue places.
* :mod:`.journal`: the SQLite file, its group commit (in a thread), reads of stored
  jobs; :mod:`.schema`: its tables, their migrations, the statements.
* :mod:`.manager`: :class:`JobManager`, the transitions, built on the three above.
* :mod:`.slices`: work done a slice per reactor turn (big submits and enqueues).
* :mod:`.retention`: purges of finished jobs by age and count, in bounded batches.

Every name that ``dsml.master.jobs`` had as one module is importable from here.
"""

from .journal import ATTEMPT_BLOCK, JOBS_FILE, RETRY_DELAY, SCHEMA_VERSION
from .manager import ENQUEUE_SLICE, STATUS_PAGE, SUBMIT_SLICE, JobManager
from .model import (
    CAUSES,
    DEFAULT_RETRY_ON,
    MAX_AFTER,
    MAX_ATTEMPTS,
    MAX_INLINE_RESULT,
    MAX_NAME,
    MAX_PRIORITY,
    MAX_REASON,
    MAX_SLOTS,
    MAX_STDERR_TAIL,
    MAX_TASKS,
    MAX_TIMEOUT,
    Assignment,
    AttemptView,
    FinishedReport,
    JobError,
    JobSpec,
    JobView,
    QueuePlace,
    Room,
    TaskSpec,
    TaskView,
    attempt_cause,
    holds_nothing,
)
from .queue import LOCALITY_WINDOW, MAX_JOBS_COUNTED
from .states import (
    ATTEMPT_STATES,
    CANCELLED,
    FAILED,
    FINAL,
    JOB_STATES,
    LOST,
    QUEUED,
    REASON_CANCELLED,
    REASON_NOT_REPORTED,
    REASON_TIMEOUT,
    REASON_WORKER_DIED,
    RUNNING,
    SUCCEEDED,
    TASK_STATES,
    TIMEOUT,
    WAITING,
    AttemptState,
    IllegalTransition,
    JobState,
    TaskState,
)

__all__ = [
    "ATTEMPT_BLOCK",
    "ATTEMPT_STATES",
    "CANCELLED",
    "CAUSES",
    "DEFAULT_RETRY_ON",
    "ENQUEUE_SLICE",
    "FAILED",
    "FINAL",
    "JOBS_FILE",
    "JOB_STATES",
    "LOCALITY_WINDOW",
    "LOST",
    "MAX_AFTER",
    "MAX_ATTEMPTS",
    "MAX_JOBS_COUNTED",
    "MAX_NAME",
    "MAX_PRIORITY",
    "MAX_REASON",
    "MAX_SLOTS",
    "MAX_INLINE_RESULT",
    "MAX_STDERR_TAIL",
    "MAX_TASKS",
    "MAX_TIMEOUT",
    "QUEUED",
    "REASON_CANCELLED",
    "REASON_NOT_REPORTED",
    "REASON_TIMEOUT",
    "REASON_WORKER_DIED",
    "RETRY_DELAY",
    "RUNNING",
    "SCHEMA_VERSION",
    "STATUS_PAGE",
    "SUBMIT_SLICE",
    "SUCCEEDED",
    "TASK_STATES",
    "TIMEOUT",
    "WAITING",
    "Assignment",
    "AttemptState",
    "AttemptView",
    "FinishedReport",
    "IllegalTransition",
    "JobError",
    "JobManager",
    "JobSpec",
    "JobState",
    "JobView",
    "QueuePlace",
    "Room",
    "TaskSpec",
    "TaskState",
    "TaskView",
    "attempt_cause",
    "holds_nothing",
]
