"""The states of jobs, tasks and attempts, and which state may follow which.

::

    job      queued ──▶ running ──▶ succeeded | failed | cancelled
    task     waiting ──▶ queued ──▶ running ──▶ succeeded | failed | cancelled
                            ▲          │
                            └──────────┘  attempt failed / timed out / lost, attempts left
    attempt  running ──▶ succeeded | failed | timeout | lost | cancelled

The values are the strings stored in SQLite and sent as JSON; each state is a ``str``,
equal to (and hashing as) its value, so a state read back from disk as plain text
compares equal to the member.  ``str()`` and ``format()`` give the value on every
Python version.

A job is ``queued`` until one of its tasks gets an attempt, then ``running``; a job
whose dependency fails, or which is cancelled, may end without ever running.  A task is
``waiting`` while a job it comes ``after`` has not succeeded, ``queued`` when it may be
offered to a worker, ``running`` while exactly one attempt runs it.  The tables
:data:`JOB_NEXT`, :data:`TASK_NEXT` and :data:`ATTEMPT_NEXT` say which states may follow
each; the manager checks them wherever a state changes, and a change they do not allow
is a bug (:class:`IllegalTransition`).
"""

from __future__ import annotations

from enum import Enum
from typing import Final

__all__ = [
    "ATTEMPT_NEXT",
    "ATTEMPT_STATES",
    "CANCELLED",
    "FAILED",
    "FINAL",
    "JOB_NEXT",
    "JOB_STATES",
    "LOST",
    "QUEUED",
    "REASON_CANCELLED",
    "REASON_NOT_REPORTED",
    "REASON_TIMEOUT",
    "REASON_WORKER_DIED",
    "RUNNING",
    "SUCCEEDED",
    "TASK_NEXT",
    "TASK_STATES",
    "TIMEOUT",
    "WAITING",
    "AttemptState",
    "IllegalTransition",
    "JobState",
    "TaskState",
]


class _State(str, Enum):
    """A state whose value is its stored and sent text; ``str()`` and ``format()`` give it."""

    __str__ = str.__str__
    __format__ = str.__format__


class JobState(_State):
    """Where a job is (see the module docstring)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskState(_State):
    """Where a task is (see the module docstring)."""

    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AttemptState(_State):
    """How an attempt stands or ended (see the module docstring)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class IllegalTransition(AssertionError):
    """A state change the tables do not allow: a bug in the manager, never bad input."""


# The names the code compares with.  Module globals, not class attributes: a state is
# compared several times per task given and per result, and an enum attribute costs a
# lookup each time.  The states of the same name in the three enums are equal.
WAITING: Final = TaskState.WAITING
QUEUED: Final = TaskState.QUEUED
RUNNING: Final = TaskState.RUNNING
SUCCEEDED: Final = TaskState.SUCCEEDED
FAILED: Final = TaskState.FAILED
CANCELLED: Final = TaskState.CANCELLED
LOST: Final = AttemptState.LOST
TIMEOUT: Final = AttemptState.TIMEOUT

JOB_STATES: Final = tuple(JobState)
TASK_STATES: Final = tuple(TaskState)
ATTEMPT_STATES: Final = tuple(AttemptState)
#: The states a job or task never leaves.
FINAL: Final = frozenset({SUCCEEDED, FAILED, CANCELLED})

#: The states that may follow each job state.
JOB_NEXT: Final[dict[JobState, frozenset[JobState]]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

#: The states that may follow each task state.
TASK_NEXT: Final[dict[TaskState, frozenset[TaskState]]] = {
    TaskState.WAITING: frozenset({TaskState.QUEUED, TaskState.CANCELLED}),
    TaskState.QUEUED: frozenset({TaskState.RUNNING, TaskState.CANCELLED}),
    TaskState.RUNNING: frozenset(
        {TaskState.QUEUED, TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED}
    ),
    TaskState.SUCCEEDED: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.CANCELLED: frozenset(),
}

_ENDED: Final = frozenset(AttemptState) - {AttemptState.RUNNING}
#: The states that may follow each attempt state.
ATTEMPT_NEXT: Final[dict[AttemptState, frozenset[AttemptState]]] = {
    state: _ENDED if state is AttemptState.RUNNING else frozenset() for state in AttemptState
}

#: The reason a worker gives for an attempt it killed at its timeout.
REASON_TIMEOUT: Final = "timeout"
#: The reason of an attempt whose worker died.
REASON_WORKER_DIED: Final = "lost: worker died"
#: The reason of an attempt its worker did not report when it reconciled.
REASON_NOT_REPORTED: Final = "lost: not running on its worker after a reconnect"
#: The reason of a task or attempt ended by a cancel.
REASON_CANCELLED: Final = "cancelled"
