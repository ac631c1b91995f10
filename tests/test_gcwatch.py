"""dsml.gcwatch: the collector's pauses timed, start-up objects frozen."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from dsml.gcwatch import GcWatch, freeze_startup


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_watch_times_each_collection_with_its_timer() -> None:
    """The timer read at the start and end of each collection: the worst pause, and the
    full collections' count and total."""
    ticks = iter([10.0, 10.004, 20.0, 20.030, 30.0, 30.001])
    watch = GcWatch(timer=lambda: next(ticks)).install()
    try:
        gc.collect(0)  # 4 ms
        gc.collect(2)  # 30 ms, full
        gc.collect(1)  # 1 ms
    finally:
        watch.uninstall()
    assert watch.snapshot() == {"worst_ms": 30.0, "full": 1, "full_ms": 30.0}
    gc.collect()  # uninstalled: not counted (the timer would raise StopIteration)
    assert watch.full == 1


def test_install_is_idempotent_and_uninstall_removes_it() -> None:
    watch = GcWatch()
    watch.install().install()
    assert gc.callbacks.count(watch._callback) == 1
    watch.uninstall()
    assert watch._callback not in gc.callbacks


def test_freeze_startup_keeps_survivors_out_of_later_collections(unfrozen: None) -> None:
    """What exists at start-up is frozen (a later full collection does not walk it);
    what is made afterwards is collected as usual, cycles included."""
    kept = [[i] for i in range(1000)]
    frozen = freeze_startup()
    assert frozen >= len(kept)
    assert gc.get_freeze_count() == frozen
    assert not any(kept[0] is o for o in gc.get_objects())  # in the permanent generation

    class Cycle:
        pass
    a, b = Cycle(), Cycle()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    del a, b
    assert gc.collect() >= 2  # made after the freeze: a cycle still goes
