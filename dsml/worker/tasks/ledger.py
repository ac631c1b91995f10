"""The slot ledger: which attempts hold slots, which results await the master's
acknowledgement, and where an attempt's logs are.

Shared by :class:`~dsml.worker.tasks.TaskManager` and the simulation's fake manager
(``dsml.testing.sim``), so both answer the worker's glue the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import attrs

from .logs import STDERR_NAME, STDOUT_NAME
from .spec import AttemptResult, AttemptSpec, TaskError, validate

#: A command named this runs the worker's Python for functions (its ``python``, by
#: default its own ``sys.executable``): what a
#: function task runs by default, so it finds dsml and cloudpickle as the worker does.
WORKER_PYTHON = "dsml-python"


class AttemptLedger:
    """Which attempts hold slots, which results await the master's acknowledgement, and
    where an attempt's logs are.

    Subclasses set ``slots``, ``work_dir``, ``_active`` (attempt id -> an object with a
    ``spec``), ``_results`` (attempt id -> AttemptResult) and ``_kept`` (ids of finished
    attempt directories still on disk).
    """

    slots: int
    #: Memory (bytes; 0: none declared) and GPU ids the worker offers tasks.
    mem: int = 0
    gpus: tuple[str, ...] = ()
    #: What ``dsml-python`` runs (:data:`WORKER_PYTHON`).
    python: str = sys.executable
    work_dir: Path
    _active: dict[int, Any]
    _results: dict[int, AttemptResult]
    _kept: Any

    def free_slots(self) -> int:
        """Slots not held by an attempt."""
        return self.slots - sum(a.spec.slots for a in self._active.values())

    def admit(self, spec: AttemptSpec) -> AttemptSpec:
        """``spec`` with the GPUs it is given, if it may start now: TaskError
        ``bad-task`` for one that can never run here, ``busy`` for one that does not fit
        in what is free now (the master's view lags a moment behind)."""
        validate(spec, self.slots)
        if spec.gpus > len(self.gpus) or (self.mem and spec.mem > self.mem):
            raise TaskError(f"needs {spec.gpus} GPUs and {spec.mem} bytes; this worker has"
                            f" {len(self.gpus)} and {self.mem}", "bad-task")
        active = [a.spec for a in self._active.values()]
        free = self.free_slots()
        if spec.slots > free:
            raise TaskError(f"busy: {spec.slots} slots wanted, {free} free", "busy")
        held = {g for s in active for g in s.gpu_ids}
        idle = [g for g in self.gpus if g not in held]
        if spec.gpus > len(idle):
            raise TaskError(f"busy: {spec.gpus} GPUs wanted, {len(idle)} free", "busy")
        mem_free = self.mem - sum(s.mem for s in active)
        if self.mem and spec.mem > mem_free:
            raise TaskError(f"busy: {spec.mem} bytes of memory wanted, {mem_free} free", "busy")
        command = spec.command
        if command[0] == WORKER_PYTHON:  # the worker's interpreter for function tasks
            command = (self.python, *command[1:])
        return attrs.evolve(spec, gpu_ids=tuple(idle[: spec.gpus]), command=command)

    def running(self) -> list[int]:
        """Ids of the attempts holding slots (staging, running or uploading)."""
        return list(self._active)

    def logs(self, attempt_id: int) -> tuple[Path, Path]:
        """Paths of the stdout and stderr logs of a running or kept attempt."""
        active = self._active.get(attempt_id)
        if active is None and attempt_id not in self._kept:
            raise TaskError(f"no attempt {attempt_id} on this worker", "not-found")
        # A running attempt works in its own directory (TaskManager: run/<n>); a
        # finished one's is work_dir/<id> (or absent: then its logs read as empty).
        d = getattr(active, "dir", None) or self.work_dir / str(attempt_id)
        return d / STDOUT_NAME, d / STDERR_NAME

    def finished_results(self) -> list[AttemptResult]:
        """Results not yet acknowledged by the master, oldest first (re-sent on reconnect)."""
        return list(self._results.values())

    def ack(self, attempt_id: int) -> None:
        """The master has committed this result: forget it (its directory stays a while)."""
        self._results.pop(attempt_id, None)
