"""The job manager: scheduling, retries, fencing, cancel, dependencies, group commit, restart.

Logic tests on a ``task.Clock`` over a real SQLite file in ``tmp_path``.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from dsml.master.jobs import (
    ATTEMPT_BLOCK,
    DEFAULT_RETRY_ON,
    JOBS_FILE,
    LOCALITY_WINDOW,
    MAX_STDERR_TAIL,
    RETRY_DELAY,
    SCHEMA_VERSION,
    Assignment,
    FinishedReport,
    JobError,
    JobManager,
    JobSpec,
    JobView,
    QueuePlace,
    TaskSpec,
)
from dsml.master.jobs.journal import IDLE_AFTER
from dsml.master.jobs.queue import data_local
from dsml.master.jobwire import assignment_json, job_json
from dsml.net.access import TOKEN_OWNER

T = TypeVar("T")

DELAY = 0.002  # the default commit delay


def result(d: Deferred[T]) -> T:
    """The result of a Deferred that must have fired (re-raising a failure)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def fired(d: Deferred[Any]) -> bool:
    """Whether a Deferred has fired (without consuming its result)."""
    return d.called


#: What most tests here give their tasks: a retry for every cause, so that they exercise
#: the retry machinery itself; the default policy (DEFAULT_RETRY_ON) has its own tests.
RETRY_ALL = ("exit", "signal", "timeout", "lost", "staging")


def task(*args: str, **kw: Any) -> TaskSpec:
    """A task running ``args`` (``true`` by default), retried for every cause unless
    ``retry_on`` says otherwise."""
    kw.setdefault("retry_on", RETRY_ALL)
    return TaskSpec(command=args or ("true",), **kw)


def job(
    *tasks: TaskSpec, name: str = "job", priority: int = 0, after: tuple[str, ...] = ()
) -> JobSpec:
    """A job of ``tasks`` (one default task when none is given)."""
    return JobSpec(name=name, tasks=tasks or (task(),), priority=priority, after=after)


class Threads:
    """A stand-in for deferToThreadPool: the work waits until the test runs it."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, fn: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((fn, d))
        return d

    def run(self) -> int:
        """Run the queued work in order (and what it queues); how many ran."""
        n = 0
        while self.queue:
            fn, d = self.queue.pop(0)
            n += 1
            try:
                value = fn()
            except Exception:
                d.errback()
            else:
                d.callback(value)
        return n


class Harness:
    """A JobManager on a Clock over ``path``; helpers that commit as they go."""

    def __init__(
        self,
        path: Path,
        clock: Clock | None = None,
        sync: str = "NORMAL",
        threads: Threads | None = None,
    ) -> None:
        self.path = path
        self.clock = clock if clock is not None else Clock()
        self.sync = sync
        self.threads = threads
        self.jm = JobManager(path, self.clock, synchronous=sync, run_in_thread=threads)

    def tick(self) -> None:
        """Let the group commit run."""
        self.clock.advance(DELAY)

    def submit(self, spec: JobSpec) -> str:
        """Submit and commit; the job id."""
        d = self.jm.submit(spec)
        self.tick()
        return result(d)

    def assign(
        self,
        worker: str = "w1",
        free: int = 1,
        inc: int = 1,
        holds: Callable[[str], bool] | None = None,
    ) -> list[Assignment]:
        """Ask for work for ``worker``."""
        if holds is None:
            return self.jm.next_assignments(worker, inc, free)
        return self.jm.next_assignments(worker, inc, free, holds)

    def finish(
        self,
        a: Assignment | int,
        worker: str = "w1",
        inc: int = 1,
        code: int | None = 0,
        reason: str = "",
        signal: int | None = None,
        stderr_tail: str = "",
    ) -> bool:
        """Report an attempt's end and commit; whether it was accepted."""
        aid = a.attempt_id if isinstance(a, Assignment) else a
        d = self.jm.finished(
            aid,
            worker,
            inc,
            exit_code=code,
            signal=signal,
            duration=1.5,
            peak_rss=1024,
            reason=reason,
            stderr_tail=stderr_tail,
        )
        self.tick()
        return result(d)

    def reopen(self, flush: bool = True) -> JobManager:
        """Close (or crash, with ``flush=False``) and open the state again."""
        self.jm.close(flush=flush)
        self.jm = JobManager(
            self.path, self.clock, synchronous=self.sync, run_in_thread=self.threads
        )
        return self.jm

    def order(self, worker: str = "w1", free: int = 1000) -> list[tuple[str, int]]:
        """(job id, task index) of what ``worker`` is given, in order."""
        return [(a.job_id, a.task_index) for a in self.assign(worker, free)]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    """A fresh harness."""
    return Harness(tmp_path)


def attempt_states(view: JobView, index: int = 0) -> list[str]:
    """The states of a task's attempts, oldest first."""
    return [a.state for a in view.tasks[index].attempts]


# -- scheduling ----------------------------------------------------------------------------


def test_priority_then_fifo(h: Harness) -> None:
    """Higher priority first; within a priority, submit order, then task index."""
    j1 = h.submit(job(task(), task(), task()))
    j2 = h.submit(job(task(), task(), priority=5))
    j3 = h.submit(job(task()))
    j4 = h.submit(job(task(), priority=-3))
    assert h.order() == [
        (j2, 0),
        (j2, 1),
        (j1, 0),
        (j1, 1),
        (j1, 2),
        (j3, 0),
        (j4, 0),
    ]
    assert h.assign() == []


def test_retried_task_keeps_its_place(h: Harness) -> None:
    """A failed attempt's task goes back to its place in the queue, not to the end."""
    j1 = h.submit(job(task(), task(), task()))
    (a,) = h.assign()
    assert h.finish(a, code=1)
    assert h.order() == [(j1, 0), (j1, 1), (j1, 2)]


def test_free_slots_never_exceeded(h: Harness) -> None:
    """A worker gets tasks whose slots add up to at most its free slots."""
    h.submit(job(*(task(slots=s) for s in (2, 1, 3, 1, 2, 4, 1))))
    given = h.assign(free=5)
    assert sum(a.spec.slots for a in given) <= 5
    # 2 + 1 leave 2 free: the 3 is skipped, a 1 fits, the 2 and the 4 do not, a 1 does.
    assert [a.spec.slots for a in given] == [2, 1, 1, 1]
    assert [a.task_index for a in given] == [0, 1, 3, 6]


def test_wide_task_not_given_to_narrow_worker(h: Harness) -> None:
    """A 2-slot task is not given to a worker with 1 free slot; a 1-slot task behind it is."""
    j1 = h.submit(job(task(slots=2), task(slots=1)))
    assert h.order(free=1) == [(j1, 1)]
    assert h.assign(free=1) == []
    assert h.order(free=2) == [(j1, 0)]


def test_running_attempts_and_slots(h: Harness) -> None:
    """running_attempts and room_of tell what a worker's running attempts occupy."""
    h.submit(job(task(slots=2), task(slots=3)))
    a, b = h.assign("w1", free=5)
    assert h.jm.running_attempts("w1") == [a.attempt_id, b.attempt_id]
    assert [h.jm.room_of(x).cpus for x in h.jm.running_attempts("w1")] == [2, 3]
    assert h.finish(a)
    assert h.jm.room_of(a.attempt_id).cpus == 0
    assert h.jm.running_attempts("w2") == []


def test_no_hoarding(h: Harness) -> None:
    """Each worker gets only what fits its free slots; the rest stays for the others."""
    h.submit(job(*(task() for _ in range(10))))
    assert len(h.assign("a", free=2)) == 2
    assert len(h.assign("b", free=3)) == 3
    assert len(h.assign("c", free=0)) == 0
    assert h.jm.queued == 5
    assert len(h.assign("c", free=100)) == 5


def test_locality_preferred_within_a_priority(h: Harness) -> None:
    """A worker holding a task's inputs gets it before an earlier non-local one."""
    j1 = h.submit(
        job(
            task(inputs=(("data/0", "in.csv"),)),
            task(inputs=(("data/1", "in.csv"),)),
            task(inputs=(("data/2", "in.csv"), ("data/3", "b.csv"))),
        )
    )
    held = {"data/1", "data/2"}
    given = h.assign(free=1, holds=held.__contains__)
    assert [(a.job_id, a.task_index) for a in given] == [(j1, 1)]
    # Task 2 needs data/3 too: not local; FIFO then.
    given = h.assign(free=2, holds=held.__contains__)
    assert [a.task_index for a in given] == [0, 2]


