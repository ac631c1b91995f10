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


@pytest.mark.parametrize(("fault", "length"), [("pause", 13.0), ("cut", 13.0), ("pause", 40.0),
                                               ("cut", 40.0)])
def test_a_master_cut_off_past_the_timeout_keeps_its_running_attempts(
    tmp_path: Path, sims: list[SimCluster], fault: str, length: float
) -> None:
    """The master paused, or its network silent, for longer than heartbeat_timeout: it
    hears no worker at all.  It used to declare them all dead, requeue every running
    attempt (finished ones waiting to report included) and make every worker register
    again.  Now it holds its verdict until a worker is heard, and nothing is lost.
    Past TCP's user timeout (15 s) the links break too: a link that dies of silence
    leaves its worker to the heartbeat timeout (found by the nemesis's needless-loss
    check in 6 of 12 seeds), and the worker, back on a new link, keeps its attempts."""
    sim = SimCluster(tmp_path / "c", workers=("w1", "w2"), heartbeat_timeout=10.0, slots=2,
                     script=lambda w, s: FakeRun(duration=20.0))
    sims.append(sim)
    client = sim.client()
    job = sim.wait(client.submit(["work"], array=4))
    sim.until(lambda: len(sim.events("start", job)) == 4, what="every start")
    sim.advance(2)
    (sim.pause if fault == "pause" else sim.silence)("master")
    sim.advance(length)  # past heartbeat_timeout; 40 s: past TCP's user timeout too
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


def test_a_restarted_master_counts_only_workers_with_room_known(
    tmp_path: Path, sims: list[SimCluster]
) -> None:
    """Both workers are back, but one has not said it has room (its first heartbeat
    after registering, or a disk that is full): within the grace the master still takes
    no write below the factor (nemesis seed 42 found a write acknowledged with one copy
    0.4 s after a restart)."""
    sim = SimCluster(tmp_path / "c", workers=("w1", "w2"), heartbeat_timeout=10.0)
    sims.append(sim)
    client = sim.client()
    sim.wait(client.set("k", b"before"))
    sim.restart_master()
    sim.workers["w2"].master.free_disk = lambda: 0
    sim.wait_registered(["w1", "w2"])
    sim.advance(1.5)
    with pytest.raises(DsmlError) as refused:
        sim.wait(client.set("k", b"one copy"))
    assert refused.value.code == "unavailable"
    sim.advance(10)
    assert sim.wait(client.set("k", b"degraded")).replicas == 1


def test_an_old_incarnation_replaying_its_link_changes_nothing(
    tmp_path: Path, sims: list[SimCluster]
) -> None:
    """A worker's earlier process speaks again: everything its old link sent (auth,
    register, heartbeats, reports, task results), byte for byte, on a new connection
    from its host.  The master refuses the registration (the name is live on another
    link) and everything after it; the worker's record, jobs and keys are unchanged."""
    sim = SimCluster(tmp_path / "c", workers=("w1", "w2"), slots=1,
                     script=lambda w, s: FakeRun(duration=1.0))
    sims.append(sim)
    sim.record_links()
    sim.restart("w1")  # the recorded link is the one this process opens
    sim.wait_registered()
    client = sim.client()
    sim.wait(client.set("k", b"v"))
    job = sim.wait(client.submit(["work"], array=2))
    assert sim.wait(client.wait(job))["state"] == "succeeded"
    before = sim._master().membership.get("w1")
    assert before is not None
    incarnation, results = before.incarnation, len(sim.results)
    sim.restart("w1")
    sim.wait_registered()
    now = sim._master().membership.get("w1")
    assert now is not None and now.incarnation > incarnation
    heard = len(sim.failures.messages())
    assert sim.replay_old_link("w1")
    sim.advance(5)
    after = sim._master().membership.get("w1")
    assert after is now and after.incarnation == now.incarnation and after.live
    assert all(not r.taken for r in sim.results[results:])
    assert sim.wait(client.get("k")) == b"v"
    assert len(sim.failures.messages()) == heard


