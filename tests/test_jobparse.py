"""A submit payload read a slice of tasks per reactor turn (dsml.master.jobparse): the
same JobSpec or the same refusal as reading it at once, and never more than a slice of
tasks in one turn, so a 100,000-task list cannot hold the master's reactor."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from dsml.master import jobparse
from dsml.master.jobparse import PARSE_SLICE, job_spec_from_payload, job_spec_in_slices
from dsml.master.jobs import JobError
from dsml.master.jobs.slices import Slicer


def sliced(payload: bytes, clock: Clock | None = None) -> Any:
    """What job_spec_in_slices gives (a JobSpec, or the JobError), run to the end."""
    clock = clock or Clock()
    got: list[Any] = []
    job_spec_in_slices(payload, Slicer(clock)).addBoth(got.append)
    while not got:
        clock.advance(0)
    return got[0]


def at_once(payload: bytes) -> Any:
    try:
        return job_spec_from_payload(payload)
    except JobError as e:
        return e


def same(a: Any, b: Any) -> bool:
    if isinstance(a, Failure):
        a = a.value
    if isinstance(a, JobError) or isinstance(b, JobError):
        return isinstance(a, JobError) and isinstance(b, JobError) and a.code == b.code
    return bool(a == b)


task = st.fixed_dictionaries(
    {"command": st.lists(st.text(max_size=5), min_size=1, max_size=3)},
    optional={
        "env": st.dictionaries(st.sampled_from(["A", "B_1"]), st.text(max_size=4), max_size=2),
        "slots": st.integers(1, 4),
        "timeout": st.one_of(st.none(), st.floats(1, 100)),
        "outputs": st.lists(st.tuples(st.just("out"), st.sampled_from(["o/{index}", "k"])),
                            max_size=1),
    },
)
job = st.fixed_dictionaries(
    {"tasks": st.lists(task, max_size=12)},
    optional={"name": st.text(max_size=6), "priority": st.integers(-3, 3),
              "after": st.just([]), "array": st.integers(0, 3)},
)


@settings(max_examples=150, deadline=None)
@given(job=job, indent=st.sampled_from([None, 1]), slice_at=st.sampled_from([1, 3, 500]))
def test_slices_read_the_same_job_as_json_loads(job: dict[str, Any], indent: int | None,
                                                 slice_at: int) -> None:
    payload = json.dumps(job, indent=indent).encode()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jobparse, "PARSE_AT_ONCE", 0)
        mp.setattr(jobparse, "PARSE_SLICE", slice_at)
        assert same(sliced(payload), at_once(payload))


@pytest.mark.parametrize("payload", [
    b"", b"[]", b"{", b'{"tasks": [', b'{"tasks": [{"command": ["x"]}', b'{"tasks": 3}',
    b'{"tasks": [{"command": ["x"]}]} extra', b'{"tasks": [{"command": ["x"]},]}',
    b'{"tasks": [1]}', b'{1: 2}', b'\xff{"tasks": []}', b'{"name": "a"}',
    b'{"tasks": [{"command": ["x"]}], "tasks": 7}', b'{"array": "2", "tasks": [{"command": [1]}]}',
    b'{}', b' { "tasks" : [ ] } ',
    b'{"tasks": [{"command": ["x"], "env": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
])
def test_malformed_payloads_get_the_same_answer(payload: bytes,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobparse, "PARSE_AT_ONCE", 0)
    assert same(sliced(payload), at_once(payload)), payload


def test_a_big_task_list_is_read_a_slice_per_turn() -> None:
    """20,000 explicit tasks: read over at least 20,000 / PARSE_SLICE reactor turns, and
    the result is the job json.loads would make."""
    tasks = [{"command": ["train", f"--seed={i}"], "env": {"I": str(i)}} for i in range(20_000)]
    payload = json.dumps({"name": "sweep", "tasks": tasks}).encode()
    assert len(payload) > jobparse.PARSE_AT_ONCE
    clock = Clock()
    slicer = Slicer(clock)
    got: list[Any] = []
    job_spec_in_slices(payload, slicer).addBoth(got.append)
    assert got == [] and slicer.slices == 0  # nothing read in the request's own turn
    clock.advance(0)  # (task.Clock runs the turns scheduled meanwhile in one advance)
    assert slicer.slices >= 20_000 // PARSE_SLICE  # one callLater(0) turn per slice
    assert got[0] == job_spec_from_payload(payload)
    assert got[0].count == 20_000 and got[0].task(7).command == ("train", "--seed=7")


def test_the_parse_benchmark_runs_small() -> None:
    """benchmarks/submit_parse.py, very small: it prints both rows (and checks that the
    slices read the same job)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "submit_parse.py"),
                        "--tasks", "6000"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "at once (before)" in r.stdout and "500 tasks per turn (now)" in r.stdout