def test_each_attempt_records_its_locality_and_the_job_counts_them(h: Harness) -> None:
    """The scheduler's locality report: an attempt started on a worker holding every
    input of its task is local, else remote; a task without inputs is neither.  Kept
    through a retry, a restart and the job's eviction to disk."""
    j1 = h.submit(job(task(inputs=(("k0", "in"),)), task(inputs=(("k1", "in"),)), task()))
    held = {"k0"}
    given = h.assign("w1", free=3, holds=held.__contains__)
    assert [a.task_index for a in given] == [0, 1, 2]
    assert h.finish(given[1], code=1)  # task 1 fails once: its retry goes to a holder
    (again,) = h.assign("w2", free=1, holds=lambda key: key == "k1")
    assert again.task_index == 1
    view = h.jm.job(j1)
    assert [[a.local for a in t.attempts] for t in view.tasks] == [
        [True], [False, True], [None]]
    assert (view.local, view.remote) == (2, 1)
    assert job_json(view)["locality"] == {"local": 2, "remote": 1}
    assert [a["local"] for a in job_json(view)["tasks"][1]["attempts"]] == [False, True]
    h.tick()
    h.jm.close()
    h.jm = JobManager(h.path, h.clock, synchronous=h.sync)  # a restart: loaded back
    view = h.jm.job(j1)
    assert (view.local, view.remote) == (2, 1)
    assert [a.local for a in view.tasks[1].attempts] == [False, True]
    for a in (given[0], again, given[2]):
        assert h.finish(a, worker="w2" if a is again else "w1")
    h.tick()
    stored = h.jm.job(j1)  # final: evicted, read back from the file
    assert stored.state == "succeeded"
    assert (stored.local, stored.remote) == (2, 1)
    assert [[a.local for a in t.attempts] for t in stored.tasks] == [
        [True], [False, True], [None]]


def test_a_task_is_local_where_most_of_its_input_bytes_are(h: Harness) -> None:
    """A map over a chunk also reads the function's small pickle, stored elsewhere: the
    task is local on the chunk's holder (most of its bytes), not on the pickle's."""
    sizes = {"fn": 2_000, "chunk/0": 64 << 20, "chunk/1": 64 << 20}
    j1 = h.submit(job(task(inputs=(("fn", "fn.pkl"), ("chunk/0", "c"))),
                      task(inputs=(("fn", "fn.pkl"), ("chunk/1", "c")))))
    on = {"w1": {"fn", "chunk/0"}, "w2": {"chunk/1"}}

    def assign(w: str) -> list[Assignment]:
        return h.jm.next_assignments(w, 1, 1, on[w].__contains__, size=sizes.__getitem__)

    assert [a.task_index for a in assign("w2")] == [1]  # not task 0: w2 lacks its chunk
    assert [a.task_index for a in assign("w1")] == [0]
    view = h.jm.job(j1)
    assert [t.attempts[0].local for t in view.tasks] == [True, True]
    assert (view.local, view.remote) == (2, 0)
    for a, n in ((("a", 10), ("b", 10)), False), ((("a", 11), ("b", 10)), True):
        sized = dict(a)
        assert data_local([(k, "") for k in sized], {"a"}.__contains__, sized.__getitem__) is n
    assert data_local([("a", ""), ("b", "")], {"a"}.__contains__) is False  # no sizes: all
    assert data_local([], {"a"}.__contains__) is False


def test_locality_never_beats_priority(h: Harness) -> None:
    """A higher-priority task goes before a local one of lower priority."""
    j1 = h.submit(job(task(inputs=(("k", "in"),))))
    j2 = h.submit(job(task(), priority=1))
    given = h.assign(free=1, holds=lambda key: key == "k")
    assert [(a.job_id, a.task_index) for a in given] == [(j2, 0)]
    given = h.assign(free=1, holds=lambda key: key == "k")
    assert [(a.job_id, a.task_index) for a in given] == [(j1, 0)]


def test_locality_window_is_bounded(h: Harness) -> None:
    """A local task far down the queue does not jump the whole queue: no starvation."""
    n = LOCALITY_WINDOW + 10
    tasks = [task(inputs=((f"k{i}", "in"),)) for i in range(n)]
    j1 = h.submit(job(*tasks))
    far = n - 1
    given = h.assign(free=1, holds=lambda key: key == f"k{far}")
    assert [(a.job_id, a.task_index) for a in given] == [(j1, 0)]
    near = 5
    given = h.assign(free=1, holds=lambda key: key == f"k{near}")
    assert [a.task_index for a in given] == [near]


# -- dependencies --------------------------------------------------------------------------


def test_after_waits_until_dependency_succeeds(h: Harness) -> None:
    """A job's tasks wait until the job it comes after has succeeded."""
    j1 = h.submit(job(task(), task()))
    j2 = h.submit(job(task(), after=(j1,)))
    assert h.jm.job(j2).tasks[0].state == "waiting"
    given = h.assign(free=10)
    assert [a.job_id for a in given] == [j1, j1]
    assert h.finish(given[0])
    assert h.assign(free=10) == []
    assert h.finish(given[1])
    assert h.jm.job(j1).state == "succeeded"
    assert h.order(free=10) == [(j2, 0)]


def test_after_dependency_fails(h: Harness) -> None:
    """A job after a failed job fails, naming the dependency, and its tasks never run."""
    j1 = h.submit(job(task(max_attempts=1)))
    j2 = h.submit(job(task(), task(), after=(j1,)))
    j3 = h.submit(job(task(), after=(j2,)))
    (a,) = h.assign(free=10)
    waits = [h.jm.wait_for(j) for j in (j1, j2, j3)]
    assert h.finish(a, code=2)
    v1, v2, v3 = (result(d) for d in waits)
    assert v1.state == "failed"
    assert v1.reason == "task 0 failed: exit code 2"
    assert v2.state == "failed"
    assert v2.reason == "dependency j1 failed"
    assert [t.state for t in v2.tasks] == ["cancelled", "cancelled"]
    assert all(not t.attempts for t in v2.tasks)
    assert v3.state == "failed"
    assert v3.reason == f"dependency {j2} failed"
    assert h.assign(free=10) == []


def test_after_dependency_cancelled(h: Harness) -> None:
    """A job after a cancelled job fails with a reason naming it."""
    j1 = h.submit(job())
    j2 = h.submit(job(after=(j1,)))
    h.jm.cancel(j1)
    h.tick()
    view = h.jm.job(j2)
    assert (view.state, view.reason) == ("failed", f"dependency {j1} cancelled")
    assert h.assign(free=10) == []


def test_after_already_final_at_submit(h: Harness) -> None:
    """After a job that already succeeded: queued at once; already failed: failed at once."""
    j1 = h.submit(job())
    assert h.finish(h.assign()[0])
    j2 = h.submit(job(task(max_attempts=1)))
    assert h.finish(h.assign()[0], code=1)
    ok = h.submit(job(after=(j1,)))
    bad = h.submit(job(after=(j1, j2)))
    assert h.jm.job(bad).state == "failed"
    assert h.jm.job(bad).reason == f"dependency {j2} failed"
    assert h.order() == [(ok, 0)]


def test_after_survives_restart(h: Harness) -> None:
    """Waiting tasks stay waiting across a restart and are released when the dependency ends."""
    j1 = h.submit(job())
    j2 = h.submit(job(after=(j1,)))
    (a,) = h.assign()
    h.tick()
    h.reopen()
    assert h.jm.job(j2).tasks[0].state == "waiting"
    assert h.finish(a)
    assert h.order() == [(j2, 0)]


# -- attempts: retries, timeouts, lost workers ---------------------------------------------


def test_retries_up_to_max_attempts(h: Harness) -> None:
    """A task failing 3 times with max_attempts 3 fails with 3 attempts, and runs no more."""
    j1 = h.submit(job(task(max_attempts=3)))
    for n in (1, 2, 3):
        (a,) = h.assign()
        assert a.number == n
        assert h.finish(a, code=1, reason="boom" if n == 3 else "")
    assert h.assign() == []
    view = h.jm.job(j1)
    assert view.state == "failed"
    assert attempt_states(view) == ["failed"] * 3
    assert view.tasks[0].state == "failed"
    assert view.tasks[0].reason == "boom"
    assert [a.exit_code for a in view.tasks[0].attempts] == [1, 1, 1]


