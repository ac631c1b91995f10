"""A cgroup (v2) per attempt: the whole process tree of a task, whatever it does; and
its memory limit and accounting.

A task leads its own process group (:mod:`.groups`), but a process that calls ``setsid``
or ``setpgid`` leaves it, and once its parent exits it is reparented to init: it
survived success, timeout and cancel, and read the next attempt's files (issue #13).  A
cgroup cannot be left: every process a task starts is in its attempt's cgroup, and
``cgroup.kill`` (Linux >= 5.14; before it, SIGKILL to every member until none is left)
ends them all.

Where: under the worker's own cgroup in the unified (v2) hierarchy, one subtree per
worker, named after its task directory (stable across restarts, distinct for two workers
on one host), and in it ``a<attempt id>`` per attempt.  The command joins its cgroup
before it runs: it is started as ``sh -c 'echo 0 >"$0" || exit 125; exec "$@"'`` with the
cgroup's ``cgroup.procs`` as ``$0`` (writing 0 there moves the writer), so even a task
that forks at once has no child outside it (a spawn cannot name a cgroup from Python).

When the worker may not create cgroups there (no cgroup2 mount, a cgroup owned by
someone else, as a desktop session's under systemd without delegation), :func:`detect`
says why and the worker runs tasks without one: the process-group rules only, which a
``setsid`` child escapes, unless the worker becomes a child subreaper
(:mod:`.subreaper`).

Memory (``AttemptSpec.mem``, bytes, 0 for no limit).  Where the memory controller is
available to the attempt's v2 cgroup (listed in the worker subtree's
``cgroup.controllers``; the worker enables it in its ``cgroup.subtree_control``), the
attempt's cgroup gets ``memory.max = mem`` and ``memory.swap.max = 0`` (swap may not
absorb the limit); ``memory.events`` counts the OOM kills, ``memory.peak`` (Linux >= 5.19)
is the peak.  Else, on a hybrid layout (cgroup v2 with no controllers, the v1 memory
controller at ``/sys/fs/cgroup/memory``), a v1 memory cgroup per attempt under the
worker's own v1 memory cgroup, named as in the v2 tree (``dsml-<hash>/a<attempt id>``):
``memory.limit_in_bytes`` and ``memory.memsw.limit_in_bytes`` (memory + swap) = mem,
``memory.oom_control``'s ``oom_kill`` counts the kills, ``memory.max_usage_in_bytes`` is
the peak (page cache included).  The command then joins both cgroups before its exec
(:func:`wrap_command`).  Where neither is usable, :func:`detect` says so (the worker logs
it once, at start) and a ``mem`` limit is not enforced: the attempt still runs, and only
the sampled peak RSS is reported.  An attempt the kernel OOM-killed ends with a reason
starting ``out-of-memory`` (:func:`oom_reason`), although its process just saw SIGKILL.

CPU time: ``cpu.stat``'s ``usage_usec`` of the v2 cgroup (present without the cpu
controller); none where there is no v2 cgroup.

At start-up the worker kills and removes every attempt cgroup an earlier run left (a
worker killed with -9 cannot stop its tasks), the v1 ones too.
"""

from __future__ import annotations

import hashlib
import os
import signal as signal_module
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs
from twisted.logger import Logger

__all__ = [
    "CgroupTree",
    "Usage",
    "detect",
    "oom_reason",
    "remove_tree",
    "tree_path",
    "wrap_command",
]

log = Logger()

#: The shell line that moves itself into the cgroup whose ``cgroup.procs`` is ``$0``,
#: then becomes the command (``$@``).  Exit status 125 if it cannot.
JOIN: Final = (
    'echo 0 >"$0" || { echo "dsml: cannot join the attempt cgroup" >&2; exit 125; }; exec "$@"'
)
#: Rounds of SIGKILL to every member where ``cgroup.kill`` is missing.
KILL_ROUNDS: Final = 50
#: Every out-of-memory reason starts so (the master's cause "out-of-memory").
OOM_PREFIX: Final = "out-of-memory"


