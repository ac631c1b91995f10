"""Jobs on the whole cluster on a fake clock (dsml.testing.sim): the production master and
workers, with fake task runners (no processes), through crashes, silences and restarts.

Every attempt "runs" as the sim's script says (by default ``SIM_DURATION`` seconds, then
exit ``SIM_EXIT``, from the task's environment).  The invariants checked: a task succeeds
at most once, a lost worker's late result is refused, attempts end as they should, a worker
never runs more than its slots, and the queue keeps priority, FIFO, ``after`` and locality.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dsml.errors import DsmlError
from dsml.testing.sim import FakeRun, ResultSeen, SimCluster

Make = Callable[..., SimCluster]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    """Builds simulated clusters (each in its own directory); at the end, nothing may have
    been logged as a bug, no protocol callback may have raised, and no worker may ever
    have held more slots than it has."""
    made: list[SimCluster] = []

    def build(**kw: Any) -> SimCluster:
        sim = SimCluster(tmp_path / f"cluster{len(made)}", **kw)
        made.append(sim)
        return sim

    yield build
    for sim in made:
        failures = sim.failures.messages()
        peaks = {n: (r.peak, r.slots) for n, r in sim.runners.items()}
        sim.close()
        assert failures == [], "bugs were logged during the run"
        assert sim.net.errors == []
        assert all(peak <= slots for peak, slots in peaks.values()), peaks


def env(duration: float = 1.0, exit_code: int = 0, stdout: str = "") -> dict[str, str]:
    """The environment that scripts a fake attempt (see dsml.testing.sim.default_script)."""
    out = {"SIM_DURATION": str(duration), "SIM_EXIT": str(exit_code)}
    if stdout:
        out["SIM_STDOUT"] = stdout
    return out


def attempts(status: dict[str, Any], index: int = 0) -> list[dict[str, Any]]:
    """The attempts of task ``index`` in a status JSON."""
    return status["tasks"][index]["attempts"]  # type: ignore[no-any-return]


def states(status: dict[str, Any], index: int = 0) -> list[str]:
    """The states of task ``index``'s attempts, oldest first."""
    return [a["state"] for a in attempts(status, index)]


def started_once_each(sim: SimCluster, job: str, n: int) -> None:
    """Each of the ``n`` tasks of ``job`` was started exactly once, on any worker."""
    starts = Counter(e.task_index for e in sim.events("start", job))
    assert starts == dict.fromkeys(range(n), 1), starts


def no_start_failures(sim: SimCluster) -> None:
    """No worker ever refused a run order (busy, duplicate...): no attempt was wasted."""
    refused = [r for r in sim.results if r.reason.startswith("could not start")]
    assert refused == []


# -- losing workers -----------------------------------------------------------------------


@pytest.mark.parametrize("away", [2.0, 8.0], ids=["still-running", "ended-while-away"])
def test_killed_worker_task_finishes_elsewhere_exactly_once(make: Make, away: float) -> None:
    """The issue's scenario: a worker running a task dies (its connection drops); the
    attempt is lost and the task reruns elsewhere and succeeds once.  The dead worker comes
    back (a new process) with its fake task still "finishing": running still (the master
    has it killed) or ended while it was away; either way its late result is refused and
    the job's record is unchanged: one lost attempt, exactly one succeeded."""
    sim = make()
    client = sim.client()
    job = sim.wait(client.submit(["work"], env=env(duration=5)))
    sim.until(lambda: sim.events("start", job), what="the first start")
    first = sim.events("start", job)[0]
    sim.advance(1)
    sim.kill(first.worker)
    killed_at = sim.clock.seconds()
    sim.until(lambda: len(sim.events("start", job)) == 2, what="the rerun")
    sim.advance(killed_at + away - sim.clock.seconds())
    sim.restart(first.worker, adopt=True)  # its fake task goes on (or has ended)
    sim.wait_registered()

    final = sim.wait(client.wait(job))
    assert final["state"] == "succeeded"
    assert final["owner"] == "token"  # no TLS in the simulation: the token's principal
    tried = attempts(final)
    assert [a["state"] for a in tried] == ["lost", "succeeded"]
    assert tried[0]["worker"] == first.worker and tried[0]["id"] == first.attempt_id
    assert tried[1]["worker"] != first.worker
    assert [e.worker for e in sim.events("start", job)] == [first.worker, tried[1]["worker"]]

    def late() -> list[ResultSeen]:
        return [r for r in sim.results if r.attempt_id == first.attempt_id]

    sim.until(late, what="the late result reaching the master")
    assert [r.taken for r in late()] == [False]
    if away < 5:
        # Still running when it came back: reported at registration, killed by the master.
        assert first.attempt_id in sim.runners[first.worker].cancelled
        assert late()[0].reason == "cancelled"
    else:
        assert late()[0].reason == ""  # a success, refused all the same
    sim.advance(2)
    assert sim.runners[first.worker].finished_results() == []  # acknowledged (as refused)
    again = sim.wait(client.status(job))
    assert states(again) == ["lost", "succeeded"]
    taken = {r.attempt_id: r.taken for r in sim.results}
    assert taken == {first.attempt_id: False, tried[1]["id"]: True}


