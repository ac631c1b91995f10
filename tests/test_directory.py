"""Tests for dsml.master.state (the master's SQLite state) and dsml.master.directory.

Every test uses a real SQLite file under tmp_path.  Unit tests first (versions,
tombstones, reconcile, placement, replication checks, persistence), then a hypothesis
state machine that runs random report/remove/delete/reconcile/reopen sequences against a
small in-memory model of the rules.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dsml.master.directory import (
    CURRENT,
    DELETED,
    STALE,
    SURPLUS,
    Directory,
    DirectoryError,
    Replica,
    Stats,
    Trim,
    WorkerLoad,
)
from dsml.master.state import STATE_FILE, VERSION_BLOCK, MasterState, StateError
from dsml.protocol.methods import HeaderValueError, check_key

ROOT = Path(__file__).resolve().parent.parent


def sha(key: str, version: int) -> str:
    """The sha256 of the content written for ``key`` at ``version`` in these tests."""
    return hashlib.sha256(f"{key}@{version}".encode()).hexdigest()


def rep(worker: str, key: str, version: int, size: int = 10) -> Replica:
    """The Replica a report of add(d, key, worker, version, size) creates."""
    return Replica(worker, size, sha(key, version), version)


def add(d: Directory, key: str, worker: str, version: int, size: int = 10) -> str:
    """Report that ``worker`` stored ``key`` at ``version`` (content derived from both)."""
    return d.add_replica(key, worker, size, sha(key, version), version)


def entry(key: str, version: int, size: int = 10) -> tuple[str, int, str, int]:
    """An inventory entry matching :func:`add`."""
    return (key, size, sha(key, version), version)


def workers_of(d: Directory, key: str, live: list[str] | None = None) -> set[str]:
    """The workers locate() returns for ``key``."""
    return {r.worker for r in d.locate(key, live)}


def load(free: int, stored: int = 0) -> WorkerLoad:
    """A WorkerLoad, shorter."""
    return WorkerLoad(free, stored)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where the state file lives (its directory is created by MasterState)."""
    return tmp_path / "state" / STATE_FILE


@pytest.fixture
def state(path: Path) -> Iterator[MasterState]:
    """An open MasterState, closed after the test."""
    s = MasterState(path)
    yield s
    s.close()


@pytest.fixture
def d(state: MasterState) -> Directory:
    """A Directory over the test's state."""
    return Directory(state, now=lambda: 1000.0)


def reopen(d: Directory) -> Directory:
    """Close the directory's state and open it again from the file."""
    d.state.close()
    return Directory(MasterState(d.state.path), now=lambda: 2000.0)


# -- add, locate, list ------------------------------------------------------------------


def test_add_locate_list(d: Directory) -> None:
    """Reports show up in locate() (current copies) and list() (sorted, with holders)."""
    assert add(d, "b/2", "w1", 1, size=5) == CURRENT
    assert add(d, "b/2", "w2", 1, size=5) == CURRENT
    assert add(d, "a/1", "w2", 3) == CURRENT
    assert sorted(d.locate("b/2"), key=lambda r: r.worker) == [
        rep("w1", "b/2", 1, 5),
        rep("w2", "b/2", 1, 5),
    ]
    assert d.locate("a/1") == [rep("w2", "a/1", 3)]
    assert d.list() == [
        ("a/1", 10, sha("a/1", 3), 3, ["w2"]),
        ("b/2", 5, sha("b/2", 1), 1, ["w1", "w2"]),
    ]
    assert d.stats() == Stats(keys=2, replicas=3, bytes=15)
    with pytest.raises(DirectoryError) as e:
        d.locate("nope")
    assert e.value.code == "not-found"


def test_locate_prefers_live_and_spreads_reads(d: Directory) -> None:
    """With a live set, dead holders are dropped; no live holder is 'unavailable'.

    The order is a per-key rendezvous hash: stable for a key, different across keys.
    """
    for w in ("w1", "w2", "w3"):
        add(d, "k", w, 1)
    assert workers_of(d, "k", ["w1", "w3", "w9"]) == {"w1", "w3"}
    with pytest.raises(DirectoryError) as e:
        d.locate("k", ["w4"])
    assert e.value.code == "unavailable"
    assert d.locate("k") == d.locate("k")
    firsts = set()
    for i in range(40):
        for w in ("w1", "w2", "w3"):
            add(d, f"spread/{i}", w, 1)
        firsts.add(d.locate(f"spread/{i}")[0].worker)
    assert firsts == {"w1", "w2", "w3"}


def test_list_prefix_after_limit(d: Directory) -> None:
    """list() pages by key with prefix, after and limit; keys without copies still list."""
    for k in ("a", "b/1", "b/2", "b/3", "c", "b\U0010ffff"):
        add(d, k, "w1", 1)
    assert [r[0] for r in d.list("b/")] == ["b/1", "b/2", "b/3"]
    assert [r[0] for r in d.list("b/", limit=2)] == ["b/1", "b/2"]
    assert [r[0] for r in d.list("b/", after="b/2")] == ["b/3"]
    assert [r[0] for r in d.list(after="b/3")] == ["b\U0010ffff", "c"]
    assert [r[0] for r in d.list("b\U0010ffff")] == ["b\U0010ffff"]
    assert d.list(limit=0) == []
    d.remove_replica("c", "w1")
    assert d.list("c") == [("c", 10, sha("c", 1), 1, [])]


# -- versions ---------------------------------------------------------------------------