@pytest.mark.parametrize(
    ("how", "retried", "cause"),
    [
        ({"code": 1, "reason": "exit 1"}, False, "exit"),  # a Python exception, say
        ({"code": None, "signal": 9}, False, "signal"),
        ({"code": None, "reason": "command not found: trian.py"}, False, "spawn"),
        ({"code": None, "reason": "output 'model.pt' missing"}, False, "output"),
        ({"code": None, "reason": "input 'data/x' failed: timed out"}, True, "staging"),
        ({"code": None, "reason": "output 'model.pt' upload failed: timed out"}, True,
         "staging"),
        ({"code": None, "reason": "timeout after 5 s"}, False, "timeout"),
    ],
)
def test_by_default_only_a_cause_a_retry_can_mend_is_retried(
    h: Harness, how: dict[str, Any], retried: bool, cause: str
) -> None:
    """Default retry_on (lost, staging): an attempt that failed for its own command's
    sake ends the task at once, with its cause in the view; a transfer gets another try."""
    j1 = h.submit(job(task(retry_on=DEFAULT_RETRY_ON)))
    (a,) = h.assign()
    assert h.finish(a, **how)
    view = h.jm.job(j1)
    assert view.tasks[0].attempts[0].cause == cause
    assert view.tasks[0].state == ("queued" if retried else "failed")
    assert (h.assign() != []) is retried


def test_a_lost_worker_is_retried_by_default_and_retry_on_exit_retries_a_command(
    h: Harness,
) -> None:
    lost = h.submit(job(task(retry_on=DEFAULT_RETRY_ON)))
    flaky = h.submit(job(task(retry_on=("exit",))))
    given = h.assign(free=2)
    assert h.jm.worker_lost("w1", 1) == [a.attempt_id for a in given]
    h.tick()
    assert h.jm.job(lost).tasks[0].attempts[0].cause == "lost"
    assert h.jm.job(lost).tasks[0].state == "queued"  # lost: retried by default
    assert h.jm.job(flaky).tasks[0].state == "failed"  # lost, but only exit is retried
    again = h.submit(job(task(retry_on=("exit",))))
    (a,) = [x for x in h.assign(worker="w2", inc=1, free=3) if x.job_id == again]
    assert h.finish(a, worker="w2", code=1)
    assert h.jm.job(again).tasks[0].state == "queued"


def test_retry_on_is_checked_and_kept(h: Harness) -> None:
    from dsml.master.jobs import JobError
    from dsml.master.jobs.model import spec_from_json, spec_json

    for bad in (("exit", "typo"), ("cancelled",), "exit"):
        with pytest.raises(JobError, match="retry_on must be a list of causes"):
            h.jm.submit(job(task(retry_on=bad)))
    t = task(retry_on=("exit", "timeout"))
    assert spec_from_json(spec_json(t)) == t
    assert "retry_on" not in spec_json(task(retry_on=DEFAULT_RETRY_ON))


def test_success_after_failure(h: Harness) -> None:
    """A retried task that then succeeds ends succeeded with one succeeded attempt."""
    j1 = h.submit(job())
    assert h.finish(h.assign()[0], signal=9, code=None)
    assert h.finish(h.assign()[0])
    view = h.jm.job(j1)
    assert view.state == "succeeded"
    assert attempt_states(view) == ["failed", "succeeded"]
    assert view.tasks[0].attempts[0].reason == "killed by signal 9"


def test_timeout_counts_as_an_attempt(h: Harness) -> None:
    """An attempt the worker killed at its timeout is 'timeout' and counts."""
    j1 = h.submit(job(task(timeout=5, max_attempts=2)))
    for _ in range(2):
        assert h.finish(h.assign()[0], code=None, signal=15, reason="timeout")
    view = h.jm.job(j1)
    assert attempt_states(view) == ["timeout", "timeout"]
    assert (view.state, view.tasks[0].reason) == ("failed", "timeout")


def test_lost_attempts_count_and_requeue(h: Harness) -> None:
    """A dead worker's attempts are lost, count against max_attempts, and requeue."""
    j1 = h.submit(job(task(max_attempts=2), task(max_attempts=2)))
    given = h.assign("w1", free=2)
    assert h.jm.worker_lost("w1", 1) == [a.attempt_id for a in given]
    assert h.jm.job(j1).counts["queued"] == 2
    given = h.assign("w2", free=2)
    assert h.finish(given[0], "w2")
    assert h.jm.worker_lost("w2", 1) == [given[1].attempt_id]
    h.tick()
    view = h.jm.job(j1)
    assert view.state == "failed"
    assert attempt_states(view, 0) == ["lost", "succeeded"]
    assert attempt_states(view, 1) == ["lost", "lost"]
    assert view.tasks[1].reason == "lost: worker died"
    assert h.assign("w3", free=10) == []


def test_worker_lost_spares_newer_incarnation(h: Harness) -> None:
    """Losing incarnation 1 of a worker does not touch attempts given to incarnation 2."""
    h.submit(job(task(), task()))
    (old,) = h.assign("w1", inc=1)
    (new,) = h.assign("w1", inc=2)
    assert h.jm.worker_lost("w1", 1) == [old.attempt_id]
    assert h.jm.running_attempts("w1") == [new.attempt_id]
    assert h.finish(new, "w1", inc=2)


# -- fencing -------------------------------------------------------------------------------


def test_stale_results_refused(h: Harness) -> None:
    """Wrong worker, old incarnation, lost or finished attempts, second finishes: refused."""
    j1 = h.submit(job(task(max_attempts=5)))
    (a1,) = h.assign("w1", inc=2)
    assert not h.finish(a1, "w2", inc=2)  # wrong worker
    assert not h.finish(a1, "w1", inc=1)  # old incarnation
    assert not h.finish(a1, "w1", inc=3)  # not yet born: still not the one it was given to
    h.jm.worker_lost("w1", 2)
    assert not h.finish(a1, "w1", inc=2)  # already lost
    (a2,) = h.assign("w2")
    assert not h.finish(a1.attempt_id + 1000, "w2")  # never given
    assert h.finish(a2, "w2", code=0)
    assert not h.finish(a2, "w2", code=0)  # second finish
    assert not h.finish(a2, "w2", code=1)  # a contradicting one
    view = h.jm.job(j1)
    assert attempt_states(view) == ["lost", "succeeded"]
    assert view.state == "succeeded"


def test_refused_finish_changes_nothing(h: Harness) -> None:
    """A refused result fires False at once and commits nothing."""
    h.submit(job())
    (a,) = h.assign()
    h.tick()
    commits = h.jm.commits
    d = h.jm.finished(a.attempt_id, "w9", 1, exit_code=0, signal=None, duration=1, peak_rss=1)
    assert result(d) is False
    h.tick()
    assert h.jm.commits == commits


# -- cancel --------------------------------------------------------------------------------


def test_cancel_running_and_queued(h: Harness) -> None:
    """Cancel returns the running attempts to kill; nothing more runs; late results refused."""
    j1 = h.submit(job(task(), task(), task(), task()))
    j2 = h.submit(job())
    a = h.assign("w1", free=1)
    b = h.assign("w2", free=1)
    d = h.jm.cancel(j1)
    assert not fired(d)
    h.tick()
    assert sorted(result(d)) == [("w1", a[0].attempt_id), ("w2", b[0].attempt_id)]
    assert h.order(free=10) == [(j2, 0)]
    assert not h.finish(a[0], "w1")
    view = h.jm.job(j1)
    assert view.state == "cancelled"
    assert [t.state for t in view.tasks] == ["cancelled"] * 4
    assert attempt_states(view, 0) == ["cancelled"]
    assert result(h.jm.cancel(j1)) == []  # already final: nothing to do
    with pytest.raises(JobError) as e:
        h.jm.cancel("j99")
    assert e.value.code == "not-found"


def test_cancel_keeps_finished_tasks(h: Harness) -> None:
    """Tasks that already succeeded stay succeeded when their job is cancelled."""
    j1 = h.submit(job(task(), task()))
    assert h.finish(h.assign()[0])
    h.jm.cancel(j1)
    h.tick()
    assert [t.state for t in h.jm.job(j1).tasks] == ["succeeded", "cancelled"]


