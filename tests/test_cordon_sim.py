"""Cordons on the whole simulated cluster (dsml.testing.sim): a black-hole worker, whose
every attempt fails at once, stops getting tasks and ``nodes`` says why; a broken job
cordons nobody."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsml.master.cordon import COOL_DOWN, STREAK
from dsml.testing.sim import FakeRun, SimCluster

BAD = "workspace: Not a directory"


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[list[SimCluster]]:
    made: list[SimCluster] = []
    yield made
    for sim in made:
        failures = sim.failures.messages()
        sim.close()
        assert failures == [], "bugs were logged during the run"


def black_hole(worker: str, spec: Any) -> FakeRun:
    """w2 fails every attempt at once (as a worker whose task directory is unusable)."""
    if worker == "w2":
        return FakeRun(duration=0.0, exit_code=None, reason=BAD)
    return FakeRun(duration=1.0)


def cordon_of(sim: SimCluster, client: Any) -> dict[str, str]:
    return {n.name: n.cordoned for n in sim.wait(client.nodes())}


def test_a_black_hole_worker_is_cordoned_and_the_job_succeeds_elsewhere(
    tmp_path: Path, sims: list[SimCluster]
) -> None:
    sim = SimCluster(tmp_path / "c", workers=("w1", "w2"), script=black_hole)
    sims.append(sim)
    client = sim.client()
    job = sim.wait(client.submit(["work"], array=20, max_attempts=3))
    final = sim.wait(client.wait(job))
    assert final["state"] == "succeeded"
    won = Counter(a["worker"] for t in final["tasks"] for a in t["attempts"]
                  if a["state"] == "succeeded")
    assert won == {"w1": 20}
    burned = [a for t in final["tasks"] for a in t["attempts"] if a["state"] == "failed"]
    assert {a["worker"] for a in burned} == {"w2"}
    # The streak, and at most a slot's worth already on its way.
    assert STREAK <= len(burned) <= STREAK + 2, len(burned)
    # A retry was never given to the worker its last attempt failed on.
    for t in final["tasks"]:
        assert len(t["attempts"]) <= 2
    why = cordon_of(sim, client)
    assert why["w1"] == ""
    assert why["w2"].startswith(f"{STREAK} attempts in a row failed within 2 s")
    assert BAD in why["w2"]

    # Alone with the cordoned worker: tasks wait, and say why.
    sim.kill("w1")
    sim.advance(15)
    second = sim.wait(client.submit(["more"], array=2, max_attempts=3))
    sim.advance(2)
    status = sim.wait(client.status(second))
    assert [t["waiting_for"] for t in status["tasks"]] == ["every live worker is cordoned"] * 2
    assert status["counts"].get("queued") == 2

    # The cool-down passes: the cordon lifts by itself and w2 is fed again (and, as the
    # last live worker, is not cordoned again whatever it does).
    sim.advance(COOL_DOWN)
    assert cordon_of(sim, client)["w2"] == ""
    final = sim.wait(client.wait(second))
    assert final["state"] == "failed"
    assert {a["worker"] for t in final["tasks"] for a in t["attempts"]} == {"w2"}


def test_a_broken_job_cordons_no_worker(tmp_path: Path, sims: list[SimCluster]) -> None:
    def script(worker: str, spec: Any) -> FakeRun:
        if dict(spec.env).get("BROKEN"):
            return FakeRun(duration=0.0, exit_code=1)
        return FakeRun(duration=1.0)

    sim = SimCluster(tmp_path / "c", workers=("w1", "w2", "w3"), script=script)
    sims.append(sim)
    client = sim.client()
    broken = sim.wait(client.submit(["false"], array=40, env={"BROKEN": "1"},
                                    retry_on=["exit"], max_attempts=2))
    assert sim.wait(client.wait(broken))["state"] == "failed"
    assert set(cordon_of(sim, client).values()) == {""}
    good = sim.wait(client.submit(["work"], array=12))
    final = sim.wait(client.wait(good))
    assert final["state"] == "succeeded"
    assert {a["worker"] for t in final["tasks"] for a in t["attempts"]} == {"w1", "w2", "w3"}
