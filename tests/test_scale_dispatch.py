"""A crowd of free slots is fed a bounded number of tasks per reactor turn (issue #11):
a submit to a thousand idle workers must not send a thousand run orders in one turn.

The simulated cluster (production code over a fake network and one Clock)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dsml.master import jobrouter
from dsml.testing.sim import SimCluster


def test_dispatch_sends_at_most_a_bounded_number_per_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobrouter, "DISPATCH_PER_TURN", 5)
    sim = SimCluster(tmp_path / "c", slots=8)  # three workers, 24 free slots
    try:
        assert sim.master is not None
        router = sim.master.router
        per_call: list[int] = []
        send, dispatch = router._send, router.dispatch
        count = [0]

        def counting_send(record: Any, a: Any) -> None:
            count[0] += 1
            send(record, a)

        def counting_dispatch() -> None:
            count[0] = 0
            dispatch()
            per_call.append(count[0])
        monkeypatch.setattr(router, "_send", counting_send)
        monkeypatch.setattr(router, "dispatch", counting_dispatch)
        client = sim.client()
        long = {"SIM_DURATION": "1000", "SIM_EXIT": "0"}
        job = sim.wait(client.submit(["t"], array=24, env=long))
        sim.clock.advance(0.5)
        assert max(per_call) == 5  # never more in one turn
        assert sum(per_call) == 24  # and every free slot got a task, turn after turn
        assert len(sim.events("start")) == 24
        assert job
    finally:
        sim.close()
