"""Membership: registration rules, heartbeats, suspect/dead detection on a monotonic clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from dsml.master.membership import (
    ALIVE,
    DEAD,
    SUSPECT,
    Membership,
    MembershipError,
    Versions,
    WorkerRecord,
)

V = Versions(dsml="0.1.0", protocol=1)
INTERVAL = 1.0
TIMEOUT = 10.0
EPS = 1e-3


class Conn:
    """A stand-in for a worker's connection (membership only compares identities)."""

    def __init__(self, label: str = "") -> None:
        self.label = label

    def __repr__(self) -> str:
        return f"<Conn {self.label}>"


class Harness:
    """A Membership on a Clock, with its listener calls recorded."""

    def __init__(self, *, wall: Clock | None = None, **kwargs: object) -> None:
        self.mono = Clock()
        self.wall = wall if wall is not None else self.mono
        self.m = Membership(
            clock=self.wall,
            monotonic=self.mono.seconds,
            versions=V,
            heartbeat_interval=INTERVAL,
            heartbeat_timeout=TIMEOUT,
            **kwargs,  # type: ignore[arg-type]
        )
        self.alive_calls: list[tuple[str, int]] = []
        self.dead_calls: list[tuple[str, int, str | None]] = []
        self.m.on_alive.append(lambda r: self.alive_calls.append((r.name, r.incarnation)))
        self.m.on_dead.append(
            lambda r: self.dead_calls.append((r.name, r.incarnation, r.dead_reason))
        )
        self.conns: dict[str, Conn] = {}

    def register(
        self, name: str, incarnation: int = 1, conn: Conn | None = None, versions: Versions = V
    ) -> WorkerRecord:
        conn = conn if conn is not None else Conn(f"{name}#{incarnation}")
        record = self.m.register(
            name, incarnation, host="10.0.0.1", port=7500, slots=4, versions=versions, conn=conn
        )
        self.conns[name] = conn  # only once accepted
        return record

    def beat(self, name: str, incarnation: int = 1, conn: Conn | None = None) -> WorkerRecord:
        return self.m.heartbeat(
            name,
            incarnation,
            free_slots=2,
            stored_bytes=100,
            stored_files=3,
            free_disk=10**9,
            conn=conn if conn is not None else self.conns[name],
        )

    def advance(self, seconds: float) -> None:
        """Move both clocks (they are one Clock unless a separate wall clock was given)."""
        self.mono.advance(seconds)
        if self.wall is not self.mono:
            self.wall.advance(seconds)


def test_dead_after_timeout_and_not_before() -> None:
    """Silent for timeout - eps: not dead; past the timeout: dead, on_dead fired exactly once."""
    h = Harness()
    h.register("w1")
    h.advance(TIMEOUT - EPS)
    assert h.m.check() == []
    assert h.m.get("w1").state in (ALIVE, SUSPECT)
    assert h.dead_calls == []
    h.advance(2 * EPS)
    dead = h.m.check()
    assert [r.name for r in dead] == ["w1"]
    assert h.m.get("w1").state == DEAD
    assert h.m.get("w1").dead_reason == "heartbeat timeout"
    assert h.dead_calls == [("w1", 1, "heartbeat timeout")]
    # Later checks do not report it again.
    h.advance(100)
    assert h.m.check() == []
    assert len(h.dead_calls) == 1
    assert h.m.alive() == [] and h.m.live() == []


def test_dead_by_the_loop_within_half_an_interval() -> None:
    """With start(), death is detected by the loop no later than timeout + interval/2."""
    h = Harness()
    h.m.start()
    h.register("w1")
    for _ in range(int((TIMEOUT - EPS) / (INTERVAL / 2))):
        h.advance(INTERVAL / 2)
    assert h.dead_calls == []
    h.advance(INTERVAL / 2)
    assert h.dead_calls == [("w1", 1, "heartbeat timeout")]
    h.m.stop()
    assert not h.m.running


