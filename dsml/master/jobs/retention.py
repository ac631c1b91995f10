"""Retention of finished jobs: the state file does not grow without bound.

:class:`JobRetention` deletes final jobs from ``jobs.sqlite3`` by age (finished more than
``retention.jobs_max_age`` seconds ago) and by count (beyond the newest
``retention.jobs_max_count`` final jobs), journal rows (results too) included, in bounded batches:
each transaction deletes the tasks and attempts of at most :data:`PURGE_TASKS` task
indexes of one job, in the journal's commit thread when it has one, with a reactor turn
between two, so a 100,000-task job is purged in some fifty small transactions, never
in one long one.  A job's own row is deleted last: a job half purged when the master
dies is still a candidate, and the next purge finishes it.  Live jobs, and final jobs
that a live job comes ``after``, are never purged (the manager says which).

A purged job is gone: ``status`` of it answers ``not-found``, and so does a submit that
names it in ``after``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from functools import partial
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from .journal import Journal
from .states import JobState

__all__ = ["PURGE_JOBS", "PURGE_TASKS", "RETENTION_INTERVAL", "JobRetention", "purge_candidates",
           "purge_job", "purge_tasks"]

log = Logger()

#: Final jobs one purge deletes at most.
PURGE_JOBS: Final = 100
#: Task indexes whose rows (tasks and attempts) one purge transaction deletes.
PURGE_TASKS: Final = 2000
#: Seconds between two retention purges.
RETENTION_INTERVAL: Final = 60.0


class JobRetention:
    """Purges final jobs from ``journal`` (see the module docstring).

    ``protected()`` gives the job numbers a purge must skip (live jobs, the jobs they
    come after).  ``clock`` schedules; ``now`` (the wall clock the finished times were
    recorded on; without it ``clock.seconds``) gives a job's age.
    """

    def __init__(
        self, journal: Journal, clock: IReactorTime, protected: Callable[[], Collection[int]],
        now: Callable[[], float] | None = None,
    ) -> None:
        self.journal = journal
        self.clock = clock
        self.now = clock.seconds if now is None else now
        self.protected = protected
        self._loop: LoopingCall | None = None
        self._running: Deferred[int] | None = None
        #: Jobs purged since open.
        self.purged = 0

    def purge(self, max_age: float, max_count: int, jobs: int, rows: int) -> Deferred[int]:
        """Delete at most ``jobs`` final jobs beyond retention, ``rows`` task indexes per
        transaction; fires with how many were deleted."""
        if rows < 1 or jobs < 0 or max_count < 0 or not max_age > 0:
            raise ValueError("rows >= 1, jobs >= 0, max_count >= 0 and max_age > 0")
        return Deferred.fromCoroutine(self._purge(max_age, max_count, jobs, rows))

    async def _purge(self, max_age: float, max_count: int, jobs: int, rows: int) -> int:
        journal = self.journal
        now = self.now()
        candidates = await journal.run(
            partial(purge_candidates, journal, now, max_age, max_count, jobs)
        )
        purged = 0
        for seq, ntasks in candidates:
            if journal.closed:
                break
            if seq in self.protected():
                continue
            for start in range(0, ntasks, rows):
                await journal.run(partial(purge_tasks, journal, seq, start, start + rows))
                await deferLater(self.clock, 0, lambda: None)  # let the reactor turn
                if journal.closed:
                    return purged
            await journal.run(partial(purge_job, journal, seq))
            purged += 1
        self.purged += purged
        if purged:
            log.info("jobs: purged {n} finished jobs (retention)", n=purged)
        return purged

    def start(self, max_age: float, max_count: int, interval: float = RETENTION_INTERVAL) -> None:
        """Purge every ``interval`` seconds (the first at once), one purge at a time."""
        self.stop()

        def run() -> None:
            # Never raise: a LoopingCall whose function raises stops for good.
            if self._running is not None or self.journal.closed:
                return  # the last purge still runs
            try:
                d = self.purge(max_age, max_count, PURGE_JOBS, PURGE_TASKS)
            except Exception:
                log.failure("jobs: retention purge could not start")
                return
            self._running = d

            def done(_: object) -> None:
                self._running = None

            def failed(f: Any) -> None:
                if not self.journal.closed:  # (else: the master is stopping)
                    log.failure("jobs: retention purge failed", f)

            d.addErrback(failed)
            d.addBoth(done)

        loop = LoopingCall(run)
        loop.clock = self.clock
        loop.start(interval, now=True).addErrback(
            lambda f: log.failure("jobs: retention loop stopped", f)
        )
        self._loop = loop

    def stop(self) -> None:
        """Stop the loop; idempotent (a purge in progress stops at its next step once
        the journal is closed)."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()


# -- the purge's transactions, on the journal's file ------------------------------------


def purge_candidates(
    journal: Journal, now: float, max_age: float, max_count: int, limit: int
) -> list[tuple[int, int]]:
    """(seq, task count) of at most ``limit`` final jobs beyond retention, oldest
    first: finished more than ``max_age`` seconds before ``now``, or older than the
    newest ``max_count`` final jobs.  (Through :meth:`Journal.run`.)"""
    final = (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value)
    row = journal.db.execute(
        "SELECT seq FROM jobs WHERE state IN (?, ?, ?) ORDER BY seq DESC LIMIT 1 OFFSET ?",
        (*final, max_count),
    ).fetchone()
    boundary = row[0] if row else 0
    return journal.db.execute(
        "SELECT seq, ntasks FROM jobs WHERE state IN (?, ?, ?)"
        " AND (finished < ? OR seq <= ?) ORDER BY seq LIMIT ?",
        (*final, now - max_age, boundary, limit),
    ).fetchall()


def purge_tasks(journal: Journal, seq: int, start: int, end: int) -> int:
    """Delete the tasks ``start`` .. ``end`` of stored job ``seq`` and their
    attempts, in one transaction; the rows deleted.  (Through :meth:`Journal.run`.)"""
    with journal.transaction():
        a = journal.db.execute(
            "DELETE FROM attempts WHERE job = ? AND idx >= ? AND idx < ?", (seq, start, end)
        ).rowcount
        t = journal.db.execute(
            "DELETE FROM tasks WHERE job = ? AND idx >= ? AND idx < ?", (seq, start, end)
        ).rowcount
        journal.db.execute(
            "DELETE FROM results WHERE job = ? AND idx >= ? AND idx < ?", (seq, start, end))
    return int(a) + int(t)


def purge_job(journal: Journal, seq: int) -> None:
    """Delete stored job ``seq``'s row (its tasks first: :func:`purge_tasks`)."""
    with journal.transaction():
        journal.db.execute("DELETE FROM jobs WHERE seq = ?", (seq,))
