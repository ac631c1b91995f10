"""Issue #10, trust: what peers claim is checked, never believed.

Versions are the master's alone (a write carries the master's Grant, a ``Version`` header
is ``forbidden``, a claim above the counter is quarantined and the counter survives a
restart as persisted); an upload's ``Forward`` hops go only to registered workers (else
``forbidden``, no connection attempted); a client's ``corrupt`` is a hint that the
holder checks by re-hashing its copy, and only the holder's ``bad_copy`` drops it.

Unit tests on fake clocks and the in-memory simulation first (:mod:`dsml.testing.sim`,
the production wiring), then one scenario through real processes over TLS.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from dsml.client import Client, ClusterClient
from dsml.errors import DsmlError
from dsml.localcluster import LocalCluster
from dsml.master.directory import QUARANTINED, Directory
from dsml.master.state import VERSION_BLOCK, MasterState
from dsml.protocol.grants import Grants, WorkerGrants, new_secret
from dsml.testing.poll import poll
from dsml.testing.sim import SimCluster
from dsml.worker.store import Store
from dsml.worker.trust import PEERS_TTL, MasterTrust

MiB = 1024 * 1024


def sha(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def code_of(failure_or_exc: Any) -> str:
    """The wire code of a DsmlError (or of a Failure wrapping one)."""
    e = getattr(failure_or_exc, "value", failure_or_exc)
    assert isinstance(e, DsmlError), repr(e)
    return e.code


# -- grants -----------------------------------------------------------------------------


def test_a_grant_checks_out_only_for_its_own_key_version_and_workers() -> None:
    """The master's grant names its version and the workers it placed the write on; a
    worker takes it only with an entry for its own name under its own key.  Another
    key's grant, a changed version or MAC, another master's grant, a grant without the
    worker, or one a worker signed with its own key for another: ``forbidden``; a
    malformed one: ``bad-header``."""
    g = Grants(new_secret())
    w1 = WorkerGrants("w1", g.worker_key("w1"))
    grant = g.issue("k", 41, ["w2", "w1"])
    assert g.version_of("k", grant) == 41 and w1.version_of("k", grant) == 41
    head, _, rest = grant.partition(",")
    version, mac = head.split(".")
    # w2's key signs for w2 only: the grant it makes up for w1 is refused.
    w2_key = g.worker_key("w2")
    made_up = Grants(w2_key).issue("k", 10**14, ["w1"])
    for key, bad in [
        ("other", grant),  # another key's
        ("k", grant.replace("41.", "42.", 1)),  # the version changed
        ("k", Grants(new_secret()).issue("k", 41, ["w1"])),  # another master's
        ("k", g.issue("k", 41, ["w2"])),  # not placed on w1
        ("k", made_up),
        ("k", f"41.{mac}"),  # no worker at all
    ]:
        with pytest.raises(DsmlError) as e:
            w1.version_of(key, bad)
        assert e.value.code == "forbidden", bad
    # The master checks every MAC of a grant (commit): its own and each worker's.
    for bad in [f"{version}.{'0' * 32},{rest}", made_up, grant.replace("w1=", "w3=")]:
        with pytest.raises(DsmlError) as e:
            g.version_of("k", bad)
        assert e.value.code == "forbidden", bad
    for bad in ["41", "041." + mac, "41." + mac.upper(), "x." + mac, "", grant + ",w3=zz"]:
        with pytest.raises(DsmlError) as e:
            w1.version_of("k", bad)
        assert e.value.code == "bad-header", bad


# -- the counter and quarantined claims --------------------------------------------------


def test_the_counter_survives_a_restart_as_persisted_whatever_was_claimed(
    tmp_path: Path,
) -> None:
    """Claims above the counter are quarantined (nothing recorded) and never move it; a
    restart starts from the persisted reservation, not from anything reported; the grant
    secret survives the restart too (grants issued before stay valid)."""
    state = MasterState(tmp_path, synchronous="OFF")
    d = Directory(state)
    v = d.next_version()
    grant = d.grants.issue("k", v, ["w1"])
    r = d.reconcile("w1", [("k", 1, sha(b"x"), 10**14)], issued=state.last_version)
    assert [x.reason.split(":")[0] for x in r.rejected] == [QUARANTINED]
    assert d.current("k") is None and state.replicas_on("w1") == {}
    assert state.last_version == v
    state.close()
    state = MasterState(tmp_path, synchronous="OFF")
    d = Directory(state)
    assert state.last_version == VERSION_BLOCK  # the reservation, not 10**14
    assert d.grants.version_of("k", grant) == v
    assert v < d.next_version() <= VERSION_BLOCK + 1
    state.close()


def test_a_claim_never_issued_leaves_the_real_copies_current(tmp_path: Path) -> None:
    """Two real copies at an issued version; a third worker's inventory claims a newer,
    never-issued version of the key, with another content: the claim is quarantined, the
    real copies stay current (no trim ordered for them), and the claimant's own earlier
    copy stays as the directory had it."""
    state = MasterState(tmp_path, synchronous="OFF")
    d = Directory(state)
    v = d.next_version()
    for w in ("w1", "w2", "w3"):
        d.add_replica("k", w, 4, sha(b"real"), v, issued=state.last_version)
    r = d.reconcile(
        "w3", [("k", 5, sha(b"evil!"), v + 1), ("other", 1, sha(b"o"), v)],
        issued=state.last_version,
    )
    assert [x.key for x in r.rejected] == ["k"] and r.rejected[0].reason.startswith(QUARANTINED)
    assert r.trim == ()
    assert {x.worker for x in d.locate("k")} == {"w1", "w2", "w3"}
    assert d.current("k") == (v, sha(b"real"))
    assert d.stale_replicas() == []
    assert d.current("other") == (v, sha(b"o"))  # the honest entry beside it is taken
    with pytest.raises(DsmlError) as e:
        d.add_replica("k", "w1", 5, sha(b"evil!"), v + 1, issued=state.last_version)
    assert e.value.code == "forbidden"
    assert d.current("k") == (v, sha(b"real")) and state.last_version == v
    state.close()


# -- the store's re-hash ------------------------------------------------------------------


def test_store_verify_finds_a_flipped_byte_and_forget_removes_the_copy(tmp_path: Path) -> None:
    """verify() re-hashes: True for a good file and value, False once a byte of the object
    flips or the object is gone; forget() removes only the version named, with no
    tombstone (the key is simply absent, and may be written again)."""
    store = Store(tmp_path / "s")
    try:
        w = store.begin_file("f")
        w.write(b"x" * 100_000)
        w.prepare()
        entry = w.commit()
        store.put_value("v", b"value")
        assert store.verify("f") and store.verify("v")
        _, body = store.open_read("f")
        with body:
            path = Path(body.name)
        raw = bytearray(path.read_bytes())
        raw[500] ^= 1
        path.write_bytes(bytes(raw))
        assert not store.verify("f")
        assert store.forget("f", entry.version + 1) is None  # another version: kept
        gone = store.forget("f", entry.version)
        assert gone is not None and gone.version == entry.version
        assert not path.exists() and "f" not in {e.key for e in store.inventory()}
        assert store.put_value("f", b"again").version > entry.version
        store.put_value("lost", b"y")
        w = store.begin_file("g")
        w.write(b"g")
        w.prepare()
        w.commit()
        _, body = store.open_read("g")
        with body:
            Path(body.name).unlink()
        assert not store.verify("g")
    finally:
        store.close()


# -- the worker's peer table --------------------------------------------------------------


class FakeMaster:
    """Answers the worker's ``peers`` requests from a list, counting them."""

    def __init__(self, addrs: list[str]) -> None:
        self.addrs = addrs
        self.asked = 0
        self.pending: list[Deferred[bytes]] = []

    def ask(self) -> Deferred[bytes]:
        self.asked += 1
        d: Deferred[bytes] = Deferred()
        self.pending.append(d)
        return d

    def answer(self) -> None:
        payload = b"".join(
            json.dumps({"name": f"w{i}", "addr": a}).encode() + b"\n"
            for i, a in enumerate(self.addrs)
        )
        pending, self.pending = self.pending, []
        for d in pending:
            d.callback(payload)