@pytest.mark.parametrize("fault", ["full", "io"])
def test_a_failing_disk_is_answered_cleanly_and_reads_go_elsewhere(
    tmp_path: Path, sims: list[SimCluster], fault: str
) -> None:
    """A worker whose disk is full or returns I/O errors: writes through it fail with a
    clear code and no bug logged (an I/O error was an 'internal' traceback before: the
    nemesis's disk-io episodes found it), reads of keys it holds come from the other
    replica, and once the disk works again so does the worker."""
    sim = SimCluster(tmp_path / "c", workers=("w1", "w2"))
    sims.append(sim)
    client = sim.client()
    sim.wait(client.set("k", b"before"))
    sim.disk_fault("w1", fault)
    with pytest.raises(DsmlError) as refused:
        sim.wait(client.set("k", b"during"))
    assert refused.value.code in ("disk-full", "io-error", "replication-failed",
                                  "outcome-unknown"), refused.value
    for _ in range(4):  # whichever replica is tried first
        assert sim.wait(client.get("k")) in (b"before", b"during")
    sim.disk_fault("w1", None)
    assert sim.wait(client.set("k", b"after")).replicas == 2
    assert sim.read("w1", "k") == b"after"


def test_a_power_loss_takes_what_the_worker_had_not_synced_and_the_cluster_mends_it(
    tmp_path: Path, sims: list[SimCluster]
) -> None:
    """A worker loses power right after acknowledging a value (before its one-second
    sync): its values log is cut back (the simulated disk keeps only what was made
    durable), so it comes back without that write; the master learns so from its
    inventory and copies the current version back; every read meanwhile is right."""
    sim = SimCluster(tmp_path / "c", workers=("w1", "w2", "w3"))
    sims.append(sim)
    client = sim.client()
    sim.wait(client.set("k", b"old"))
    sim.advance(2)  # synced: durable
    sim.wait(client.set("k", b"new"))
    holders = sorted(sim.replicas()["k"])
    victim = holders[0]
    sim.power_off(victim)
    (when, who, undone), = sim.power_losses
    assert who == victim and any(u.startswith("values log cut") for u in undone), undone
    assert sim.wait(client.get("k")) == b"new"
    sim.restart(victim)
    sim.wait_registered()
    sim.until(lambda: len(sim.replicas()["k"]) == 2 and all(
        sim.read(w, "k") == b"new" for w in sim.replicas()["k"]), timeout=60)
    assert sim.wait(client.get("k")) == b"new"


