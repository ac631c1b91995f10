"""The reactor-lag probe: how late the reactor runs a timer, so any stall is visible.

:class:`LagProbe` owns one ``LoopingCall`` on an injected clock, due every ``interval``
seconds.  Each time it runs it measures its own lateness (the time since it was due), and
keeps the worst figure since start, the worst of a recent window, the last one and a
count; :meth:`LagProbe.snapshot` gives them as a plain dict for ``dsml nodes --json`` and
the master's log.  A turn the reactor spent blocked (a long request, a big submit) shows
as the next run's lateness; a stall of many intervals is one late run, not many (the
``LoopingCall`` skips the runs it missed, and the lateness is measured from the first
missed one).

Usage (in a service, with the reactor passed in)::

    probe = LagProbe(reactor, interval=0.1)
    probe.start()
    ...
    log.info("reactor lag: {lag}", lag=probe.snapshot())
    probe.stop()

Plain logic on an ``IReactorTime``: tests drive it with ``task.Clock``.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["DEFAULT_INTERVAL", "RECENT_RUNS", "STALL_LOGGED", "LagProbe"]

log = Logger()

#: Seconds between runs by default.
DEFAULT_INTERVAL: Final = 0.1
#: Runs the "recent" figures cover by default (10 s at the default interval).
RECENT_RUNS: Final = 100
#: A run this many seconds late is logged (one line per stall: a stall is one late run).
STALL_LOGGED: Final = 0.25


class LagProbe:
    """Measures how late a timer due every ``interval`` seconds runs on ``clock``.

    :param clock: the reactor (or a ``task.Clock`` in tests).
    :param interval: seconds between runs (> 0).
    :param recent: how many of the latest runs ``recent_worst`` covers (>= 1).
    :param log_over: a run later than this many seconds is logged as a stall (None: never).
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float = DEFAULT_INTERVAL,
        recent: int = RECENT_RUNS,
        log_over: float | None = STALL_LOGGED,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0, not {interval!r}")
        if recent < 1:
            raise ValueError(f"recent must be >= 1, not {recent!r}")
        self.clock = clock
        self.interval = float(interval)
        self.log_over = log_over
        #: The worst lateness seen since start, in seconds.
        self.worst = 0.0
        #: The lateness of the last run, in seconds.
        self.last = 0.0
        #: Runs measured since start.
        self.runs = 0
        #: When the worst lateness was seen (clock seconds), None before any.
        self.worst_at: float | None = None
        self._recent: deque[float] = deque(maxlen=recent)
        self._due: float | None = None
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    @property
    def running(self) -> bool:
        """Whether the probe is started."""
        return bool(self._loop.running)

    def start(self) -> LagProbe:
        """Start measuring (the first run is one interval from now); returns itself."""
        if not self._loop.running:
            self._due = self.clock.seconds() + self.interval
            d = self._loop.start(self.interval, now=False)
            d.addErrback(lambda f: log.failure("reactor-lag probe stopped", f))
        return self

    def stop(self) -> None:
        """Stop measuring; idempotent.  The figures stay readable."""
        if self._loop.running:
            self._loop.stop()
        self._due = None

    def _tick(self) -> None:
        # Never raise: a LoopingCall whose function raises stops for good.
        try:
            now = self.clock.seconds()
            due = self._due if self._due is not None else now
            lag = max(0.0, now - due)
            self.record(lag, now)
            # The next run is due one interval after now, as LoopingCall schedules it
            # (it skips the runs it missed, to the next multiple of the interval).
            start = self._loop.starttime
            if start is None:
                self._due = now + self.interval
            else:
                done = int((now - start) / self.interval) + 1
                self._due = start + done * self.interval
        except Exception:
            log.failure("reactor-lag probe: a run failed")

    def record(self, lag: float, now: float) -> None:
        """Count one run that came ``lag`` seconds late at ``now``."""
        self.runs += 1
        self.last = lag
        if self.log_over is not None and lag > self.log_over:
            log.warn("the reactor stalled for {ms:.0f} ms (a timer ran that late)",
                     ms=lag * 1000)
        self._recent.append(lag)
        if lag > self.worst or self.worst_at is None:
            self.worst = max(self.worst, lag)
            self.worst_at = now

    @property
    def recent_worst(self) -> float:
        """The worst lateness among the latest ``recent`` runs (0.0 before any)."""
        return max(self._recent, default=0.0)

    def reset_worst(self) -> None:
        """Forget the worst figure (for a benchmark measuring one phase)."""
        self.worst = 0.0
        self.worst_at = None
        self._recent.clear()

    def snapshot(self) -> dict[str, float | int | None]:
        """The figures as a JSON-ready dict, in milliseconds: ``worst_ms``,
        ``recent_worst_ms``, ``last_ms``, ``interval_ms``, ``runs``, ``worst_at``."""
        return {
            "worst_ms": round(self.worst * 1000, 3),
            "recent_worst_ms": round(self.recent_worst * 1000, 3),
            "last_ms": round(self.last * 1000, 3),
            "interval_ms": round(self.interval * 1000, 3),
            "runs": self.runs,
            "worst_at": self.worst_at,
        }