def test_forward_check_uses_the_table_refreshes_on_a_miss_and_refuses_strangers() -> None:
    """A hit in a fresh table needs no request; a miss asks the master once (concurrent
    misses share the request) and is ``forbidden`` if the fresh table lacks it; a table
    older than PEERS_TTL is fetched again; unregistered, a miss is ``unavailable``."""
    clock = Clock()
    trust = MasterTrust(clock)
    with pytest.raises(DsmlError) as e:
        trust.forward_check(["h:1"])
    assert e.value.code == "unavailable"
    master = FakeMaster(["h:1"])
    trust.registered(new_secret(), master.ask)
    assert master.asked == 1
    master.answer()
    assert trust.forward_check(["h:1"]) is None
    assert master.asked == 1
    outcomes: list[Any] = []
    trust.forward_check(["h:1", "evil:9"]).addBoth(outcomes.append)  # type: ignore[union-attr]
    trust.forward_check(["evil:9"]).addBoth(outcomes.append)  # type: ignore[union-attr]
    assert master.asked == 2 and outcomes == []
    master.answer()
    assert [code_of(o) for o in outcomes] == ["forbidden", "forbidden"]
    master.addrs.append("new:2")  # a worker registered since
    d = trust.forward_check(["new:2"])
    assert d is not None and master.asked == 3
    master.answer()
    assert d.called and d.result is None
    clock.advance(PEERS_TTL + 1)
    d = trust.forward_check(["h:1"])
    assert d is not None and master.asked == 4
    master.answer()
    trust.lost()
    with pytest.raises(DsmlError) as e:
        trust.forward_check(["other:3"])
    assert e.value.code == "unavailable"


