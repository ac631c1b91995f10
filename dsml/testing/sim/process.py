"""What one simulated process runs on, besides the network.

Owns :class:`ProcessClock` (the shared clock, but a process's timers die with it; its
machine has a wall clock too, which may be off and step, and its timers run on the
clock the daemons' reactors run them on: :func:`dsml.clocks.timer_clock`),
:func:`run_inline` (the process's ``run_in_thread``: no threads in a simulation) and
:class:`NetListen` (its listening service, on the fake network).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application import service
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import Clock
from zope.interface import implementer

from ...clocks import timer_clock
from .network import FakeNetwork

T = TypeVar("T")


@implementer(IReactorTime)
class ProcessClock:
    """The clock of one simulated process: the shared :class:`Clock`, but the process's
    pending calls are known, so when it dies (:meth:`stop`) its timers die with it
    instead of running on in a process that no longer exists.

    It is what a Twisted reactor is to a real process.  The machine has two clocks: the
    shared clock is its monotonic one (it never steps), and :meth:`wall_time` is its
    wall clock, the shared time plus ``offset``, which :meth:`jump` moves.  Its
    :meth:`seconds` and its timers are on the one :func:`~dsml.clocks.timer_clock`
    picks, as the daemons' reactors are (:func:`~dsml.clocks.monotonic_reactor`): on
    the monotonic clock, a step moves only :meth:`wall_time` (what the node is given as
    ``now``).  Were they on the wall clock (as a reactor left as Twisted makes it), its
    calls would be due at wall-clock times: a jump forward would run at once those it
    passes, a jump back delay them all by as much, and so it is modelled."""

    def __init__(self, clock: Clock, offset: float | None = None,
                 timers: Callable[[Callable[[], float], Callable[[], float]],
                                  Callable[[], float]] = timer_clock) -> None:
        self.clock = clock
        #: Seconds this machine's wall clock is ahead of the shared (monotonic) time
        #: (with None, 0 and no jumps).
        self.offset = offset or 0.0
        self.stepping = offset is not None
        #: Whether its timers are on the wall clock (see the class doc): ``timers`` (the
        #: production decision by default) given the machine's two clocks.
        self.wall = self.stepping and timers(clock.seconds, self.wall_time) == self.wall_time
        self.running = True
        self._calls: list[IDelayedCall] = []
        self._prune_at = 256
        #: While paused (:meth:`pause`): each held call and the time it was due.
        self._held: dict[IDelayedCall, float] | None = None

    def seconds(self) -> float:
        """The time its timers run on: the monotonic time, or (:attr:`wall`) the wall."""
        return self.wall_time() if self.wall else self.clock.seconds()

    def wall_time(self) -> float:
        """The machine's wall clock (the shared time plus :attr:`offset`): ``now``."""
        return self.clock.seconds() + self.offset

    def jump(self, delta: float) -> None:
        """The wall clock steps by ``delta`` seconds (NTP, an operator, a VM resumed);
        timers on it (:attr:`wall`) stay due at the same wall-clock time."""
        assert self.stepping, "a ProcessClock made without an offset cannot jump"
        self.offset += delta
        if not self.wall:
            return
        if self._held is not None:
            self._held = {call: due - delta for call, due in self._held.items()}
            return
        now = self.clock.seconds()
        for call in self._calls:
            if call.active():
                call.reset(max(0.0, call.getTime() - now - delta))

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any,
                  **kw: Any) -> IDelayedCall:
        """Schedule on the shared clock (or nowhere, once the process is dead)."""
        if not self.running:
            # Never runs; cancel() and active() still work for whoever holds it.
            return DelayedCall(self.seconds() + delay, f, args, kw,
                               lambda c: None, lambda c: None, self.seconds)
        if self.wall and 0 < delay < _TICK:
            # A delay too small to move the shared time (LoopingCall computes one from
            # the wall time, whose rounding differs) would run the call again at once,
            # for ever: it waits one microsecond instead.
            delay = _TICK
        call = self.clock.callLater(delay, f, *args, **kw)
        self._calls.append(call)
        if self._held is not None:
            self._hold(call)
        if len(self._calls) > self._prune_at:
            self._calls = [c for c in self._calls if c.active()]
            self._prune_at = max(256, 2 * len(self._calls))
        return _WallCall(call, self) if self.wall else call

    def getDelayedCalls(self) -> list[IDelayedCall]:
        """This process's pending calls."""
        return [_WallCall(c, self) if self.wall else c for c in self._calls if c.active()]

    def pause(self) -> None:
        """SIGSTOP: none of the process's calls runs until :meth:`resume` (each is held
        far in the future, its due time kept); what is scheduled meanwhile is held too."""
        if self._held is not None or not self.running:
            return
        self._held = {}
        for call in self._calls:
            if call.active():
                self._hold(call)

    def _hold(self, call: IDelayedCall) -> None:
        assert self._held is not None
        self._held[call] = call.getTime()
        call.reset(_FAR)

    @property
    def paused(self) -> bool:
        return self._held is not None

    def resume(self) -> None:
        """SIGCONT: every held call runs at its due time, or at once if that passed
        (in due order), as a stopped process's overdue timers do when it continues."""
        held, self._held = self._held, None
        if not held:
            return
        now = self.clock.seconds()
        for call, due in sorted(held.items(), key=lambda item: item[1]):
            if call.active():
                call.reset(max(0.0, due - now))

    def stop(self) -> None:
        """The process is gone: cancel its pending calls; schedule nothing more."""
        self._held = None
        self.running = False
        calls, self._calls = self._calls, []
        for call in calls:
            if call.active():
                call.cancel()


