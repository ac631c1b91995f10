"""What keeps a big master cheap (issue #11): a worker whose inventory digest says it
holds what the directory has for it is not reconciled, and a backlog of keys that no
longer need a copy drains in bulk.

A real :class:`MasterState` under ``tmp_path``; the directory, membership, registry and
repairer on one ``task.Clock`` (the helpers of test_repair_queue).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_repair_queue import GRACE, Cluster, Link, V, keys_of, settle, sha

from dsml.master.directory import QUARANTINED, Directory
from dsml.master.registry import WorkerRegistry, parse_inventory
from dsml.master.state import MasterState
from dsml.protocol.inventory import inventory_digest


def inventory(keys: list[str], version: int = 1) -> bytes:
    return b"".join(
        f'{{"key": "{k}", "size": 10, "sha256": "{sha(k, version)}", "version": {version}}}\n'
        .encode() for k in keys
    )


class Reg:
    """A registry over a cluster, counting the reconciles it runs."""

    def __init__(self, c: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
        self.c = c
        self.registry = WorkerRegistry(state=c.state, directory=c.directory,
                                       membership=c.membership, versions=V)
        self.reconciles = 0
        real = c.directory.reconcile

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.reconciles += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(c.directory, "reconcile", counting)

    def register(self, name: str, payload: bytes, digest: bool = True) -> tuple[Any, Link]:
        old = self.c.membership.get(name)
        if old is not None and old.live:
            self.c.membership.connection_lost(old.conn)
        link = Link(name)
        self.c.links[name] = link
        entries, _ = parse_inventory(payload)
        reg = self.registry.register(name, host="10.0.0.1", port=7000, slots=1, versions=V,
                                     inventory=payload, running=[], link=link,
                                     digest=inventory_digest(entries) if digest else None)
        return reg, link


@pytest.fixture
def reg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Reg]:
    c = Cluster(tmp_path)
    c.state.issue_version()
    c.state.issue_version()
    yield Reg(c, monkeypatch)
    c.repairer.stop()
    c.state.close()


def test_the_same_inventory_again_is_not_reconciled(reg: Reg) -> None:
    payload = inventory(keys_of(50))
    first, _ = reg.register("w", payload)
    assert (first.added, first.removed, first.rejected, reg.reconciles) == (50, 0, 0, 1)
    again, link = reg.register("w", payload)
    assert reg.reconciles == 1  # answered from the digest
    assert (again.added, again.removed, again.rejected) == (0, 0, 0)
    assert again.incarnation == first.incarnation + 1
    assert link.orders == []
    assert sorted(reg.c.state.replicas_on("w")) == keys_of(50)
    # Without the header (an older worker): reconciled, as ever.
    reg.register("w", payload, digest=False)
    assert reg.reconciles == 2
    # A digest that does not match (another inventory, or a lie): reconciled.
    reg.register("w", inventory(keys_of(49)))
    assert reg.reconciles == 3
    assert sorted(reg.c.state.replicas_on("w")) == keys_of(49)


def test_the_digest_follows_every_write_to_a_workers_copies(reg: Reg) -> None:
    """Copies recorded or forgotten after the registration (reports, repair copies,
    trims confirmed) keep the digest true: a worker whose inventory changed the same
    way is still known; one whose inventory did not is reconciled."""
    keys = keys_of(10)
    reg.register("w", inventory(keys))
    d = reg.c.directory
    d.add_replica("k/new", "w", 10, sha("k/new", 1), 1)  # a store it reported
    d.remove_replica(keys[0], "w", 1)  # a trim it confirmed
    held = [*keys[1:], "k/new"]
    reg.register("w", inventory(held))
    assert reg.reconciles == 1
    # The master forgot a copy the worker still has (a report lost): not known.
    d.remove_replica(keys[1], "w", 1)
    again, _ = reg.register("w", inventory(held))
    assert reg.reconciles == 2 and again.added == 1


def test_trims_are_still_ordered_when_the_digest_matches(reg: Reg) -> None:
    """A delete makes the worker's copy one to trim: a registration with a matching
    digest still orders the drop.  A newer version written elsewhere makes its copy
    stale, but that one is the repairer's to trim (once the newer version has all its
    copies: issue #12), never the registration's."""
    keys = keys_of(10)
    reg.register("w", inventory(keys))
    d = reg.c.directory
    d.add_replica(keys[1], "x", 10, sha(keys[1], 2), 2)  # w's copy is now stale
    d.delete(keys[2])  # w's copy is now doomed
    r, link = reg.register("w", inventory(keys))
    assert reg.reconciles == 1
    assert [(m, h["Key"], h["Version"]) for m, h in link.orders] == [("drop", keys[2], 1)]
    # Until the worker confirms, every registration orders it again.
    _, link = reg.register("w", inventory(keys))
    assert len(link.orders) == 1 and reg.reconciles == 1
    d.remove_replica(keys[1], "w", 1)
    d.remove_replica(keys[2], "w", 1)
    held = [k for k in keys if k not in keys[1:3]]
    _, link = reg.register("w", inventory(held))
    assert link.orders == [] and reg.reconciles == 1
    assert reg.c.state.inventory("w")[2] is True  # type: ignore[index]


