"""Who may act on a job: its owner, an admin, the master or a worker; anyone over the
token (dsml.net.access), and the worker's memory of each attempt's owner."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock

from dsml.net.access import DEFAULT_ADMINS, TOKEN_OWNER, may_act_on, principal
from dsml.pki import Identity
from dsml.worker import runner
from dsml.worker.runner import WorkerJobs, spec_from_json


def conn(kind: str | None = None, name: str = "") -> SimpleNamespace:
    return SimpleNamespace(identity=None if kind is None else Identity(name, kind, 1))


def test_principal_is_the_certificate_name_or_the_token() -> None:
    assert principal(conn("user", "alice")) == "alice"
    assert principal(conn()) == TOKEN_OWNER == "token"


@pytest.mark.parametrize(
    ("peer", "owner", "allowed"),
    [
        (conn("user", "alice"), "alice", True),
        (conn("user", "bob"), "alice", False),
        (conn("user", "admin"), "alice", True),
        (conn("user", "bob"), None, False),  # an owner not known here: admins only
        (conn("user", "admin"), None, True),
        (conn("user", "bob"), "", False),  # a job from before owners: admins only
        (conn("user", "token"), "alice", False),
        (conn("worker", "w1"), "alice", True),
        (conn("master", "master"), "alice", True),
        (conn(), "alice", True),  # the token: every principal at once
    ],
)
def test_may_act_on(peer: SimpleNamespace, owner: str | None, allowed: bool) -> None:
    assert may_act_on(peer, owner, DEFAULT_ADMINS) is allowed


def test_admins_come_from_the_list() -> None:
    assert may_act_on(conn("user", "carol"), "alice", ("carol",))
    assert not may_act_on(conn("user", "admin"), "alice", ("carol",))


def test_the_run_order_names_the_owner() -> None:
    order = b'{"attempt_id": 7, "job_id": "j1", "task_index": 0, "command": ["true"]'
    assert spec_from_json(order + b', "owner": "alice"}').owner == "alice"
    assert spec_from_json(order + b"}").owner == ""  # an older master: unknown


def test_the_worker_remembers_the_newest_owners(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "MAX_OWNERS", 3)
    jobs = WorkerJobs(Clock())
    for attempt in range(1, 6):
        jobs.started(attempt, f"user{attempt}")
    assert [jobs.owner_of(a) for a in range(1, 6)] == [None, None, "user3", "user4", "user5"]
    jobs.started(6, "")
    assert jobs.owner_of(6) is None