def test_suspect_in_between_then_alive_again() -> None:
    """No heartbeat for 3 intervals: suspect (not in alive()); a heartbeat makes it alive."""
    h = Harness()
    h.register("w1")
    h.advance(3 * INTERVAL - EPS)
    h.m.check()
    assert h.m.get("w1").state == ALIVE
    h.advance(2 * EPS)
    h.m.check()
    rec = h.m.get("w1")
    assert rec.state == SUSPECT
    assert h.m.alive() == [] and h.m.live() == [rec]
    h.beat("w1")
    assert rec.state == ALIVE and h.m.alive() == [rec]
    assert rec.seconds_since_heartbeat(h.mono.seconds()) == 0
    assert rec.free_slots == 2 and rec.stored_bytes == 100 and rec.stored_files == 3
    assert h.dead_calls == []
    assert h.alive_calls == [("w1", 1)]  # suspect -> alive does not fire on_alive


def test_suspect_after_is_configurable() -> None:
    """suspect_after overrides the 3-interval default; it must stay below the timeout."""
    h = Harness(suspect_after=5.0)
    h.register("w1")
    h.advance(4.9)
    h.m.check()
    assert h.m.get("w1").state == ALIVE
    h.advance(0.2)
    h.m.check()
    assert h.m.get("w1").state == SUSPECT
    with pytest.raises(ValueError):
        Harness(suspect_after=TIMEOUT)
    with pytest.raises(ValueError):
        Membership(
            clock=Clock(),
            monotonic=Clock().seconds,
            versions=V,
            heartbeat_interval=2.0,
            heartbeat_timeout=1.0,
        )


def test_heartbeats_on_time_never_kill_over_a_long_run() -> None:
    """1,000 s of heartbeats every interval, jitter up to half the timeout: nobody dies."""
    rng = random.Random(1)
    h = Harness()
    h.m.start()
    names = [f"w{i}" for i in range(20)]
    for n in names:
        h.register(n)
    # Each worker's next heartbeat is due one interval after its last, plus jitter in
    # [0, timeout/2): the longest silence is interval + timeout/2 < timeout.
    due = {n: INTERVAL + rng.uniform(0, TIMEOUT / 2) for n in names}
    step = 0.05
    t = 0.0
    while t < 1000.0:
        h.advance(step)
        t = h.mono.seconds()
        for n in names:
            if t >= due[n]:
                h.beat(n)
                due[n] = t + INTERVAL + rng.uniform(0, TIMEOUT / 2 - 2 * step)
    assert h.m.running
    assert h.dead_calls == []
    assert all(r.state != DEAD for r in h.m.all())


def test_a_raising_listener_stops_neither_the_loop_nor_other_listeners() -> None:
    """An on_dead listener that raises is logged; the loop runs on and later deaths are seen."""
    h = Harness()
    seen: list[str] = []

    def bad(record: WorkerRecord) -> None:
        raise RuntimeError("listener bug")

    h.m.on_dead.insert(0, bad)
    h.m.on_dead.append(lambda r: seen.append(r.name))
    h.m.on_alive.insert(0, bad)
    h.m.start()
    h.register("w1")
    h.register("w2")
    assert h.alive_calls == [("w1", 1), ("w2", 1)]  # after the raising on_alive listener
    for _ in range(6):
        h.advance(1.0)
        h.beat("w2")
    for _ in range(10):
        h.advance(0.5)
        h.beat("w2")
    assert seen == ["w1"]
    assert h.m.running
    for _ in range(25):
        h.advance(0.5)
    assert seen == ["w1", "w2"]
    assert [c[0] for c in h.dead_calls] == ["w1", "w2"]
    assert h.m.running
    assert len(h.wall.getDelayedCalls()) == 1  # the loop's next call is still scheduled


