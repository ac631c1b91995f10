"""Maps over a dataset's chunks through real processes (issue #15): the master reports
where each map ran (an idle cluster of four workers with replication 2 runs every one
data-local, and says so in ``dsml status`` and the job's status), and a worker killed
with SIGKILL in the middle of a map leaves the fit exact, each chunk counted once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_ml_processes import _data

import dsml
import dsml.ml
from dsml.client import ClusterClient
from dsml.client.jobhandle import Job
from dsml.localcluster import LocalCluster
from dsml.testing.poll import poll

np = pytest.importorskip("numpy")
pytestmark = pytest.mark.processes

WORKERS = ("w1", "w2", "w3", "w4")
#: Every bounded wait of this file gives up after this many seconds.
PATIENCE = 60.0


def _cluster(root: Path) -> LocalCluster:
    """Four workers of two slots, every key on two of them, short heartbeats (a killed
    worker is declared dead within 3 s)."""
    workers = {n: {"host": "127.0.0.1", "port": 0, "data_dir": n, "cpus": 2} for n in WORKERS}
    return LocalCluster(root, workers=WORKERS, extra={
        "workers": workers,
        "cluster": {"replication": 2, "heartbeat_interval": 0.5, "heartbeat_timeout": 3.0},
    })


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with _cluster(tmp_path / "cluster") as c:
        c.start_all()
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[ClusterClient]:
    with dsml.connect(cluster.config_path) as c:
        yield c


def _lstsq(x: Any, y: Any) -> Any:
    return np.linalg.lstsq(np.column_stack([np.ones(len(y)), x]), y, rcond=None)[0]


def test_an_idle_cluster_runs_every_map_data_local_and_the_master_says_so(
    cluster: LocalCluster, client: ClusterClient, tmp_path: Path
) -> None:
    x, y = _data(tmp_path / "d.csv", 6000, seed=21)
    m = client.upload_dataset(tmp_path / "d.csv", "datasets/local", chunk="40KiB")
    n = len(m["chunks"])
    assert n >= 10  # more maps than the cluster's 8 slots

    fs = client.map_chunks(dsml.ml.chunk_stats, "datasets/local", [0, 1, 2, 3])
    total = (0, np.zeros(4), np.zeros((4, 4)))
    for f in fs:
        total = dsml.ml.merge(total, f.result(PATIENCE))
    coef, intercept = dsml.ml.solve(total)
    got = np.concatenate([[intercept], coef])
    assert np.max(np.abs(got - _lstsq(x, y)) / np.abs(_lstsq(x, y))) < 1e-9

    (job_id,) = {f.job_id for f in fs}  # type: ignore[attr-defined]
    status = client.job_status(job_id)
    assert status["locality"] == {"local": n, "remote": 0}, status["locality"]
    assert Job(client, job_id).locality() == {"local": n, "remote": 0, "fraction": 1.0}
    # The master's flag agrees with where the chunks are.
    for t, chunk in zip(status["tasks"], m["chunks"], strict=True):
        (a,) = t["attempts"]
        assert a["local"] is True
        assert a["worker"] in {w for w, _ in client.locate(chunk["key"]).replicas}
    out = cluster.cli("status", job_id).stdout.decode()
    assert f"locality: {n}/{n} attempts started data-local (100%), 0 remote" in out
    as_json = json.loads(cluster.cli("status", "--json", job_id).stdout)
    assert as_json["locality"] == {"local": n, "remote": 0}

    fit = dsml.ml.linear_regression("datasets/local", "y", ["a", "b", "c"], client=client,
                                    timeout=PATIENCE)
    assert (fit.chunks, fit.locality) == (n, 1.0)
    assert np.allclose(np.concatenate([[fit.intercept], fit.coef]), got, rtol=1e-12, atol=0)


def test_a_worker_killed_mid_map_leaves_the_fit_exact_each_chunk_counted_once(
    cluster: LocalCluster, client: ClusterClient, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Every map waits for a flag once it has started; a worker running some of them
    is killed with SIGKILL (its own pid); then the flag is raised.  Its maps are lost
    and run again on the other holder of their chunk; the merged statistics are those
    of every row exactly once, and the fit equals numpy's."""
    x, y = _data(tmp_path / "d.csv", 6000, seed=22)
    m = client.upload_dataset(tmp_path / "d.csv", "datasets/killed", chunk="40KiB")
    n = len(m["chunks"])
    # The maps run as the task user: their flags are in a directory it may write.
    flags = Path(tempfile.mkdtemp(prefix="dsml-flags-"))
    flags.chmod(0o777)
    request.addfinalizer(lambda: shutil.rmtree(flags, ignore_errors=True))

    def held_stats(path: Path, columns: list[int], flags: str) -> Any:
        import os
        import time
        from pathlib import Path

        import dsml.ml

        here = Path(flags)
        # Written whole, then renamed: the test reads no half-written pid.
        mine = f"started-{os.environ['DSML_ATTEMPT_ID']}"
        (here / f".{mine}").write_text(str(os.getpid()))
        (here / f".{mine}").rename(here / mine)
        while not (here / "go").exists():
            time.sleep(0.01)
        return dsml.ml.chunk_stats(path, columns)

    fs = client.map_chunks(held_stats, "datasets/killed", [0, 1, 2, 3], str(flags))
    (job_id,) = {f.job_id for f in fs}  # type: ignore[attr-defined]

    def started() -> set[int]:
        return {int(p.name.split("-")[1]) for p in flags.glob("started-*")}

    def busy_worker() -> tuple[str, set[int]] | None:
        """A worker with two maps running inside the function, and their attempts."""
        running: dict[str, set[int]] = {}
        for t in client.job_status(job_id)["tasks"]:
            for a in t["attempts"]:
                if a["state"] == "running" and a["id"] in started():
                    running.setdefault(a["worker"], set()).add(a["id"])
        full = sorted((w, ids) for w, ids in running.items() if len(ids) == 2)
        return full[0] if full else None

    victim, doomed = poll(busy_worker, "a worker running two maps", PATIENCE)
    pids = {int(p.read_text()) for p in flags.glob("started-*")}
    cluster.kill(victim, signal.SIGKILL)
    try:
        (flags / "go").touch()
        total = (0, np.zeros(4), np.zeros((4, 4)))
        for f in fs:
            total = dsml.ml.merge(total, f.result(PATIENCE))
    finally:
        # The killed worker's maps were orphaned, not killed: they end once "go" is
        # there (nobody reads their results); any left is ended here.
        def orphans() -> set[int]:
            return {p for p in pids if Path(f"/proc/{p}").exists()
                    and b"fnrun" in Path(f"/proc/{p}/cmdline").read_bytes()}

        try:
            poll(lambda: True if not orphans() else None, "the orphaned maps to end", 15)
        finally:
            for p in orphans():
                os.kill(p, signal.SIGKILL)

    assert total[0] == 6000 == m["rows"]  # every row counted, and once
    coef, intercept = dsml.ml.solve(total)
    got, want = np.concatenate([[intercept], coef]), _lstsq(x, y)
    assert np.max(np.abs(got - want) / np.abs(want)) < 1e-9, (got, want)

    status = client.job_status(job_id)
    assert status["state"] == "succeeded" and len(status["tasks"]) == n
    lost = set()
    for t in status["tasks"]:
        states = [a["state"] for a in t["attempts"]]
        assert states.count("succeeded") == 1, t
        lost |= {a["id"] for a in t["attempts"] if a["state"] == "lost"}
        assert t["attempts"][-1]["worker"] != victim
    assert doomed <= lost, (doomed, lost)
    where = status["locality"]
    assert where["local"] + where["remote"] == sum(len(t["attempts"]) for t in status["tasks"])
    print(f"\n{victim} killed running {len(doomed)} maps; {len(lost)} lost, run again; "
          f"locality {where}")
