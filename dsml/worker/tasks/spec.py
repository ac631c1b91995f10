"""The task slots' contract with the outside: what the master asks (:class:`AttemptSpec`)
and gets back (:class:`AttemptResult`), the refusals (:class:`TaskError`) and the checks
that refuse a spec that can never run, and what the manager needs of the cluster
(:class:`Transfers`) and of the reactor (:class:`TaskReactor`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProcessTransport

from ...errors import DsmlError
from .logs import STDERR_NAME, STDOUT_NAME

#: Every timeout reason starts so: ``"timeout after 2 s"``.
TIMEOUT_PREFIX = "timeout after "


class TaskError(DsmlError):
    """:meth:`TaskManager.start` refused an attempt.

    Codes: ``busy`` (not enough free slots; try later or elsewhere), ``bad-task`` (the spec
    itself is wrong: empty command, a path escaping the attempt directory...), ``duplicate``
    (that attempt id is running or already ran here), ``stopping`` (the worker is shutting
    down), ``not-found`` (from :meth:`TaskManager.logs`: no such attempt here).
    """

    code = "bad-task"


@attrs.frozen
class InputVersion:
    """The version of an input key the cluster has current, as the master said when it
    dispatched the attempt: a copy in this worker's own store at exactly this version
    (and checksum) is the input, and is staged without asking anyone."""

    version: int
    sha256: str


@attrs.frozen
class AttemptSpec:
    """What the master sends for one attempt of a task.

    :param inputs: ``(key, relative path)`` pairs, fetched into the attempt directory before
        the command runs.
    :param outputs: ``(relative path, key)`` pairs, uploaded after the command exits 0.
    :param timeout: seconds from spawn to SIGTERM (then SIGKILL after the grace period);
        ``None`` for no limit.  Staging inputs and uploading outputs do not count.
    :param versions: ``(key, InputVersion)`` pairs: the current version of each input the
        master knew of at dispatch (an input it did not name is staged from the network).
    :param owner: who submitted the job (a user certificate's name, ``"token"`` without
        TLS, ``""`` if the master did not say): only this user and the admins may read
        the attempt's logs.
    :param mem: bytes of memory (RAM; swap may not absorb it) the attempt's processes may
        use together, 0 for no limit.  Enforced where the worker has a memory controller
        (:mod:`~dsml.worker.tasks.cgroups`); exceeding it ends the attempt with a reason
        starting ``out-of-memory``.
    """

    attempt_id: int
    job_id: str
    task_index: int
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    inputs: tuple[tuple[str, str], ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()
    slots: int = 1
    timeout: float | None = None
    versions: tuple[tuple[str, InputVersion], ...] = ()
    owner: str = ""
    #: Memory it may use, in bytes (0: no limit; see ``mem`` above), and how many GPUs
    #: it needs.
    mem: int = 0
    gpus: int = 0
    #: The ids of the GPUs the worker gave it (set when it is admitted).
    gpu_ids: tuple[str, ...] = ()
    #: The path of the output that is its result: reported with the end of the attempt
    #: when at most MAX_INLINE_RESULT bytes, instead of uploaded ("" for none).
    result: str = ""

    def version_of(self, key: str) -> InputVersion | None:
        """The current version of input ``key`` the master named, or None."""
        for k, v in self.versions:
            if k == key:
                return v
        return None


@attrs.frozen
class AttemptResult:
    """How an attempt ended.

    ``reason`` is ``""`` on success and a one-line explanation otherwise: ``"exit 3"``,
    ``"killed by signal 9"``, ``"timeout after 2 s"``, ``"cancelled"``, ``"worker stopping"``,
    ``"command not found: foo"``, ``"input 'k' not found"``, ``"output 'out.txt' missing"``...
    A non-empty reason is a failure even when ``exit_code`` is 0.

    :param exit_code: the command's exit status, ``None`` if it was killed by a signal or
        never ran.
    :param signal: the signal that killed it, or ``None``.
    :param duration: seconds from spawn to the leader's exit (monotonic); 0 if never spawned.
    :param peak_rss: the largest resident memory seen for the process group, in bytes (sampled
        every :data:`~dsml.worker.tasks.watch.SAMPLE_INTERVAL` s; 0 if unknown, e.g. a task
        shorter than one interval), or its cgroup's peak where that is larger (the kernel's
        own figure, every process of the attempt counted; v1 counts page cache too).
    :param cpu_seconds: user + system CPU seconds of all its processes, from its cgroup;
        None where unknown (no cgroup).  Not sent to the master (yet).
    """

    attempt_id: int
    exit_code: int | None
    signal: int | None
    duration: float
    peak_rss: int
    reason: str
    #: A failed attempt's last lines of stderr (:func:`~dsml.worker.tasks.logs.stderr_tail`);
    #: "" on success.
    stderr_tail: str = ""
    cpu_seconds: float | None = None
    #: The result output's content, when small enough to report (b"" otherwise).
    result: bytes = b""

    @property
    def ok(self) -> bool:
        """Whether the attempt succeeded (an empty reason)."""
        return not self.reason

    @property
    def timed_out(self) -> bool:
        """Whether the attempt was stopped at its timeout."""
        return self.reason.startswith(TIMEOUT_PREFIX)


class Transfers(Protocol):
    """How inputs and outputs move between the cluster's store and an attempt directory."""

    def fetch(self, key: str, dest: Path, current: InputVersion | None = None) -> Deferred[None]:
        """Write the stored file ``key`` to ``dest`` (its directory exists).

        ``current`` is the version the cluster holds as current, when the master said
        (a local copy at that version may be used).  Fail with an error whose ``code``
        is ``"not-found"`` (:class:`~dsml.errors.NotFound`, the store's ``NotFound``) if
        there is no such key; cancelling should stop the transfer.
        """
        ...

    def store(self, src: Path, key: str) -> Deferred[None]:
        """Upload the file ``src`` under ``key``."""
        ...

    def release(self, dest: Path) -> object:
        """The attempt that had its input fetched to ``dest`` has ended (whatever its
        result): anything :meth:`fetch` lent it (a link into the store) is checked and
        returned.  Must not raise."""
        ...


