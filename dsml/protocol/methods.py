"""The method table: which headers each request method requires and how big its payload may be.

The parser consults the table as soon as a request's header block is complete, so a request
that lacks a header or names a bad key is answered with an error naming the problem, and its
payload is skipped: the handler never sees it (the seed's "Message does error handling to
make sure all parameters are included").

It also names the kinds of peer (:class:`Role`) a connection may act as; which role may
call which method is declared beside each method's handler (``dsml.net.responders``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping

import attrs

from ..errors import DsmlError
from . import limits

_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_DIGITS = re.compile(r"[0-9]{1,18}\Z")
# C0 controls, DEL and the C1 controls: never part of a key.
_KEY_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Role(enum.Enum):
    """The kind of peer a connection speaks for, as its authentication established.

    A method declares the roles that may call it; a connection holding none of them is
    answered ``forbidden``.  The cluster token grants every role (:data:`ALL_ROLES`).
    """

    CLIENT = "client"
    WORKER = "worker"
    MASTER = "master"

    def __str__(self) -> str:
        return self.value


#: What the cluster token grants: one token speaks for every kind of peer.
ALL_ROLES: frozenset[Role] = frozenset(Role)


def roles_text(roles: Iterable[Role]) -> str:
    """``"a client or worker"``: roles for a message, in a fixed order."""
    names = [r.value for r in Role if r in set(roles)]
    if not names:
        return "nobody"
    return "a " + " or ".join(names)


class HeaderValueError(DsmlError, ValueError):
    """A header value does not have the form its method requires.

    ``code`` is the wire error code to answer with (``bad-key`` or ``bad-header``).
    """

    code = "bad-header"


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid dsml key, else raise HeaderValueError.

    A key is 1 to MAX_KEY bytes of UTF-8 with no control characters.  Keys are names,
    never paths: the store maps them to files by hash, so ``../x`` is an ordinary key.
    """
    if not key:
        raise HeaderValueError("key is empty", "bad-key")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 form
        raise HeaderValueError("key is not valid UTF-8", "bad-key") from None
    if size > limits.MAX_KEY:
        raise HeaderValueError(f"key is longer than {limits.MAX_KEY} bytes", "bad-key")
    if _KEY_FORBIDDEN.search(key):
        raise HeaderValueError("key contains a control character", "bad-key")
    return key


def check_prefix(prefix: str) -> str:
    """A list prefix: like a key, but may be empty."""
    return check_key(prefix) if prefix else prefix


def check_sha256(value: str) -> str:
    """A lowercase hex sha256 digest."""
    if not _SHA256.match(value):
        raise HeaderValueError("expected 64 lowercase hex digits", "bad-header")
    return value


def check_uint(value: str) -> str:
    """A non-negative integer written as plain ASCII digits."""
    if not _DIGITS.match(value):
        raise HeaderValueError("expected a non-negative integer in ASCII digits", "bad-header")
    return value


def check_text(value: str) -> str:
    """Free text (the framing already excludes CR, LF and NUL)."""
    return value


_ADDR = re.compile(r"[A-Za-z0-9._:\[\]-]{1,255}:[0-9]{1,5}\Z")

#: Most workers a Forward header may name (the rest of an upload pipeline).
MAX_FORWARD = 16


def check_addr(value: str) -> str:
    """``host:port`` of a storage server."""
    if not _ADDR.match(value):
        raise HeaderValueError("expected host:port", "bad-header")
    return value


def check_forward(value: str) -> str:
    """A comma-separated list of ``host:port``: where a storage server passes an upload on."""
    parts = value.split(",") if value else []
    if len(parts) > MAX_FORWARD:
        raise HeaderValueError(f"more than {MAX_FORWARD} addresses", "bad-header")
    for part in parts:
        check_addr(part)
    return value


def check_name(value: str) -> str:
    """A worker name: 1 to 64 of ``A-Z a-z 0-9 _ . -``."""
    if not limits.WORKER_NAME.match(value):
        raise HeaderValueError(f"expected a worker name ({limits.WORKER_NAME_RULE})", "bad-header")
    return value


def check_names(value: str) -> str:
    """A comma-separated list of worker names."""
    for part in value.split(","):
        check_name(part)
    return value


Validator = Callable[[str], str]


@attrs.frozen
class MethodSpec:
    """What one request method needs.

    ``headers`` maps each header the method understands (lowercase) to its validator;
    ``required`` names those that must be present; ``max_payload`` bounds the payload
    (0: none allowed); ``streamed`` says the handler takes the payload chunk by chunk
    instead of as one buffer.
    """

    name: str
    headers: Mapping[str, Validator] = attrs.field(factory=dict)
    required: frozenset[str] = frozenset()
    max_payload: int = 0
    streamed: bool = False


@attrs.define
class MethodTable:
    """The set of methods one server understands."""

    specs: dict[str, MethodSpec] = attrs.field(factory=dict)

    def add(self, spec: MethodSpec) -> None:
        """Add (or replace) a method."""
        self.specs[spec.name] = spec

    def extend(self, specs: Iterable[MethodSpec]) -> MethodTable:
        """Return a new table with these methods added."""
        table = MethodTable(dict(self.specs))
        for spec in specs:
            table.add(spec)
        return table

    def get(self, name: str) -> MethodSpec | None:
        """The spec of ``name``, or None if the method is unknown."""
        return self.specs.get(name)