def test_cancel_many_queued_compacts_queue(h: Harness) -> None:
    """Cancelling big queued jobs leaves no dead weight: later jobs are scheduled at once."""
    big = [h.submit(job(*(task() for _ in range(1500)))) for _ in range(2)]
    j3 = h.submit(job(task(), priority=-1))
    for j in big:
        h.jm.cancel(j)
    h.tick()
    assert h.jm.queued == 1
    assert len(h.jm._queue) <= 1  # compacted
    assert h.order() == [(j3, 0)]


# -- group commit and durability -----------------------------------------------------------


def copy_state(path: Path, to: Path) -> sqlite3.Connection:
    """Open a copy of the state file and its WAL: what is on disk right now."""
    to.mkdir()
    for name in (JOBS_FILE, JOBS_FILE + "-wal"):
        if (path / name).exists():
            shutil.copy(path / name, to / name)
    return sqlite3.connect(to / JOBS_FILE)


def test_submit_fires_only_after_commit(tmp_path: Path) -> None:
    """submit's Deferred fires after the job's rows are committed to the files on disk."""
    (tmp_path / "state").mkdir()
    h = Harness(tmp_path / "state", sync="FULL")
    seen: list[tuple[int, int]] = []

    def check(job_id: str) -> str:
        db = copy_state(tmp_path / "state", tmp_path / f"copy-{job_id}")
        seq = int(job_id[1:])
        seen.append(
            (
                db.execute("SELECT count(*) FROM jobs WHERE seq = ?", (seq,)).fetchone()[0],
                db.execute("SELECT count(*) FROM tasks WHERE job = ?", (seq,)).fetchone()[0],
            )
        )
        db.close()
        return job_id

    d = h.jm.submit(job(task(), task(), task()))
    d.addCallback(check)
    assert not fired(d)
    h.clock.advance(0)  # an idle file: committed on the next turn, then acknowledged
    assert result(d) == "j1"
    assert seen == [(1, 3)]
    # A commit just ended: the next change waits commit_delay for others to join it.
    d = h.jm.submit(job(task()))
    d.addCallback(check)
    h.clock.advance(DELAY / 2)
    assert not fired(d)
    h.clock.advance(DELAY / 2)
    assert result(d) == "j2"
    assert seen == [(1, 3), (1, 1)]
    h.clock.advance(IDLE_AFTER)  # idle again: the next turn
    d = h.jm.submit(job(task()))
    assert not fired(d)
    h.clock.advance(0)
    assert result(d) == "j3"


def test_burst_is_one_transaction(h: Harness) -> None:
    """A burst of submits, assignments and results goes out in one commit."""
    h.tick()
    before = h.jm.commits
    ds = [h.jm.submit(job(task(), task())) for _ in range(50)]
    assert not any(fired(d) for d in ds)
    h.tick()
    assert h.jm.commits == before + 1
    assert [result(d) for d in ds] == [f"j{i}" for i in range(1, 51)]
    given = h.assign(free=100)
    finishes = [
        h.jm.finished(a.attempt_id, "w1", 1, exit_code=0, signal=None, duration=1, peak_rss=1)
        for a in given
    ]
    assert not any(fired(d) for d in finishes)
    h.tick()
    assert h.jm.commits == before + 2
    assert all(result(d) for d in finishes)
    assert all(v.state == "succeeded" for v in h.jm.jobs())


def test_failed_commit_is_retried_and_acknowledges_nothing(h: Harness) -> None:
    """If a commit fails (disk full), nothing is acknowledged; it is retried later."""
    real = h.jm._journal.db

    class Full:
        """A connection whose next write batch fails like a full disk."""

        fail = True

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def executemany(self, sql: str, rows: Any) -> Any:
            if self.fail:
                self.fail = False
                raise sqlite3.OperationalError("database or disk is full")
            return real.executemany(sql, rows)

    h.jm._journal.db = Full()  # type: ignore[assignment]
    d = h.jm.submit(job())
    h.tick()
    assert not fired(d)
    h.clock.advance(RETRY_DELAY)
    assert result(d) == "j1"
    h.jm._journal.db = real
    h.reopen()
    assert h.jm.job("j1").total == 1


def test_commit_in_a_thread_leaves_the_reactor_free(tmp_path: Path) -> None:
    """With run_in_thread, a batch commits in a thread: changes made meanwhile are taken
    at once in memory, and acknowledged by the next batch, which starts commit_delay
    after the first ends; nothing is acknowledged before its own commit."""
    threads = Threads()
    h = Harness(tmp_path, threads=threads)
    first = h.jm.submit(job(name="a"))
    h.tick()
    assert len(threads.queue) == 1 and not fired(first)
    second = h.jm.submit(job(name="b"))  # while the first batch is in its thread
    assert [a.job_id for a in h.assign(free=5)] == ["j1", "j2"]  # memory is not held up
    h.tick()
    assert len(threads.queue) == 1  # one batch at a time
    done = h.jm.committed()
    assert not fired(done)
    fn, d = threads.queue.pop(0)
    fn()
    assert not fired(first)  # committed, but acknowledged on the reactor thread
    d.callback(None)
    assert result(first) == "j1" and not fired(second) and not fired(done)
    assert threads.queue == []  # the next batch starts commit_delay later
    h.tick()
    assert len(threads.queue) == 1
    threads.run()
    assert result(second) == "j2" and fired(done)
    h.reopen()
    assert [v.name for v in h.jm.jobs()] == ["b", "a"]
    assert all(v.tasks[0].attempts for v in (h.jm.job("j1"), h.jm.job("j2")))


def test_failed_commit_in_a_thread_is_retried(tmp_path: Path) -> None:
    """A batch whose commit fails in its thread is dirty again, with changes made
    meanwhile; the retry acknowledges both."""
    threads = Threads()
    h = Harness(tmp_path, threads=threads)
    real = h.jm._journal.db
    calls = []

    class Full:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def executemany(self, sql: str, rows: Any) -> Any:
            calls.append(sql)
            if len(calls) == 1:
                raise sqlite3.OperationalError("database or disk is full")
            return real.executemany(sql, rows)

    h.jm._journal.db = Full()  # type: ignore[assignment]
    first = h.jm.submit(job(name="a"))
    h.tick()
    second = h.jm.submit(job(name="b"))
    threads.run()
    assert not fired(first) and not fired(second)
    h.clock.advance(RETRY_DELAY)
    threads.run()
    assert (result(first), result(second)) == ("j1", "j2")
    h.jm._journal.db = real
    h.reopen()
    assert [v.name for v in h.jm.jobs()] == ["b", "a"]


def test_close_writes_the_batch_its_thread_has_not_run(tmp_path: Path) -> None:
    """Stopping the master while a batch waits for its thread writes it before closing."""
    threads = Threads()
    h = Harness(tmp_path, threads=threads)
    d = h.jm.submit(job(name="a"))
    h.tick()
    assert len(threads.queue) == 1
    h.jm.close()
    threads.run()  # the thread's turn comes after: it writes nothing more
    assert result(d) == "j1"
    h.threads = None
    h.reopen()
    assert [v.name for v in h.jm.jobs()] == ["a"]


def test_wait_for(h: Harness) -> None:
    """wait_for fires once the final state is committed; at once for a finished job."""
    j1 = h.submit(job())
    d = h.jm.wait_for(j1)
    a = h.assign()[0]
    h.jm.finished(a.attempt_id, "w1", 1, exit_code=0, signal=None, duration=1, peak_rss=1)
    assert not fired(d)
    h.tick()
    assert result(d).state == "succeeded"
    assert result(h.jm.wait_for(j1)).state == "succeeded"
    with pytest.raises(JobError):
        h.jm.wait_for("j42")