def test_silenced_worker_loses_its_attempt_after_the_heartbeat_timeout(make: Make) -> None:
    """A worker running a task goes silent (nothing closes): after heartbeat_timeout, not
    before, the master declares it dead, the attempt is lost and the task reruns elsewhere.
    When the silent worker is heard again, its result for the lost attempt is refused."""
    sim = make(heartbeat_timeout=10.0)
    client = sim.client()
    job = sim.wait(client.submit(["work"], env=env(duration=20)))
    sim.until(lambda: sim.events("start", job), what="the first start")
    first = sim.events("start", job)[0]
    sim.advance(1)
    sim.silence(first.worker)
    silenced_at = sim.clock.seconds()

    sim.advance(8.5)
    assert states(sim.wait(client.status(job))) == ["running"]  # suspect is not dead
    sim.until(
        lambda: sim.job(job).tasks[0].attempts[0].state == "lost",
        what="the silent attempt being lost",
    )
    # Dead heartbeat_timeout after its last heartbeat (up to an interval before the
    # silence), noticed by the next check (half an interval).
    assert 9.0 <= sim.clock.seconds() - silenced_at <= 11.0
    sim.until(lambda: len(sim.events("start", job)) == 2, what="the rerun")
    rerun = sim.events("start", job)[1]
    assert rerun.worker != first.worker

    final = sim.wait(client.wait(job))
    assert final["state"] == "succeeded" and states(final) == ["lost", "succeeded"]
    # The silent worker's own run ended meanwhile; it is heard again.
    assert sim.events("end", job)[0].attempt_id == first.attempt_id
    sim.unsilence(first.worker)
    sim.until(lambda: sim.registered(first.worker), timeout=120, what="re-registration")
    sim.until(
        lambda: any(r.attempt_id == first.attempt_id for r in sim.results), what="the late result"
    )
    late = [r for r in sim.results if r.attempt_id == first.attempt_id]
    assert [r.taken for r in late] == [False]
    sim.advance(1)
    assert sim.runners[first.worker].finished_results() == []
    assert states(sim.wait(client.status(job))) == ["lost", "succeeded"]


def test_dropped_connection_of_a_live_worker(make: Make) -> None:
    """Only the connection of a worker running a task drops (the process lives on): the
    master declares the attempt lost at once and reruns the task; the worker reconnects at
    once, reports the attempt still running, is told to kill it, and the result of the
    killed attempt is refused.  The task succeeds exactly once."""
    sim = make()
    client = sim.client()
    job = sim.wait(client.submit(["work"], env=env(duration=5)))
    sim.until(lambda: sim.events("start", job), what="the first start")
    first = sim.events("start", job)[0]
    sim.advance(1)
    sim.net.drop_node(first.worker)
    final = sim.wait(client.wait(job))
    assert final["state"] == "succeeded"
    assert states(final) == ["lost", "succeeded"]
    assert first.attempt_id in sim.runners[first.worker].cancelled
    late = [r for r in sim.results if r.attempt_id == first.attempt_id]
    assert [r.taken for r in late] == [False]
    assert [e.attempt_id for e in sim.events("end", job) if e.result and e.result.ok] == [
        attempts(final)[1]["id"]
    ]


