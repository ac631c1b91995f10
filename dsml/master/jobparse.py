"""A client's ``submit`` payload made a JobSpec, a bounded slice per reactor turn.

A small payload is parsed at once (:func:`job_spec_from_json`).  A big one (an explicit
``tasks`` list: 100,000 task objects are about 11 MB of JSON, which ``json.loads`` and
the spec took most of a second to go through, on the master's reactor, in one go) is
read a task at a time with :meth:`json.JSONDecoder.raw_decode`, :data:`PARSE_SLICE`
tasks per turn (:func:`job_spec_in_slices`), so heartbeats and other requests are
served in between.  Both give the same JobSpec, or the same ``bad-job`` for malformed
input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .jobs import DEFAULT_RETRY_ON, JobError, JobSpec, TaskSpec
from .jobs.slices import Slicer

#: Payloads up to this many bytes are parsed in one go (a few ms).
PARSE_AT_ONCE = 256 * 1024
#: Tasks read per reactor turn from a bigger one (a few ms each).
PARSE_SLICE = 500

_WS = re.compile(r"[ \t\n\r]*")

log = Logger()


def _task_spec(t: Any) -> TaskSpec:
    return TaskSpec(
        command=tuple(str(a) for a in t["command"]),
        env=tuple((str(k), str(v)) for k, v in dict(t.get("env", {})).items()),
        inputs=tuple((str(k), str(p)) for k, p in t.get("inputs", ())),
        outputs=tuple((str(p), str(k)) for p, k in t.get("outputs", ())),
        slots=_count(t, "slots", 1),
        timeout=None if t.get("timeout") is None else float(t["timeout"]),
        max_attempts=int(t.get("max_attempts", 3)),
        retry_on=_retry_on(t.get("retry_on")),
        mem=_count(t, "mem", 0),
        gpus=_count(t, "gpus", 0),
        result=str(t.get("result", "")),
    )


def _count(t: Any, name: str, default: int) -> Any:
    """A task's integer field (``cpus`` is ``slots`` by another name); a float, a bool,
    text or anything else as given (check_task refuses it with its name)."""
    if name == "slots" and "cpus" in t:
        if "slots" in t and t["slots"] != t["cpus"]:
            raise JobError("a task gives both cpus and slots, which differ: give one",
                           "bad-job")
        return t["cpus"]
    return t.get(name, default)


def _retry_on(value: Any) -> Any:
    """A list of causes as a tuple of strings; anything else as given (check_task
    refuses it)."""
    if value is None:
        return DEFAULT_RETRY_ON
    if isinstance(value, list):
        return tuple(str(c) for c in value)
    return value


def _job_spec(data: Any, tasks: tuple[TaskSpec, ...]) -> JobSpec:
    array = data.get("array", 0)
    if isinstance(array, bool) or not isinstance(array, int):
        raise JobError(f"array must be an integer, not {array!r}", "bad-job")
    return JobSpec(
        name=str(data.get("name", "")),
        tasks=tasks,
        priority=int(data.get("priority", 0)),
        after=tuple(str(j) for j in data.get("after", ())),
        array=array,
    )


def job_spec_from_json(data: Any) -> JobSpec:
    """A JobSpec from the JSON a client submits; JobError for anything malformed.

    ``"array": N`` with ONE task makes a compact array job (see
    :class:`~dsml.master.jobs.JobSpec`): N tasks from that template, ``{index}`` in its
    input and output keys and paths replaced by each task's index.
    """
    try:
        return _job_spec(data, tuple(_task_spec(t) for t in data["tasks"]))
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise JobError(f"malformed job: {e}", "bad-job") from None


def job_spec_from_payload(payload: bytes) -> JobSpec:
    """:func:`job_spec_from_json` of the payload's JSON, at once."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise JobError(f"job is not JSON: {e}", "bad-job") from None
    return job_spec_from_json(data)


def job_spec_in_slices(payload: bytes, slicer: Slicer) -> Deferred[JobSpec]:
    """:func:`job_spec_from_payload`, read :data:`PARSE_SLICE` tasks per turn of
    ``slicer`` when the payload is bigger than :data:`PARSE_AT_ONCE`."""
    out: Deferred[JobSpec] = Deferred()
    if len(payload) <= PARSE_AT_ONCE:
        try:
            out.callback(job_spec_from_payload(payload))
        except JobError as e:
            out.errback(e)
        return out

    log.info("a submit of {n:,} bytes: its tasks read {slice} per reactor turn",
             n=len(payload), slice=PARSE_SLICE)

    def work() -> Iterator[None]:
        try:
            spec = yield from _read(payload)
        except JobError as e:
            out.errback(e)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError,
                RecursionError) as e:
            out.errback(JobError(f"malformed job: {e}", "bad-job"))
        except Exception as e:  # never leave the request unanswered
            out.errback(e)
        else:
            out.callback(spec)

    slicer.add(work())
    return out


def _read(payload: bytes) -> Iterator[None]:
    """The job object, its ``tasks`` array an element at a time (yielding between
    slices); the other members whole (they are small). The last of a repeated member
    wins, as with ``json.loads``; anything else than one JSON object is ``bad-job``."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobError(f"job is not JSON: {e}", "bad-job") from None
    decode = json.JSONDecoder().raw_decode
    head: dict[str, Any] = {}
    tasks: list[TaskSpec] | None = None
    i = _WS.match(text, _expect(text, _WS.match(text).end(), "{")).end()
    if text[i:i + 1] == "}":
        i += 1
    else:
        while True:
            key, i = decode(text, _WS.match(text, i).end())
            if not isinstance(key, str):
                raise JobError("job is not JSON: a member name must be a string", "bad-job")
            i = _expect(text, _WS.match(text, i).end(), ":")
            i = _WS.match(text, i).end()
            if key == "tasks" and text[i:i + 1] == "[":
                tasks = []
                i = _WS.match(text, i + 1).end()
                if text[i:i + 1] == "]":
                    i += 1
                else:
                    while True:
                        task, i = decode(text, i)
                        tasks.append(_task_spec(task))
                        if len(tasks) % PARSE_SLICE == 0:
                            yield
                        i = _WS.match(text, i).end()
                        if text[i:i + 1] == "]":
                            i += 1
                            break
                        i = _WS.match(text, _expect(text, i, ",")).end()
                head["tasks"] = None
            else:
                head[key], i = decode(text, i)
                if key == "tasks":
                    tasks = None  # not an array: refused below, as json.loads + spec would
            i = _WS.match(text, i).end()
            if text[i:i + 1] == "}":
                i += 1
                break
            i = _expect(text, i, ",")
    if _WS.match(text, i).end() != len(text):
        raise JobError("job is not JSON: extra data after the object", "bad-job")
    if tasks is None:
        # No tasks array: the one-go path says exactly what is wrong.
        return job_spec_from_json(head)
    return _job_spec(head, tuple(tasks))


def _expect(text: str, i: int, char: str) -> int:
    if text[i:i + 1] != char:
        raise JobError(f"job is not JSON: expected {char!r} at character {i}", "bad-job")
    return i + 1
