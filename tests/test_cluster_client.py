"""The async cluster client and the worker's task transfers, on the simulated cluster.

:class:`dsml.net.cluster_client.AsyncClusterClient` is the simulation's client and the
worker's; here its file paths (streamed uploads, downloads through a temporary file,
failover), and the worker's :class:`dsml.worker.transfers.TaskTransfers` over it: an
input the worker holds at the version the master named is staged with no request at all,
anything else (no version named, an older copy) comes over the network, and what a later
try can mend is retried on the clock.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsml import fsutil
from dsml.errors import ChecksumMismatch, DsmlError
from dsml.fsutil import copy_file
from dsml.net.calling import Calls
from dsml.testing.sim import SimCluster
from dsml.worker import transfers as transfers_module
from dsml.worker.tasks import InputVersion
from dsml.worker.transfers import TRANSFER_RETRY_FOR

MiB = 1024 * 1024


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimCluster]:
    """Three workers, replication 2; no bug logged, no callback raised."""
    cluster = SimCluster(tmp_path / "cluster", workers=("w1", "w2", "w3"), replication=2)
    yield cluster
    failures = cluster.failures.messages()
    cluster.close()
    assert failures == [], "bugs were logged during the run"
    assert cluster.net.errors == []


@pytest.fixture
def two(tmp_path: Path) -> Iterator[SimCluster]:
    """Two workers, replication 1: a key lives on one of them only."""
    cluster = SimCluster(tmp_path / "cluster", workers=("w1", "w2"), replication=1)
    yield cluster
    failures = cluster.failures.messages()
    cluster.close()
    assert failures == [], "bugs were logged during the run"


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every request any link sends from now on, as (node that sent it, method)."""
    sent: list[tuple[str, str]] = []
    request, request_file = Calls.request, Calls.request_file

    def node(calls: Calls) -> str:
        return str(getattr(calls.conn.transport, "node", "?"))

    def counted(self: Calls, method: str, *args: Any, **kw: Any) -> Any:
        sent.append((node(self), method))
        return request(self, method, *args, **kw)

    def counted_file(self: Calls, method: str, *args: Any, **kw: Any) -> Any:
        sent.append((node(self), method))
        return request_file(self, method, *args, **kw)

    monkeypatch.setattr(Calls, "request", counted)
    monkeypatch.setattr(Calls, "request_file", counted_file)
    return sent


def bytes_sent_by(sim: SimCluster, node: str) -> int:
    """Bytes written so far by ``node`` on its open connections."""
    return sum(
        t.sent for c in sim.net.connections for t in (c.client, c.server) if t.node == node
    )


def only_on(sim: SimCluster, key: str, data: bytes, holder: str, other: str) -> Any:
    """Upload ``key`` so that only ``holder`` stores it (replication 1, ``other`` down
    meanwhile); returns what was stored."""
    client = sim.client()
    sim.kill(other)
    stored = sim.wait(client.upload(key, data))
    sim.restart(other)
    sim.wait_registered()
    sim.advance(1.1)
    assert sim.replicas()[key] == {holder}
    return stored


# -- the client's files -------------------------------------------------------------------


def test_a_file_goes_up_streamed_and_comes_back_through_a_temporary_file(
    sim: SimCluster, tmp_path: Path
) -> None:
    """upload_file streams a file of several chunks down the pipeline (both replicas get
    it, checked); download_file writes it beside the target and renames it: only the
    target is left in the directory."""
    data = bytes(i % 249 for i in range(3 * MiB + 17))
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    client = sim.client()
    stored = sim.wait(client.upload_file("big", src))
    assert stored.replicas == 2 and stored.sha256 == hashlib.sha256(data).hexdigest()
    sim.advance(1.1)
    assert all(sim.read(w, "big") == data for w in sim.replicas()["big"])
    out = tmp_path / "out"
    out.mkdir()
    entry = sim.wait(client.download_file("big", out / "copy.bin"))
    assert entry.version == stored.version and entry.size == len(data)
    assert (out / "copy.bin").read_bytes() == data
    assert os.listdir(out) == ["copy.bin"]