def test_views_from_disk_match_memory(h: Harness) -> None:
    """A finished job read back from SQLite looks exactly as it did in memory."""
    j1 = h.submit(job(task(), task(max_attempts=1), name="sweep", priority=3))
    a, b = h.assign(free=2)
    h.jm.finished(a.attempt_id, "w1", 1, exit_code=0, signal=None, duration=2.5, peak_rss=7)
    h.jm.finished(b.attempt_id, "w1", 1, exit_code=3, signal=None, duration=1, peak_rss=9)
    in_memory = h.jm.job(j1)
    h.tick()
    assert 1 not in h.jm._jobs  # evicted once final and committed
    assert h.jm.job(j1) == in_memory
    assert in_memory.counts == {
        "waiting": 0,
        "queued": 0,
        "running": 0,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 0,
    }
    assert (in_memory.done, in_memory.total) == (2, 2)
    listed = h.jm.jobs()
    assert [v.id for v in listed] == [j1]
    assert listed[0].tasks == ()
    with pytest.raises(JobError) as e:
        h.jm.job("nope")
    assert e.value.code == "not-found"


def test_jobs_lists_newest_first(h: Harness) -> None:
    """jobs() lists live and finished jobs, newest first, up to the limit."""
    ids = [h.submit(job()) for _ in range(5)]
    for a in h.assign(free=2):
        assert h.finish(a)
    assert [v.id for v in h.jm.jobs()] == ids[::-1]
    assert [v.id for v in h.jm.jobs(limit=3)] == ids[:1:-1]
    assert [v.state for v in h.jm.jobs()] == ["queued"] * 3 + ["succeeded"] * 2


# -- restart -------------------------------------------------------------------------------


def test_restart_mid_run(h: Harness) -> None:
    """Queued order, running attempts, attempt counts and results survive a restart."""
    j1 = h.submit(job(task(), task(), task(), task(max_attempts=2)))
    j2 = h.submit(job(task(), priority=1))
    j3 = h.submit(job(task()))
    done, running, failing = h.assign(free=3)  # j2/0 and j1/0, j1/1
    assert h.finish(done)
    assert h.finish(failing, code=1)  # j1/1 failed once, requeued
    before = {j: h.jm.job(j) for j in (j1, j2, j3)}
    h.reopen()
    assert {j: h.jm.job(j) for j in (j1, j2, j3)} == before
    assert h.jm.running_attempts("w1") == [running.attempt_id]
    # Queue order: j1/1 (retried, at its place), j1/2, j1/3, j3/0.
    given = h.assign(free=10)
    assert [(a.job_id, a.task_index) for a in given] == [(j1, 1), (j1, 2), (j1, 3), (j3, 0)]
    assert given[0].number == 2
    assert min(a.attempt_id for a in given) > failing.attempt_id
    assert h.finish(running)  # the attempt that ran across the restart commits
    j4 = h.submit(job())
    assert int(j4[1:]) > int(j3[1:])


def test_crash_loses_only_unacknowledged(h: Harness) -> None:
    """A crash drops the uncommitted batch; attempt ids handed out are never reused."""
    j1 = h.submit(job(task(), task()))
    (a,) = h.assign()  # not yet committed
    h.reopen(flush=False)
    view = h.jm.job(j1)
    assert [t.state for t in view.tasks] == ["queued", "queued"]
    assert view.tasks[0].attempts == ()
    (b, c) = h.assign(free=2)
    assert b.task_index == 0
    assert b.attempt_id > a.attempt_id
    # The worker that got the forgotten attempt is told to kill it.
    assert h.jm.reconcile("w1", 2, [a.attempt_id], []) == [a.attempt_id]


def test_attempt_ids_reserved_in_blocks(h: Harness) -> None:
    """Handing out more attempts than a block reserves more; ids keep increasing."""
    h.submit(job(*(task() for _ in range(ATTEMPT_BLOCK + 10))))
    ids = [a.attempt_id for a in h.assign(free=ATTEMPT_BLOCK + 10)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    h.reopen(flush=False)
    h.submit(job())
    (a,) = h.assign()
    assert a.attempt_id > ids[-1]


def test_second_manager_refused(h: Harness) -> None:
    """A second manager on the same state file fails at once."""
    with pytest.raises(JobError, match="in use"):
        JobManager(h.path, Clock())


def test_reconcile_after_restart(h: Harness) -> None:
    """Reported running kept and re-bound; reported finished committed; missing lost; kills."""
    j1 = h.submit(job(task(), task(), task()))
    j2 = h.submit(job())
    keep, report, missing = h.assign("w1", inc=1, free=3)
    (cancelled,) = h.assign("w1", inc=1, free=1)
    h.tick()
    h.reopen()
    h.jm.cancel(j2)
    h.tick()
    kill = h.jm.reconcile(
        "w1",
        2,
        running=[keep.attempt_id, cancelled.attempt_id, 999_999],
        finished=[FinishedReport(report.attempt_id, 0, None, 3.0, 10, "")],
    )
    assert kill == [cancelled.attempt_id, 999_999]
    assert h.jm.running_attempts("w1") == [keep.attempt_id]
    assert not h.finish(keep, "w1", inc=1)  # re-bound: the old incarnation is fenced
    h.tick()
    view = h.jm.job(j1)
    assert [t.state for t in view.tasks] == ["running", "succeeded", "queued"]
    assert view.tasks[0].attempts[0].incarnation == 2
    assert attempt_states(view, 2) == ["lost"]
    assert h.finish(keep, "w1", inc=2)


def test_reconcile_finished_fenced_by_worker_name(h: Harness) -> None:
    """A finished report for an attempt given to another worker is ignored."""
    j1 = h.submit(job())
    (a,) = h.assign("w1")
    h.jm.reconcile("w2", 1, [], [FinishedReport(a.attempt_id, 0, None, 1.0, 1)])
    assert h.jm.job(j1).tasks[0].state == "running"


# -- what status says: stderr tails, attempt numbers, why a task waits ----------------------


def tails(view: JobView, index: int = 0) -> list[str]:
    """The stderr tails of a task's attempts, oldest first."""
    return [a.stderr_tail for a in view.tasks[index].attempts]


def test_failed_attempts_keep_a_capped_stderr_tail_across_restarts(h: Harness) -> None:
    """A failed attempt keeps the stderr tail its worker sent, cut to its last 2,048
    characters with control characters but newline and tab replaced (a worker is not
    trusted); a successful attempt keeps none.  The tails survive a restart of a live job,
    its eviction to disk once final, and another restart."""
    j1 = h.submit(job(task(max_attempts=3)))
    sent = "x" * 3000 + "\x1b[31mred\r\n\tdone\n"
    assert h.finish(h.assign()[0], code=3, stderr_tail=sent)
    kept = ("x" * 3000 + "\ufffd[31mred\ufffd\n\tdone\n")[-MAX_STDERR_TAIL:]
    assert len(kept) == MAX_STDERR_TAIL
    assert h.finish(h.assign()[0], code=None, reason="timeout after 2 s", stderr_tail="slow\n")
    assert tails(h.jm.job(j1)) == [kept, "slow\n"]
    before = h.jm.job(j1)
    h.reopen()
    assert h.jm.job(j1) == before  # a live job, loaded back with its attempts
    assert h.finish(h.assign()[0], stderr_tail="not kept\n")
    assert 1 not in h.jm._jobs  # final and committed: read from disk from now on
    assert tails(h.jm.job(j1)) == [kept, "slow\n", ""]
    h.reopen()
    assert tails(h.jm.job(j1)) == [kept, "slow\n", ""]
    assert job_json(h.jm.job(j1))["tasks"][0]["attempts"][0]["stderr_tail"] == kept


def test_a_result_reported_at_reregistration_keeps_its_stderr_tail(h: Harness) -> None:
    """A result a worker reports when it registers again (reconcile) keeps its tail."""
    j1 = h.submit(job(task(max_attempts=1)))
    (a,) = h.assign()
    h.reopen()
    h.jm.reconcile("w1", 2, [], [FinishedReport(a.attempt_id, 1, None, 2.0, 5, "", "bad\n")])
    h.tick()
    view = h.jm.job(j1)
    assert view.state == "failed" and tails(view) == ["bad\n"]


def test_text_sqlite_cannot_store_does_not_wedge_the_commits(h: Harness) -> None:
    """A worker's reason or tail with a lone surrogate (JSON's ``\\ud800`` escape) is
    stored with it replaced: stored as is, it failed every later group commit."""
    j1 = h.submit(job(task(max_attempts=1)))
    assert h.finish(h.assign()[0], code=1, reason="odd \ud800", stderr_tail="tail \udfff\n")
    j2 = h.submit(job())  # the commits go on
    h.reopen()
    view = h.jm.job(j1)
    assert view.tasks[0].attempts[0].reason == "odd ?"
    assert tails(view) == ["tail ?\n"]
    assert h.jm.job(j2).state == "queued"


#: The tables of a version-1 state file, as that version created them.
SCHEMA_1 = (
    "CREATE TABLE meta(name TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "CREATE TABLE jobs(seq INTEGER PRIMARY KEY, name TEXT NOT NULL,"
    " priority INTEGER NOT NULL, after TEXT NOT NULL, state TEXT NOT NULL,"
    " created REAL NOT NULL, started REAL, finished REAL, reason TEXT NOT NULL,"
    " ntasks INTEGER NOT NULL, counts TEXT NOT NULL)",
    "CREATE INDEX jobs_state ON jobs(state)",
    "CREATE TABLE tasks(job INTEGER NOT NULL, idx INTEGER NOT NULL,"
    " spec TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL,"
    " PRIMARY KEY(job, idx)) WITHOUT ROWID",
    "CREATE TABLE attempts(id INTEGER PRIMARY KEY, job INTEGER NOT NULL,"
    " idx INTEGER NOT NULL, worker TEXT NOT NULL, incarnation INTEGER NOT NULL,"
    " state TEXT NOT NULL, started REAL NOT NULL, ended REAL, exit_code INTEGER,"
    " signal INTEGER, duration REAL, peak_rss INTEGER, reason TEXT NOT NULL)",
    "CREATE INDEX attempts_job ON attempts(job, id)",
)


def _counts(**n: int) -> str:
    states = ("waiting", "queued", "running", "succeeded", "failed", "cancelled")
    return json.dumps({s: n.get(s, 0) for s in states})


def test_a_schema_1_state_file_is_migrated_in_place(tmp_path: Path) -> None:
    """A state file written by schema version 1 (no stderr tails) opens: its final and
    live jobs read back as they were (tails empty, owners unknown), it is at the current
    version afterwards (both migrations ran), and a tail recorded then survives a restart."""
    path = tmp_path / JOBS_FILE
    db = sqlite3.connect(path)
    for statement in SCHEMA_1:
        db.execute(statement)
    db.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("schema", 1), ("next_job", 3), ("attempt_reserved", 10_000)],
    )
    db.executemany(
        "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (1, "old", 0, "[]", "failed", 1.0, 2.0, 3.0, "task 0 failed: exit 2", 1,
             _counts(failed=1)),
            (2, "live", 0, "[]", "running", 4.0, 5.0, None, "", 1, _counts(running=1)),
        ],
    )
    db.executemany(
        "INSERT INTO tasks VALUES (?, ?, ?, ?, ?)",
        [
            (1, 0, '{"command":["false"],"max_attempts":1}', "failed", "exit 2"),
            (2, 0, '{"command":["true"],"max_attempts":1}', "running", ""),
        ],
    )
    db.executemany(
        "INSERT INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (1, 1, 0, "w1", 1, "failed", 2.0, 3.0, 2, None, 1.0, 100, "exit 2"),
            (2, 2, 0, "w1", 1, "running", 5.0, None, None, None, None, None, ""),
        ],
    )
    db.commit()
    db.close()

    h = Harness(path)
    old = h.jm.job("j1")
    assert (old.name, old.state, old.reason) == ("old", "failed", "task 0 failed: exit 2")
    (attempt,) = old.tasks[0].attempts
    assert (attempt.id, attempt.exit_code, attempt.reason, attempt.stderr_tail) == (
        1, 2, "exit 2", "",
    )
    assert h.jm.job("j2").tasks[0].state == "running"
    assert h.jm.running_attempts("w1") == [2]
    assert h.finish(2, code=1, stderr_tail="boom\n")
    h.jm.close()

    db = sqlite3.connect(path)
    try:
        (schema,) = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        columns = [row[1] for row in db.execute("PRAGMA table_info(attempts)")]
    finally:
        db.close()
    assert schema == SCHEMA_VERSION == 4
    assert columns[-2:] == ["stderr_tail", "local"]
    assert attempt.local is None  # stored before locality was recorded: unknown
    assert old.owner == ""
    h.jm = JobManager(path, h.clock, synchronous=h.sync)
    assert tails(h.jm.job("j2")) == ["boom\n"]
    assert tails(h.jm.job("j1")) == [""]
    assert h.submit(job()) == "j3"


