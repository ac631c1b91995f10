"""What a job is, from the outside: specs, assignments, reports, views, limits, checks.

* A job is a list of tasks (an array job is just many :class:`TaskSpec`, index 0..n-1),
  a priority (higher first) and the jobs it comes ``after``.
* Every offer of a task to a worker is an :class:`Assignment`: a new *attempt*, with an
  id unique for the life of the state file.  A worker reports an attempt's end with a
  :class:`FinishedReport` (or the same fields, one by one).
* :class:`JobView`, :class:`TaskView` and :class:`AttemptView` are what readers see.
* :func:`check_job_spec` refuses, with a :class:`JobError` naming the task and field,
  anything :meth:`~dsml.master.jobs.JobManager.submit` must not store; the limits are
  named constants here.  :func:`spec_json` is a task spec's stored form.
* A worker's text (a reason, a stderr tail) is made storable before it is kept
  (:func:`storable`, :func:`clean_tail`).

Plain values only: nothing here knows of SQLite, the queue or the clock.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Any, Final

import attrs

from ...errors import DsmlError
from ...protocol import limits
from ...protocol.methods import HeaderValueError, check_key

__all__ = [  # noqa: RUF022 - grouped: limits, classes, functions
    "CAUSES", "DEFAULT_RETRY_ON", "MAX_AFTER", "MAX_ATTEMPTS", "MAX_NAME",
    "MAX_PRIORITY", "MAX_REASON", "MAX_GPUS", "MAX_MEM", "MAX_SLOTS",
    "MAX_INLINE_RESULT", "MAX_STDERR_TAIL", "MAX_TASKS", "MAX_TIMEOUT", "Assignment",
    "AttemptView", "FinishedReport", "JobError", "JobSpec", "JobView", "QueuePlace",
    "Room", "TaskSpec", "TaskView", "attempt_cause", "check_job_head", "check_io",
    "check_job_spec", "check_task", "clean_tail", "expand_task", "holds_nothing",
    "parse_job_id", "spec_from_json", "spec_json", "storable",
]

# -- limits ------------------------------------------------------------------------------

#: Most tasks in one job.
MAX_TASKS: Final = 100_000
#: Most slots one task may ask for (the most a worker may declare).
MAX_SLOTS: Final = limits.MAX_SLOTS
#: Most GPUs one task may ask for (the most a worker may declare).
MAX_GPUS: Final = limits.MAX_GPUS
#: Most memory one task may ask for, in bytes.
MAX_MEM: Final = limits.MAX_MEM
#: Longest task timeout, in seconds (30 days).
MAX_TIMEOUT: Final = 30 * 24 * 3600.0
#: Most attempts a task may be given.
MAX_ATTEMPTS: Final = 100
#: Priorities run from -MAX_PRIORITY to MAX_PRIORITY; higher runs first.
MAX_PRIORITY: Final = 1000
#: Most jobs one job may come after.
MAX_AFTER: Final = 1000
#: Longest job name, in characters.
MAX_NAME: Final = 1024
#: Longest reason kept for an attempt, in characters (a worker's text, the tail dropped).
MAX_REASON: Final = 1024
#: Longest stderr tail kept for a failed attempt, in characters (its last ones).  The
#: worker sends at most 2,048 bytes; this holds whatever a worker sends to the same.
MAX_STDERR_TAIL: Final = 2048
#: Largest task result carried in the worker's report and kept in the master's state
#: (a task's ``result`` output; a bigger one is stored under its key as outputs are).
MAX_INLINE_RESULT: Final = limits.MAX_INLINE_RESULT

# -- why an attempt ended ---------------------------------------------------------------

#: The cause of an attempt's end: its command's exit status, a signal, its timeout, its
#: memory limit, its worker lost (died, cut off), an input or its directory not set up
#: on the worker (or an output not uploaded: a transfer), its command not started, a
#: declared output missing or not a file of its own, or a cancel.
CAUSES: Final = ("exit", "signal", "timeout", "out-of-memory", "lost", "staging", "spawn",
                 "output", "cancelled")
#: The causes a retry is made for by default: those a retry can mend (another worker,
#: another try of a transfer).  A task's ``retry_on`` names others (a flaky command:
#: "exit"); a Python exception, a missing command or output is not retried unless asked.
DEFAULT_RETRY_ON: Final = ("lost", "staging")


def attempt_cause(
    state: str, reason: str, exit_code: int | None, signal: int | None
) -> str | None:
    """The cause (one of :data:`CAUSES`) of an attempt that ended in ``state`` with
    ``reason`` (the worker's text), or None if it is running or succeeded."""
    if state in ("running", "succeeded"):
        return None
    if state in ("lost", "timeout", "cancelled"):
        return state
    if reason.startswith("lost: "):  # its process's end not known (its worker's zygote died)
        return "lost"
    if reason.startswith(("input ", "workspace")):
        return "staging"  # an input, or the attempt's directory: this worker's to set up
    if reason.startswith("output "):
        return "staging" if " upload failed" in reason else "output"
    if reason.startswith(("command not found", "spawn failed")):
        return "spawn"
    if reason.startswith("out-of-memory"):
        return "out-of-memory"
    if signal is not None:
        return "signal"
    return "exit"


_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_JOB_ID: Final = re.compile(r"j([1-9][0-9]{0,17})\Z")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Control characters a stderr tail may not carry (newline and tab it may).
_TAIL_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# -- specs -------------------------------------------------------------------------------


def _tuple(value: Any) -> Any:
    """Turn a list (from JSON) into a tuple; leave anything else for validation."""
    return tuple(value) if isinstance(value, list) else value


def _pairs(value: Any) -> Any:
    """Turn a list of lists (from JSON) into a tuple of tuples; leave anything else."""
    if isinstance(value, (list, tuple)):
        return tuple(tuple(p) if isinstance(p, list) else p for p in value)
    return value


@attrs.frozen
class TaskSpec:
    """One command to run: what to stage in, what to collect, how much room it needs.

    Paths are relative to the task's working directory; keys are dsml keys.
    """

    #: The program and its arguments (no shell).
    command: tuple[str, ...] = attrs.field(converter=_tuple)
    #: Extra environment variables, (name, value).
    env: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    #: Keys to fetch before the run, (key, path).
    inputs: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    #: Files to upload after a successful run, (path, key).
    outputs: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    #: CPUs the task occupies (its worker's "slots"; ``--cpus``, ``--slots`` the same).
    slots: int = 1
    #: Wall-clock limit in seconds (enforced by the worker), or None.
    timeout: float | None = None
    #: Attempts before the task fails; every failure, timeout and lost worker counts.
    max_attempts: int = 3
    #: The causes (:data:`CAUSES`) of a failed attempt that give the task another, while
    #: it has attempts left; any other fails it at once.
    retry_on: tuple[str, ...] = attrs.field(default=DEFAULT_RETRY_ON, converter=_tuple)
    #: Memory the task reserves, in bytes, and its limit on the worker (0: none asked,
    #: none reserved, no limit).
    mem: int = 0
    #: GPUs the task occupies (the worker names them in ``CUDA_VISIBLE_DEVICES``).
    gpus: int = 0
    #: The path of one of ``outputs`` that is the task's result: when it is at most
    #: :data:`MAX_INLINE_RESULT` bytes the worker reports it with the attempt's end, the
    #: master keeps it with the success (one commit, no cluster write) and ``result``
    #: answers it; a bigger one is uploaded under its key.  "" for none.
    result: str = ""

    @property
    def room(self) -> Room:
        """What it needs of a worker."""
        return Room(self.slots, self.mem, self.gpus)


@attrs.frozen
class Room:
    """Resources: what a task needs, what a worker has, or has free.

    ``mem`` is in bytes; a task that asks for none (0) fits whatever memory is free.
    """

    cpus: int
    mem: int = 0
    gpus: int = 0

    def holds(self, need: Room) -> bool:
        """Whether ``need`` fits in this room."""
        return need.cpus <= self.cpus and need.mem <= self.mem and need.gpus <= self.gpus

    def __sub__(self, other: Room) -> Room:
        return Room(self.cpus - other.cpus, self.mem - other.mem, self.gpus - other.gpus)

    def __add__(self, other: Room) -> Room:
        return Room(self.cpus + other.cpus, self.mem + other.mem, self.gpus + other.gpus)

    def describe(self) -> str:
        """"2 CPUs, 4.0 GiB, 1 GPU" (memory and GPUs only when there are some)."""
        parts = [f"{self.cpus} CPU{'' if self.cpus == 1 else 's'}"]
        if self.mem:
            parts.append(format_bytes(self.mem))
        if self.gpus:
            parts.append(f"{self.gpus} GPU{'' if self.gpus == 1 else 's'}")
        return ", ".join(parts)


def format_bytes(n: int) -> str:
    """``n`` bytes for a person: "512 MiB", "4.0 GiB"."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value >= 100 or unit == "KiB" else f"{value:.1f} {unit}"
    return f"{n} B"


@attrs.frozen
class JobSpec:
    """A job: tasks, a priority (higher first), and the jobs it must wait for.

    With ``array`` (> 0) the job is compact: ``tasks`` holds ONE template and the job has
    ``array`` tasks, task ``i`` being the template with ``{index}`` in its input and
    output keys and paths replaced by ``i`` (:func:`expand_task`), so a 100,000-task
    array costs one template on the wire and in the check of the request.
    """

    name: str
    tasks: tuple[TaskSpec, ...] = attrs.field(converter=_tuple)
    priority: int = 0
    #: Job ids that must all succeed before this job's tasks are queued.
    after: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    #: 0: ``tasks`` are the tasks; N > 0: ``tasks`` is one template for N tasks.
    array: int = 0

    @property
    def count(self) -> int:
        """How many tasks the job has."""
        return self.array if self.array else len(self.tasks)

    def task(self, index: int) -> TaskSpec:
        """Task ``index`` of the job (expanded from the template for an array)."""
        if self.array:
            return expand_task(self.tasks[0], index)
        return self.tasks[index]


def _fill(text: str, index: str) -> str:
    return text.replace("{index}", index)


def expand_task(template: TaskSpec, index: int) -> TaskSpec:
    """Task ``index`` of an array: ``{index}`` in input and output keys and paths
    replaced by the index (the task's command and environment are the template's; the
    worker gives each task its index in ``DSML_TASK_INDEX``)."""
    if not isinstance(template, TaskSpec) or not (template.inputs or template.outputs):
        return template  # (not a task spec: check_task says so)
    i = str(index)
    t = template
    try:
        # evolve, not a new TaskSpec of chosen fields: one made so dropped ``retry_on``.
        return attrs.evolve(
            t,
            inputs=tuple((_fill(k, i), _fill(p, i)) for k, p in t.inputs),
            outputs=tuple((_fill(p, i), _fill(k, i)) for p, k in t.outputs),
        )
    except (TypeError, ValueError, AttributeError):
        raise _bad(f"task {index}: inputs and outputs must be lists of pairs of text") from None


@attrs.frozen
class Assignment:
    """A task given to a worker: run ``spec`` as attempt ``attempt_id``."""

    attempt_id: int
    job_id: str
    task_index: int
    spec: TaskSpec
    #: Which attempt of the task this is, from 1 (for log names and messages).
    number: int = 1
    #: Who submitted the job (see :attr:`JobView.owner`): the worker lets only this
    #: user and the admins read the attempt's logs.
    owner: str = ""


@attrs.frozen
class FinishedReport:
    """A worker's report of an attempt that ended (see :meth:`JobManager.reconcile`)."""

    attempt_id: int
    exit_code: int | None
    signal: int | None
    duration: float
    peak_rss: int
    reason: str = ""
    #: The last lines of a failed attempt's stderr ("" for none).
    stderr_tail: str = ""
    #: A succeeded attempt's result (its task's ``result`` output, at most
    #: :data:`MAX_INLINE_RESULT` bytes), b"" for none.
    result: bytes = b""


# -- views -------------------------------------------------------------------------------


@attrs.frozen
class AttemptView:
    """What is known of one attempt."""

    id: int
    worker: str
    incarnation: int
    state: str
    started: float
    ended: float | None
    exit_code: int | None
    signal: int | None
    duration: float | None
    peak_rss: int | None
    reason: str
    #: The last lines of its stderr if it failed (at most :data:`MAX_STDERR_TAIL`
    #: characters, no control characters but newline and tab), else "".
    stderr_tail: str = ""
    #: Started on a worker holding every input of its task (None: it has none).
    local: bool | None = None

    @property
    def cause(self) -> str | None:
        """Why it ended (:func:`attempt_cause`), None while running or if it succeeded."""
        return attempt_cause(self.state, self.reason, self.exit_code, self.signal)


@attrs.frozen
class TaskView:
    """One task of a job, with its attempts, oldest first."""

    index: int
    state: str
    reason: str
    attempts: tuple[AttemptView, ...]
    #: For a ``waiting`` task, the jobs it waits for ("job j3 to succeed"); else "".
    #: (Why a ``queued`` task waits depends on the workers: the router says that.)
    waiting_for: str = ""
    #: The keys its spec declares as outputs (stored by it once it succeeds).
    outputs: tuple[str, ...] = ()


@attrs.frozen
class QueuePlace:
    """Where a queued task stands (see :meth:`JobManager.queue_places`)."""

    #: The slots (CPUs) it needs.
    slots: int
    #: Queued tasks before it in the queue order; None when counting them is not cheap.
    ahead: int | None
    #: The memory (bytes) and GPUs it needs.
    mem: int = 0
    gpus: int = 0


@attrs.frozen
class JobView:
    """A job as the manager knows it now.

    ``counts`` has every task state as a key.  ``tasks`` is empty when the view was asked
    for without them (:meth:`JobManager.jobs`).
    """

    id: str
    name: str
    state: str
    priority: int
    after: tuple[str, ...]
    created: float
    started: float | None
    finished: float | None
    reason: str
    counts: dict[str, int]
    done: int
    total: int
    tasks: tuple[TaskView, ...] = ()
    #: The index of the first task of the next page when ``tasks`` is one page of them
    #: and more follow (:meth:`JobManager.job` with ``first``/``limit``), else None.
    next: int | None = None
    #: Who submitted it: the user certificate's name, ``"token"`` without TLS
    #: (:data:`dsml.net.access.TOKEN_OWNER`), ``""`` for a job stored before owners
    #: were recorded (schema 2).
    owner: str = ""
    #: Attempts started on a worker holding every input of their task, and elsewhere.
    local: int = 0
    remote: int = 0


class JobError(DsmlError):
    """A job request that cannot be carried out: ``bad-job`` or ``not-found``."""

    code = "bad-job"


def holds_nothing(key: str) -> bool:
    """The default locality oracle: the worker holds no inputs (locality is skipped)."""
    return False


def parse_job_id(job_id: object) -> int | None:
    """The sequence number of a job id like ``j17``, or None if it is not one."""
    if not isinstance(job_id, str):
        return None
    m = _JOB_ID.match(job_id)
    return int(m.group(1)) if m else None


# -- a worker's text ---------------------------------------------------------------------


def storable(text: str) -> str:
    """``text`` with what SQLite cannot store as UTF-8 (lone surrogates, which JSON's
    ``\\ud800`` escapes make) replaced by "?".  A worker's text that could not be
    stored would fail every later group commit with it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def clean_tail(text: object) -> str:
    """A worker's stderr tail as kept: its last :data:`MAX_STDERR_TAIL` characters,
    control characters but newline and tab replaced by U+FFFD ("" if not text)."""
    if not isinstance(text, str) or not text:
        return ""
    return _TAIL_CONTROL.sub("\ufffd", storable(text[-MAX_STDERR_TAIL:]))


# -- spec encoding -----------------------------------------------------------------------


def output_keys(spec: str) -> tuple[str, ...]:
    """The output keys of a stored task spec (:func:`spec_json`'s form)."""
    if '"outputs"' not in spec:  # most tasks declare none: no JSON parse
        return ()
    return tuple(str(key) for _, key in json.loads(spec).get("outputs", ()))


def spec_json(spec: TaskSpec) -> str:
    """The stored form of a task spec (defaults left out)."""
    d: dict[str, object] = {"command": spec.command}
    if spec.env:
        d["env"] = spec.env
    if spec.inputs:
        d["inputs"] = spec.inputs
    if spec.outputs:
        d["outputs"] = spec.outputs
    if spec.slots != 1:
        d["slots"] = spec.slots
    if spec.timeout is not None:
        d["timeout"] = spec.timeout
    if spec.max_attempts != 3:
        d["max_attempts"] = spec.max_attempts
    if spec.retry_on != DEFAULT_RETRY_ON:
        d["retry_on"] = spec.retry_on
    if spec.mem:
        d["mem"] = spec.mem
    if spec.gpus:
        d["gpus"] = spec.gpus
    if spec.result:
        d["result"] = spec.result
    return json.dumps(d, separators=(",", ":"))


def spec_from_json(text: str) -> TaskSpec:
    """A task spec from its stored form."""
    return TaskSpec(**json.loads(text))


# -- validation --------------------------------------------------------------------------


def check_job_spec(spec: object) -> None:
    """Raise a ``bad-job`` JobError for anything in ``spec`` a submit must refuse.

    Whether the jobs it comes ``after`` exist is the manager's to check, after this.
    It checks every task: a big job's are checked in slices instead
    (:func:`check_job_head`, then :func:`check_task` for each).
    """
    check_job_head(spec)
    assert isinstance(spec, JobSpec)
    for i in range(spec.count):
        check_task(i, spec.task(i))


def check_job_head(spec: object) -> None:
    """Check all of ``spec`` but its tasks after the first and the last (see
    :func:`check_job_spec`): the job's fields, its task count, and for an array the
    template expanded at both ends."""
    if not isinstance(spec, JobSpec):
        raise _bad("not a job spec")
    name = spec.name
    if not isinstance(name, str) or len(name) > MAX_NAME or _CONTROL.search(name):
        raise _bad(f"job name must be text of at most {MAX_NAME} characters, no controls")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("job name is not valid UTF-8") from None
    if not _is_int(spec.priority) or not -MAX_PRIORITY <= spec.priority <= MAX_PRIORITY:
        raise _bad(
            f"priority must be an integer from {-MAX_PRIORITY} to {MAX_PRIORITY},"
            f" not {spec.priority!r}"
        )
    tasks = spec.tasks
    if not isinstance(tasks, tuple) or not tasks:
        raise _bad("a job needs at least one task")
    if not _is_int(spec.array) or not 0 <= spec.array <= MAX_TASKS:
        raise _bad(f"array must be an integer from 1 to {MAX_TASKS}, not {spec.array!r}")
    if spec.array and len(tasks) != 1:
        raise _bad("an array job has exactly one task template")
    if len(tasks) > MAX_TASKS:
        raise _bad(f"a job has at most {MAX_TASKS} tasks, not {len(tasks)}")
    if not isinstance(spec.after, tuple) or len(spec.after) > MAX_AFTER:
        raise _bad(f"after must be a list of at most {MAX_AFTER} job ids")
    check_task(0, spec.task(0))
    last = spec.count - 1
    if last:
        check_task(last, spec.task(last))


def _bad(message: str) -> JobError:
    return JobError(message, "bad-job")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text(value: object, what: str) -> str:
    """A string with no NUL (no exec argument or environment entry can hold one)."""
    if not isinstance(value, str):
        raise _bad(f"{what} must be a string")
    if "\x00" in value:
        raise _bad(f"{what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{what} is not valid UTF-8") from None
    return value


def _check_path(value: object, what: str) -> None:
    """A relative path inside the task's working directory."""
    path = _check_text(value, what)
    if not path:
        raise _bad(f"{what} is empty")
    pure = PurePosixPath(path)
    if pure.is_absolute():
        raise _bad(f"{what} {path!r} is absolute; paths are relative to the task's directory")
    if ".." in pure.parts:
        raise _bad(f"{what} {path!r} contains '..'")
    if not pure.parts or pure.parts == (".",):
        raise _bad(f"{what} {path!r} names the task's directory itself")


def _check_job_key(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise _bad(f"{what} must be a string")
    try:
        check_key(value)
    except HeaderValueError as e:
        raise _bad(f"{what} {value[:80]!r}: {e.message}") from None


def _check_pairs(value: object, what: str) -> tuple[tuple[object, object], ...]:
    if not isinstance(value, tuple):
        raise _bad(f"{what} must be a list of pairs")
    for p in value:
        if not isinstance(p, tuple) or len(p) != 2:
            raise _bad(f"{what} must be a list of pairs")
    return value


def check_io(i: int, t: TaskSpec) -> None:
    """Check only the inputs and outputs of task ``i`` (an array's task: the rest is
    its template's, checked once by :func:`check_job_head`)."""
    w = f"task {i}:"
    for key, path in _check_pairs(t.inputs, f"{w} inputs"):
        _check_job_key(key, f"{w} input key")
        _check_path(path, f"{w} input path")
    for path, key in _check_pairs(t.outputs, f"{w} outputs"):
        _check_path(path, f"{w} output path")
        _check_job_key(key, f"{w} output key")


def check_task(i: int, t: object) -> None:
    """Raise a ``bad-job`` JobError naming task ``i`` and what is wrong with it."""
    w = f"task {i}:"
    if not isinstance(t, TaskSpec):
        raise _bad(f"{w} not a task spec")
    if not isinstance(t.command, tuple) or not t.command:
        raise _bad(f"{w} command is empty")
    for arg in t.command:
        _check_text(arg, f"{w} command argument")
    if not t.command[0]:
        raise _bad(f"{w} the program name is empty")
    seen: set[object] = set()
    for name, value in _check_pairs(t.env, f"{w} env"):
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            # Up to an "=": what follows may be a value, and values may be secrets.
            shown = repr(name)
            if isinstance(name, str) and "=" in name:
                shown = f"{name.partition('=')[0]!r}..."
            raise _bad(f"{w} environment name {shown} is not [A-Za-z_][A-Za-z0-9_]*")
        if name in seen:
            raise _bad(f"{w} environment name {name!r} given twice")
        seen.add(name)
        _check_text(value, f"{w} environment value of {name}")
    for key, path in _check_pairs(t.inputs, f"{w} inputs"):
        _check_job_key(key, f"{w} input key")
        _check_path(path, f"{w} input path")
    for path, key in _check_pairs(t.outputs, f"{w} outputs"):
        _check_path(path, f"{w} output path")
        _check_job_key(key, f"{w} output key")
    if t.result and t.result not in {p for p, _ in t.outputs}:
        raise _bad(f"{w} result must be the path of one of its outputs, not {t.result!r}")
    if not _is_int(t.slots) or not 1 <= t.slots <= MAX_SLOTS:
        raise _bad(f"{w} slots must be an integer from 1 to {MAX_SLOTS}, not {t.slots!r}")
    if not _is_int(t.mem) or not 0 <= t.mem <= MAX_MEM:
        raise _bad(f"{w} mem must be a number of bytes from 0 to {MAX_MEM}, not {t.mem!r}")
    if not _is_int(t.gpus) or not 0 <= t.gpus <= MAX_GPUS:
        raise _bad(f"{w} gpus must be an integer from 0 to {MAX_GPUS}, not {t.gpus!r}")
    if t.timeout is not None:
        ok = isinstance(t.timeout, (int, float)) and not isinstance(t.timeout, bool)
        if not ok or not 0 < t.timeout <= MAX_TIMEOUT:  # also refuses NaN
            raise _bad(
                f"{w} timeout must be more than 0 and at most {MAX_TIMEOUT:.0f} seconds,"
                f" not {t.timeout!r}"
            )
    if not _is_int(t.max_attempts) or not 1 <= t.max_attempts <= MAX_ATTEMPTS:
        raise _bad(
            f"{w} max_attempts must be an integer from 1 to {MAX_ATTEMPTS}, not {t.max_attempts!r}"
        )
    retryable = CAUSES[:-1]  # a cancel is never retried
    if not isinstance(t.retry_on, tuple) or not all(
        isinstance(c, str) and c in retryable for c in t.retry_on
    ):
        raise _bad(f"{w} retry_on must be a list of causes among {', '.join(retryable)},"
                   f" not {str(t.retry_on)[:200]}")