def test_a_quarantined_or_unreadable_inventory_is_reconciled_every_time(reg: Reg) -> None:
    """An entry the directory refused is not among the worker's copies, so the digest
    of the inventory never matches: each registration reconciles (and quarantines)."""
    issued = reg.c.state.last_version
    quarantined = inventory(keys_of(5)) + inventory(["k/future"], version=issued + 1)
    reg.register("w", quarantined)
    reg.register("w", quarantined)
    assert reg.reconciles == 2
    assert reg.registry.quarantined == 2
    unreadable = inventory(keys_of(5)) + b"not json\n"
    reg.register("v", unreadable)
    again, _ = reg.register("v", unreadable)
    assert reg.reconciles == 4 and again.rejected == 1


def test_the_digest_is_kept_across_a_restart(tmp_path: Path) -> None:
    """The digest lives in the state (an older file gains the table on open); a write
    through any path keeps it true or forgets it."""
    entries = [("k", 1, sha("k", 1), 1)]
    state = MasterState(tmp_path / "m.sqlite3", synchronous="OFF")
    try:
        state.issue_version()
        d = Directory(state)
        d.reconcile("w", entries)
        assert d.known_inventory("w", inventory_digest(entries), 1) is not None
        assert d.known_inventory("w", inventory_digest(entries), 2) is None
        assert d.known_inventory("w", inventory_digest(entries) ^ 1, 1) is None
        assert d.known_inventory("v", inventory_digest(entries), 1) is None
    finally:
        state.close()
    state = MasterState(tmp_path / "m.sqlite3", synchronous="OFF")
    try:
        d = Directory(state)
        known = d.known_inventory("w", inventory_digest(entries), 1)
        assert known is not None and known.unchanged == 1 and not known.trim
        state.put_replica("k2", "w", 1, sha("k2", 1), 1)  # a raw write: forgotten
        assert state.inventory("w") is None
    finally:
        state.close()


def test_quarantine_reason_is_still_reported(reg: Reg) -> None:
    issued = reg.c.state.last_version
    entry = ("k", 1, sha("k", issued + 5), issued + 5)
    result = reg.c.directory.reconcile("w", [entry], issued=issued)
    assert result.rejected and result.rejected[0].reason.startswith(QUARANTINED)
    assert reg.c.directory.known_inventory("w", inventory_digest([entry]), 1) is None


