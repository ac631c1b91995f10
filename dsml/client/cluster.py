"""A blocking client of a whole cluster (``ClusterClient``) and its jobs (``Job``).

It asks the master where, and moves the bytes straight to and from the workers with one
:class:`~dsml.client.server.Client` per server: uploads as a pipeline, reads failing over
between replicas.  For users and the ``dsml`` command; the cluster's own nodes use the
async client (:mod:`dsml.net.cluster_client`), never this one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, overload

from ..errors import (
    STORED_SOMEWHERE,
    ChecksumMismatch,
    ConnectionLost,
    DsmlError,
    outcome_unknown,
)
from ..protocol import replies
from ..protocol.replies import (
    RELOCATE_ROUNDS,
    TRY_NEXT,
    Entry,
    ListedKey,
    Located,
    Node,
    Stored,
    job_body,
)
from .jobhandle import Job, JobFailed
from .server import Client, ClientTls, Progress, client_tls, sized_source

if TYPE_CHECKING:
    from .functions import FunctionRunner


class ClusterClient:
    """A blocking client of a whole cluster: asks the master where, moves bytes with workers.

    Uploads go to the placed workers as a pipeline (the first passes the stream on) and
    are recorded with the master before they are acknowledged; reads fail over to the
    next replica when one is down or returns bytes with the wrong checksum (and tell
    the master about the corrupt copy).  Same method names as :class:`Client`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        token: str | None = None,
        timeout: float | None = 60.0,
        name: str = "dsml-python",
        tls: ClientTls | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.timeout = timeout
        self.name = name
        self.tls = tls
        # Over TLS: the master's certificate, not a worker's answering at its address.
        # After a timeout or a dropped connection it reconnects at the next request.
        self.master = Client(
            host, port, token, timeout, name, tls,
            kinds=("master",), what=f"the master {host}:{port}",
        )
        self._workers: dict[str, Client] = {}
        self._functions: FunctionRunner | None = None

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike[str] | None = None,
        *,
        token: str | None = None,
        timeout: float | None = 60.0,
        name: str = "dsml-python",
        identity: str | None = None,
    ) -> ClusterClient:
        """Connect to the master of the cluster a config file describes.

        The file is found as the ``dsml`` command finds it: ``config``, else
        $DSML_CONFIG, else ``etc/dsml.yaml`` in the working directory.  The token is
        ``token``, else $DSML_TOKEN, else the config's.  With ``cluster.tls`` the
        connection presents the user certificate ``identity`` from the config's pki_dir
        (else $DSML_IDENTITY, else ``admin``).
        """
        from ..config import MASTER_ADDR_FILE, find_config, load_config, read_address

        path = find_config(config)
        if path is None:
            raise DsmlError(
                "no cluster config: pass one, set DSML_CONFIG or run where etc/dsml.yaml is",
                "config",
            )
        loaded = load_config(path)
        m = loaded.master
        host, port = read_address("the master", m.host, m.port, m.state_dir / MASTER_ADDR_FILE)
        if token is None:
            token = os.environ.get("DSML_TOKEN") or loaded.cluster.token
        return cls(host, port, token, timeout, name, client_tls(loaded, identity))

    def close(self) -> None:
        """Close every connection (and stop the thread of function calls)."""
        if self._functions is not None:
            self._functions.close()
            self._functions = None
        self.master.close()
        for c in self._workers.values():
            c.close()
        self._workers.clear()

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _worker(self, addr: str) -> Client:
        c = self._workers.get(addr)
        if c is None or c._sock is None:
            host, _, port = addr.rpartition(":")
            c = Client(
                host.strip("[]"), int(port), self.token, self.timeout, self.name, self.tls
            )
            self._workers[addr] = c
        return c

    def _drop_worker(self, addr: str) -> None:
        c = self._workers.pop(addr, None)
        if c is not None:
            c.close()

    # -- where ------------------------------------------------------------------------

    def place(self, key: str, size: int) -> tuple[int, list[tuple[str, str]]]:
        """The master's version for a new write of ``key`` and the workers to write to."""
        _, version, workers = self.placement(key, size)
        return version, workers

    def placement(self, key: str, size: int) -> tuple[str, int, list[tuple[str, str]]]:
        """:meth:`place`, with the master's grant of the version (what the workers store
        the write under, and what ``commit`` records)."""
        head, _ = self.master.call("place", {"Key": key, "Size": size})
        h = head.headers
        return h["grant"], int(h["version"]), replies.workers(h["workers"])

    def locate(self, key: str) -> Located:
        """Where ``key``'s current version lives."""
        head, _ = self.master.call("locate", {"Key": key})
        return replies.located(key, head.headers)

    def _commit(self, key: str, stored: Stored, grant: str, workers: list[tuple[str, str]]) -> None:
        self.master.call(
            "commit",
            {
                "Key": key,
                "Size": stored.size,
                "Sha256": stored.sha256,
                "Grant": grant,
                "Workers": ",".join(name for name, _ in workers),
            },
        )

    # -- writes -----------------------------------------------------------------------

    def upload(
        self,
        source: str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes],
        key: str,
        progress: Progress | None = None,
    ) -> Stored:
        """Upload a file to the placed workers (a pipeline); acknowledged once every one
        has it durably and the master has recorded it.

        ``source``: a path, the bytes themselves, or a binary file object read from its
        position to its end (``io.BytesIO``, an open file, a fsspec file; a stream whose
        size cannot be known is spooled to a temporary file first, never to memory).

        Raises :class:`~dsml.errors.OutcomeUnknown` (``outcome-unknown``) when it failed
        but a worker may have stored it (it may or may not become visible); any other
        error means it will not become visible (docs/protocol.md, section 12)."""
        with sized_source(source) as (f, size):
            grant, _, workers = self.placement(key, size)
            first, rest = workers[0][1], ",".join(addr for _, addr in workers[1:])
            stored = self._write(
                key, first, lambda c: c.upload(f, key, progress, None, grant, rest)
            )
        self._record(key, stored, grant, workers)
        return stored

    def set(self, key: str, value: bytes) -> Stored:
        """Store a small value on the placed workers (failures as for :meth:`upload`)."""
        grant, _, workers = self.placement(key, len(value))
        first, rest = workers[0][1], ",".join(addr for _, addr in workers[1:])
        stored = self._write(key, first, lambda c: c.set(key, value, grant, rest))
        self._record(key, stored, grant, workers)
        return stored

    def _write(self, key: str, first: str, send: Callable[[Client], Stored]) -> Stored:
        """``send`` a write to the first worker of its pipeline; its failures sorted
        (docs/protocol.md, section 12): :class:`OutcomeUnknown` when a worker may have
        stored it, any other error only when none did."""
        client = self._worker(first)  # not reached: nothing was sent
        try:
            return send(client)
        except ChecksumMismatch as e:  # it stored other bytes than were sent
            raise outcome_unknown(key, e) from e
        except ConnectionLost as e:
            self._drop_worker(first)
            if client.sent_whole:
                raise outcome_unknown(
                    key, f"the connection broke before the answer: {e}"
                ) from e
            raise
        except DsmlError as e:
            if e.code in STORED_SOMEWHERE:
                raise outcome_unknown(key, e) from e
            raise

    def _record(self, key: str, stored: Stored, grant: str, workers: list[tuple[str, str]]) -> None:
        """``commit`` a write the workers stored: any failure leaves its outcome open
        (the workers report their copies themselves)."""
        try:
            self._commit(key, stored, grant, workers)
        except DsmlError as e:
            raise outcome_unknown(
                key, f"stored on the workers, but the master's commit failed: {e}"
            ) from e

    def upload_dataset(self, source: str | os.PathLike[str], name: str,
                       chunk: int | str = "64MiB", format: str | None = None) -> dict[str, Any]:
        """Store the file ``source`` as dataset ``name``: chunks of about ``chunk`` bytes
        split on record boundaries (CSV with its header in each, text lines, ``.npy``
        rows; ``format`` from the file name unless given), then its manifest (returned).
        See :mod:`dsml.datasets`."""
        from ..config import parse_size
        from ..datasets import upload_dataset

        return upload_dataset(self, source, name, parse_size(chunk), format)

    def delete(self, key: str) -> int:
        """Delete ``key`` everywhere; returns the version deleted."""
        head, _ = self.master.call("remove", {"Key": key})
        return int(head.headers["version"])

    # -- reads ------------------------------------------------------------------------

    def _each_replica(
        self, key: str, located: Located | None = None
    ) -> Iterator[tuple[str, Client, Located]]:
        """Yield (worker, client, where) for each replica in turn, until the caller stops.

        When every replica was tried, the master is asked again: a newer write may have
        replaced the version it named while this read was under way (a replica then
        answers ``not-found``); the read goes on with the new copies (those whose connection
        failed last: a cut-off worker's timeout once), a few times at most.  Only the
        master says a key is gone: running out is ``unavailable``."""
        if located is None:
            located = self.locate(key)
        last: DsmlError | None = None
        lost: set[str] = set()
        for _round in range(RELOCATE_ROUNDS):
            for name, addr in sorted(located.replicas, key=lambda r: r[1] in lost):
                try:
                    client = self._worker(addr)
                except ConnectionLost as e:
                    last = e
                    lost.add(addr)
                    continue
                yield name, client, located
                if addr not in self._workers:
                    lost.add(addr)
            again = self.locate(key)
            if again.version == located.version:
                break
            located = again
        raise last or DsmlError(f"no replica of {key!r} could be read", "unavailable")

    def get(self, key: str) -> bytes:
        """The value of ``key``, from the first replica that answers with the bytes the
        master's directory names (another is reported corrupt, and the next tried).

        A key that holds a file raises ``wrong-kind`` (files may be large: ``dsml get``
        points at ``dsml cat``): :meth:`read` returns any key's bytes, :meth:`download`
        writes them to a path or a file object."""
        for name, client, located in self._each_replica(key):
            try:
                value = client.get(key)
                if hashlib.sha256(value).hexdigest() != located.sha256:
                    self.master.call("corrupt", {"Key": key, "Worker": name})
                    continue
                return value
            except DsmlError as e:
                if e.code not in TRY_NEXT:
                    raise
                if isinstance(e, ConnectionLost):
                    self._drop_worker(f"{client.host}:{client.port}")
        raise AssertionError("unreachable")  # _each_replica raises when it runs out

    def read(self, key: str) -> bytes:
        """The whole content of ``key``, a file or a value, in memory (checked against
        its sha256, failing over between replicas)."""
        out = io.BytesIO()
        self.download_to(key, out)
        return out.getvalue()

    def download(
        self,
        key: str,
        path: str | os.PathLike[str] | IO[bytes],
        progress: Progress | None = None,
        fsync: bool = True,
    ) -> Entry:
        """Download ``key`` to ``path`` (temp file + rename), failing over between
        replicas; a copy with a bad checksum is reported to the master.

        ``path`` may be a writable binary file object instead: see :meth:`download_to`.
        """
        if not isinstance(path, (str, os.PathLike)):
            return self.download_to(key, path, progress)
        for name, client, _where in self._each_replica(key):
            try:
                return client.download(key, path, progress, fsync)
            except ChecksumMismatch:
                self.master.call("corrupt", {"Key": key, "Worker": name})
            except DsmlError as e:
                if e.code not in TRY_NEXT:
                    raise
                self._drop_worker(f"{client.host}:{client.port}")
        raise AssertionError("unreachable")

    def download_to(self, key: str, out: IO[bytes], progress: Progress | None = None) -> Entry:
        """Stream ``key`` into an open binary file, checking its sha256.

        A replica that fails (gone, or bytes with the wrong checksum: reported to the
        master) is replaced by the next one: in a seekable ``out`` by going back to
        where it started and truncating; in a stream (a pipe, stdout) only while nothing
        was written yet, else the error is raised (the bytes already went out)."""
        start = out.tell() if out.seekable() else None
        counted = _Counted(out)
        for name, client, _where in self._each_replica(key):
            try:
                return client.download_to(key, counted, progress)  # type: ignore[arg-type]
            except DsmlError as e:
                if not isinstance(e, ChecksumMismatch) and e.code not in TRY_NEXT:
                    raise
                if isinstance(e, ChecksumMismatch):
                    self.master.call("corrupt", {"Key": key, "Worker": name})
                elif isinstance(e, ConnectionLost):
                    self._drop_worker(f"{client.host}:{client.port}")
                if counted.written:
                    if start is None:
                        raise  # bytes already went out: another replica cannot mend that
                    out.seek(start)
                    out.truncate()
                    counted.written = 0
        raise AssertionError("unreachable")

    def download_prefix(
        self,
        prefix: str,
        directory: str | os.PathLike[str],
        on_error: Callable[[str, Exception], None] | None = None,
    ) -> dict[str, Path]:
        """Download every key under ``prefix`` into ``directory`` (as ``dsml download
        -r``): ``datasets/`` makes ``directory/a.csv`` of ``datasets/a.csv``,
        ``datasets`` makes ``directory/datasets/a.csv``; returns {key: file written}.

        Each file is written whole and checked (temp file + rename); nothing is written
        outside ``directory`` (a key with ``..`` segments is skipped).  A key that
        cannot be downloaded goes to ``on_error(key, error)`` and the rest go on;
        without ``on_error`` the first error is raised once the others were tried.
        """
        from .tree import download_tree

        return download_tree(self, prefix, directory, on_error)[0]

    def stat(self, key: str) -> Entry:
        """Describe ``key``'s current version, its kind as a replica holding it says.

        The master's directory knows size, checksum and version; a file or a value is
        the storing worker's to say, so the first replica that answers is asked (the
        kind is "unknown" when none does).
        """
        located = self.locate(key)
        kind = "unknown"
        for _name, addr in located.replicas:
            try:
                entry = self._worker(addr).stat(key)
            except DsmlError as e:
                if e.code not in TRY_NEXT:
                    raise
                if isinstance(e, ConnectionLost):
                    self._drop_worker(addr)
                continue
            if entry.version == located.version:
                kind = entry.kind
                break
        return Entry(key, kind, located.size, located.sha256, located.version)

    def list(self, prefix: str = "", page: int = 1000) -> Iterator[ListedKey]:
        """Every key under ``prefix`` with its replicas, from the master's directory."""
        after: str | None = None
        while True:
            head, body = self.master.call("list", replies.list_headers(prefix, page, after))
            for listed in replies.listed_keys(body):
                yield listed
                after = listed.key
            if head.headers.get("more") != "1":
                return

    def nodes(self) -> list[Node]:
        """Every worker the master knows, with its state."""
        return self.nodes_and_lag()[0]

    def nodes_and_lag(self) -> tuple[list[Node], dict[str, float]]:
        """:meth:`nodes`, and the master's reactor-lag figures in milliseconds
        (``worst``, ``recent_worst``, ``last``; empty from a master without the probe)."""
        head, body = self.master.call("nodes", {})
        return replies.nodes(body), replies.lag(head.headers)

    def ping(self) -> dict[str, str]:
        """Round-trip to the master."""
        return self.master.ping()

    # -- jobs -------------------------------------------------------------------------

    @overload
    def submit(self, command: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        ...

    @overload
    def submit(self, command: list[str] | None = None, /, **options: Any) -> Job:
        ...

    def submit(self, command: Any = None, /, *args: Any, **kwargs: Any) -> Any:
        """Submit a job (``command``, a list: see :meth:`submit_job` for the options),
        or run a function: ``submit(fn, *args, **kwargs)`` returns a
        :class:`concurrent.futures.Future` of ``fn(*args, **kwargs)`` run as a task.

        For a function, one keyword is reserved: ``resources`` ({"cpus": 2, "mem": "4G",
        "gpus": 1}); every other option goes through :func:`dsml.options`
        (``submit(dsml.options(fn, timeout=60, retries=1), x)``), and with such a
        wrapped function no keyword is reserved at all (see :mod:`dsml.client.functions`).
        """
        if callable(command):
            fn, kwargs = _with_resources(command, kwargs)
            return self.functions().submit(fn, args, kwargs)
        if args:
            raise TypeError("submit(command, ...): a job's options are keywords")
        return self.submit_job(kwargs.pop("command", command), **kwargs)

    def map(self, fn: Callable[..., Any], *iterables: Any,
            resources: dict[str, Any] | None = None,
            batch_size: int | None = None) -> list[Future[Any]]:
        """Run ``fn`` on each item (of each iterable, zipped) as ONE job; a future per
        call, in order.  Calls are batched into at most a few tasks per CPU of the
        cluster (``batch_size``: calls per task); see :mod:`dsml.client.functions`."""
        kw: dict[str, Any] = {} if resources is None else {"resources": resources}
        fn, _ = _with_resources(fn, kw)
        return self.functions().map(fn, *iterables, batch_size=batch_size)

    def map_chunks(self, fn: Callable[..., Any], dataset: str, *args: Any,
                   resources: dict[str, Any] | None = None,
                   reduce: Callable[[Any, Any], Any] | None = None, fan_in: int = 8) -> Any:
        """``fn(path, *args)`` on each chunk of ``dataset`` where it is stored, a future
        each, or (``reduce``) one, reduced as a tree: :func:`dsml.datasets.map_chunks`."""
        from ..datasets import map_chunks

        return map_chunks(self, fn, dataset, *args, resources=resources, reduce=reduce,
                          fan_in=fan_in)

    def functions(self) -> FunctionRunner:
        """What runs this client's function calls (one background thread, started at
        the first call, stopped by :meth:`close`)."""
        from .functions import FunctionRunner

        if self._functions is None:
            self._functions = FunctionRunner(self)
        return self._functions

    def submit_job(
        self,
        command: list[str] | None = None,
        *,
        name: str = "",
        tasks: list[dict[str, Any]] | None = None,
        array: int = 1,
        slots: int = 1,
        timeout: float | None = None,
        max_attempts: int = 3,
        priority: int = 0,
        after: list[str] | tuple[str, ...] = (),
        inputs: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
        outputs: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
        env: dict[str, str] | None = None,
        retry_on: list[str] | tuple[str, ...] | None = None,
        cpus: int | None = None,
        mem: int | str = 0,
        gpus: int = 0,
    ) -> Job:
        """Submit a job; returns its handle once the master has it durably.

        Either ``command`` (run ``array`` times, each with its index in
        ``DSML_TASK_INDEX``) or ``tasks``: a list of dicts with ``command`` and
        optionally ``env``, ``inputs`` ([key, path]), ``outputs`` ([path, key]),
        ``cpus`` (or ``slots``), ``mem``, ``gpus``, ``timeout``, ``max_attempts``,
        ``retry_on``.  ``retry_on``: the causes of a failed attempt that give it another
        try (default ``lost`` and ``staging``: a worker lost, a transfer failed); add
        ``exit`` for a command that fails now and then.

        Resources, per task: ``cpus`` (``slots`` is the same, its old name; the task's
        thread pools are told: ``OMP_NUM_THREADS`` ...), ``mem`` (bytes, or a size such
        as ``"4G"``: reserved on the worker and the task's memory limit), ``gpus``
        (``CUDA_VISIBLE_DEVICES`` names the ones it gets).
        """
        body = job_body(
            command, name=name, tasks=tasks, array=array, slots=slots,
            timeout=timeout, max_attempts=max_attempts, priority=priority, after=after,
            inputs=inputs, outputs=outputs, env=env, retry_on=retry_on, cpus=cpus,
            mem=mem, gpus=gpus,
        )
        head, _ = self.master.call("submit", {}, body)
        return Job(self, head.headers["job"])

    def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        """Recent jobs, newest first (JSON objects as ``dsml jobs`` shows them); the
        master answers a page at a time (``Next``), this asks for each in turn."""
        out: list[dict[str, Any]] = []
        headers: dict[str, object] = {"Limit": limit}
        while len(out) < limit:
            headers["Limit"] = limit - len(out)
            head, body = self.master.call("jobs", headers)
            page = [json.loads(line) for line in body.decode().splitlines() if line]
            out += page
            nxt = head.headers.get("next")
            if nxt is None or not page or nxt == headers.get("Before"):
                break
            headers["Before"] = nxt
        return out[:limit]

    def job_status(self, job_id: str) -> dict[str, Any]:
        """A job with its tasks and every attempt (the master sends them a page at a
        time: this asks for each page in turn)."""
        head, body = self.master.call("status", {"Job": job_id})
        return self._rest_of(job_id, head.headers, json.loads(body))

    def _rest_of(self, job_id: str, headers: dict[str, str], job: dict[str, Any]) -> dict[str, Any]:
        """``job`` (a first page) with the tasks of every later page appended."""
        tasks = job.setdefault("tasks", [])
        while (start := replies.next_status_page(job_id, headers, tasks)) is not None:
            head, body = self.master.call("status", {"Job": job_id, "From": start})
            headers = head.headers
            tasks.extend(json.loads(body).get("tasks", ()))
        job["next"] = None
        return job

    def cancel(self, job_id: str) -> int:
        """Cancel a job; returns how many running attempts were told to stop."""
        head, _ = self.master.call("cancel", {"Job": job_id})
        return int(head.headers.get("killed", "0"))

    def wait(
        self, job_id: str, timeout: float | None = None, *, all_tasks: bool = True
    ) -> dict[str, Any]:
        """Block until the job ends (or ``timeout`` seconds pass); returns its status
        (with every task; ``all_tasks=False``: only the first page of them, for a
        progress line)."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 60 if deadline is None else max(1, min(60, int(deadline - time.monotonic())))
            head, body = self.master.call("wait", {"Job": job_id, "Timeout": step})
            final = head.headers.get("final") == "1"
            if final or (deadline is not None and time.monotonic() >= deadline):
                job = json.loads(body)
                if not all_tasks:
                    return job  # type: ignore[no-any-return]
                return self._rest_of(job_id, head.headers, job)

    def log_source(
        self, job_id: str, task: int = 0, attempt: int | None = None
    ) -> tuple[int, str, bool]:
        """(attempt id, worker host:port, whether the attempt still runs) of a task's log."""
        headers: dict[str, object] = {"Job": job_id, "Task": task}
        if attempt is not None:
            headers["Attempt"] = attempt
        head, _ = self.master.call("logs", headers)
        h = head.headers
        return int(h["attempt"]), h["worker"].partition("=")[2], h["state"] == "running"

    def read_log(
        self, addr: str, attempt: int, stream: str = "stdout", offset: int = 0
    ) -> tuple[bytes, int, bool]:
        """(bytes from ``offset``, the log's size, still running) from the worker at ``addr``."""
        head, body = self._worker(addr).call(
            "task_log", {"Attempt": attempt, "Stream": stream, "Offset": offset}
        )
        return body, int(head.headers["size"]), head.headers.get("running") == "1"

    def logs(
        self, job_id: str, task: int = 0, attempt: int | None = None, stream: str = "stdout"
    ) -> bytes:
        """A task attempt's stdout or stderr (the last attempt by default), whole."""
        attempt_id, addr, _ = self.log_source(job_id, task, attempt)
        chunks, offset = [], 0
        while True:
            data, size, _ = self.read_log(addr, attempt_id, stream, offset)
            chunks.append(data)
            offset += len(data)
            if not data or offset >= size:
                return b"".join(chunks)


def _with_resources(
    fn: Callable[..., Any], kwargs: dict[str, Any]
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``fn`` with the reserved ``resources`` keyword taken out of ``kwargs`` (unless
    ``fn`` is already a :func:`dsml.options` wrapper: then nothing is reserved)."""
    from .functions import Remote, options

    if isinstance(fn, Remote) or "resources" not in kwargs:
        return fn, kwargs
    return options(fn, resources=kwargs.pop("resources")), kwargs


class _Counted:
    """A binary file's ``write``, counting what went through."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.written = 0

    def write(self, data: bytes) -> int | None:
        self.written += len(data)
        return self.out.write(data)


__all__ = ["ClusterClient", "Job", "JobFailed"]
