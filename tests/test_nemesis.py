"""The nemesis (dsml.testing.nemesis): seeds replay, the checkers fail when they should,
and the CI share of seeds: every seed that ever failed, then new ones for a time budget.

    DSML_NEMESIS_BUDGET=600 .venv/bin/python -m pytest tests/test_nemesis.py   # longer

The budget (wall seconds, default 82) bounds the new seeds; the seeds in
``tests/nemesis_seeds.txt`` (each once found a defect, now fixed) always run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dsml.testing import faultplan, nemesis
from dsml.testing.history import Op, check_history
from dsml.testing.nemesis import Episode, Run
from dsml.testing.sim import FakeRun

SEEDS_FILE = Path(__file__).with_name("nemesis_seeds.txt")
MINUTES = 3.0


def known_seeds() -> list[int]:
    out = []
    for line in SEEDS_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(int(line))
    return out


@pytest.mark.parametrize("seed", known_seeds())
def test_a_seed_that_once_failed_passes(seed: int, tmp_path: Path) -> None:
    out = nemesis.run(seed, MINUTES, root=tmp_path)
    assert out.ok, out.report()


def test_new_seeds_for_the_budget(tmp_path: Path) -> None:
    """As many new seeds as fit in the budget (from DSML_NEMESIS_FIRST, default 1000)."""
    budget = float(os.environ.get("DSML_NEMESIS_BUDGET", "82"))
    seed = int(os.environ.get("DSML_NEMESIS_FIRST", "1000"))
    start = time.monotonic()
    ran = 0
    while ran == 0 or time.monotonic() - start < budget:
        out = nemesis.run(seed, MINUTES, root=tmp_path / str(seed))
        assert out.ok, out.report()
        ran += 1
        seed += 1
    print(f"{ran} nemesis seeds in {time.monotonic() - start:.0f} s")


def test_a_seed_replays_identically(tmp_path: Path) -> None:
    a = nemesis.run(3, 1.5, root=tmp_path / "a")
    b = nemesis.run(3, 1.5, root=tmp_path / "b")
    assert [op.line() for op in a.ops] == [op.line() for op in b.ops]
    assert a.digest == b.digest
    assert a.episodes == b.episodes == nemesis.schedule(3, 1.5)


def test_schedules_cover_every_fault_kind() -> None:
    kinds = {e.kind for seed in range(1, 30) for e in nemesis.schedule(seed, 3.0)}
    assert kinds == set(faultplan.KINDS) | {"slow-disk", "replay", "disk-full", "disk-io",
                                            "clock-jump"}
    every = [e for seed in range(1, 30) for e in nemesis.schedule(seed, 3.0)]
    # Master crashes at any moment and right after a place, a commit, a submit; power
    # cuts at any moment and right after a write.
    assert {e.at for e in every if e.kind == "master-crash"} == {"", "place", "commit",
                                                                "submit"}
    assert {e.flag for e in every if e.kind == "power"} == {False, True}
    for seed in range(1, 30):
        eps = nemesis.schedule(seed, 3.0)
        busy: dict[str, float] = {}
        for e in eps:
            assert e.start + e.length <= 180.0
            if e.kind in ("slow-disk", "replay", "disk-full", "disk-io", "clock-jump"):
                continue  # may overlap anything on its worker
            for n in (e.target, e.other):
                if n and n not in nemesis.CLIENTS:
                    assert busy.get(n, 0.0) <= e.start, f"two faults at once on {n}: {e}"
                    busy[n] = e.start + e.length


# -- the checkers, on histories made by hand ------------------------------------------------


def _check(ops: list[Op]) -> list[str]:
    return [v.checker for v in check_history(ops)]


def _op(i: int, kind: str, seq: int, began: int, ended: int, outcome: str = "ok") -> Op:
    return Op(i, "c1", kind, "v/k", seq, float(began), float(ended), outcome, "", began, ended)


def test_checker_accepts_a_correct_history() -> None:
    ops = [_op(0, "set", 1, 0, 1), _op(1, "get", 1, 2, 3), _op(2, "set", 2, 4, 6, "unknown"),
           _op(3, "get", 2, 5, 7), _op(4, "get", 2, 8, 9)]
    assert _check(ops) == []


def test_checker_finds_a_lost_acknowledged_write() -> None:
    ops = [_op(0, "set", 1, 0, 1), _op(1, "set", 2, 2, 3), _op(2, "get", 1, 4, 5)]
    assert _check(ops) == ["durability"]


def test_checker_finds_a_failed_write_that_became_visible() -> None:
    ops = [_op(0, "set", 1, 0, 1), _op(1, "set", 2, 2, 3, "failed"), _op(2, "get", 2, 4, 5)]
    assert _check(ops) == ["failed-visible"]


def test_checker_finds_a_read_going_back_in_version() -> None:
    ops = [_op(0, "set", 1, 0, 1), _op(1, "set", 2, 2, 8, "unknown"),
           _op(2, "get", 2, 3, 4), _op(3, "get", 1, 5, 6)]
    assert _check(ops) == ["monotonic"]


def test_checker_finds_a_hung_call() -> None:
    ops = [_op(0, "set", 1, 0, 1)]
    ops.append(Op(1, "c1", "get", "v/k", -1, 2.0, None, "pending", "", 2, -1))
    assert _check(ops) == ["hang"]


def test_checker_finds_a_stale_output_and_a_double_success(tmp_path: Path) -> None:
    """A run whose fencing is planted away (a stale attempt's outputs accepted): the
    outputs checker names it (seed 2, found by the sweep below; see the module doc)."""
    run = Run(tmp_path / "c", 2, 1.0, episodes=[Episode(5.0, 40.0, "pause", "w1")])
    run.sim.master.router.check_output = lambda *a: None  # type: ignore[union-attr,method-assign]
    run.sim.script = lambda w, s: FakeRun(duration=30.0 if w == "w1" else 1.0)
    try:
        out = run.go()
    finally:
        run.close()
    assert "outputs" in {v.checker for v in out.violations}, out.report()


def test_the_readme_fault_commands_run_as_written() -> None:
    """The README's Faults block, verbatim: the nemesis lines and the mutation listing run
    (and succeed); ``make test-faults`` (root, half an hour) is only dry-run here, and
    runs for real in ``tests/test_faults_hosts.py``'s scenario."""
    import re
    import subprocess

    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text()
    section = text[text.index("## Faults"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    lines = [ln.strip() for ln in block.group(1).splitlines() if ln.strip()]
    assert "make test-faults" in lines
    for line in lines:
        if line == "make test-faults":
            line = "make -n test-faults"
        else:
            assert line.startswith(".venv/bin/python "), line
        r = subprocess.run(["bash", "-c", line], cwd=root, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{line}: {r.stdout[-800:]}{r.stderr[-800:]}"
