"""Retention of tombstones (issue #11): old deletes forgotten in slices, and a forgotten
delete never undone by a copy that comes back.

Real SQLite files under tmp_path, the walk on a ``task.Clock``; the real-process test
runs a master with ``retention.tombstones_max_age: 1`` and reads its log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from dsml.config import DEFAULT_TOMBSTONES_MAX_AGE, ConfigError, load_config
from dsml.master.directory import CURRENT, DELETED, Directory
from dsml.master.state import STATE_FILE, MasterState
from dsml.master.tombstones import TombstoneRetention, walk_interval


def sha(key: str, version: int) -> str:
    return hashlib.sha256(f"{key}@{version}".encode()).hexdigest()


def add(d: Directory, key: str, worker: str, version: int) -> str:
    return d.add_replica(key, worker, 10, sha(key, version), version)


class Clocked:
    """A directory whose wall clock the test moves."""

    def __init__(self, path: Path) -> None:
        self.wall = 1000.0
        self.state = MasterState(path, synchronous="OFF")
        self.d = Directory(self.state, now=lambda: self.wall)

    def deleted_key(self, key: str, held: bool = False) -> int:
        """``key`` written on w1, then deleted (its copy trimmed unless ``held``):
        the tombstone's version."""
        v = self.d.next_version()
        assert add(self.d, key, "w1", v) == CURRENT
        stamp = self.d.delete(key)
        if not held:
            self.d.remove_replica(key, "w1")
        return self.state.get_tombstone(key) or stamp


@pytest.fixture
def c(tmp_path: Path) -> Iterator[Clocked]:
    c = Clocked(tmp_path / "state" / STATE_FILE)
    yield c
    c.state.close()


def test_a_slice_forgets_only_old_unheld_tombstones_and_raises_the_watermark(
    c: Clocked,
) -> None:
    old = [c.deleted_key(f"old/{i:04d}") for i in range(25)]
    c.deleted_key("held", held=True)
    c.wall = 5000.0
    c.deleted_key("recent")
    assert c.state.forgotten_below == 0
    n, after = c.state.purge_tombstones(before=2000.0, after="", limit=10)
    assert (n, after) == (9, "old/0008")  # "held" (kept) first, then nine old ones
    assert c.state.forgotten_below == old[8]
    n, after = c.state.purge_tombstones(before=2000.0, after=after, limit=10)
    assert (n, after) == (10, "old/0018")
    assert c.state.forgotten_below == old[18]
    n, after = c.state.purge_tombstones(before=2000.0, after=after, limit=10)
    assert (n, after) == (6, None)  # the last six old ones; "recent" is kept
    assert sorted(t[0] for t in c.state.tombstones()) == ["held", "recent"]
    assert c.state.forgotten_below == max(old)


def test_a_copy_of_a_forgotten_key_comes_back_deleted_not_live(c: Clocked) -> None:
    """A worker away for longer than the retention returns with a copy of a key whose
    tombstone was forgotten: the key is tombstoned again and the copy is to be trimmed;
    once trimmed, the next purge forgets it again.  A newer write of the key is live."""
    v_old = c.d.next_version()
    assert add(c.d, "k", "away", v_old) == CURRENT
    c.d.remove_replica("k", "away")  # the master forgot the worker (its copy unknown)
    c.d.delete("k")
    c.wall = 10_000.0
    assert c.d.purge_tombstones(before=5000.0) == 1
    assert c.d.current("k") is None and c.state.get_tombstone("k") is None
    # The worker comes back, with its old copy, in a full inventory.
    c.d.reconcile("away", [("k", 10, sha("k", v_old), v_old)])
    assert c.d.current("k") is None  # not live again
    assert c.state.get_tombstone("k") is not None
    assert ("k", "away", v_old) in c.state.doomed_rows()
    c.d.remove_replica("k", "away")  # trimmed
    assert c.d.purge_tombstones(before=5000.0) == 1
    # A newer write of the same key is a write after the delete: live.
    v_new = c.d.next_version()
    assert v_new > c.state.forgotten_below
    assert add(c.d, "k", "w1", v_new) == CURRENT
    assert c.d.current("k") == (v_new, sha("k", v_new))