def test_newer_version_supersedes_and_marks_old_stale(d: Directory) -> None:
    """A newer report becomes current; the older copies are stale, never located."""
    add(d, "k", "w1", 1)
    add(d, "k", "w2", 1)
    assert add(d, "k", "w3", 2, size=20) == CURRENT
    assert d.locate("k") == [rep("w3", "k", 2, 20)]
    assert d.stale_replicas() == [Trim("k", "w1", 1, STALE), Trim("k", "w2", 1, STALE)]
    assert d.stale_replicas("w2") == [Trim("k", "w2", 1, STALE)]
    # w1 is overwritten in place: no longer stale.
    assert add(d, "k", "w1", 2, size=20) == CURRENT
    assert d.stale_replicas() == [Trim("k", "w2", 1, STALE)]
    assert d.remove_replica("k", "w2") is True
    assert d.stale_replicas() == []
    assert workers_of(d, "k") == {"w1", "w3"}
    assert d.stats() == Stats(1, 2, 20)


def test_older_report_is_stale_on_arrival(d: Directory) -> None:
    """A report older than the current version is recorded as stale, not current."""
    add(d, "k", "w1", 5)
    assert add(d, "k", "w2", 3) == STALE
    assert d.locate("k") == [rep("w1", "k", 5)]
    assert d.stale_replicas() == [Trim("k", "w2", 3, STALE)]
    assert d.list()[0][3] == 5


def test_same_version_other_content_is_refused(d: Directory) -> None:
    """One version has one content: another sha256 or size is a checksum-mismatch."""
    add(d, "k", "w1", 4)
    with pytest.raises(DirectoryError) as e:
        d.add_replica("k", "w2", 10, sha("other", 4), 4)
    assert e.value.code == "checksum-mismatch"
    with pytest.raises(DirectoryError) as e:
        d.add_replica("k", "w2", 11, sha("k", 4), 4)
    assert e.value.code == "checksum-mismatch"
    assert d.locate("k") == [rep("w1", "k", 4)]
    assert d.state.replicas_of("k") == [("k", "w1", 10, sha("k", 4), 4)]


@pytest.mark.parametrize(
    ("key", "size", "digest", "version", "code"),
    [
        ("bad\nkey", 1, sha("k", 1), 1, "bad-key"),
        ("", 1, sha("k", 1), 1, "bad-key"),
        ("x" * 1025, 1, sha("k", 1), 1, "bad-key"),
        (b"bytes", 1, sha("k", 1), 1, "bad-key"),
        ("k", 1, sha("k", 1).upper(), 1, "bad-checksum"),
        ("k", 1, "abc", 1, "bad-checksum"),
        ("k", -1, sha("k", 1), 1, "bad-request"),
        ("k", 2**63, sha("k", 1), 1, "bad-request"),
        ("k", True, sha("k", 1), 1, "bad-request"),
        ("k", 1, sha("k", 1), 0, "bad-request"),
        ("k", 1, sha("k", 1), "1", "bad-request"),
    ],
)
def test_add_replica_rejects_malformed_reports(
    d: Directory, key: object, size: object, digest: object, version: object, code: str
) -> None:
    """A malformed report raises its code and records nothing."""
    add(d, "k", "w1", 1)
    before = d.list()
    with pytest.raises(DirectoryError) as e:
        d.add_replica(key, "w2", size, digest, version)  # type: ignore[arg-type]
    assert e.value.code == code
    assert d.list() == before
    with pytest.raises(DirectoryError) as e:
        d.add_replica("k", "bad\x00worker", 1, sha("k", 1), 1)
    assert e.value.code == "bad-request"


def test_next_version_increases_across_reopen(d: Directory) -> None:
    """Issued versions only go up, past a reopen; a report never moves the counter (a
    claim above it is quarantined, and the counter stays where it was persisted)."""
    v1, v2 = d.next_version(), d.next_version()
    assert 0 < v1 < v2
    d = reopen(d)
    v3 = d.next_version()
    assert v3 > v2
    with pytest.raises(DirectoryError) as e:
        d.add_replica("k", "w1", 1, sha("k", 1), v3 + 5000, issued=d.state.last_version)
    assert e.value.code == "forbidden"
    add(d, "other", "w1", 7)  # unchecked (no issued): recorded, but moves no counter
    assert d.next_version() == v3 + 1
    assert d.current("k") is None
    top = d.state.last_version
    d.state.close()  # no further issue: the counter comes back from the reservation
    d = Directory(MasterState(d.state.path))
    assert top < d.next_version() < v3 + 5000
    d.state.close()


# -- delete and tombstones --------------------------------------------------------------