def _spec(
    name: str,
    required: Mapping[str, Validator] | None = None,
    optional: Mapping[str, Validator] | None = None,
    max_payload: int = 0,
    streamed: bool = False,
) -> MethodSpec:
    required = dict(required or {})
    headers = {**required, **(optional or {})}
    return MethodSpec(name, headers, frozenset(required), max_payload, streamed)


def storage_methods(value_max: int = limits.DEFAULT_VALUE_MAX) -> MethodTable:
    """The methods of a storage server (every worker serves these)."""
    key = {"key": check_key}
    table = MethodTable()
    for spec in [
        _spec("auth", {"token": check_text}, {"client": check_text}),
        _spec("ping"),
        _spec(
            "file_upload",
            key,
            {"sha256": check_sha256, "forward": check_forward, "version": check_uint},
            max_payload=limits.FILE_MAX,
            streamed=True,
        ),
        _spec("file_retrieve", key),
        _spec(
            "value_upload",
            key,
            {"forward": check_forward, "version": check_uint},
            max_payload=value_max,
        ),
        _spec("value_retrieve", key),
        _spec("delete", key),
        _spec("stat", key),
        _spec("list", None, {"prefix": check_prefix, "limit": check_uint, "after": check_key}),
        # An attempt's stdout or stderr from Offset (a task log, kept by the worker).
        _spec(
            "task_log",
            {"attempt": check_uint, "stream": check_text},
            {"offset": check_uint},
        ),
    ]:
        table.add(spec)
    return table


#: Largest job description (a job file or an array of many tasks).
JOB_MAX = 64 * 1024 * 1024

#: Largest inventory or report payload a worker sends the master (about 400,000 keys).
INVENTORY_MAX = 64 * 1024 * 1024


def worker_order_methods() -> MethodTable:
    """What the master may ask of a worker over the worker's link."""
    key = {"key": check_key}
    table = MethodTable()
    for spec in [
        _spec("ping"),
        # Push the current copy of Key (if it still has Version) to the storage
        # server at To, as a file_upload.
        _spec("replicate", {**key, "version": check_uint, "to": check_addr}),
        # Delete Key if its stored version is Version (a surplus or stale replica).
        _spec("drop", {**key, "version": check_uint}),
        # Run one task attempt: payload = JSON of the attempt (command, env, inputs,
        # outputs, slots, timeout, ids).
        _spec("run", {"attempt": check_uint}, max_payload=JOB_MAX),
        # Stop an attempt's whole process tree.
        _spec("kill", {"attempt": check_uint}),
    ]:
        table.add(spec)
    return table


def master_methods() -> MethodTable:
    """The master's methods: worker membership, the data directory, cluster views."""
    key = {"key": check_key}
    worker = {"name": check_name, "incarnation": check_uint}
    table = MethodTable()
    for spec in [
        _spec("auth", {"token": check_text}, {"client": check_text}),
        _spec("ping"),
        # A worker joins: payload = its inventory, JSON lines {key,size,sha256,version}.
        _spec(
            "register",
            {
                "name": check_name,
                "host": check_text,
                "port": check_uint,
                "slots": check_uint,
                "dsml-version": check_text,
                "protocol-version": check_uint,
            },
            {"boot": check_text, "running": check_text},
            max_payload=INVENTORY_MAX,
        ),
        _spec(
            "heartbeat",
            {
                **worker,
                "free-slots": check_uint,
                "stored-bytes": check_uint,
                "stored-files": check_uint,
                "free-disk": check_uint,
            },
        ),
        # Stores and deletes since the last report: JSON lines
        # {op: "store"|"delete", key, size, sha256, version}.
        _spec("report", worker, max_payload=INVENTORY_MAX),
        # Where to write Key (Size bytes): Workers = name=host:port,...
        _spec("place", {**key, "size": check_uint}),
        # Where Key lives: Replicas = name=host:port,... (live ones first).
        _spec("locate", key),
        # A client's upload to Workers finished: record it at once (read your writes).
        _spec(
            "commit",
            {
                **key,
                "size": check_uint,
                "sha256": check_sha256,
                "version": check_uint,
                "workers": check_names,
            },
        ),
        # A client found Worker's copy of Key corrupt.
        _spec("corrupt", {**key, "worker": check_name}),
        _spec("remove", key),
        _spec("list", None, {"prefix": check_prefix, "limit": check_uint, "after": check_key}),
        _spec("nodes"),
        # -- jobs --
        # payload = JSON {name, priority, after: [job ids], tasks: [{command, env,
        # inputs: [[key, path]], outputs: [[path, key]], slots, timeout, max_attempts}]}
        _spec("submit", None, max_payload=JOB_MAX),
        _spec("jobs", None, {"limit": check_uint}),
        _spec("status", {"job": check_text}),
        _spec("cancel", {"job": check_text}),
        # Answered when the job reaches a final state, or after Timeout seconds.
        _spec("wait", {"job": check_text}, {"timeout": check_uint}),
        # Where an attempt's logs are: Worker = name=host:port, Attempt = id.
        _spec("logs", {"job": check_text}, {"task": check_uint, "attempt": check_uint}),
        # A worker's finished attempts: JSON lines of results.
        _spec("task_result", worker, max_payload=INVENTORY_MAX),
    ]:
        table.add(spec)
    return table
