"""Retention of finished jobs: the state file does not grow without bound.

:class:`JobRetention` deletes final jobs from ``jobs.sqlite3`` by age (finished more than
``retention.jobs_max_age`` seconds ago) and by count (beyond the newest
``retention.jobs_max_count`` final jobs), journal rows included, in bounded batches:
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

__all__ = ["PURGE_JOBS", "PURGE_TASKS", "RETENTION_INTERVAL", "JobRetention"]

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
            partial(journal.purge_candidates, now, max_age, max_count, jobs)
        )
        purged = 0
        for seq, ntasks in candidates:
            if journal.closed:
                break
            if seq in self.protected():
                continue
            for start in range(0, ntasks, rows):
                await journal.run(partial(journal.purge_tasks, seq, start, start + rows))
                await deferLater(self.clock, 0, lambda: None)  # let the reactor turn
                if journal.closed:
                    return purged
            await journal.run(partial(journal.purge_job, seq))
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
