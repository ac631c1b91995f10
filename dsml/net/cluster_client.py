"""The async cluster client: the cluster's operations written once, over Twisted links.

Owns :class:`AsyncClusterClient`, what :class:`dsml.client.ClusterClient` does for a user
(ask the master where, move the bytes straight to and from workers), as Deferreds on a
reactor: the worker stages its tasks' inputs and uploads their outputs with it, and the
simulation's clients are this class over the in-memory network.

- Writes: ``place`` with the master, then the bytes to the first placed worker with
  ``Version`` and ``Forward`` naming the rest (a pipeline), hashed on the way and checked
  against what the worker stored, then ``commit`` to the master.  A file is streamed from
  disk by a pull producer (:meth:`~dsml.net.connection.Connection.request_file`), in flat
  memory whatever its size.  A write that fails where some worker may have stored it
  fails :class:`~dsml.errors.OutcomeUnknown` (``outcome-unknown``); any other error means
  it will never be visible (docs/protocol.md, section 12).
- Reads: ``locate`` with the master, then each replica in turn until one serves the
  bytes whole and matching their checksum; a copy that does not match is reported to
  the master (``corrupt``), and errors a later replica may not have
  (:data:`~dsml.protocol.replies.TRY_NEXT`) move on to it.  A file goes to disk through a
  :class:`~dsml.net.sinks.FileSink` (temporary file, renamed when verified).
- Jobs: ``submit``, ``status``, ``jobs``, ``cancel``, ``wait``, ``logs``.

The master's address is asked of a callable before every request to it (the master may
move: its address file); links come from a :class:`~dsml.net.links.Links` (shared ones for
small requests, one of its own for each file moved).  A peer that cannot be reached is a
:class:`~dsml.errors.ConnectionLost` (code ``connection``) like a link that dropped.
It never imports :mod:`dsml.client`: the blocking client is for users, not daemons.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

from twisted.internet import error
from twisted.internet.defer import Deferred

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
from .calling import Response, ResponseSink
from .connection import Connection
from .links import Links
from .sinks import BytesSink, FileSink

T = TypeVar("T")

#: The master's ``host:port``, asked before every request to it.
MasterAddr = Callable[[], str]

#: Errors of a dial that mean "not reachable now" (a later try may succeed).
_UNREACHABLE = (error.ConnectError, error.ConnectionClosed, error.TimeoutError, OSError)


def _value_matches(value: bytes, where: Located) -> None:
    """ChecksumMismatch unless ``value`` is the bytes the directory names."""
    digest = hashlib.sha256(value).hexdigest()
    if digest != where.sha256:
        raise ChecksumMismatch(f"a replica's value hashes to {digest}, not {where.sha256}")


def _run(coro: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(coro)


class _Sent:
    """Hashes a payload as it goes out and counts its bytes."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self.sent = 0

    def update(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        self.sent += len(chunk)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


async def _stored_or_not(
    key: str, answer: Deferred[Response], sent_whole: Callable[[], bool]
) -> Response:
    """The first worker's answer to a write of ``key``, its failures sorted
    (docs/protocol.md, section 12): :class:`~dsml.errors.OutcomeUnknown` when a worker
    may have stored the write (it said so, or the link broke once the whole write was
    sent), else the error as it came (nothing was stored anywhere)."""
    try:
        return await answer
    except ConnectionLost as e:
        if sent_whole():
            raise outcome_unknown(key, f"the connection broke before the answer: {e}") from e
        raise
    except DsmlError as e:
        if e.code in STORED_SOMEWHERE:
            raise outcome_unknown(key, e) from e
        raise


def _checked(key: str, response: Response, sent: str) -> Stored:
    """What the first worker stored; OutcomeUnknown if it is not the bytes sent (it
    stored something: a copy it will report)."""
    stored = replies.stored(key, response.headers)
    if stored.sha256 != sent:
        raise outcome_unknown(key, ChecksumMismatch(
            f"server stored sha256 {stored.sha256} for {key!r}, sent {sent}"
        ))
    return stored


async def _recorded(key: str, commit: Awaitable[None]) -> None:
    """The master's commit of a write the workers stored: any failure leaves the
    outcome open (the workers report their copies themselves)."""
    try:
        await commit
    except Exception as e:
        raise outcome_unknown(
            key, f"stored on the workers, but the master's commit failed: {e}"
        ) from e


class AsyncClusterClient:
    """A client of the whole cluster on a reactor; every operation returns a Deferred.

    ``master()`` gives the master's ``host:port``; ``links`` opens authenticated links
    (its token and name are this client's); ``clock`` measures :meth:`wait`'s timeout.
    """

    def __init__(self, master: MasterAddr, links: Links, clock: Any) -> None:
        self.master = master
        self.links = links
        self.clock = clock
        #: (key, worker) of every copy this client found corrupt (and reported).
        self.corrupt_found: list[tuple[str, str]] = []

    # -- plumbing ---------------------------------------------------------------------

    async def _link(self, addr: str, own: bool = False) -> Connection:
        """The shared link to ``addr``, or (``own``) a new one for a file's bytes."""
        try:
            return await (self.links.open(addr) if own else self.links.shared(addr))
        except _UNREACHABLE as e:
            raise ConnectionLost(f"cannot reach {addr}: {e}") from None

    def _master_addr(self) -> str:
        try:
            return self.master()
        except (OSError, ValueError) as e:
            raise ConnectionLost(f"the master's address is unknown: {e}") from None

    async def _ask_master(
        self, method: str, headers: dict[str, object], payload: bytes = b""
    ) -> Response:
        link = await self._link(self._master_addr())
        return await link.request(method, headers, payload)

    async def _each_replica(
        self,
        key: str,
        read: Callable[[str], Awaitable[T]],
        check: Callable[[T, Located], None] | None = None,
    ) -> T:
        """``read(addr)`` from each replica of ``key``'s current version in turn, until
        one succeeds (and passes ``check``, which raises ChecksumMismatch for bytes other
        than the directory's); a copy with the wrong checksum is reported to the master.
        After a new ``locate``, replicas that failed otherwise than ``not-found`` (a
        timeout, a lost connection) come last: a worker cut off from this client would
        cost its whole timeout again each round, first in line as it may well be."""
        where = await self._located(key)
        last: DsmlError | None = None
        failed: set[str] = set()
        for _round in range(RELOCATE_ROUNDS):
            moved = False
            for name, addr in sorted(where.replicas, key=lambda r: r[1] in failed):
                try:
                    got = await read(addr)
                    if check is not None:
                        check(got, where)
                    return got
                except ChecksumMismatch as e:
                    self.corrupt_found.append((key, name))
                    await self._ask_master("corrupt", {"Key": key, "Worker": name})
                    moved, last = True, e
                except DsmlError as e:
                    if e.code not in TRY_NEXT:
                        raise
                    moved = moved or e.code == "not-found"
                    if e.code != "not-found":
                        failed.add(addr)
                    last = e
            if not moved:
                break
            # A replica no longer had the version the master named (not-found, other
            # bytes): a newer write may have replaced it while this read was under way.
            # Only the master may say the key is gone: ask it again (its not-found ends
            # the read); the same version again means the copies really are unreadable.
            again = await self._located(key)
            if again.version == where.version:
                break
            where = again
        if last is None or last.code == "not-found":
            raise DsmlError(f"no replica of {key!r} could be read", "unavailable")
        raise last

    # -- where ------------------------------------------------------------------------

    def place(self, key: str, size: int) -> Deferred[tuple[int, list[tuple[str, str]]]]:
        """The master's version for a new write of ``key`` and the workers to write to,
        in pipeline order: [(name, host:port)]."""
        async def run() -> tuple[int, list[tuple[str, str]]]:
            _, version, workers = await self._place(key, size)
            return version, workers

        return _run(run())

    def placement(self, key: str, size: int) -> Deferred[tuple[str, int, list[tuple[str, str]]]]:
        """:meth:`place` with the master's grant first: (grant, version, workers)."""
        return _run(self._place(key, size))

    async def _place(
        self, key: str, size: int, attempt: int | None = None
    ) -> tuple[str, int, list[tuple[str, str]]]:
        """:meth:`place`, with the master's grant of the version (what the workers store
        the write under, and what ``commit`` records); ``attempt``: see :meth:`upload_file`."""
        headers: dict[str, object] = {"Key": key, "Size": size}
        if attempt is not None:
            headers["Attempt"] = attempt
        r = await self._ask_master("place", headers)
        h = r.headers
        return h["grant"], int(h["version"]), replies.workers(h["workers"])

    def locate(self, key: str) -> Deferred[Located]:
        """Where ``key``'s current version lives, best replica first."""
        return _run(self._located(key))

    async def _located(self, key: str) -> Located:
        r = await self._ask_master("locate", {"Key": key})
        return replies.located(key, r.headers)

    # -- writes -----------------------------------------------------------------------

    def upload_file(
        self, key: str, path: str | os.PathLike[str], attempt: int | None = None
    ) -> Deferred[Stored]:
        """Store the file at ``path`` as ``key`` on the placed workers (a pipeline),
        streamed from disk, then record it with the master; fires once both are done.

        ``attempt``: the task attempt whose output this is (a worker storing outputs):
        the master places it only while that attempt runs (``fenced`` otherwise)."""
        return _run(self._upload_path(key, Path(path), attempt))

    def upload(self, key: str, data: bytes) -> Deferred[Stored]:
        """:meth:`upload_file` for bytes in memory."""
        return _run(self._upload(key, io.BytesIO(data), len(data)))

    async def _upload_path(self, key: str, path: Path, attempt: int | None = None) -> Stored:
        with open(path, "rb") as f:
            return await self._upload(key, f, os.fstat(f.fileno()).st_size, attempt)

    async def _upload(
        self, key: str, source: IO[bytes], size: int, attempt: int | None = None
    ) -> Stored:
        """The one upload: place, stream to the pipeline hashing, check, commit."""
        grant, _, workers = await self._place(key, size, attempt)
        headers: dict[str, object] = {"Key": key, "Grant": grant}
        if len(workers) > 1:
            headers["Forward"] = ",".join(addr for _, addr in workers[1:])
        digest = _Sent()
        link = await self._link(workers[0][1], own=True)
        try:
            response = await _stored_or_not(key, link.request_file(
                "file_upload", headers, source, size, on_chunk=digest.update
            ), lambda: digest.sent >= size)
        finally:
            link.transport.loseConnection()  # type: ignore[union-attr]
        stored = _checked(key, response, digest.hexdigest())
        await _recorded(key, self._commit(key, stored, grant, workers))
        return stored

    def set(self, key: str, value: bytes) -> Deferred[Stored]:
        """Store the small value ``value`` under ``key`` on the placed workers."""

        async def run() -> Stored:
            grant, _, workers = await self._place(key, len(value))
            headers: dict[str, object] = {"Key": key, "Grant": grant}
            if len(workers) > 1:
                headers["Forward"] = ",".join(addr for _, addr in workers[1:])
            link = await self._link(workers[0][1])
            sent = link.is_open  # then the request goes out whole at once
            r = await _stored_or_not(
                key, link.request("value_upload", headers, value), lambda: sent
            )
            stored = replies.stored(key, r.headers)
            await _recorded(key, self._commit(key, stored, grant, workers))
            return stored

        return _run(run())

    async def _commit(
        self, key: str, stored: Stored, grant: str, workers: list[tuple[str, str]]
    ) -> None:
        await self._ask_master(
            "commit",
            {
                "Key": key,
                "Size": stored.size,
                "Sha256": stored.sha256,
                "Grant": grant,
                "Workers": ",".join(name for name, _ in workers),
            },
        )

    def remove(self, key: str) -> Deferred[int]:
        """Delete ``key`` everywhere (through the master); the version deleted."""

        async def run() -> int:
            r = await self._ask_master("remove", {"Key": key})
            return int(r.headers["version"])

        return _run(run())

    # -- reads ------------------------------------------------------------------------

    def download_file(
        self, key: str, path: str | os.PathLike[str], fsync: bool = True
    ) -> Deferred[Entry]:
        """Download ``key`` to ``path``: a temporary file beside it, renamed when whole
        and verified, nothing left on any failure; fails over between replicas."""
        target = Path(path)
        return _run(self._read_file(key, lambda: FileSink(target, repr(key), fsync)))

    def download(self, key: str) -> Deferred[bytes]:
        """The bytes of the file ``key`` (in memory: for small files), read as
        :meth:`download_file` reads."""

        sinks: list[BytesSink] = []  # one per replica tried; the last one served

        def make_sink() -> BytesSink:
            sinks.append(BytesSink(repr(key)))
            return sinks[-1]

        async def run() -> bytes:
            await self._read_file(key, make_sink)
            return sinks[-1].value

        return _run(run())

    async def _read_file(self, key: str, make_sink: Callable[[], ResponseSink]) -> Entry:
        """The one file read: each replica in turn, its payload into a new sink."""

        async def read(addr: str) -> Entry:
            link = await self._link(addr, own=True)
            try:
                r = await link.request("file_retrieve", {"Key": key}, sink=make_sink())
            finally:
                link.transport.loseConnection()  # type: ignore[union-attr]
            return replies.entry(key, r.headers)

        return await self._each_replica(key, read)

    def get(self, key: str) -> Deferred[bytes]:
        """The value ``key``, from the first replica that answers."""

        async def read(addr: str) -> bytes:
            link = await self._link(addr)
            return (await link.request("value_retrieve", {"Key": key})).payload

        return _run(self._each_replica(key, read, _value_matches))

    def list(self, prefix: str = "", page: int = 1000) -> Deferred[list[ListedKey]]:
        """Every key under ``prefix`` with its replicas, from the master's directory."""

        async def run() -> list[ListedKey]:
            out: list[ListedKey] = []
            after: str | None = None
            while True:
                r = await self._ask_master("list", replies.list_headers(prefix, page, after))
                listed = replies.listed_keys(r.payload)
                out.extend(listed)
                if listed:
                    after = listed[-1].key
                if r.headers.get("more") != "1":
                    return out

        return _run(run())

    def nodes(self) -> Deferred[list[Node]]:
        """Every worker the master knows, with its state."""

        async def run() -> list[Node]:
            return replies.nodes((await self._ask_master("nodes", {})).payload)

        return _run(run())

    # -- jobs -------------------------------------------------------------------------

    def submit(
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
    ) -> Deferred[str]:
        """Submit a job (the arguments of :meth:`dsml.client.ClusterClient.submit`);
        fires with its id once the master has it durably."""
        body = job_body(
            command, name=name, tasks=tasks, array=array, slots=slots, timeout=timeout,
            max_attempts=max_attempts, priority=priority, after=after, inputs=inputs,
            outputs=outputs, env=env, retry_on=retry_on,
        )

        async def run() -> str:
            return (await self._ask_master("submit", {}, body)).headers["job"]

        return _run(run())

    def jobs(self, limit: int = 100) -> Deferred[list[dict[str, Any]]]:
        """Recent jobs, newest first (without their tasks)."""

        async def run() -> list[dict[str, Any]]:
            return replies.json_lines((await self._ask_master("jobs", {"Limit": limit})).payload)

        return _run(run())

    def status(self, job_id: str) -> Deferred[dict[str, Any]]:
        """A job with its tasks and every attempt (as ``dsml status`` shows it); the
        master sends the tasks a page at a time: this asks for each page in turn."""

        async def run() -> dict[str, Any]:
            r = await self._ask_master("status", {"Job": job_id})
            return await self._rest_of(job_id, r.headers, json.loads(r.payload))

        return _run(run())

    async def _rest_of(
        self, job_id: str, headers: Mapping[str, str], job: dict[str, Any]
    ) -> dict[str, Any]:
        """``job`` (a first page) with the tasks of every later page appended."""
        tasks = job.setdefault("tasks", [])
        while (start := replies.next_status_page(job_id, headers, tasks)) is not None:
            r = await self._ask_master("status", {"Job": job_id, "From": start})
            headers = r.headers
            tasks.extend(json.loads(r.payload).get("tasks", ()))
        job["next"] = None
        return job

    def cancel(self, job_id: str) -> Deferred[int]:
        """Cancel a job; fires with how many running attempts were told to stop."""

        async def run() -> int:
            r = await self._ask_master("cancel", {"Job": job_id})
            return int(r.headers.get("killed", "0"))

        return _run(run())

    def wait(
        self, job_id: str, timeout: float | None = None, step: int = 30
    ) -> Deferred[dict[str, Any]]:
        """Fires with the job's status once it has ended (or ``timeout`` seconds of the
        clock have passed), asking the master ``step`` seconds at a time."""

        async def run() -> dict[str, Any]:
            deadline = None if timeout is None else self.clock.seconds() + timeout
            while True:
                left = step if deadline is None else deadline - self.clock.seconds()
                ask = max(1, min(step, int(left)))
                r = await self._ask_master("wait", {"Job": job_id, "Timeout": ask})
                if r.headers.get("final") == "1" or (
                    deadline is not None and self.clock.seconds() >= deadline
                ):
                    return await self._rest_of(job_id, r.headers, json.loads(r.payload))

        return _run(run())

    def logs(
        self, job_id: str, task: int = 0, attempt: int | None = None, stream: str = "stdout"
    ) -> Deferred[bytes]:
        """An attempt's stdout or stderr (the task's last attempt by default), whole."""

        async def run() -> bytes:
            headers: dict[str, object] = {"Job": job_id, "Task": task}
            if attempt is not None:
                headers["Attempt"] = attempt
            r = await self._ask_master("logs", headers)
            attempt_id, addr = int(r.headers["attempt"]), r.headers["worker"].partition("=")[2]
            link = await self._link(addr)
            chunks, offset = [], 0
            while True:
                got = await link.request(
                    "task_log", {"Attempt": attempt_id, "Stream": stream, "Offset": offset}
                )
                chunks.append(got.payload)
                offset += len(got.payload)
                if not got.payload or offset >= int(got.headers["size"]):
                    return b"".join(chunks)

        return _run(run())

    def close(self) -> None:
        """Close the shared links."""
        self.links.close()


__all__ = ["AsyncClusterClient", "MasterAddr"]