def test_delete_tombstone_survives_reopen_and_blocks_resurrection(d: Directory) -> None:
    """A delete holds across a restart: late reports of old versions never revive the key.

    A newer write after the delete does revive it.
    """
    add(d, "k", "w1", 3)
    add(d, "k", "w2", 3)
    assert d.delete("k") == 3
    assert d.pending_deletes() == [Trim("k", "w1", 3, DELETED), Trim("k", "w2", 3, DELETED)]
    d.remove_replica("k", "w1", version=3)
    d = reopen(d)
    with pytest.raises(DirectoryError) as e:
        d.locate("k")
    assert e.value.code == "not-found"
    assert d.state.tombstones() == [("k", 3, 1000.0)]
    # w3 was down during the delete and comes back with an old copy; w1 too.
    assert add(d, "k", "w3", 2) == DELETED
    assert add(d, "k", "w1", 3) == DELETED
    assert d.list() == []
    assert {t.worker for t in d.pending_deletes()} == {"w1", "w2", "w3"}
    with pytest.raises(DirectoryError):
        d.locate("k")
    r = d.reconcile("w2", [entry("k", 3)])
    assert r.trim == (Trim("k", "w2", 3, DELETED),) and r.deleted == 1
    assert d.list() == []
    # A write after the delete: a higher version.
    assert add(d, "k", "w4", 4) == CURRENT
    assert d.locate("k") == [rep("w4", "k", 4)]
    assert d.state.tombstones() == []
    assert {(t.worker, t.version) for t in d.stale_replicas()} == {
        ("w1", 3),
        ("w2", 3),
        ("w3", 2),
    }
    assert d.pending_deletes() == []
    d.state.close()


def test_delete_unknown_or_twice_is_not_found(d: Directory) -> None:
    """Deleting a key that is not live is not-found; it still leaves a tombstone at a
    new version, so no write placed before the delete can bring the key back."""
    with pytest.raises(DirectoryError) as e:
        d.delete("never")
    assert e.value.code == "not-found"
    assert d.state.tombstones() == [("never", d.state.last_version, 1000.0)]
    add(d, "k", "w1", 7)
    assert d.delete("k") == 7
    with pytest.raises(DirectoryError) as e:
        d.delete("k")
    assert e.value.code == "not-found"
    assert ("k", 7, 1000.0) in d.state.tombstones()


def test_a_write_placed_before_a_delete_and_reported_after_it_stays_deleted(
    d: Directory,
) -> None:
    """The write's commit was lost (its outcome unknown) and the delete came while the
    master knew nothing of it; its copy is reported later: it is older than the delete
    (nemesis seed 12: the key came back after an acknowledged delete)."""
    placed = d.next_version()  # place answered, then the master lost the commit
    with pytest.raises(DirectoryError):
        d.delete("k")  # "was absent"
    assert add(d, "k", "w1", placed) == DELETED
    assert d.list() == [] and [t.worker for t in d.pending_deletes()] == ["w1"]
    add(d, "live", "w1", d.next_version())
    older = d.next_version()
    assert d.delete("live") < older  # the version deleted, reported as before
    assert add(d, "live", "w2", older) == DELETED
    newer = d.next_version()
    assert add(d, "live", "w2", newer) == CURRENT


def test_purge_tombstones_only_old_and_unheld(d: Directory) -> None:
    """Purging drops old tombstones whose key nobody holds; others stay."""
    for k in ("held", "free", "recent"):
        add(d, k, "w1", 1)
    d.delete("held")
    d.delete("free")
    d.remove_replica("free", "w1")
    d._now = lambda: 5000.0
    d.delete("recent")
    d.remove_replica("recent", "w1")
    assert d.purge_tombstones(before=2000.0) == 1
    assert [t[0] for t in d.state.tombstones()] == ["held", "recent"]


def test_generation_moves_on_every_write(d: Directory) -> None:
    """The generation changes with each committed write, not with reads."""
    g = d.generation
    add(d, "k", "w1", 1)
    assert d.generation > g
    g = d.generation
    d.locate("k")
    d.list()
    d.under_replicated(["w1"], 3)
    assert d.generation == g
    d.reconcile("w1", [])
    assert d.generation > g


def test_remove_replica_with_version_spares_a_newer_copy(d: Directory) -> None:
    """A trim confirmation for v1 that crosses a report of v2 does not forget v2."""
    add(d, "k", "w1", 1)
    add(d, "k", "w2", 2)
    assert d.stale_replicas() == [Trim("k", "w1", 1, STALE)]
    add(d, "k", "w1", 2)  # w1 stored v2 before it got to the trim order
    assert d.remove_replica("k", "w1", version=1) is False
    assert workers_of(d, "k") == {"w1", "w2"}
    assert d.remove_replica("k", "w1", version=2) is True
    assert d.remove_replica("k", "w1") is False
    assert workers_of(d, "k") == {"w2"}


def test_key_whose_copies_are_all_gone_is_lost_not_downgraded(d: Directory) -> None:
    """Losing every current copy keeps the key (lost); a stale copy is not served."""
    add(d, "k", "w1", 1)
    add(d, "k", "w2", 2)
    d.remove_replica("k", "w2")
    with pytest.raises(DirectoryError) as e:
        d.locate("k")
    assert e.value.code == "unavailable"
    assert d.lost(["w1", "w2"]) == ["k"]
    assert d.list() == [("k", 10, sha("k", 2), 2, [])]


# -- reconcile --------------------------------------------------------------------------


def test_reconcile_adds_and_removes(d: Directory) -> None:
    """An inventory adds what the directory lacks and forgets what the worker lacks."""
    add(d, "old", "w1", 1)
    add(d, "same", "w1", 1)
    add(d, "same", "w2", 1)
    add(d, "other", "w2", 1)
    r = d.reconcile("w1", [entry("same", 1), entry("new", 2)])
    assert (r.added, r.unchanged, r.removed, r.rejected, r.trim) == (1, 1, 1, (), ())
    assert workers_of(d, "same") == {"w1", "w2"}
    assert workers_of(d, "new") == {"w1"}
    assert workers_of(d, "other") == {"w2"}
    # "old" had its only copy on w1: the key is lost, not forgotten.
    assert d.lost(["w1", "w2"]) == ["old"]
    # Idempotent.
    r = d.reconcile("w1", [entry("same", 1), entry("new", 2)])
    assert (r.added, r.unchanged, r.removed) == (0, 2, 0)
    # An empty inventory: the worker holds nothing.
    r = d.reconcile("w1", [])
    assert r.removed == 2
    assert d.state.replicas_on("w1") == {}