def test_forward_check_fails_unavailable_when_the_master_cannot_answer() -> None:
    """A peers request that fails leaves the upload refused ``unavailable``, not hung."""
    trust = MasterTrust(Clock())
    trust.registered(new_secret(), lambda: fail(DsmlError("gone", "connection")))
    outcomes: list[Any] = []
    trust.forward_check(["h:1"]).addBoth(outcomes.append)  # type: ignore[union-attr]
    assert [code_of(o) for o in outcomes] == ["unavailable"]
    trust.registered(new_secret(), lambda: succeed(b'{"name": "w1", "addr": "h:1"}\n'))
    assert trust.forward_check(["h:1"]) is None


# -- the whole cluster, simulated ---------------------------------------------------------


@contextlib.contextmanager
def logged(text: str) -> Iterator[list[str]]:
    """The log lines, formatted, whose format contains ``text``, while the block runs."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if text in (event.get("log_format") or ""):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimCluster]:
    """Three workers, replication 2; nothing logged as a bug by the end."""
    cluster = SimCluster(tmp_path, workers=("w1", "w2", "w3"), replication=2)
    yield cluster
    failures = cluster.failures.messages()
    cluster.close()
    assert failures == [], "bugs were logged during the run"


def outcome(sim: SimCluster, d: Deferred[Any]) -> Any:
    """The result or Failure of ``d`` once the simulation settles."""
    got: list[Any] = []
    d.addBoth(got.append)
    sim.until(lambda: bool(got), timeout=30, what="an answer")
    return got[0]


def counter(sim: SimCluster) -> int:
    """The master's version counter."""
    assert sim.master is not None
    return sim.master.state.last_version


def seeded(sim: SimCluster) -> tuple[Any, bytes]:
    """A client, after a file ``f`` (two replicas) and a value ``v`` are written."""
    client = sim.client()
    data = bytes(range(256)) * 1024
    sim.wait(client.upload("f", data))
    sim.wait(client.set("v", b"value"))
    sim.advance(1)
    return client, data


def test_a_write_naming_its_version_or_without_a_good_grant_is_forbidden(
    sim: SimCluster,
) -> None:
    """Straight to a worker: a ``Version`` header (any role, any size), no grant, another
    key's grant or a forged one: ``forbidden``; the key's version on the worker, the
    directory and the master's counter are unchanged."""
    client, _ = seeded(sim)
    before = (sim.stored("w1").get("v"), sim.replicas(), counter(sim))
    w1 = sim.workers["w1"]
    assert w1.trust is not None
    grant_v = sim.wait(client.placement("other", 1))[0]  # a real grant, of another key
    link = sim.wait(client.links.open(sim.addr("w1")))
    for headers in [
        {"Key": "v", "Version": 999_999_999_999_999},
        {"Key": "v", "Version": 1},
        {"Key": "v"},
        {"Key": "v", "Grant": grant_v},
        {"Key": "v", "Grant": f"{counter(sim)}.{'0' * 32}"},
    ]:
        for method in ("value_upload", "file_upload"):
            got = outcome(sim, link.request(method, headers, b"evil"))
            assert code_of(got) == "forbidden", (method, headers)
    after = (sim.stored("w1").get("v"), sim.replicas(), counter(sim))
    assert after == (before[0], before[1], before[2] + 1)  # + the one placement above
    assert sim.wait(client.get("v")) == b"value"