def test_a_failing_check_does_not_end_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even if check() itself raised, the LoopingCall keeps running."""
    h = Harness()
    h.m.start()
    calls = []

    def boom() -> list[WorkerRecord]:
        calls.append(1)
        raise RuntimeError("check bug")

    monkeypatch.setattr(h.m, "check", boom)
    h.advance(0.5)
    h.advance(0.5)
    assert len(calls) == 2
    assert h.m.running


def test_connection_lost_kills_at_once() -> None:
    """A closed connection makes its worker dead without waiting for the timeout."""
    h = Harness()
    rec = h.register("w1")
    h.register("w2")
    assert h.m.connection_lost(h.conns["w1"]) is rec
    assert rec.state == DEAD and rec.dead_reason == "connection lost"
    assert h.dead_calls == [("w1", 1, "connection lost")]
    assert [r.name for r in h.m.alive()] == ["w2"]
    # Again, or an unknown connection: nothing.
    assert h.m.connection_lost(h.conns["w1"]) is None
    assert h.m.connection_lost(Conn("stranger")) is None
    assert len(h.dead_calls) == 1
    # The timeout later does not kill it a second time.
    h.advance(TIMEOUT + 1)
    assert [r.name for r in h.m.check()] == ["w2"]
    assert [c[0] for c in h.dead_calls] == ["w1", "w2"]


def test_reregistration_after_death_with_higher_incarnation() -> None:
    """Dead, then registered again at incarnation 2: alive, new record, on_alive fired."""
    h = Harness()
    old = h.register("w1", 1)
    h.m.connection_lost(h.conns["w1"])
    h.advance(0.1)
    new = h.register("w1", 2)
    assert new is not old
    assert new.state == ALIVE and new.incarnation == 2
    assert old.state == DEAD and old.incarnation == 1
    assert h.m.get("w1") is new
    assert h.alive_calls == [("w1", 1), ("w1", 2)]
    assert h.beat("w1", 2) is new


def test_reconnect_with_same_incarnation_after_death() -> None:
    """A process whose connection dropped may come back with its own incarnation."""
    h = Harness()
    h.register("w1", 5)
    h.m.connection_lost(h.conns["w1"])
    rec = h.register("w1", 5)
    assert rec.state == ALIVE and rec.incarnation == 5
    assert h.alive_calls == [("w1", 5), ("w1", 5)]


def test_lower_incarnation_is_stale_even_after_death() -> None:
    """Once incarnation 3 registered, incarnation 2 is refused, alive or dead."""
    h = Harness()
    h.register("w1", 3)
    with pytest.raises(MembershipError) as e:
        h.register("w1", 2)
    assert e.value.code == "stale-incarnation"
    h.m.connection_lost(h.conns["w1"])
    with pytest.raises(MembershipError) as e:
        h.register("w1", 2)
    assert e.value.code == "stale-incarnation"
    assert "3" in e.value.message and "2" in e.value.message


def test_heartbeat_with_old_incarnation_or_other_connection_is_refused() -> None:
    """After a restart, the old incarnation's heartbeats and a foreign connection are refused."""
    h = Harness()
    c1 = Conn("old")
    h.register("w1", 1, conn=c1)
    h.m.connection_lost(c1)
    c2 = Conn("new")
    h.register("w1", 2, conn=c2)
    with pytest.raises(MembershipError) as e:
        h.beat("w1", 1, conn=c1)
    assert e.value.code == "stale-incarnation"
    with pytest.raises(MembershipError) as e:
        h.beat("w1", 2, conn=Conn("intruder"))
    assert e.value.code == "not-registered"
    with pytest.raises(MembershipError) as e:
        h.beat("w1", 3, conn=c2)
    assert e.value.code == "not-registered"
    h.beat("w1", 2, conn=c2)
    assert h.m.get("w1").state == ALIVE


def test_heartbeat_before_registration_is_refused() -> None:
    """A heartbeat from a name never registered is 'not-registered'."""
    h = Harness()
    with pytest.raises(MembershipError) as e:
        h.beat("ghost", 1, conn=Conn())
    assert e.value.code == "not-registered"
    assert h.m.get("ghost") is None


def test_heartbeat_after_timeout_death_is_refused() -> None:
    """A worker declared dead must register again; its late heartbeat does not revive it."""
    h = Harness()
    h.register("w1")
    h.advance(TIMEOUT + 1)
    h.m.check()
    with pytest.raises(MembershipError) as e:
        h.beat("w1")
    assert e.value.code == "not-registered"
    assert "heartbeat timeout" in e.value.message
    assert h.m.get("w1").state == DEAD
    rec = h.register("w1", 1, conn=h.conns["w1"])
    assert rec.state == ALIVE


