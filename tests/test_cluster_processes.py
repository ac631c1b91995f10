"""A whole cluster as real processes: a twistd master and three twistd workers on 127.0.0.1,
driven by the real ``dsml`` command through the master.

One scenario, end to end: uploads with two replicas, kill -9 of a worker (detected, reads
fail over, the lost copies are re-replicated), kill -9 of the master (restarted, it has lost
nothing acknowledged and the workers register again by themselves).
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from dsml.localcluster import LocalCluster
from dsml.testing.poll import poll

pytestmark = pytest.mark.processes

WORKERS = ("w1", "w2", "w3")
HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 3.0
REPLICATION = 2
#: Every bounded wait of this file gives up after this many seconds.
PATIENCE = 20.0

T = TypeVar("T")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A master and three workers with short heartbeats; always stopped, whatever the test does."""
    c = LocalCluster(
        tmp_path / "cluster",
        workers=WORKERS,
        extra={
            "cluster": {
                "heartbeat_interval": HEARTBEAT_INTERVAL,
                "heartbeat_timeout": HEARTBEAT_TIMEOUT,
                "replication": REPLICATION,
            }
        },
    )
    try:
        yield c
    finally:
        c.stop()
        for proc in c.procs.values():
            assert proc.poll() is not None, "a process outlived its test"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _poll(fn: Callable[[], T | None], what: str, timeout: float = PATIENCE) -> T:
    """:func:`dsml.testing.poll.poll`, with this file's patience."""
    return poll(fn, what, timeout)


def nodes(cluster: LocalCluster) -> dict[str, str]:
    """``dsml nodes --json``, read: worker name -> state."""
    doc = json.loads(cluster.cli("nodes", "--json").stdout)
    return {w["name"]: w["state"] for w in doc["workers"]}


def listing(cluster: LocalCluster) -> dict[str, tuple[int, int, str, frozenset[str]]]:
    """``dsml ls -l``, parsed: key -> (size, version, sha256 prefix, replicas)."""
    rows = {}
    for line in cluster.cli("ls", "-l").stdout.decode().splitlines():
        size, version, sha, replicas, key = line.split(maxsplit=4)
        assert version.startswith("v"), line
        holders = frozenset() if replicas == "-" else frozenset(replicas.split(","))
        rows[key] = (int(size), int(version[1:]), sha, holders)
    return rows


def _files(root: Path, rng: random.Random) -> dict[str, Path]:
    """20 files of random sizes: one empty, three of 1 to 4 MiB, the rest up to 300 KiB."""
    root.mkdir()
    sizes = [0] + [rng.randint(1 << 20, 4 << 20) for _ in range(3)]
    sizes += [rng.randint(1, 300 << 10) for _ in range(20 - len(sizes))]
    rng.shuffle(sizes)
    files = {}
    for i, size in enumerate(sizes):
        path = root / f"f{i:02}.bin"
        path.write_bytes(rng.randbytes(size))
        files[f"data/f{i:02}.bin"] = path
    return files


