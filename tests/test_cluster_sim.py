"""The whole cluster in one process on a fake clock (dsml.testing.sim): crashes, silences,
restarts and corruption, with the invariants checked on the master and on every store."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsml.errors import DsmlError
from dsml.master.membership import ALIVE, DEAD, SUSPECT
from dsml.testing.sim import SimClient, SimCluster

MiB = 1024 * 1024

#: Ten keys: files of various sizes (0 and over 1 MiB included) and values.
FILES = {
    "empty": b"",
    "one": b"x",
    "text": b"hello, cluster\n" * 100,
    "64k": bytes(range(256)) * 256,
    "mib-plus": b"\x01\x02\x03" * (MiB // 3 + 5),
    "two-and-a-half": bytes(i % 251 for i in range(5 * MiB // 2)),
    "odd/name with spaces": b"spaces are fine in keys",
}
VALUES = {
    "config": b'{"lr": 0.1}',
    "empty-value": b"",
    "counter": b"42",
}


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimCluster]:
    """Three workers, replication 2, heartbeats 1 s, dead after 10 s; at the end, nothing
    may have been logged as a bug and no protocol callback may have raised."""
    cluster = SimCluster(tmp_path, workers=("w1", "w2", "w3"), replication=2)
    yield cluster
    failures = cluster.failures.messages()
    cluster.close()
    assert failures == [], "bugs were logged during the run"
    assert cluster.net.errors == []


def upload_all(sim: SimCluster, client: SimClient) -> None:
    """Upload FILES and VALUES, one a heartbeat apart so placement sees the load."""
    for key, data in FILES.items():
        stored = sim.wait(client.upload(key, data))
        assert stored.replicas == 2 and stored.size == len(data)
        sim.advance(1.1)
    for key, data in VALUES.items():
        stored = sim.wait(client.set(key, data))
        assert stored.replicas == 2
        sim.advance(1.1)


def expected() -> dict[str, bytes]:
    """Every key uploaded by upload_all, with its bytes."""
    return {**FILES, **VALUES}


def assert_consistent(sim: SimCluster, copies: int = 2) -> None:
    """Every key has ``copies`` replicas in the directory; the running workers' stores hold
    exactly those (current version, right bytes), and nothing else."""
    directory = sim.replicas(live=True)
    assert set(directory) == set(expected())
    for key, workers in directory.items():
        assert len(workers) == copies, (key, workers)
    assert sim.holders() == {k: w for k, w in directory.items()}
    for key, workers in directory.items():
        for name in workers:
            assert sim.read(name, key) == expected()[key], (key, name)


def replicated(sim: SimCluster, copies: int = 2) -> bool:
    """The directory and the stores agree, with ``copies`` live ones per key."""
    directory = sim.replicas(live=True)
    return (
        set(directory) == set(expected())
        and all(len(w) == copies for w in directory.values())
        and sim.holders() == directory
    )


def test_kill_rereplicate_and_return(sim: SimCluster) -> None:
    """The issue's scenario.  Ten keys (files of 0 bytes to 2.5 MiB, and values) get two
    replicas each; a worker's connection drops: every key still reads back right from the
    survivors; past the grace period the survivors re-replicate to two copies each; the
    worker comes back over its old store: its copies of keys overwritten or deleted
    meanwhile are deleted, surplus copies are trimmed, and exactly two current copies per
    key remain, each store holding exactly what the directory says."""
    client = sim.client()
    upload_all(sim, client)
    sim.advance(2)
    assert_consistent(sim)
    listed = {k.key: k for k in sim.wait(client.list())}
    assert set(listed) == set(expected())
    assert all(len(k.replicas) == 2 for k in listed.values())

    victim = "w1"
    held = set(sim.stored(victim))
    assert len(held) >= 3  # placement spread the keys: the victim holds some
    before = sim.holders()
    sim.kill(victim)
    sim.flush()
    assert sim.state(victim) == DEAD  # a closed connection is death at once
    for key, data in FILES.items():
        assert sim.wait(client.download(key)) == data
    for key, data in VALUES.items():
        assert sim.wait(client.get(key)) == data

    # Within the grace period nothing is copied (the worker may be back in a moment)...
    sim.advance(sim.heartbeat_timeout / 2)
    assert sim.holders() == {k: w - {victim} for k, w in before.items()}
    # ...past it, the survivors copy until every key has 2 live copies again.
    took = sim.until(lambda: replicated(sim), timeout=60, what="re-replication")
    assert took < 30
    assert_consistent(sim)
    master = sim.master
    assert master is not None and master.repairer.copies_done == len(held)

    # While the victim is away: one of its keys is overwritten, one deleted.
    overwritten, deleted = sorted(held & set(FILES))[:2]
    new_files = {overwritten: b"new content"}
    sim.wait(client.upload(overwritten, new_files[overwritten]))
    sim.wait(client.remove(deleted))
    sim.advance(2)

    drops = master.repairer.drops_done
    sim.restart(victim)
    sim.wait_registered([victim])
    want = {**expected(), **new_files}
    del want[deleted]

    def settled() -> bool:
        directory = sim.replicas()
        return (
            set(directory) == set(want)
            and all(len(w) == 2 for w in directory.values())
            and sim.holders() == directory
        )

    sim.until(settled, timeout=60, what="trims after the return")
    # Surplus copies (the victim's old copies are current again: 3 live ones) were
    # trimmed by the repairer, the stale and deleted ones at its registration.
    assert master.repairer.drops_done > drops
    back = sim.stored(victim)
    assert deleted not in back
    assert overwritten not in back or sim.read(victim, overwritten) == b"new content"
    for key, workers in sim.replicas().items():
        for name in workers:
            assert sim.read(name, key) == want[key]
    # Nothing more happens once settled.
    before = sim.replicas()
    sim.advance(10)
    assert sim.replicas() == before


def test_silent_worker_dies_after_the_timeout_not_before(sim: SimCluster) -> None:
    """A worker whose packets stop (its connection stays open) goes suspect, and is
    declared dead only once heartbeat_timeout has passed since its last heartbeat, never
    before."""
    master = sim.master
    assert master is not None
    sim.advance(3)
    sim.silence("w2")
    start = sim.clock.seconds()
    record = master.membership.get("w2")
    assert record is not None
    last = record.last_heartbeat
    assert start - last <= sim.heartbeat_interval
    seen: list[tuple[float, str]] = []
    while sim.clock.seconds() < start + sim.heartbeat_timeout + 3:
        sim.advance(0.1)
        now, state = sim.clock.seconds(), record.state
        seen.append((now, state))
        if now - last < sim.heartbeat_timeout - 1e-6:
            assert state != DEAD, f"dead after only {now - last:.2f} s of silence"
    states = [s for _, s in seen]
    assert SUSPECT in states and states[-1] == DEAD
    assert states.index(SUSPECT) < states.index(DEAD)
    assert record.died_at is not None
    assert sim.heartbeat_timeout <= record.died_at - last <= sim.heartbeat_timeout + 0.6
    assert record.dead_reason == "heartbeat timeout"
    # The others never noticed anything.
    assert sim.state("w1") == ALIVE and sim.state("w3") == ALIVE


def test_heartbeats_on_time_never_cause_a_false_death(sim: SimCluster) -> None:
    """With heartbeats on time, 100 s of clock never makes a worker suspect or dead, and
    no worker ever registers again."""
    master = sim.master
    assert master is not None
    incarnations = {n: sim.link(n).incarnation for n in sim.workers}
    for _ in range(1000):
        sim.advance(0.1)
        for name in sim.workers:
            assert sim.state(name) == ALIVE, (name, sim.clock.seconds())
    assert {n: sim.link(n).incarnation for n in sim.workers} == incarnations
    assert all(sim.link(n).registrations == 1 for n in sim.workers)


def test_master_restart_keeps_the_directory(sim: SimCluster) -> None:
    """After a master restart the directory and the listing are the same; the workers
    register again by themselves with new incarnations, and every key still reads."""
    client = sim.client()
    upload_all(sim, client)
    sim.advance(2)
    listing = sim.wait(client.list())
    directory = sim.replicas()
    incarnations = {n: sim.link(n).incarnation for n in sim.workers}

    sim.restart_master(downtime=3)
    sim.wait_registered()
    assert sim.replicas() == directory
    assert sim.wait(client.list()) == listing
    for name, old in incarnations.items():
        new = sim.link(name).incarnation
        assert new is not None and old is not None and new > old
    for key, data in FILES.items():
        assert sim.wait(client.download(key)) == data
    for key, data in VALUES.items():
        assert sim.wait(client.get(key)) == data
    sim.advance(5)
    assert_consistent(sim)


def test_corrupt_replica_is_read_around_and_replaced(sim: SimCluster) -> None:
    """A flipped byte in one worker's object file: the download still returns the right
    bytes (from the other replica), the master is told, and repair replaces the bad copy
    with a good one."""
    client = sim.client()
    data = bytes(range(256)) * 4096  # 1 MiB
    sim.wait(client.upload("model.bin", data))
    sim.advance(2)
    located = sim.wait(client.locate("model.bin"))
    bad = located.replicas[0][0]  # the replica a reader tries first
    path = sim.object_path(bad, "model.bin")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))

    assert sim.wait(client.download("model.bin")) == data
    assert client.corrupt_found == [("model.bin", bad)]

    def repaired() -> bool:
        holders = sim.replicas().get("model.bin", set())
        return len(holders) == 2 and all(
            hashlib.sha256(sim.read(w, "model.bin")).digest() == hashlib.sha256(data).digest()
            for w in holders
        ) and sim.holders()["model.bin"] == holders

    sim.until(repaired, timeout=30, what="repair of the corrupt copy")
    # Every copy now reads right, whichever a reader tries first.
    assert sim.wait(client.download("model.bin")) == data


def test_delete_wins_over_a_worker_that_was_away(sim: SimCluster) -> None:
    """A key removed through the master disappears from every worker; a worker that was
    down during the delete drops its copy when it comes back (the tombstone wins)."""
    client = sim.client()
    for i in range(6):
        sim.wait(client.upload(f"k{i}", f"data {i}".encode()))
        sim.advance(1.1)
    sim.advance(1)
    holders = sim.replicas()
    key = next(k for k, w in sorted(holders.items()) if "w3" in w)
    sim.kill("w3")
    sim.flush()
    sim.wait(client.remove(key))
    sim.advance(1)
    assert key not in sim.replicas()
    for name in sim.workers:
        assert key not in sim.stored(name)
    with pytest.raises(DsmlError) as e:
        sim.wait(client.download(key))
    assert e.value.code == "not-found"

    sim.restart("w3")
    sim.wait_registered(["w3"])
    sim.until(lambda: key not in sim.stored("w3"), timeout=10, what="w3 dropping the key")
    assert key not in sim.replicas()
    sim.advance(15)  # and it does not come back, nor get re-replicated
    assert key not in sim.replicas()
    assert all(key not in sim.stored(n) for n in sim.workers)


def test_pipeline_survives_the_next_worker_dying_mid_upload(sim: SimCluster) -> None:
    """The second worker of an upload pipeline dies while the bytes stream: the client gets
    a replication-failed answer on its open connection (not a dropped connection), the
    first worker's complete copy is recorded, and repair brings it to two copies."""
    client = sim.client()
    data = bytes(i % 253 for i in range(3 * MiB))
    grant, _, workers = sim.wait(client.placement("big", len(data)))
    (first, first_addr), (second, second_addr) = workers
    link = sim.wait(client.links.open(first_addr))
    answer = link.request(
        "file_upload", {"Key": "big", "Grant": grant, "Forward": second_addr}, len(data)
    )
    outcome: list[object] = []
    answer.addBoth(outcome.append)
    link.transport.write(data[:MiB])  # type: ignore[union-attr]
    sim.flush()
    assert sim.stored(second) == {}  # still streaming
    sim.kill(second)
    sim.flush()
    assert not link.transport.disconnected  # type: ignore[union-attr]
    link.transport.write(data[MiB:])  # type: ignore[union-attr]
    sim.flush()
    [failure] = outcome
    assert isinstance(failure.value, DsmlError)  # type: ignore[attr-defined]
    assert failure.value.code == "replication-failed"  # type: ignore[attr-defined]
    assert sim.read(first, "big") == data
    sim.advance(1)
    assert sim.replicas(live=True)["big"] == {first}
    sim.until(lambda: len(sim.replicas(live=True).get("big", ())) == 2, timeout=30)
    assert all(sim.read(w, "big") == data for w in sim.replicas(live=True)["big"])


