"""Which clock each kind of time is read on, in every dsml process.

Two clocks, never mixed:

* the **monotonic** clock (``time.monotonic``): it never steps.  Every timer (a
  ``callLater``, a ``LoopingCall``), every deadline, timeout, TTL, grace period and
  heartbeat age runs on it;
* the **wall** clock (``time.time``): only for times that are records, read by people or
  kept across restarts (a job's submitted, started and finished times, an attempt's,
  a tombstone's date, a file's age, log lines).  The node logic takes it as a ``now``
  callable, apart from its clock.

A Twisted reactor reads the wall clock: ``reactor.seconds`` is
``twisted.python.runtime.seconds``, ``time.time`` (twisted/twisted#2424, open: code
may do date arithmetic on it).  Its pending calls are due at wall-clock times, so when
the wall clock steps (NTP stepping a clock that is more than 128 ms off, an operator's
``date -s``, a VM resumed) every call the step passes forward runs at once (heartbeat
timeouts: live workers declared dead, grace periods cut short), and a step back holds
every call as long.  So the daemons put their reactor on the monotonic clock
(:func:`monotonic_reactor`, from :mod:`dsml.tap`, before the node is built): every
timer of the process, dsml's and Twisted's own (connect timeouts), is then immune to
steps.  Nothing in dsml reads ``reactor.seconds()`` as a date, and the parts of Twisted
dsml uses do not either (its loggers stamp events with ``time.time``).

:func:`timer_clock` is the one decision: which of a machine's two clocks its reactor's
timers run on.  :func:`monotonic_reactor` applies it to a real reactor;
:class:`dsml.testing.sim.ProcessClock` asks it too, so that the simulation's machines,
whose wall clocks step, run their timers as the daemons do.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Any

__all__ = ["TIMERS", "monotonic_reactor", "timer_clock", "timers_of"]

#: Names of what :func:`timers_of` answers.
TIMERS = ("monotonic", "wall", "other")


def timer_clock(monotonic: Callable[[], float], wall: Callable[[], float]) -> Callable[[], float]:
    """The clock a process's timers run on, of its machine's ``monotonic`` and
    ``wall`` clocks: the monotonic one (a step of the wall clock moves no timer)."""
    return monotonic


def monotonic_reactor(reactor: Any, monotonic: Callable[[], float] = time.monotonic,
                      wall: Callable[[], float] = time.time) -> None:
    """Run ``reactor``'s timers on :func:`timer_clock` (the monotonic clock) from now on.

    Call it before the node is built.  Calls already pending (none, when twistd builds
    the service; but a plugin or Twisted itself could have made one) are moved to the
    new clock, each still due as many seconds from now as it was: they keep their order,
    so the reactor's heap stays a heap.  Idempotent."""
    seconds = timer_clock(monotonic, wall)
    old = reactor.seconds
    if old is seconds:
        return
    shift = seconds() - old()
    calls = [*getattr(reactor, "_pendingTimedCalls", ()), *getattr(reactor, "_newTimedCalls", ())]
    if not hasattr(reactor, "_pendingTimedCalls"):
        calls = list(reactor.getDelayedCalls())
    for call in calls:
        call.time += shift
        call.seconds = seconds
    heap = getattr(reactor, "_pendingTimedCalls", None)
    if heap:
        heapq.heapify(heap)
    # ReactorBase.callLater reads self.seconds, and gives each DelayedCall the same.
    reactor.seconds = seconds


def timers_of(reactor: Any) -> str:
    """Which clock ``reactor``'s timers run on: "monotonic", "wall" (a reactor left as
    Twisted makes it) or "other" (a test's or a simulation's clock)."""
    seconds = getattr(reactor, "seconds", None)
    if seconds is time.monotonic:
        return "monotonic"
    if seconds is time.time:
        return "wall"
    return "other"
