"""A submitted job's handle (:class:`Job`) and the error its ``wait()`` raises when the
job did not succeed (:class:`JobFailed`).  :meth:`ClusterClient.submit
<dsml.client.cluster.ClusterClient.submit>` returns the handle."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..errors import DsmlError

if TYPE_CHECKING:
    from .cluster import ClusterClient

__all__ = ["SHOWN_FAILURES", "Job", "JobFailed", "locality_of"]


class JobFailed(DsmlError):
    """A job that ended without succeeding (failed or cancelled), from :meth:`Job.wait`.

    ``status`` is its final status (every task); ``failures`` maps each failed task's
    index to its reason (the cause and the last line of its stderr: a Python task's
    exception), and the message names the first :data:`SHOWN_FAILURES` of them.
    """

    code = "job-failed"

    def __init__(self, message: str, code: str | None = None,
                 status: dict[str, Any] | None = None) -> None:
        super().__init__(message, code)
        self.status: dict[str, Any] = status or {}
        self.failures = {t["index"]: _failure(t) for t in self.status.get("tasks", ())
                         if t["state"] in ("failed", "cancelled")}

    @classmethod
    def of(cls, status: dict[str, Any]) -> JobFailed:
        """The error for a job that ended ``status["state"]``."""
        failures = [(t["index"], _failure(t)) for t in status.get("tasks", ())
                    if t["state"] in ("failed", "cancelled")]
        shown = [f"task {i}: {why}" for i, why in failures[:SHOWN_FAILURES]]
        if len(failures) > len(shown):
            shown.append(f"and {len(failures) - len(shown)} more")
        reason = f" ({status['reason']})" if status.get("reason") else ""
        return cls(f"job {status['id']} {status['state']}{reason}: " + "; ".join(shown),
                   status=status)


#: Failed tasks a :class:`JobFailed` message names (all are in its ``failures``).
SHOWN_FAILURES = 5


def _failure(task: dict[str, Any]) -> str:
    """A failed task's reason: its last attempt's, with the cause and the last line of
    its stderr ("exit 1 [exit]: ValueError: bad lr")."""
    attempts = task.get("attempts") or ()
    if not attempts:
        return task.get("reason") or task["state"]
    a = attempts[-1]
    why = a.get("reason") or task.get("reason") or a["state"]
    if a.get("cause"):
        why += f" [{a['cause']}]"
    lines = [ln for ln in (a.get("stderr_tail") or "").splitlines() if ln.strip()]
    return f"{why}: {lines[-1].strip()}" if lines else why


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

    def wait(self, timeout: float | None = None, *, check: bool = True) -> dict[str, Any]:
        """Block until the job ends (or ``timeout`` seconds pass: then its status as it
        is); returns its final status.  A job that failed or was cancelled raises
        :class:`JobFailed` naming its failed tasks and their reasons (``check=False``:
        returns its status instead)."""
        status = self.client.wait(self.id, timeout)
        if check and status["state"] in ("failed", "cancelled"):
            raise JobFailed.of(status)
        return status

    def locality(self, status: dict[str, Any] | None = None) -> dict[str, Any]:
        """The scheduler's data-locality report (``status``: one already fetched):
        ``{"local": 12, "remote": 0, "fraction": 1.0}``, the attempts the master started
        on a worker holding every input of their task and those it started elsewhere
        (tasks without inputs count in neither; ``fraction`` None when none counts)."""
        if status is None:
            # One task's page is enough: the report is the job's.
            _, body = self.client.master.call("status", {"Job": self.id, "Limit": 1})
            status = json.loads(body)
        return locality_of(status)

    def logs(self, task: int = 0, attempt: int | None = None, stream: str = "stdout") -> bytes:
        """A task's output (the last attempt by default)."""
        return self.client.logs(self.id, task, attempt, stream)

    def cancel(self) -> int:
        """Stop every running attempt; nothing more of it runs."""
        return self.client.cancel(self.id)

    def outputs(self, status: dict[str, Any] | None = None) -> dict[int, list[str]]:
        """{task index: the keys its task declared as outputs}, from the master's
        status (``status``: one already fetched, e.g. :meth:`wait`'s).  A key is
        stored once its task succeeded; read them with ``client.get``/``download``,
        or every one under a prefix with ``client.download_prefix``."""
        if status is None:
            status = self.status()
        return {t["index"]: list(t.get("outputs", ())) for t in status.get("tasks", ())}


def locality_of(status: dict[str, Any]) -> dict[str, Any]:
    """A job status's data-locality report with its fraction (see :meth:`Job.locality`;
    a master that does not report it: 0 and 0)."""
    got = status.get("locality") or {}
    local, remote = int(got.get("local", 0)), int(got.get("remote", 0))
    counted = local + remote
    return {"local": local, "remote": remote,
            "fraction": local / counted if counted else None}
