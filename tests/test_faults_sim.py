"""Issue #12's defects, reproduced on the simulated cluster (dsml.testing.sim) and fixed.

Each test here drives the production master and workers through the fault that showed
the defect in the real multi-host runs, and checks the invariant it broke.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsml.errors import DsmlError
from dsml.testing.sim import FakeRun, SimCluster
from dsml.testing.sim.tasks import output_bytes
from dsml.worker.tasks import AttemptSpec


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[list[SimCluster]]:
    made: list[SimCluster] = []
    yield made
    for sim in made:
        failures = sim.failures.messages()
        sim.close()
        assert failures == [], "bugs were logged during the run"
        assert sim.net.errors == []


def first_attempt_slow(slow: float, fast: float = 2.0) -> Any:
    """A script: the first attempt of every task runs ``slow`` seconds, later ones ``fast``."""
    seen: set[tuple[str, int]] = set()

    def script(worker: str, spec: AttemptSpec) -> FakeRun:
        task = (spec.job_id, spec.task_index)
        first = task not in seen
        seen.add(task)
        return FakeRun(duration=slow if first else fast)

    return script


@pytest.mark.parametrize("late", [0.0, 5.0, 30.0])
def test_a_paused_workers_late_output_never_replaces_the_committed_one(
    tmp_path: Path, sims: list[SimCluster], late: float
) -> None:
    """SIGSTOP a worker past heartbeat_timeout while its attempt runs; the task is
    retried elsewhere and succeeds, with its outputs; SIGCONT the worker after its own
    attempt's end (``late`` seconds after): its overdue attempt ends at once and tries to
    store its outputs before the kill order reaches it.  The master refuses them
    (``fenced``): the stored outputs are exactly the committed attempt's."""
    sim = SimCluster(tmp_path / "c", workers=("w1", "w2"), heartbeat_timeout=10.0,
                     slots=1, move_outputs=True, script=first_attempt_slow(40.0))
    sims.append(sim)
    client = sim.client()
    outputs = [("out-a", "out/a"), ("out-b", "out/b")]
    job = sim.wait(client.submit(["work"], outputs=outputs))
    sim.until(lambda: sim.events("start", job), what="the first start")
    first = sim.events("start", job)[0]
    sim.advance(1)
    sim.pause(first.worker)
    sim.until(lambda: len(sim.events("start", job)) == 2, what="the retry")
    final = sim.wait(client.wait(job))
    assert final["state"] == "succeeded"
    retry = sim.events("start", job)[1]
    assert retry.worker != first.worker
    committed = [a for a in final["tasks"][0]["attempts"] if a["state"] == "succeeded"]
    assert [a["id"] for a in committed] == [retry.attempt_id]

    # Past the paused attempt's own end: it is overdue when the worker continues.
    sim.advance(max(0.0, first.time + 40.0 - sim.clock.seconds()) + late)
    sim.resume(first.worker)
    sim.until(lambda: sim.registered(first.worker), timeout=120, what="re-registration")
    sim.advance(30)  # uploads retried, repair settled

    ends = [e for e in sim.events("end", job) if e.attempt_id == first.attempt_id]
    assert ends, "the paused attempt never ended"
    for _, key in outputs:
        assert sim.wait(client.download(key)) == output_bytes(
            retry.worker, retry.attempt_id, key
        ), f"{key} is not the committed attempt's output"
    status = sim.wait(client.status(job))
    assert [a["state"] for a in status["tasks"][0]["attempts"]] == ["lost", "succeeded"]


def test_an_attempt_may_place_only_its_own_declared_outputs(
    tmp_path: Path, sims: list[SimCluster]
) -> None:
    """``place`` with an Attempt header: refused for an attempt that is not running, and
    for a key the attempt's task did not declare; granted for a declared output."""
    sim = SimCluster(tmp_path / "c", workers=("w1", "w2"), slots=1,
                     script=lambda w, s: FakeRun(duration=50.0))
    sims.append(sim)
    client = sim.client()
    job = sim.wait(client.submit(["work"], outputs=[("o", "out/o")]))
    sim.until(lambda: sim.events("start", job), what="the start")
    aid = sim.events("start", job)[0].attempt_id
    writer = sim.client()

    def place(key: str, attempt: int) -> Any:
        return sim.wait(writer._ask_master("place", {"Key": key, "Size": 3, "Attempt": attempt}))

    ordinary = sim.wait(client.placement("out/o", 3))  # no attempt named: any key
    for key, attempt in (("out/other", aid), ("out/o", aid + 1000)):
        with pytest.raises(DsmlError) as refused:
            place(key, attempt)
        assert refused.value.code == "fenced", refused.value
    granted = place("out/o", aid)
    assert int(granted.headers["version"]) > ordinary[1]
    sim.wait(client.cancel(job))
    with pytest.raises(DsmlError) as fenced:
        place("out/o", aid)
    assert fenced.value.code == "fenced"
    assert "not running" in fenced.value.message




