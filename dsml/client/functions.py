"""Python functions run as tasks of the job queue, returning ``concurrent.futures`` futures.

:class:`FunctionRunner` turns calls into jobs (so they are durable, retried on a lost
worker, fenced, and shown by ``dsml jobs``/``status``/``logs``) and resolves their
futures from a background thread of its own, with its own connection (the blocking
client is not thread-safe).  :meth:`ClusterClient.submit
<dsml.client.cluster.ClusterClient.submit>` with a callable, :meth:`ClusterClient.map
<dsml.client.cluster.ClusterClient.map>` and :class:`dsml.Executor` use it.

- **Storage.**  The function is cloudpickled and stored content-addressed at
  ``_dsml/fn/<sha256>``, a top-level argument whose pickle exceeds :data:`LARGE_ARG` at
  ``_dsml/arg/<sha256>`` (the master is asked whether the key exists first: sent twice,
  stored once); both are staged as task inputs, so the worker's input cache fetches
  them once.  A :class:`~dsml.fnrun.Key` argument (anywhere in the arguments) is staged
  as an input too and arrives as the local path of its copy.  Small arguments ride in
  the batch's calls pickle, itself in the task's environment when it is under
  :data:`INLINE_MAX` bytes (no store write at all), else at ``_dsml/calls/<id>/<task>``.
- **Batching.**  A map is one job; its calls are cut into consecutive batches, at most
  :data:`TASKS_PER_CPU` tasks per CPU of the cluster's alive workers (``batch_size``
  sets it), so 2,000 tiny calls cost a few interpreter starts, not 2,000.
- **Results** come back in ``_dsml/result/<id>/<task>`` (the job's id is not known
  before it is submitted: ``<id>`` is the client's own), read once the task succeeded
  and deleted once its job ended.  A remote exception is set on its future with a
  :class:`~dsml.fnrun.RemoteTraceback` as ``__cause__``; a task that failed (killed,
  out of memory, lost more often than it may be retried, a version mismatch) fails
  each of its futures with :class:`FunctionTaskFailed` naming the cause.
- **Cancel.**  The master cancels whole jobs: when every future of a job is cancelled
  its job is cancelled; a cancelled future of a batch still running elsewhere is only
  dropped (its call may run).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import itertools
import os
import pickle
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ..errors import DsmlError
from ..fnrun import CALLS_ENV, Key, RemoteError, RemoteTraceback, mismatch, read_header, runtime
from ..fnrun import versions as local_versions
from ..protocol.replies import Node
from .jobhandle import _failure

if TYPE_CHECKING:
    from .cluster import ClusterClient

#: A calls pickle this small rides in the task's environment (base64), not the store.
INLINE_MAX = 16 * 1024
#: A top-level argument whose pickle is larger is stored apart, content-addressed.
LARGE_ARG = 64 * 1024
#: A map makes at most this many tasks per CPU of the cluster (batches of calls).
TASKS_PER_CPU = 3
#: The interpreter a function task runs unless the options or $DSML_PYTHON (read on the
#: client) name another: the worker's own (``dsml-python``, which the worker replaces
#: with its ``sys.executable``), which imports dsml and cloudpickle as the worker does.
DEFAULT_PYTHON = "dsml-python"
#: The resources a call may ask for.
RESOURCES = ("cpus", "mem", "gpus")
#: The status poll's quickest and slowest pace (seconds): the quickest for
#: :data:`POLL_FAST_FOR` seconds after a submission or a resolved task (a call's
#: latency), then slowing by half each time (a long task costs the master little).
POLL_MIN, POLL_MAX = 0.01, 0.5
POLL_FAST_FOR = 1.0
#: Seconds one ``wait`` on the master lasts at most (the waiter thread's long poll).
WAIT_STEP = 1
#: How long the cluster's CPU count (for batching) is believed.
CPUS_TTL = 30.0


class FunctionVersionMismatch(DsmlError):
    """A call refused at submit: the workers' own interpreter runs another Python or
    cloudpickle than the client (``version-mismatch``)."""


class FunctionTaskFailed(DsmlError):
    """A function call's task failed: killed, out of memory, timed out, lost more often
    than retried, or the interpreter could not run it (a version mismatch).  The message
    names the job, the task and the cause; ``cause`` is the last attempt's."""

    code = "task-failed"

    def __init__(self, message: str, code: str | None = None, cause: str | None = None,
                 job_id: str = "", task: int = -1) -> None:
        super().__init__(message, code)
        self.cause = cause
        self.job_id = job_id
        self.task = task


