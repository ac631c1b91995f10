"""The worker's input cache: remote task inputs downloaded once per (key, version).

Unit tests drive :class:`dsml.worker.inputcache.InputCache` with hand-fired downloads;
the rest go through :class:`dsml.worker.transfers.TaskTransfers` in the whole-cluster
simulation, counting the ``file_retrieve`` requests a worker makes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, DeferredList

from dsml.errors import DsmlError
from dsml.net.calling import Calls
from dsml.testing.sim import SimCluster
from dsml.worker.inputcache import InputCache
from dsml.worker.tasks import InputVersion

SHA = "ab" * 32


class Downloads:
    """Downloads the test fires by hand: each writes ``size`` bytes when told to."""

    def __init__(self) -> None:
        self.started: list[tuple[Path, Deferred[tuple[int, str]]]] = []

    def __call__(self, path: Path) -> Deferred[tuple[int, str]]:
        d: Deferred[tuple[int, str]] = Deferred()
        self.started.append((path, d))
        return d

    def finish(self, i: int, data: bytes, got: tuple[int, str]) -> None:
        path, d = self.started[i]
        path.write_bytes(data)
        d.callback(got)


def results(ds: list[Deferred[Any]]) -> list[Any]:
    out: list[Any] = []
    for d in ds:
        d.addBoth(out.append)
    return out


def test_a_leftover_cache_is_emptied_and_made_private(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir(mode=0o755)
    (root / f"{SHA}-3").write_bytes(b"left by an earlier run: maybe changed since")
    InputCache(root, 1000)
    assert os.listdir(root) == [] and root.stat().st_mode & 0o777 == 0o700


def test_concurrent_requests_share_one_download(tmp_path: Path) -> None:
    """Three attempts want the same input at once: one download, three answers, the
    entry read-only; a fourth later is a hit with no download."""
    cache = InputCache(tmp_path / "c", 1000)
    dl = Downloads()
    got = results([cache.get(("k", 3, SHA), dl) for _ in range(3)])
    assert len(dl.started) == 1 and got == []
    dl.finish(0, b"x" * 10, (3, SHA))
    path = cache.path_of(("k", 3, SHA))
    assert got == [path] * 3
    assert path.stat().st_mode & 0o777 == 0o400
    assert results([cache.get(("k", 3, SHA), dl)]) == [path]
    assert (len(dl.started), cache.downloads, cache.hits, cache.bytes) == (1, 1, 1, 10)


def test_a_cancelled_waiter_leaves_the_download_to_the_others(tmp_path: Path) -> None:
    cache = InputCache(tmp_path / "c", 1000)
    dl = Downloads()
    first, second = cache.get(("k", 1, SHA), dl), cache.get(("k", 1, SHA), dl)
    first.addErrback(lambda f: f.trap("twisted.internet.defer.CancelledError"))
    first.cancel()
    got = results([second])
    dl.finish(0, b"abc", (1, SHA))
    assert got == [cache.path_of(("k", 1, SHA))]


def test_another_version_downloaded_is_not_kept(tmp_path: Path) -> None:
    """The key was rewritten between dispatch and download: None for every waiter, and
    nothing cached under the version that was named."""
    cache = InputCache(tmp_path / "c", 1000)
    dl = Downloads()
    got = results([cache.get(("k", 1, SHA), dl), cache.get(("k", 1, SHA), dl)])
    dl.finish(0, b"newer bytes", (2, "cd" * 32))
    assert got == [None, None]
    assert not cache.holds(("k", 1, SHA)) and os.listdir(cache.root) == []
    assert cache.bytes == 0


def test_a_failed_download_fails_every_waiter_and_the_next_try_downloads_again(
    tmp_path: Path,
) -> None:
    cache = InputCache(tmp_path / "c", 1000)
    dl = Downloads()
    got = results([cache.get(("k", 1, SHA), dl), cache.get(("k", 1, SHA), dl)])
    dl.started[0][1].errback(DsmlError("unavailable", "no replica answered"))
    assert [f.check(DsmlError) for f in got] == [DsmlError, DsmlError]
    cache.get(("k", 1, SHA), dl)
    assert len(dl.started) == 2


def test_the_least_recently_used_entries_go_past_the_budget(tmp_path: Path) -> None:
    """Budget 25 bytes, three 10-byte entries: the one used least recently is evicted
    (its name only); an entry bigger than the whole budget is lent, then not kept."""
    cache = InputCache(tmp_path / "c", 25)
    dl = Downloads()
    idents = [(f"k{i}", 1, SHA) for i in range(3)]
    for i, ident in enumerate(idents[:2]):
        cache.get(ident, dl)
        dl.finish(i, b"x" * 10, (1, SHA))
    assert results([cache.get(idents[0], dl)]) == [cache.path_of(idents[0])]  # k0 used again
    cache.get(idents[2], dl)
    dl.finish(2, b"y" * 10, (1, SHA))
    assert [cache.holds(i) for i in idents] == [True, False, True]
    assert cache.bytes == 20 and not cache.path_of(idents[1]).exists()

    big = ("big", 1, SHA)
    lent: list[Path] = []

    def link_it(path: Path | None) -> None:  # what an attempt does when its wait fires
        assert path is not None
        os.link(path, tmp_path / "attempt-link")
        lent.append(path)

    cache.get(big, dl).addCallback(link_it)
    dl.finish(3, b"z" * 30, (1, SHA))
    assert lent and not cache.holds(big) and cache.bytes <= 25
    assert (tmp_path / "attempt-link").read_bytes() == b"z" * 30


def test_an_entry_changed_behind_the_caches_back_is_downloaded_again(tmp_path: Path) -> None:
    """A task kept a link to its input past its attempt and wrote it later: the next hit
    sees the file differ from when it was cached and downloads it again."""
    cache = InputCache(tmp_path / "c", 100)
    dl = Downloads()
    cache.get(("k", 1, SHA), dl)
    dl.finish(0, b"abc", (1, SHA))
    path = cache.path_of(("k", 1, SHA))
    os.link(path, tmp_path / "kept-by-a-task")
    os.chmod(tmp_path / "kept-by-a-task", 0o600)
    (tmp_path / "kept-by-a-task").write_bytes(b"xyz")
    got = results([cache.get(("k", 1, SHA), dl)])
    assert len(dl.started) == 2 and got == []  # a new download, not the changed file
    dl.finish(1, b"abc", (1, SHA))
    assert got == [path] and path.read_bytes() == b"abc"


def test_a_removed_entry_is_downloaded_again(tmp_path: Path) -> None:
    cache = InputCache(tmp_path / "c", 100)
    dl = Downloads()
    cache.get(("k", 1, SHA), dl)
    dl.finish(0, b"abc", (1, SHA))
    cache.path_of(("k", 1, SHA)).unlink()
    cache.get(("k", 1, SHA), dl)
    assert len(dl.started) == 2 and cache.bytes == 0


# -- through the worker's transfers, in the simulation ------------------------------------


@pytest.fixture
def two(tmp_path: Path) -> Iterator[SimCluster]:
    """Two workers, replication 1: a key lives on one of them only."""
    cluster = SimCluster(tmp_path / "cluster", workers=("w1", "w2"), replication=1)
    yield cluster
    failures = cluster.failures.messages()
    cluster.close()
    assert failures == [], "bugs were logged during the run"


@pytest.fixture
def retrieves(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys of every ``file_retrieve`` request any node makes."""
    seen: list[str] = []
    real = Calls.request

    def counted(self: Calls, method: str, headers: Any = None, *args: Any, **kw: Any) -> Any:
        if method == "file_retrieve":
            seen.append(dict(headers or {}).get("Key", "?"))
        return real(self, method, headers, *args, **kw)

    monkeypatch.setattr(Calls, "request", counted)
    return seen


