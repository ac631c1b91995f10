"""Cordons: a worker whose every attempt fails at once stops getting tasks (issue 13).

A broken worker (its task directory unusable, its PATH without the program, its disk
full) fails every attempt in milliseconds; left alone it "absorbs the queue", burning
every task's attempts while healthy workers sit idle.  :class:`Cordons` watches the
attempts as they end and cordons such a worker: the router gives it no new task and
``dsml nodes`` shows it cordoned with the reason.  Plain logic, no I/O: every call takes
the times it needs (the master's clock), and answers with the lines to log.

The rule.  A worker is cordoned when its last :data:`STREAK` ended attempts all failed
within :data:`FAST` seconds of their start (master's times: dispatch to result), with a
cause other than ``cancelled``, ``lost`` and ``timeout`` (they say nothing of the worker),
unless the fault is plausibly the jobs': when every job among those failures has also
failed at once on another worker and never succeeded anywhere (a user's broken job:
``exit 1`` at once everywhere must not cordon the whole cluster).  Nor is the last
worker cordoned: never when no other live worker would be left uncordoned (the router
answers that, ``spare``).  A success, or a failure that took longer than FAST (the worker
did run the command), clears the worker's streak; ``cancelled``, ``lost`` and
``timeout`` neither count nor clear.

Later evidence: when a job in a cordoned worker's streak fails at once on another
worker too, and so every job of its streak now looks broken, the cordon is lifted at
once (exonerated).  The other way, a job's first success elsewhere makes its failures
count again at the worker's next failure.  So two black holes fed only one job at the
same instant look like a broken job until that job succeeds somewhere (a second or so
of attempts burned): the price of never cordoning on a broken job.

The cool-down.  A cordon lifts by itself :data:`COOL_DOWN` seconds later, so a mended
worker comes back; until its next success it is on probation, cordoned again after only
:data:`STREAK_AFTER_LIFT` fast failures.  A worker that registers at a new incarnation
(a restart) starts clean.

In memory only, not durable: a master restart forgets every cordon and streak (a still
broken worker is cordoned again after STREAK more attempts).  What is remembered of jobs
(whether each failed at once on which workers, whether it succeeded) is bounded to the
:data:`JOBS_KEPT` most recently seen.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Final

import attrs

__all__ = ["COOL_DOWN", "FAST", "IGNORED", "JOBS_KEPT", "STREAK", "STREAK_AFTER_LIFT", "Cordons"]

#: Fast failures in a row that cordon a worker.
STREAK: Final = 5
#: Fast failures in a row that cordon again a worker whose cordon lifted, before its next
#: success.
STREAK_AFTER_LIFT: Final = 2
#: An attempt that failed within this many seconds of its start failed "at once".
FAST: Final = 2.0
#: Seconds a cordon lasts.
COOL_DOWN: Final = 300.0
#: Causes (:data:`~dsml.master.jobs.model.CAUSES`) that neither count nor clear a streak.
IGNORED: Final = frozenset({"cancelled", "lost", "timeout"})
#: Jobs remembered for the job-or-worker question (the most recently seen).
JOBS_KEPT: Final = 4096
#: Longest attempt reason quoted in a cordon's reason.
QUOTE: Final = 200


def _always() -> bool:
    return True


@attrs.define(eq=False)
class _Worker:
    incarnation: int
    #: The fast failures in a row, newest last: (job, reason).
    streak: deque[tuple[int, str]]
    #: While cordoned: when it lifts, and why it was placed.
    until: float | None = None
    reason: str = ""
    #: A cordon lifted and no success since: STREAK_AFTER_LIFT cordons it again.
    probation: bool = False


@attrs.define(eq=False)
class _Job:
    #: Workers it failed at once on (at most two are kept: enough to say "another").
    failed_on: set[str] = attrs.Factory(set)
    succeeded: bool = False


class Cordons:
    """Which workers are cordoned, and why (see the module docstring)."""

    def __init__(
        self,
        *,
        streak: int = STREAK,
        after_lift: int = STREAK_AFTER_LIFT,
        fast: float = FAST,
        cool_down: float = COOL_DOWN,
        jobs_kept: int = JOBS_KEPT,
    ) -> None:
        self.streak = streak
        self.after_lift = after_lift
        self.fast = fast
        self.cool_down = cool_down
        self.jobs_kept = jobs_kept
        self._workers: dict[str, _Worker] = {}
        self._jobs: OrderedDict[int, _Job] = OrderedDict()
        #: Names of the workers cordoned now (their cool-down may have passed unseen).
        self._cordoned: set[str] = set()

    # -- questions ------------------------------------------------------------------------

    def why(self, worker: str, now: float) -> str:
        """Why ``worker`` is cordoned at ``now``; "" when it is not."""
        w = self._workers.get(worker)
        if w is None or w.until is None or now >= w.until:
            return ""
        return w.reason

    def next_lift(self) -> float | None:
        """When the first cordon in place lifts (None: none is)."""
        times = [self._workers[name].until for name in self._cordoned]
        return min((t for t in times if t is not None), default=None)

    # -- events ---------------------------------------------------------------------------

    def registered(self, worker: str, incarnation: int) -> None:
        """``worker`` registered at ``incarnation``: a new one (a restart) starts clean."""
        w = self._workers.get(worker)
        if w is not None and w.incarnation != incarnation:
            del self._workers[worker]
            self._cordoned.discard(worker)

    def lift(self, now: float) -> list[str]:
        """Lift the cordons whose cool-down has passed at ``now``; the lines to log."""
        lines = []
        for name in sorted(self._cordoned):
            w = self._workers[name]
            if w.until is not None and now >= w.until:
                lines.append(self._lift(name, w, probation=True))
        return lines

    def ended(
        self,
        worker: str,
        incarnation: int,
        job: int,
        started: float,
        ended: float,
        cause: str | None,
        reason: str = "",
        spare: Callable[[], bool] = _always,
    ) -> list[str]:
        """An attempt of job ``job`` on ``worker`` (at ``incarnation``) ended: it ran from
        ``started`` to ``ended`` and failed with ``cause`` (None: it succeeded) and
        ``reason``.  ``spare()`` says whether another live worker would be left
        uncordoned (asked only before a cordon).  The lines to log (cordons placed or
        lifted)."""
        lines = self.lift(ended)
        w = self._workers.get(worker)
        if w is None or incarnation > w.incarnation:
            w = self._workers[worker] = _Worker(incarnation, deque(maxlen=self.streak))
            self._cordoned.discard(worker)
        elif incarnation < w.incarnation:
            return lines  # an older process's late result says nothing of this one
        if cause in IGNORED:
            return lines
        fast = cause is not None and ended - started <= self.fast
        j = self._job(job)
        if cause is None:
            j.succeeded = True
            w.probation = False
        if not fast:
            w.streak.clear()
            return lines
        if len(j.failed_on) < 2:
            j.failed_on.add(worker)
        w.streak.append((job, reason))
        lines += self._exonerate(worker)
        needed = self.after_lift if w.probation else self.streak
        if w.until is not None or len(w.streak) < needed:
            return lines
        recent = list(w.streak)[-needed:]
        if all(self._broken(jid, worker) for jid, _ in recent) or not spare():
            return lines
        again = " again after a cordon lifted" if w.probation else ""
        w.until = ended + self.cool_down
        w.reason = (
            f"{needed} attempts in a row failed within {self.fast:g} s{again}"
            f" (last: {reason[:QUOTE] or 'failed'})"
        )
        self._cordoned.add(worker)
        lines.append(
            f"worker {worker} cordoned for {self.cool_down:g} s, it gets no new task:"
            f" {w.reason}"
        )
        return lines

    # -- inside ---------------------------------------------------------------------------

    def _job(self, job: int) -> _Job:
        j = self._jobs.get(job)
        if j is None:
            j = self._jobs[job] = _Job()
            if len(self._jobs) > self.jobs_kept:
                self._jobs.popitem(last=False)
        else:
            self._jobs.move_to_end(job)
        return j

    def _broken(self, job: int, worker: str) -> bool:
        """Whether job ``job`` looks broken (not ``worker``'s fault): it failed at once on
        another worker and never succeeded anywhere."""
        j = self._jobs.get(job)
        return j is not None and not j.succeeded and any(w != worker for w in j.failed_on)

    def _exonerate(self, worker: str) -> list[str]:
        """Lift the cordons (but ``worker``'s) whose every streak job now looks broken."""
        lines = []
        for name in sorted(self._cordoned - {worker}):
            w = self._workers[name]
            if w.streak and all(self._broken(jid, name) for jid, _ in w.streak):
                lines.append(self._lift(name, w, probation=w.probation, exonerated=True))
        return lines

    def _lift(self, name: str, w: _Worker, *, probation: bool, exonerated: bool = False) -> str:
        self._cordoned.discard(name)
        w.until = None
        w.reason = ""
        w.streak.clear()
        w.probation = probation
        if exonerated:
            return (f"worker {name}: cordon lifted, its jobs fail at once on other workers"
                    " too (the jobs', not the worker's, fault)")
        return (f"worker {name}: cordon lifted after {self.cool_down:g} s, it takes tasks"
                f" again (cordoned again after {self.after_lift} attempts failing at once)")