def test_a_zero_byte_file_round_trips(sim: SimCluster, tmp_path: Path) -> None:
    """An empty file is uploaded (a head, no payload) and downloaded to an empty file."""
    src = tmp_path / "empty"
    src.write_bytes(b"")
    client = sim.client()
    assert sim.wait(client.upload_file("empty", src)).size == 0
    sim.wait(client.download_file("empty", tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == b""


def test_a_download_fails_over_a_corrupt_copy_and_reports_it(
    sim: SimCluster, tmp_path: Path
) -> None:
    """The first replica's bytes do not match their checksum: its temporary file is
    removed, the master is told, and the file comes whole from the next replica."""
    data = b"model weights " * 50_000
    client = sim.client()
    sim.wait(client.upload("model", data))
    sim.advance(1.1)
    bad = sim.wait(client.locate("model")).replicas[0][0]
    path = sim.object_path(bad, "model")
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    out = tmp_path / "out"
    out.mkdir()
    sim.wait(client.download_file("model", out / "model"))
    assert (out / "model").read_bytes() == data
    assert os.listdir(out) == ["model"]
    assert client.corrupt_found == [("model", bad)]


def test_a_download_fails_over_a_replica_that_vanished(sim: SimCluster, tmp_path: Path) -> None:
    """The first replica's machine is gone (the master does not know yet): the connect
    times out and the file comes from the next replica."""
    data = b"z" * 200_000
    client = sim.client()
    sim.wait(client.upload("k", data))
    sim.advance(1.1)
    first = sim.wait(client.locate("k")).replicas[0][0]
    sim.power_off(first)
    sim.wait(client.download_file("k", tmp_path / "k"), timeout=30)
    assert (tmp_path / "k").read_bytes() == data


def test_every_replica_corrupt_fails_and_leaves_nothing(sim: SimCluster, tmp_path: Path) -> None:
    """No copy matches its checksum: ChecksumMismatch, and no file is left behind."""
    client = sim.client()
    sim.wait(client.upload("k", b"abc" * 1000))
    sim.advance(1.1)
    for worker in sim.replicas()["k"]:
        sim.object_path(worker, "k").write_bytes(b"xyz" * 1000)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ChecksumMismatch):
        sim.wait(client.download_file("k", out / "k"))
    assert os.listdir(out) == []


def test_a_read_that_a_newer_write_overtook_asks_the_master_again(sim: SimCluster) -> None:
    """The master named copies that a newer write has since replaced (a replica answers
    ``not-found`` or other bytes): the read asks the master again and returns the new
    value; it never says the key is absent when the master says it exists."""
    import attrs

    client = sim.client()
    sim.wait(client.set("k", b"one"))
    sim.advance(1.1)
    holders = sim.replicas()["k"]
    (stranger,) = set(sim.workers) - holders
    old = sim.wait(client.locate("k"))
    sim.wait(client.set("k", b"two"))
    sim.advance(1.1)
    stale = [
        attrs.evolve(old, replicas=((stranger, sim.addr(stranger)),)),  # not-found there
        old,  # holders that now have "two": other bytes than "one"'s checksum
    ]
    for where in stale:
        real = client._located
        asked: list[str] = []

        async def once(key: str, where: Any = where, real: Any = real,
                       asked: list[str] = asked) -> Any:
            asked.append(key)
            return where if len(asked) == 1 else await real(key)

        client._located = once  # type: ignore[method-assign]
        assert sim.wait(client.get("k")) == b"two"
        assert asked == ["k", "k"]
        client._located = real  # type: ignore[method-assign]
    sim.advance(5)
    assert sim.replicas()["k"] == holders  # the mismatch reports dropped no good copy


def test_a_copy_the_master_still_names_but_nobody_has_is_unavailable_not_absent(
    sim: SimCluster,
) -> None:
    """Every replica answers ``not-found`` and the master names the same version again:
    the read fails ``unavailable``, since only the master may say a key is gone."""
    import attrs

    client = sim.client()
    sim.wait(client.set("k", b"one"))
    sim.advance(1.1)
    (stranger,) = set(sim.workers) - sim.replicas()["k"]
    where = sim.wait(client.locate("k"))
    nowhere = attrs.evolve(where, replicas=((stranger, sim.addr(stranger)),))

    async def always(key: str) -> Any:
        return nowhere

    client._located = always  # type: ignore[method-assign]
    with pytest.raises(DsmlError) as e:
        sim.wait(client.get("k"))
    assert e.value.code == "unavailable"


# -- the worker's inputs -------------------------------------------------------------------


def test_the_run_order_names_each_inputs_current_version(two: SimCluster) -> None:
    """The master puts each input's current version and checksum in the run order; an
    input it does not know is not named (a job that comes after another may name one:
    that job could have written it, so the submit does not refuse it)."""
    stored = only_on(two, "in", b"input bytes", "w2", "w1")
    client = two.client()
    first = two.wait(client.submit(["first"]))
    job = two.wait(client.submit(["use"], inputs=[("in", "in.bin"), ("nowhere", "x")],
                                 after=[first]))
    two.wait(client.wait(job))
    [start] = two.events("start", job)
    spec = two.runners[start.worker].specs[start.attempt_id]
    assert spec.versions == (("in", InputVersion(stored.version, stored.sha256)),)
    assert spec.version_of("nowhere") is None


def test_an_input_held_here_at_the_current_version_is_staged_without_a_request(
    two: SimCluster, tmp_path: Path, requests: list[tuple[str, str]]
) -> None:
    """w1 holds the key at the version the run order names: the worker stages it from
    its own store with no request on any of its links (none to the master, none to a
    worker) and no byte sent; the task's file has the right bytes, and is a copy (a task
    writing it does not change the store).  The same key staged on w2, which does not
    hold it, goes over the network (the count sees requests when there are some)."""
    data = bytes(range(256)) * 8192  # 2 MiB
    stored = only_on(two, "data/train.bin", data, "w1", "w2")
    client = two.client()
    job = two.wait(client.submit(["train"], inputs=[("data/train.bin", "train.bin")]))
    two.wait(client.wait(job))
    [start] = two.events("start", job)
    assert start.worker == "w1"  # locality: the worker holding the input
    current = two.runners["w1"].specs[start.attempt_id].version_of("data/train.bin")
    assert current == InputVersion(stored.version, stored.sha256)

    dest = tmp_path / "attempt" / "train.bin"
    dest.parent.mkdir()
    requests.clear()
    before = bytes_sent_by(two, "w1"), len(two.net.connections)
    transfers = two.workers["w1"].transfers
    assert transfers is not None
    two.wait(transfers.fetch("data/train.bin", dest, current))
    assert requests == []
    assert (bytes_sent_by(two, "w1"), len(two.net.connections)) == before
    assert dest.read_bytes() == data
    assert transfers.staged_locally == 1 and transfers.staged_remotely == 0
    # No byte copied: a read-only hard link to the store's object (or, on a filesystem
    # that can, a reflink).  A task that opens it for writing is refused.
    st = os.stat(dest)
    if st.st_nlink == 2:
        assert st.st_mode & 0o777 == 0o400
        if os.geteuid() != 0:  # root writes whatever the mode says
            with pytest.raises(PermissionError):
                open(dest, "r+b")
    assert two.read("w1", "data/train.bin") == data

    elsewhere = tmp_path / "elsewhere.bin"
    other = two.workers["w2"].transfers
    assert other is not None
    two.wait(other.fetch("data/train.bin", elsewhere, current))
    assert elsewhere.read_bytes() == data and other.staged_remotely == 1
    sent = {method for node, method in requests if node == "w2"}
    assert {"locate", "file_retrieve"} <= sent


@pytest.fixture
def linked(two: SimCluster, tmp_path: Path) -> tuple[SimCluster, Any, Path, list[str]]:
    """w1 alone holds "k" (1 MiB); it is staged on w1 as a read-only hard link; the
    worker's reports of corrupt copies are collected."""
    stored = only_on(two, "k", os.urandom(1 << 20), "w1", "w2")
    transfers = two.workers["w1"].transfers
    assert transfers is not None
    reported: list[str] = []
    transfers.report_corrupt = reported.append
    dest = tmp_path / "k"
    two.wait(transfers.fetch("k", dest, InputVersion(stored.version, stored.sha256)))
    if os.stat(dest).st_nlink != 2:
        pytest.skip("this filesystem made a reflink or a copy, not a hard link")
    return two, transfers, dest, reported


def test_an_unchanged_linked_input_is_released_without_a_rehash(
    linked: tuple[SimCluster, Any, Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt ends and the link's inode is as staged (another attempt linking and
    unlinking the same object meanwhile moves only its ctime): nothing is re-hashed."""
    two, transfers, dest, reported = linked
    other = dest.with_name("other-attempt")
    os.link(dest, other)
    other.unlink()

    def no_rehash(path: str) -> str:
        raise AssertionError("re-hashed an unchanged object")

    monkeypatch.setattr(transfers_module, "_sha256_of", no_rehash)
    assert two.wait(transfers.release(dest)) is True
    assert reported == []


def test_a_task_that_writes_through_its_link_gets_the_copy_reported(
    linked: tuple[SimCluster, Any, Path, list[str]],
) -> None:
    """A task (same user as the worker) makes its input writable and writes it: when the
    attempt ends the object is re-hashed, found changed, and reported corrupt."""
    two, transfers, dest, reported = linked
    os.chmod(dest, 0o600)
    with open(dest, "r+b") as f:
        f.write(b"the task wrote here")
    assert two.wait(transfers.release(dest)) is False
    assert reported == ["k"]
    assert two.wait(transfers.release(dest)) is True  # released once


def test_a_chmod_alone_is_rehashed_but_not_reported(
    linked: tuple[SimCluster, Any, Path, list[str]],
) -> None:
    """Only the mode changed: the re-hash finds the bytes intact, nothing is reported."""
    two, transfers, dest, reported = linked
    os.chmod(dest, 0o600)
    assert two.wait(transfers.release(dest)) is True
    assert reported == []


def test_a_link_to_an_object_the_store_replaced_is_not_checked(
    linked: tuple[SimCluster, Any, Path, list[str]],
) -> None:
    """The key was rewritten while the task ran (the store unlinked the old object): the
    old inode is the task's alone, whatever it did to it."""
    two, transfers, dest, reported = linked
    two.wait(two.client().upload("k", b"a new version"))
    two.advance(1.1)
    os.chmod(dest, 0o600)
    dest.write_bytes(b"scribbled")
    assert two.wait(transfers.release(dest)) is True
    assert reported == []


def test_an_older_local_copy_is_not_used(two: SimCluster, tmp_path: Path) -> None:
    """w2 holds the key at an older version (written before the current one): staging it
    on w2 with the current version fetches the current bytes from w1."""
    new = only_on(two, "k", b"the current bytes", "w1", "w2")
    old_version = new.version - 1
    writer = two.workers["w2"].store.begin_file("k", version=old_version)
    writer.write(b"an older version")
    writer.prepare()
    writer.commit()
    assert two.workers["w2"].store.stat("k").version == old_version
    transfers = two.workers["w2"].transfers
    assert transfers is not None
    dest = tmp_path / "k"
    two.wait(transfers.fetch("k", dest, InputVersion(new.version, new.sha256)))
    assert dest.read_bytes() == b"the current bytes"
    assert transfers.staged_locally == 0 and transfers.staged_remotely == 1


def test_a_copy_with_another_checksum_or_no_version_named_goes_to_the_network(
    two: SimCluster, tmp_path: Path
) -> None:
    """A local copy is used only for the exact version and checksum named; with no
    version named (an older master's order) the network is asked."""
    stored = only_on(two, "k", b"bytes", "w1", "w2")
    transfers = two.workers["w1"].transfers
    assert transfers is not None
    two.wait(transfers.fetch("k", tmp_path / "a", InputVersion(stored.version, "0" * 64)))
    two.wait(transfers.fetch("k", tmp_path / "b"))
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == b"bytes"
    assert transfers.staged_locally == 0 and transfers.staged_remotely == 2


def test_a_local_copy_that_fails_falls_back_to_the_network(
    two: SimCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy from the store fails (a full disk, say): its temporary file is removed
    and the input is fetched instead."""
    stored = only_on(two, "k", b"bytes" * 1000, "w1", "w2")

    def no_space(src: int, dest: int, size: int) -> str:
        os.write(dest, b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transfers_module, "copy_file", no_space)
    monkeypatch.setattr(transfers_module, "_link_readonly", lambda *a: None)  # e.g. EXDEV
    transfers = two.workers["w1"].transfers
    assert transfers is not None
    dest_dir = tmp_path / "attempt"
    dest_dir.mkdir()
    two.wait(transfers.fetch("k", dest_dir / "k", InputVersion(stored.version, stored.sha256)))
    assert (dest_dir / "k").read_bytes() == b"bytes" * 1000
    assert os.listdir(dest_dir) == ["k"]
    assert transfers.staged_locally == 0 and transfers.staged_remotely == 1


def test_a_transfer_waits_out_a_master_restart(two: SimCluster, tmp_path: Path) -> None:
    """The master is down when an input is fetched: the worker retries on its clock, with
    backoff, and the fetch completes once the master is back."""
    only_on(two, "k", b"still here", "w1", "w2")
    transfers = two.workers["w2"].transfers
    assert transfers is not None
    two.kill_master()
    d = transfers.fetch("k", tmp_path / "k")
    two.advance(5)
    assert not d.called
    two.start_master()
    two.wait(d, timeout=TRANSFER_RETRY_FOR)
    assert (tmp_path / "k").read_bytes() == b"still here"


def test_a_missing_input_fails_at_once_and_an_output_is_uploaded(
    two: SimCluster, tmp_path: Path
) -> None:
    """``not-found`` is not retried; an output goes to the cluster with its replication."""
    transfers = two.workers["w1"].transfers
    assert transfers is not None
    with pytest.raises(DsmlError) as e:
        two.wait(transfers.fetch("no/such/key", tmp_path / "x"), timeout=1)
    assert e.value.code == "not-found"
    out = tmp_path / "result.txt"
    out.write_bytes(b"42\n")
    two.wait(transfers.store(out, "results/0"))
    assert two.wait(two.client().download("results/0")) == b"42\n"


# -- the local copy ------------------------------------------------------------------------


def _copy(src: Path, dest: Path) -> str:
    fd_in = os.open(src, os.O_RDONLY)
    fd_out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        return copy_file(fd_in, fd_out, src.stat().st_size)
    finally:
        os.close(fd_in)
        os.close(fd_out)


def test_a_local_copy_is_a_copy_however_it_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """copy_file gives the same bytes in a file of its own (never a hard link), by a
    reflink where the filesystem clones, else copy_file_range, else read and write."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * MiB + 5))
    how = _copy(src, tmp_path / "a")
    assert how in ("clone", "copy_file_range")
    assert (tmp_path / "a").read_bytes() == src.read_bytes()
    assert src.stat().st_nlink == 1 and (tmp_path / "a").stat().st_ino != src.stat().st_ino
    (tmp_path / "a").write_bytes(b"changed")
    assert src.stat().st_size == 3 * MiB + 5

    def refused(*args: object) -> int:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(fsutil.fcntl, "ioctl", refused)
    monkeypatch.setattr(fsutil.os, "copy_file_range", refused)
    assert _copy(src, tmp_path / "b") == "copy"
    assert (tmp_path / "b").read_bytes() == src.read_bytes()
    (tmp_path / "empty").write_bytes(b"")
    assert _copy(tmp_path / "empty", tmp_path / "c") == "copy"
    assert (tmp_path / "c").read_bytes() == b""


@pytest.mark.skipif(
    not os.environ.get("DSML_REFLINK_DIR"),
    reason="set DSML_REFLINK_DIR to a directory on XFS (reflink=1) or btrfs",
)
def test_on_a_cloning_filesystem_the_copy_is_a_reflink() -> None:
    """Where the filesystem clones (XFS with reflink, btrfs) the copy is a FICLONE."""
    root = Path(os.environ["DSML_REFLINK_DIR"])
    src, dest = root / "dsml-reflink-src", root / "dsml-reflink-dest"
    try:
        src.write_bytes(os.urandom(MiB))
        assert _copy(src, dest) == "clone"
        assert dest.read_bytes() == src.read_bytes()
    finally:
        src.unlink(missing_ok=True)
        dest.unlink(missing_ok=True)


def test_status_and_wait_follow_the_masters_pages(sim: SimCluster) -> None:
    """The master answers a job's tasks a page at a time: the async client's status
    (and wait) asks for every page, each task once, in order."""
    from dsml.master.jobs import STATUS_PAGE

    client = sim.client()
    n = STATUS_PAGE * 2 + 5
    job = sim.wait(client.submit(["true"], array=n))
    status = sim.wait(client.status(job))
    assert [t["index"] for t in status["tasks"]] == list(range(n))
    ended = sim.wait(client.wait(job, timeout=600), timeout=600)
    assert [t["index"] for t in ended["tasks"]] == list(range(n))
    assert ended["state"] == "succeeded"


def test_an_array_goes_to_the_master_as_one_template(
    sim: SimCluster, requests: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``submit(command, array=N)`` from the async client (as from ClusterClient) sends
    ``"array": N`` and one task template, not N task objects for the master to parse at
    once on its reactor (11 MB and most of a second for 100,000); the master fills in
    ``{index}`` for each task."""
    import json

    from dsml.net.calling import Calls

    bodies: list[bytes] = []
    request = Calls.request

    def kept(self: Calls, method: str, headers: Any = None, payload: bytes = b"",
             *args: Any, **kw: Any) -> Any:
        if method == "submit":
            bodies.append(payload)
        return request(self, method, headers, payload, *args, **kw)

    monkeypatch.setattr(Calls, "request", kept)
    client = sim.client()
    job = sim.wait(client.submit(["work"], array=50_000, outputs=[("out", "o/{index}")],
                                 env={"SIM_DURATION": "1"}))
    (body,) = bodies
    assert len(body) < 1000
    sent = json.loads(body)
    assert sent["array"] == 50_000 and len(sent["tasks"]) == 1
    assert sent["tasks"][0]["outputs"] == [["out", "o/{index}"]]
    sim.advance(1.0)
    view = sim.job(job)
    assert view.total == 50_000 and sum(view.counts.values()) == 50_000


def test_a_replica_that_timed_out_is_tried_last_after_the_master_is_asked_again(
    tmp_path: Path,
) -> None:
    """Nemesis seed 2095: a read's first replica is cut off from the client, the second
    answers ``not-found`` (a newer write moved the key): the master is asked again and
    names the cut-off worker first again.  It is tried last this time, so the read costs
    one connect timeout, not one per round."""
    import attrs

    sim = SimCluster(tmp_path / "c4", workers=("w1", "w2", "w3", "w4"), replication=2)
    try:
        client = sim.client("reader")
        sim.wait(client.set("k", b"value"))
        sim.advance(1.1)
        cut, good = sorted(sim.replicas()["k"])
        stranger = min(set(sim.workers) - {cut, good})
        where = sim.wait(client.locate("k"))
        sim.net.partition("reader", cut)
        answers = [
            attrs.evolve(where, version=where.version - 1,
                         replicas=((cut, sim.addr(cut)), (stranger, sim.addr(stranger)))),
            attrs.evolve(where, replicas=((cut, sim.addr(cut)), (good, sim.addr(good)))),
        ]

        async def located(key: str) -> Any:
            return answers.pop(0)

        client._located = located  # type: ignore[method-assign]
        start = sim.clock.seconds()
        assert sim.wait(client.get("k")) == b"value"
        took = sim.clock.seconds() - start
        one_timeout = sim.net.connect_timeout
        assert one_timeout <= took < 2 * one_timeout, (took, one_timeout)
        assert answers == []
        sim.net.heal("reader", cut)
    finally:
        sim.close()


def test_the_blocking_client_also_tries_a_replica_whose_connection_failed_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same rule in :class:`dsml.client.ClusterClient` (no master or worker needed:
    its locate and its worker connections are stand-ins): after the re-locate, the
    replica whose connection was lost (the caller dropped it) comes after the other."""
    import hashlib as h

    from dsml.client import ClusterClient
    from dsml.errors import ConnectionLost
    from dsml.protocol.replies import Located

    value = b"value"
    digest = h.sha256(value).hexdigest()
    where = [Located("k", 5, digest, 6, (("cut", "10.0.0.1:1"), ("stranger", "10.0.0.3:1"))),
             Located("k", 5, digest, 7, (("cut", "10.0.0.1:1"), ("good", "10.0.0.2:1")))]
    tried: list[str] = []

    class Worker:
        def __init__(self, addr: str) -> None:
            self.host, _, port = addr.rpartition(":")
            self.port = int(port)
            self.addr = addr

        def get(self, key: str) -> bytes:
            tried.append(self.addr)
            if self.addr == "10.0.0.1:1":
                raise ConnectionLost("timed out", "connection")
            if self.addr == "10.0.0.3:1":
                raise DsmlError("no such key", "not-found")
            return value

        def close(self) -> None:
            pass

    c = ClusterClient.__new__(ClusterClient)  # no master to connect to
    c._workers = {}
    monkeypatch.setattr(c, "locate", lambda key: where.pop(0))
    monkeypatch.setattr(c, "_worker", lambda addr: c._workers.setdefault(addr, Worker(addr)))
    assert c.get("k") == value
    assert tried == ["10.0.0.1:1", "10.0.0.3:1", "10.0.0.2:1"]  # not the cut one again
