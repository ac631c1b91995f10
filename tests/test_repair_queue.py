"""The repairer works from a queue of keys, never by scanning the directory (issue #11).

A real :class:`MasterState` under ``tmp_path``, the real Directory, Membership and
Repairer on one ``task.Clock``; workers are stand-in links that record the orders they
get and answer them at once (or hold them, to test the concurrency).  The whole-directory
queries the old repair loop ran every second are made to raise once the start-up pass is
over, so a test that passes proves the repair never needed them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from dsml.master.directory import Directory, DirectoryError
from dsml.master.membership import Membership, Versions
from dsml.master.registry import WorkerRegistry
from dsml.master.repair import Repairer
from dsml.master.state import MasterState

V = Versions("1", 1)
GRACE = 5.0


def sha(key: str, version: int) -> str:
    """The sha256 of ``key`` at ``version`` in these tests."""
    return hashlib.sha256(f"{key}@{version}".encode()).hexdigest()


class Link:
    """A worker's link: records orders; answers them at once unless ``hold``."""

    connected = True
    transport = None  # tune_socket leaves a link without a socket alone

    def __init__(self, name: str, hold: bool = False) -> None:
        self.name = name
        self.hold = hold
        self.orders: list[tuple[str, dict[str, Any]]] = []
        self.held: list[Deferred[Any]] = []

    def request(self, method: str, headers: dict[str, Any]) -> Deferred[Any]:
        self.orders.append((method, headers))
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.held.append(d)
            return d
        return succeed(None)