def test_duplicate_name_on_another_live_connection_is_refused() -> None:
    """A name alive on another connection is refused, even with a higher incarnation."""
    h = Harness()
    c1 = Conn("first")
    first = h.register("w1", 1, conn=c1)
    for inc in (1, 2):
        with pytest.raises(MembershipError) as e:
            h.register("w1", inc, conn=Conn("second"))
        assert e.value.code == "duplicate-name"
    assert h.m.get("w1") is first and first.state == ALIVE
    assert h.alive_calls == [("w1", 1)]
    # Still refused while merely suspect.
    h.advance(5)
    h.m.check()
    assert first.state == SUSPECT
    with pytest.raises(MembershipError) as e:
        h.register("w1", 2, conn=Conn("second"))
    assert e.value.code == "duplicate-name"
    # Once the first one's connection is gone, the restart gets in.
    h.m.connection_lost(c1)
    assert h.register("w1", 2, conn=Conn("second")).state == ALIVE


def test_same_connection_reregister_is_idempotent_or_replaces() -> None:
    """On its own connection, the same incarnation refreshes; a higher one replaces."""
    h = Harness()
    c = Conn()
    rec = h.register("w1", 1, conn=c)
    h.advance(5)
    h.m.check()
    assert rec.state == SUSPECT
    again = h.register("w1", 1, conn=c)
    assert again is rec and rec.state == ALIVE and rec.last_heartbeat == 5
    assert h.alive_calls == [("w1", 1)] and h.dead_calls == []
    newer = h.register("w1", 2, conn=c)
    assert newer is not rec and rec.state == DEAD
    assert h.dead_calls == [("w1", 1, "replaced by a newer incarnation")]
    assert h.alive_calls == [("w1", 1), ("w1", 2)]
    assert h.m.connection_lost(c) is newer


def test_one_connection_carries_one_worker() -> None:
    """A connection that carries a live worker cannot register another name."""
    h = Harness()
    c = Conn()
    h.register("w1", conn=c)
    with pytest.raises(MembershipError) as e:
        h.register("w2", conn=c)
    assert e.value.code == "already-registered"
    assert h.m.get("w2") is None


def test_version_mismatch_names_both_versions() -> None:
    """A different dsml or protocol version is refused, naming what differs and both values."""
    h = Harness()
    with pytest.raises(MembershipError) as e:
        h.register("w1", versions=Versions("0.2.0", 1))
    assert e.value.code == "version-mismatch"
    msg = e.value.message
    assert "dsml version" in msg and "0.2.0" in msg and "0.1.0" in msg
    assert "protocol version" not in msg
    with pytest.raises(MembershipError) as e:
        h.register("w1", versions=Versions("0.1.0", 7))
    msg = e.value.message
    assert "protocol version: worker 7, master 1" in msg and "dsml version" not in msg
    with pytest.raises(MembershipError) as e:
        h.register("w1", versions=Versions("0.0.9", 2))
    msg = e.value.message
    assert "dsml version: worker 0.0.9, master 0.1.0" in msg
    assert "protocol version: worker 2, master 1" in msg
    assert h.m.get("w1") is None and h.alive_calls == []


@pytest.mark.parametrize(
    "field, value",
    [
        ("name", ""),
        ("name", "a/b"),
        ("name", "x" * 65),
        ("incarnation", -1),
        ("incarnation", True),
        ("port", 0),
        ("port", 70000),
        ("slots", -1),
        ("slots", 2.5),
        ("host", ""),
        ("host", "a\nb"),
        ("fn_runtime", "python 3.11\r\nX: y"),
        ("fn_runtime", "x" * 129),
        ("fn_runtime", None),
    ],
)
def test_malformed_registration_is_bad_header(field: str, value: object) -> None:
    """Malformed registration fields are refused with 'bad-header'."""
    h = Harness()
    args: dict[str, object] = dict(
        name="w1", incarnation=1, host="h", port=1, slots=1, versions=V, conn=Conn()
    )
    args[field] = value
    with pytest.raises(MembershipError) as e:
        h.m.register(**args)  # type: ignore[arg-type]
    assert e.value.code == "bad-header"


def test_what_a_worker_runs_functions_with_is_kept() -> None:
    h = Harness()
    r = h.m.register("w1", 1, host="h", port=1, slots=1, versions=V, conn=Conn(),
                     fn_runtime="python 3.11 cloudpickle 3.1.1")
    assert r.fn_runtime == "python 3.11 cloudpickle 3.1.1"


