"""The interpreter's garbage collector, watched and kept off the long-lived objects.

A full collection walks every container object the process holds: in a master with a
thousand worker links and a big job admitted, one took 40-60 ms of the reactor's turn,
the worst stall of a 100,000-task submit (issue #11).  Two things here:

- :class:`GcWatch` times every collection through ``gc.callbacks`` (the worst pause, and
  the count and total of full ones), so ``dsml nodes`` and the benchmarks can tell a
  collector's pause from the program's own work;
- :func:`freeze_startup` moves what exists once a daemon is built (modules, classes,
  its services and state: objects that live as long as the process) to the collector's permanent
  generation (``gc.freeze``), so later full collections do not walk them again.  Objects
  frozen are still freed by reference counting; only a reference cycle among them would
  outlive its use, and start-up objects live for good anyway.

Both are for a daemon's process (twistd's master and worker), never for code that runs
many nodes in one process (the simulation): the collector is the process's.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service

__all__ = ["DaemonGc", "GcWatch", "freeze_startup"]


class GcWatch:
    """Times the collector's runs (``gc.callbacks``); :meth:`snapshot` gives the figures.

    ``timer`` is a monotonic clock in seconds (``time.perf_counter``; tests pass a fake).
    """

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self.timer = timer
        #: The longest collection so far, in seconds (any generation).
        self.worst = 0.0
        #: Full (generation 2) collections so far, and their total time in seconds.
        self.full = 0
        self.full_seconds = 0.0
        self._started: float | None = None

    def install(self) -> GcWatch:
        """Start timing (idempotent); returns itself."""
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        """Stop timing; the figures stay readable."""
        while self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        # Called by the interpreter around each collection: never raise from here.
        if phase == "start":
            self._started = self.timer()
            return
        if self._started is None:
            return
        took = self.timer() - self._started
        self._started = None
        self.worst = max(self.worst, took)
        if info.get("generation") == 2:
            self.full += 1
            self.full_seconds += took

    def snapshot(self) -> dict[str, float | int]:
        """``worst_ms``, ``full`` (count) and ``full_ms`` (total), JSON-ready."""
        return {
            "worst_ms": round(self.worst * 1000, 3),
            "full": self.full,
            "full_ms": round(self.full_seconds * 1000, 3),
        }


def freeze_startup() -> int:
    """Collect once, then freeze every object that survived (see the module docstring);
    returns how many objects are now in the permanent generation."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class DaemonGc(service.Service):
    """A daemon's collector, timed while it runs (:class:`GcWatch`).  Freeze its
    start-up objects with :func:`freeze_startup` once it is built, before it listens:
    the collection that comes with it would otherwise stall its first reactor turns."""

    def __init__(self, watch: GcWatch) -> None:
        self.watch = watch

    def startService(self) -> None:
        super().startService()
        self.watch.install()

    def stopService(self) -> None:
        super().stopService()
        self.watch.uninstall()