class Cluster:
    """State, directory, membership and repairer over one Clock."""

    def __init__(self, tmp_path: Path, factor: int = 2, batch: int = 100) -> None:
        self.clock = Clock()
        self.state = MasterState(tmp_path / "master.sqlite3", synchronous="OFF")
        self.directory = Directory(self.state, now=self.clock.seconds)
        self.membership = Membership(
            clock=self.clock, monotonic=self.clock.seconds, versions=V,
            heartbeat_interval=1.0, heartbeat_timeout=10_000.0,
        )
        self.factor = factor
        self.batch = batch
        self.links: dict[str, Link] = {}
        self._repairer: Repairer | None = None

    @property
    def repairer(self) -> Repairer:
        """The repairer, made on first use: what the directory held before is as a
        restarted master finds it (known to the state, never queued)."""
        if self._repairer is None:
            self._repairer = Repairer(
                clock=self.clock, monotonic=self.clock.seconds, directory=self.directory,
                membership=self.membership, factor=lambda: self.factor, grace=GRACE,
                interval=1.0, batch=self.batch,
            )
        return self._repairer

    def join(self, name: str, hold: bool = False) -> Link:
        link = Link(name, hold)
        self.links[name] = link
        inc = self.state.next_incarnation(name, 0.0)
        self.membership.register(name, inc, host="10.0.0.1", port=7000, slots=1, versions=V,
                                 conn=link, free_disk=10**12)
        return link

    def close_link(self, name: str) -> None:
        """``name``'s link closes, its process gone: every worker was heard just before
        (a link that closes after a silence is the heartbeat timeout's to judge)."""
        for r in self.membership.live():
            self.membership.heartbeat(r.name, r.incarnation, free_slots=r.free_slots,
                                      stored_bytes=r.stored_bytes, stored_files=0,
                                      free_disk=r.free_disk, conn=r.conn)
        self.links[name].connected = False
        self.membership.connection_lost(self.links[name])

    def store(self, key: str, *workers: str, version: int = 1) -> None:
        for w in workers:
            self.directory.add_replica(key, w, 10, sha(key, version), version)

    def orders(self, method: str) -> list[tuple[str, str]]:
        """(worker, key) of every ``method`` order sent."""
        return [(name, h["Key"]) for name, link in self.links.items()
                for m, h in link.orders if m == method]

    def forbid_scans(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make every whole-directory query raise from now on."""
        def scan(*args: object, **kwargs: object) -> None:
            raise AssertionError("the repairer scanned the whole directory")
        for name in ("live_holders", "stale_rows", "doomed_rows", "keys_off"):
            monkeypatch.setattr(self.state, name, scan)

    def count_examined_keys(self, monkeypatch: pytest.MonkeyPatch) -> list[int]:
        """Record the size of every batch the repairer examines."""
        sizes: list[int] = []
        real = self.state.examine

        def examine(keys: Any) -> Any:
            keys = list(keys)
            sizes.append(len(keys))
            return real(keys)
        monkeypatch.setattr(self.state, "examine", examine)
        return sizes


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.repairer.stop()
    c.state.close()


def settle(c: Cluster) -> None:
    """Start the repairer and let the start-up pass (after the start's grace) finish."""
    c.repairer.start()
    c.clock.advance(GRACE + 1)
    c.clock.advance(1)
    assert not c.repairer.queue and c.repairer.pending == 0


def keys_of(n: int, prefix: str = "k") -> list[str]:
    return [f"{prefix}/{i:05d}" for i in range(n)]


def test_idle_repair_examines_nothing(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the start-up pass is done, a cluster where nothing changes costs the repair
    no query at all, however long it runs."""
    for w in ("a", "b", "c"):
        cluster.join(w)
    for i, key in enumerate(keys_of(600)):
        cluster.store(key, "abc"[i % 3], "abc"[(i + 1) % 3])
    settle(cluster)
    # The start-up pass walked the directory in SQL and found nothing to examine.
    assert cluster.repairer.examined == 0
    cluster.forbid_scans(monkeypatch)
    sizes = cluster.count_examined_keys(monkeypatch)
    cluster.clock.pump([1.0] * 60)
    assert sizes == []
    assert cluster.orders("replicate") == cluster.orders("drop") == []


def test_start_up_pass_waits_for_the_grace_and_goes_in_slices(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a (re)start the directory is gone through once, in batches of at most
    ``batch`` keys, only when the workers have had the grace to come back."""
    for w in ("a", "b"):
        cluster.join(w)
    for key in keys_of(450):
        cluster.store(key, "a")  # one copy short each
    sizes = cluster.count_examined_keys(monkeypatch)
    cluster.repairer.concurrency = 10_000
    cluster.repairer.start()
    cluster.clock.advance(GRACE - 1)
    assert sizes == [] and cluster.orders("replicate") == []
    cluster.clock.advance(1)
    cluster.clock.advance(1)
    assert sizes and max(sizes) <= 100
    assert sorted(k for _, k in cluster.orders("replicate")) == keys_of(450)


def test_a_dead_workers_keys_are_repaired_from_its_own_copies(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker dead past its grace has exactly its own keys examined (one indexed walk
    of its copies) and re-replicated; the rest of the directory is never read."""
    for w in ("a", "b", "c", "d"):
        cluster.join(w)
    names = "abcd"
    mine = []
    for i, key in enumerate(keys_of(2000)):
        pair = (names[i % 4], names[(i // 4 + 1 + i) % 4])
        if pair[0] == pair[1]:
            pair = (pair[0], names[(i + 1) % 4])
        cluster.store(key, *pair)
        if "d" in pair:
            mine.append(key)
    settle(cluster)
    cluster.forbid_scans(monkeypatch)
    sizes = cluster.count_examined_keys(monkeypatch)
    cluster.repairer.concurrency = 10_000
    cluster.close_link("d")
    cluster.clock.pump([1.0] * int(GRACE - 1))
    assert cluster.orders("replicate") == []  # within the grace: nothing
    cluster.clock.pump([1.0] * 5)
    copied = sorted(k for _, k in cluster.orders("replicate"))
    assert copied == sorted(mine)
    # Each of its keys examined once for the copy, once more when the copy landed.
    assert sum(sizes) <= 2 * len(mine) and max(sizes) <= 100
    for key in mine:
        assert len([r for r in cluster.directory.locate(key) if r.worker != "d"]) == 2


def test_copies_beyond_the_concurrency_wait_and_go_on_as_copies_end(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most ``concurrency`` copies run; each one that ends starts the next at once (no
    wait for the next tick), and every key is examined a bounded number of times."""
    cluster.join("a")
    b = cluster.join("b", hold=True)
    cluster.join("c")
    for key in keys_of(40):
        cluster.store(key, "b", "c")
    settle(cluster)
    cluster.close_link("c")
    sizes = cluster.count_examined_keys(monkeypatch)
    cluster.clock.pump([1.0] * (int(GRACE) + 1))
    assert len(b.held) == cluster.repairer.concurrency == 4
    started = 4
    while b.held:
        b.held.pop(0).callback(None)
        cluster.clock.advance(0)  # a reactor turn, not a tick
        started += 1 if len(b.orders) > started else 0
        assert len(b.held) <= 4
    assert len(b.orders) == 40
    assert {k for _, k in cluster.orders("replicate")} == set(keys_of(40))
    assert sum(sizes) <= 3 * 40


def test_a_report_of_an_extra_copy_is_trimmed(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy reported beyond the factor is trimmed by the next pass, which examines
    that one key."""
    for w in ("a", "b", "c"):
        cluster.join(w)
    cluster.store("x", "a", "b")
    settle(cluster)
    cluster.forbid_scans(monkeypatch)
    sizes = cluster.count_examined_keys(monkeypatch)
    cluster.store("x", "c")
    cluster.clock.advance(1)
    assert sizes == [1, 1]  # to trim it, then once more when the drop is confirmed
    assert len(cluster.orders("drop")) == 1
    assert len(cluster.directory.locate("x")) == 2


def test_a_corrupt_copy_forgotten_is_copied_back(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy forgotten (a worker found it corrupt) is replaced from the other holder."""
    for w in ("a", "b", "c"):
        cluster.join(w)
    cluster.store("x", "a", "b")
    settle(cluster)
    cluster.forbid_scans(monkeypatch)
    cluster.directory.remove_replica("x", "b", 1)
    cluster.clock.advance(1)
    assert cluster.orders("replicate") == [("a", "x")]
    assert len(cluster.directory.locate("x")) == 2


def test_stale_and_deleted_copies_are_trimmed_from_the_queue(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newer version makes older copies stale, a delete dooms every copy: the keys
    touched are examined and those copies dropped."""
    for w in ("a", "b", "c"):
        cluster.join(w)
    cluster.store("x", "a", "b")
    cluster.store("y", "a", "b")
    settle(cluster)
    cluster.forbid_scans(monkeypatch)
    cluster.store("x", "a", "c", version=2)
    cluster.directory.delete("y")
    cluster.clock.advance(1)
    assert sorted(cluster.orders("drop")) == [("a", "y"), ("b", "x"), ("b", "y")]
    assert cluster.state.replicas_of("y") == []


def test_a_higher_factor_goes_through_the_directory_once(cluster: Cluster) -> None:
    """Raising the replication factor queues every key once (in slices): each gets its
    third copy."""
    for w in ("a", "b", "c"):
        cluster.join(w)
    for key in keys_of(250):
        cluster.store(key, "a", "b")
    settle(cluster)
    cluster.repairer.concurrency = 10_000
    cluster.factor = 3
    cluster.clock.pump([1.0] * 3)
    assert sorted(k for w, k in cluster.orders("replicate")) == keys_of(250)
    assert all(len(cluster.directory.locate(k)) == 3 for k in keys_of(250))


def test_a_worker_back_after_its_grace_has_its_surplus_trimmed(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose copies were replaced while it was away comes back: its keys are
    examined again (it entered the counted workers) and the surplus copies go."""
    for w in ("a", "b", "c"):
        cluster.join(w)
    for key in keys_of(30):
        cluster.store(key, "a", "b")
    settle(cluster)
    cluster.forbid_scans(monkeypatch)
    cluster.close_link("b")
    cluster.repairer.concurrency = 1000
    cluster.clock.pump([1.0] * (int(GRACE) + 2))
    assert len(cluster.orders("replicate")) == 30
    cluster.join("b")
    cluster.clock.pump([1.0] * 2)
    assert len(cluster.orders("drop")) == 30
    assert all(len(cluster.directory.locate(k)) == 2 for k in keys_of(30))


def test_registration_is_one_commit(tmp_path: Path) -> None:
    """A registration (incarnation, worker row, inventory) is one transaction."""
    c = Cluster(tmp_path)
    try:
        registry = WorkerRegistry(state=c.state, directory=c.directory,
                                  membership=c.membership, versions=V)
        inventory = b"".join(
            f'{{"key": "k/{i}", "size": 10, "sha256": "{sha(f"k/{i}", 1)}", "version": 1}}\n'
            .encode() for i in range(100)
        )
        c.state.issue_version()
        before = c.state.generation
        reg = registry.register("w", host="10.0.0.1", port=7000, slots=1, versions=V,
                                inventory=inventory, running=[], link=Link("w"))
        assert c.state.generation == before + 1
        assert reg.added == 100
        assert c.state.worker("w") is not None
        assert c.state.worker("w").last_incarnation == reg.incarnation  # type: ignore[union-attr]
    finally:
        c.state.close()


def test_the_start_up_walk_returns_only_keys_that_need_work(cluster: Cluster) -> None:
    """The directory walk behind the start-up pass (``keys_off``), slice by slice, yields
    the keys with too few or too many current copies or a stale copy, and the deleted
    keys some worker still holds: never a healthy key."""
    for key in keys_of(1000):
        cluster.store(key, "a", "b")
    cluster.store("k/00100", "c")  # surplus
    cluster.directory.remove_replica("k/00500", "b")  # short
    cluster.store("k/00700", "a", version=2)  # b's copy is now stale
    cluster.directory.delete("k/00900")  # a and b still hold it
    found: list[str] = []
    after: str | None = ""
    slices = 0
    while after is not None:
        keys, after = cluster.directory.keys_off(after, 64, 2, 2)
        found += keys
        slices += 1
    assert found == ["k/00100", "k/00500", "k/00700"]
    assert slices == 1000 // 64 + 2  # 999 live keys in 64s, then the empty end
    doomed, end = cluster.directory.keys_off("", 64, 2, 2, tombstones=True)
    assert (doomed, end) == (["k/00900"], "k/00900")
    assert cluster.directory.keys_off(end, 64, 2, 2, tombstones=True) == ([], None)


def test_registrations_take_one_reactor_turn_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crowd of registrations arriving at once is served in batches, one batch per
    reactor turn with one commit (the first registration at once), so no turn holds the
    reactor for the whole crowd; a registration whose link closed while it waited is
    not registered."""
    from types import SimpleNamespace

    from twisted.python.failure import Failure

    from dsml.master import requests
    from dsml.master.requests import MasterHandler

    c = Cluster(tmp_path)
    try:
        registry = WorkerRegistry(state=c.state, directory=c.directory,
                                  membership=c.membership, versions=V)
        handler = MasterHandler(
            registry=registry, keys=SimpleNamespace(directory=c.directory),  # type: ignore[arg-type]
            router=None, clock=c.clock,  # type: ignore[arg-type]
        )

        def register(name: str) -> tuple[Link, Any]:
            head = SimpleNamespace(headers={
                "name": name, "host": "10.0.0.1", "port": "7000", "slots": "1",
                "dsml-version": "1", "protocol-version": "1",
            })
            link = Link(name)
            return link, handler._register(head, b"", link)  # type: ignore[arg-type]

        # Each turn (a delayed call: task.Clock runs them all in one advance) registers
        # at most a batch, with one commit.
        per_turn: list[tuple[int, int]] = []
        step = handler._next_registration

        def turn() -> None:
            before, commits = len(c.membership.all()), c.state.generation
            step()
            per_turn.append((len(c.membership.all()) - before, c.state.generation - commits))
        handler._next_registration = turn  # type: ignore[method-assign]
        monkeypatch.setattr(requests, "REGISTRATIONS_PER_TURN", 3)
        answers = [register(f"w{i}") for i in range(6)]
        assert not isinstance(answers[0][1], Deferred)  # the first of the turn: at once
        assert [r.name for r in c.membership.all()] == ["w0"]
        assert len(c.clock.getDelayedCalls()) == 1  # the others wait for the next turn
        answers[2][0].connected = False  # type: ignore[misc]
        got: list[object] = []
        for _, d in answers[1:]:
            d.addBoth(got.append)
        c.clock.advance(0)
        # w1, w3 (w2's link closed) and w4 in one turn and one commit; w5 the next.
        assert per_turn == [(3, 1), (1, 1)]
        assert [r.name for r in c.membership.all()] == ["w0", "w1", "w3", "w4", "w5"]
        failed = [g for g in got if isinstance(g, Failure)]
        assert len(got) == 5 and len(failed) == 1 and "unavailable" in str(failed[0])
        assert [g.headers["Incarnation"] for g in got  # type: ignore[attr-defined]
                if not isinstance(g, Failure)] == [1, 1, 1, 1]
    finally:
        c.state.close()


def test_a_key_short_of_the_factor_is_copied_when_the_cluster_grows_back(
    cluster: Cluster,
) -> None:
    """Down to one counted worker, a key with a copy there meets the cluster's reduced
    target; when a second worker comes back it is copied there, although no scan would
    find it (the directory still counts the dead worker's copy: nemesis seed 1160)."""
    for w in ("a", "b", "c"):
        cluster.join(w)
    cluster.store("k", "a", "c")
    settle(cluster)
    cluster.close_link("b")
    cluster.close_link("c")
    cluster.clock.pump([1.0] * int(GRACE + 5))
    assert cluster.orders("replicate") == []  # one worker: nowhere to copy to
    cluster.join("b")
    cluster.clock.pump([1.0] * 3)
    assert cluster.orders("replicate") == [("a", "k")]


def commit(c: Cluster, key: str, version: int, *workers: str) -> None:
    """A client's commit of ``key`` at ``version`` on ``workers``."""
    for w in workers:
        c.directory.add_replica(key, w, 10, sha(key, version), version, committed=True)


def test_a_stale_copy_is_trimmed_only_once_the_current_version_has_its_copies(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #12: a newer version reported by one worker alone makes the acknowledged
    copies stale, but they stay until the newer one has its copies on live workers (it
    may never get them); then they go."""
    for w in ("a", "b"):
        cluster.join(w)
    c = cluster.join("c", hold=True)
    commit(cluster, "x", 1, "a", "b")
    settle(cluster)
    cluster.forbid_scans(monkeypatch)
    cluster.store("x", "c", version=2)  # reported, never committed
    cluster.clock.pump([1.0] * 3)
    assert cluster.orders("replicate") == [("c", "x")]  # to a, over its stale copy
    assert cluster.orders("drop") == []
    c.held.pop().callback(None)
    cluster.clock.advance(0)
    assert cluster.orders("drop") == [("b", "x")]
    assert {r.worker for r in cluster.directory.locate("x")} == {"a", "c"}


@pytest.mark.parametrize("committed", [False, True])
def test_a_lost_version_gives_way_to_the_acknowledged_one_only_if_never_committed(
    cluster: Cluster, committed: bool
) -> None:
    """Version 2 is on b alone, and b dies before it is copied.  Reported only (its
    commit never came), the key falls back, past b's grace, to a's copy of the
    acknowledged version 1, which was kept meanwhile; committed, it never goes back."""
    for w in ("a", "b", "c"):
        cluster.join(w)
    commit(cluster, "x", 1, "a", "b")
    settle(cluster)
    b = cluster.links["b"]
    b.hold = True  # its copy of 2 never gets anywhere
    if committed:
        commit(cluster, "x", 2, "b")
    else:
        cluster.store("x", "b", version=2)
    cluster.clock.pump([1.0] * 2)
    assert cluster.orders("replicate") == [("b", "x")]
    assert cluster.orders("drop") == []
    cluster.close_link("b")
    for d in b.held:  # the link's requests fail with it
        d.errback(DirectoryError("the link closed", "unavailable"))
    cluster.clock.pump([1.0] * (int(GRACE) + 2))
    assert cluster.orders("drop") == []  # a's copy of 1 was never trimmed
    if committed:
        assert cluster.directory.current("x") == (2, sha("x", 2))
        assert cluster.directory.lost(["a"]) == ["x"]
    else:
        assert cluster.directory.current("x") == (1, sha("x", 1))
        assert cluster.state.get_replica("x", "b") is None
        # Then repaired from there as any key is.
        assert {r.worker for r in cluster.directory.locate("x")} == {"a", "c"}


def test_a_copy_that_failed_goes_to_another_target_next(cluster: Cluster) -> None:
    """A copy to the best-ranked target failed (its disk full or failing): the retry
    goes to the next one, not to the same worker again and again (nemesis seed 2082:
    every retry of a one-copy key went to a full disk for 22 s, until its only holder
    died for good); once every target failed, they are tried again in order."""
    a = cluster.join("a", hold=True)
    cluster.join("b")
    cluster.join("c")
    cluster.store("x", "a", "b")
    settle(cluster)
    cluster.directory.remove_replica("x", "b", 1)  # b's copy found bad
    tried = []
    for _ in range(3):
        cluster.clock.advance(1)
        tried.append(cluster.repairer.copying.get("x"))
        a.held.pop().errback(DirectoryError("no space left on device", "disk-full"))
        cluster.clock.advance(0)
    assert tried == ["b", "c", "b"]
    cluster.clock.advance(1)
    assert cluster.repairer.copying.get("x") == "c"
    a.held.pop().callback(None)
    cluster.clock.advance(0)
    assert {r.worker for r in cluster.directory.locate("x")} == {"a", "c"}
