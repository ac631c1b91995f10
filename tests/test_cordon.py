"""Cordons (dsml.master.cordon): the rule, with explicit times, no cluster."""

from __future__ import annotations

from dsml.master.cordon import COOL_DOWN, FAST, STREAK, STREAK_AFTER_LIFT, Cordons

BAD = "workspace: Not a directory"


def fail(c: Cordons, worker: str, job: int, t: float, *, took: float = 0.01,
         cause: str = "exit", reason: str = BAD, spare: bool = True,
         incarnation: int = 1) -> list[str]:
    return c.ended(worker, incarnation, job, t, t + took, cause, reason, lambda: spare)


def succeed(c: Cordons, worker: str, job: int, t: float, took: float = 5.0,
            incarnation: int = 1) -> list[str]:
    return c.ended(worker, incarnation, job, t, t + took, None)


def test_a_black_hole_is_cordoned_after_a_streak_of_fast_failures() -> None:
    c = Cordons()
    for i in range(STREAK - 1):
        assert fail(c, "w2", 1, float(i)) == []
        assert c.why("w2", float(i) + 1) == ""
    lines = fail(c, "w2", 1, 10.0)
    assert len(lines) == 1 and "w2 cordoned" in lines[0]
    why = c.why("w2", 11.0)
    assert why == f"{STREAK} attempts in a row failed within {FAST:g} s (last: {BAD})"
    assert c.why("w1", 11.0) == ""
    assert c.next_lift() == 10.01 + COOL_DOWN


def test_a_broken_job_cordons_no_worker() -> None:
    # A user's job whose command exits 1 at once everywhere: every worker sees a streak,
    # but the job fails at once on the others too and never succeeds: not the workers'.
    c = Cordons()
    t = 0.0
    for _ in range(4 * STREAK):
        for w in ("w1", "w2", "w3"):
            t += 0.001
            assert not any("cordoned for" in line for line in fail(c, w, 7, t))
    assert [c.why(w, t) for w in ("w1", "w2", "w3")] == ["", "", ""]


def test_a_broken_job_on_one_worker_first_is_exonerated_when_it_fails_elsewhere() -> None:
    # Only w1 was free when the broken job came: it is cordoned, until w2 fails the job
    # at once too.
    c = Cordons()
    for i in range(STREAK):
        fail(c, "w1", 7, float(i))
    assert c.why("w1", 5.0)
    lines = fail(c, "w2", 7, 6.0)
    assert any("w1: cordon lifted" in line for line in lines)
    assert c.why("w1", 6.5) == "" and c.why("w2", 6.5) == ""


def test_a_job_that_succeeded_somewhere_is_not_broken() -> None:
    # Two black holes on one job: it looks broken until it succeeds on a healthy worker.
    c = Cordons()
    for i in range(STREAK):
        fail(c, "w2", 3, float(i))
        fail(c, "w3", 3, float(i) + 0.5)
    assert c.why("w2", 6.0) == "" and c.why("w3", 6.0) == ""
    succeed(c, "w1", 3, 1.0)
    fail(c, "w2", 3, 7.0)
    fail(c, "w3", 3, 7.0)
    assert c.why("w2", 8.0) and c.why("w3", 8.0)


def test_the_last_worker_is_never_cordoned() -> None:
    c = Cordons()
    for i in range(2 * STREAK):
        fail(c, "w1", 1, float(i), spare=False)
    assert c.why("w1", 20.0) == ""
    fail(c, "w1", 1, 21.0, spare=True)
    assert c.why("w1", 22.0)


def test_a_success_or_a_slow_failure_clears_the_streak() -> None:
    c = Cordons()
    for i in range(STREAK - 1):
        fail(c, "w2", 1, float(i))
    succeed(c, "w2", 2, 10.0)
    for i in range(STREAK - 1):
        fail(c, "w2", 1, 20.0 + i)
    fail(c, "w2", 1, 30.0, took=FAST + 1)  # it did run the command
    for i in range(STREAK - 1):
        fail(c, "w2", 1, 40.0 + i)
    assert c.why("w2", 50.0) == ""
    fail(c, "w2", 1, 50.0)
    assert c.why("w2", 51.0)


def test_lost_cancelled_and_timeouts_neither_count_nor_clear() -> None:
    c = Cordons()
    for i in range(STREAK - 1):
        fail(c, "w2", 1, float(i))
    for cause in ("lost", "cancelled", "timeout"):
        fail(c, "w2", 1, 10.0, cause=cause)
        fail(c, "w2", 1, 10.0, cause=cause, took=100.0)
    assert c.why("w2", 11.0) == ""
    fail(c, "w2", 1, 12.0)
    assert c.why("w2", 13.0)


def test_the_cordon_lifts_after_the_cool_down_and_comes_back_sooner() -> None:
    c = Cordons()
    for i in range(STREAK):
        fail(c, "w2", 1, float(i))
    placed = STREAK - 1 + 0.01
    assert c.why("w2", placed + COOL_DOWN - 1)
    assert c.why("w2", placed + COOL_DOWN) == ""  # lifted by the clock alone
    lines = c.lift(placed + COOL_DOWN)
    assert len(lines) == 1 and "w2: cordon lifted" in lines[0]
    assert c.lift(placed + COOL_DOWN + 1) == [] and c.next_lift() is None
    t = placed + COOL_DOWN + 10
    for i in range(STREAK_AFTER_LIFT - 1):
        fail(c, "w2", 1, t + i)
    assert c.why("w2", t + 5) == ""
    fail(c, "w2", 1, t + 5)
    assert "again after a cordon lifted" in c.why("w2", t + 6)


def test_a_success_after_the_lift_ends_the_probation() -> None:
    c = Cordons()
    for i in range(STREAK):
        fail(c, "w2", 1, float(i))
    t = 1000.0
    c.lift(t)
    succeed(c, "w2", 1, t)
    for i in range(STREAK - 1):
        fail(c, "w2", 1, t + 10 + i)
    assert c.why("w2", t + 20) == ""


def test_a_restart_starts_clean() -> None:
    c = Cordons()
    for i in range(STREAK):
        fail(c, "w2", 1, float(i))
    c.registered("w2", 1)  # the same process registering again: still cordoned
    assert c.why("w2", 10.0)
    c.registered("w2", 2)
    assert c.why("w2", 10.0) == "" and c.next_lift() is None
    for i in range(STREAK - 1):
        fail(c, "w2", 1, 20.0 + i, incarnation=2)
    fail(c, "w2", 1, 30.0, incarnation=1)  # the old process's late result: ignored
    assert c.why("w2", 31.0) == ""


def test_what_is_remembered_of_jobs_is_bounded() -> None:
    c = Cordons(jobs_kept=10)
    for job in range(100):
        succeed(c, "w1", job, float(job))
    assert len(c._jobs) == 10