def test_reconcile_rejects_bad_entries_without_corruption(d: Directory) -> None:
    """Bad entries are skipped and counted; the directory is unchanged for their keys."""
    for k in ("k1", "k2", "k3", "k4"):
        add(d, k, "w1", 2)
    add(d, "k5", "w2", 2)
    before = d.list()
    inventory = [
        ("k1", 10, "Z" * 64, 2),  # bad sha
        ("k2", -1, sha("k2", 2), 2),  # negative size
        ("k3", 10, sha("k3", 0), 0),  # version 0
        ("k4", 10, sha("k4", 9), 9.0),  # float version
        ("bad\x07key", 10, sha("x", 1), 1),  # control character
        ("k5", 10, sha("other", 2), 2),  # another content for k5@2
        ("k6", 10, sha("k6", 1)),  # 3 fields
        None,  # not even a tuple
        entry("ok", 1),
        entry("ok", 1),  # duplicate
    ]
    r = d.reconcile("w1", inventory)
    reasons = {repr(x.key): x.reason for x in r.rejected}
    assert len(r.rejected) == 9
    assert reasons["'k1'"].startswith("bad-checksum")
    assert reasons["'k2'"].startswith("bad-request")
    assert reasons["'k3'"].startswith("bad-request")
    assert reasons["'k4'"].startswith("bad-request")
    assert reasons["'bad\\x07key'"].startswith("bad-key")
    assert reasons["'k5'"].startswith("checksum-mismatch")
    assert reasons["None"].startswith("malformed")
    assert reasons["'ok'"] == "duplicate key in inventory"
    assert (r.added, r.removed) == (1, 0)
    # k1..k4 keep their w1 copies exactly; k5 stays w2's only; ok was added.
    assert d.list() == sorted(before + [("ok", 10, sha("ok", 1), 1, ["w1"])])
    assert d.state.replicas_on("w1") == {
        k: (10, sha(k, v), v) for k, v in [("k1", 2), ("k2", 2), ("k3", 2), ("k4", 2), ("ok", 1)]
    }


def test_reconcile_trims_stale_and_deleted(d: Directory) -> None:
    """A returning worker's old versions and deleted keys come back as its trim list."""
    add(d, "a", "w2", 5)
    add(d, "gone", "w2", 3)
    d.delete("gone")
    r = d.reconcile("w1", [entry("a", 4), entry("a2", 1), entry("gone", 2), entry("gone2", 1)])
    assert r.trim == (Trim("a", "w1", 4, STALE), Trim("gone", "w1", 2, DELETED))
    assert (r.stale, r.deleted, r.added) == (1, 1, 4)
    assert d.locate("a") == [rep("w2", "a", 5)]


def test_reconcile_surplus_on_the_returning_worker(d: Directory) -> None:
    """With live loads and a factor, reconcile also lists surplus copies on the worker."""
    for w in ("w1", "w2", "w3"):
        add(d, "k", w, 1)
    add(d, "j", "w1", 1)
    live = {"w1": load(100), "w2": load(300), "w3": load(200)}
    r = d.reconcile("w1", [entry("k", 1), entry("j", 1)], live=live, factor=2)
    assert r.trim == (Trim("k", "w1", 1, SURPLUS),)
    r = d.reconcile("w2", [entry("k", 1)], live=live, factor=2)
    assert r.trim == ()


def test_reconcile_is_one_transaction(d: Directory) -> None:
    """An inventory that fails half-way (a broken iterator) changes nothing."""
    add(d, "a", "w1", 1)

    def broken() -> Iterator[tuple[str, int, str, int]]:
        yield entry("b", 1)
        raise OSError("connection lost while reading the inventory")

    with pytest.raises(OSError):
        d.reconcile("w1", broken())
    assert d.list() == [("a", 10, sha("a", 1), 1, ["w1"])]


def test_reconcile_accepts_exactly_the_keys_check_key_accepts(d: Directory) -> None:
    """The fast validation path of reconcile agrees with check_key on every key."""

    @settings(max_examples=200, deadline=None)
    @given(key=st.text(max_size=300) | st.text(alphabet="\x00\x1f\x7f\x85\ud800a", max_size=4))
    def check(key: str) -> None:
        try:
            check_key(key)
            valid = True
        except HeaderValueError:
            valid = False
        r = d.reconcile("w1", [(key, 1, "0" * 64, 1)])
        assert (r.added + r.unchanged == 1) == valid
        assert (len(r.rejected) == 1) == (not valid)

    check()


def test_reconcile_of_many_entries_is_quick(d: Directory) -> None:
    """20,000 entries reconcile in one go (the 100,000 figure is measured separately)."""
    inventory = [entry(f"data/{i:06d}", i + 1, size=i) for i in range(20_000)]
    r = d.reconcile("w1", inventory)
    assert (r.added, r.rejected) == (20_000, ())
    r = d.reconcile("w1", inventory[::2])
    assert (r.unchanged, r.removed) == (10_000, 10_000)
    assert d.stats() == Stats(20_000, 10_000, sum(range(20_000)))  # the rest are lost