def test_only_an_upload_is_passed_down_a_pipeline(sim: SimCluster) -> None:
    """A Forward header on a get, stat or delete is ignored: it once made the worker pass
    an empty value_upload on, which overwrote the key on the next worker."""
    client = sim.client()
    stored = sim.wait(client.set("kept", b"the value"))
    assert stored.replicas == 2
    sim.advance(1.1)
    first, second = sorted(sim.replicas()["kept"])
    addrs = {lst.node: addr for addr, lst in sim.net.listeners.items()}
    first_addr, second_addr = addrs[first], addrs[second]
    link = sim.wait(client.links.open(first_addr))
    for method in ("value_retrieve", "stat"):
        response = sim.wait(link.request(method, {"Key": "kept", "Forward": second_addr}))
        assert "replicas" not in response.headers
    sim.flush()
    assert sim.read(first, "kept") == b"the value"
    assert sim.read(second, "kept") == b"the value"


def test_a_vanished_machine_is_noticed_by_heartbeats_and_its_restart_waits(
    sim: SimCluster,
) -> None:
    """A worker whose machine loses power leaves a half-open link: the master notices by
    missed heartbeats only.  A new process started meanwhile is refused (duplicate-name)
    and retries with backoff until the old one is declared dead, then registers."""
    sim.advance(2)
    sim.power_off("w2")
    off = sim.clock.seconds()
    sim.advance(1)
    assert sim.state("w2") == ALIVE  # nothing closed: the master cannot know yet
    sim.restart("w2")
    sim.advance(3)
    assert not sim.registered("w2")
    took = sim.until(lambda: sim.registered("w2"), timeout=30, what="re-registration")
    assert sim.clock.seconds() - off >= sim.heartbeat_timeout
    assert took < sim.heartbeat_timeout + 10
    # The old half-open link is gone too by now (keepalive / TCP_USER_TIMEOUT).
    sim.advance(20)
    assert len(sim.net.connections_of("w2")) == 1  # only the new link to the master