def stored_only_on_w1(sim: SimCluster, key: str, data: bytes) -> Any:
    client = sim.client()
    sim.kill("w2")
    stored = sim.wait(client.upload(key, data))
    sim.restart("w2")
    sim.wait_registered()
    sim.advance(1.1)
    assert sim.replicas()[key] == {"w1"}
    return stored


def test_a_remote_input_used_by_many_attempts_is_transferred_once(
    two: SimCluster, tmp_path: Path, retrieves: list[str]
) -> None:
    """w2 stages w1's input for 20 attempts, 10 at once and 10 one by one: one
    file_retrieve; every attempt gets a read-only link to the one cached file."""
    data = os.urandom(300_000)
    stored = stored_only_on_w1(two, "ds/train.bin", data)
    transfers = two.workers["w2"].transfers
    assert transfers is not None
    transfers.cache = InputCache(tmp_path / "w2-cache", 10 << 20)
    current = InputVersion(stored.version, stored.sha256)
    dests = [tmp_path / f"attempt-{i}" / "train.bin" for i in range(20)]
    for dest in dests:
        dest.parent.mkdir()
    batch = [transfers.fetch("ds/train.bin", d, current) for d in dests[:10]]
    two.wait(DeferredList(batch, fireOnOneErrback=True))
    for dest in dests[10:]:
        two.wait(transfers.fetch("ds/train.bin", dest, current))
    assert retrieves == ["ds/train.bin"]
    assert (transfers.staged_remotely, transfers.staged_cached) == (1, 20)
    inodes = {os.stat(d).st_ino for d in dests}
    assert len(inodes) == 1 and all(d.read_bytes() == data for d in dests[:2])
    assert os.stat(dests[0]).st_mode & 0o777 == 0o400
    assert transfers.cache.bytes == len(data)


