"""Work done a slice per reactor turn, so no big job holds the reactor.

:class:`Slicer` runs generators that each yield after a bounded slice of work (a few
hundred tasks of a big submit checked and made, a few thousand queued), one ``next()``
per reactor turn (``clock.callLater(0)``), round-robin between them: heartbeats and
requests that arrive meanwhile are served between two slices.  The manager owns one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["Slicer"]

log = Logger()


class Slicer:
    """Runs work a slice per reactor turn on ``clock`` (see the module docstring)."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._work: deque[Iterator[None]] = deque()
        self._call: IDelayedCall | None = None
        self._stopped = False
        #: Slices run so far (tests and benchmarks count them).
        self.slices = 0

    @property
    def busy(self) -> bool:
        """Whether work waits."""
        return bool(self._work)

    def add(self, work: Iterator[None]) -> None:
        """Run ``work`` a slice per turn, after the work already waiting."""
        self._work.append(work)
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None and self._work and not self._stopped:
            self._call = self.clock.callLater(0, self._run)

    def _run(self) -> None:
        """One slice of the first waiting work; the rest wait for the next turns."""
        self._call = None
        if self._stopped or not self._work:
            return
        work = self._work.popleft()
        self.slices += 1
        try:
            next(work)
        except StopIteration:
            pass
        except Exception:
            log.failure("jobs: work in slices failed")
        else:
            self._work.append(work)  # round-robin with other work
        self._schedule()

    def stop(self) -> None:
        """Drop the waiting work and run no more; idempotent."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._work.clear()