@pytest.mark.parametrize("chunk", [1, 1000])
def test_messages_arriving_in_pieces(tmp_path: Path, chunk: int) -> None:
    """With every connection delivering a few bytes per round, uploads (pipelined),
    values, downloads and a failover read all work the same."""
    sim = SimCluster(tmp_path, chunk=chunk)
    try:
        client = sim.client()
        data = bytes(range(256)) * (16 if chunk == 1 else 400)
        sim.wait(client.upload("f", data))
        sim.wait(client.set("v", b"value"))
        sim.advance(1)
        holders = sim.replicas()["f"]
        assert holders == sim.holders()["f"] and len(holders) == 2
        # The first replica's storage port refuses (its process lives on): fail over.
        first = sim.wait(client.locate("f")).replicas[0][0]
        sim.net.stop_listening(sim.addr(first))
        assert sim.wait(client.download("f")) == data
        sim.net.listen(sim.addr(first), sim.workers[first].factory, first)
        sim.kill(sorted(sim.replicas()["v"])[0])
        assert sim.wait(client.get("v")) == b"value"
        assert sim.failures.messages() == []
    finally:
        sim.close()


def test_read_fails_over_from_a_machine_that_vanished(sim: SimCluster) -> None:
    """A replica whose machine vanished (the master does not know yet, connects to it hang)
    costs a reader the connect timeout, then the next replica serves the bytes."""
    client = sim.client()
    data = b"precious" * 1000
    sim.wait(client.upload("p", data))
    sim.advance(1)
    first = sim.wait(client.locate("p")).replicas[0][0]
    sim.power_off(first)
    start = sim.clock.seconds()
    assert sim.wait(client.download("p")) == data
    assert sim.clock.seconds() - start >= sim.net.connect_timeout