# -- placement --------------------------------------------------------------------------


def test_place_spreads_new_keys_over_workers_with_disks_alike(d: Directory) -> None:
    """Free disk within an eighth of the most is one class: new keys spread over its
    workers by the key's rendezvous rank, not all to whichever reported a few bytes
    more; a worker far below the others' free disk gets none while they fit."""
    from collections import Counter

    gib = 1 << 30
    live = {"w1": load(100 * gib), "w2": load(100 * gib - 5), "w3": load(99 * gib),
            "w4": load(95 * gib), "w5": load(10 * gib)}
    counts = Counter(w for i in range(400) for w in d.place(f"data/part-{i}", 10, live, 2))
    assert set(counts) == {"w1", "w2", "w3", "w4"}, counts
    assert max(counts.values()) - min(counts.values()) < 80, counts  # 200 each, +-


def test_place_distinct_workers_by_free_disk(d: Directory) -> None:
    """Placement picks distinct workers, most free disk first, then fewest stored bytes."""
    live = {"w1": load(100), "w2": load(500), "w3": load(300, 9), "w4": load(300, 1)}
    assert d.place("k", 10, live, 3) == ["w2", "w4", "w3"]
    assert d.place("k", 10, live, 1) == ["w2"]


def test_place_factor_capped_by_live_count(d: Directory) -> None:
    """With fewer live workers than the factor, every live worker is used once."""
    assert sorted(d.place("k", 1, {"w1": load(10), "w2": load(10)}, 3)) == ["w1", "w2"]


def test_place_avoids_full_workers(d: Directory) -> None:
    """A worker without room for the file is never chosen; fewer may be returned."""
    live = {"w1": load(50), "w2": load(5000), "w3": load(99)}
    assert d.place("k", 100, live, 3) == ["w2"]
    with pytest.raises(DirectoryError) as e:
        d.place("k", 10_000, live, 3)
    assert e.value.code == "no-space"


def test_place_no_workers(d: Directory) -> None:
    """No live worker: no-workers; a malformed key: bad-key; a bad factor: ValueError."""
    with pytest.raises(DirectoryError) as e:
        d.place("k", 1, {}, 3)
    assert e.value.code == "no-workers"
    with pytest.raises(DirectoryError) as e:
        d.place("bad\x00", 1, {"w1": load(10)}, 3)
    assert e.value.code == "bad-key"
    with pytest.raises(ValueError):
        d.place("k", 1, {"w1": load(10)}, 0)


def test_place_prefers_existing_holders(d: Directory) -> None:
    """Live workers already holding the key come first (the write replaces in place)."""
    add(d, "k", "w1", 1)
    add(d, "k", "w3", 1)
    live = {"w1": load(10), "w2": load(1000), "w3": load(20), "w4": load(500)}
    assert d.place("k", 5, live, 3) == ["w3", "w1", "w2"]
    # A holder without room is still skipped.
    assert d.place("k", 15, live, 3) == ["w3", "w2", "w4"]


# -- replication checks -----------------------------------------------------------------


def test_under_replicated_lost_surplus_as_workers_die_and_return(d: Directory) -> None:
    """The replication views follow the live set as workers die and come back."""
    for w in ("w1", "w2", "w3"):
        add(d, "k3", w, 1)
    add(d, "k1", "w1", 1)
    add(d, "k2", "w2", 1)
    add(d, "k2", "w3", 1)
    add(d, "old", "w1", 1)
    add(d, "old", "w4", 2)  # current copy only on w4; w1's is stale
    everyone = ["w1", "w2", "w3", "w4"]
    assert d.under_replicated(everyone, 3) == [
        ("k1", [rep("w1", "k1", 1)], 2),
        ("k2", [rep("w2", "k2", 1), rep("w3", "k2", 1)], 1),
        ("old", [rep("w4", "old", 2)], 2),
    ]
    assert d.lost(everyone) == []
    assert d.surplus(everyone, 3) == []
    # w1 and w4 die.
    live = ["w2", "w3"]
    assert d.under_replicated(live, 3) == []  # min(3, 2 live) = 2: k2 and k3 have enough
    assert d.lost(live) == ["k1", "old"]
    # Only w2 lives: everything it has is enough (factor capped at 1 live worker).
    assert d.under_replicated(["w2"], 3) == []
    assert d.lost(["w2"]) == ["k1", "old"]
    # Copies made while w1 was dead, then w1 returns: k3 has 4 live copies for factor 3.
    add(d, "k3", "w4", 1)
    loads = {"w1": load(10), "w2": load(40), "w3": load(30), "w4": load(20)}
    assert d.surplus(loads, 3) == [("k3", ["w1"])]
    assert d.surplus(everyone, 3) == [("k3", ["w4"])]  # by name when no loads
    assert d.surplus(loads, 1) == [("k2", ["w3"]), ("k3", ["w1", "w3", "w4"])]
    assert d.lost(everyone) == []
    assert d.lost([]) == ["k1", "k2", "k3", "old"]
    assert d.under_replicated([], 3) == []


# -- persistence ------------------------------------------------------------------------