def _join_line(extra: int) -> str:
    """:data:`JOIN` for ``1 + extra`` cgroups: ``$0`` then ``$1``..``$extra``."""
    if not extra:
        return JOIN
    fail = '{ echo "dsml: cannot join the attempt cgroup" >&2; exit 125; }'
    joins = [f'echo 0 >"${i}" || {fail}' for i in range(extra + 1)]
    return "; ".join([*joins, f"shift {extra}", 'exec "$@"'])


def wrap_command(
    sh: str, cgroup: Path, command: list[str], also: Sequence[Path] = ()
) -> list[str]:
    """``command`` started inside ``cgroup`` and the (v1) cgroups ``also`` (see the
    module docstring)."""
    procs = [str(p / "cgroup.procs") for p in (cgroup, *also)]
    return [sh, "-c", _join_line(len(also)), *procs, *command]


def _size(n: int) -> str:
    """``64 MiB``, ``2 GiB``, or bytes when not a whole number of either."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def oom_reason(mem: int) -> str:
    """The reason of an attempt the kernel OOM-killed (starts with :data:`OOM_PREFIX`)."""
    if mem > 0:
        return f"{OOM_PREFIX}: used more than its {_size(mem)} (--mem)"
    return f"{OOM_PREFIX}: killed by the kernel's OOM killer"


def _v2_mount(mountinfo: str) -> Path | None:
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            fields = left.split()
            if len(fields) >= 5:
                return Path(fields[4])
    return None


def _v1_mount(mountinfo: str, controller: str) -> Path | None:
    """Where the v1 hierarchy holding ``controller`` is mounted."""
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        kind = right.split(" ")
        fields = left.split()
        if kind[0] == "cgroup" and len(kind) >= 3 and len(fields) >= 5:
            if controller in kind[2].split(","):
                return Path(fields[4])
    return None


def _own_path(cgroup: str, controller: str = "") -> str | None:
    """This process's cgroup: the v2 one (``0::``), or the v1 one of ``controller``."""
    for line in cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if (not controller and parts[0] == "0" and parts[1] == "") or (
            controller and controller in parts[1].split(",")
        ):
            return parts[2]
    return None


def _name(work_dir: Path) -> str:
    return "dsml-" + hashlib.sha256(str(Path(work_dir).resolve()).encode()).hexdigest()[:16]


def tree_path(work_dir: Path, proc: Path = Path("/proc")) -> tuple[Path | None, str]:
    """Where the attempt cgroups of a worker with ``work_dir`` go (under this process's
    own cgroup), or None and why there is nowhere."""
    try:
        mount = _v2_mount((proc / "self" / "mountinfo").read_text())
        own = _own_path((proc / "self" / "cgroup").read_text())
    except OSError as e:
        return None, f"cannot read /proc: {e.strerror or e}"
    if mount is None or own is None:
        return None, "no cgroup v2 (unified) hierarchy mounted"
    return mount / own.lstrip("/") / _name(work_dir), ""


def v1_memory_path(work_dir: Path, proc: Path = Path("/proc")) -> tuple[Path | None, str]:
    """Where the v1 memory cgroups of a worker with ``work_dir`` go (under this process's
    own v1 memory cgroup), or None and why there is nowhere."""
    try:
        mount = _v1_mount((proc / "self" / "mountinfo").read_text(), "memory")
        own = _own_path((proc / "self" / "cgroup").read_text(), "memory")
    except OSError as e:
        return None, f"cannot read /proc: {e.strerror or e}"
    if mount is None or own is None:
        return None, "no cgroup v1 memory controller mounted"
    return mount / own.lstrip("/") / _name(work_dir), ""


def remove_tree(work_dir: Path) -> None:
    """Kill what is left in the attempt cgroups of the worker with ``work_dir`` and
    remove them, the v1 memory ones too (a worker stopped with SIGKILL leaves them; its
    next start would)."""
    root, _ = tree_path(work_dir)
    v1, _ = v1_memory_path(work_dir)
    if root is None:
        return
    tree = CgroupTree(root, v1_memory=v1 if v1 is not None and v1.is_dir() else None)
    if not root.is_dir() and tree.v1_memory is None:
        return
    left = tree.sweep()
    for _ in range(KILL_ROUNDS * 20):
        left = [p for p in left if not tree.remove(p)]
        if not left:
            break
    tree.remove(root)