def test_attempts_are_numbered_within_their_task(h: Harness) -> None:
    """In the status JSON each attempt has ``number``, its place among its task's
    attempts from 1, beside ``id``, the master's attempt id; the same once read back
    from disk."""
    j1 = h.submit(job(task(), task()))
    first, other = h.assign(free=2)
    assert h.finish(first, code=1)
    (second,) = h.assign()
    assert h.finish(second, code=1) and h.finish(other)
    (third,) = h.assign()
    assert third.number == 3

    def numbered(view: JobView) -> list[list[tuple[int, int]]]:
        return [[(a["number"], a["id"]) for a in t["attempts"]] for t in job_json(view)["tasks"]]

    ids = [first.attempt_id, second.attempt_id, third.attempt_id]
    assert ids != [1, 2, 3]  # the other task's attempt took an id in between
    expected = [list(zip((1, 2, 3), ids, strict=True)), [(1, other.attempt_id)]]
    assert numbered(h.jm.job(j1)) == expected
    assert h.finish(third)
    assert 1 not in h.jm._jobs
    assert numbered(h.jm.job(j1)) == expected


def test_waiting_tasks_say_which_jobs_they_wait_for(h: Harness) -> None:
    """A waiting task's ``waiting_for`` names every job it still waits for ("jobs j1, j2
    to succeed", then "job j2 to succeed"), also after a restart; tasks in any other
    state say nothing (the manager does not know the workers: queued ones are the
    router's to explain)."""
    j1 = h.submit(job())
    j2 = h.submit(job())
    j3 = h.submit(job(task(), task(), after=(j2, j1)))
    view = h.jm.job(j3)
    assert [t.waiting_for for t in view.tasks] == [f"jobs {j1}, {j2} to succeed"] * 2
    assert [t["waiting_for"] for t in job_json(view)["tasks"]] == [
        f"jobs {j1}, {j2} to succeed"
    ] * 2
    assert h.jm.job(j1).tasks[0].waiting_for == ""  # queued
    a1, a2 = h.assign(free=2)
    assert h.finish(a1)
    assert h.jm.job(j3).tasks[1].waiting_for == f"job {j2} to succeed"
    h.reopen()
    assert h.jm.job(j3).tasks[0].waiting_for == f"job {j2} to succeed"
    assert h.jm.job(j2).tasks[0].waiting_for == ""  # running
    assert h.finish(a2)
    assert [(t.state, t.waiting_for) for t in h.jm.job(j3).tasks] == [("queued", "")] * 2


