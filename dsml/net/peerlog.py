"""Log lines about misbehaving peers, rate-limited so that a peer cannot flood the log.

Every line the net layer writes because of what a peer did (a framing error, a wrong
token, a connection evicted, a deadline missed) goes through one :class:`PeerLog` per
listener or set of links.  It lets ``burst`` lines through per ``period`` seconds of the
clock it is given (a token bucket) and counts the rest; the next line that gets through is
preceded by one saying how many were left out.  Lines about dsml's own faults (bugs,
``log.failure``) are not peer lines and are never limited.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

__all__ = ["PeerLog"]

#: Lines let through at once, and the seconds in which that many are earned back.
DEFAULT_BURST = 20
DEFAULT_PERIOD = 60.0


class PeerLog:
    """A rate-limited logger for lines caused by peers (on ``clock``, an IReactorTime)."""

    def __init__(
        self,
        clock: Any,
        log: Logger | None = None,
        burst: int = DEFAULT_BURST,
        period: float = DEFAULT_PERIOD,
    ) -> None:
        if burst < 1 or period <= 0:
            raise ValueError("burst must be at least 1 and period positive")
        self.clock = clock
        self.log = log if log is not None else Logger(namespace="dsml.net.peers")
        self.burst = burst
        self.period = period
        self._tokens = float(burst)
        self._last = clock.seconds()
        #: Lines left out since the last one let through.
        self.suppressed = 0

    def _allow(self) -> bool:
        now = self.clock.seconds()
        self._tokens = min(
            float(self.burst), self._tokens + (now - self._last) * self.burst / self.period
        )
        self._last = now
        if self._tokens < 1.0:
            self.suppressed += 1
            return False
        self._tokens -= 1.0
        if self.suppressed:
            n, self.suppressed = self.suppressed, 0
            self.log.warn("{n} more lines about misbehaving peers were left out", n=n)
        return True

    def warn(self, fmt: str, **fields: object) -> None:
        """``Logger.warn``, if the rate allows."""
        if self._allow():
            self.log.warn(fmt, **fields)

    def info(self, fmt: str, **fields: object) -> None:
        """``Logger.info``, if the rate allows."""
        if self._allow():
            self.log.info(fmt, **fields)

    def error(self, fmt: str, **fields: object) -> None:
        """``Logger.error``, if the rate allows."""
        if self._allow():
            self.log.error(fmt, **fields)