def test_the_watermark_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / STATE_FILE
    c = Clocked(path)
    v = c.deleted_key("k")
    c.wall = 10_000.0
    assert c.d.purge_tombstones(before=5000.0) == 1
    c.state.close()
    state = MasterState(path)
    try:
        assert state.forgotten_below == v
        d = Directory(state, now=lambda: 20_000.0)
        assert add(d, "k", "w2", v) == DELETED
    finally:
        state.close()


def run_next(clock: Clock, by: float = 0.0) -> None:
    """Move ``clock`` by ``by`` and run only the first call then due (Clock.advance
    would also run the calls that one schedules for now: a whole walk at once)."""
    clock.rightNow += by
    clock.calls.sort(key=lambda call: call.getTime())
    assert clock.calls and clock.calls[0].getTime() <= clock.rightNow
    call = clock.calls.pop(0)
    call.called = 1
    call.func(*call.args, **call.kw)


def test_the_walk_runs_a_slice_per_reactor_turn(c: Clocked) -> None:
    for i in range(25):
        c.deleted_key(f"k/{i:03d}")
    c.wall = 100_000.0
    clock = Clock()
    walk = TombstoneRetention(clock=clock, now=lambda: c.wall, state=c.state,
                              max_age=3600.0, interval=60.0, slice_size=10)
    walk.start()
    run_next(clock, 60)  # the walk starts: its first slice
    assert walk.walking and walk.purged == 10
    run_next(clock)  # the next reactor turn
    assert walk.purged == 20
    run_next(clock)  # the last slice (fewer than 10 left): the walk ends
    assert walk.purged == 25 and not walk.walking and walk.walks == 1
    assert c.state.tombstones() == []
    c.deleted_key("later")  # at wall time 100,000: kept until 3,600 s later
    clock.advance(60)
    assert walk.walks == 2 and [t[0] for t in c.state.tombstones()] == ["later"]
    c.wall += 3601
    clock.advance(60)
    assert c.state.tombstones() == [] and walk.purged == 26
    walk.stop()
    assert not clock.getDelayedCalls()


def test_walk_interval_is_a_tenth_of_the_age_between_a_second_and_an_hour() -> None:
    assert walk_interval(DEFAULT_TOMBSTONES_MAX_AGE) == 3600.0
    assert walk_interval(100.0) == 10.0
    assert walk_interval(1.0) == 1.0


def test_config_reads_tombstones_max_age(tmp_path: Path) -> None:
    base = "master: {port: 0, state_dir: state}\nworkers: {w1: {port: 0, data_dir: d1}}\n"
    p = tmp_path / "dsml.yaml"
    p.write_text(base)
    assert load_config(p).retention.tombstones_max_age == DEFAULT_TOMBSTONES_MAX_AGE
    p.write_text(base + "retention: {tombstones_max_age: 86400}\n")
    assert load_config(p).retention.tombstones_max_age == 86400.0
    p.write_text(base + "retention: {tombstones_max_age: 0}\n")
    with pytest.raises(ConfigError, match="retention.tombstones_max_age"):
        load_config(p)


@pytest.mark.processes
def test_a_real_master_forgets_a_deleted_key_after_its_retention(tmp_path: Path) -> None:
    """A master (twistd) with ``retention.tombstones_max_age: 1`` and one worker: a key
    is written and deleted; its copy is trimmed and, about a second later, its tombstone
    forgotten (the master's log says so); the key reads as absent meanwhile, and a new
    write of it is read back."""
    from dsml.client import ClusterClient
    from dsml.errors import DsmlError
    from dsml.localcluster import LocalCluster
    from dsml.testing.poll import poll

    c = LocalCluster(tmp_path / "cluster", workers=("w1",),
                     extra={"cluster": {"replication": 1},
                            "retention": {"tombstones_max_age": 1}})
    try:
        c.start("master")
        c.start("w1")
        host, port = c.address("master")
        client = ClusterClient(host, port, c.token)
        poll(lambda: True if any(n.state == "alive" for n in client.nodes()) else None,
             "w1 alive", timeout=60)
        client.set("scratch/a", b"first")
        client.delete("scratch/a")
        with pytest.raises(DsmlError):
            client.get("scratch/a")
        poll(lambda: True if "forgot 1 tombstones" in c.log_path("master").read_text()
             else None, "the tombstone forgotten", timeout=60)
        with pytest.raises(DsmlError):
            client.get("scratch/a")
        client.set("scratch/a", b"second")
        assert client.get("scratch/a") == b"second"
        client.close()
    finally:
        c.stop()
    assert all(p.poll() is not None for p in c.procs.values())