def test_queue_places_count_the_tasks_ahead(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """queue_places gives each queued task of a job its slots and how many queued tasks
    come before it in the queue order (priority, submit order, index); nothing for a job
    with no queued task; no count (None) when there are too many live jobs to walk."""
    low = h.submit(job(task(), task(), task()))
    assert h.order(free=1) == [(low, 0)]
    high = h.submit(job(task(slots=2), priority=5))
    later = h.submit(job(task(), task()))
    assert h.jm.queue_places(low) == {1: QueuePlace(1, 1), 2: QueuePlace(1, 2)}
    assert h.jm.queue_places(high) == {0: QueuePlace(2, 0)}
    assert h.jm.queue_places(later) == {0: QueuePlace(1, 3), 1: QueuePlace(1, 4)}
    assert h.jm.queue_places("j99") == {}
    monkeypatch.setattr("dsml.master.jobs.queue.MAX_JOBS_COUNTED", 2)
    assert h.jm.queue_places(later) == {0: QueuePlace(1, None), 1: QueuePlace(1, None)}


# -- bad input -----------------------------------------------------------------------------

BAD_JOBS: list[tuple[str, Callable[[], JobSpec], str]] = [
    ("empty command", lambda: job(TaskSpec(command=())), "command is empty"),
    ("empty program", lambda: job(TaskSpec(command=("",))), "program name is empty"),
    ("NUL in argument", lambda: job(task("echo", "a\x00b")), "NUL"),
    ("no tasks", lambda: JobSpec("x", ()), "at least one task"),
    ("zero slots", lambda: job(task(slots=0)), "slots"),
    ("too many slots", lambda: job(task(slots=1025)), "slots"),
    ("zero timeout", lambda: job(task(timeout=0)), "timeout"),
    ("negative timeout", lambda: job(task(timeout=-1.0)), "timeout"),
    ("NaN timeout", lambda: job(task(timeout=float("nan"))), "timeout"),
    ("timeout over 30 days", lambda: job(task(timeout=30 * 86400 + 1)), "timeout"),
    ("zero attempts", lambda: job(task(max_attempts=0)), "max_attempts"),
    ("too many attempts", lambda: job(task(max_attempts=101)), "max_attempts"),
    ("priority too high", lambda: job(priority=1001), "priority"),
    ("priority too low", lambda: job(priority=-1001), "priority"),
    ("absolute input path", lambda: job(task(inputs=(("k", "/etc/passwd"),))), "absolute"),
    ("dotdot input path", lambda: job(task(inputs=(("k", "a/../../x"),))), "'..'"),
    ("absolute output path", lambda: job(task(outputs=(("/tmp/x", "k"),))), "absolute"),
    ("dotdot output path", lambda: job(task(outputs=(("..", "k"),))), "'..'"),
    ("empty path", lambda: job(task(inputs=(("k", ""),))), "empty"),
    ("bad input key", lambda: job(task(inputs=(("a\nb", "x"),))), "control"),
    ("empty output key", lambda: job(task(outputs=(("x", ""),))), "empty"),
    ("long key", lambda: job(task(outputs=(("x", "k" * 5000),))), "longer"),
    ("bad env name", lambda: job(task(env=(("1X", "v"),))), "environment name"),
    ("env name with =", lambda: job(task(env=(("A=B", "v"),))), "environment name"),
    ("duplicate env", lambda: job(task(env=(("A", "1"), ("A", "2")))), "twice"),
    ("env not pairs", lambda: job(task(env=(("A",),))), "pairs"),
    ("name with newline", lambda: job(name="a\nb"), "name"),
    ("bool slots", lambda: job(task(slots=True)), "slots"),
]


@pytest.mark.parametrize(("what", "make", "words"), BAD_JOBS, ids=[b[0] for b in BAD_JOBS])
def test_bad_job_refused(h: Harness, what: str, make: Callable[[], JobSpec], words: str) -> None:
    """Each validation rule: a clear bad-job JobError, and nothing is stored."""
    with pytest.raises(JobError) as e:
        h.jm.submit(make())
    assert e.value.code == "bad-job"
    assert words in e.value.message, e.value.message
    h.tick()
    assert h.jm.jobs() == []
    assert h.submit(job()) == "j1"


def test_bad_task_named_by_index(h: Harness) -> None:
    """The error names the offending task of an array job."""
    with pytest.raises(JobError, match="task 2: slots"):
        h.jm.submit(job(task(), task(), task(slots=0)))


def test_too_many_tasks(h: Harness) -> None:
    """More than 100,000 tasks is refused."""
    t = task()
    with pytest.raises(JobError, match="at most 100000 tasks") as e:
        h.jm.submit(JobSpec("big", (t,) * 100_001))
    assert e.value.code == "bad-job"


def test_unknown_after_is_not_found(h: Harness) -> None:
    """An unknown or malformed ``after`` job id is not-found, and nothing is stored."""
    h.submit(job())
    for bad in ("j2", "j0", "x1", "j01", ""):
        with pytest.raises(JobError) as e:
            h.jm.submit(job(after=(bad,)))
        assert e.value.code == "not-found"
    h.tick()
    assert [v.id for v in h.jm.jobs()] == ["j1"]


def test_lists_from_json_become_tuples() -> None:
    """Specs built from decoded JSON (lists) compare equal to ones built from tuples."""
    a = TaskSpec(command=["a", "b"], env=[["X", "1"]], inputs=[["k", "p"]])  # type: ignore[arg-type]
    assert a == TaskSpec(command=("a", "b"), env=(("X", "1"),), inputs=(("k", "p"),))


# -- a property over random interleavings --------------------------------------------------

WORKERS = ("w0", "w1", "w2")

jobs_strategy = st.lists(
    st.tuples(
        st.lists(
            st.tuples(st.integers(1, 3), st.integers(1, 2)),  # max_attempts, slots
            min_size=1,
            max_size=4,
        ),
        st.integers(-1, 1),  # priority
        st.sets(st.integers(0, 3), max_size=2),  # after: indexes of earlier jobs
    ),
    min_size=1,
    max_size=4,
)

#: Step kinds, repeated to weight them: (kind, a number to pick with, a flag).
KINDS = ("assign",) * 3 + ("finish",) * 3 + ("stale", "lose", "cancel", "tick", "tick", "restart")

steps_strategy = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 99), st.booleans()), min_size=10, max_size=60
)


class Sim:
    """Workers as the master sees them from outside: what each one runs, what it reported."""

    def __init__(self, path: Path) -> None:
        self.h = Harness(path, sync="OFF")
        self.inc = dict.fromkeys(WORKERS, 1)
        self.running: dict[str, set[int]] = {w: set() for w in WORKERS}
        #: Results reported but not yet acknowledged (re-reported after a master restart).
        self.unacked: dict[str, dict[int, FinishedReport]] = {w: {} for w in WORKERS}
        self.given: list[tuple[int, str]] = []
        self.job_ids: list[str] = []

    @property
    def jm(self) -> JobManager:
        return self.h.jm

    def assign(self, w: str, free: int) -> None:
        for a in self.h.assign(w, free=free, inc=self.inc[w]):
            self.running[w].add(a.attempt_id)
            self.given.append((a.attempt_id, w))

    def finish(self, w: str, aid: int, ok: bool) -> None:
        self.running[w].discard(aid)
        rep = FinishedReport(aid, 0 if ok else 1, None, 1.0, 1, "")
        self.unacked[w][aid] = rep
        d = self.jm.finished(
            aid, w, self.inc[w], exit_code=rep.exit_code, signal=None, duration=1.0, peak_rss=1
        )
        d.addCallback(lambda _, w=w, aid=aid: self.unacked[w].pop(aid, None))

    def kill(self, pairs: list[tuple[str, int]]) -> None:
        for w, aid in pairs:
            self.running[w].discard(aid)

    def restart(self, crash: bool) -> None:
        self.h.reopen(flush=not crash)
        for w in WORKERS:
            self.inc[w] += 1
            kill = self.jm.reconcile(
                w, self.inc[w], sorted(self.running[w]), list(self.unacked[w].values())
            )
            self.running[w] -= set(kill)
        self.h.tick()
        for w in WORKERS:
            self.unacked[w].clear()

    def step(self, op: tuple[str, int, bool]) -> None:
        kind, n, flag = op
        if kind == "assign":
            self.assign(WORKERS[n % len(WORKERS)], 1 + n % 3)
        elif kind == "finish":
            mine = sorted((aid, w) for w in WORKERS for aid in self.running[w])
            if mine:
                aid, w = mine[n % len(mine)]
                self.finish(w, aid, flag)
        elif kind == "stale" and self.given:
            aid, w = self.given[n % len(self.given)]
            other = "w9" if flag else w
            d = self.jm.finished(
                aid, other, self.inc[w] - 1, exit_code=0, signal=None, duration=1, peak_rss=1
            )
            assert result(d) is False
        elif kind == "lose":
            w = WORKERS[n % len(WORKERS)]
            self.jm.worker_lost(w, self.inc[w])
            self.running[w].clear()
            self.unacked[w].clear()
            self.inc[w] += 1
        elif kind == "cancel" and self.job_ids:
            d = self.jm.cancel(self.job_ids[n % len(self.job_ids)])
            d.addCallback(self.kill)
        elif kind == "tick":
            self.h.tick()
        elif kind == "restart":
            self.restart(crash=flag)

    def views(self) -> list[JobView]:
        return [self.jm.job(j) for j in self.job_ids]

    def check(self) -> None:
        """Invariants that hold after every step."""
        for w in WORKERS:
            assert set(self.jm.running_attempts(w)) <= self.running[w]
        specs = self.specs
        for view in self.views():
            for t in view.tasks:
                states = [a.state for a in t.attempts]
                assert states.count("running") <= 1
                assert (t.state == "running") == (states.count("running") == 1)
                assert states.count("succeeded") <= 1
                assert (t.state == "succeeded") == (states.count("succeeded") == 1)
                assert len(states) <= specs[view.id][t.index].max_attempts
            if view.state in ("succeeded", "failed", "cancelled"):
                assert all(t.state in ("succeeded", "failed", "cancelled") for t in view.tasks)

    specs: dict[str, tuple[TaskSpec, ...]]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(jobs=jobs_strategy, steps=steps_strategy)
