"""A cgroup (v2) per attempt: the whole process tree of a task, whatever it does.

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
``setsid`` child escapes.  (No memory limit or accounting yet: that needs the memory
controller enabled for the subtree, which a delegated cgroup may offer; see issue #13.)

At start-up the worker kills and removes every attempt cgroup an earlier run left (a
worker killed with -9 cannot stop its tasks).
"""

from __future__ import annotations

import hashlib
import os
import signal as signal_module
from pathlib import Path
from typing import Final

from twisted.logger import Logger

__all__ = ["CgroupTree", "detect", "remove_tree", "tree_path", "wrap_command"]

log = Logger()

#: The shell line that moves itself into the cgroup whose ``cgroup.procs`` is ``$0``,
#: then becomes the command (``$@``).  Exit status 125 if it cannot.
JOIN: Final = (
    'echo 0 >"$0" || { echo "dsml: cannot join the attempt cgroup" >&2; exit 125; }; exec "$@"'
)
#: Rounds of SIGKILL to every member where ``cgroup.kill`` is missing.
KILL_ROUNDS: Final = 50


def wrap_command(sh: str, cgroup: Path, command: list[str]) -> list[str]:
    """``command`` started inside ``cgroup`` (see the module docstring)."""
    return [sh, "-c", JOIN, str(cgroup / "cgroup.procs"), *command]


def _v2_mount(mountinfo: str) -> Path | None:
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            fields = left.split()
            if len(fields) >= 5:
                return Path(fields[4])
    return None


def _own_path(cgroup: str) -> str | None:
    for line in cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


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
    name = "dsml-" + hashlib.sha256(str(Path(work_dir).resolve()).encode()).hexdigest()[:16]
    return mount / own.lstrip("/") / name, ""


def remove_tree(work_dir: Path) -> None:
    """Kill what is left in the attempt cgroups of the worker with ``work_dir`` and
    remove them (a worker stopped with SIGKILL leaves them; its next start would)."""
    root, _ = tree_path(work_dir)
    if root is None or not root.is_dir():
        return
    tree = CgroupTree(root)
    left = tree.sweep()
    for _ in range(KILL_ROUNDS * 20):
        left = [p for p in left if not tree.remove(p)]
        if not left:
            break
    tree.remove(root)


def detect(work_dir: Path, proc: Path = Path("/proc")) -> tuple[CgroupTree | None, str]:
    """The worker's attempt cgroups under its own cgroup, or None and why not."""
    root, why = tree_path(work_dir, proc)
    if root is None:
        return None, why
    base = root.parent
    tree = CgroupTree(root)
    try:
        tree.root.mkdir(exist_ok=True)
        probe = tree.root / "probe"
        probe.mkdir(exist_ok=True)
        probe.rmdir()
    except OSError as e:
        return None, f"cannot create cgroups under {base}: {e.strerror or e}"
    return tree, f"one cgroup per attempt under {tree.root}"


class CgroupTree:
    """The attempt cgroups of one worker, under ``root`` (which exists)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.has_kill = (root / "cgroup.kill").exists()

    def path(self, attempt_id: int) -> Path:
        return self.root / f"a{attempt_id}"

    def make(self, attempt_id: int) -> Path:
        """A fresh, empty cgroup for the attempt (one left by an earlier run with the
        same id is emptied and replaced)."""
        path = self.path(attempt_id)
        try:
            path.mkdir()
        except FileExistsError:
            self.kill(path)
            self.remove(path)
            path.mkdir()
        return path

    def members(self, path: Path) -> list[int]:
        """The pids in ``path`` (none once it is gone)."""
        try:
            text = (path / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(x) for x in text.split()]

    def kill(self, path: Path) -> None:
        """SIGKILL every process in ``path`` (it may take the kernel a moment to empty)."""
        if self.has_kill:
            try:
                (path / "cgroup.kill").write_text("1")
                return
            except OSError:
                pass  # gone, or no cgroup.kill after all: the slow way
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
        """Remove the (empty) cgroup ``path``; False while processes are still in it."""
        try:
            path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    def sweep(self) -> list[Path]:
        """Kill the processes of every attempt cgroup an earlier run left and remove
        those already empty; the ones still emptying are returned (remove them later)."""
        try:
            left = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("a")]
        except OSError:
            return []
        for path in left:
            self.kill(path)
        if left:
            log.warn("killed the processes of {n} attempts an earlier run left", n=len(left))
        return [path for path in left if not self.remove(path)]