# -- the master restarting ----------------------------------------------------------------


@pytest.mark.parametrize("downtime", [1.0, 8.0], ids=["back-before-the-end", "back-after"])
def test_master_restart_keeps_running_attempts(make: Make, downtime: float) -> None:
    """The master restarts while attempts run: the workers register again with what they
    run, the attempts are kept (re-bound to the new incarnations, not rerun) and their
    results commit, whether they end after the master is back or while it is down (the
    results wait on the workers and are sent once they are registered again)."""
    sim = make()
    client = sim.client()
    job = sim.wait(client.submit(["work"], array=4, env=env(duration=5)))
    sim.until(lambda: len(sim.events("start", job)) == 4, what="four starts")
    ran = {e.attempt_id: e.worker for e in sim.events("start", job)}
    sim.advance(1)
    sim.restart_master(downtime=downtime)
    sim.wait_registered()

    final = sim.wait(client.wait(job))
    assert final["state"] == "succeeded"
    for i in range(4):
        [only] = attempts(final, i)
        assert only["state"] == "succeeded" and ran[only["id"]] == only["worker"]
    started_once_each(sim, job, 4)
    assert sorted(r.attempt_id for r in sim.results if r.taken) == sorted(ran)
    for t in sim.job(job).tasks:  # re-bound to the incarnation the worker registered with
        [a] = t.attempts
        assert a.incarnation == sim.link(a.worker).incarnation == 2


def test_master_crash_before_its_attempts_are_committed(make: Make) -> None:
    """The master dies right after dispatching, before the attempts it created are on disk:
    the workers run attempts the new master never heard of.  When they register again
    those are killed (and their results refused), the tasks, still queued on disk, run
    again under new attempt ids, and each succeeds exactly once; the forgotten attempts
    do not count against max_attempts, and their slots are not given out again before
    they are freed (killed processes take a moment to die here)."""
    sim = make()
    for runner in sim.runners.values():
        runner.kill_delay = 1.0
    client = sim.client()
    job = sim.wait(client.submit(["work"], array=3, max_attempts=1, env=env(duration=5)))
    assert sim.master is not None and sim.master.jobs.running_attempts("w1")  # dispatched
    assert not sim.master.jobs.committed().called  # ... but not on disk yet
    sim.flush()
    forgotten = {e.attempt_id for e in sim.events("start", job)}
    assert len(forgotten) == 3
    sim.restart_master(downtime=1)
    sim.wait_registered()
    final = sim.wait(client.wait(job))
    assert final["state"] == "succeeded"
    for i in range(3):
        [only] = attempts(final, i)
        assert only["state"] == "succeeded" and only["id"] not in forgotten
    cancelled = {a for r in sim.runners.values() for a in r.cancelled}
    assert forgotten <= cancelled
    assert not any(r.taken for r in sim.results if r.attempt_id in forgotten)
    no_start_failures(sim)


def test_timeout_is_retried_then_fails(make: Make) -> None:
    """An attempt that outlives its timeout is killed by its worker and recorded as
    ``timeout``; it counts against max_attempts like any failure."""
    sim = make()
    client = sim.client()
    job = sim.wait(client.submit(["slow"], timeout=2, max_attempts=2, env=env(duration=60),
                                   retry_on=["timeout"]))
    final = sim.wait(client.wait(job))
    assert final["state"] == "failed"
    assert states(final) == ["timeout", "timeout"]
    for a in attempts(final):
        assert 2.0 <= a["ended"] - a["started"] <= 2.5
    assert len(sim.events("start", job)) == 2


# -- retries, cancel ----------------------------------------------------------------------


