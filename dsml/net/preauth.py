"""The pool of connections that have not authenticated yet, and who leaves it when full.

A connection may do nothing before its ``auth`` (:mod:`.connection`); until then it sits
in a :class:`PreauthPool` of at most ``limits.max_unauthenticated`` connections, and at
most ``limits.max_unauthenticated_per_host`` from one source address.  When a newcomer
takes a pool over its cap:

- the oldest connection of that pool that has had :data:`AUTH_GRACE` seconds to
  authenticate and has not is closed to make room, one reactor turn later (so that an
  ``auth`` already in its socket when a stalled reactor wakes is read first): a peer
  holding sockets open without a word cannot keep anyone else out (it must reopen them
  faster than every newcomer's grace to hold its places);
- when every connection of that pool is younger than that, none is closed: a crowd of
  real peers arriving at once (a thousand workers redialling a restarted master: the
  accept loop takes a hundred connections in one go, before it reads the first one's
  ``auth``) would otherwise push each other out before any of them was read.  The
  listener stops accepting instead (``stopReading`` on its ports): newcomers wait in the
  kernel's listen queue, and accepting resumes once the pool is back under its caps or
  its oldest connection has had its grace, whichever comes first.  A peer that keeps the
  pool full of young connections only delays newcomers by at most the grace, in order;
  it never refuses them;
- past :data:`HARD_FACTOR` times a cap (one accept burst can take a hundred and more
  at once: Twisted's accept loop grows by 20 after every full read) the oldest is
  closed whatever its age, so the pool's memory stays bounded.

Plain logic on an injected clock: tests drive it with ``task.Clock`` and fake ports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.internet.interfaces import IDelayedCall

from .limits import Limits

__all__ = ["AUTH_GRACE", "HARD_FACTOR", "PreauthPool"]

#: Seconds a new connection has, before a newer one may push it out of a full pool.
AUTH_GRACE: Final = 0.5
#: Past this many times a cap, the oldest goes whatever its age.  (At twice, a crowd of
#: 1,000 workers redialling a restarted master lost 20 to 38 of them unread per run.)
HARD_FACTOR: Final = 4


class PreauthPool:
    """Unauthenticated connections, oldest first, overall and by source address.

    ``evicted(conn, where, limit)`` hears of each connection closed for room (it logs
    and aborts it); ``attach`` the listening ports whose accepting is paused while the
    pool is full of young connections.
    """

    def __init__(
        self,
        clock: Any,
        limits: Limits,
        evicted: Callable[[Any, str, int], None],
        grace: float = AUTH_GRACE,
    ) -> None:
        self.clock = clock
        self.limits = limits
        self.evicted = evicted
        self.grace = grace
        #: Connection -> when it was admitted, oldest first.
        self._all: dict[Any, float] = {}
        self._by_host: dict[str, dict[Any, float]] = {}
        self._host_of: dict[Any, str] = {}
        self._ports: list[Any] = []
        self._wake: IDelayedCall | None = None
        #: Whether accepting is paused now.
        self.paused = False

    def __len__(self) -> int:
        return len(self._all)

    def attach(self, port: Any) -> None:
        """Pause and resume accepting on ``port`` (an ``IListeningPort`` that is also a
        file descriptor: ``stopReading``/``startReading``) with the pool."""
        self._ports.append(port)
        if self.paused:
            port.stopReading()

    def admit(self, conn: Any, host: str) -> None:
        """Count ``conn`` in; if it takes a pool over its cap, make room (see above)."""
        now = self.clock.seconds()
        self._all[conn] = now
        self._by_host.setdefault(host, {})[conn] = now
        self._host_of[conn] = host
        if self._over():
            wait = self._make_room(now, hard_only=True)
            if wait is not None:  # still over a cap: judged once the oldest had its grace
                self._pause()
                self._wake_in(now, wait)

    def forget(self, conn: Any) -> None:
        """``conn`` authenticated or closed: it leaves the pool."""
        if self._all.pop(conn, None) is None:
            return
        host = self._host_of.pop(conn)
        same = self._by_host.get(host)
        if same is not None:
            same.pop(conn, None)
            if not same:
                del self._by_host[host]
        if self.paused and not self._over():
            self._resume()

    # -- making room ----------------------------------------------------------------------

    def _pools(self) -> list[tuple[dict[Any, float], int, str]]:
        """The pools over their caps: (members, cap, where)."""
        lim = self.limits
        out = [(same, lim.max_unauthenticated_per_host, f"from {host}")
               for host, same in self._by_host.items()
               if len(same) > lim.max_unauthenticated_per_host]
        if len(self._all) > lim.max_unauthenticated:
            out.append((self._all, lim.max_unauthenticated, "in all"))
        return out

    def _over(self) -> bool:
        lim = self.limits
        return len(self._all) > lim.max_unauthenticated or any(
            len(same) > lim.max_unauthenticated_per_host for same in self._by_host.values())

    def _make_room(self, now: float, hard_only: bool = False) -> float | None:
        """Close, in each pool over its cap, the oldest while it has had its grace (past
        HARD_FACTOR times the cap: whatever its age; with ``hard_only``, only that).  Returns the
        seconds until the oldest left over a cap has had its grace (None: none left)."""
        wait: float | None = None
        for members, cap, where in self._pools():
            while len(members) > cap:
                conn, since = next(iter(members.items()))
                aged = now - since >= self.grace and not hard_only
                if not aged and len(members) <= HARD_FACTOR * cap:
                    left = max(0.0, since + self.grace - now)
                    wait = left if wait is None else min(wait, left)
                    break
                self.forget(conn)
                self.evicted(conn, where + (" (it had its grace)" if aged
                                            else f" (past {HARD_FACTOR} times the cap)"), cap)
        return wait

    def _wake_in(self, now: float, wait: float) -> None:
        """Look again in ``wait`` seconds (when the oldest over a cap has had its grace),
        and then one reactor turn later: a stalled reactor runs its timers before it
        reads, and a connection whose ``auth`` is already waiting in its socket must be
        read before it is judged.  An earlier wake-up already due stays."""
        if self._wake is not None and self._wake.active():
            if self._wake.getTime() <= now + wait:
                return
            self._wake.cancel()
        self._wake = self.clock.callLater(wait, self._one_more_turn)

    def _one_more_turn(self) -> None:
        self._wake = self.clock.callLater(0, self._check)

    def _check(self) -> None:
        self._wake = None
        now = self.clock.seconds()
        wait = self._make_room(now)
        if wait is None:
            if self.paused:
                self._resume()
            return
        self._pause()
        self._wake_in(now, wait)

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            for port in self._ports:
                port.stopReading()

    def _resume(self) -> None:
        self.paused = False
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        for port in self._ports:
            # Twisted's accept loop takes up to numberAccepts connections per read, and
            # grows it by 20 after each full one: a crowd after a stall came in bursts
            # past twice the cap, whose oldest then went unread.  The pool is under its
            # cap now: the next read takes at most another pool's worth.
            if getattr(port, "numberAccepts", 0) > self.limits.max_unauthenticated:
                port.numberAccepts = self.limits.max_unauthenticated
            if getattr(port, "connected", True) and not getattr(port, "disconnecting", False):
                port.startReading()

    def stop(self) -> None:
        """No more wake-ups (the factory stops); ports are left as they are."""
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
