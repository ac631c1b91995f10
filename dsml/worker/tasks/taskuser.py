"""The unprivileged user a root worker's tasks run as (``workers.<name>.task_user``).

A task running as the worker's own user could undo what holds it (issue #13): write its
pid into an ancestor cgroup's ``cgroup.procs`` and outlive its attempt, or rewrite the
store's objects (``data_dir/store``) that later jobs stage as inputs.  Run as another,
unprivileged uid it cannot: the cgroup files are root's, the data dir is root's and
0700, and the inputs lent it from the store are root's and read-only.

Resolved once, at the worker's start (:func:`resolve`, from ``pwd``): its uid and its
primary gid; supplementary groups are cleared.  A worker running as root with no
``task_user`` runs its tasks as ``nobody`` (root never runs a task's code unless told
to: ``task_user: root``); a worker that is not root runs them as itself and may not
name another user.

How an attempt starts (the order matters):

1. its directory is made by the worker, as root (:mod:`.workdirs`), its inputs staged
   into it (the task's own copies, and the directories made for them, are handed to the
   task user; links lent from the store or the input cache stay root's, readable by the
   task user's group and by nobody else, :data:`lent_mode`);
2. the directory itself is handed over (:meth:`TaskUser.hand_over`: ``lchown``, no link
   followed), just before the spawn, so the task may write its outputs;
3. the command starts as root, with that directory as its working directory, joins its
   attempt cgroup(s) (only root may write their ``cgroup.procs``), and only then drops
   to the task user: :meth:`TaskUser.wrap` puts ``setpriv --reuid --regid
   --clear-groups --`` (util-linux; else a Python trampoline doing the same) between
   the join and the command.

The task keeps its working directory across the drop, so it reaches its files by
relative paths (``getcwd`` works); an absolute path through the worker's data dir does
not (the data dir and ``tasks/`` stay 0700 root: not even the names of other attempts'
directories can be reached).  ``HOME``, ``USER`` and ``LOGNAME`` are the task user's.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import sys
from collections.abc import Iterable
from pathlib import Path, PurePath

import attrs

from ...config import Config, ConfigError

#: The user a root worker's tasks run as when the config names none.
DEFAULT_TASK_USER = "nobody"

#: Started with ``python -I -S -c`` where ``setpriv`` is missing: argv is
#: [uid, gid, command...].  ``warnings`` is imported while still root: ``os.execvp``
#: imports it, and the task user may not read the worker's Python library.
DROP = ("import os,sys,warnings;os.setgroups([]);os.setgid(int(sys.argv[2]));"
        "os.setuid(int(sys.argv[1]));os.execvp(sys.argv[3],sys.argv[3:])")


class TaskUserError(Exception):
    """``task_user`` cannot be used (unknown, or the worker is not root): one line."""


@attrs.frozen
class TaskUser:
    """Who tasks run as: ``uid``, primary ``gid``, ``home``; ``setpriv`` if found."""

    name: str
    uid: int
    gid: int
    home: str
    setpriv: str | None = None

    def env(self, path: str | None = None) -> dict[str, str]:
        """What a task's environment says of its user; and ``path`` (the worker's PATH)
        without the directories this user cannot search (a root worker's ``/root/bin``:
        an exec would find nothing there, or, on some kernels, a file it cannot read)."""
        env = {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}
        if path is not None:
            env["PATH"] = os.pathsep.join(
                d for d in path.split(os.pathsep) if self.can_search(d))
        return env

    def can_search(self, directory: str) -> bool:
        """Whether this user may search ``directory`` and those above it (by their mode
        bits: ACLs are not read); a relative one (under the task's own) may be."""
        if not os.path.isabs(directory):
            return True
        for d in [Path(directory), *Path(directory).parents]:
            try:
                st = os.stat(d)
            except OSError:
                return False
            bit = (stat.S_IXUSR if st.st_uid == self.uid
                   else stat.S_IXGRP if st.st_gid == self.gid else stat.S_IXOTH)
            if not st.st_mode & bit:
                return False
        return True

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` started as this user (by root: the caller's exec drops)."""
        if self.setpriv is not None:
            return [self.setpriv, f"--reuid={self.uid}", f"--regid={self.gid}",
                    "--clear-groups", "--", *command]
        return [sys.executable, "-I", "-S", "-c", DROP, str(self.uid), str(self.gid),
                *command]

    def hand_over(self, root: Path, inputs: Iterable[str | PurePath]) -> None:
        """Give the attempt directory ``root`` to this user, with what staging made in
        it for the inputs ``inputs`` (relative paths): the directories on their way and
        the files that are the attempt's own copies (one link).  Files lent by a link
        (to the store, to the input cache) stay root's.  No link is followed.  Raises
        OSError."""
        dirs: set[Path] = set()
        for rel in inputs:
            path = root / rel
            for parent in path.relative_to(root).parents:
                if parent != Path("."):
                    dirs.add(root / parent)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                os.chown(path, self.uid, self.gid, follow_symlinks=False)
        for d in sorted(dirs):
            try:
                os.chown(d, self.uid, self.gid, follow_symlinks=False)
            except FileNotFoundError:
                continue
        os.chown(root, self.uid, self.gid, follow_symlinks=False)


def lent_mode(user: TaskUser | None) -> tuple[int, int | None]:
    """The mode (and group, None: unchanged) of a store or cache file lent to tasks by
    a hard link: 0400, or 0440 to the task user's group (it may read, not write, and
    not chmod: the file stays root's)."""
    return (0o400, None) if user is None else (0o440, user.gid)


def resolve(configured: str | None, euid: int | None = None) -> TaskUser | None:
    """The task user for a worker running as ``euid`` (default: this process's), or
    None when tasks run as the worker itself.  Raises :class:`TaskUserError`."""
    euid = os.geteuid() if euid is None else euid
    if configured is None:
        if euid != 0:
            return None
        configured = DEFAULT_TASK_USER
    try:
        entry = pwd.getpwuid(int(configured)) if configured.isdigit() else pwd.getpwnam(
            configured)
    except (KeyError, ValueError, OverflowError):
        raise TaskUserError(f"no such user: {configured!r}") from None
    if entry.pw_uid == euid:
        return None  # the worker's own user (task_user: root, on a root worker)
    if euid != 0:
        raise TaskUserError(f"{configured!r} (another user than the worker's) needs the "
                            f"worker to run as root (it runs as uid {euid})")
    return TaskUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir or "/",
                    shutil.which("setpriv"))


def for_worker(config: Config, name: str) -> TaskUser | None:
    """The task user of worker ``name`` (:func:`resolve`); ConfigError, one line, if its
    ``task_user`` cannot be used."""
    try:
        return resolve(config.worker(name).task_user)
    except TaskUserError as e:
        raise ConfigError(config.path, f"workers.{name}.task_user", str(e)) from None