class _WallCall:
    """A pending call as its process sees it: due at a time of the process's wall
    clock (what ``getTime`` says), moved on the shared clock."""

    def __init__(self, call: IDelayedCall, owner: ProcessClock) -> None:
        self.call = call
        self.owner = owner

    def getTime(self) -> float:
        return float(self.call.getTime()) + self.owner.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(self.call, name)


#: The least positive delay of a call on a wall clock (see ProcessClock.callLater).
_TICK = 1e-6

#: Where a paused process's calls wait (seconds from now): beyond any simulated run.
_FAR = 1e9


def run_inline(fn: Callable[[], T]) -> Deferred[T]:
    """The simulation's ``run_in_thread``: run now, return a fired Deferred."""
    return maybeDeferred(fn)


def run_later(clock: IReactorTime, delay: Callable[[], float]) -> Callable[..., Any]:
    """A ``run_in_thread`` whose thread is slow: each piece of work runs ``delay()``
    simulated seconds later (at once when that is 0), then its Deferred fires.  On a
    :class:`ProcessClock`, work not yet run when the process dies never runs (the
    crash came before the thread finished)."""

    def run(fn: Callable[[], T]) -> Deferred[T]:
        wait = delay()
        if wait <= 0:
            return maybeDeferred(fn)
        d: Deferred[T] = Deferred()

        def go() -> None:
            maybeDeferred(fn).chainDeferred(d)

        clock.callLater(wait, go)
        return d

    return run


class NetListen(service.Service):
    """Listens on the fake network while running (the ListenService of the simulation)."""

    def __init__(self, net: FakeNetwork, addr: str, factory: Any, node: str) -> None:
        self.net = net
        self.addr = addr
        self.factory = factory
        self.node = node

    def startService(self) -> None:
        super().startService()
        self.net.listen(self.addr, self.factory, self.node)

    def stopService(self) -> None:
        super().stopService()
        if self.net.listeners.get(self.addr) is not None:
            if self.net.listeners[self.addr].factory is self.factory:
                self.net.stop_listening(self.addr)


__all__ = ["NetListen", "ProcessClock", "run_inline", "run_later"]
