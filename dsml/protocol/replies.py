"""What the cluster's answers say, as records, and the one request body clients build.

Owns the records both clients return (the blocking :mod:`dsml.client` and the async
:mod:`dsml.net.cluster_client`): :class:`Entry` (a stored key, from one server),
:class:`Stored` (a write acknowledged), :class:`Located` (a key's current version and its
replicas), :class:`ListedKey` (a key of the master's directory), :class:`Node` (a worker
as the master sees it); the reading of the headers and JSON lines they come from; the
``submit`` payload (:func:`job_body`); and which errors of one replica make a reader try
the next (:data:`TRY_NEXT`).  Sans-IO like the rest of :mod:`dsml.protocol`: both
clients share it, so neither needs the other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from ..errors import DsmlError

#: Error codes from one replica that make a reader try the next one.
TRY_NEXT = ("connection", "not-found", "checksum-mismatch", "internal", "busy", "timeout",
            "io-error")

RELOCATE_ROUNDS = 3
"""How many times a read asks the master where a key is: again when every replica was
tried (one may have answered ``not-found`` because a newer write replaced the version
the master named while the read was under way)."""


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
    #: Why the master gives it no new task (its attempts all fail at once), "" if it does.
    cordoned: str = ""
    #: What it offers tasks beyond its slots (CPUs): memory (bytes, 0: none declared)
    #: and its GPUs' ids; and what its running attempts hold, by the master's count.
    mem: int = 0
    gpus: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    cpus_used: int = 0
    mem_used: int = 0
    gpus_used: int = 0
    #: What its function tasks run with by default ("python 3.11 cloudpickle 3.1.1",
    #: :func:`dsml.fnrun.runtime`), "" if it did not say.
    fn_runtime: str = ""


@attrs.frozen
class Located:
    """A key's current version and the workers that hold it, best first."""

    key: str
    size: int
    sha256: str
    version: int
    replicas: tuple[tuple[str, str], ...]  # (worker name, host:port)


@attrs.frozen
class ListedKey:
    """A key in the master's directory."""

    key: str
    size: int
    sha256: str
    version: int
    replicas: tuple[str, ...]


def stored(key: str, headers: Mapping[str, str]) -> Stored:
    """The :class:`Stored` of a ``file_upload``/``value_upload`` answer's headers."""
    h = headers
    return Stored(
        key, int(h["size"]), h["sha256"], int(h["version"]), int(h.get("replicas", "1"))
    )


def entry(key: str, headers: Mapping[str, str]) -> Entry:
    """The :class:`Entry` of a ``stat`` or ``file_retrieve`` answer's headers."""
    h = headers
    return Entry(
        key, h["kind"], int(h["size"]), h["sha256"], int(h["version"]),
        float(h.get("mtime", "0") or 0),
    )


def located(key: str, headers: Mapping[str, str]) -> Located:
    """The :class:`Located` of a ``locate`` answer's headers."""
    h = headers
    return Located(
        key, int(h["size"]), h["sha256"], int(h["version"]), tuple(workers(h["replicas"]))
    )


def workers(text: str) -> list[tuple[str, str]]:
    """``name=host:port,...`` (``place``'s ``Workers``, ``locate``'s ``Replicas``) to
    [(name, host:port)]."""
    out = []
    for item in text.split(","):
        name, _, addr = item.partition("=")
        out.append((name, addr))
    return out


def listed_keys(payload: bytes) -> list[ListedKey]:
    """The JSON lines of the master's ``list`` answer."""
    out = []
    for line in payload.decode("utf-8").splitlines():
        d = json.loads(line)
        out.append(ListedKey(d["key"], d["size"], d["sha256"], d["version"], tuple(d["replicas"])))
    return out


def nodes(payload: bytes) -> list[Node]:
    """The JSON lines of the master's ``nodes`` answer."""
    fields = set(attrs.fields_dict(Node))
    return [
        Node(**{k: v for k, v in json.loads(line).items() if k in fields})
        for line in payload.decode().splitlines() if line
    ]