def test_a_backlog_that_needs_nothing_drains_in_one_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys waiting for a copy slot whose copy is no longer needed (their other holder
    came back) are examined a batch at a time, not ``concurrency`` per pass."""
    c = Cluster(tmp_path, batch=500)
    try:
        c.join("a")
        b = c.join("b", hold=True)
        c.join("c")
        keys = keys_of(400)
        for key in keys:
            c.store(key, "b", "c")
        settle(c)
        for r in c.membership.live():  # heard just now: a closed link is a death
            c.membership.heartbeat(r.name, r.incarnation, free_slots=1, stored_bytes=0,
                                   stored_files=0, free_disk=10**12, conn=r.conn)
        c.links["c"].connected = False
        c.membership.connection_lost(c.links["c"])
        c.clock.pump([1.0] * (int(GRACE) + 1))
        rep = c.repairer
        assert len(b.held) == rep.concurrency == 4
        assert len(rep._backlog) == 396
        # c comes back: the copies running and waiting are no longer needed.
        c.join("c")
        passes: list[int] = []
        real = rep._pass

        def counted_pass() -> bool:
            passes.append(rep.examined)
            return real()
        monkeypatch.setattr(rep, "_pass", counted_pass)
        for d in list(b.held):  # the copies end: slots free, the backlog goes
            b.held.remove(d)
            d.callback(None)
        c.clock.advance(0)
        c.clock.advance(0)
        c.clock.pump([1.0] * 2)
        assert rep._backlog == {} and not rep.copying
        assert len(b.orders) == 4  # no copy beyond the four that ran
        # The 396 went in a handful of passes, not 396 / 4.
        assert len(passes) < 20
    finally:
        c.repairer.stop()
        c.state.close()


def test_a_batch_of_registrations_is_one_commit_and_each_stands_alone(reg: Reg) -> None:
    """register_many: one commit for the batch; a registration that fails (a duplicate
    name, an error half-way through its inventory) leaves nothing of itself, not even
    an incarnation, and the others stand."""
    from dsml.master.registry import RegisterRequest

    def req(name: str, link: Link, payload: bytes) -> RegisterRequest:
        return RegisterRequest(name, "10.0.0.1", 7000, 1, V, payload, [], link)

    c = reg.c
    real = c.directory.reconcile

    def broken(worker: str, *args: Any, **kwargs: Any) -> Any:
        if worker == "bad":
            real(worker, *args, **kwargs)  # its writes are made, then undone
            raise RuntimeError("disk trouble")
        return real(worker, *args, **kwargs)
    c.directory.reconcile = broken  # type: ignore[method-assign]
    before = c.state.generation
    a, a2, bad, b = Link("a"), Link("a2"), Link("bad"), Link("b")
    out = reg.registry.register_many([
        req("a", a, inventory(keys_of(3, "a"))),
        req("a", a2, inventory(keys_of(3, "a"))),  # the name is taken in this batch
        req("bad", bad, inventory(keys_of(3, "bad"))),
        req("b", b, inventory(keys_of(3, "b"))),
    ])
    assert c.state.generation == before + 1  # one commit
    assert [type(o).__name__ for o in out] == [
        "Registration", "MembershipError", "RuntimeError", "Registration"]
    assert c.state.worker("bad") is None  # no incarnation used up, no row
    assert c.state.replicas_on("bad") == {}
    assert sorted(c.state.replicas_on("b")) == keys_of(3, "b")
    assert c.membership.get("bad") is not None and not c.membership.get("bad").live  # type: ignore[union-attr]
    assert [r.name for r in c.membership.live()] == ["a", "b"]


def test_a_registration_that_says_its_room_can_take_writes_at_once(reg: Reg) -> None:
    """Free-Disk and Stored-Bytes on the registration: the worker's record has them
    before any heartbeat, so a write can be placed there (without: no room known)."""
    from dsml.master.registry import RegisterRequest

    reg.registry.register_many([
        RegisterRequest("roomy", "10.0.0.1", 7000, 1, V, b"", [], Link("roomy"),
                        free_disk=10**9, stored_bytes=5),
        RegisterRequest("quiet", "10.0.0.2", 7000, 1, V, b"", [], Link("quiet")),
    ])
    roomy, quiet = reg.c.membership.get("roomy"), reg.c.membership.get("quiet")
    assert roomy is not None and (roomy.free_disk, roomy.stored_bytes) == (10**9, 5)
    assert quiet is not None and quiet.free_disk == 0


def test_a_batch_stops_when_time_is_up(reg: Reg) -> None:
    from dsml.master.registry import RegisterRequest

    reqs = [RegisterRequest(f"w{i}", "10.0.0.1", 7000, 1, V, b"", [], Link(f"w{i}"))
            for i in range(5)]
    asked: list[int] = []

    def more() -> bool:
        asked.append(1)
        return len(asked) < 3
    out = reg.registry.register_many(reqs, more=more)
    assert len(out) == 3  # the first always, then two more while time was left
    assert [r.name for r in reg.c.membership.live()] == ["w0", "w1", "w2"]


def test_nodes_says_what_the_repairer_has_under_way(tmp_path: Path) -> None:
    """``Repair-Pending`` and ``Repair-Scanning`` in the ``nodes`` answer: the start-up
    pass is under way until the start's grace has passed and the walk has ended."""
    from types import SimpleNamespace

    from dsml.master.requests import MasterHandler

    c = Cluster(tmp_path)
    try:
        c.join("a")
        registry = WorkerRegistry(state=c.state, directory=c.directory,
                                  membership=c.membership, versions=V)
        handler = MasterHandler(
            registry=registry, keys=SimpleNamespace(directory=c.directory),  # type: ignore[arg-type]
            router=None, clock=c.clock, repair=c.repairer.status,  # type: ignore[arg-type]
        )

        def nodes() -> tuple[int, int]:
            h = handler._nodes(None, b"", None).headers  # type: ignore[arg-type]
            return h["Repair-Pending"], h["Repair-Scanning"]
        c.repairer.start()
        assert nodes() == (0, 1)  # the start-up pass is still to come
        c.clock.advance(GRACE + 1)
        c.clock.advance(1)
        assert nodes() == (0, 0)
    finally:
        c.repairer.stop()
        c.state.close()


def test_repair_passes_count_their_cpu_time(tmp_path: Path) -> None:
    """``Repair-Cpu-Ms``: the CPU clock read around every pass (the timer's and the
    follow-ups on later reactor turns), summed; what the scale benchmark's steady-state
    repair CPU is read from.  Work outside a pass is not counted."""
    c = Cluster(tmp_path, batch=10)
    ticks = [0.0]

    def cpu() -> float:  # a CPU clock that moves 5 ms between any two readings
        ticks[0] += 0.005
        return ticks[0]
    try:
        c.join("a")
        c.repairer.cpu = cpu
        c.repairer.start()
        assert c.repairer.status()["cpu_ms"] == 0
        c.clock.advance(1)  # one timer pass: two readings, 5 ms apart
        assert c.repairer.status()["cpu_ms"] == 5
        c.repairer.enqueue(f"k{i}" for i in range(35))  # 4 slices: the timer's + 3 follow-ups
        c.clock.advance(1)
        for _ in range(5):
            c.clock.advance(0)
        assert c.repairer.status()["cpu_ms"] == 5 + 4 * 5
        ticks[0] += 100.0  # CPU used elsewhere between passes is not the repairer's
        c.clock.advance(1)
        assert c.repairer.status()["cpu_ms"] == 5 + 5 * 5
    finally:
        c.repairer.stop()
        c.state.close()
