"""The multi-host fault scenarios (dsml.testing.netbed): real hosts in network namespaces.

By default one scenario runs, shortened (a worker killed with -9 4 s into a 20 s
workload and started again 10 s later, past the 6 s heartbeat timeout), so that the
test bed cannot rot; ``make test-faults`` runs every scenario three times at full length
(a 40 s workload, the fault at 8 s, the scenario's own length):

    DSML_FAULT_SCENARIOS=all DSML_FAULT_RUNS=3 .venv/bin/python -m pytest tests/test_faults_hosts.py

Each run checks the recorded history as the simulation does (no acknowledged write lost,
no write answered "failed" read back, reads never going back), every job ended, no task
with two successes, no stale output, and the cluster converged (every key at its
replication) after the fault healed.  Needs root, iproute2 and nftables (``make test``
installs nftables when it runs as root); elsewhere the tests skip and say why.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from dsml.testing.netbed import HEADER, SCENARIOS, can_build, run_scenario

pytestmark = pytest.mark.processes


@functools.cache
def why_not() -> str:
    return can_build()


def chosen() -> list[str]:
    names = os.environ.get("DSML_FAULT_SCENARIOS", "kill-worker")
    return [s.name for s in SCENARIOS] if names == "all" else names.split(",")


RUNS = int(os.environ.get("DSML_FAULT_RUNS", "1"))
#: The default suite's run: the workload, the fault's start and length (seconds).
QUICK = {"workload": 20.0, "fault_at": 4.0, "length": 10.0}


@pytest.mark.parametrize("run", range(1, RUNS + 1))
@pytest.mark.parametrize("name", chosen())
def test_fault_scenario(name: str, run: int, tmp_path: Path) -> None:
    if why_not():
        pytest.skip(f"no test hosts on this machine: {why_not()}")
    scenario = next(s for s in SCENARIOS if s.name == name)
    quick = QUICK if "DSML_FAULT_SCENARIOS" not in os.environ else {}
    r = run_scenario(scenario, tmp_path, run, seed=run, **quick)  # type: ignore[arg-type]
    print(f"\n{HEADER}\n{r.row()}")
    assert not r.violations, [f"[{v.checker}] {v.message}" for v in r.violations[:10]]
    assert not r.problems, r.problems[:10]
    assert (r.lost, r.double_successes, r.stale_outputs) == (0, 0, 0)
    assert r.converge_s is not None