@dataclasses.dataclass(frozen=True)
class Options:
    """How function calls run: ``resources`` ({"cpus": 2, "mem": "4G", "gpus": 1}, per
    task: a batch shares them), ``name`` (the job's; default ``fn:<qualname>``),
    ``timeout`` (seconds, per task), ``retries`` (more attempts after a lost worker or
    a transfer failure, or a cause in ``retry_on``), ``priority``, ``python`` (the
    worker's interpreter to run), ``env`` (extra variables), ``batch_size`` (calls per
    task of a map; default: see :data:`TASKS_PER_CPU`)."""

    resources: Mapping[str, Any] | None = None
    name: str = ""
    timeout: float | None = None
    retries: int = 2
    retry_on: tuple[str, ...] | None = None
    priority: int = 0
    python: str | None = None
    env: Mapping[str, str] | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        unknown = set(self.resources or ()) - set(RESOURCES)
        if unknown:
            raise TypeError(f"unknown resources {sorted(unknown)}: give {', '.join(RESOURCES)}")

    def merged(self, changes: Mapping[str, Any]) -> Options:
        return dataclasses.replace(self, **changes) if changes else self


class Remote:
    """A function with options for running it on the cluster (what :func:`options`
    returns).  Calling it calls the function here; given to ``submit`` or ``map`` it
    runs with its options, and then no keyword of ``submit`` is reserved."""

    def __init__(self, fn: Callable[..., Any], changes: Mapping[str, Any]) -> None:
        Options().merged(changes)  # checks the names and the resources now
        self.fn = fn
        self.changes = dict(changes)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def options(self, **changes: Any) -> Remote:
        return Remote(self.fn, {**self.changes, **changes})

    def __repr__(self) -> str:
        return f"dsml.options({self.fn!r}, {self.changes!r})"


def options(fn: Callable[..., Any], **changes: Any) -> Remote:
    """``fn`` with options for the cluster (the fields of :class:`Options`):
    ``client.submit(dsml.options(train, resources={"gpus": 1}, timeout=600), lr)``."""
    if isinstance(fn, Remote):
        return fn.options(**changes)
    return Remote(fn, changes)


def unwrap(fn: Callable[..., Any], base: Options) -> tuple[Callable[..., Any], Options]:
    """The plain function and the options it runs with (``base``, then its own)."""
    if isinstance(fn, Remote):
        return fn.fn, base.merged(fn.changes)
    return fn, base


class _Stored:
    """A large argument replaced by the staged path of its stored pickle."""

    def __init__(self, path: str) -> None:
        self.path = path


def _pickler_class() -> type:
    import cloudpickle

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc, name-defined]
        """cloudpickle, with Keys and stored arguments as persistent ids."""

        def __init__(self, out: io.BytesIO, inputs: dict[str, str]) -> None:
            super().__init__(out, protocol=pickle.HIGHEST_PROTOCOL)
            self.inputs = inputs

        def persistent_id(self, obj: Any) -> Any:
            if type(obj) is Key:
                digest = hashlib.sha256(obj.key.encode()).hexdigest()[:16]
                path = f"keys/{digest}/{obj.key.rsplit('/', 1)[-1] or 'key'}"
                self.inputs.setdefault(obj.key, path)
                return ("key", path)
            if type(obj) is _Stored:
                return ("arg", obj.path)
            return None

    return Pickler


def _dumps(value: Any, inputs: dict[str, str]) -> bytes:
    out = io.BytesIO()
    _pickler_class()(out, inputs).dump(value)
    return out.getvalue()


def _header(payload: bytes, **extra: str) -> bytes:
    import json

    from ..fnrun import FORMAT

    return json.dumps({"format": FORMAT, **local_versions(), **extra}).encode() + b"\n" + payload


@dataclasses.dataclass
class _CallTask:
    index: int
    calls: list[tuple[int, Future[Any]]]
    result_key: str
    calls_key: str | None
    done: bool = False
    #: Whether its results came from the master (nothing stored to delete).
    inline: bool = False


