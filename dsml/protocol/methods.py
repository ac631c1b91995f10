"""The method table: which headers each request method requires and how big its payload may be.

The parser consults the table as soon as a request's header block is complete, so a request
that lacks a header or names a bad key is answered with an error naming the problem, and its
payload is skipped: the handler never sees it (the seed's "Message does error handling to
make sure all parameters are included").

It also names the kinds of peer (:class:`Role`) a connection may act as; which role may
call which method is declared beside each method's handler (``dsml.net.responders``).

And it states what bounds every field a peer sends (:class:`Bound`): each header
validator's bound (:data:`VALIDATOR_BOUNDS`), and per method the bounds of free-text
headers, the payload and its JSON fields (:data:`FIELD_BOUNDS`, on each spec as
``MethodSpec.bounds``); ``tests/test_trust_fields.py`` walks every method against them.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping

import attrs

from ..errors import DsmlError
from . import limits
from .grants import GRANT_RE

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


_DIGEST = re.compile(r"[0-9a-f]{16}\Z")


def check_digest(value: str) -> str:
    """An inventory digest: 16 lowercase hex digits (dsml.protocol.inventory)."""
    if not _DIGEST.match(value):
        raise HeaderValueError("expected 16 lowercase hex digits", "bad-header")
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


def check_grant(value: str) -> str:
    """A write grant from ``place``: ``VERSION.MAC[,NAME=MAC...]`` (see
    :mod:`dsml.protocol.grants`)."""
    if not GRANT_RE.match(value):
        raise HeaderValueError("expected VERSION.MAC[,NAME=MAC...] (a grant from place)",
                               "bad-header")
    return value


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
    #: What bounds the fields a peer sends beyond the headers' validators (text headers,
    #: the payload and its JSON fields): see :data:`FIELD_BOUNDS`.
    bounds: Mapping[str, Bound] = attrs.field(factory=dict)


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
    return MethodSpec(
        name, headers, frozenset(required), max_payload, streamed, FIELD_BOUNDS.get(name, {})
    )


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
            # Version is refused (the master's to issue); Grant carries the master's.
            {
                "sha256": check_sha256,
                "forward": check_forward,
                "version": check_uint,
                "grant": check_grant,
            },
            max_payload=limits.FILE_MAX,
            streamed=True,
        ),
        _spec("file_retrieve", key),
        _spec(
            "value_upload",
            key,
            {"forward": check_forward, "version": check_uint, "grant": check_grant},
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
        # server at To, as a file_upload carrying Grant (the master's for that version).
        _spec(
            "replicate",
            {**key, "version": check_uint, "to": check_addr},
            {"grant": check_grant},
        ),
        # Re-hash the copy of Key: is it Version, with content Sha256?  A bad copy is
        # forgotten and reported (bad_copy); the answer says which (Good: 1 or 0).
        _spec("verify", {**key, "version": check_uint, "sha256": check_sha256}),
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
            {"boot": check_text, "running": check_text, "inventory-digest": check_digest,
             "free-disk": check_uint, "stored-bytes": check_uint, "mem": check_uint,
             "gpus": check_text, "fn-runtime": check_text},
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
        # Attempt: a task attempt's output (its worker writes it): refused ``fenced``
        # unless that attempt is running and declared Key as an output (issue #12).
        _spec("place", {**key, "size": check_uint}, {"attempt": check_uint}),
        # Where Key lives: Replicas = name=host:port,... (live ones first).
        _spec("locate", key),
        # A client's upload to Workers finished: record it at once (read your writes).
        # Grant is place's answer: the version recorded is the grant's.
        _spec(
            "commit",
            {
                **key,
                "size": check_uint,
                "sha256": check_sha256,
                "grant": check_grant,
                "workers": check_names,
            },
            {"version": check_uint},
        ),
        # A client found Worker's copy of Key corrupt: a hint (the worker is asked to
        # re-hash its copy; only its own bad_copy makes the master forget it).
        _spec("corrupt", {**key, "worker": check_name}),
        # A worker found its own copy of Key (Version) bad, and forgot it.
        _spec("bad_copy", {**worker, **key, "version": check_uint}),
        # The registered (live) workers' storage addresses: JSON lines {name, addr}.
        _spec("peers", worker),
        _spec("remove", key),
        _spec("list", None, {"prefix": check_prefix, "limit": check_uint, "after": check_key}),
        _spec("nodes"),
        # -- jobs --
        # payload = JSON {name, priority, after: [job ids], tasks: [{command, env,
        # inputs: [[key, path]], outputs: [[path, key]], slots, timeout, max_attempts}]}
        _spec("submit", None, max_payload=JOB_MAX),
        _spec("jobs", None, {"limit": check_uint, "before": check_text}),
        # One page of a job's tasks, from index From, at most Limit (Next: where the
        # next page starts, absent after the last).
        _spec("status", {"job": check_text}, {"from": check_uint, "limit": check_uint}),
        _spec("cancel", {"job": check_text}),
        # Answered when the job reaches a final state, or after Timeout seconds.
        _spec("wait", {"job": check_text}, {"timeout": check_uint}),
        # Where an attempt's logs are: Worker = name=host:port, Attempt = id.
        _spec("logs", {"job": check_text}, {"task": check_uint, "attempt": check_uint}),
        # A succeeded task's result as its worker reported it (payload; not-found: none).
        _spec("result", {"job": check_text, "task": check_uint}),
        # A worker's finished attempts: JSON lines of results.
        _spec("task_result", worker, max_payload=INVENTORY_MAX),
    ]:
        table.add(spec)
    return table


# -- bounds: what limits every field a peer sends (issue #10) ----------------------------


@attrs.frozen
class Bound:
    """What bounds one header or JSON field a peer sends: nothing a peer says is unbounded.

    ``kind`` is ``length``, ``range``, ``pattern``, ``count`` or ``enum``; ``rule`` says
    the bound in words; ``where`` is the dotted name of the code or constant that
    enforces it (empty: the header's own validator); ``limit`` is the number the rule
    names (equal to the constant ``where`` names, when that is a number); ``refused``
    is a value the header's validator refuses; ``values`` are an enum's values.
    ``tests/test_trust_fields.py`` holds every method of every table to these.
    """

    kind: str
    rule: str
    where: str = ""
    limit: int | None = None
    refused: str | None = None
    values: tuple[str, ...] = ()


#: The bound each header validator enforces, by the validator's name.  ``check_text``
#: is left out on purpose: it bounds a value by the framing's line alone, so every
#: ``check_text`` header states its own bound in :data:`FIELD_BOUNDS`.
VALIDATOR_BOUNDS: dict[str, Bound] = {
    "check_digest": Bound("pattern", "16 lowercase hex digits", refused="ABCDEF0123456789"),
    "check_key": Bound("length", f"1 to {limits.MAX_KEY} bytes of UTF-8, no control character",
                       "dsml.protocol.limits.MAX_KEY", limits.MAX_KEY,
                       refused="k" * (limits.MAX_KEY + 1)),
    "check_prefix": Bound("length", f"0 to {limits.MAX_KEY} bytes of UTF-8, no control "
                          "character", "dsml.protocol.limits.MAX_KEY", limits.MAX_KEY,
                          refused="k" * (limits.MAX_KEY + 1)),
    "check_sha256": Bound("pattern", "64 lowercase hex digits", refused="A" * 64),
    "check_uint": Bound("range", "0 to 10**18 - 1 (1 to 18 ASCII digits)", limit=10**18 - 1,
                        refused="1" * 19),
    "check_addr": Bound("pattern", "host:port: a host of 1 to 255 of A-Z a-z 0-9 . _ : [ ] -, "
                        "a port of 1 to 5 digits", limit=255, refused="h" * 256 + ":1"),
    "check_forward": Bound("count", f"at most {MAX_FORWARD} host:port", "dsml.protocol.methods."
                           "MAX_FORWARD", MAX_FORWARD, refused=",".join(["h:1"] * 17)),
    "check_name": Bound("pattern", limits.WORKER_NAME_RULE, refused="w" * 65),
    "check_names": Bound("pattern", f"worker names ({limits.WORKER_NAME_RULE}), as many as one "
                         f"header line holds ({limits.MAX_LINE} bytes)", "dsml.protocol.limits."
                         "MAX_LINE", limits.MAX_LINE, refused="w1,,w2"),
    "check_grant": Bound("pattern", "VERSION.MAC[,NAME=MAC...]: 1 to 18 digits, 32 lowercase "
                         "hex digits, at most 17 worker names with theirs",
                         "dsml.protocol.grants.GRANT_RE", refused="1.xyz"),
}

_LINE = f"one header line ({limits.MAX_LINE} bytes)"
_JOB = "dsml.master.jobs.model"
_ENTRY = "dsml.master.directory._entry_problem"
_INVENTORY_FIELDS = {
    "payload.key": Bound("length", f"a key: 1 to {limits.MAX_KEY} bytes", _ENTRY, limits.MAX_KEY),
    "payload.size": Bound("range", "0 to 2**63 - 1", "dsml.master.state.MAX_INT", 2**63 - 1),
    "payload.sha256": Bound("pattern", "64 lowercase hex digits", _ENTRY),
    "payload.version": Bound("range", "1 to 10**15 - 1, and never one the master did not issue",
                             "dsml.master.state.MAX_VERSION", 10**15 - 1),
}
_JOB_ID = Bound("pattern", "j and 1 to 18 digits", f"{_JOB}.parse_job_id")
_TASK_FIELDS = {
    "payload.command": Bound("count", "1 or more arguments of text without NUL, within the "
                             "payload's 64 MiB", f"{_JOB}.check_task"),
    "payload.env": Bound("pattern", "NAME=value pairs, names [A-Za-z_][A-Za-z0-9_]*, within "
                         "the payload's 64 MiB", f"{_JOB}.check_task"),
    "payload.inputs": Bound("pattern", "[key, path] pairs: a key, a path inside the task's "
                            "directory", f"{_JOB}.check_task"),
    "payload.outputs": Bound("pattern", "[path, key] pairs: a path inside the task's "
                             "directory, a key", f"{_JOB}.check_task"),
    "payload.slots": Bound("range", "1 to 1024 slots", f"{_JOB}.MAX_SLOTS", 1024),
    "payload.cpus": Bound("range", "1 to 1024: slots by another name", f"{_JOB}.MAX_SLOTS",
                          1024),
    "payload.mem": Bound("range", "0 to 2**50 bytes", f"{_JOB}.MAX_MEM", 2**50),
    "payload.gpus": Bound("range", f"0 to {limits.MAX_GPUS} GPUs", f"{_JOB}.MAX_GPUS",
                          limits.MAX_GPUS),
    "payload.timeout": Bound("range", "a positive number of seconds up to 30 days",
                             f"{_JOB}.MAX_TIMEOUT", 30 * 24 * 3600),
    "payload.result": Bound("pattern", "the path of one of the task's outputs",
                            f"{_JOB}.check_task"),
}

#: The bounds each method states beyond its headers' validators, by method name: every
#: ``check_text`` header, the payload (``payload``) and each JSON field of a JSON payload
#: (``payload.FIELD``, nested fields flattened).  :func:`_spec` puts them on the spec.
FIELD_BOUNDS: dict[str, dict[str, Bound]] = {
    "auth": {
        "token": Bound("length", f"{_LINE}; compared in constant time, never stored",
                       "dsml.protocol.limits.MAX_LINE", limits.MAX_LINE),
        "client": Bound("length", f"{_LINE}; only logged", "dsml.protocol.limits.MAX_LINE",
                        limits.MAX_LINE),
    },
    "file_upload": {"payload": Bound("length", "Length: at most 999,999,999,999 opaque bytes, "
                                     "streamed to disk", "dsml.protocol.limits.FILE_MAX",
                                     limits.FILE_MAX)},
    "value_upload": {"payload": Bound("length", "at most the server's value_max (1 MiB by "
                                      "default), opaque", "dsml.protocol.limits."
                                      "DEFAULT_VALUE_MAX", limits.DEFAULT_VALUE_MAX)},
    "task_log": {"stream": Bound("enum", "stdout or stderr", "dsml.worker.runner.TaskOrders",
                                 values=("stdout", "stderr"))},
    "run": {
        "payload": Bound("length", "a JSON object of at most 64 MiB", "dsml.protocol.methods."
                         "JOB_MAX", 64 * 1024 * 1024),
        "payload.attempt_id": Bound("range", "0 to 10**18 - 1, the Attempt header's",
                                    "dsml.worker.tasks.spec.AttemptSpec"),
        "payload.job_id": _JOB_ID,
        "payload.task_index": Bound("range", "below the job's at most 100,000 tasks",
                                    f"{_JOB}.MAX_TASKS", 100_000),
        **_TASK_FIELDS,
        "payload.owner": Bound("pattern", limits.WORKER_NAME_RULE, "dsml.net.access.principal"),
        "payload.versions": Bound("count", "one per input: the inputs' count",
                                  "dsml.worker.tasks.spec.AttemptSpec"),
        "payload.version": _INVENTORY_FIELDS["payload.version"],
        "payload.sha256": _INVENTORY_FIELDS["payload.sha256"],
    },
    "register": {
        "host": Bound("length", "1 to 253 printable characters",
                      "dsml.master.membership.MAX_HOST", 253),
        "dsml-version": Bound("pattern", "exactly the master's own version, else "
                              "version-mismatch",
                              "dsml.master.membership.Membership.check_versions"),
        "boot": Bound("length", f"{_LINE}; not kept", "dsml.protocol.limits.MAX_LINE",
                      limits.MAX_LINE),
        "running": Bound("count", f"attempt ids in {_LINE}; digits only are taken",
                         "dsml.protocol.limits.MAX_LINE", limits.MAX_LINE),
        "gpus": Bound("count", f"at most {limits.MAX_GPUS} distinct GPU ids, comma-separated,"
                      " each 1 to 128 of A-Z a-z 0-9 _ . : -", "dsml.protocol.limits.MAX_GPUS",
                      limits.MAX_GPUS),
        "fn-runtime": Bound("pattern", "up to 128 of A-Z a-z 0-9 _ . + = - and spaces, "
                            "else bad-header", "dsml.protocol.limits.FN_RUNTIME"),
        "payload": Bound("length", "JSON lines, at most 64 MiB", "dsml.protocol.methods."
                         "INVENTORY_MAX", 64 * 1024 * 1024),
        **_INVENTORY_FIELDS,
    },
    "report": {
        "payload": Bound("length", "JSON lines, at most 64 MiB", "dsml.protocol.methods."
                         "INVENTORY_MAX", 64 * 1024 * 1024),
        "payload.op": Bound("enum", "store or delete", "dsml.master.registry.WorkerRegistry."
                            "report", values=("store", "delete")),
        **_INVENTORY_FIELDS,
    },
    "task_result": {
        "payload": Bound("length", "JSON lines, at most 64 MiB", "dsml.protocol.methods."
                         "INVENTORY_MAX", 64 * 1024 * 1024),
        "payload.attempt_id": Bound("range", "an attempt of this worker's incarnation, else "
                                    "refused", "dsml.master.jobwire.finished_report"),
        "payload.exit_code": Bound("range", "an integer or null",
                                   "dsml.master.jobwire.finished_report"),
        "payload.signal": Bound("range", "an integer or null",
                                "dsml.master.jobwire.finished_report"),
        "payload.duration": Bound("range", "a number", "dsml.master.jobwire.finished_report"),
        "payload.peak_rss": Bound("range", "an integer", "dsml.master.jobwire.finished_report"),
        "payload.reason": Bound("length", "cut to 1,024 characters", f"{_JOB}.MAX_REASON", 1024),
        "payload.stderr_tail": Bound("length", "cut to 2,048 characters",
                                     f"{_JOB}.MAX_STDERR_TAIL", 2048),
        "payload.result": Bound("length", "base64 of at most 64 KiB, kept only for a task "
                                "that declared a result, else dropped",
                                f"{_JOB}.MAX_INLINE_RESULT", 64 * 1024),
    },
    "submit": {
        "payload": Bound("length", "a JSON object of at most 64 MiB",
                         "dsml.protocol.methods.JOB_MAX", 64 * 1024 * 1024),
        "payload.name": Bound("length", "at most 1,024 characters, no control character",
                              f"{_JOB}.MAX_NAME", 1024),
        "payload.priority": Bound("range", "-1000 to 1000", f"{_JOB}.MAX_PRIORITY", 1000),
        "payload.after": Bound("count", "at most 1,000 job ids", f"{_JOB}.MAX_AFTER", 1000),
        "payload.tasks": Bound("count", "1 to 100,000 tasks", f"{_JOB}.MAX_TASKS", 100_000),
        **_TASK_FIELDS,
        "payload.max_attempts": Bound("range", "1 to 100", f"{_JOB}.MAX_ATTEMPTS", 100),
        "payload.retry_on": Bound("enum", "a list of causes", f"{_JOB}.CAUSES",
                                  values=("exit", "signal", "timeout", "out-of-memory", "lost",
                                          "staging", "spawn", "output")),
        "payload.array": Bound("range", "0 to 100,000 tasks from one template",
                               f"{_JOB}.MAX_TASKS", 100_000),
    },
    "jobs": {"before": _JOB_ID},
    "status": {"job": _JOB_ID},
    "cancel": {"job": _JOB_ID},
    "wait": {"job": _JOB_ID, "timeout": Bound("range", "at most 600 seconds are waited",
                                              "dsml.master.jobrouter.WAIT_MAX", 600)},
    "logs": {"job": _JOB_ID},
    "result": {"job": _JOB_ID, "task": Bound("range", "a task index; not-found beyond the "
                                             "job's", f"{_JOB}.MAX_TASKS", 100_000)},
}
