"""The worker's task slots (the seed's TaskManager / WorkerClient): run one attempt of a task.

The master sends an :class:`AttemptSpec`; :meth:`TaskManager.start` reserves its slots and
then, one step after another:

1. makes the attempt directory (the command's working directory, which also holds its two
   log files, :data:`STDOUT_NAME` and :data:`STDERR_NAME`): :mod:`.workdirs`;
2. fetches the declared inputs into it, all at once, through :class:`Transfers`;
3. checks that the command exists (along the task's own ``PATH``) and spawns it in a new
   session, so that it leads its own process group: :mod:`.launch`;
4. streams stdout and stderr into the two log files, each capped with its tail kept
   (:mod:`.watch`, :mod:`.logs`);
5. on a clean exit, uploads the declared outputs through :class:`Transfers`;
6. reports an :class:`AttemptResult` through ``on_result`` and frees the slots; a failed
   attempt's result carries the last lines of its stderr (:func:`stderr_tail`).

Process groups (the buildbot ``runprocess`` idea): the command is started in a new session,
so its pid is also the id of its session and process group.  Everything the command starts
stays in that group (unless it deliberately leaves it with ``setsid``/``setpgid``: the
attempt's cgroup, or without cgroups the subreaper, follows those: :mod:`.isolation`), so
one ``os.killpg`` reaches the whole tree.  A task starts
with SIGPIPE at its default, not ignored as in the worker.

Stopping: a timeout, :meth:`TaskManager.cancel` and :meth:`TaskManager.stop` send SIGTERM to
the group and SIGKILL ``grace`` seconds later if the leader is still alive.  Whenever the
leader ends (by itself or not), SIGKILL goes to its group at once, so a task cannot leave a
background child behind.  If the log pipes stay open after that (held by a process that left
the group), they are closed after :data:`DRAIN_TIMEOUT` seconds so the attempt still ends.
Tasks a worker killed with -9 left running are killed at its next start (:mod:`.groups`).

Failure is said by :attr:`AttemptResult.reason`: the empty string means success; anything
else is a failure, *even with* ``exit_code == 0`` (an output that is missing or could not be
uploaded fails the attempt although the command exited 0).  The master must treat a
non-empty reason as a failed attempt.

The rooms:

- :mod:`.spec`: the spec, the result, the refusals, and the interfaces to the outside;
- :mod:`.manager`: :class:`TaskManager`, the attempts' steps and when to signal a group;
- :mod:`.ledger`: slots held and results unacknowledged (shared with the simulation);
- :mod:`.launch`: starting a process (launchers, environment, where a command is);
- :mod:`.watch`: a running process's pipes, exit and memory;
- :mod:`.groups`: signalling process groups, and the orphans of an earlier run;
- :mod:`.isolation`: what holds an attempt's processes together, asked by the manager:
  prepare, wrap the command, kill, read the usage (peak memory, CPU, out-of-memory),
  release;
- :mod:`.cgroups`: a cgroup per attempt (v2; the memory limit in v2 or, on a hybrid
  layout, in a v1 memory cgroup beside it) and its accounting;
- :mod:`.subreaper`: without cgroups, the worker as a child subreaper that kills and
  reaps what an attempt left, by the mark in its environment;
- :mod:`.taskuser`: the unprivileged user a root worker's tasks run as (the drop after
  the cgroup join, the attempt directory handed over);
- :mod:`.logs`: capped logs and the stderr tail;
- :mod:`.workdirs`: attempt directories, reused, kept and removed.

Every public name is importable from here.  The constants are re-exported to be read; a
test that changes one patches the room that reads it (``tasks.manager.DRAIN_TIMEOUT``).
"""

from __future__ import annotations

from .cgroups import OOM_PREFIX, CgroupTree, Usage
from .groups import ORPHAN_MARK
from .isolation import Isolation
from .launch import (
    BASE_ENV_NAMES,
    TRAMPOLINE,
    WHICH_TTL,
    Launcher,
    default_launcher,
    popen_launcher,
    python_launcher,
    setsid_launcher,
    spawn_launcher,
)
from .ledger import WORKER_PYTHON, AttemptLedger
from .logs import (
    LOG_CAP,
    STDERR_NAME,
    STDERR_TAIL_BYTES,
    STDERR_TAIL_LINES,
    STDOUT_NAME,
    CappedLog,
    stderr_tail,
    tail_text,
)
from .manager import DRAIN_TIMEOUT, MAX_UNACKED, TRACE, TaskManager
from .spec import (
    TIMEOUT_PREFIX,
    AttemptResult,
    AttemptSpec,
    InputVersion,
    TaskError,
    TaskReactor,
    Transfers,
)
from .watch import READ_SIZE, SAMPLE_INTERVAL, GroupUsage, scan_groups
from .workdirs import RUN_DIR

__all__ = [
    "BASE_ENV_NAMES",
    "DRAIN_TIMEOUT",
    "LOG_CAP",
    "MAX_UNACKED",
    "OOM_PREFIX",
    "ORPHAN_MARK",
    "READ_SIZE",
    "RUN_DIR",
    "SAMPLE_INTERVAL",
    "STDERR_NAME",
    "STDERR_TAIL_BYTES",
    "STDERR_TAIL_LINES",
    "STDOUT_NAME",
    "TIMEOUT_PREFIX",
    "TRACE",
    "TRAMPOLINE",
    "WHICH_TTL",
    "WORKER_PYTHON",
    "AttemptLedger",
    "AttemptResult",
    "AttemptSpec",
    "CappedLog",
    "CgroupTree",
    "GroupUsage",
    "InputVersion",
    "Isolation",
    "Launcher",
    "TaskError",
    "TaskManager",
    "TaskReactor",
    "Transfers",
    "Usage",
    "default_launcher",
    "popen_launcher",
    "python_launcher",
    "scan_groups",
    "setsid_launcher",
    "spawn_launcher",
    "stderr_tail",
    "tail_text",
]