def test_a_task_that_writes_its_cached_input_gets_the_entry_dropped(
    two: SimCluster, tmp_path: Path, retrieves: list[str]
) -> None:
    """An attempt makes its lent input writable and writes it: when it ends the cache
    forgets the entry, and the next attempt downloads clean bytes."""
    data = b"clean " * 50_000
    stored = stored_only_on_w1(two, "k", data)
    transfers = two.workers["w2"].transfers
    assert transfers is not None
    transfers.cache = InputCache(tmp_path / "cache", 10 << 20)
    current = InputVersion(stored.version, stored.sha256)
    first = tmp_path / "a1"
    two.wait(transfers.fetch("k", first, current))
    os.chmod(first, 0o600)
    with open(first, "r+b") as f:
        f.write(b"dirty")
    assert two.wait(transfers.release(first)) is True  # not the store's: nothing reported
    assert not transfers.cache.holds(("k", stored.version, stored.sha256))
    second = tmp_path / "a2"
    two.wait(transfers.fetch("k", second, current))
    assert second.read_bytes() == data and retrieves == ["k", "k"]


# -- through real processes -----------------------------------------------------------------


def _disk_use(root: Path) -> int:
    """Bytes ``root`` takes on disk: allocated blocks, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


class _TwoWorkers:
    """A twistd master, w1 and w2 (one slot each), replication 1; ``input`` stored on
    w1 only.  :meth:`ran_on` runs an array job on one chosen worker."""

    def __init__(self, root: Path, data: bytes, workers_extra: dict[str, Any]) -> None:
        import yaml

        from dsml.client import ClusterClient
        from dsml.localcluster import LocalCluster
        from dsml.testing.poll import poll

        self.poll = poll
        self.c = LocalCluster(root, workers=("w1", "w2"),
                              extra={"cluster": {"replication": 1}})
        config = yaml.safe_load(self.c.config_path.read_text())
        for name in ("w1", "w2"):
            config["workers"][name]["cpus"] = 1
            config["workers"][name].update(workers_extra.get(name, {}))
        config.update(workers_extra.get("top", {}))
        self.c.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.c.start("master")
        self.c.start("w1")
        host, port = self.c.address("master")
        self.client = ClusterClient(host, port, self.c.token, timeout=120.0,
                                    tls=self.c.user_tls())
        poll(lambda: self.alive() == {"w1"} or None, "w1 to register", 30)
        (root / "in.bin").write_bytes(data)
        self.client.upload(root / "in.bin", "ds/in.bin")
        self.c.start("w2")
        poll(lambda: self.alive() == {"w1", "w2"} or None, "w2 to register", 30)

    def alive(self) -> set[str]:
        return {n.name for n in self.client.nodes() if n.state == "alive"}

    def ran_on(self, worker: str, command: list[str], n: int) -> list[int]:
        """Run ``command`` ``n`` times (an array, the input as ``in.bin``) on
        ``worker`` only; the attempt ids."""
        client = self.client
        other = "w2" if worker == "w1" else "w1"
        # One slot per worker: a sleep on each, then ``worker``'s cancelled, so that the
        # job can only run there.
        pins = [client.submit(["sleep", "600"], max_attempts=1) for _ in range(2)]
        self.poll(lambda: all(
            (a := j.status()["tasks"][0]["attempts"]) and a[-1]["state"] == "running"
            for j in pins) or None, "the sleeps to start", 30)
        on = {j.status()["tasks"][0]["attempts"][-1]["worker"]: j for j in pins}
        client.cancel(on[worker].id)
        job = client.submit(command, inputs=[("ds/in.bin", "in.bin")], array=n,
                            max_attempts=1)
        status = job.wait(timeout=600)
        client.cancel(on[other].id)
        assert status["state"] == "succeeded", status
        workers = {t["attempts"][-1]["worker"] for t in status["tasks"]}
        assert workers == {worker}, workers
        return [int(t["attempts"][-1]["id"]) for t in status["tasks"]]

    def close(self) -> None:
        self.client.close()
        self.c.stop()


@pytest.mark.processes
def test_real_workers_lend_local_inputs_and_fetch_remote_ones_once(tmp_path: Path) -> None:
    """The input (2 MiB) on w1 only.  A job of 4 tasks runs on w1, then one of 6 on w2:
    every w1 attempt's input is a link to w1's stored object, every w2 attempt's a link
    to the one file w2 downloaded into its cache; each reads the right bytes and cannot
    write them."""
    data = os.urandom(2 << 20)
    sha = hashlib.sha256(data).hexdigest()
    # The right bytes, and read-only (root may write anything: not checked then).
    check = ["sh", "-c", f'test "$(sha256sum < in.bin)" = "{sha}  -" && '
                         '{ test ! -w in.bin || test "$(id -u)" = 0; }']
    two = _TwoWorkers(tmp_path / "c", data, {})
    try:
        w1_attempts = two.ran_on("w1", check, 4)
        w2_attempts = two.ran_on("w2", check, 6)
    finally:
        two.close()
    data_dir = {w: tmp_path / "c" / w for w in ("w1", "w2")}
    w1_inputs = [data_dir["w1"] / "tasks" / str(a) / "in.bin" for a in w1_attempts]
    w2_inputs = [data_dir["w2"] / "tasks" / str(a) / "in.bin" for a in w2_attempts]
    [cached] = list((data_dir["w2"] / "cache").iterdir())
    objects = [p for p in (data_dir["w1"] / "store" / "objects").rglob("*") if p.is_file()
               and p.stat().st_size == len(data)]
    assert len(objects) == 1
    assert {p.stat().st_ino for p in w1_inputs} == {objects[0].stat().st_ino}
    assert {p.stat().st_ino for p in w2_inputs} == {cached.stat().st_ino}
    assert cached.read_bytes() == data


#: Attempts per worker of the disk-budget test: the issue's figure (about 10 s for the
#: 1,000 attempts on a quiet 2-core machine); ``DSML_STAGING_ATTEMPTS`` changes it.
STAGING_ATTEMPTS = int(os.environ.get("DSML_STAGING_ATTEMPTS", "500"))


@pytest.mark.processes
def test_many_attempts_of_a_big_input_stay_within_the_disk_budget(tmp_path: Path) -> None:
    """A 50 MiB input on w1 only; STAGING_ATTEMPTS attempts on each worker, each also
    writing 1 MiB of scratch.  Attempt directories are bounded to 8 MiB, w2's input cache
    to 64 MiB: w1's data directory stays within its store (the input, lent by links,
    never copied) + 8 MiB + slack, w2's within 64 MiB + 8 MiB + slack, and w2 fetched
    the input once (its kept attempts' inputs are all the cache's one inode)."""
    size = 50 << 20
    data = os.urandom(size)
    budget = 8 << 20
    two = _TwoWorkers(tmp_path / "c", data, {
        "w2": {"input_cache": "64MiB"},
        "top": {"retention": {"attempt_dirs_max_bytes": budget}},
    })
    scratch = ["sh", "-c", "head -c 1048576 in.bin > scratch.bin"]
    try:
        two.ran_on("w1", scratch, STAGING_ATTEMPTS)
        w2_attempts = two.ran_on("w2", scratch, STAGING_ATTEMPTS)
    finally:
        two.close()
    slack = 4 << 20  # indexes, logs, directories
    w1, w2 = tmp_path / "c" / "w1", tmp_path / "c" / "w2"
    assert _disk_use(w1) <= size + budget + slack, _disk_use(w1)
    assert _disk_use(w2) <= (64 << 20) + budget + slack, _disk_use(w2)
    [cached] = list((w2 / "cache").iterdir())
    kept = [w2 / "tasks" / str(a) / "in.bin" for a in w2_attempts]
    kept = [p for p in kept if p.exists()]
    assert kept and {p.stat().st_ino for p in kept} == {cached.stat().st_ino}
