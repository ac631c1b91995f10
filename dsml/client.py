"""The blocking Python client (the seed's Client and RPC).

One socket, one request at a time, the same sans-IO codec as the servers.  Kept lean on
purpose: a value round trip is one ``sendall`` and usually one ``recv``.

    with Client("127.0.0.1", 7401, token="...") as c:
        c.set("greeting", b"hello")
        c.get("greeting")
        c.upload("data.bin", "datasets/data.bin")
        c.download("datasets/data.bin", "copy.bin")
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import attrs

from .errors import ChecksumMismatch, ConnectionLost, DsmlError
from .protocol import codec
from .protocol.codec import END, NEED_DATA, Head, Parser, quick_response

#: Bytes per read and per send of a file transfer.
CHUNK = 1024 * 1024

#: Bytes asked of the socket per read outside a file transfer.  Asking for CHUNK on
#: every small reply costs a large allocation per round trip.
SMALL_READ = 64 * 1024

Progress = Callable[[int], None]


@attrs.frozen
class Entry:
    """What the server says about a stored key."""

    key: str
    kind: str
    size: int
    sha256: str
    version: int
    mtime: float = 0.0


@attrs.frozen
class Stored:
    """The server's acknowledgement of a write."""

    key: str
    size: int
    sha256: str
    version: int
    replicas: int = 1


def _stored(key: str, head: Head) -> Stored:
    h = head.headers
    return Stored(
        key, int(h["size"]), h["sha256"], int(h["version"]), int(h.get("replicas", "1"))
    )


def _error(head: Head) -> DsmlError:
    return DsmlError(head.headers.get("message", "error"), head.headers.get("code", "internal"))


