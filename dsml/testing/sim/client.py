"""An asynchronous client of a simulated cluster, over the simulation's links.

Owns :class:`SimClient`: what :class:`dsml.client.ClusterClient` does (place, pipeline
upload, commit, read with failover, jobs), as Deferreds over :class:`dsml.net.links.Links`.
Self-contained on purpose: it needs only an ``endpoint_for``, the master's address and a
clock, so it can be replaced by the project's async cluster client without touching the
rest of the simulation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred

from ...client import ListedKey, Located, Node, Stored, job_body
from ...errors import ChecksumMismatch, DsmlError
from ...net.links import EndpointFor, Links
from ...net.server import Response, ServerProtocol

#: Bytes per write of a simulated client's upload (the blocking client's CHUNK).
UPLOAD_CHUNK = 1024 * 1024

#: Error codes of one replica that make a reader try the next (as the blocking client).
TRY_NEXT = ("connection", "not-found", "checksum-mismatch", "internal", "busy", "timeout")


class SimClient:
    """An asynchronous client of the cluster: what :class:`dsml.client.ClusterClient`
    does, over Twisted links.

    Every method returns a Deferred (run it with :meth:`SimCluster.wait`).  Uploads
    stream to the first placed worker with ``Forward`` naming the rest and the master's
    ``Version``, then ``commit`` to the master; reads fail over across the replicas the
    master lists, and a copy whose bytes do not match its checksum is reported to the
    master as ``corrupt``.  Jobs: :meth:`submit`, :meth:`status`, :meth:`wait`,
    :meth:`cancel`, :meth:`jobs`, :meth:`logs`, with the JSON of ``ClusterClient``.
    """

    def __init__(
        self,
        clock: Any,
        endpoint_for: EndpointFor,
        master_addr: str,
        token: str | None,
        name: str = "sim-client",
    ) -> None:
        self.clock = clock
        self.links = Links(clock, endpoint_for, token, name=name)
        self.master_addr = master_addr
        #: (key, worker) of every copy this client found corrupt.
        self.corrupt_found: list[tuple[str, str]] = []

    # -- plumbing -----------------------------------------------------------------

    async def _master(
        self, method: str, headers: dict[str, object], payload: bytes = b""
    ) -> Response:
        link = await self.links.shared(self.master_addr)
        return await link.request(method, headers, payload)

    async def _each_replica(self, key: str, read: Callable[[ServerProtocol], Any]) -> Any:
        located = await self.located(key)
        last: Exception | None = None
        for name, addr in located.replicas:
            try:
                link = await self.links.shared(addr)
                return await read(link)
            except ChecksumMismatch as e:
                self.corrupt_found.append((key, name))
                await self._master("corrupt", {"Key": key, "Worker": name})
                last = e
            except DsmlError as e:
                if e.code not in TRY_NEXT:
                    raise
                last = e
            except (error.ConnectError, error.ConnectionLost, error.TimeoutError) as e:
                last = e
        raise last or DsmlError(f"no replica of {key!r} could be read", "unavailable")

    # -- where --------------------------------------------------------------------

    def place(self, key: str, size: int) -> Deferred[tuple[int, list[tuple[str, str]]]]:
        """The master's version for a new write of ``key`` and the workers to write to."""

        async def run() -> tuple[int, list[tuple[str, str]]]:
            r = await self._master("place", {"Key": key, "Size": size})
            return int(r.headers["version"]), _pairs(r.headers["workers"])

        return Deferred.fromCoroutine(run())

    async def located(self, key: str) -> Located:
        """Where ``key``'s current version lives (a coroutine; see :meth:`locate`)."""
        r = await self._master("locate", {"Key": key})
        h = r.headers
        return Located(
            key, int(h["size"]), h["sha256"], int(h["version"]), tuple(_pairs(h["replicas"]))
        )

    def locate(self, key: str) -> Deferred[Located]:
        """Where ``key``'s current version lives, best replica first."""
        return Deferred.fromCoroutine(self.located(key))

    # -- writes -------------------------------------------------------------------

    def upload(self, key: str, data: bytes) -> Deferred[Stored]:
        """Store ``data`` as the file ``key`` on the placed workers (a pipeline), then
        record it with the master; fires once both are done."""
        return Deferred.fromCoroutine(self._upload(key, data))

    async def _upload(self, key: str, data: bytes) -> Stored:
        version, workers = await self.place(key, len(data))
        digest = hashlib.sha256(data).hexdigest()
        headers: dict[str, object] = {"Key": key, "Version": version, "Sha256": digest}
        if len(workers) > 1:
            headers["Forward"] = ",".join(addr for _, addr in workers[1:])
        link = await self.links.open(workers[0][1])
        try:
            answer = link.request("file_upload", headers, len(data))
            transport = link.transport
            for i in range(0, len(data), UPLOAD_CHUNK):
                transport.write(data[i : i + UPLOAD_CHUNK])  # type: ignore[union-attr]
            response = await answer
        finally:
            link.transport.loseConnection()  # type: ignore[union-attr]
        stored = _stored(key, response)
        if stored.sha256 != digest:
            raise ChecksumMismatch(f"{key!r} stored with sha256 {stored.sha256}, sent {digest}")
        await self._commit(key, stored, workers)
        return stored

    def set(self, key: str, value: bytes) -> Deferred[Stored]:
        """Store the small value ``value`` under ``key`` on the placed workers."""

        async def run() -> Stored:
            version, workers = await self.place(key, len(value))
            headers: dict[str, object] = {"Key": key, "Version": version}
            if len(workers) > 1:
                headers["Forward"] = ",".join(addr for _, addr in workers[1:])
            link = await self.links.shared(workers[0][1])
            stored = _stored(key, await link.request("value_upload", headers, value))
            await self._commit(key, stored, workers)
            return stored

        return Deferred.fromCoroutine(run())

    async def _commit(self, key: str, stored: Stored, workers: list[tuple[str, str]]) -> None:
        await self._master(
            "commit",
            {
                "Key": key,
                "Size": stored.size,
                "Sha256": stored.sha256,
                "Version": stored.version,
                "Workers": ",".join(name for name, _ in workers),
            },
        )

    def remove(self, key: str) -> Deferred[int]:
        """Delete ``key`` everywhere (through the master); the version deleted."""

        async def run() -> int:
            r = await self._master("remove", {"Key": key})
            return int(r.headers["version"])

        return Deferred.fromCoroutine(run())

    # -- reads --------------------------------------------------------------------

    def download(self, key: str) -> Deferred[bytes]:
        """The bytes of the file ``key``, from the first replica that serves them whole
        and matching their checksum."""

        async def read(link: ServerProtocol) -> bytes:
            r = await link.request("file_retrieve", {"Key": key})
            digest = hashlib.sha256(r.payload).hexdigest()
            if digest != r.headers.get("sha256"):
                raise ChecksumMismatch(
                    f"{key!r} arrived with sha256 {digest}, expected {r.headers.get('sha256')}"
                )
            return r.payload

        return Deferred.fromCoroutine(self._each_replica(key, read))

    def get(self, key: str) -> Deferred[bytes]:
        """The value ``key``, from the first replica that answers."""

        async def read(link: ServerProtocol) -> bytes:
            r = await link.request("value_retrieve", {"Key": key})
            return r.payload

        return Deferred.fromCoroutine(self._each_replica(key, read))

    def ls(self, prefix: str = "", page: int = 1000) -> Deferred[list[ListedKey]]:
        """Every key under ``prefix`` with its replicas, from the master's directory."""

        async def run() -> list[ListedKey]:
            out: list[ListedKey] = []
            after: str | None = None
            while True:
                headers: dict[str, object] = {"Limit": page}
                if prefix:
                    headers["Prefix"] = prefix
                if after is not None:
                    headers["After"] = after
                r = await self._master("list", headers)
                for line in r.payload.decode().splitlines():
                    d = json.loads(line)
                    out.append(
                        ListedKey(d["key"], d["size"], d["sha256"], d["version"],
                                  tuple(d["replicas"]))
                    )
                    after = d["key"]
                if r.headers.get("more") != "1":
                    return out

        return Deferred.fromCoroutine(run())

    def nodes(self) -> Deferred[list[Node]]:
        """Every worker the master knows, with its state."""

        async def run() -> list[Node]:
            r = await self._master("nodes", {})
            return [Node(**json.loads(line)) for line in r.payload.decode().splitlines() if line]

        return Deferred.fromCoroutine(run())

    # -- jobs ---------------------------------------------------------------------

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
    ) -> Deferred[str]:
        """Submit a job (the JSON of :meth:`ClusterClient.submit`); fires with its id once
        the master has it durably."""
        body = job_body(
            command, name=name, tasks=tasks, array=array, slots=slots, timeout=timeout,
            max_attempts=max_attempts, priority=priority, after=after, inputs=inputs,
            outputs=outputs, env=env,
        )

        async def run() -> str:
            r = await self._master("submit", {}, body)
            return r.headers["job"]

        return Deferred.fromCoroutine(run())

    def jobs(self, limit: int = 100) -> Deferred[list[dict[str, Any]]]:
        """Recent jobs, newest first (without their tasks)."""

        async def run() -> list[dict[str, Any]]:
            r = await self._master("jobs", {"Limit": limit})
            return [json.loads(line) for line in r.payload.decode().splitlines() if line]

        return Deferred.fromCoroutine(run())

    def status(self, job_id: str) -> Deferred[dict[str, Any]]:
        """A job with its tasks and every attempt (as ``dsml status`` shows it)."""

        async def run() -> dict[str, Any]:
            r = await self._master("status", {"Job": job_id})
            return json.loads(r.payload)  # type: ignore[no-any-return]

        return Deferred.fromCoroutine(run())

    def cancel(self, job_id: str) -> Deferred[int]:
        """Cancel a job; fires with how many running attempts were told to stop."""

        async def run() -> int:
            r = await self._master("cancel", {"Job": job_id})
            return int(r.headers.get("killed", "0"))

        return Deferred.fromCoroutine(run())

    def wait(self, job_id: str, timeout: float | None = None, step: int = 30) -> Deferred[
        dict[str, Any]
    ]:
        """Fires with the job's status once it has ended (or ``timeout`` simulated seconds
        have passed), asking the master ``step`` seconds at a time."""

        async def run() -> dict[str, Any]:
            deadline = None if timeout is None else self.clock.seconds() + timeout
            while True:
                left = step if deadline is None else deadline - self.clock.seconds()
                ask = max(1, min(step, int(left)))
                r = await self._master("wait", {"Job": job_id, "Timeout": ask})
                if r.headers.get("final") == "1":
                    return json.loads(r.payload)  # type: ignore[no-any-return]
                if deadline is not None and self.clock.seconds() >= deadline:
                    return json.loads(r.payload)  # type: ignore[no-any-return]

        return Deferred.fromCoroutine(run())

    def logs(
        self, job_id: str, task: int = 0, attempt: int | None = None, stream: str = "stdout"
    ) -> Deferred[bytes]:
        """An attempt's stdout or stderr (the task's last attempt by default), whole."""

        async def run() -> bytes:
            headers: dict[str, object] = {"Job": job_id, "Task": task}
            if attempt is not None:
                headers["Attempt"] = attempt
            r = await self._master("logs", headers)
            attempt_id, addr = int(r.headers["attempt"]), r.headers["worker"].partition("=")[2]
            link = await self.links.shared(addr)
            chunks, offset = [], 0
            while True:
                got = await link.request(
                    "task_log", {"Attempt": attempt_id, "Stream": stream, "Offset": offset}
                )
                chunks.append(got.payload)
                offset += len(got.payload)
                if not got.payload or offset >= int(got.headers["size"]):
                    return b"".join(chunks)

        return Deferred.fromCoroutine(run())

    def close(self) -> None:
        """Close the client's shared links."""
        self.links.close()


def _stored(key: str, r: Response) -> Stored:
    h = r.headers
    return Stored(key, int(h["size"]), h["sha256"], int(h["version"]), int(h.get("replicas", "1")))


def _pairs(text: str) -> list[tuple[str, str]]:
    """``name=host:port,...`` to [(name, host:port)]."""
    out = []
    for item in text.split(","):
        name, _, addr = item.partition("=")
        out.append((name, addr))
    return out


__all__ = ["TRY_NEXT", "UPLOAD_CHUNK", "SimClient"]