def test_retries_up_to_max_attempts_and_no_further(make: Make) -> None:
    """A task that always fails is tried max_attempts times, then fails (so does its job,
    with the last reason); nothing more is ever started."""
    sim = make()
    client = sim.client()
    job = sim.wait(client.submit(["fail"], max_attempts=3, env=env(duration=0.5, exit_code=3),
                                   retry_on=["exit"]))
    final = sim.wait(client.wait(job))
    assert final["state"] == "failed"
    assert states(final) == ["failed"] * 3
    assert [a["exit_code"] for a in attempts(final)] == [3, 3, 3]
    assert final["tasks"][0]["state"] == "failed"
    assert "exit 3" in final["reason"]
    sim.advance(30)
    assert len(sim.events("start", job)) == 3
    assert sim.master is not None and sim.master.jobs.queued == 0


def test_retry_then_success(make: Make) -> None:
    """A task that fails once, then succeeds: two attempts, the job succeeds."""
    tries: Counter[int] = Counter()

    def script(worker: str, spec: Any) -> FakeRun:
        tries[spec.task_index] += 1
        return FakeRun(duration=0.5, exit_code=1 if tries[spec.task_index] == 1 else 0)

    sim = make(script=script)
    client = sim.client()
    job = sim.wait(client.submit(["flaky"], array=3, retry_on=["exit"]))
    final = sim.wait(client.wait(job))
    assert final["state"] == "succeeded"
    for i in range(3):
        assert states(final, i) == ["failed", "succeeded"]


@pytest.mark.parametrize("kill_delay", [0.0, 2.0], ids=["dies-at-once", "dies-slowly"])
def test_cancel_stops_running_attempts_and_dispatches_nothing_more(
    make: Make, kill_delay: float
) -> None:
    """Cancelling a job whose tasks fill the cluster: every running attempt is killed (the
    runners see the cancel), the queued ones never start, the killed attempts' results are
    refused, and the slots go to the next job without a wasted attempt, even while the
    killed attempts take a while to die (a run order never meets a busy worker)."""
    sim = make()
    for runner in sim.runners.values():
        runner.kill_delay = kill_delay
    client = sim.client()
    job = sim.wait(client.submit(["work"], array=10, env=env(duration=10)))
    sim.until(lambda: len(sim.events("start", job)) == 6, what="six starts (all slots)")
    sim.advance(2)
    running = {e.attempt_id for e in sim.events("start", job)}
    assert sim.wait(client.cancel(job)) == 6
    after = sim.wait(client.submit(["next"], array=6, max_attempts=1, env=env(duration=1)))
    assert running <= {a for r in sim.runners.values() for a in r.cancelled}
    final = sim.wait(client.wait(job))
    assert final["state"] == "cancelled"
    for t in final["tasks"]:
        assert t["state"] == "cancelled"
        assert all(a["state"] == "cancelled" for a in t["attempts"])
    assert sum(len(t["attempts"]) for t in final["tasks"]) == 6

    nxt = sim.wait(client.wait(after))
    assert nxt["state"] == "succeeded", nxt["reason"]
    no_start_failures(sim)
    sim.advance(20)
    assert {e.attempt_id for e in sim.events("start", job)} == running  # nothing more
    assert {e.attempt_id for e in sim.events("cancel", job)} == running
    killed = [r for r in sim.results if r.attempt_id in running]
    assert sorted(r.attempt_id for r in killed) == sorted(running)
    assert not any(r.taken for r in killed)


# -- the queue ----------------------------------------------------------------------------


def test_priority_then_fifo_on_one_slot(make: Make) -> None:
    """One worker, one slot: while a blocker runs, jobs are submitted at priorities 0, 0, 5,
    -1; they then run one task at a time, highest priority first, then in submit order,
    then by task index."""
    sim = make(workers=("w1",), replication=1, slots=1)
    client = sim.client()
    blocker = sim.wait(client.submit(["block"], env=env(duration=3)))
    a = sim.wait(client.submit(["a"], array=2, env=env(duration=1)))
    b = sim.wait(client.submit(["b"], array=2, env=env(duration=1)))
    c = sim.wait(client.submit(["c"], priority=5, env=env(duration=1)))
    d = sim.wait(client.submit(["d"], priority=-1, env=env(duration=1)))
    for job in (blocker, a, b, c, d):
        assert sim.wait(client.wait(job))["state"] == "succeeded"
    order = [(e.job_id, e.task_index) for e in sim.events("start")]
    assert order == [(blocker, 0), (c, 0), (a, 0), (a, 1), (b, 0), (b, 1), (d, 0)]
    assert sim.runners["w1"].peak == 1
    no_start_failures(sim)