class TaskReactor(Protocol):
    """What :class:`TaskManager` needs of a reactor (``IReactorProcess`` + ``IReactorTime``)."""

    def spawnProcess(  # noqa: N802 - Twisted's name
        self,
        processProtocol: Any,  # noqa: N803
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,  # noqa: N803
        childFDs: Mapping[int, int | str] | None = None,  # noqa: N803
    ) -> IProcessTransport:
        """Start a process."""
        ...

    def callLater(  # noqa: N802 - Twisted's name
        self, delay: float, callable: Callable[..., Any], *args: object, **kw: object
    ) -> IDelayedCall:
        """Call ``callable`` in ``delay`` seconds."""
        ...

    def seconds(self) -> float:
        """The reactor's current time."""
        ...

    def addReader(self, reader: Any) -> None:  # noqa: N802 - Twisted's name
        """Watch ``reader.fileno()`` for reading (``IReactorFDSet``; the Popen path only)."""
        ...

    def removeReader(self, reader: Any) -> None:  # noqa: N802 - Twisted's name
        """Stop watching ``reader``."""
        ...


def relative(rel: str, what: str) -> PurePosixPath:
    """``rel`` as a path that stays inside the attempt directory, or TaskError."""
    p = PurePosixPath(rel)
    if (
        not rel
        or "\0" in rel
        or p.is_absolute()
        or ".." in p.parts
        or p == PurePosixPath(".")
        or str(p) in (STDOUT_NAME, STDERR_NAME)
    ):
        raise TaskError(f"{what} path {rel!r} is not a plain relative path", "bad-task")
    return p


def validate(spec: AttemptSpec, total_slots: int) -> None:
    """Refuse a spec that can never run (TaskError ``bad-task``)."""
    if not spec.command or not spec.command[0]:
        raise TaskError("empty command", "bad-task")
    if any("\0" in arg for arg in spec.command):
        raise TaskError("NUL byte in the command", "bad-task")
    if spec.slots < 1 or spec.slots > total_slots:
        raise TaskError(f"needs {spec.slots} slots; this worker has {total_slots}", "bad-task")
    if spec.mem < 0:
        raise TaskError(f"mem must not be negative, not {spec.mem}", "bad-task")
    if spec.timeout is not None and not spec.timeout > 0:
        raise TaskError(f"timeout must be positive, not {spec.timeout}", "bad-task")
    for name, value in spec.env:
        if not name or "=" in name or "\0" in name or "\0" in value:
            # Up to an "=": what follows may be a value, and values may be secrets.
            raise TaskError(f"bad environment variable {name.partition('=')[0]!r}", "bad-task")
    seen: set[PurePosixPath] = set()
    for _, rel in spec.inputs:
        p = relative(rel, "input")
        if p in seen:
            raise TaskError(f"two inputs go to {rel!r}", "bad-task")
        seen.add(p)
    for rel, _ in spec.outputs:
        relative(rel, "output")
