"""What holds an attempt's processes together: its cgroups, or the subreaper.

:class:`Isolation` is the one object :class:`~.manager.TaskManager` asks, for each
attempt, to :meth:`~Isolation.prepare` (make its cgroups, with its memory limit),
:meth:`~Isolation.wrap` its command (join them before the exec), :meth:`~Isolation.kill`
everything of it, read what it used when it has ended (:meth:`~Isolation.ended`: the
peak memory, CPU seconds, and an ``out-of-memory`` reason if the kernel OOM-killed it)
and :meth:`~Isolation.release` its cgroups.  Where the worker has cgroups,
:mod:`.cgroups` does the work; where it has none and ``subreaper`` is set,
:mod:`.subreaper` (kill by the environment mark, reap the orphans); else only the
process-group rules (:mod:`.groups`) hold.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from .cgroups import CgroupTree, Usage, oom_reason
from .spec import AttemptSpec
from .subreaper import Subreaper

log = Logger()

#: Seconds between two tries to remove killed attempts' cgroups still emptying.
CGROUP_RETRY = 0.05


class Isolation:
    """The containment of a worker's attempts (see the module docstring).

    :param clock: ``IReactorTime``.
    :param cgroups: the worker's attempt cgroups (:func:`~.cgroups.detect`), or None.
    :param subreaper: without cgroups, become a child subreaper and kill an attempt's
        processes by their environment mark.
    :param known: the pids of live leaders (reaped by the manager, never here).
    """

    def __init__(
        self,
        clock: Any,
        work_dir: Path,
        cgroups: CgroupTree | None,
        subreaper: bool = False,
        known: Callable[[], Collection[int]] = frozenset,
    ) -> None:
        self.clock = clock
        self.cgroups = cgroups
        self._sh = shutil.which("sh") if cgroups is not None else None
        self.subreaper: Subreaper | None = None
        if cgroups is None and subreaper:
            self.subreaper = Subreaper(clock, work_dir, known)
            why = self.subreaper.start()
            if why:
                log.warn("cannot become a child subreaper ({why}): a task's process that "
                         "leaves its group may outlive it", why=why)
        # Attempt cgroups still to remove once their last process is gone.
        self._emptying: list[Path] = cgroups.sweep() if cgroups is not None else []
        self._retry: Any = None
        if self._emptying:
            self._remove()

    @property
    def wraps(self) -> bool:
        """Whether commands are wrapped (:meth:`wrap`) to join the attempt's cgroups."""
        return self.cgroups is not None and self._sh is not None

    def prepare(self, spec: AttemptSpec) -> Path | None:
        """Make the attempt's cgroups, with its memory limit (OSError if it cannot)."""
        if not self.wraps:
            return None
        assert self.cgroups is not None
        return self.cgroups.make(spec.attempt_id, spec.mem)

    def prepare_warm(self, name: str) -> Path | None:
        """A cgroup for a warm interpreter (:mod:`.warm`), with no limit yet."""
        if not self.wraps:
            return None
        assert self.cgroups is not None
        return self.cgroups.make(name)

    def limit(self, cgroup: Path | None, mem: int) -> None:
        """Limit a warm interpreter's cgroup once it is an attempt's (OSError if not)."""
        if cgroup is not None and self.cgroups is not None and mem > 0:
            self.cgroups.limit(cgroup, mem)

    def adopt(self, cgroup: Path | None, pid: int) -> None:
        """Move a forked warm interpreter into its cgroups (OSError if it cannot be)."""
        if cgroup is not None and self.cgroups is not None:
            self.cgroups.move(cgroup, pid)

    def wrap(self, cgroup: Path | None, command: list[str]) -> list[str]:
        """``command`` made to join the attempt's cgroups before it runs."""
        if cgroup is None or self.cgroups is None or self._sh is None:
            return command
        return self.cgroups.wrap(self._sh, cgroup, command)

    def kill(self, attempt_id: int, cgroup: Path | None) -> None:
        """SIGKILL every process of the attempt, those that left its group too."""
        if cgroup is not None and self.cgroups is not None:
            self.cgroups.kill(cgroup)
        elif self.subreaper is not None:
            self.subreaper.kill(attempt_id)

    def ended(self, spec: AttemptSpec, cgroup: Path | None, failed: bool) -> tuple[Usage, str]:
        """What the ended attempt used, and ``out-of-memory...`` if it ``failed`` after
        the kernel OOM-killed one of its processes (else "")."""
        if cgroup is None or self.cgroups is None:
            return Usage(), ""
        usage = self.cgroups.usage(cgroup)
        return usage, oom_reason(spec.mem) if failed and usage.oom_kills else ""

    def release(self, cgroup: Path | None) -> None:
        """Kill what is left in the attempt's cgroups and remove them (now or soon)."""
        if cgroup is None or self.cgroups is None:
            return
        self.cgroups.kill(cgroup)
        self._emptying.append(cgroup)
        if self._retry is None:
            self._remove()

    def close(self) -> None:
        """The worker stops: its cgroup subtree goes with it, if empty (a next start
        makes it); it is a subreaper no more."""
        if self.cgroups is not None and not self._emptying:
            self.cgroups.remove(self.cgroups.root)
        if self.subreaper is not None:
            self.subreaper.close()

    def _remove(self) -> None:
        """Remove the attempt cgroups whose processes are all gone; look again later
        for the others (the kernel empties a killed cgroup in a moment)."""
        assert self.cgroups is not None
        self._retry = None
        self._emptying = [p for p in self._emptying if not self.cgroups.remove(p)]
        if self._emptying:
            self._retry = self.clock.callLater(CGROUP_RETRY, self._remove)
