"""Issue 11, the master's jobs side: no jobs request does more than a bounded slice of
work on the reactor, the reactor-lag probe, and retention (finished jobs on the master,
finished attempt directories on a worker).

Logic tests on a ``task.Clock`` over a real SQLite file in ``tmp_path``; bounded work is
asserted with counters (slices run, tasks per slice, transactions, reactor turns), never
with wall-clock times.  The 100,000-task figures are in ``tests/test_jobs_bounded_processes.py``
and ``benchmarks``; here N is a few thousand with the slice sizes made small to match.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from dsml.config import (
    DEFAULT_ATTEMPT_DIRS_MAX_BYTES,
    DEFAULT_JOBS_MAX_COUNT,
    ConfigError,
    Retention,
    load_config,
)
from dsml.errors import DsmlError
from dsml.lagprobe import LagProbe
from dsml.master.jobparse import job_spec_from_json
from dsml.master.jobrouter import JobRouter
from dsml.master.jobs import MAX_TASKS, STATUS_PAGE, JobError, JobManager, JobSpec, TaskSpec
from dsml.master.jobs.retention import purge_tasks
from dsml.master.jobwire import job_json
from dsml.worker.tasks.workdirs import AttemptDirs

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


def task(*args: str, **kw: Any) -> TaskSpec:
    """A task running ``args`` (``true`` by default)."""
    return TaskSpec(command=args or ("true",), **kw)


def array(n: int, **kw: Any) -> JobSpec:
    """A compact array job of ``n`` tasks (its template's keys hold ``{index}``)."""
    template = task(
        inputs=(("corpus/p{index}.txt", "in.txt"),), outputs=(("out.txt", "res/{index}"),)
    )
    return JobSpec(name="sweep", tasks=(template,), array=n, **kw)


@pytest.fixture
def clock() -> Clock:
    """A fake clock."""
    return Clock()


@pytest.fixture
def jm(tmp_path: Path, clock: Clock) -> Iterator[JobManager]:
    """A job manager with small slices: 50 tasks per slice, jobs above 100 sliced."""
    m = JobManager(tmp_path, clock, synchronous="OFF")
    m.submit_slice = 50
    m.submit_at_once = 100
    m.enqueue_slice = 200
    yield m
    m.close()


def turn(clock: Clock) -> None:
    """Run every call due now (the slices and the commit of a small delay)."""
    clock.advance(0)


def submit(jm: JobManager, clock: Clock, spec: JobSpec) -> str:
    """Submit, let every slice and the commit run; the job id."""
    d = jm.submit(spec)
    for _ in range(10_000):
        if d.called:
            break
        clock.advance(DELAY)
    return result(d)


def finish_all(jm: JobManager, clock: Clock, worker: str = "w1", exit_code: int = 0) -> None:
    """Run every queued task to its end on ``worker``."""
    while jm.queued or jm.busy:
        clock.advance(0)
        for a in jm.next_assignments(worker, 1, 1000):
            jm.finished(a.attempt_id, worker, 1, exit_code=exit_code, signal=None,
                        duration=0.1, peak_rss=1)
    clock.advance(DELAY)
    result(jm.committed())
    clock.advance(DELAY)


# -- the reactor-lag probe -----------------------------------------------------------


def test_probe_measures_its_own_lateness(clock: Clock) -> None:
    """On time, a run is 0 s late; a stall shows as the next run's lateness, once."""
    probe = LagProbe(clock, interval=0.1).start()
    clock.advance(0.1)
    clock.advance(0.1)
    assert probe.runs == 2 and probe.last == 0.0 and probe.worst == 0.0
    clock.advance(2.35)  # the reactor was stuck: due at 0.3, run at 2.55
    assert probe.runs == 3
    assert probe.last == pytest.approx(2.25)
    assert probe.worst == pytest.approx(2.25)
    assert probe.worst_at == pytest.approx(2.55)
    clock.advance(0.05)  # back on the grid: the next run is due at 2.6
    assert probe.runs == 4 and probe.last == pytest.approx(0.0, abs=1e-9)


def test_probe_logs_each_stall_over_its_threshold_once(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run later than ``log_over`` is one warning naming the stall; on-time runs and
    small delays say nothing."""
    from dsml import lagprobe

    said: list[dict[str, Any]] = []

    class Log:
        def warn(self, fmt: str, **kw: Any) -> None:
            said.append(kw)

    monkeypatch.setattr(lagprobe, "log", Log())
    LagProbe(clock, interval=0.1, log_over=0.25).start()
    clock.advance(0.1)
    clock.advance(0.3)  # 0.2 s late: under the threshold
    assert said == []
    clock.advance(1.0)  # one stall of ~0.9 s
    clock.advance(0.1)
    assert [round(kw["ms"]) for kw in said] == [900]


def test_probe_recent_worst_forgets_an_old_stall(clock: Clock) -> None:
    """``recent_worst`` covers the latest runs only; ``worst`` keeps the stall."""
    probe = LagProbe(clock, interval=1.0, recent=3).start()
    clock.advance(1.5)
    assert probe.recent_worst == pytest.approx(0.5)
    for _ in range(3):
        clock.advance(0.5)
        clock.advance(0.5)
    assert probe.recent_worst == pytest.approx(0.0, abs=1e-9)
    assert probe.worst == pytest.approx(0.5)


def test_probe_snapshot_is_json_in_milliseconds(clock: Clock) -> None:
    """The snapshot is a plain dict (for ``dsml nodes --json`` and the log)."""
    probe = LagProbe(clock, interval=0.25).start()
    clock.advance(0.25)
    clock.advance(0.5)  # due at 0.5, run at 0.75
    snap = probe.snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert snap["worst_ms"] == pytest.approx(250.0)
    assert snap["interval_ms"] == 250.0 and snap["runs"] == 2


def test_probe_stops_and_restarts(clock: Clock) -> None:
    """Stopped, it runs no more and keeps its figures; start is idempotent."""
    probe = LagProbe(clock, interval=0.1)
    probe.start()
    probe.start()
    clock.advance(0.1)
    probe.stop()
    probe.stop()
    clock.advance(5)
    assert probe.runs == 1 and not probe.running
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize("kw", [{"interval": 0}, {"interval": -1.0}, {"recent": 0}])
def test_probe_refuses_bad_settings(clock: Clock, kw: dict[str, float]) -> None:
    """A zero or negative interval, or an empty window, is refused at once."""
    with pytest.raises(ValueError):
        LagProbe(clock, **kw)  # type: ignore[arg-type]


# -- status in pages ------------------------------------------------------------------


def test_status_pages_cover_every_task_once(jm: JobManager, clock: Clock) -> None:
    """Pages of a live job: each task once, in order, ``next`` linking them."""
    j = submit(jm, clock, array(2500))
    seen: list[int] = []
    first: int | None = 0
    nexts = []
    while first is not None:
        view = jm.job(j, first=first, limit=1000)
        assert len(view.tasks) <= 1000
        seen += [t.index for t in view.tasks]
        nexts.append(view.next)
        first = view.next
    assert seen == list(range(2500))
    assert nexts == [1000, 2000, None]
    view = jm.job(j, first=0, limit=1000)
    assert view.total == 2500 and view.counts["queued"] == 2500


def test_status_pages_of_a_stored_job(jm: JobManager, clock: Clock) -> None:
    """A finished job, read back from the file, pages the same way with its attempts."""
    j = submit(jm, clock, array(250))
    finish_all(jm, clock)
    view = jm.job(j, first=200, limit=100)
    assert view.state == "succeeded" and view.next is None
    assert [t.index for t in view.tasks] == list(range(200, 250))
    assert all(len(t.attempts) == 1 and t.attempts[0].state == "succeeded" for t in view.tasks)
    page = jm.job(j, first=0, limit=100)
    assert page.next == 100 and len(page.tasks) == 100
    assert jm.job(j, first=250, limit=100).tasks == ()


def test_status_refuses_negative_cursor(jm: JobManager, clock: Clock) -> None:
    """A negative ``first`` or ``limit`` is a clear error."""
    j = submit(jm, clock, array(3))
    with pytest.raises(JobError, match="negative"):
        jm.job(j, first=-1, limit=10)


def test_queue_places_of_a_page_match_the_whole_job(jm: JobManager, clock: Clock) -> None:
    """``ahead`` counted from the queued blocks equals the count over every task."""
    j = submit(jm, clock, array(3000))
    taken = {a.task_index for a in jm.next_assignments("w1", 1, 700)}
    assert len(taken) == 700
    whole = jm.queue_places(j)
    for first in (0, 1100, 2048, 2999):
        page = jm.queue_places(j, first, 300)
        assert page == {i: whole[i] for i in range(first, min(3000, first + 300)) if i in whole}
    assert whole[2999].ahead == 3000 - 700 - 1


class FakeMembership:
    """No workers: what the router needs of membership."""

    def __init__(self) -> None:
        self.on_dead: list[Any] = []

    def alive(self) -> list[Any]:
        return []

    def all(self) -> list[Any]:
        return []


def test_router_status_is_one_bounded_page(jm: JobManager, clock: Clock) -> None:
    """The router answers a page of at most STATUS_PAGE tasks; a bigger Limit is refused."""
    router = JobRouter(jobs=jm, membership=FakeMembership(), directory=None, clock=clock)  # type: ignore[arg-type]
    j = submit(jm, clock, array(STATUS_PAGE + 5))
    view = router.status(j)
    assert len(view.tasks) == STATUS_PAGE and view.next == STATUS_PAGE
    body = job_json(view, router.queued_reasons(view))
    assert body["next"] == STATUS_PAGE and body["tasks"][0]["waiting_for"] == "no live worker"
    assert len(router.status(j, STATUS_PAGE).tasks) == 5
    with pytest.raises(DsmlError, match="Limit"):
        router.status(j, 0, STATUS_PAGE + 1)
    assert len(router.job(j).tasks) == STATUS_PAGE  # wait answers a first page too


def test_jobs_list_in_pages(jm: JobManager, clock: Clock) -> None:
    """``jobs`` answers a page at a time, live and stored jobs alike, ``Next`` linking
    the pages; a bad cursor is a clear error."""
    router = JobRouter(jobs=jm, membership=FakeMembership(), directory=None, clock=clock)  # type: ignore[arg-type]
    for _ in range(3):
        submit(jm, clock, array(1))
    finish_all(jm, clock)  # j1..j3 stored only
    for _ in range(2):
        submit(jm, clock, array(1))  # j4, j5 live
    pages = []
    before = None
    while True:
        views, before = router.recent(2, before)
        pages.append([v.id for v in views])
        if before is None:
            break
    assert pages == [["j5", "j4"], ["j3", "j2"], ["j1"]]
    views, nxt = router.recent(10**9)
    assert [v.id for v in views] == ["j5", "j4", "j3", "j2", "j1"] and nxt is None
    with pytest.raises(JobError, match="Before must be a job id"):
        router.recent(2, "x7")


# -- big submits in slices ------------------------------------------------------------


def test_big_submit_is_admitted_in_bounded_slices(jm: JobManager, clock: Clock) -> None:
    """A big array is made a slice per reactor turn, other calls run between slices, and
    it is visible and acknowledged only once all of it is made and committed."""
    made: list[int] = []
    real = jm._materialise

    def spy(spec: JobSpec, start: int, end: int, job: Any = None) -> Any:
        made.append(end - start)
        return real(spec, start, end, job)

    jm._materialise = spy  # type: ignore[method-assign]
    beats: list[bool] = []

    def heartbeat() -> None:  # a peer's request, arriving every turn
        beats.append(jm.busy)
        if jm.busy:
            clock.callLater(0, heartbeat)

    d = jm.submit(array(1000))
    assert not d.called and jm.busy
    with pytest.raises(JobError, match="no job"):
        jm.job("j1", tasks=False)  # not visible before it is admitted
    clock.callLater(0, heartbeat)
    turn(clock)
    assert made == [50] * 20  # never more than a slice per turn
    # Every slice was followed by the heartbeat's turn: nothing waited for the whole job.
    assert beats.count(True) >= 20
    assert jm.slices >= 20 + 1000 // 200
    clock.advance(DELAY)
    assert result(d) == "j1"
    view = jm.job("j1", first=999, limit=5)
    assert view.total == 1000 and [t.index for t in view.tasks] == [999]
    assert view.tasks[0].state == "queued"


def test_big_submit_tasks_run_in_order(jm: JobManager, clock: Clock) -> None:
    """The slices queue every task once, in index order, with its own inputs."""
    j = submit(jm, clock, array(450))
    given = jm.next_assignments("w1", 1, 1000)
    assert [a.task_index for a in given] == list(range(450))
    assert given[7].spec.inputs == (("corpus/p7.txt", "in.txt"),)
    assert given[7].spec.outputs == (("out.txt", "res/7"),)
    assert jm.job(j, tasks=False).counts["running"] == 450


def test_big_submit_with_a_bad_task_stores_nothing(jm: JobManager, clock: Clock) -> None:
    """A bad task found in a later slice fails the submit, naming it; nothing is kept."""
    tasks = [task() for _ in range(300)]
    tasks[250] = task(inputs=(("k", "/etc/passwd"),))
    d = jm.submit(JobSpec(name="bad", tasks=tuple(tasks)))
    for _ in range(100):
        clock.advance(DELAY)
    with pytest.raises(JobError, match="task 250: input path '/etc/passwd' is absolute"):
        result(d)
    assert jm.jobs() == [] and jm.queued == 0 and not jm.busy


def test_a_bad_template_is_refused_at_once(jm: JobManager) -> None:
    """An array's template is checked before anything is made (bad-job, nothing kept)."""
    bad = JobSpec(name="x", tasks=(task(outputs=(("../up", "k{index}"),)),), array=5000)
    with pytest.raises(JobError, match="contains '..'"):
        jm.submit(bad)
    with pytest.raises(JobError, match="exactly one task template"):
        jm.submit(JobSpec(name="x", tasks=(task(), task()), array=2))
    with pytest.raises(JobError, match="array must be"):
        jm.submit(JobSpec(name="x", tasks=(task(),), array=10**6))
    assert not jm.busy and jm.jobs() == []


def test_close_while_admitting_fails_the_submit(tmp_path: Path, clock: Clock) -> None:
    """Closing the manager mid-admission fails the submit; reopened, no job is there."""
    m = JobManager(tmp_path, clock, synchronous="OFF")
    m.submit_slice, m.submit_at_once = 50, 100
    d = m.submit(array(1000))
    m.close()
    with pytest.raises(JobError, match="closed before the job was stored"):
        result(d)
    m = JobManager(tmp_path, clock, synchronous="OFF")
    try:
        assert m.jobs() == []
    finally:
        m.close()


def test_too_many_tasks_being_admitted_is_busy(tmp_path: Path, clock: Clock) -> None:
    """Big submits admitted at once are capped (busy, nothing kept); the cap frees up."""
    m = JobManager(tmp_path, clock, synchronous="OFF")
    waiting = [m.submit(array(MAX_TASKS)) for _ in range(4)]
    with pytest.raises(JobError, match="busy: 400000 tasks") as e:
        m.submit(array(MAX_TASKS))
    assert e.value.code == "busy"
    m.submit(array(100))  # admitted at once: not counted
    m.close()
    for d in waiting:
        with pytest.raises(JobError, match="closed"):
            result(d)


def test_array_job_survives_a_restart(tmp_path: Path, clock: Clock) -> None:
    """An array's tasks are stored expanded: a restarted master runs task 3 as task 3."""
    m = JobManager(tmp_path, clock, synchronous="OFF")
    m.submit_slice, m.submit_at_once = 50, 100
    j = submit(m, clock, array(300))
    m.close()
    m = JobManager(tmp_path, clock, synchronous="OFF")
    try:
        (a,) = [a for a in m.next_assignments("w1", 1, 300) if a.task_index == 3]
        assert a.job_id == j and a.spec.inputs == (("corpus/p3.txt", "in.txt"),)
        assert m.queued == 0
    finally:
        m.close()


def test_submit_json_array_form() -> None:
    """``"array": N`` with one task is a compact array; anything else is bad-job."""
    spec = job_spec_from_json(
        {"name": "a", "array": 4, "tasks": [{"command": ["x"], "inputs": [["d/{index}", "f"]]}]}
    )
    assert spec.count == 4 and spec.task(2).inputs == (("d/2", "f"),)
    with pytest.raises(JobError, match="array must be an integer"):
        job_spec_from_json({"array": "4", "tasks": [{"command": ["x"]}]})
    with pytest.raises(JobError, match="array must be an integer"):
        job_spec_from_json({"array": True, "tasks": [{"command": ["x"]}]})


# -- retention of finished jobs -------------------------------------------------------


def rows(jm: JobManager, seq: int) -> tuple[int, int, int]:
    """(jobs, tasks, attempts) rows of job ``seq`` in the state file."""
    read = jm._journal.read
    return (
        read("SELECT count(*) FROM jobs WHERE seq = ?", (seq,))[0][0],
        read("SELECT count(*) FROM tasks WHERE job = ?", (seq,))[0][0],
        read("SELECT count(*) FROM attempts WHERE job = ?", (seq,))[0][0],
    )


def run_purge(jm: JobManager, clock: Clock, d: Deferred[Any]) -> tuple[Any, list[int]]:
    """Turn the clock until ``d`` fires, a heartbeat taking every other turn: (its
    result, the state file's transaction count at each heartbeat)."""
    beats: list[int] = []

    def heartbeat() -> None:
        beats.append(jm.commits)
        if not d.called:
            clock.callLater(0, heartbeat)

    clock.callLater(0, heartbeat)
    for _ in range(10_000):
        if d.called:
            break
        clock.advance(0)
    return result(d), beats


def test_purge_by_count_in_bounded_batches(jm: JobManager, clock: Clock) -> None:
    """Beyond the newest N final jobs, jobs go with their tasks and attempts, a bounded
    batch per transaction and a reactor turn between two."""
    ids = [submit(jm, clock, array(50)) for _ in range(5)]
    finish_all(jm, clock)
    assert rows(jm, 1) == (1, 50, 50)
    commits = jm.commits
    purged, beats = run_purge(jm, clock, jm.purge(1e9, 2, rows=20))
    assert purged == 3
    # 3 jobs x (3 batches of <= 20 tasks + the job row).
    assert jm.commits - commits == 3 * 4
    # The heartbeat ran between batches: never more than a batch and a job row between
    # two of its turns.
    assert len(beats) >= 3 * 3
    assert max(b - a for a, b in zip(beats, beats[1:], strict=False)) <= 2
    for seq in (1, 2, 3):
        assert rows(jm, seq) == (0, 0, 0)
        with pytest.raises(JobError, match="no job"):
            jm.job(f"j{seq}")
    assert [v.id for v in jm.jobs()] == [ids[4], ids[3]]
    assert rows(jm, 5) == (1, 50, 50)


def test_purge_by_age(jm: JobManager, clock: Clock) -> None:
    """Jobs finished more than max_age seconds ago go; younger ones stay."""
    old = submit(jm, clock, array(3))
    finish_all(jm, clock)
    clock.advance(100)
    young = submit(jm, clock, array(3))
    finish_all(jm, clock)
    clock.advance(10)
    assert run_purge(jm, clock, jm.purge(50, 1000))[0] == 1
    assert [v.id for v in jm.jobs()] == [young]
    with pytest.raises(JobError):
        jm.job(old)


def test_purge_spares_live_jobs_and_what_they_wait_for(jm: JobManager, clock: Clock) -> None:
    """A live job, and a final job a live one comes after, are never purged."""
    done = submit(jm, clock, array(2))
    finish_all(jm, clock)
    running = submit(jm, clock, array(1))
    (a,) = jm.next_assignments("w1", 1, 1)
    waiting = submit(
        jm, clock, JobSpec(name="w", tasks=(task(),), after=(done, running))
    )
    clock.advance(DELAY)
    assert run_purge(jm, clock, jm.purge(1e-6, 0))[0] == 0
    assert {v.id for v in jm.jobs()} == {done, running, waiting}


def test_a_half_purged_job_is_finished_by_the_next_purge(jm: JobManager, clock: Clock) -> None:
    """A purge cut short (the master died) leaves the job's row: the next one ends it."""
    submit(jm, clock, array(30))
    finish_all(jm, clock)
    result(jm._journal.run(lambda: purge_tasks(jm._journal, 1, 0, 10)))
    assert rows(jm, 1) == (1, 20, 20)
    assert run_purge(jm, clock, jm.purge(1e9, 0))[0] == 1
    assert rows(jm, 1) == (0, 0, 0)


def test_retention_loop_purges_every_interval(jm: JobManager, clock: Clock) -> None:
    """start_retention purges at once, then every interval; close stops it."""
    submit(jm, clock, array(2))
    finish_all(jm, clock)
    jm.start_retention(max_age=1e9, max_count=0, interval=60)
    for _ in range(10):
        clock.advance(0)
    assert jm.jobs() == []
    submit(jm, clock, array(2))
    finish_all(jm, clock)
    assert len(jm.jobs()) == 1
    clock.advance(60)
    for _ in range(10):
        clock.advance(0)
    assert jm.jobs() == []
    jm.close()
    assert not [c for c in clock.getDelayedCalls() if c.active()]


# -- finished attempt directories on a worker -------------------------------------------


class WallClock:
    """A settable wall clock for file ages."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def finish_attempt(dirs: AttemptDirs, attempt_id: int, size: int) -> Path | None:
    """An attempt that wrote ``size`` bytes, retired."""
    path = dirs.make(attempt_id)
    (path / "out.bin").write_bytes(b"x" * size)
    return dirs.retire(attempt_id, path, had_inputs=False)


def test_attempt_dirs_bounded_by_bytes(tmp_path: Path) -> None:
    """Oldest directories go while the kept ones hold more than max_bytes."""
    dirs = AttemptDirs(tmp_path, keep_finished=100, max_bytes=2500, max_age=None)
    for i in range(1, 6):
        assert finish_attempt(dirs, i, 1000) is not None
        assert dirs.kept_bytes <= 2500
    assert list(dirs.kept) == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "run") == ["4", "5"]
    assert dirs.removed == 3


def test_attempt_dir_bigger_than_the_budget_goes_at_once(tmp_path: Path) -> None:
    """One attempt over the whole budget is not kept (retire says so)."""
    dirs = AttemptDirs(tmp_path, keep_finished=100, max_bytes=500, max_age=None)
    assert finish_attempt(dirs, 1, 1000) is None
    assert dirs.kept == {} and dirs.kept_bytes == 0 and not (tmp_path / "1").exists()


def test_attempt_dirs_bounded_by_age(tmp_path: Path) -> None:
    """Directories older than max_age go at the next retire or cleanup."""
    wall = WallClock()
    dirs = AttemptDirs(tmp_path, keep_finished=100, max_bytes=None, max_age=3600, now=wall)
    finish_attempt(dirs, 1, 10)
    wall.now += 3000
    finish_attempt(dirs, 2, 10)
    wall.now += 1000
    assert dirs.cleanup() == 1
    assert list(dirs.kept) == [2] and not (tmp_path / "1").exists()
    wall.now += 3600
    finish_attempt(dirs, 3, 10)
    assert list(dirs.kept) == [3]


def test_attempt_dirs_recovered_count_against_the_budget(tmp_path: Path) -> None:
    """At start-up the directories left behind are measured and held to the budget."""
    for i, mtime in ((7, 100.0), (8, 200.0), (9, 300.0)):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "f").write_bytes(b"y" * 1000)
        os.utime(tmp_path / str(i), (mtime, mtime))
    wall = WallClock()
    wall.now = 300.0 + 50
    dirs = AttemptDirs(tmp_path, keep_finished=100, max_bytes=1500, max_age=220, now=wall)
    dirs.recover()
    assert list(dirs.kept) == [9] and dirs.kept_bytes == 1000


def test_attempt_dirs_refuse_bad_settings(tmp_path: Path) -> None:
    """Negative budgets and a zero age are refused."""
    with pytest.raises(ValueError):
        AttemptDirs(tmp_path, keep_finished=-1)
    with pytest.raises(ValueError):
        AttemptDirs(tmp_path, keep_finished=1, max_bytes=-5)
    with pytest.raises(ValueError):
        AttemptDirs(tmp_path, keep_finished=1, max_age=0)


# -- the retention section of etc/dsml.yaml ---------------------------------------------


def write_config(tmp_path: Path, retention: object) -> Path:
    doc: dict[str, Any] = {
        "master": {"state_dir": "m"},
        "workers": {"w1": {"port": 0, "data_dir": "w1"}},
    }
    if retention is not None:
        doc["retention"] = retention
    path = tmp_path / "dsml.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_retention_defaults_and_values(tmp_path: Path) -> None:
    """Every key is optional; sizes take units."""
    c = load_config(write_config(tmp_path, None))
    assert c.retention == Retention()
    assert c.retention.jobs_max_count == DEFAULT_JOBS_MAX_COUNT
    assert c.retention.attempt_dirs_max_bytes == DEFAULT_ATTEMPT_DIRS_MAX_BYTES
    c = load_config(
        write_config(
            tmp_path,
            {"jobs_max_age": 3600, "jobs_max_count": 5, "attempt_dirs_max_bytes": "2GiB",
             "attempt_dirs_max_age": 60, "attempt_dirs_max_count": 10,
             "tombstones_max_age": 86400},
        )
    )
    assert c.retention == Retention(3600.0, 5, 2 * 1024**3, 60.0, 10, 86400.0)


def test_the_shipped_config_shows_the_defaults() -> None:
    """etc/dsml.yaml's retention section says it shows the defaults: it does."""
    root = Path(__file__).resolve().parent.parent
    assert load_config(root / "etc" / "dsml.yaml").retention == Retention()


@pytest.mark.parametrize(
    ("retention", "message"),
    [
        ({"jobs_max_age": 0}, "retention.jobs_max_age: must be a number of seconds"),
        ({"jobs_max_count": -1}, "retention.jobs_max_count: must be an integer of at least 0"),
        ({"attempt_dirs_max_bytes": "10GB"}, "retention.attempt_dirs_max_bytes: unknown size"),
        ({"keep": 1}, "retention.keep: unknown key"),
    ],
)
def test_bad_retention_is_one_line(tmp_path: Path, retention: object, message: str) -> None:
    """A bad retention value stops the load with one line naming the key."""
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, retention))
    text = str(e.value)
    assert "\n" not in text and message in text
