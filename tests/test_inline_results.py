"""A task's small result carried in its worker's report (issue #14's latency): the
master keeps it with the success, in the same commit, and ``result`` answers it; it is
fenced exactly as the success is, and a failed or stale attempt's is never kept."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from test_jobs import Harness, Threads, job, task

from dsml.master.jobs import MAX_INLINE_RESULT, JobError
from dsml.master.jobs.model import FinishedReport, check_task
from dsml.master.jobwire import assignment_json, finished_report
from dsml.worker.runner import result_json, spec_from_json
from dsml.worker.tasks import AttemptResult
from dsml.worker.tasks.workdirs import read_small


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def with_result(**kw: object) -> object:
    return task("run", outputs=(("r.pkl", "out/r"),), result="r.pkl", **kw)


def finish(h: Harness, aid: int, data: bytes, *, worker: str = "w1", inc: int = 1,
           code: int | None = 0) -> bool:
    d = h.jm.finished(aid, worker, inc, exit_code=code, signal=None, duration=0.1,
                      peak_rss=0, result=data)
    h.tick()
    out: list[bool] = []
    d.addCallback(out.append)
    return out[0]


def test_a_success_keeps_its_result_on_disk_across_restarts(h: Harness) -> None:
    j = h.submit(job(with_result(), with_result()))
    a, b = h.assign(free=2)
    assert finish(h, a.attempt_id, b"first")
    assert h.jm.result(j, 0) == b"first"
    assert h.jm.result(j, 1) is None  # still running
    h.reopen()  # a live job: the result is read back from the file
    assert h.jm.result(j, 0) == b"first"
    assert h.assign(free=2) == []  # task 1's attempt is still running, loaded back
    assert finish(h, b.attempt_id, b"second")
    h.reopen()  # final now, and evicted: still there
    assert (h.jm.result(j, 0), h.jm.result(j, 1)) == (b"first", b"second")


def test_the_result_is_readable_before_its_commit_ends(tmp_path: Path) -> None:
    """A reader asking between the success in memory and its commit gets it."""
    threads = Threads()
    h = Harness(tmp_path, threads=threads)
    j = h.jm.submit(job(with_result()))
    h.tick()
    threads.run()
    (a,) = h.assign()
    h.jm.finished(a.attempt_id, "w1", 1, exit_code=0, signal=None, duration=0.1,
                  peak_rss=0, result=b"soon")
    assert h.jm.result(j.result, 0) == b"soon"  # pending in the next batch
    h.tick()  # the batch is handed to the thread, not yet written
    assert h.jm.result(j.result, 0) == b"soon"
    threads.run()
    assert h.jm.result(j.result, 0) == b"soon"
    h.jm.close()


def test_a_stale_or_failed_attempt_never_leaves_a_result(h: Harness) -> None:
    j = h.submit(job(with_result(max_attempts=3)))
    (a,) = h.assign()
    h.jm.worker_lost("w1", 1)  # fenced: its retry runs elsewhere
    h.tick()
    assert not finish(h, a.attempt_id, b"stale")
    (b,) = h.assign("w2")
    assert finish(h, b.attempt_id, b"failed", worker="w2", code=3)
    assert h.jm.result(j, 0) is None
    (c,) = h.assign("w2")
    assert finish(h, c.attempt_id, b"good", worker="w2")
    assert h.jm.result(j, 0) == b"good"
    assert not finish(h, a.attempt_id, b"late")  # the stale one, after the success
    assert h.jm.result(j, 0) == b"good"


def test_a_result_reported_at_reregistration_is_fenced_as_a_live_one(h: Harness) -> None:
    """After a master restart a worker reports its ended attempts when it registers
    (reconcile): a success's result is kept, a failure's never, and a report for an
    attempt given to another worker changes nothing."""
    j = h.submit(job(with_result(), with_result()))
    a, b = h.assign(free=2)
    h.reopen()

    def report(aid: int, code: int, data: bytes) -> FinishedReport:
        return FinishedReport(aid, code, None, 0.1, 0, result=data)

    h.jm.reconcile("w2", 1, [], [report(a.attempt_id, 0, b"not w2's")])
    h.tick()
    assert h.jm.result(j, 0) is None
    assert h.jm.job(j).tasks[0].state == "running"
    h.jm.reconcile("w1", 2, [], [report(a.attempt_id, 0, b"mine"),
                                 report(b.attempt_id, 3, b"failed")])
    h.tick()
    assert (h.jm.result(j, 0), h.jm.result(j, 1)) == (b"mine", None)
    h.reopen()
    assert (h.jm.result(j, 0), h.jm.result(j, 1)) == (b"mine", None)


def test_only_a_declared_bounded_result_is_kept(h: Harness) -> None:
    j = h.submit(job(task("run"), with_result()))
    a, b = h.assign(free=2)
    assert finish(h, a.attempt_id, b"undeclared")
    assert finish(h, b.attempt_id, b"x" * (MAX_INLINE_RESULT + 1))
    assert h.jm.result(j, 0) is None and h.jm.result(j, 1) is None
    with pytest.raises(JobError) as e:
        h.jm.result("j99", 0)
    assert e.value.code == "not-found"


def test_purging_a_job_deletes_its_results(h: Harness) -> None:
    j = h.submit(job(with_result()))
    (a,) = h.assign()
    assert finish(h, a.attempt_id, b"r")
    d = h.jm.purge(1e-6, 0)
    h.clock.advance(1)
    assert d.called
    rows = h.jm._journal.read("SELECT count(*) FROM results", ())
    assert rows == [(0,)]
    with pytest.raises(JobError):
        h.jm.result(j, 0)


def test_a_result_must_name_one_of_the_outputs() -> None:
    with pytest.raises(JobError) as e:
        check_task(0, task("run", outputs=(("a", "k"),), result="b"))
    assert e.value.code == "bad-job" and "result" in str(e.value)
    check_task(0, task("run", outputs=(("a", "k"),), result="a"))


def test_the_wire_carries_the_result_both_ways(h: Harness) -> None:
    j = h.submit(job(with_result()))
    (a,) = h.assign()
    assert spec_from_json(assignment_json(a)).result == "r.pkl"
    line = result_json(AttemptResult(a.attempt_id, 0, None, 0.1, 0, "", result=b"\x00\xff"))
    assert finished_report(json.loads(line)).result == b"\x00\xff"
    # What a worker sends is bounded and must be base64: anything else is dropped.
    for bad in ("not base64!", 12, base64.b64encode(b"x" * (MAX_INLINE_RESULT + 3)).decode()):
        assert finished_report({"attempt_id": 1, "result": bad}).result == b""
    assert j


def test_read_small_is_bounded_and_never_follows_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "r").write_bytes(b"12345")
    assert read_small(tmp_path, "r", 5) == b"12345"
    assert read_small(tmp_path, "r", 4) is None
    (tmp_path / "s").symlink_to(tmp_path / "r")
    with pytest.raises(OSError):
        read_small(tmp_path, "s", 10)
    os.link(tmp_path / "r", tmp_path / "h")  # a second name: maybe a file not the task's
    assert read_small(tmp_path, "h", 10) is None
    os.mkfifo(tmp_path / "f")
    assert read_small(tmp_path, "f", 10) is None  # never blocks on a FIFO