class Client:
    """A blocking connection to one dsml storage server.

    Connects and authenticates at once; raises :class:`DsmlError` (``auth-failed``,
    ``not-found``, ...) for error responses and :class:`ConnectionLost` when the server
    cannot be reached or goes away.
    """

    def __init__(
        self,
        host: str,
        port: int,
        token: str | None = None,
        timeout: float | None = 60.0,
        name: str = "dsml-python",
    ) -> None:
        self.host = host
        self.port = port
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ConnectionLost(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # whole=True: a small reply is one event (its payload inside the Head).
        self._parser = Parser(codec.RESPONSE, whole=True)
        self._next_id = 1
        self._read_size = SMALL_READ
        try:
            self._call("auth", {"Token": token or "", "Client": name})
        except BaseException:
            self.close()
            raise

    # -- plumbing ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection."""
        sock, self._sock = self._sock, None  # type: ignore[assignment]
        if sock is not None:
            sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send_head(self, method: str, headers: dict[str, object], length: int) -> int:
        req_id = self._next_id
        self._next_id += 1
        self._sendall(codec.encode_request(method, req_id, headers, length))
        return req_id

    def _sendall(self, data: bytes | memoryview) -> None:
        if self._sock is None:
            raise ConnectionLost("connection is closed")
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise ConnectionLost(f"connection to {self.host}:{self.port} lost: {e}") from None

    def _event(self) -> Any:
        parser = self._parser
        while True:
            event = parser.next_event()
            if event is not NEED_DATA:
                return event
            parser.feed(self._recv())

    def _recv(self) -> bytes:
        if self._sock is None:
            raise ConnectionLost("connection is closed")
        try:
            data = self._sock.recv(self._read_size)
        except OSError as e:
            raise ConnectionLost(f"connection to {self.host}:{self.port} lost: {e}") from None
        if not data:
            raise ConnectionLost(f"{self.host}:{self.port} closed the connection")
        return data

    def _read_head(self, req_id: int) -> Head:
        head = self._event()
        if type(head) is not Head:
            raise DsmlError(f"unexpected {head!r} from server", "bad-frame")
        if head.id != req_id and head.id != 0:
            raise DsmlError(f"response {head.id} does not answer request {req_id}", "bad-frame")
        return head

    def _read_payload(self, head: Head) -> bytes:
        if head.body is not None:
            return head.body
        chunks = []
        while True:
            event = self._event()
            if event is END:
                return b"".join(chunks)
            chunks.append(event.data)

    def _call(
        self, method: str, headers: dict[str, object], payload: bytes = b""
    ) -> tuple[Head, bytes]:
        req_id = self._next_id
        self._next_id += 1
        self._sendall(codec.encode_request(method, req_id, headers, payload))
        return self._answer(req_id)

    def _key_call(self, method: str, key: str, payload: bytes = b"") -> tuple[Head, bytes]:
        """_call for the commonest requests (a Key header only), cheaper."""
        req_id = self._next_id
        self._next_id += 1
        self._sendall(codec.encode_key_request(method, req_id, key, payload))
        return self._answer(req_id)

    def _answer(self, req_id: int) -> tuple[Head, bytes]:
        """Read the response to ``req_id``; raise its error."""
        head = None
        if self._parser.idle:
            # Nothing buffered: a small reply usually comes whole in one read, and is
            # decoded in one step (codec.quick_response); else the parser takes it.
            data = self._recv()
            head = quick_response(data)
            if head is None:
                self._parser.feed(data)
            elif head.id != req_id and head.id != 0:
                raise DsmlError(f"response {head.id} does not answer request {req_id}", "bad-frame")
        if head is None:
            head = self._read_head(req_id)
        body = self._read_payload(head)
        if not head.ok:
            if head.id == 0 or head.headers.get("code") in ("auth-failed", "auth-required"):
                self.close()
            raise _error(head)
        return head, body

    # -- values -----------------------------------------------------------------------

    def ping(self) -> dict[str, str]:
        """Round-trip a no-op; returns the reply's headers."""
        head, _ = self._call("ping", {})
        return head.headers

    def set(
        self, key: str, value: bytes, version: int | None = None, forward: str = ""
    ) -> Stored:
        """Store a small value (up to the server's value_max) under ``key``.

        ``version`` and ``forward`` are for cluster writes (see :class:`ClusterClient`):
        the master's version, and the workers the server passes the value on to.
        """
        if version is None and not forward:
            head, _ = self._key_call("value_upload", key, value)
            return _stored(key, head)
        headers: dict[str, object] = {"Key": key}
        if version is not None:
            headers["Version"] = version
        if forward:
            headers["Forward"] = forward
        head, _ = self._call("value_upload", headers, value)
        return _stored(key, head)

    def get(self, key: str) -> bytes:
        """Return the value stored under ``key``."""
        return self._key_call("value_retrieve", key)[1]

    def delete(self, key: str) -> int:
        """Delete ``key``; return the version that was deleted."""
        head, _ = self._call("delete", {"Key": key})
        return int(head.headers["version"])

    def stat(self, key: str) -> Entry:
        """Describe ``key``."""
        head, _ = self._call("stat", {"Key": key})
        h = head.headers
        return Entry(
            key, h["kind"], int(h["size"]), h["sha256"], int(h["version"]), float(h["mtime"])
        )

    def list(self, prefix: str = "", page: int = 1000) -> Iterator[Entry]:
        """Every key starting with ``prefix``, in UTF-8 byte order (fetched a page at a time)."""
        after: str | None = None
        while True:
            headers: dict[str, object] = {"Limit": page}
            if prefix:
                headers["Prefix"] = prefix
            if after is not None:
                headers["After"] = after
            head, body = self._call("list", headers)
            for line in body.decode("utf-8").splitlines():
                d = json.loads(line)
                yield Entry(d["key"], d["kind"], d["size"], d["sha256"], d["version"], d["mtime"])
                after = d["key"]
            if head.headers.get("more") != "1":
                return

    # -- files ------------------------------------------------------------------------

    def upload(
        self,
        source: str | os.PathLike[str] | IO[bytes],
        key: str,
        progress: Progress | None = None,
        sha256: str | None = None,
        version: int | None = None,
        forward: str = "",
    ) -> Stored:
        """Stream a file to ``key``; hash it on the way and check the server's hash.

        With ``sha256`` the server itself refuses bytes that do not match it.
        """
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return self.upload(f, key, progress, sha256, version, forward)
        f = source
        size = os.fstat(f.fileno()).st_size - f.tell()
        headers: dict[str, object] = {"Key": key}
        if sha256 is not None:
            headers["Sha256"] = sha256
        if version is not None:
            headers["Version"] = version
        if forward:
            headers["Forward"] = forward
        req_id = self._send_head("file_upload", headers, size)
        digest = hashlib.sha256()
        remaining = size
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            while remaining:
                n = f.readinto(view[: min(CHUNK, remaining)])  # type: ignore[attr-defined]
                if not n:
                    self.close()  # the promised length cannot be sent: the framing is lost
                    raise DsmlError(
                        f"file shrank while uploading ({remaining} bytes missing)", "io"
                    )
                digest.update(view[:n])
                self._sendall(view[:n])
                remaining -= n
                if progress is not None:
                    progress(n)
        except ConnectionLost:
            # The server may have refused the upload and closed: prefer its reason.
            try:
                head = self._read_head(req_id)
            except DsmlError:
                raise
            if not head.ok:
                raise _error(head) from None
            raise
        head = self._read_head(req_id)
        self._read_payload(head)
        if not head.ok:
            raise _error(head)
        stored = _stored(key, head)
        if stored.sha256 != digest.hexdigest():
            raise ChecksumMismatch(
                f"server stored sha256 {stored.sha256} for {key!r}, sent {digest.hexdigest()}"
            )
        return stored

    def download_to(self, key: str, out: IO[bytes], progress: Progress | None = None) -> Entry:
        """Stream ``key`` into an open binary file; raise ChecksumMismatch on a bad hash.

        On a mismatch the bytes are already written: use :meth:`download` for a file
        that only appears when it is whole and correct.
        """
        req_id = self._send_head("file_retrieve", {"Key": key}, 0)
        head = self._read_head(req_id)
        if not head.ok:
            self._read_payload(head)
            raise _error(head)
        h = head.headers
        if h.get("action") != "write-file":
            raise DsmlError("server did not offer the file", "bad-frame")
        digest = hashlib.sha256()
        write = out.write
        self._read_size = CHUNK
        try:
            whole = head.body
            while True:
                if whole is not None:  # small: it came whole with the head, no END
                    data = whole
                else:
                    event = self._event()
                    if event is END:
                        break
                    data = event.data
                digest.update(data)
                write(data)
                if progress is not None:
                    progress(len(data))
                if whole is not None:
                    break
        finally:
            self._read_size = SMALL_READ
        entry = Entry(key, h["kind"], int(h["size"]), h["sha256"], int(h["version"]))
        if digest.hexdigest() != entry.sha256:
            raise ChecksumMismatch(
                f"{key!r} arrived with sha256 {digest.hexdigest()}, expected {entry.sha256}"
            )
        return entry

    def download(
        self,
        key: str,
        path: str | os.PathLike[str],
        progress: Progress | None = None,
        fsync: bool = True,
    ) -> Entry:
        """Download ``key`` to ``path``: a temporary file beside it, renamed when whole
        and verified (the seed's write_to_file); nothing is left on any error."""
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                entry = self.download_to(key, out, progress)
                out.flush()
                if fsync:
                    os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return entry


@attrs.frozen
class Node:
    """A worker as the master sees it (``dsml nodes``)."""

    name: str
    host: str
    port: int
    state: str
    since_heartbeat: float
    incarnation: int
    slots: int
    free_slots: int
    stored_bytes: int
    stored_files: int
    free_disk: int


@attrs.frozen
class Located:
    """A key's current version and the workers that hold it, best first."""

    key: str
    size: int
    sha256: str
    version: int
    replicas: tuple[tuple[str, str], ...]  # (worker name, host:port)


#: Errors from one replica that make a reader try the next one.
_TRY_NEXT = ("connection", "not-found", "checksum-mismatch", "internal", "busy", "timeout")


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
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.timeout = timeout
        self.name = name
        self.master = Client(host, port, token, timeout, name)
        self._workers: dict[str, Client] = {}

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike[str] | None = None,
        *,
        token: str | None = None,
        timeout: float | None = 60.0,
        name: str = "dsml-python",
    ) -> ClusterClient:
        """Connect to the master of the cluster a config file describes.

        The file is found as the ``dsml`` command finds it: ``config``, else
        $DSML_CONFIG, else ``etc/dsml.yaml`` in the working directory.  The token is
        ``token``, else $DSML_TOKEN, else the config's.
        """
        from .config import MASTER_ADDR_FILE, find_config, load_config, read_address

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
        return cls(host, port, token, timeout, name)

    def close(self) -> None:
        """Close every connection."""
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
            c = Client(host.strip("[]"), int(port), self.token, self.timeout, self.name)
            self._workers[addr] = c
        return c

    def _drop_worker(self, addr: str) -> None:
        c = self._workers.pop(addr, None)
        if c is not None:
            c.close()

    # -- where ------------------------------------------------------------------------

    def place(self, key: str, size: int) -> tuple[int, list[tuple[str, str]]]:
        """The master's version for a new write of ``key`` and the workers to write to."""
        head, _ = self.master._call("place", {"Key": key, "Size": size})
        return int(head.headers["version"]), _pairs(head.headers["workers"])

    def locate(self, key: str) -> Located:
        """Where ``key``'s current version lives."""
        head, _ = self.master._call("locate", {"Key": key})
        h = head.headers
        return Located(
            key, int(h["size"]), h["sha256"], int(h["version"]), tuple(_pairs(h["replicas"]))
        )

    def _commit(self, key: str, stored: Stored, workers: list[tuple[str, str]]) -> None:
        self.master._call(
            "commit",
            {
                "Key": key,
                "Size": stored.size,
                "Sha256": stored.sha256,
                "Version": stored.version,
                "Workers": ",".join(name for name, _ in workers),
            },
        )

    # -- writes -----------------------------------------------------------------------

    def upload(
        self,
        source: str | os.PathLike[str] | IO[bytes],
        key: str,
        progress: Progress | None = None,
    ) -> Stored:
        """Upload a file to the placed workers (a pipeline); acknowledged once every one
        has it durably and the master has recorded it."""
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return self.upload(f, key, progress)
        size = os.fstat(source.fileno()).st_size - source.tell()
        version, workers = self.place(key, size)
        first, rest = workers[0][1], ",".join(addr for _, addr in workers[1:])
        try:
            stored = self._worker(first).upload(source, key, progress, None, version, rest)
        except ConnectionLost:
            self._drop_worker(first)
            raise
        self._commit(key, stored, workers)
        return stored

    def set(self, key: str, value: bytes) -> Stored:
        """Store a small value on the placed workers."""
        version, workers = self.place(key, len(value))
        first, rest = workers[0][1], ",".join(addr for _, addr in workers[1:])
        try:
            stored = self._worker(first).set(key, value, version, rest)
        except ConnectionLost:
            self._drop_worker(first)
            raise
        self._commit(key, stored, workers)
        return stored

    def delete(self, key: str) -> int:
        """Delete ``key`` everywhere; returns the version deleted."""
        head, _ = self.master._call("remove", {"Key": key})
        return int(head.headers["version"])

    # -- reads ------------------------------------------------------------------------

    def _each_replica(self, key: str) -> Iterator[tuple[str, Client]]:
        """Yield (worker, client) for each replica in turn, until the caller stops."""
        located = self.locate(key)
        last: DsmlError | None = None
        for name, addr in located.replicas:
            try:
                client = self._worker(addr)
            except ConnectionLost as e:
                last = e
                continue
            yield name, client
        raise last or DsmlError(f"no replica of {key!r} could be read", "unavailable")

    def get(self, key: str) -> bytes:
        """The value of ``key``, from the first replica that answers."""
        for _name, client in self._each_replica(key):
            try:
                return client.get(key)
            except DsmlError as e:
                if e.code not in _TRY_NEXT:
                    raise
                if isinstance(e, ConnectionLost):
                    self._drop_worker(f"{client.host}:{client.port}")
        raise AssertionError("unreachable")  # _each_replica raises when it runs out

    def download(
        self,
        key: str,
        path: str | os.PathLike[str],
        progress: Progress | None = None,
        fsync: bool = True,
    ) -> Entry:
        """Download ``key`` to ``path`` (temp file + rename), failing over between
        replicas; a copy with a bad checksum is reported to the master."""
        for name, client in self._each_replica(key):
            try:
                return client.download(key, path, progress, fsync)
            except ChecksumMismatch:
                self.master._call("corrupt", {"Key": key, "Worker": name})
            except DsmlError as e:
                if e.code not in _TRY_NEXT:
                    raise
                self._drop_worker(f"{client.host}:{client.port}")
        raise AssertionError("unreachable")

    def download_to(self, key: str, out: IO[bytes], progress: Progress | None = None) -> Entry:
        """Stream ``key`` into an open file (no failover once bytes were written)."""
        start = out.tell() if out.seekable() else None
        for _name, client in self._each_replica(key):
            try:
                return client.download_to(key, out, progress)
            except ConnectionLost:
                if start is None or out.tell() != start:
                    raise  # bytes already went out: another replica cannot mend that
                self._drop_worker(f"{client.host}:{client.port}")
        raise AssertionError("unreachable")

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
                if e.code not in _TRY_NEXT:
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
            headers: dict[str, object] = {"Limit": page}
            if prefix:
                headers["Prefix"] = prefix
            if after is not None:
                headers["After"] = after
            head, body = self.master._call("list", headers)
            for line in body.decode("utf-8").splitlines():
                d = json.loads(line)
                yield ListedKey(d["key"], d["size"], d["sha256"], d["version"],
                                tuple(d["replicas"]))
                after = d["key"]
            if head.headers.get("more") != "1":
                return

    def nodes(self) -> list[Node]:
        """Every worker the master knows, with its state."""
        _, body = self.master._call("nodes", {})
        return [Node(**json.loads(line)) for line in body.decode().splitlines() if line]

    def ping(self) -> dict[str, str]:
        """Round-trip to the master."""
        return self.master.ping()

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
    ) -> Job:
        """Submit a job; returns its handle once the master has it durably.

        Either ``command`` (run ``array`` times, each with its index in
        ``DSML_TASK_INDEX``) or ``tasks``: a list of dicts with ``command`` and
        optionally ``env``, ``inputs`` ([key, path]), ``outputs`` ([path, key]),
        ``slots``, ``timeout``, ``max_attempts``.
        """
        body = job_body(
            command, name=name, tasks=tasks, array=array, slots=slots, timeout=timeout,
            max_attempts=max_attempts, priority=priority, after=after, inputs=inputs,
            outputs=outputs, env=env,
        )
        head, _ = self.master._call("submit", {}, body)
        return Job(self, head.headers["job"])

    def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        """Recent jobs, newest first (JSON objects as ``dsml jobs`` shows them)."""
        _, body = self.master._call("jobs", {"Limit": limit})
        return [json.loads(line) for line in body.decode().splitlines() if line]

    def job_status(self, job_id: str) -> dict[str, Any]:
        """A job with its tasks and every attempt."""
        _, body = self.master._call("status", {"Job": job_id})
        return json.loads(body)  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> int:
        """Cancel a job; returns how many running attempts were told to stop."""
        head, _ = self.master._call("cancel", {"Job": job_id})
        return int(head.headers.get("killed", "0"))

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job ends (or ``timeout`` seconds pass); returns its status."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 60 if deadline is None else max(1, min(60, int(deadline - time.monotonic())))
            head, body = self.master._call("wait", {"Job": job_id, "Timeout": step})
            if head.headers.get("final") == "1":
                return json.loads(body)  # type: ignore[no-any-return]
            if deadline is not None and time.monotonic() >= deadline:
                return json.loads(body)  # type: ignore[no-any-return]

    def log_source(
        self, job_id: str, task: int = 0, attempt: int | None = None
    ) -> tuple[int, str, bool]:
        """(attempt id, worker host:port, whether the attempt still runs) of a task's log."""
        headers: dict[str, object] = {"Job": job_id, "Task": task}
        if attempt is not None:
            headers["Attempt"] = attempt
        head, _ = self.master._call("logs", headers)
        h = head.headers
        return int(h["attempt"]), h["worker"].partition("=")[2], h["state"] == "running"

    def read_log(
        self, addr: str, attempt: int, stream: str = "stdout", offset: int = 0
    ) -> tuple[bytes, int, bool]:
        """(bytes from ``offset``, the log's size, still running) from the worker at ``addr``."""
        head, body = self._worker(addr)._call(
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


class Job:
    """A submitted job: ``wait()``, ``status()``, ``logs()``, ``cancel()``."""

    def __init__(self, client: ClusterClient, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> dict[str, Any]:
        """The job, its tasks and their attempts."""
        return self.client.job_status(self.id)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job ends; returns its final status."""
        return self.client.wait(self.id, timeout)

    def logs(self, task: int = 0, attempt: int | None = None, stream: str = "stdout") -> bytes:
        """A task's output (the last attempt by default)."""
        return self.client.logs(self.id, task, attempt, stream)

    def cancel(self) -> int:
        """Stop every running attempt; nothing more of it runs."""
        return self.client.cancel(self.id)


@attrs.frozen
class ListedKey:
    """A key in the master's directory."""

    key: str
    size: int
    sha256: str
    version: int
    replicas: tuple[str, ...]


def job_body(
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
) -> bytes:
    """The JSON payload of a ``submit`` request (see :meth:`ClusterClient.submit`)."""
    if tasks is None:
        if not command:
            raise DsmlError("a job needs a command", "bad-job")
        tasks = [
            {
                "command": list(command),
                "env": dict(env or {}),
                # "{index}" in a key or path becomes the task's index (Slurm's %a).
                "inputs": [[_fill(k, i), _fill(p, i)] for k, p in inputs],
                "outputs": [[_fill(p, i), _fill(k, i)] for p, k in outputs],
                "slots": slots,
                "timeout": timeout,
                "max_attempts": max_attempts,
            }
            for i in range(array)
        ]
    return json.dumps(
        {"name": name, "priority": priority, "after": list(after), "tasks": tasks}
    ).encode()


def _fill(text: str, index: int) -> str:
    return text.replace("{index}", str(index))


def _pairs(text: str) -> list[tuple[str, str]]:
    """``name=host:port,...`` to [(name, host:port)]."""
    out = []
    for item in text.split(","):
        name, _, addr = item.partition("=")
        out.append((name, addr))
    return out