@pytest.mark.parametrize(("downtime", "seed"), [(3.0, 2), (12.0, 1), (30.0, 2)])
def test_master_restart_copies_nothing(tmp_path: Path, downtime: float, seed: int) -> None:
    """Workers come back to a restarted master one by one, each on its own backoff; the
    first ones back do not start copying what the others hold (nor trim it after)."""
    sim = SimCluster(tmp_path, seed=seed)
    try:
        client = sim.client()
        upload_all(sim, client)
        sim.advance(2)
        directory = sim.replicas()
        master = sim.restart_master(downtime=downtime)
        sim.wait_registered()
        sim.advance(30)
        assert (master.repairer.copies_done, master.repairer.drops_done) == (0, 0)
        assert sim.replicas() == directory == sim.holders()
        assert sim.failures.messages() == []
    finally:
        sim.close()


def test_master_restart_still_repairs_a_worker_that_stays_away(sim: SimCluster) -> None:
    """A worker that does not come back after a master restart is treated as dead once the
    grace has passed since the start: its copies are replaced from the others."""
    client = sim.client()
    upload_all(sim, client)
    sim.advance(2)
    gone = set(sim.stored("w3"))
    assert gone
    sim.kill_master()
    sim.kill("w3")
    sim.advance(5)
    master = sim.start_master()
    started = sim.clock.seconds()
    sim.wait_registered()
    sim.until(lambda: replicated(sim), timeout=60, what="repair of w3's copies")
    assert sim.clock.seconds() - started >= sim.heartbeat_timeout
    assert master.repairer.copies_done == len(gone)
    assert_consistent(sim)