def test_property_random_interleavings(
    jobs: list[tuple[list[tuple[int, int]], int, set[int]]], steps: list[tuple[str, int, bool]]
) -> None:
    """Under any interleaving of assignments, results, lost workers, cancels and restarts,
    every task ends in exactly one final state with at most max_attempts attempts, never two
    running at once, and a succeeded task has exactly one succeeded attempt.
    """
    with tempfile.TemporaryDirectory() as d:
        sim = Sim(Path(d))
        sim.specs = {}
        for tasks, prio, after in jobs:
            specs = tuple(task(max_attempts=m, slots=s) for m, s in tasks)
            deps = tuple(sim.job_ids[i] for i in sorted(after) if i < len(sim.job_ids))
            job_id = sim.h.submit(JobSpec("p", specs, priority=prio, after=deps))
            sim.job_ids.append(job_id)
            sim.specs[job_id] = specs
        for op in steps:
            sim.step(op)
            sim.check()
        # Drain: the workers run everything that is left, successfully.
        for _ in range(100):
            if all(v.state in ("succeeded", "failed", "cancelled") for v in sim.views()):
                break
            for w in WORKERS:
                for aid in sorted(sim.running[w]):
                    sim.finish(w, aid, True)
                sim.assign(w, 3)
            sim.h.tick()
            sim.check()
        views = sim.views()
        for view in views:
            assert view.state in ("succeeded", "failed", "cancelled"), view
            for t in view.tasks:
                assert t.state in ("succeeded", "failed", "cancelled")
                states = [a.state for a in t.attempts]
                assert "running" not in states
                if t.state == "failed":
                    assert len(states) == sim.specs[view.id][t.index].max_attempts
            if view.state == "succeeded":
                assert all(t.state == "succeeded" for t in view.tasks)
        # What is on disk is what was in memory.
        sim.h.reopen()
        assert sim.views() == views
        sim.h.jm.close()


# -- owners ------------------------------------------------------------------------------


def test_a_job_records_its_owner(tmp_path: Path) -> None:
    """The owner given to submit is in the job's view (and the job list's), goes with
    each assignment, and survives a restart, live or final; the default is the token
    principal."""
    h = Harness(tmp_path / JOBS_FILE)
    d = h.jm.submit(job(name="mine"), owner="alice")
    h.tick()
    assert result(d) == "j1"
    assert h.submit(job(name="default")) == "j2"
    assert h.jm.job("j1").owner == "alice"
    assert h.jm.job("j2").owner == TOKEN_OWNER == "token"
    assert {v.id: v.owner for v in h.jm.jobs()} == {"j1": "alice", "j2": "token"}
    (a,) = h.assign()
    assert (a.job_id, a.owner) == ("j1", "alice")
    assert h.finish(a, code=0)
    h.jm.close()

    h.jm = JobManager(h.path, h.clock, synchronous=h.sync)
    assert h.jm.job("j1").state == "succeeded"  # read back from the file
    assert h.jm.job("j1").owner == "alice"
    assert h.jm.job("j2").owner == "token"  # live, loaded back
    assert {v.id: v.owner for v in h.jm.jobs()} == {"j1": "alice", "j2": "token"}
    (b,) = h.assign()
    assert (b.job_id, b.owner) == ("j2", "token")


def test_a_job_needs_an_owner(tmp_path: Path) -> None:
    h = Harness(tmp_path / JOBS_FILE)
    with pytest.raises(JobError, match="owner"):
        h.jm.submit(job(), owner="")
    assert h.jm.jobs() == []


SCHEMA_2 = (*SCHEMA_1[:4], SCHEMA_1[4].replace(
    "reason TEXT NOT NULL)", "reason TEXT NOT NULL, stderr_tail TEXT NOT NULL DEFAULT '')"
), SCHEMA_1[5])


def test_a_schema_2_state_file_is_migrated_in_place(tmp_path: Path) -> None:
    """A state file written by schema version 2 (no owners) opens: its jobs read back
    with the owner "" (unknown), it is at version 3 afterwards with ``jobs.owner`` last,
    and a job submitted then keeps its owner across a restart."""
    assert "stderr_tail" in SCHEMA_2[4]
    path = tmp_path / JOBS_FILE
    db = sqlite3.connect(path)
    for statement in SCHEMA_2:
        db.execute(statement)
    db.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("schema", 2), ("next_job", 3), ("attempt_reserved", 10_000)],
    )
    db.executemany(
        "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (1, "old", 0, "[]", "failed", 1.0, 2.0, 3.0, "task 0 failed: exit 2", 1,
             _counts(failed=1)),
            (2, "live", 0, "[]", "queued", 4.0, None, None, "", 1, _counts(queued=1)),
        ],
    )
    db.executemany(
        "INSERT INTO tasks VALUES (?, ?, ?, ?, ?)",
        [
            (1, 0, '{"command":["false"],"max_attempts":1}', "failed", "exit 2"),
            (2, 0, '{"command":["true"]}', "queued", ""),
        ],
    )
    db.execute(
        "INSERT INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (1, 1, 0, "w1", 1, "failed", 2.0, 3.0, 2, None, 1.0, 100, "exit 2", "oops\n"),
    )
    db.commit()
    db.close()

    h = Harness(path)
    old = h.jm.job("j1")
    assert (old.name, old.state, old.owner) == ("old", "failed", "")
    assert tails(old) == ["oops\n"]
    assert h.jm.job("j2").owner == ""
    (a,) = h.assign()
    assert (a.job_id, a.owner) == ("j2", "")
    d = h.jm.submit(job(name="new"), owner="bob")
    h.tick()
    assert result(d) == "j3"
    h.jm.close()

    db = sqlite3.connect(path)
    try:
        (schema,) = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
    finally:
        db.close()
    assert schema == SCHEMA_VERSION == 4
    assert columns[-3:] == ["owner", "local", "remote"]
    assert (old.local, old.remote) == (0, 0)
    h.jm = JobManager(path, h.clock, synchronous=h.sync)
    assert [(v.id, v.owner) for v in h.jm.jobs()] == [("j3", "bob"), ("j2", ""), ("j1", "")]


def test_job_json_shows_the_owner_and_hides_tails_from_others(h: Harness) -> None:
    """``owner`` is in the status JSON; ``private=False`` (a reader who is neither the
    owner nor an admin) blanks the stderr tails; the run order carries the owner and the
    job's view has no environment anywhere."""
    d = h.jm.submit(job(task(env=(("SECRET", "hunter2"),), max_attempts=2)), owner="alice")
    h.tick()
    assert result(d) == "j1"
    (a,) = h.assign()
    assert h.finish(a, code=1, stderr_tail="secret log\n")
    view = h.jm.job("j1")
    mine = job_json(view)
    assert mine["owner"] == "alice"
    assert mine["tasks"][0]["attempts"][0]["stderr_tail"] == "secret log\n"
    theirs = job_json(view, private=False)
    assert theirs["owner"] == "alice"
    assert theirs["tasks"][0]["attempts"][0]["stderr_tail"] == ""
    assert "hunter2" not in json.dumps(mine)
    (b,) = h.assign()
    order = json.loads(assignment_json(b))
    assert order["owner"] == "alice"
    assert order["env"] == [["SECRET", "hunter2"]]  # to the worker only


def test_an_array_task_keeps_its_templates_retry_on() -> None:
    """Each task of an array with outputs is the template with its keys filled in, and
    everything else kept (``retry_on`` was once dropped: an array's failed attempts were
    then retried only for the default causes)."""
    from dsml.master.jobs.model import TaskSpec, expand_task

    template = TaskSpec(("sh", "-c", "true"), outputs=(("out", "o/{index}"),),
                        max_attempts=4, retry_on=("exit", "lost"))
    task = expand_task(template, 7)
    assert task.outputs == (("out", "o/7"),)
    assert task.retry_on == ("exit", "lost") and task.max_attempts == 4
