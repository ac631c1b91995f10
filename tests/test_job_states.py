"""The states of jobs, tasks and attempts: their stored text, and the transition tables
the job manager checks at every change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from dsml.master.jobs import (
    ATTEMPT_STATES,
    FINAL,
    JOB_STATES,
    QUEUED,
    TASK_STATES,
    AttemptState,
    IllegalTransition,
    JobManager,
    JobSpec,
    JobState,
    TaskSpec,
    TaskState,
)
from dsml.master.jobs.states import ATTEMPT_NEXT, JOB_NEXT, TASK_NEXT


def test_states_are_their_stored_text() -> None:
    """Values, order, str(), format() and JSON are the strings stored and sent."""
    assert JOB_STATES == ("queued", "running", "succeeded", "failed", "cancelled")
    assert TASK_STATES == ("waiting", "queued", "running", "succeeded", "failed", "cancelled")
    assert ATTEMPT_STATES == ("running", "succeeded", "failed", "lost", "timeout", "cancelled")
    s = TaskState.QUEUED
    assert (str(s), f"{s}", f"{s:>7}") == ("queued", "queued", " queued")
    assert json.dumps({s: s}) == '{"queued": "queued"}'
    assert {"queued": 1}[s] == 1 and JobState.QUEUED == TaskState.QUEUED == "queued"


@pytest.mark.parametrize(
    ("enum", "table"), [(JobState, JOB_NEXT), (TaskState, TASK_NEXT), (AttemptState, ATTEMPT_NEXT)]
)
def test_every_state_has_a_row_and_final_states_are_final(enum: type, table: dict) -> None:
    assert set(table) == set(enum)
    for state, following in table.items():
        assert following <= set(enum)
        assert state not in following
        if state in FINAL or (enum is AttemptState and state != "running"):
            assert following == frozenset()


def test_an_illegal_transition_is_a_bug_that_raises(tmp_path: Path) -> None:
    """The manager refuses a change the table does not allow, before changing anything."""
    jm = JobManager(tmp_path, Clock(), synchronous="OFF")
    try:
        jm.submit(JobSpec("j", (TaskSpec(("true",)),)))
        task = jm._jobs[1].tasks[0]
        with pytest.raises(IllegalTransition, match=r"task j1\[0\]: queued -> succeeded"):
            jm._set_state(task, TaskState.SUCCEEDED)
        assert task.state is TaskState.QUEUED and jm.queued == 1
        assert isinstance(IllegalTransition("x"), AssertionError)
    finally:
        jm.close()


def test_states_read_back_from_disk_are_members(tmp_path: Path) -> None:
    """After a restart the live records hold enum members, so the tables apply to them."""
    clock = Clock()
    jm = JobManager(tmp_path, clock, synchronous="OFF")
    jm.submit(JobSpec("j", (TaskSpec(("true",)), TaskSpec(("true",)))))
    jm.next_assignments("w1", 1, 1)
    jm.close()
    jm = JobManager(tmp_path, clock, synchronous="OFF")
    try:
        job = jm._jobs[1]
        assert job.state is JobState.RUNNING
        assert [t.state for t in job.tasks] == [TaskState.RUNNING, QUEUED]
        assert all(type(t.state) is TaskState for t in job.tasks)
        assert job.tasks[0].attempts[0].state is AttemptState.RUNNING
    finally:
        jm.close()
