"""Wiring in dependency order: each part is built with what it needs, and the parts that
need each other (the worker's link and its jobs and reports) meet through the link's
registrations (a :class:`MasterSession`, or None when the link is lost), not setters.

Fake clocks and recording links; one ``make_worker_service`` on a MemoryReactorClock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import IServiceCollection
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from dsml.config import load_config
from dsml.worker.link import REPORT_DELAY, MasterLink, MasterSession, StoreReports
from dsml.worker.runner import WorkerJobs
from dsml.worker.service import make_worker_service
from dsml.worker.store import IndexEntry
from dsml.worker.tasks import AttemptResult


class RecordingLink:
    """Stands for the connection to the master: notes each request, answers OK."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, object], bytes]] = []

    def request(self, method: str, headers: dict[str, object], payload: bytes = b"") -> Deferred:
        self.sent.append((method, headers, payload))
        return succeed(None)


class FakeTasks:
    """The part of a task manager WorkerJobs uses: results kept until acknowledged."""

    def __init__(self, on_result: Any) -> None:
        self.on_result = on_result
        self.results: dict[int, AttemptResult] = {}

    def finish(self, attempt_id: int) -> None:
        result = AttemptResult(attempt_id, 0, None, 1.0, 0, "")
        self.results[attempt_id] = result
        self.on_result(result)

    def running(self) -> list[int]:
        return []

    def finished_results(self) -> list[AttemptResult]:
        return list(self.results.values())

    def ack(self, attempt_id: int) -> None:
        self.results.pop(attempt_id, None)

    def free_slots(self) -> int:
        return 2


def test_jobs_build_their_task_manager_with_their_own_callback() -> None:
    """WorkerJobs(clock, make_tasks) hands make_tasks its result callback."""
    made: list[FakeTasks] = []
    jobs = WorkerJobs(Clock(), lambda on_result: made.append(FakeTasks(on_result)) or made[-1])
    assert jobs.tasks is made[0]
    assert made[0].on_result == jobs.on_result


def test_results_go_on_the_current_registration_only() -> None:
    """A result waits while the worker is not registered, goes out (with the session's
    name and incarnation) once it is, and is acknowledged when the master answers."""
    clock = Clock()
    jobs = WorkerJobs(clock, FakeTasks)
    tasks: FakeTasks = jobs.tasks  # type: ignore[assignment]
    tasks.finish(7)
    clock.advance(1)
    link = RecordingLink()
    jobs.session_changed(MasterSession(link, "w1", 3))  # type: ignore[arg-type]
    clock.advance(0)
    [(method, headers, payload)] = link.sent
    assert (method, headers["Name"], headers["Incarnation"]) == ("task_result", "w1", 3)
    assert b'"attempt_id": 7' in payload
    assert tasks.results == {}
    jobs.session_changed(None)
    tasks.finish(8)
    clock.advance(1)
    assert len(link.sent) == 1  # lost: kept for the next registration
    assert list(tasks.results) == [8]


def _entry(key: str) -> IndexEntry:
    return IndexEntry(key, "value", 1, "0" * 64, 5, 0.0)


def test_store_reports_batch_on_the_current_registration() -> None:
    """Changes while unregistered are not queued (the inventory says them); changes
    while registered go in one batch after REPORT_DELAY; a new registration starts over
    from its inventory, and what changed after that was taken goes once it is answered."""
    clock = Clock()
    reports = StoreReports(clock)
    reports.report("store", _entry("before"))
    link = RecordingLink()
    reports.inventory_taken()
    reports.session_changed(MasterSession(link, "w1", 1))  # type: ignore[arg-type]
    reports.report("store", _entry("a"))
    reports.report("delete", _entry("b"))
    clock.advance(REPORT_DELAY)
    [(method, headers, payload)] = link.sent
    assert (method, headers["Incarnation"]) == ("report", 1)
    assert payload.count(b"\n") == 2 and b"before" not in payload
    reports.report("store", _entry("c"))
    reports.inventory_taken()  # "c" is in the new registration's inventory
    reports.report("store", _entry("d"))  # ... "d" is not
    reports.session_changed(MasterSession(link, "w1", 2))  # type: ignore[arg-type]
    clock.advance(REPORT_DELAY)
    [_, (method, headers, payload)] = link.sent
    assert headers["Incarnation"] == 2 and b'"d"' in payload and b'"c"' not in payload


class ThreadlessReactor(MemoryReactorClock):
    """A memory reactor whose thread pool is never used while only building."""

    def getThreadPool(self) -> object:
        return object()


def test_make_worker_service_wires_the_tasks_into_the_link(tmp_path: Path) -> None:
    """The production wiring: the link to the master asks the task manager for free
    slots and running attempts, built without any setter."""
    config_file = tmp_path / "dsml.yaml"
    config_file.write_text(
        "master:\n  port: 0\n  state_dir: state\n"
        "workers:\n  w1:\n    port: 0\n    data_dir: data/w1\n    slots: 3\n"
    )
    top = make_worker_service(load_config(config_file), "w1", ThreadlessReactor())
    assert IServiceCollection.providedBy(top)
    [link] = [s for s in top if isinstance(s, MasterLink)]
    assert link.free_slots() == 3
    assert link.running_attempts() == []
    for s in top:  # close the store; the tasks remove their cgroups (v2, and v1 memory)
        if type(s).__name__ in ("_StoreService", "_TasksService"):
            s.stopService()