def lag(headers: Mapping[str, str]) -> dict[str, float]:
    """The master's reactor-lag figures from a ``nodes`` answer's ``Lag-*-Ms`` headers,
    in milliseconds by name (``worst``, ``recent_worst``, ``last``)."""
    out = {}
    for name in ("worst", "recent_worst", "last"):
        value = headers.get(f"lag-{name.replace('_', '-')}-ms")
        if value is not None:
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def list_headers(prefix: str, page: int, after: str | None) -> dict[str, object]:
    """The headers of one ``list`` request: ``page`` keys under ``prefix`` after
    ``after`` (None: from the start)."""
    headers: dict[str, object] = {"Limit": page}
    if prefix:
        headers["Prefix"] = prefix
    if after is not None:
        headers["After"] = after
    return headers


def next_status_page(
    job_id: str, headers: Mapping[str, str], tasks: list[dict[str, Any]]
) -> int | None:
    """Where the next page of a ``status`` answer starts (its ``Next`` header), or None
    after the last; refuses pages that go backwards (``tasks``: those read so far)."""
    if "next" not in headers:
        return None
    start = int(headers["next"])
    if tasks and start <= tasks[-1]["index"]:
        raise DsmlError(f"the master's status pages of {job_id} go backwards", "internal")
    return start


def json_lines(payload: bytes) -> list[dict[str, Any]]:
    """JSON lines (the master's ``jobs`` answer) as dicts."""
    return [json.loads(line) for line in payload.decode().splitlines() if line]


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
    retry_on: list[str] | tuple[str, ...] | None = None,
    cpus: int | None = None,
    mem: int | str = 0,
    gpus: int = 0,
) -> bytes:
    """The JSON payload of a ``submit`` request (see :meth:`ClusterClient.submit`).

    ``cpus`` is ``slots`` by its name of today (given, it wins); ``mem`` a byte count or
    a size such as ``"4G"`` or ``"512MiB"`` (:func:`dsml.config.parse_size`).

    ``command`` with ``array`` > 1 is sent as ``"array": N`` and one task as its template
    (``{index}`` left in its keys and paths: the master fills it in for each task), so a
    100,000-task array is one small request, not 100,000 task objects for the master to
    parse at once.  ``retry_on`` (the causes a failed attempt is retried for) is sent
    only when given: the master's default is ``lost`` and ``staging``."""
    if cpus is not None:
        slots = cpus
    if isinstance(mem, str):
        from ..config import parse_size

        try:
            mem = parse_size(mem)
        except ValueError as e:
            raise DsmlError(f"mem: {e}", "bad-job") from None
    if tasks is None and array > 1:
        job = json.loads(job_body(command, name=name, array=1, slots=slots, timeout=timeout,
                                  max_attempts=max_attempts, priority=priority, after=after,
                                  env=env, retry_on=retry_on, mem=mem, gpus=gpus))
        template = job["tasks"][0]
        template["inputs"] = [[k, p] for k, p in inputs]
        template["outputs"] = [[p, k] for p, k in outputs]
        job["array"] = array
        return json.dumps(job).encode()
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
                **({} if retry_on is None else {"retry_on": list(retry_on)}),
                **({"mem": mem} if mem else {}),
                **({"gpus": gpus} if gpus else {}),
            }
            for i in range(array)
        ]
    return json.dumps(
        {"name": name, "priority": priority, "after": list(after), "tasks": tasks}
    ).encode()


def _fill(text: str, index: int) -> str:
    return text.replace("{index}", str(index))


__all__ = [
    "TRY_NEXT",
    "Entry",
    "ListedKey",
    "Located",
    "Node",
    "Stored",
    "entry",
    "job_body",
    "json_lines",
    "listed_keys",
    "located",
    "nodes",
    "stored",
    "workers",
]