@dataclasses.dataclass
class _CallJob:
    id: str
    fn_name: str
    tasks: list[_CallTask]
    #: Results left stored for a later job to read (not read here, not deleted): the
    #: futures resolve to None; ``cleanup``: keys deleted once this job ended (before
    #: its futures resolve).
    keep: bool = False
    cleanup: tuple[str, ...] = ()

    def futures(self) -> Iterable[Future[Any]]:
        return (f for t in self.tasks for _, f in t.calls)


class FunctionRunner:
    """Submits function calls as jobs through ``client`` (from the caller's thread) and
    resolves their futures from one background thread with a connection of its own."""

    def __init__(self, client: ClusterClient, defaults: Options | None = None) -> None:
        self.client = client
        self.defaults = defaults or Options()
        self._stored: set[str] = set()
        self._node_list: tuple[float, list[Node]] | None = None
        self._jobs: dict[str, _CallJob] = {}
        self._cancels: set[str] = set()
        self._cond = threading.Condition()
        self._stop = False
        self._when_idle = False
        self._kick = False
        self._thread: threading.Thread | None = None
        self._waiter: threading.Thread | None = None
        self._waiting: Any = None  # the waiter's connection, to interrupt at close
        self._waited: str | None = None  # the job the waiter waits on now
        self._submit_lock = threading.Lock()

    # -- submitting (the caller's thread) ---------------------------------------------

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Future[Any]:
        """One call as a job of one task."""
        fn, opts = unwrap(fn, self.defaults)
        return self._submit(fn, [(args, kwargs)], opts, batch_size=1)[0]

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            batch_size: int | None = None) -> list[Future[Any]]:
        """One job for every call ``fn(*items)``; a future per call, in order."""
        fn, opts = unwrap(fn, self.defaults)
        calls = [(tuple(items), {}) for items in zip(*iterables, strict=False)]
        if not calls:
            return []
        return self._submit(fn, calls, opts, batch_size or opts.batch_size)

    def _nodes(self) -> list[Node]:
        """The master's workers (remembered for :data:`CPUS_TTL` seconds)."""
        now = time.monotonic()
        if self._node_list is None or now - self._node_list[0] > CPUS_TTL:
            self._node_list = (now, self.client.nodes())
        return self._node_list[1]

    def cluster_cpus(self) -> int:
        """CPUs of the alive workers."""
        nodes = self._nodes()
        return sum(n.slots for n in nodes if n.state == "alive") or sum(
            n.slots for n in nodes) or 1

    def check_runtime(self, fn_name: str) -> None:
        """Refuse at submit a call the workers' own interpreter cannot run: a live
        worker that declares another Python (major.minor) or cloudpickle than this
        client's (the task side would refuse it too, but only once it runs)."""
        mine = runtime()
        other = sorted({n.fn_runtime for n in self._nodes()
                        if n.state == "alive" and n.fn_runtime and n.fn_runtime != mine})
        if not other:
            return
        names = ", ".join(sorted(n.name for n in self._nodes() if n.fn_runtime in other))
        raise FunctionVersionMismatch(
            f"cannot run {fn_name} on the cluster: this client has {mine or 'no cloudpickle'}"
            f", worker(s) {names} run function tasks with {' / '.join(other)}; use a client "
            "with the workers' versions, or name a matching interpreter on the workers "
            "(dsml.options(fn, python=...))", "version-mismatch")

    def _submit(self, fn: Callable[..., Any], calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
                opts: Options, batch_size: int | None, *, after: Iterable[str] = (),
                keep: bool = False, cleanup: Iterable[str] = ()) -> list[Future[Any]]:
        """The calls as one job (after the jobs ``after``); ``keep``: its results stay
        stored for a later job (each future's ``result_key``) and resolve to None;
        ``cleanup``: keys to delete once the job ended (see :mod:`dsml.datasets.reduce`,
        which chains jobs so)."""
        with self._submit_lock:
            return self._submit_locked(fn, calls, opts, batch_size, tuple(after), keep,
                                       tuple(cleanup))

    def _submit_locked(self, fn: Callable[..., Any],
                       calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
                       opts: Options, batch_size: int | None, after: tuple[str, ...] = (),
                       keep: bool = False, cleanup: tuple[str, ...] = ()
                       ) -> list[Future[Any]]:
        import cloudpickle

        if self._stop or self._when_idle:
            raise RuntimeError("cannot submit after shutdown")
        fn_bytes = cloudpickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
        fn_key = f"_dsml/fn/{hashlib.sha256(fn_bytes).hexdigest()}"
        self._ensure(fn_key, fn_bytes)
        if batch_size is None:
            tasks_wanted = min(len(calls), TASKS_PER_CPU * self.cluster_cpus())
            batch_size = -(-len(calls) // max(1, tasks_wanted))
        res = dict(opts.resources or {})
        python = opts.python or os.environ.get("DSML_PYTHON") or DEFAULT_PYTHON
        if python == DEFAULT_PYTHON:
            self.check_runtime(getattr(fn, "__qualname__", type(fn).__name__))
        set_id = uuid.uuid4().hex[:16]
        futures: list[Future[Any]] = []
        tasks, states = [], []
        for t, start in enumerate(range(0, len(calls), batch_size)):
            inputs: dict[str, str] = {fn_key: "fn.pkl"}
            batch = []
            mine: list[tuple[int, Future[Any]]] = []
            for number, (args, kwargs) in enumerate(calls[start:start + batch_size], start):
                batch.append((number, tuple(self._arg(a, inputs) for a in args),
                              {k: self._arg(v, inputs) for k, v in kwargs.items()}))
                f: Future[Any] = Future()
                mine.append((number, f))
                futures.append(f)
            data = _header(_dumps(batch, inputs), fn="fn.pkl")
            env = dict(opts.env or {})
            calls_key = None
            if len(data) <= INLINE_MAX:
                env[CALLS_ENV] = base64.b64encode(data).decode()
                source = "-"
            else:
                calls_key = f"_dsml/calls/{set_id}/{t}"
                self.client.upload(data, calls_key)
                inputs[calls_key] = source = "calls.pkl"
            result_key = f"_dsml/result/{set_id}/{t}"
            tasks.append({
                "command": [python, "-m", "dsml.fnrun", source, "result.pkl"],
                "env": env,
                "inputs": [[k, p] for k, p in inputs.items()],
                "outputs": [["result.pkl", result_key]],
                # Carried back in the worker's report when small (no cluster write),
                # unless a later job reads it from the store (keep).
                **({} if keep else {"result": "result.pkl"}),
                "slots": int(res.get("cpus", 1)),
                "timeout": opts.timeout,
                "max_attempts": opts.retries + 1,
                **({} if opts.retry_on is None else {"retry_on": list(opts.retry_on)}),
                **({"mem": _bytes(res["mem"])} if res.get("mem") else {}),
                **({"gpus": int(res["gpus"])} if res.get("gpus") else {}),
            })
            states.append(_CallTask(t, mine, result_key, calls_key))
        fn_name = getattr(fn, "__qualname__", type(fn).__name__)
        job = self.client.submit_job(tasks=tasks, name=opts.name or f"fn:{fn_name}",
                                     priority=opts.priority, after=after)
        record = _CallJob(job.id, fn_name, states, keep, cleanup)
        with self._cond:
            self._jobs[job.id] = record
            self._kick = True
            self._start()
            self._cond.notify_all()
        for task in states:
            for _, f in task.calls:
                f.job_id, f.task = job.id, task.index  # type: ignore[attr-defined]
                f.result_key = task.result_key  # type: ignore[attr-defined]
                f.add_done_callback(lambda f, j=job.id: self._on_done(f, j))
        return futures

    def _arg(self, value: Any, inputs: dict[str, str]) -> Any:
        """``value``, or a stand-in for its stored pickle when that is large."""
        if type(value) is Key or isinstance(value, (int, float, bool, type(None))) or (
                isinstance(value, (str, bytes)) and len(value) < 1024):
            return value
        data = _dumps(value, inputs)
        if len(data) <= LARGE_ARG:
            return value
        key = f"_dsml/arg/{hashlib.sha256(data).hexdigest()}"
        self._ensure(key, data)  # a bare pickle: the calls file's header covers it
        path = f"args/{key.rsplit('/', 1)[1]}.pkl"
        inputs[key] = path
        return _Stored(path)

    def _ensure(self, key: str, data: bytes) -> None:
        """Store content-addressed ``data`` at ``key`` unless the master has it."""
        if key in self._stored:
            return
        try:
            self.client.locate(key)
        except DsmlError as e:
            if e.code != "not-found":
                raise
            self.client.upload(data, key)
        self._stored.add(key)

    # -- cancelling -------------------------------------------------------------------

    def _on_done(self, f: Future[Any], job_id: str) -> None:
        if f.cancelled():
            with self._cond:
                self._cancels.add(job_id)
                self._cond.notify_all()

    def cancel_all(self) -> None:
        """Cancel every future not yet resolved (their jobs are cancelled)."""
        with self._cond:
            jobs = list(self._jobs.values())
        for job in jobs:
            for f in job.futures():
                f.cancel()

    def pending(self) -> list[Future[Any]]:
        with self._cond:
            return [f for job in self._jobs.values() for f in job.futures() if not f.done()]

    # -- the background thread --------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dsml-functions",
                                            daemon=True)
            self._thread.start()
            self._waiter = threading.Thread(target=self._wait_ends,
                                            name="dsml-functions-wait", daemon=True)
            self._waiter.start()

    def close(self, when_idle: bool = False, join: bool = True) -> None:
        """Stop the thread: at once, or (``when_idle``) once every job it watches ended
        (``join``: wait for that)."""
        with self._cond:
            if when_idle:
                self._when_idle = True
            else:
                self._stop = True
            self._cond.notify_all()
            thread, waiter = self._thread, self._waiter
        if join and thread is not None and thread is not threading.current_thread():
            thread.join(None if when_idle else 10)
        waiting = self._waiting
        if waiting is not None and (self._stop or when_idle and join):
            waiting.master.interrupt()  # its thread ends at once, not after its wait
        if join and waiter is not None and waiter is not threading.current_thread():
            waiter.join(10)

    def _run(self) -> None:
        c = self.client  # (its class, not an import: cluster.py imports this module)
        own = type(c)(c.host, c.port, c.token, c.timeout, c.name + "-futures", c.tls)
        delay, active = POLL_MIN, time.monotonic()
        try:
            while True:
                with self._cond:
                    if self._stop or (self._when_idle and not self._jobs):
                        return
                    if not self._jobs:
                        self._cond.wait()
                        continue
                    jobs = list(self._jobs.values())
                    cancels, self._cancels = self._cancels, set()
                    self._kick = False
                progress = self._cancel(own, cancels)
                for job in jobs:
                    progress |= self._check(own, job)
                now = time.monotonic()
                if progress:
                    active = now
                fast = now - active < POLL_FAST_FOR
                delay = POLL_MIN if fast else min(delay * 1.5, POLL_MAX)
                if len(jobs) == 1 and len(jobs[0].tasks) == 1 and self._waited == jobs[0].id:
                    delay = POLL_MAX  # the waiter wakes this thread when that job ends
                with self._cond:
                    if not (self._kick or self._cancels or self._stop):
                        self._cond.wait(delay)
                    if self._kick:
                        delay, active = POLL_MIN, time.monotonic()
        finally:
            own.close()

    def _wait_ends(self) -> None:
        """The waiter thread: waits on the master (``wait``, :data:`WAIT_STEP` seconds at
        most) for the oldest job watched to end, and wakes the poll at once when it
        has: a call's result is read as soon as the master has it, not at the next
        poll.  Its own connection (a wait blocks it)."""
        c = self.client
        own = self._waiting = type(c)(c.host, c.port, c.token, c.timeout,
                                      c.name + "-wait", c.tls)
        ended: set[str] = set()
        try:
            while True:
                with self._cond:
                    if self._stop or (self._when_idle and not self._jobs):
                        return
                    ended &= self._jobs.keys()
                    job_id = next((j for j in self._jobs if j not in ended), None)
                    if job_id is None:
                        self._cond.wait()
                        continue
                try:
                    self._waited = job_id
                    head, _ = own.master.call("wait", {"Job": job_id, "Timeout": WAIT_STEP})
                    final = head.headers.get("final") == "1"
                except (DsmlError, OSError):
                    final = True  # gone, or the master away: the poll sorts it out
                    self._waited = None
                    with self._cond:
                        self._cond.wait(POLL_MAX)
                if final:
                    ended.add(job_id)
                    self._waited = None
                    with self._cond:
                        self._kick = True
                        self._cond.notify_all()
        finally:
            self._waiting = None
            own.close()

    def _cancel(self, own: ClusterClient, job_ids: set[str]) -> bool:
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is not None and all(f.cancelled() for f in job.futures()):
                try:
                    own.cancel(job_id)
                except DsmlError:
                    pass  # it ended meanwhile, or the master is away: the poll sorts it
        return bool(job_ids)

    def _check(self, own: ClusterClient, job: _CallJob) -> bool:
        """Resolve what ``job``'s status allows; whether anything was."""
        try:
            status = own.job_status(job.id)
        except DsmlError as e:
            if e.code != "not-found":
                return False  # the master restarting: next time
            status = {"state": "failed", "tasks": [
                {"index": t.index, "state": "failed", "reason": "job not found"}
                for t in job.tasks]}
        progress = False
        if job.cleanup and status.get("state") in ("succeeded", "failed", "cancelled"):
            # (before its futures resolve: their caller finds these gone)
            for key in job.cleanup:
                try:
                    own.delete(key)
                except DsmlError:
                    pass  # never written (a failed task) or already gone
            job.cleanup = ()
        for t in status.get("tasks", ()):
            task = job.tasks[t["index"]]
            if task.done:
                continue
            if t["state"] == "succeeded" and job.keep:
                for _, f in task.calls:
                    _settle(f, True, None)  # its results are a later job's to read
                task.done = progress = True
            elif t["state"] == "succeeded":
                progress |= self._deliver(own, job.id, task)
            elif t["state"] in ("failed", "cancelled"):
                attempts = t.get("attempts") or [{}]
                err = (f"{job.fn_name} on the cluster: job {job.id} task {task.index} "
                       f"{t['state']}: {_failure(t)}")
                for _, f in task.calls:
                    _settle(f, False, FunctionTaskFailed(
                        err, cause=attempts[-1].get("cause"), job_id=job.id, task=task.index))
                task.done = progress = True
        if status.get("state") in ("succeeded", "failed", "cancelled") and all(
                t.done for t in job.tasks):
            with self._cond:
                self._jobs.pop(job.id, None)
                self._cond.notify_all()
            done = [k for t in job.tasks for k in (
                None if job.keep or t.inline else t.result_key, t.calls_key)]
            for key in done:
                if key is not None:
                    try:
                        own.delete(key)
                    except DsmlError:
                        pass  # never written (a failed task) or already gone
        return progress

    def _deliver(self, own: ClusterClient, job_id: str, task: _CallTask) -> bool:
        """Read a succeeded task's results (from the master when its worker reported
        them, else from the store) and resolve its futures."""
        import cloudpickle

        try:
            try:
                _, data = own.master.call("result", {"Job": job_id, "Task": task.index})
                task.inline = True
            except DsmlError as e:
                if e.code != "not-found":
                    raise
                data = own.read(task.result_key)  # too big to carry: stored
        except DsmlError:
            return False  # a replica away: next time
        head, payload = read_header(data)
        why = mismatch(head, local_versions())
        if why:
            for _, f in task.calls:
                _settle(f, False, RemoteError(f"cannot read the results: {why}"))
        else:
            parts = pickle.loads(payload)  # in call order, one per call
            pairs = itertools.zip_longest(task.calls, parts, fillvalue=(None, None))
            for (number, f), part in pairs:
                if f is None:
                    continue
                try:
                    got, ok, value, tb = cloudpickle.loads(part)
                    if got != number:
                        raise ValueError(f"result of call {got} where {number} was due")
                except Exception as e:  # noqa: BLE001 - e.g. a module missing here
                    ok, value, tb = False, RemoteError(
                        f"the call's result could not be read here: {e!r}"), None
                _settle(f, ok, value, tb)
        task.done = True
        return True


def _settle(f: Future[Any], ok: bool, value: Any, tb: str | None = None) -> None:
    """Resolve ``f`` once (a cancelled future stays cancelled)."""
    if not f.set_running_or_notify_cancel():
        return
    if ok:
        f.set_result(value)
        return
    if tb:
        value.__cause__ = RemoteTraceback(tb)
    f.set_exception(value)


def _bytes(mem: int | str) -> int:
    if isinstance(mem, str):
        from ..config import parse_size

        return parse_size(mem)
    return int(mem)