def test_everything_persists_across_close_and_reopen(d: Directory) -> None:
    """Keys, copies, stale copies, tombstones, workers and settings survive a reopen."""
    add(d, "a", "w1", 1)
    add(d, "a", "w2", 2)
    add(d, "b", "w1", 1)
    d.delete("b")
    d.state.set_setting("replication", 3)
    d.state.record_worker("w1", 1, "10.0.0.1", 7500, 4, now=5.0)
    listing, stale, pending = d.list(), d.stale_replicas(), d.pending_deletes()
    d = reopen(d)
    assert (d.list(), d.stale_replicas(), d.pending_deletes()) == (listing, stale, pending)
    assert d.state.get_setting("replication") == 3
    assert d.state.worker("w1") is not None
    d.state.close()


KILLED = """
import os, signal, sys
from dsml.master.state import MasterState
from dsml.master.directory import Directory
state = MasterState(sys.argv[1])
d = Directory(state)
d.add_replica("a", "w1", 1, "{a}", 1)
d.add_replica("b", "w1", 2, "{b}", 4)
d.delete("b")
d.add_replica("b", "w2", 2, "{b}", 3)
d.remove_replica("a", "w9")
state.set_setting("factor", 2)
inc = state.next_incarnation("w1")
print(inc, d.next_version(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """A master killed with SIGKILL (no close) reopens with every committed write."""
    path = tmp_path / "master.sqlite3"
    script = textwrap.dedent(KILLED).format(a=sha("a", 1), b=sha("b", 4))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr
    inc, version = map(int, proc.stdout.split())
    assert (tmp_path / "master.sqlite3-wal").exists()  # the commits are in the WAL
    state = MasterState(path)
    try:
        d = Directory(state)
        assert d.locate("a") == [Replica("w1", 1, sha("a", 1), 1)]
        assert d.list() == [("a", 1, sha("a", 1), 1, ["w1"])]
        assert d.pending_deletes() == [Trim("b", "w1", 4, DELETED), Trim("b", "w2", 3, DELETED)]
        assert state.get_setting("factor") == 2
        assert state.next_incarnation("w1") == inc + 1
        assert d.next_version() > version
    finally:
        state.close()


def test_second_open_is_refused_while_held(path: Path, state: MasterState) -> None:
    """Only one master may hold the state: a second open fails at once, clearly."""
    with pytest.raises(StateError, match="in use"):
        MasterState(path)
    state.close()
    MasterState(path).close()


def test_directory_path_and_schema_check(tmp_path: Path) -> None:
    """A directory path gets master.sqlite3 inside it; an unknown schema is refused."""
    s = MasterState(tmp_path)
    assert s.path == tmp_path / STATE_FILE
    s.close()
    db = sqlite3.connect(tmp_path / STATE_FILE)
    db.execute("UPDATE meta SET value = 99 WHERE name = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="schema 99"):
        MasterState(tmp_path)


def test_next_incarnation_strictly_increases_across_reopen(path: Path) -> None:
    """Incarnations per name only go up: within a run, across reopens, past recorded ones."""
    s = MasterState(path)
    assert [s.next_incarnation("w1", now=1.0) for _ in range(3)] == [1, 2, 3]
    assert s.next_incarnation("w2") == 1
    s.close()
    s = MasterState(path)
    assert s.next_incarnation("w1") == 4
    s.record_worker("w1", 10, "h", 1, 2, now=9.0)
    s.record_worker("w1", 7, "h2", 3, 4, now=8.0)  # lower: kept at 10, fields refreshed
    row = s.worker("w1")
    assert row is not None
    assert (row.last_incarnation, row.host, row.port, row.slots) == (10, "h2", 3, 4)
    assert (row.first_seen, row.last_seen) == (1.0, 9.0)
    s.touch_workers({"w1": 20.0, "unknown": 1.0})
    s.close()
    s = MasterState(path)
    assert s.next_incarnation("w1") == 11
    assert [w.name for w in s.workers()] == ["w1", "w2"]
    assert s.worker("w1").last_seen == 20.0  # type: ignore[union-attr]
    s.close()


def test_settings_round_trip(path: Path) -> None:
    """Settings keep their JSON type and value across a reopen."""
    s = MasterState(path)
    assert s.get_setting("replication") is None
    assert s.get_setting("replication", 3) == 3
    values = {"replication": 2, "name": "lab", "ratio": 0.5, "on": True, "tags": ["a", "b"]}
    for k, v in values.items():
        s.set_setting(k, v)
    s.set_setting("replication", 3)
    s.close()
    s = MasterState(path)
    assert s.settings() == {**values, "replication": 3}
    assert s.get_setting("on") is True
    with pytest.raises(TypeError):
        s.set_setting("bad", object())
    s.close()


def test_version_block_reservation(path: Path) -> None:
    """One durable write per VERSION_BLOCK versions; a restart skips the unused rest."""
    s = MasterState(path)
    first = s.issue_version()
    for _ in range(VERSION_BLOCK + 5):
        s.issue_version()
    last = s.issue_version()
    s.close()
    s = MasterState(path)
    assert s.issue_version() > last >= first + VERSION_BLOCK
    s.close()


# -- a model of the rules, driven at random ---------------------------------------------

KEYS = ("a", "b", "c")
WORKERS = ("w1", "w2", "w3")


class DirectoryMachine(RuleBasedStateMachine):
    """Random reports, removals, deletes, reconciles and reopens, checked against a model.

    The model: for each key its current (version, size, sha256) or its tombstone, and
    for each (key, worker) the copy the worker holds.  Invariants: locate() returns
    exactly the current-version copies (so every located copy has the key's current
    version); a tombstoned key is never locatable; list, stale and pending deletes agree.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp()
        self.d = Directory(MasterState(Path(self.tmp), synchronous="OFF"))
        self.cur: dict[str, tuple[int, int, str]] = {}
        self.tomb: dict[str, int] = {}
        self.held: dict[tuple[str, str], tuple[int, int, str]] = {}

    def teardown(self) -> None:
        self.d.state.close()
        shutil.rmtree(self.tmp)

    def model_apply(self, key: str, worker: str, version: int, size: int, digest: str) -> str:
        cur = self.cur.get(key)
        if cur is None:
            if key in self.tomb and version <= self.tomb[key]:
                verdict = DELETED
            else:
                self.tomb.pop(key, None)
                self.cur[key] = (version, size, digest)
                verdict = CURRENT
        elif version > cur[0]:
            self.cur[key] = (version, size, digest)
            verdict = CURRENT
        elif version == cur[0]:
            if (size, digest) != cur[1:]:
                return "conflict"
            verdict = CURRENT
        else:
            verdict = STALE
        self.held[key, worker] = (version, size, digest)
        return verdict

    @rule(key=st.sampled_from(KEYS), worker=st.sampled_from(WORKERS), v=st.integers(1, 6))
    def report(self, key: str, worker: str, v: int) -> None:
        expected = self.model_apply(key, worker, v, v, sha(key, v))
        assert add(self.d, key, worker, v, size=v) == expected

    @rule(key=st.sampled_from(KEYS), worker=st.sampled_from(WORKERS), delta=st.integers(-1, 1))
    def report_near(self, key: str, worker: str, delta: int) -> None:
        """A report just below, at or above the key's current or tombstone version."""
        base = self.cur[key][0] if key in self.cur else self.tomb.get(key, 1)
        v = max(1, base + delta)
        expected = self.model_apply(key, worker, v, v, sha(key, v))
        assert add(self.d, key, worker, v, size=v) == expected

    @rule(key=st.sampled_from(KEYS), worker=st.sampled_from(WORKERS))
    def report_other_content(self, key: str, worker: str) -> None:
        cur = self.cur.get(key)
        if cur is None:
            return
        with pytest.raises(DirectoryError) as e:
            self.d.add_replica(key, worker, cur[1], sha("other", cur[0]), cur[0])
        assert e.value.code == "checksum-mismatch"

    @rule(key=st.sampled_from(KEYS), worker=st.sampled_from(WORKERS))
    def remove(self, key: str, worker: str) -> None:
        assert self.d.remove_replica(key, worker) == ((key, worker) in self.held)
        self.held.pop((key, worker), None)

    @rule(key=st.sampled_from(KEYS))
    def delete(self, key: str) -> None:
        # The tombstone's version is a new one (or the highest the key had, where the
        # test recorded versions the counter never issued).
        stamp = max(self.d.state.last_version + 1, self.tomb.get(key, 0))
        if key in self.cur:
            assert self.d.delete(key) == self.cur[key][0]
            self.tomb[key] = max(stamp, self.cur.pop(key)[0])
        else:
            with pytest.raises(DirectoryError):
                self.d.delete(key)
            self.tomb[key] = stamp

    @rule(
        worker=st.sampled_from(WORKERS),
        inventory=st.dictionaries(st.sampled_from(KEYS), st.integers(1, 6), max_size=3),
        bad=st.booleans(),
    )
    def reconcile(self, worker: str, inventory: dict[str, int], bad: bool) -> None:
        entries = [(k, v, sha(k, v), v) for k, v in inventory.items()]
        if bad:
            # Rejected, and so is a later entry for "a": a's copy stays as it was.
            entries.insert(0, ("a", -1, sha("a", 1), 1))
        result = self.d.reconcile(worker, entries)
        expect_rejected = int(bad)
        for k, v in inventory.items():
            if bad and k == "a":
                expect_rejected += 1  # a duplicate of the bad entry
                continue
            if self.model_apply(k, worker, v, v, sha(k, v)) == "conflict":
                expect_rejected += 1
        keep = set(inventory) | ({"a"} if bad else set())
        for key, w in list(self.held):
            if w == worker and key not in keep:
                del self.held[key, w]
        assert len(result.rejected) == expect_rejected

    @rule()
    def reopen(self) -> None:
        self.d = reopen(self.d)

    @invariant()
    def matches_model(self) -> None:
        d = self.d
        for key in KEYS:
            cur = self.cur.get(key)
            if cur is None:
                with pytest.raises(DirectoryError) as e:
                    d.locate(key)
                assert e.value.code == "not-found"
                continue
            version, size, digest = cur
            want = {w for (k, w), h in self.held.items() if k == key and h[0] == version}
            if want:
                located = d.locate(key)
                assert {r.worker for r in located} == want
                assert all(r == Replica(r.worker, size, digest, version) for r in located)
            else:
                with pytest.raises(DirectoryError) as e:
                    d.locate(key)
                assert e.value.code == "unavailable"
        listing = {k: (ver, size, digest, sorted(ws)) for k, size, digest, ver, ws in d.list()}
        assert listing == {
            k: (
                c[0],
                c[1],
                c[2],
                sorted(w for (kk, w), h in self.held.items() if kk == k and h[0] == c[0]),
            )
            for k, c in self.cur.items()
        }
        stale = {(t.key, t.worker, t.version) for t in d.stale_replicas()}
        assert stale == {
            (k, w, h[0])
            for (k, w), h in self.held.items()
            if k in self.cur and h[0] < self.cur[k][0]
        }
        doomed = {(t.key, t.worker, t.version) for t in d.pending_deletes()}
        assert doomed == {(k, w, h[0]) for (k, w), h in self.held.items() if k in self.tomb}
        assert not set(self.tomb) & {row[0] for row in d.list()}


DirectoryMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_directory_machine = DirectoryMachine.TestCase


# -- committed versions and the fall-back of a lost key (issue #12) ----------------------


def commit(d: Directory, key: str, worker: str, version: int) -> str:
    """A client's commit of ``key`` at ``version`` on ``worker`` (KeySpace.commit)."""
    return d.add_replica(key, worker, 10, sha(key, version), version, committed=True)


def test_a_lost_version_never_committed_falls_back_to_the_newest_surviving_copy(
    d: Directory,
) -> None:
    """Versions only workers reported (their commits never came) give way, newest first,
    once no survivor holds them; the copies above the version made current, on workers
    that are gone, are forgotten, and a newer report brings the key forward again."""
    commit(d, "k", "w1", 1)
    commit(d, "k", "w2", 1)
    add(d, "k", "w3", 2)
    add(d, "k", "w4", 3)
    assert d.current("k") == (3, sha("k", 3))
    assert d.fall_back("k", ["w1", "w2", "w3", "w4"]) is None  # w4 still holds it
    assert d.current("k") == (3, sha("k", 3))
    assert d.fall_back("k", ["w1", "w2", "w3"]) == 2
    assert d.current("k") == (2, sha("k", 2)) and workers_of(d, "k") == {"w3"}
    assert d.state.get_replica("k", "w4") is None
    assert d.fall_back("k", ["w1", "w2"]) == 1
    assert workers_of(d, "k") == {"w1", "w2"} and d.stale_replicas() == []
    assert d.fall_back("k", ["w1"]) is None  # committed: never behind it
    add(d, "k", "w4", 3)  # w4 back with its copy: newer, current again
    assert d.current("k") == (3, sha("k", 3))
    assert {t.worker for t in d.stale_replicas()} == {"w1", "w2"}