def _probe(root: Path) -> None:
    """Make ``root`` and check a cgroup can be made in it (OSError if not)."""
    root.mkdir(exist_ok=True)
    probe = root / "probe"
    probe.mkdir(exist_ok=True)
    probe.rmdir()


def _v2_memory(root: Path) -> str:
    """Enable the memory controller for the attempts under ``root``; "" or why not."""
    try:
        available = (root / "cgroup.controllers").read_text().split()
    except OSError as e:
        return f"cannot read {root / 'cgroup.controllers'}: {e.strerror or e}"
    if "memory" not in available:
        return "no memory controller in the cgroup v2 subtree"
    try:
        (root / "cgroup.subtree_control").write_text("+memory")
    except OSError as e:
        return f"cannot enable the v2 memory controller: {e.strerror or e}"
    return ""


def detect(work_dir: Path, proc: Path = Path("/proc")) -> tuple[CgroupTree | None, str]:
    """The worker's attempt cgroups under its own cgroup, or None and why not (the
    text also says how memory limits are enforced, or why they are not)."""
    root, why = tree_path(work_dir, proc)
    if root is None:
        return None, why
    try:
        _probe(root)
    except OSError as e:
        return None, f"cannot create cgroups under {root.parent}: {e.strerror or e}"
    how = f"one cgroup per attempt under {root}"
    no_v2 = _v2_memory(root)
    if not no_v2:
        return CgroupTree(root, v2_memory=True), f"{how}; memory limits (--mem) in it"
    v1, no_v1 = v1_memory_path(work_dir, proc)
    if v1 is not None:
        try:
            _probe(v1)
            if not (v1 / "memory.limit_in_bytes").exists():
                raise OSError(0, "no memory.limit_in_bytes")
        except OSError as e:
            no_v1 = f"cannot create v1 memory cgroups under {v1.parent}: {e.strerror or e}"
        else:
            return CgroupTree(root, v1_memory=v1), f"{how}; memory limits (--mem) under {v1}"
    return CgroupTree(root), f"{how}; memory limits (--mem) NOT enforced: {no_v2}; {no_v1}"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _keyed(path: Path, key: str) -> int | None:
    """The value of ``key`` in a ``key value`` per line file (memory.events, cpu.stat)."""
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        pass
    return None


@attrs.frozen
class Usage:
    """What an attempt's cgroups say it used: the peak memory in bytes (0 unknown), its
    CPU seconds (None unknown), and how many of its processes the OOM killer took."""

    peak: int = 0
    cpu_seconds: float | None = None
    oom_kills: int = 0


