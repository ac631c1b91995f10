"""The task manager's mutable record of one attempt (:class:`Attempt`)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProcessTransport

from .logs import CappedLog, stderr_tail
from .spec import AttemptResult, AttemptSpec
from .watch import PipeReader


@attrs.define(eq=False)
class Attempt:
    """The manager's mutable record of one attempt."""

    spec: AttemptSpec
    dir: Path
    stop_reason: str = ""
    phase: str = "queued"  # queued, fetching, running, uploading
    pending: list[Deferred[Any]] = attrs.Factory(list)
    transport: IProcessTransport | None = None  # the spawnProcess path
    popen: subprocess.Popen[bytes] | None = None  # the Popen path, kept until waited for
    pipes: list[PipeReader] = attrs.Factory(list)  # the Popen path: pipes still open
    pid: int | None = None
    cgroup: Path | None = None  # its cgroup (.cgroups), when the worker has them
    reaped: bool = False
    started: float = 0.0
    duration: float = 0.0
    exit_code: int | None = None
    signal: int | None = None
    peak_rss: int = 0
    cpu_seconds: float | None = None
    timers: dict[str, IDelayedCall] = attrs.Factory(dict)
    logs: tuple[CappedLog, CappedLog] | None = None
    ended: Deferred[None] = attrs.Factory(Deferred)
    #: The result output's content, read instead of uploaded (AttemptSpec.result).
    inline: bytes = b""
    done: Deferred[None] = attrs.Factory(Deferred)

    def result(self, reason: str) -> AttemptResult:
        """The result, with ``reason``; a failure's carries the tail of its stderr (read
        only then: a success reads no file)."""
        tail = stderr_tail(self.logs[1]) if reason and self.logs is not None else ""
        return AttemptResult(
            attempt_id=self.spec.attempt_id,
            exit_code=self.exit_code,
            signal=self.signal,
            duration=self.duration,
            peak_rss=self.peak_rss,
            reason=reason,
            stderr_tail=tail,
            cpu_seconds=self.cpu_seconds,
            result=b"" if reason else self.inline,
        )

    def cancel_timer(self, name: str) -> None:
        """Cancel the named timer if it is pending."""
        call = self.timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()