def test_wall_clock_jump_kills_nobody() -> None:
    """The reactor clock jumps an hour while monotonic time moves normally: nobody dies."""
    wall = Clock()
    h = Harness(wall=wall)
    h.m.start()
    for n in ("w1", "w2", "w3"):
        h.register(n)
    for _ in range(10):
        h.advance(0.5)
        for n in ("w1", "w2", "w3"):
            h.beat(n)
    wall.advance(3600.0)  # the wall clock alone: the loop fires, check() sees no silence
    for _ in range(20):
        h.advance(0.5)
        for n in ("w1", "w2", "w3"):
            h.beat(n)
    assert h.dead_calls == []
    assert [r.name for r in h.m.alive()] == ["w1", "w2", "w3"]
    assert h.m.running
    # ... while monotonic silence still kills, the loop driven by the jumped clock
    # (w3 still beats: the master is not cut off, w1 and w2 are).
    for _ in range(2 * int(TIMEOUT) + 1):
        h.advance(0.5)
        h.beat("w3")
    assert sorted(c[0] for c in h.dead_calls) == ["w1", "w2"]


def test_every_worker_silent_at_once_is_the_master_cut_off() -> None:
    """Two or more live workers all overdue at once: the master holds its verdict (it is
    the likelier one cut off); the first worker heard gives every other a whole timeout
    from then; one that stays silent then dies.  A lone silent worker dies as ever."""
    h = Harness()
    for n in ("w1", "w2", "w3"):
        h.register(n)
    h.advance(3 * TIMEOUT)
    assert h.m.check() == [] and h.m.isolated
    assert h.dead_calls == []
    h.beat("w1")
    assert not h.m.isolated
    h.advance(TIMEOUT - EPS)
    h.beat("w1")
    h.beat("w2")
    assert h.m.check() == []
    h.advance(2 * EPS)
    assert [r.name for r in h.m.check()] == ["w3"]
    lone = Harness()
    lone.register("w1")
    lone.advance(TIMEOUT + EPS)
    assert [r.name for r in lone.m.check()] == ["w1"]