def test_after_waits_for_success_and_failure_cascades(make: Make) -> None:
    """A job ``--after`` another starts only once all of that one's tasks have succeeded;
    a job after a failed job fails without running, and so does one after that."""
    sim = make()
    client = sim.client()
    first = sim.wait(client.submit(["first"], array=3, env=env(duration=2)))
    second = sim.wait(client.submit(["second"], after=[first], env=env(duration=1)))
    bad = sim.wait(client.submit(["bad"], max_attempts=1, env=env(duration=1, exit_code=1)))
    never = sim.wait(client.submit(["never"], after=[bad]))
    nor = sim.wait(client.submit(["nor"], after=[never, first]))

    assert sim.wait(client.wait(second))["state"] == "succeeded"
    ends = [e.time for e in sim.events("end", first)]
    [start] = [e.time for e in sim.events("start", second)]
    assert len(ends) == 3 and start >= max(ends)
    for job in (never, nor):
        final = sim.wait(client.wait(job))
        assert final["state"] == "failed"
        assert final["reason"] == f"dependency {bad if job == never else never} failed"
        assert all(t["state"] == "cancelled" and not t["attempts"] for t in final["tasks"])
        assert sim.events("start", job) == []


def test_locality_sends_a_task_to_the_worker_holding_its_input(make: Make) -> None:
    """A task whose input only w2 holds goes to w2 when w1 and w2 are both free (w1 comes
    first by name), and the runner is given that input."""
    sim = make(workers=("w1", "w2"), replication=1)
    client = sim.client()
    sim.kill("w1")
    sim.wait(client.upload("data/in.bin", b"input bytes"))
    sim.restart("w1")
    sim.wait_registered()
    assert sim.replicas() == {"data/in.bin": {"w2"}}
    job = sim.wait(client.submit(["use"], inputs=[("data/in.bin", "in.bin")], env=env()))
    assert sim.wait(client.wait(job))["state"] == "succeeded"
    [start] = sim.events("start", job)
    assert start.worker == "w2"
    assert sim.runners["w2"].inputs[start.attempt_id] == (("data/in.bin", "in.bin"),)
    # A task without inputs still goes to the first free worker.
    plain = sim.wait(client.submit(["plain"], env=env()))
    sim.wait(client.wait(plain))
    assert [e.worker for e in sim.events("start", plain)] == ["w1"]