def test_the_simulated_disk_undoes_a_rename_whose_directory_was_not_fsynced(
    tmp_path: Path, sims: list[SimCluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's object files are fsynced, renamed in and their directory fsynced
    before the index row commits: a power loss keeps them.  Planted without the
    directory fsync (a classic bug), the power loss takes the object back out: the
    model sees what a real disk might forget."""
    from dsml.worker import store as store_module

    sim = SimCluster(tmp_path / "c", workers=("w1", "w2"), replication=1)
    sims.append(sim)
    client = sim.client()
    sim.wait(client.upload("kept", b"x" * 5000))
    (holder,) = sim.replicas()["kept"]
    sim.power_off(holder)
    assert sim.power_losses[-1][2] == []
    sim.restart(holder)
    sim.wait_registered()
    assert sim.read(holder, "kept") == b"x" * 5000

    monkeypatch.setattr(store_module, "_fsync_dir", lambda path: None)
    sim.wait(client.upload("lost", b"y" * 5000))
    (holder,) = sim.replicas()["lost"]
    sim.power_off(holder)
    undone = sim.power_losses[-1][2]
    assert any(u.startswith("rename undone: objects/") for u in undone), undone
    monkeypatch.undo()
    sim.failures.events.clear()  # the restarted store may complain of its lost object


WALLS = {"master": 420.0, "w1": -300.0, "w2": 35.0, "w3": 0.0}


@pytest.mark.parametrize(("who", "step"), [("w1", -120.0), ("w1", 120.0), ("master", 120.0),
                                           ("master", -120.0)])
def test_a_step_of_a_wall_clock_declares_no_live_worker_dead(
    tmp_path: Path, sims: list[SimCluster], who: str, step: float
) -> None:
    """Found by the nemesis with two-minute clock steps (seeds 1021 and 18 with
    ``--clock-steps 120``): every timer ran on its machine's wall clock, as a Twisted
    reactor's do, so a worker whose clock stepped back 2 minutes sent no heartbeat for
    2 minutes and was declared dead with its attempts, and a step forward ran every
    timer it passed at once.  The daemons' timers now run on the monotonic clock
    (:mod:`dsml.clocks`), as the simulation's do: a step moves only the wall-clock
    records (an attempt's times), and nothing is lost."""
    sim = SimCluster(tmp_path / "c", workers=("w1", "w2", "w3"), heartbeat_timeout=10.0,
                     slots=1, wall_clocks=WALLS, script=lambda w, s: FakeRun(duration=30.0))
    sims.append(sim)
    client = sim.client()
    job = sim.wait(client.submit(["work"], array=3))
    sim.until(lambda: len(sim.events("start", job)) == 3, what="every start")
    sim.advance(2)
    sim.jump_clock(who, step)
    sim.advance(20)  # twice the heartbeat timeout
    assert all(sim.state(w) == "alive" for w in ("w1", "w2", "w3"))
    final = sim.wait(client.wait(job), timeout=120)
    assert final["state"] == "succeeded"
    assert [len(t["attempts"]) for t in final["tasks"]] == [1, 1, 1]
    # The master stamps records by its wall clock: a step of its own shows in them.
    attempt = final["tasks"][0]["attempts"][0]
    took = attempt["ended"] - attempt["started"]
    assert took == pytest.approx(30.0 + (step if who == "master" else 0.0), abs=3.0)


def test_a_dead_worker_is_declared_dead_in_time_after_the_masters_clock_steps_back(
    tmp_path: Path, sims: list[SimCluster]
) -> None:
    """Seed 1021 with ``--clock-steps 120``: the master's clock stepped back 95 s held
    its liveness checks as long, and a worker that lost power was not declared dead
    for a minute and a half.  On the monotonic clock, it is within the timeout."""
    sim = SimCluster(tmp_path / "c", workers=("w1", "w2", "w3"), heartbeat_timeout=10.0,
                     wall_clocks=WALLS)
    sims.append(sim)
    sim.jump_clock("master", -95.0)
    sim.advance(1)
    sim.kill("w2", half_open=True)  # power lost: only the silence tells
    took = sim.until(lambda: sim.state("w2") == "dead", timeout=30, what="w2 dead")
    assert took <= 10.0 + 2.0
    assert sim.state("w1") == sim.state("w3") == "alive"


def test_an_acknowledged_value_survives_a_newer_write_whose_only_copy_is_lost(
    tmp_path: Path, sims: list[SimCluster]
) -> None:
    """Found by the nemesis (seed 42 ``--clock-steps 0`` at ca985b1: "after healing,
    v/c1/2 cannot be read").  Write 8 is acknowledged on w2 and w3; write 9 (its commit
    lost: outcome unknown to the client) lands on w3 alone, whose report made it
    current; w2 comes back from a power loss with its copy of 8, which was trimmed as
    stale at once; w3 then dies for good before 9 was copied, and the key was lost
    although a durable copy of the acknowledged write 8 had existed.  Now the stale copy
    waits until the current version has its copies, and a lost version that was never
    committed gives way to the newest surviving copy (never to one behind a committed
    version)."""
    sim = SimCluster(tmp_path / "c", workers=("w2", "w3"), heartbeat_timeout=10.0)
    sims.append(sim)
    client = sim.client()
    v8 = sim.wait(client.set("v/k", b"8")).version
    assert sim.replicas()["v/k"] == {"w2", "w3"}
    sim.advance(2)  # synced on both: durable
    sim.power_off("w2")
    sim.until(lambda: sim.state("w2") == "dead", timeout=30, what="w2 dead")

    # Write 9: placed on w3 alone, stored and reported there, its commit lost.
    writer = sim.client("writer")
    commit = writer._commit

    async def lost_commit(*args: Any) -> None:
        sim.net.partition("writer", "master")
        await commit(*args)

    writer._commit = lost_commit  # type: ignore[method-assign]
    with pytest.raises(DsmlError) as unknown:
        sim.wait(writer.set("v/k", b"9"), timeout=120)
    assert unknown.value.code == "outcome-unknown", unknown.value
    sim.net.heal("writer", "master")
    master = sim._master()
    v9, _ = master.directory.current("v/k") or (0, "")
    assert v9 > v8 and sim.replicas()["v/k"] == {"w3"}

    # w2 comes back with its copy of 8 while w3 cannot reach it (no copy of 9 to w2).
    sim.net.partition("w2", "w3")
    sim.restart("w2")
    sim.wait_registered(["w2", "w3"])
    sim.advance(3)
    kept = sim.stored("w2").get("v/k")
    assert kept is not None and kept.version == v8, "the only copy of write 8 was trimmed"
    sim.kill("w3")  # for good
    sim.net.heal("w2", "w3")
    sim.advance(30)  # w3 past the repairer's grace: 9 has no copy left anywhere
    assert sim.wait(sim.client().get("v/k")) == b"8"
    assert master.directory.current("v/k") == (v8, sim.stored("w2")["v/k"].sha256)