def test_a_worker_numbers_writes_itself_only_until_it_first_joins_a_master(
    tmp_path: Path,
) -> None:
    """A worker that never registered is a standalone server (an ungranted write gets
    the store's own version); once registered it refuses ungranted writes, and still
    does after a restart while the master is away (the store remembers it joined)."""
    sim = SimCluster(tmp_path, workers=("w1",), replication=1, start=False)
    try:
        sim.start_worker("w1")
        client = sim.client()
        link = sim.wait(client.links.open(sim.addr("w1")))
        r = sim.wait(link.request("value_upload", {"Key": "solo"}, b"standalone"))
        assert int(r.headers["version"]) >= 1
        sim.start_master()
        sim.wait_registered(["w1"])
        got = outcome(sim, link.request("value_upload", {"Key": "solo"}, b"again"))
        assert code_of(got) == "forbidden"
        sim.kill_master()
        sim.restart("w1")
        link = sim.wait(client.links.open(sim.addr("w1")))
        got = outcome(sim, link.request("value_upload", {"Key": "solo"}, b"again"))
        assert code_of(got) == "forbidden"
        assert sim.read("w1", "solo") == b"standalone"
    finally:
        sim.close()


class Trap(Factory):
    """A listener that records every connection made to it."""

    def __init__(self) -> None:
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.connections += 1
        return Protocol()


def test_forward_to_an_address_no_worker_registered_is_refused_unconnected(
    sim: SimCluster,
) -> None:
    """With a good grant, an upload (value or file) whose Forward names an address
    that is not a registered worker's is ``forbidden``; nothing is stored on the first
    worker and no connection ever reaches that address."""
    client, _ = seeded(sim)
    trap = Trap()
    sim.net.listen("trap:1", trap, "attacker")
    for method in ("value_upload", "file_upload"):
        grant, _, placed = sim.wait(client.placement("fwd", 4))
        (_, first), (_, second) = placed
        link = sim.wait(client.links.open(first))
        headers = {"Key": "fwd", "Grant": grant, "Forward": f"{second},trap:1"}
        got = outcome(sim, link.request(method, headers, b"data"))
        assert code_of(got) == "forbidden", method
        assert "trap:1" in got.value.message
    sim.advance(1)
    assert trap.connections == 0
    assert "fwd" not in sim.holders()
    # The placed pipeline itself goes through, with a grant of the same kind.
    grant, _, placed = sim.wait(client.placement("fwd", 4))
    (_, first), (_, second) = placed
    link = sim.wait(client.links.open(first))
    headers = {"Key": "fwd", "Grant": grant, "Forward": second}
    got = outcome(sim, link.request("value_upload", headers, b"data"))
    assert got.headers["replicas"] == "2"


def test_a_corrupt_hint_about_a_healthy_copy_changes_nothing(sim: SimCluster) -> None:
    """A client's ``corrupt`` about a good copy: the holder re-hashes it, finds it good;
    the replicas, versions and bytes stay, and nothing is re-replicated."""
    client, data = seeded(sim)
    before = (sim.replicas(), sim.holders(), counter(sim))
    victim = sorted(sim.replicas()["f"])[0]
    with logged("re-hashed") as lines:
        r = sim.wait(client._ask_master("corrupt", {"Key": "f", "Worker": victim}))
        assert r.headers["checking"] == "1"
        sim.advance(5)
    assert len(lines) == 1 and "good" in lines[0]
    assert (sim.replicas(), sim.holders(), counter(sim)) == before
    assert sim.read(victim, "f") == data
    # Not live, or holding no copy: nothing to check.
    other = ({"w1", "w2", "w3"} - sim.replicas()["f"]).pop()
    r = sim.wait(client._ask_master("corrupt", {"Key": "f", "Worker": other}))
    assert r.headers["checking"] == "0"


