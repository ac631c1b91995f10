"""The JSON shapes of jobs on the wire, as the master writes and reads them: a job's
status (``status``, ``wait``, ``jobs``), a ``run`` order's payload, and a worker's
``task_result`` line.  Plain functions of values; :mod:`dsml.master.jobrouter` moves
them."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from .jobs import MAX_INLINE_RESULT, Assignment, FinishedReport, JobView

__all__ = ["assignment_json", "finished_report", "job_json"]


def job_json(
    view: JobView, queued: Mapping[int, str] | None = None, *, private: bool = True
) -> dict[str, Any]:
    """A job view as JSON (``dsml status``, ``wait`` and ``jobs``).

    ``private``: the reader may see what is the job's owner's own (the owner, an admin:
    :func:`dsml.net.access.may_act_on`); for anyone else each attempt's ``stderr_tail``
    (the end of its log) is "".  No view holds a task's environment.

    Each task's ``waiting_for`` says why it waits: the view's sentence for a ``waiting``
    task, ``queued[index]`` for a ``queued`` one (the router's, from the workers: see
    :meth:`JobRouter.queued_reasons`), else "".  Each attempt's ``number`` is its place
    among its task's attempts, from 1; ``id`` stays the master's attempt id.
    """
    queued = queued or {}
    return {
        "id": view.id,
        "name": view.name,
        "owner": view.owner,
        "state": view.state,
        "priority": view.priority,
        "after": list(view.after),
        "created": view.created,
        "started": view.started,
        "finished": view.finished,
        "reason": view.reason,
        "counts": view.counts,
        # The scheduler's data locality: attempts started on a worker holding every
        # input of their task, and elsewhere (tasks without inputs count in neither).
        "locality": {"local": view.local, "remote": view.remote},
        "done": view.done,
        "total": view.total,
        # The index the next page of tasks starts at (None: these are the last).
        "next": view.next,
        "tasks": [
            {
                "index": t.index,
                "state": t.state,
                "reason": t.reason,
                "waiting_for": t.waiting_for or queued.get(t.index, ""),
                "outputs": list(t.outputs),
                "attempts": [
                    {
                        "id": a.id,
                        "number": number,
                        "worker": a.worker,
                        "state": a.state,
                        "started": a.started,
                        "ended": a.ended,
                        "exit_code": a.exit_code,
                        "signal": a.signal,
                        "duration": a.duration,
                        "peak_rss": a.peak_rss,
                        "local": a.local,
                        "reason": a.reason,
                        "cause": a.cause,
                        "stderr_tail": a.stderr_tail if private else "",
                    }
                    for number, a in enumerate(t.attempts, 1)
                ],
            }
            for t in view.tasks
        ],
    }


def assignment_json(
    a: Assignment, versions: Mapping[str, tuple[int, str]] | None = None
) -> bytes:
    """The ``run`` order's payload.

    ``versions`` gives the current ``(version, sha256)`` of the inputs the directory
    knows (sent as ``"versions": {key: {"version", "sha256"}}``): a worker that holds
    exactly that copy stages it from its own store, without a request.
    """
    s = a.spec
    order: dict[str, Any] = {
        "attempt_id": a.attempt_id,
        "job_id": a.job_id,
        "task_index": a.task_index,
        "command": list(s.command),
        "env": [list(p) for p in s.env],
        "inputs": [list(p) for p in s.inputs],
        "outputs": [list(p) for p in s.outputs],
        "slots": s.slots,
        "mem": s.mem,
        "gpus": s.gpus,
        "timeout": s.timeout,
        "owner": a.owner,
    }
    if s.result:
        order["result"] = s.result
    if versions:
        order["versions"] = {
            key: {"version": version, "sha256": sha256}
            for key, (version, sha256) in versions.items()
        }
    return json.dumps(order).encode()


def finished_report(r: dict[str, Any]) -> FinishedReport:
    """A worker's JSON result as a FinishedReport."""
    return FinishedReport(
        int(r["attempt_id"]), r.get("exit_code"), r.get("signal"),
        float(r.get("duration", 0.0)), int(r.get("peak_rss", 0)), str(r.get("reason", "")),
        _tail(r),
        _result(r),
    )


def _result(r: dict[str, Any]) -> bytes:
    """A result's ``result`` (base64 of at most MAX_INLINE_RESULT bytes), b"" if it
    has none, or one that is not that: then the task's key holds none either, and its
    reader learns the result is missing (a worker can spoil only what it runs)."""
    text = r.get("result", "")
    if not isinstance(text, str) or not text or len(text) > 4 * (MAX_INLINE_RESULT // 3 + 1):
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return b""


def _tail(r: dict[str, Any]) -> str:
    """A result's ``stderr_tail`` if it is text ("" otherwise; the manager caps it)."""
    tail = r.get("stderr_tail", "")
    return tail if isinstance(tail, str) else ""
