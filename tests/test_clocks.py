"""Which clock the timers run on (dsml.clocks): the daemons' reactor, the simulation's.

A step of the wall clock (NTP, ``date -s``, a VM resumed) must move no timer: a Twisted
reactor left as it is runs its calls at wall-clock times, so a step forward runs every
heartbeat timeout at once and a step back holds every timer as long.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import twisted.internet
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import Clock

from dsml.clocks import monotonic_reactor, timer_clock, timers_of
from dsml.tap import daemon_reactor
from dsml.testing.sim import ProcessClock


class Fake:
    """A clock that moves only when told to."""

    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


@pytest.fixture
def fresh() -> Iterator[SelectReactor]:
    """A real reactor (Twisted's ReactorBase timer queue), never run, its waker closed
    afterwards."""
    r = SelectReactor()
    yield r
    r.removeReader(r.waker)
    r.waker.connectionLost(None)


def run_due(r: SelectReactor) -> None:
    """One turn of the reactor's timers (what its loop does between waits)."""
    r.runUntilCurrent()


def test_timers_run_on_the_monotonic_clock() -> None:
    assert timer_clock(time.monotonic, time.time) is time.monotonic


def test_a_monotonic_reactor_ignores_steps_of_the_wall_clock(fresh: SelectReactor) -> None:
    """A call scheduled before the switch keeps its delay; none runs when the wall
    clock steps forward, each runs when its monotonic delay has passed."""
    ran: list[str] = []
    fresh.callLater(5.0, ran.append, "before")
    mono, wall = Fake(1000.0), Fake(1.7e9)
    monotonic_reactor(fresh, monotonic=mono, wall=wall)
    assert fresh.seconds is mono
    fresh.callLater(10.0, ran.append, "after")
    assert fresh.timeout() == pytest.approx(5.0, abs=0.01)
    wall.at += 120.0  # NTP steps the clock two minutes forward
    run_due(fresh)
    assert ran == []
    wall.at -= 240.0  # and back
    mono.at += 5.0
    run_due(fresh)
    assert ran == ["before"]
    mono.at += 5.0
    run_due(fresh)
    assert ran == ["before", "after"]
    monotonic_reactor(fresh, monotonic=mono, wall=wall)  # idempotent
    assert fresh.seconds is mono


def test_the_daemons_reactor_is_not_fooled_by_the_wall_clock(
    fresh: SelectReactor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """twistd's reactor, as :func:`dsml.tap.daemon_reactor` hands it to both roles: an
    hour of wall clock passing at once runs none of its timers (a reactor as Twisted
    makes it would run them all)."""
    assert timers_of(fresh) == "wall"
    monkeypatch.setattr(twisted.internet, "reactor", fresh, raising=False)
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        assert daemon_reactor() is fresh
    finally:
        os.umask(umask)
    assert fresh.seconds is time.monotonic
    assert timers_of(fresh) == "monotonic"
    ran: list[int] = []
    fresh.callLater(60.0, ran.append, 1)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600.0)
    run_due(fresh)
    assert ran == []


def test_timers_of_a_test_clock_are_other() -> None:
    assert timers_of(Clock()) == "other"


# -- the simulation's machines -------------------------------------------------------------


def test_a_simulated_machines_timers_ignore_its_wall_clock_steps() -> None:
    """As a daemon's: a step moves ``wall_time`` (the records' clock), no timer."""
    shared = Clock()
    machine = ProcessClock(shared, offset=300.0)
    assert not machine.wall
    ran: list[str] = []
    machine.callLater(10.0, ran.append, "beat")
    machine.jump(120.0)
    shared.advance(0.0)
    assert ran == []
    assert machine.wall_time() == pytest.approx(420.0)
    assert machine.seconds() == 0.0
    machine.jump(-240.0)
    shared.advance(10.0)
    assert ran == ["beat"]
    assert machine.wall_time() == pytest.approx(190.0)


def test_a_simulated_reactor_on_the_wall_clock_is_moved_by_its_steps() -> None:
    """What the simulation models when the timers are on the wall clock (a reactor as
    Twisted makes it): a step forward runs what it passes, a step back holds it."""
    shared = Clock()
    machine = ProcessClock(shared, offset=300.0, timers=lambda monotonic, wall: wall)
    assert machine.wall
    ran: list[str] = []
    machine.callLater(10.0, ran.append, "a")
    machine.callLater(200.0, ran.append, "b")
    machine.jump(120.0)
    shared.advance(0.0)
    assert ran == ["a"]
    machine.jump(-120.0)
    shared.advance(80.0)
    assert ran == ["a"]
    shared.advance(120.0)
    assert ran == ["a", "b"]