def test_a_bad_copy_is_forgotten_by_its_holder_and_repaired(sim: SimCluster) -> None:
    """A flipped byte and a client's hint: the holder's re-hash fails, it removes the
    copy (no tombstone), says ``bad_copy``; the master forgets it and repair copies a
    good one back.  ``Worker.check_copy`` and ``report_corrupt`` do the same on the
    worker's own initiative."""
    client, data = seeded(sim)
    victim = sorted(sim.replicas()["f"])[0]
    path = sim.object_path(victim, "f")
    raw = bytearray(path.read_bytes())
    raw[7] ^= 0xFF
    path.write_bytes(bytes(raw))
    sim.wait(client._ask_master("corrupt", {"Key": "f", "Worker": victim}))
    sim.until(lambda: "f" not in sim.stored(victim) or None, timeout=10, what="forgotten")

    def repaired() -> bool:
        holders = sim.replicas(live=True).get("f", set())
        return len(holders) == 2 and all(sim.read(w, "f") == data for w in holders)

    sim.until(repaired, timeout=30, what="repair")
    # The worker's own API: a good copy passes, a bad one is forgotten and told.
    holder = sorted(sim.replicas()["f"])[0]
    worker = sim.workers[holder]
    assert sim.wait(worker.check_copy("f")) is True
    assert holder in sim.replicas()["f"]
    assert sim.wait(worker.report_corrupt("f")) is True
    assert "f" not in sim.stored(holder) and holder not in sim.replicas().get("f", set())
    sim.until(repaired, timeout=30, what="repair again")
    assert sim.wait(worker.report_corrupt("no-such-key")) is False


def test_a_report_of_a_version_never_issued_is_quarantined_and_logged_once(
    sim: SimCluster,
) -> None:
    """A registered worker reporting (twice) a store of a version the master never
    issued: refused, logged once, the directory and the counter unchanged, no drop
    ordered for the real copies (they stay in the stores)."""
    client, _ = seeded(sim)
    master = sim.master
    assert master is not None
    before = (sim.replicas(), sim.holders(), counter(sim))
    holder = sorted(sim.replicas()["v"])[0]
    link = sim.link(holder)
    line = json.dumps({"op": "store", "key": "v", "size": 4, "sha256": sha(b"evil"),
                       "version": 10**14}).encode() + b"\n"
    with logged("quarantined") as warnings:
        for _ in range(2):
            r = sim.wait(link.link.request(  # type: ignore[union-attr]
                "report", {"Name": holder, "Incarnation": link.incarnation}, line
            ))
            assert (r.headers["taken"], r.headers["refused"]) == ("0", "1")
        sim.advance(5)
    assert (sim.replicas(), sim.holders(), counter(sim)) == before
    assert master.registry.quarantined == 2
    assert len(warnings) == 1 and "10000000000000" in warnings[0], warnings
    assert sim.wait(client.get("v")) == b"value"


def test_an_inventory_entry_of_a_version_never_issued_is_quarantined(sim: SimCluster) -> None:
    """A worker comes back with a store claiming a never-issued version of a key (as if
    written around the master): its registration quarantines the entry; the directory
    still has the real version current, the other holder keeps its copy (no drop is
    ordered), and the counter does not move, not even across a master restart."""
    client, _ = seeded(sim)
    master = sim.master
    assert master is not None
    holders = sorted(sim.replicas()["v"])
    real = master.directory.current("v")
    sim.kill(holders[0])
    store = Store(sim.root / holders[0] / "store")
    store.put_value("v", b"evil", version=10**14)
    store.close()
    top = counter(sim)
    sim.restart(holders[0])
    sim.wait_registered([holders[0]])
    sim.advance(5)
    assert master.registry.quarantined >= 1
    assert master.directory.current("v") == real and counter(sim) == top
    assert sim.read(holders[1], "v") == b"value"
    assert sim.wait(client.get("v")) == b"value"
    sim.restart_master()
    sim.wait_registered()
    assert sim.master is not None and sim.master.directory.current("v") == real
    assert counter(sim) < 10**14


# -- real processes ---------------------------------------------------------------------

#: Every bounded wait of the process test gives up after this many seconds (the machine
#: is shared and may be slow; a pass takes a few seconds).
PATIENCE = 90.0