def test_cluster_survives_worker_and_master_kill_9(cluster: LocalCluster, tmp_path: Path) -> None:
    """Master + 3 workers (replication 2, heartbeat 0.5 s / timeout 3 s), all through the CLI:

    20 uploads each land on 2 workers; kill -9 of a worker is shown in ``dsml nodes``
    within the timeout; every file still downloads with its sha256; after the grace the
    lost copies are re-made so every key has 2 live replicas again; kill -9 of the master
    and a restart keep every key's size, version and sha256, the workers re-register on
    their own, and values set before the restart still read back; when the killed worker
    returns, the surplus copies are trimmed back to 2 per key.
    """
    t0 = time.monotonic()
    for name in ("master", *WORKERS):
        cluster.start(name)
    _poll(lambda: True if set(nodes(cluster).values()) == {"alive"} and
          len(nodes(cluster)) == 3 else None, "three workers to register")

    files = _files(tmp_path / "src", random.Random(1234))
    sha = {key: _sha256(path) for key, path in files.items()}
    # Four CLI processes at a time: the cluster serves clients concurrently.
    with ThreadPoolExecutor(4) as pool:
        uploads = list(pool.map(lambda kv: cluster.cli("upload", str(kv[1]), kv[0]),
                                files.items()))
    for (key, _), up in zip(files.items(), uploads, strict=True):
        assert key in up.stdout.decode() and "2 replicas" in up.stdout.decode(), up.stdout
    before_kill = listing(cluster)
    assert set(before_kill) == set(files)
    for key, (size, _, prefix, holders) in before_kill.items():
        assert size == files[key].stat().st_size, key
        assert sha[key].startswith(prefix), key
        assert len(holders) == REPLICATION and holders <= set(WORKERS), (key, holders)
    t_uploaded = time.monotonic()

    # kill -9 the worker holding the most keys.
    victim = max(WORKERS, key=lambda w: sum(w in row[3] for row in before_kill.values()))
    lost = sorted(k for k, row in before_kill.items() if victim in row[3])
    killed_at = time.monotonic()
    cluster.kill(victim, signal.SIGKILL)
    _poll(lambda: True if nodes(cluster).get(victim) == "dead" else None,
          f"{victim} to be shown dead", timeout=HEARTBEAT_TIMEOUT + 1)
    detected = time.monotonic() - killed_at
    assert detected < HEARTBEAT_TIMEOUT + 1
    survivors = {w for w in WORKERS if w != victim}
    assert {w: s for w, s in nodes(cluster).items() if w != victim} == dict.fromkeys(
        sorted(survivors), "alive"
    )

    # Every file downloads, with the right sha256 (the victim's copies fail over).
    out = tmp_path / "out"
    out.mkdir()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda key: cluster.cli("download", key, str(out / key.replace("/", "_"))),
                      files))
    for key in files:
        assert _sha256(out / key.replace("/", "_")) == sha[key], key
    t_downloaded = time.monotonic()

    # Replication is restored on the survivors (the grace is heartbeat_timeout).
    def restored() -> dict[str, tuple[int, int, str, frozenset[str]]] | None:
        rows = listing(cluster)
        ok = all(len(row[3] & survivors) == REPLICATION for row in rows.values())
        return rows if ok else None

    repaired = _poll(restored, f"every key to have {REPLICATION} live replicas again")
    t_repaired = time.monotonic()
    assert set(repaired) == set(files)
    for key, row in repaired.items():
        assert row[:3] == before_kill[key][:3], key  # size, version, sha256 unchanged

    # Values written now must survive the master's kill -9 too.
    values = {f"params/{i}": f"value {i}".encode() for i in range(5)}
    for key, value in values.items():
        cluster.cli("set", key, value.decode())
    snapshot = listing(cluster)

    master_killed = time.monotonic()
    cluster.kill("master", signal.SIGKILL)
    cluster.start("master")
    _poll(lambda: True if {w: s for w, s in nodes(cluster).items() if s == "alive"}.keys()
          == survivors else None, "the surviving workers to register with the new master")
    t_reregistered = time.monotonic()

    after = listing(cluster)
    assert set(after) == set(snapshot)
    for key, row in after.items():
        assert row[:3] == snapshot[key][:3], key  # size, version, sha256 prefix
        assert len(row[3] & survivors) == REPLICATION, (key, row[3])
    for key, value in values.items():
        assert cluster.cli("get", key).stdout == value
    # Files too: a few of those whose copy was remade, through the restarted master.
    for key in lost[:3]:
        target = out / ("again_" + key.replace("/", "_"))
        cluster.cli("download", key, str(target))
        assert _sha256(target) == sha[key], key
    stat = cluster.cli("stat", lost[0]).stdout.decode()
    assert f"sha256:   {sha[lost[0]]}" in stat

    # The victim comes back with its old copies: the surplus is trimmed to the factor.
    victim_started = time.monotonic()
    cluster.start(victim)

    def trimmed() -> dict[str, tuple[int, int, str, frozenset[str]]] | None:
        if set(nodes(cluster).values()) != {"alive"}:
            return None
        rows = listing(cluster)
        return rows if all(len(row[3]) == REPLICATION for row in rows.values()) else None

    final = _poll(trimmed, f"{victim} to return and every key to have {REPLICATION} replicas")
    t_trimmed = time.monotonic()
    assert {k: row[:3] for k, row in final.items()} == {k: row[:3] for k, row in after.items()}

    print(
        f"\nstart+20 uploads {t_uploaded - t0:.1f} s; {victim} dead after {detected:.2f} s; "
        f"20 downloads {t_downloaded - killed_at:.1f} s after the kill; "
        f"{len(lost)} keys re-replicated {t_repaired - killed_at:.1f} s after the kill; "
        f"workers back {t_reregistered - master_killed:.1f} s after the master's kill; "
        f"{victim} restarted and surplus trimmed in {t_trimmed - victim_started:.1f} s; "
        f"total {time.monotonic() - t0:.1f} s"
    )