def test_a_worker_that_dies_while_the_master_is_down_loses_its_attempts(
    tmp_path: Path, sims: list[SimCluster]
) -> None:
    """Found by the nemesis (seed 10): a worker that died while the master was down
    never registers again, so it is never declared dead, and the attempts the master's
    journal holds as running there stayed "running" for ever.  Now, heartbeat_timeout
    after the master starts, they are lost and their tasks run elsewhere."""
    sim = SimCluster(tmp_path / "c", workers=("w1", "w2"), heartbeat_timeout=10.0, slots=1,
                     script=lambda w, s: FakeRun(duration=20.0))
    sims.append(sim)
    client = sim.client()
    job = sim.wait(client.submit(["work"], array=2))
    sim.until(lambda: len(sim.events("start", job)) == 2, what="both starts")
    assert {e.worker for e in sim.events("start", job)} == {"w1", "w2"}
    sim.advance(2)  # the attempts are in the master's journal
    sim.kill_master()
    sim.kill("w1")  # for good, while nobody is listening
    sim.advance(5)
    sim.start_master()
    sim.wait_registered(["w2"])
    final = sim.wait(client.wait(job), timeout=120)
    assert final["state"] == "succeeded"
    lost = [a for t in final["tasks"] for a in t["attempts"] if a["state"] == "lost"]
    assert [a["worker"] for a in lost] == ["w1"], [t["attempts"] for t in final["tasks"]]


@pytest.mark.parametrize("fault", ["pause", "cut"])
def test_a_master_cut_off_past_the_timeout_keeps_its_running_attempts(
    tmp_path: Path, sims: list[SimCluster], fault: str
) -> None:
    """The master paused, or its network silent, for longer than heartbeat_timeout: it
    hears no worker at all.  It used to declare them all dead, requeue every running
    attempt (finished ones waiting to report included) and make every worker register
    again.  Now it holds its verdict until a worker is heard, and nothing is lost."""
    sim = SimCluster(tmp_path / "c", workers=("w1", "w2"), heartbeat_timeout=10.0, slots=2,
                     script=lambda w, s: FakeRun(duration=20.0))
    sims.append(sim)
    client = sim.client()
    job = sim.wait(client.submit(["work"], array=4))
    sim.until(lambda: len(sim.events("start", job)) == 4, what="every start")
    sim.advance(2)
    (sim.pause if fault == "pause" else sim.silence)("master")
    sim.advance(13)  # past heartbeat_timeout, short of TCP's user timeout (15 s)
    (sim.resume if fault == "pause" else sim.unsilence)("master")
    final = sim.wait(client.wait(job), timeout=120)
    assert final["state"] == "succeeded"
    assert [len(t["attempts"]) for t in final["tasks"]] == [1, 1, 1, 1]
    assert all(sim.state(w) == "alive" for w in ("w1", "w2"))
    assert len(sim.events("start", job)) == 4


def test_a_restarted_master_takes_no_write_below_the_replication_factor(
    tmp_path: Path, sims: list[SimCluster]
) -> None:
    """Right after a master restart, writes were acknowledged with one replica in the
    moment before the second worker registered again (placement by min(replication,
    live)).  Now, within a heartbeat timeout of its start, a master that knew enough
    workers refuses such a write (``unavailable``: try again) and, once they are back,
    places it on as many as the factor asks."""
    sim = SimCluster(tmp_path / "c", workers=("w1", "w2"), heartbeat_timeout=10.0)
    sims.append(sim)
    client = sim.client()
    sim.wait(client.set("k", b"before"))
    sim.kill("w2")
    sim.restart_master()
    sim.wait_registered(["w1"])
    with pytest.raises(DsmlError) as refused:
        sim.wait(client.set("k", b"one copy"))
    assert refused.value.code == "unavailable"
    sim.start_worker("w2")
    sim.wait_registered(["w1", "w2"])
    stored = sim.wait(client.set("k", b"two copies"))
    assert stored.replicas == 2 and sim.replicas()["k"] == {"w1", "w2"}
    # Past the grace, a cluster that really lost a worker takes writes on those it has.
    sim.kill("w2")
    sim.advance(11)
    assert sim.wait(client.set("k", b"degraded")).replicas == 1