def worker_client(c: LocalCluster, name: str) -> Client:
    """A blocking client of worker ``name``'s storage server, as admin."""
    host, port = c.address(name)
    return Client(host, port, c.token, timeout=PATIENCE, tls=c.user_tls())


@pytest.mark.processes
def test_claims_through_real_processes_over_tls(tmp_path: Path) -> None:
    """A TLS master and two workers as twistd processes, an admin user on the wire:
    a write with ``Version`` is ``forbidden`` (counter unchanged); a Forward to a
    listener of the attacker's is ``forbidden`` and never connected; a ``corrupt`` hint
    about a healthy copy keeps it; one about a flipped byte gets it replaced."""
    c = LocalCluster(
        tmp_path / "c", workers=("w1", "w2"), tls=True,
        # A busy shared machine must not make a worker look dead mid-test.
        extra={"cluster": {"heartbeat_interval": 0.5, "heartbeat_timeout": 120.0,
                           "replication": 2}},
    )
    trap = socket.create_server(("127.0.0.1", 0))
    trap.setblocking(False)
    try:
        for name in ("master", "w1", "w2"):
            c.start(name)
        host, port = c.address("master")
        with ClusterClient(host, port, c.token, timeout=PATIENCE, tls=c.user_tls()) as cc:
            poll(lambda: [n.state for n in cc.nodes()] == ["alive", "alive"] or None,
                 "workers alive", timeout=PATIENCE)
            data = bytes(range(256)) * 4096
            src = tmp_path / "data.bin"
            src.write_bytes(data)
            cc.upload(str(src), "f")
            cc.set("v", b"value")
            version = cc.stat("v").version
            probe = cc.place("probe", 1)[0]
            with worker_client(c, "w1") as w1:
                for method, payload in (("value_upload", b"evil"), ("file_upload", b"evil")):
                    with pytest.raises(DsmlError) as e:
                        w1.call(method, {"Key": "v", "Version": 999_999_999_999_999}, payload)
                    assert e.value.code == "forbidden"
                grant = cc.placement("fwd", 1)[0]
                forward = f"127.0.0.1:{trap.getsockname()[1]}"
                with pytest.raises(DsmlError) as e:
                    w1.call("value_upload", {"Key": "fwd", "Grant": grant, "Forward": forward},
                            b"x")
                assert e.value.code == "forbidden"
            with pytest.raises(BlockingIOError):
                trap.accept()
            assert cc.stat("v").version == version and cc.get("v") == b"value"
            assert cc.place("probe", 1)[0] == probe + 2  # + the placement of "fwd"
            # corrupt: a hint about a healthy copy keeps it ...
            holders = sorted(cc.locate("f").replicas)
            for name in ("w1", "w2"):
                head, _ = cc.master.call("corrupt", {"Key": "f", "Worker": name})
                assert head.headers["checking"] == "1"
            for name in ("w1", "w2"):
                poll(lambda n=name: "re-hashed on the master's order: good" in c.tail(n, 500)
                     or None, f"{name}'s re-hash", timeout=PATIENCE)
            assert sorted(cc.locate("f").replicas) == holders and cc.get("v") == b"value"
            objects = [p for p in (c.root / "w1" / "store" / "objects").rglob("*")
                       if p.is_file() and p.read_bytes() == data]
            assert len(objects) == 1
            # ... and a flipped byte on w1's copy gets it re-hashed, dropped, replaced.
            raw = bytearray(data)
            raw[1234] ^= 0xFF
            objects[0].write_bytes(bytes(raw))
            cc.master.call("corrupt", {"Key": "f", "Worker": "w1"})

            def mended() -> bool | None:
                names = {n for n, _ in cc.locate("f").replicas}
                if names != {"w1", "w2"}:
                    return None
                fresh = [p for p in (c.root / "w1" / "store" / "objects").rglob("*")
                         if p.is_file() and p.read_bytes() == data]
                return True if fresh and not objects[0].exists() else None

            poll(mended, "w1's bad copy replaced", timeout=PATIENCE)
            with worker_client(c, "w1") as w1:
                out = io.BytesIO()
                w1.download_to("f", out)
                assert out.getvalue() == data
    finally:
        trap.close()
        c.stop()
        for proc in c.procs.values():
            assert proc.poll() is not None, "a process outlived its test"