@pytest.mark.parametrize("rate", [None, 2])
def test_a_task_waits_for_its_inputs_holder_longer_the_bigger_they_are(
    make: Make, rate: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delay scheduling: only w2 holds the 11-byte input and is busy until t+6; w1 frees
    at t+1.5.  At the default rate 11 bytes add nothing to the 1 s wait, so the task runs
    on w1 (remote) at about t+2.5; at 2 bytes/s the wait is 1 + 5.5 s and it runs on w2,
    local, once w2 is free."""
    from dsml.master import jobrouter

    if rate is not None:
        monkeypatch.setattr(jobrouter, "LOCALITY_RATE", rate)
    sim = make(workers=("w1", "w2"), replication=1, slots=1)
    client = sim.client()
    sim.kill("w1")
    sim.wait(client.upload("data/in.bin", b"input bytes"))
    sim.restart("w1")
    sim.wait_registered()
    busy = sim.wait(client.submit(tasks=[{"command": ["b"], "env": env(duration=d)}
                                         for d in (1.5, 6.0)]))
    sim.until(lambda: len(sim.events("start", busy)) == 2, what="both workers busy")
    assert {e.task_index: e.worker for e in sim.events("start", busy)} == {0: "w1", 1: "w2"}
    job = sim.wait(client.submit(["use"], inputs=[("data/in.bin", "in.bin")], env=env()))
    status = sim.wait(client.wait(job))
    assert status["state"] == "succeeded"
    [start] = sim.events("start", job)
    [w2_end] = [e.time + 6.0 for e in sim.events("start", busy) if e.worker == "w2"]
    if rate is None:
        assert start.worker == "w1" and start.time < w2_end
        assert status["locality"] == {"local": 0, "remote": 1}
    else:
        assert start.worker == "w2" and start.time >= w2_end
        assert status["locality"] == {"local": 1, "remote": 0}


def test_wide_task_waits_for_enough_free_slots(make: Make) -> None:
    """Two workers of two slots, three narrow tasks running (w1 full, w2 half): a 2-slot
    task waits until one worker has two free slots, and at every step of the clock no
    worker holds more slots than it has."""
    sim = make(workers=("w1", "w2"), replication=1, slots=2)

    def within_slots() -> None:
        for runner in sim.runners.values():
            assert runner.used() <= runner.slots, (runner.name, runner.running())

    sim.checks.append(within_slots)
    client = sim.client()
    narrow = sim.wait(
        client.submit(tasks=[{"command": ["n"], "env": env(duration=d)} for d in (3, 5, 8)])
    )
    sim.until(lambda: len(sim.events("start", narrow)) == 3, what="three narrow starts")
    placed = {e.task_index: e.worker for e in sim.events("start", narrow)}
    assert placed == {0: "w1", 1: "w1", 2: "w2"}
    wide = sim.wait(client.submit(["w"], slots=2, env=env(duration=1)))
    assert sim.wait(client.wait(wide))["state"] == "succeeded"
    assert sim.wait(client.wait(narrow))["state"] == "succeeded"
    [start] = sim.events("start", wide)
    ends = {e.task_index: e.time for e in sim.events("end", narrow)}
    assert start.worker == "w1" and max(ends[0], ends[1]) <= start.time < ends[2]
    assert sim.runners["w1"].peak == 2
    no_start_failures(sim)


def test_too_wide_task_is_refused_at_submit(make: Make) -> None:
    """A task wider than every worker could never run: the submit is refused with a
    reason naming the slots (rather than left queued with nothing said), and narrower
    work runs as usual."""
    sim = make(workers=("w1",), replication=1, slots=2)
    client = sim.client()
    with pytest.raises(DsmlError) as e:
        sim.wait(client.submit(["huge"], slots=3))
    assert e.value.code == "bad-job" and "needs 3 CPUs" in e.value.message
    assert "at most 2 CPUs on a worker" in e.value.message
    small = sim.wait(client.submit(["small"], array=3))
    assert sim.wait(client.wait(small))["state"] == "succeeded"


# -- what status says -------------------------------------------------------------------


def test_status_says_why_each_task_waits(make: Make) -> None:
    """``waiting_for`` in ``status`` (and in a ``wait`` answered at its timeout), from the
    workers at the time of asking: a queued task waits for "1 CPU free on a worker (K
    tasks queued ahead)"; once the only worker wide enough dies, a wide one waits for "a
    worker with 2 CPUs (no live worker has that much ...)"; with no worker alive, every queued task
    for "no live worker"; a task ``after`` other jobs for "jobs ... to succeed"; running
    tasks for nothing."""
    sim = make(workers=("w1", "w2"), replication=1, slots={"w1": 3, "w2": 1})
    client = sim.client()
    busy = sim.wait(client.submit(["long"], array=6, env=env(duration=1000)))
    sim.until(lambda: len(sim.events("start", busy)) == 4, what="four starts")
    wide = sim.wait(client.submit(["wide"], slots=2, env=env(duration=1)))
    after = sim.wait(client.submit(["after"], after=[busy, wide]))

    def why(job: str) -> list[tuple[str, str]]:
        return [(t["state"], t["waiting_for"]) for t in sim.wait(client.status(job))["tasks"]]

    assert why(busy) == [("running", "")] * 4 + [
        ("queued", "1 CPU free on a worker (0 tasks queued ahead)"),
        ("queued", "1 CPU free on a worker (1 task queued ahead)"),
    ]
    assert why(wide) == [("queued", "2 CPUs free on a worker (2 tasks queued ahead)")]
    assert why(after) == [("waiting", f"jobs {busy}, {wide} to succeed")]
    not_final = sim.wait(client.wait(wide, timeout=1))
    assert [t["waiting_for"] for t in not_final["tasks"]] == [
        "2 CPUs free on a worker (2 tasks queued ahead)"]

    sim.kill("w1")  # its three attempts are lost, their tasks queued again at their places
    sim.until(lambda: sim.state("w1") == "dead", what="w1 dead")
    assert why(wide) == [("queued", "a worker with 2 CPUs (no live worker has that much:"
                                    " at most 1 CPU on a worker)")]
    assert [w for s, w in why(busy) if s == "queued"] == [
        f"1 CPU free on a worker ({k} {'task' if k == 1 else 'tasks'} queued ahead)"
        for k in range(5)
    ]

    sim.kill("w2")
    sim.until(lambda: sim.state("w2") == "dead", what="w2 dead")
    assert why(busy) == [("queued", "no live worker")] * 6
    assert why(wide) == [("queued", "no live worker")]
    assert why(after) == [("waiting", f"jobs {busy}, {wide} to succeed")]


def test_a_failed_attempt_shows_the_tail_of_its_stderr(make: Make) -> None:
    """What a failing task wrote last to stderr reaches ``status`` (worker result, master,
    SQLite), numbered per task, and is still there after a master restart; a task that
    succeeds shows none, whatever it wrote."""
    sim = make()
    client = sim.client()
    noisy = {**env(exit_code=3), "SIM_STDERR": "first\nboom\n"}
    failing = sim.wait(client.submit(["boom"], max_attempts=2, env=noisy, retry_on=["exit"]))
    fine = sim.wait(client.submit(["fine"], env={**env(), "SIM_STDERR": "just a warning\n"}))
    final = sim.wait(client.wait(failing))
    assert final["state"] == "failed"
    assert [(a["number"], a["exit_code"], a["stderr_tail"]) for a in attempts(final)] == [
        (1, 3, "first\nboom\n"),
        (2, 3, "first\nboom\n"),
    ]
    assert [a["stderr_tail"] for a in attempts(sim.wait(client.wait(fine)))] == [""]
    sim.restart_master()
    sim.wait_registered()
    assert sim.wait(client.status(failing)) == final


# -- logs, volume -------------------------------------------------------------------------


def test_logs_come_from_the_worker_that_ran_the_attempt(make: Make) -> None:
    """``logs`` finds the attempt's worker through the master and reads its stdout."""
    sim = make()
    client = sim.client()
    job = sim.wait(client.submit(["hello"], env=env(stdout="hello from a fake task\n")))
    sim.wait(client.wait(job))
    assert sim.wait(client.logs(job)) == b"hello from a fake task\n"
    assert sim.wait(client.logs(job, stream="stderr")) == b""


def test_burst_of_a_thousand_tiny_tasks(make: Make) -> None:
    """1,000 tiny tasks (ten jobs of 100, submitted at once) over three workers: every task
    succeeds, each started exactly once, and the master commits it all in far fewer
    transactions than there were state changes (group commit)."""
    sim = make(slots=4)
    assert sim.master is not None
    commits = sim.master.jobs.commits
    client = sim.client()
    submits = [client.submit([f"tiny{j}"], array=100, env=env(duration=0.01)) for j in range(10)]
    jobs = [sim.wait(d) for d in submits]
    finals = [sim.wait(client.wait(job), timeout=600) for job in jobs]
    assert [f["state"] for f in finals] == ["succeeded"] * 10
    for job, final in zip(jobs, finals, strict=True):
        started_once_each(sim, job, 100)
        assert all(states(final, i) == ["succeeded"] for i in range(100))
    assert len([r for r in sim.results if r.taken]) == 1000
    assert {e.worker for e in sim.events("start")} == {"w1", "w2", "w3"}
    # Per task: queued (submit), an attempt started, its result; plus each job's states.
    changes = 3 * 1000 + 3 * 10
    used = sim.master.jobs.commits - commits
    assert used * 10 < changes, (used, changes)
    no_start_failures(sim)
