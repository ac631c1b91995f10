"""Retention of tombstones: the directory forgets old deletes, a slice per reactor turn.

Every delete leaves a *tombstone* (:mod:`dsml.master.directory`): the key, the version
it was deleted at and when.  It is what keeps a copy on a worker that was away from
bringing the key back, and it was kept for ever: a lab that writes and deletes scratch
keys grew its state without bound (issue #11).  :class:`TombstoneRetention` walks the
tombstones every ``interval`` seconds, :data:`PURGE_SLICE` keys per reactor turn (one
small transaction each, :meth:`~dsml.master.state.MasterState.purge_tombstones`), and
forgets those older than ``retention.tombstones_max_age`` whose key no worker is known
to hold.

Forgetting is safe: the state keeps the highest version it ever forgot (its
*watermark*), and a worker that returns after any length of time with a copy of a key
the master no longer knows, at or below that version, finds the key tombstoned again
and the copy trimmed, never made live.  What the watermark costs: a write whose outcome
was *unknown* (placed, its commit never answered) and whose copies are reported only
after a newer tombstone was forgotten (``tombstones_max_age`` later: 30 days by
default) is dropped instead of becoming the key's value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .state import MasterState

__all__ = ["PURGE_SLICE", "TombstoneRetention"]

log = Logger()

#: Tombstones one transaction looks at.
PURGE_SLICE: Final = 1000


def walk_interval(max_age: float) -> float:
    """Seconds between two walks: a tenth of the age kept, from 1 s to an hour."""
    return min(3600.0, max(1.0, max_age / 10))


class TombstoneRetention:
    """Forgets old tombstones of keys nobody holds (see the module docstring).

    ``now`` is the wall clock tombstones are stamped with; ``clock`` schedules the walk.
    """

    def __init__(
        self,
        *,
        clock: Any,
        now: Callable[[], float],
        state: MasterState,
        max_age: float,
        interval: float | None = None,
        slice_size: int = PURGE_SLICE,
    ) -> None:
        if not max_age > 0:
            raise ValueError(f"max_age must be > 0, not {max_age!r}")
        self.clock = clock
        self.now = now
        self.state = state
        self.max_age = max_age
        self.interval = walk_interval(max_age) if interval is None else interval
        self.slice_size = slice_size
        #: Tombstones forgotten since start; walks finished.
        self.purged = 0
        self.walks = 0
        self._loop = LoopingCall(self._walk)
        self._loop.clock = clock
        self._step_call: Any = None
        self._after: str | None = None  # the walk under way goes on after this key
        self._before = 0.0
        self._this_walk = 0

    def start(self) -> None:
        """Walk every ``interval`` seconds, the first one interval from now."""
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("tombstone retention stopped", f))

    def stop(self) -> None:
        """Stop walking (a walk under way stops where it is)."""
        if self._loop.running:
            self._loop.stop()
        if self._step_call is not None and self._step_call.active():
            self._step_call.cancel()
        self._step_call = None
        self._after = None

    @property
    def walking(self) -> bool:
        """Whether a walk is under way."""
        return self._after is not None

    def _walk(self) -> None:
        if self._after is not None:
            return  # the last walk is still under way
        self._after = ""
        self._before = self.now() - self.max_age
        self._this_walk = 0
        self._step()

    def _step(self) -> None:
        # Never raise: a walk that fails ends, the next one starts afresh.
        self._step_call = None
        if self._after is None:
            return
        try:
            n, after = self.state.purge_tombstones(self._before, self._after, self.slice_size)
        except Exception:
            log.failure("tombstone retention: a slice failed")
            self._after = None
            return
        self.purged += n
        self._this_walk += n
        if after is None:
            self._after = None
            self.walks += 1
            if self._this_walk:
                log.info("forgot {n} tombstones older than {days:g} days (retention)",
                         n=self._this_walk, days=self.max_age / 86400)
            return
        self._after = after
        self._step_call = self.clock.callLater(0, self._step)