class CgroupTree:
    """The attempt cgroups of one worker, under ``root`` (which exists), and, where the
    memory controller is only in v1, their v1 memory cgroups under ``v1_memory``.

    :param v2_memory: whether the memory controller is enabled for the attempts.
    """

    def __init__(
        self, root: Path, *, v2_memory: bool = False, v1_memory: Path | None = None
    ) -> None:
        self.root = root
        self.has_kill = (root / "cgroup.kill").exists()
        self.v2_memory = v2_memory
        self.v1_memory = v1_memory

    @property
    def limits_memory(self) -> bool:
        """Whether a ``mem`` limit is enforced."""
        return self.v2_memory or self.v1_memory is not None

    def path(self, attempt_id: int | str) -> Path:
        """An attempt's cgroup (a warm interpreter's: ``aw<n>``, :mod:`.warm`)."""
        return self.root / f"a{attempt_id}"

    def v1_paths(self, path: Path) -> list[Path]:
        """The v1 cgroups that go with the v2 cgroup ``path`` (an attempt's, or the root)."""
        if self.v1_memory is None:
            return []
        return [self.v1_memory if path == self.root else self.v1_memory / path.name]

    def make(self, attempt_id: int | str, mem: int = 0, *, again: bool = True) -> Path:
        """A fresh, empty cgroup for the attempt (one left by an earlier run with the
        same id is emptied and replaced), with ``mem`` bytes of memory at most if > 0."""
        path = self.path(attempt_id)
        for p in (path, *self.v1_paths(path)):
            try:
                p.mkdir()
            except FileExistsError:
                if not again:
                    raise
                self.kill(path)
                self.remove(path)
                return self.make(attempt_id, mem, again=False)
        if mem > 0:
            try:
                self.limit(path, mem)
            except OSError:
                self.remove(path)
                raise
        return path

    def limit(self, path: Path, mem: int) -> None:
        """Write the limit: no swap may absorb it.  OSError (EBUSY) if the cgroup already
        uses more."""
        if self.v2_memory:
            (path / "memory.max").write_text(str(mem))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
            if (path / "memory.oom.group").exists():
                (path / "memory.oom.group").write_text("1")  # the whole task goes
        for v1 in self.v1_paths(path):
            (v1 / "memory.limit_in_bytes").write_text(str(mem))
            if (v1 / "memory.memsw.limit_in_bytes").exists():
                (v1 / "memory.memsw.limit_in_bytes").write_text(str(mem))
            else:  # no swap accounting: keep it out of swap as far as v1 can
                (v1 / "memory.swappiness").write_text("0")

    def move(self, path: Path, pid: int) -> None:
        """Move the process ``pid`` into ``path`` and its v1 cgroups (a forked warm
        interpreter, :mod:`.zygote`); OSError if it cannot be."""
        for p in (path, *self.v1_paths(path)):
            (p / "cgroup.procs").write_text(str(pid))

    def wrap(self, sh: str, path: Path, command: list[str]) -> list[str]:
        """``command`` started inside the attempt's cgroups (:func:`wrap_command`)."""
        return wrap_command(sh, path, command, self.v1_paths(path))

    def usage(self, path: Path) -> Usage:
        """What the attempt whose cgroup is ``path`` used (read before it is removed)."""
        peak, ooms = 0, 0
        if self.v2_memory:
            peak = _read_int(path / "memory.peak") or 0
            ooms = _keyed(path / "memory.events", "oom_kill") or 0
        for v1 in self.v1_paths(path):
            peak = max(peak, _read_int(v1 / "memory.max_usage_in_bytes") or 0)
            ooms += _keyed(v1 / "memory.oom_control", "oom_kill") or 0
        usec = _keyed(path / "cpu.stat", "usage_usec")
        return Usage(peak, None if usec is None else usec / 1e6, ooms)

    def members(self, path: Path) -> list[int]:
        """The pids in ``path`` (none once it is gone)."""
        try:
            text = (path / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(x) for x in text.split()]

    def kill(self, path: Path) -> None:
        """SIGKILL every process in ``path`` (and its v1 cgroups; it may take the kernel
        a moment to empty them)."""
        if self.has_kill:
            try:
                (path / "cgroup.kill").write_text("1")
            except OSError:
                self._kill_members(path)  # gone, or no cgroup.kill after all: the slow way
        else:
            self._kill_members(path)
        for v1 in self.v1_paths(path):
            self._kill_members(v1)

    def _kill_members(self, path: Path) -> None:
        for _ in range(KILL_ROUNDS):
            pids = self.members(path)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal_module.SIGKILL)
                except OSError:
                    pass

    def remove(self, path: Path) -> bool:
        """Remove the (empty) cgroup ``path`` and its v1 cgroups; False while processes
        are still in one of them."""
        done = True
        for p in (*self.v1_paths(path), path):
            try:
                p.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                done = False
        return done

    def sweep(self) -> list[Path]:
        """Kill the processes of every attempt cgroup an earlier run left and remove
        those already empty; the ones still emptying are returned (remove them later)."""
        names: set[str] = set()
        for root in (self.root, *self.v1_paths(self.root)):
            try:
                names.update(p.name for p in root.iterdir()
                             if p.is_dir() and p.name.startswith("a"))
            except OSError:
                pass
        left = [self.root / name for name in sorted(names)]
        for path in left:
            self.kill(path)
        if left:
            log.warn("killed the processes of {n} attempts an earlier run left", n=len(left))
        return [path for path in left if not self.remove(path)]