def test_a_committed_version_is_never_rolled_back(d: Directory) -> None:
    """A key whose current version was committed stays lost without it; one whose lost
    version was never committed goes back to the committed one at most, never past it."""
    commit(d, "k", "w1", 1)
    commit(d, "k", "w2", 2)
    assert d.fall_back("k", ["w1"]) is None
    assert d.current("k") == (2, sha("k", 2))
    with pytest.raises(DirectoryError) as lost:
        d.locate("k", ["w1"])
    assert lost.value.code == "unavailable"
    add(d, "k", "w3", 3)  # reported only
    assert d.fall_back("k", ["w1"]) is None  # v1 is behind the committed v2
    assert d.current("k") == (3, sha("k", 3))
    assert d.fall_back("k", ["w1", "w2"]) == 2
    assert workers_of(d, "k") == {"w2"}
    # A commit after the reports (its answer merely late) counts all the same.
    add(d, "j", "w1", 1)
    add(d, "j", "w2", 2)
    commit(d, "j", "w2", 2)
    assert d.fall_back("j", ["w1"]) is None and d.current("j") == (2, sha("j", 2))


def test_a_delete_is_committed_and_no_fall_back_brings_the_deleted_value_back(
    d: Directory,
) -> None:
    """A write reported after a delete makes the key live again; if its copy is lost, the
    key does not fall back to a copy from before the delete (still on a worker that was
    away).  Purging the tombstone forgets the committed row with it."""
    commit(d, "k", "w1", d.next_version())  # versions as the master issues them
    d.delete("k")
    tomb = d.state.get_tombstone("k")
    assert tomb is not None and d.state.committed_version("k") == tomb
    add(d, "k", "w2", tomb + 1)  # a write after the delete, never committed
    assert d.current("k") == (tomb + 1, sha("k", tomb + 1))
    assert d.fall_back("k", ["w1"]) is None
    d.delete("k")
    d.remove_replica("k", "w1")
    d.remove_replica("k", "w2")
    assert d.purge_tombstones(before=2000.0) == 1
    assert d.state.committed_version("k") == 0


def test_a_schema_1_file_takes_every_version_it_holds_as_committed(path: Path) -> None:
    """A state file from before the committed table (schema 1) is migrated on open:
    every current version and tombstone is taken as committed (nothing says otherwise),
    so none of its keys falls back."""
    s = MasterState(path)
    d = Directory(s, now=lambda: 1000.0)
    add(d, "a", "w1", 1)
    add(d, "a", "w2", 2)  # w1's copy is stale
    add(d, "b", "w1", 3)
    d.delete("b")
    s.close()
    db = sqlite3.connect(path)  # make it a schema-1 file, as the older code wrote it
    db.execute("DROP TABLE committed")
    db.execute("UPDATE meta SET value = 1 WHERE name = 'schema'")
    db.commit()
    db.close()
    s = MasterState(path)
    try:
        d = Directory(s)
        schema = s._db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        assert schema == (2,)
        assert s.committed_version("a") == 2
        assert s.committed_version("b") == s.get_tombstone("b")
        assert d.fall_back("a", ["w1"]) is None and d.current("a") == (2, sha("a", 2))
        add(d, "c", "w1", 1)
        add(d, "c", "w2", 2)  # new reports after the migration: not committed
        assert d.fall_back("c", ["w1"]) == 1
    finally:
        s.close()