def test_a_thousand_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 workers heartbeating: right answers; only the silent ones die, all at once."""
    h = Harness()
    h.m.start()
    names = [f"w{i:04d}" for i in range(1000)]
    for n in names:
        h.register(n)
    silent = set(names[::7])
    for _ in range(30):
        h.advance(INTERVAL)
        for n in names:
            if n not in silent:
                h.beat(n)
    assert {c[0] for c in h.dead_calls} == silent
    assert len(h.dead_calls) == len(silent)
    alive = h.m.alive()
    assert [r.name for r in alive] == [n for n in names if n not in silent]
    assert len(h.m.all()) == 1000
    # With everybody on time, a check stops at the oldest live worker: one look, not n.
    looks = []
    real = WorkerRecord.seconds_since_heartbeat

    def counting(self: WorkerRecord, now: float) -> float:
        looks.append(self.name)
        return real(self, now)

    monkeypatch.setattr(WorkerRecord, "seconds_since_heartbeat", counting)
    assert h.m.check() == []
    assert len(looks) == 1
    # The first five go quiet: the walk looks at the overdue ones and one on-time worker.
    h.advance(4 * INTERVAL)
    for n in names[5:]:
        if n not in silent:
            h.beat(n)
    looks.clear()
    assert h.m.check() == []
    overdue = [n for n in names[:5] if n not in silent]
    assert len(looks) == len(overdue) + 1
    assert all(h.m.get(n).state == SUSPECT for n in overdue)


# -- property: random interleavings -------------------------------------------------------

WORKERS = ["a", "b", "c", "d"]

op = st.one_of(
    st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=1.0)),
    st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=12.0)),
    st.tuples(st.just("beat"), st.sampled_from(WORKERS)),
    st.tuples(st.just("lose"), st.sampled_from(WORKERS)),
    st.tuples(st.just("register"), st.sampled_from(WORKERS)),
    st.tuples(st.just("check"), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=120))
def test_random_interleavings_keep_liveness_honest(ops: list[tuple[str, object]]) -> None:
    """Random heartbeats, time steps, connection losses and restarts, checked after each step.

    After check(): nobody is live whose last heartbeat is older than the timeout; nobody is
    dead whose last heartbeat is within timeout - interval, unless its connection was lost;
    each death is reported to on_dead exactly once.
    """
    h = Harness()
    h.m.start()
    incarnation = dict.fromkeys(WORKERS, 0)
    conn_lost: dict[str, bool] = {}
    deaths: list[WorkerRecord] = []
    h.m.on_dead.append(deaths.append)
    for w in WORKERS:
        incarnation[w] = 1
        h.register(w, 1)
        conn_lost[w] = False
    for kind, arg in ops:
        if kind == "advance":
            assert isinstance(arg, float)
            h.advance(arg)
        elif kind == "beat":
            assert isinstance(arg, str)
            rec = h.m.get(arg)
            if rec is not None and rec.state != DEAD and rec.conn is not None:
                h.beat(arg, incarnation[arg])
            else:
                with pytest.raises(MembershipError):
                    h.beat(arg, incarnation[arg])
        elif kind == "lose":
            assert isinstance(arg, str)
            rec = h.m.get(arg)
            was_live = rec is not None and rec.state != DEAD
            silent = rec is not None and rec.seconds_since_heartbeat(h.mono.seconds()) >= (
                h.m.suspect_after)
            attached = rec is not None and rec.conn is not None
            got = h.m.connection_lost(h.conns[arg])
            if was_live and attached and silent:
                # A link that died of silence: detached, left to the heartbeat timeout.
                assert got is None and rec.live and rec.conn is None
            elif was_live and attached:
                assert got is rec and rec.state == DEAD
                conn_lost[arg] = True
            else:
                assert got is None
        elif kind == "register":
            assert isinstance(arg, str)
            rec = h.m.get(arg)
            if rec is not None and (rec.state == DEAD or rec.conn is None):
                incarnation[arg] += 1
                again = h.register(arg, incarnation[arg])
                assert again.live and again.conn is h.conns[arg]
                conn_lost[arg] = False
            else:
                with pytest.raises(MembershipError) as e:
                    h.register(arg, incarnation[arg] + 1)
                assert e.value.code == "duplicate-name"
        h.m.check()
        now = h.mono.seconds()
        for w in WORKERS:
            rec = h.m.get(w)
            assert rec is not None
            silence = rec.seconds_since_heartbeat(now)
            if rec.state != DEAD:
                if h.m.isolated:
                    continue  # every live worker overdue: the verdicts are held
                assert silence < TIMEOUT
                assert rec.state == (ALIVE if silence < 3 * INTERVAL else SUSPECT)
            elif not conn_lost[w]:
                assert rec.dead_reason == "heartbeat timeout"
                assert rec.died_at is not None
                # Never dead while heard from within timeout - interval (nor within timeout).
                assert rec.died_at - rec.last_heartbeat >= TIMEOUT
    event(f"deaths: {sorted({r.dead_reason or '' for r in deaths})}")
    assert len(deaths) == len({id(r) for r in deaths})
    assert all(r.state == DEAD for r in deaths)


def test_a_link_that_dies_of_silence_leaves_its_worker_to_the_timeout() -> None:
    """A link closed while its worker is heard: dead at once (a process exited).  A link
    closed after the worker went silent (TCP's user timeout): the worker stays live,
    without a link, and registers again on a new one in place (nothing dies); if it is
    never heard again the heartbeat timeout declares it dead."""
    h = Harness()
    h.register("w1")
    h.register("w2")
    h.advance(INTERVAL)
    h.beat("w1")
    assert h.m.connection_lost(h.conns["w1"]) is h.m.get("w1")  # heard: dead at once
    h.advance(h.m.suspect_after)
    assert h.m.connection_lost(h.conns["w2"]) is None  # silent: detached
    rec = h.m.get("w2")
    assert rec is not None and rec.live and rec.conn is None
    again = h.register("w2", 2)
    assert again is rec and rec.incarnation == 2 and rec.live
    assert h.dead_calls == [("w1", 1, "connection lost")]
    h.advance(INTERVAL)
    h.beat("w2", 2)
    h.advance(h.m.suspect_after)
    assert h.m.connection_lost(h.conns["w2"]) is None
    h.advance(TIMEOUT)
    assert [r.name for r in h.m.check()] == ["w2"]
