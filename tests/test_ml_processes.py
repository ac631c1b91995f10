"""The distributed linear regression through real processes (issue #15): a seeded CSV
chunk-uploaded to four workers (replication 2), fitted by one task per chunk, equals
numpy's ``lstsq`` on the whole file; the merge of chunk statistics is exact and stays
accurate where the raw normal equations would not; a map over the chunks runs where
they are stored."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import dsml
import dsml.ml
from dsml.client import ClusterClient
from dsml.datasets import chunk_locality, read_manifest
from dsml.localcluster import LocalCluster

np = pytest.importorskip("numpy")
pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def cluster(ml_cluster: LocalCluster) -> LocalCluster:
    """The session's ML cluster (conftest: four workers, replication 2)."""
    return ml_cluster


def _data(path: Path, n: int, seed: int) -> tuple[object, object]:
    """Seeded rows: features far from 0 (the raw normal equations lose digits there),
    written with every digit (repr), returned as numpy read them back."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) + np.array([1e4, -3e3, 0.5])
    y = x @ np.array([2.5, -1.25, 4.0]) + 7.0 + rng.normal(scale=0.1, size=n)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["a", "b", "c", "y"])
    w.writerows([*map(repr, map(float, r)), repr(float(t))] for r, t in zip(x, y, strict=True))
    path.write_text(out.getvalue())
    back = np.loadtxt(path, delimiter=",", skiprows=1)
    return back[:, :3], back[:, 3]


def test_the_distributed_fit_equals_numpy_lstsq(client: ClusterClient, tmp_path: Path) -> None:
    x, y = _data(tmp_path / "d.csv", 20000, seed=11)
    m = client.upload_dataset(tmp_path / "d.csv", "datasets/lin", chunk="96KiB")
    assert len(m["chunks"]) >= 8
    # Spread evenly: the master counts what it placed since each worker's last report.
    held = Counter(n for c in m["chunks"] for n, _ in client.locate(c["key"]).replicas)
    assert set(held) == {"w1", "w2", "w3", "w4"}, held
    assert max(held.values()) - min(held.values()) <= 3, held
    fit = dsml.ml.linear_regression("datasets/lin", "y", ["a", "b", "c"], client=client,
                                    timeout=300)
    ref = np.linalg.lstsq(np.column_stack([np.ones(len(y)), x]), y, rcond=None)[0]
    got = np.concatenate([[fit.intercept], fit.coef])
    assert fit.n == 20000 and fit.chunks == len(m["chunks"])
    assert np.max(np.abs(got - ref) / np.abs(ref)) < 1e-9, (got, ref)
    assert 0.0 <= fit.locality <= 1.0
    # Merged on the cluster as a tree of reduce jobs: the same fit (another grouping).
    tree = dsml.ml.linear_regression("datasets/lin", "y", ["a", "b", "c"], client=client,
                                     timeout=300, tree=True)
    assert np.allclose(tree.coef, fit.coef, rtol=1e-12, atol=0) and tree.n == 20000
    ridge = dsml.ml.linear_regression("datasets/lin", "y", client=client, ridge=10.0)
    xc = x - x.mean(axis=0)
    want = np.linalg.solve(xc.T @ xc + 10.0 * np.eye(3), xc.T @ (y - y.mean()))
    assert np.allclose(ridge.coef, want, rtol=1e-9, atol=0)


def test_merging_chunk_statistics_is_exact() -> None:
    """Merged pairwise in any grouping, the statistics are those of all the rows."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(1000, 3)) * 1e3 + 1e6
    parts = np.array_split(z, [10, 11, 400, 999])
    stats = [dsml.ml._block_stats(p.tolist()) for p in parts]  # noqa: SLF001
    left = stats[0]
    for s in stats[1:]:
        left = dsml.ml.merge(left, s)
    tree = dsml.ml.merge(dsml.ml.merge(stats[0], stats[1]),
                         dsml.ml.merge(stats[2], dsml.ml.merge(stats[3], stats[4])))
    whole = dsml.ml._block_stats(z.tolist())  # noqa: SLF001
    for got in (left, tree):
        assert got[0] == 1000
        assert np.allclose(got[1], whole[1], rtol=1e-14)
        assert np.allclose(got[2], whole[2], rtol=1e-9)


def test_a_rank_deficient_fit_falls_back_to_least_squares() -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(size=200)
    z = np.column_stack([a, 2 * a, 3 * a + 1])  # b = 2a: singular
    coef, intercept = dsml.ml.solve(dsml.ml._block_stats(z.tolist()))  # noqa: SLF001
    assert np.allclose(z[:, :2] @ coef + intercept, z[:, 2])


def test_a_map_over_chunks_runs_where_they_are(client: ClusterClient, tmp_path: Path) -> None:
    # Chunks well over the function's pickle (the other input of each map): the master
    # counts a map local where most of its input bytes are.
    (tmp_path / "lines.txt").write_bytes(b"".join(b"%d\n" % i for i in range(40000)))
    m = client.upload_dataset(tmp_path / "lines.txt", "datasets/lines", chunk="24KiB")

    def total(path: Path) -> int:
        return sum(int(line) for line in path.read_text().split())

    fs = client.map_chunks(total, "datasets/lines")
    assert len(fs) == len(m["chunks"]) > 4
    assert sum(f.result(300) for f in fs) == sum(range(40000))
    # One job, a task per chunk with the chunk as its input; the locality figure is the
    # share of tasks that ran on a holder of their chunk.
    (job,) = {f.job_id for f in fs}  # type: ignore[attr-defined]
    status = client.job_status(job)
    assert [t["index"] for t in status["tasks"]] == list(range(len(fs)))
    ran_local = 0
    for f, chunk in zip(fs, m["chunks"], strict=True):
        assert f.chunk_key == chunk["key"]  # type: ignore[attr-defined]
        (attempt,) = status["tasks"][f.task]["attempts"]  # type: ignore[attr-defined]
        holders = {name for name, _ in client.locate(chunk["key"]).replicas}
        ran_local += attempt["worker"] in holders
    assert chunk_locality(client, fs) == ran_local / len(fs)
    print(f"locality {ran_local / len(fs):.2f} over {len(fs)} chunks")


def test_bad_columns_are_named(client: ClusterClient, tmp_path: Path) -> None:
    _data(tmp_path / "d.csv", 10, seed=1)
    client.upload_dataset(tmp_path / "d.csv", "datasets/small")
    with pytest.raises(ValueError, match="no column 'nope'"):
        dsml.ml.linear_regression("datasets/small", "nope", client=client)


def _numbers(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def _concat(a: list[int], b: list[int]) -> list[int]:
    return a + b


@pytest.fixture(autouse=True)
def _by_value() -> Iterator[None]:
    """This module's functions are pickled by value (a worker cannot import it)."""
    import sys

    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_tree_reduce_is_jobs_on_the_cluster_in_the_chunks_order(
    client: ClusterClient, tmp_path: Path
) -> None:
    """``reduce`` folds the chunks' results as a tree of jobs: the map (a task per
    chunk, its chunk the input), then a job per level coming after the one below, a
    task per group of ``fan_in`` results staged as inputs.  Concatenation is
    associative but not commutative: the result is the chunks' order, exactly."""
    (tmp_path / "n.txt").write_bytes(b"".join(b"%d\n" % i for i in range(2500)))
    m = client.upload_dataset(tmp_path / "n.txt", "datasets/tree", chunk="1KiB")
    n = len(m["chunks"])
    assert n > 9
    root = client.map_chunks(_numbers, "datasets/tree", reduce=_concat, fan_in=3)
    assert root.result(300) == list(range(2500))
    jobs = [client.job_status(j) for j in root.jobs]
    widths, width = [], n
    while width > 1:
        width = -(-width // 3)
        widths.append(width)
    assert [len(j["tasks"]) for j in jobs] == [n, *widths]
    assert all(j["state"] == "succeeded" for j in jobs)
    assert [j["after"] for j in jobs] == [[], *([a] for a in root.jobs[:-1])]
    assert jobs[0]["name"].startswith("map:") and jobs[1]["name"].startswith("reduce:")
    assert 0.0 <= chunk_locality(client, root.map_futures) <= 1.0
    # The results below the last level were deleted before its future resolved.
    below = {f.result_key for f in root.map_futures}
    assert below and not below & {k.key for k in client.list("_dsml/result/")}
    # A sum, at the default fan-in (8).
    total = client.map_chunks(lambda p: sum(_numbers(p)), "datasets/tree",
                              reduce=lambda a, b: a + b)
    assert total.result(300) == sum(range(2500))
    assert len(total.jobs) == 1 + (2 if n > 8 else 1)


def test_a_map_that_raises_raises_through_the_tree(client: ClusterClient, tmp_path: Path) -> None:
    (tmp_path / "n.txt").write_bytes(b"".join(b"%d\n" % i for i in range(1600)))
    client.upload_dataset(tmp_path / "n.txt", "datasets/raises", chunk="1KiB")

    def picky(path: Path) -> int:
        if 1500 in _numbers(path):
            raise ValueError("no 1500 here")
        return 1

    root = client.map_chunks(picky, "datasets/raises", reduce=lambda a, b: a + b, fan_in=4)
    with pytest.raises(ValueError, match="no 1500 here"):
        root.result(300)


def test_cancelling_a_tree_reduce_cancels_its_jobs(client: ClusterClient, tmp_path: Path) -> None:
    (tmp_path / "n.txt").write_bytes(b"".join(b"%d\n" % i for i in range(2000)))
    client.upload_dataset(tmp_path / "n.txt", "datasets/stuck", chunk="1KiB")
    never = tmp_path / "never"

    def stuck(path: Path) -> int:
        import time

        while not never.exists():  # (runs until its job is cancelled)
            time.sleep(0.05)
        return 1

    root = client.map_chunks(stuck, "datasets/stuck", reduce=lambda a, b: a + b, fan_in=2)
    assert len(root.jobs) > 2
    assert root.cancel()
    ends = [client.wait(j, timeout=120) for j in root.jobs]
    assert ends[0]["state"] == "cancelled", ends[0]
    assert all(e["state"] in ("cancelled", "failed") for e in ends), [e["state"] for e in ends]


def test_ls_and_stat_show_a_dataset_as_one_entry(
    cluster: LocalCluster, client: ClusterClient, tmp_path: Path
) -> None:
    _data(tmp_path / "d.csv", 3000, seed=2)
    cluster.cli("upload", "--chunk", "16KiB", str(tmp_path / "d.csv"), "shown/ds")
    client.upload(b"beside it", "shown/ds/notes.txt")
    client.upload(b"another", "shown/plain")
    m = read_manifest(client, "shown/ds")
    n, size = len(m["chunks"]), sum(c["size"] for c in m["chunks"])
    assert n >= 8
    holders = {w for c in m["chunks"] for w, _ in client.locate(c["key"]).replicas}
    lines = cluster.cli("ls", "-l", "shown/").stdout.decode().splitlines()
    assert len(lines) == 3, lines  # the dataset, the key under it, the key beside it
    assert lines[0].split() == [str(size), "dataset", str(n), "chunks", "on",
                                str(len(holders)), "workers,", "3000", "rows", "(csv)",
                                "shown/ds/"], lines
    assert lines[1].endswith(" shown/ds/notes.txt") and lines[2].endswith(" shown/plain")
    # Plain ls lists the keys as they are.
    keys = cluster.cli("ls", "shown/").stdout.decode().split()
    assert len(keys) == n + 3 and "shown/ds/_manifest.json" in keys
    out = cluster.cli("stat", "shown/ds").stdout.decode()
    assert f"chunks:   {n} chunks on {len(holders)} workers\n" in out
    assert "rows:     3000\n" in out and f"size:     {size}\n" in out
    assert "header:   a,b,c,y" in out and "source:   d.csv" in out
    got = json.loads(cluster.cli("stat", "--json", "shown/ds/").stdout)
    assert got["chunks"] == n and got["rows"] == 3000 and got["missing"] == 0
    assert set(got["workers"]) == holders and sum(got["workers"].values()) == 2 * n
    # A chunk gone is said.
    client.delete(m["chunks"][3]["key"])
    assert ", 1 missing, 3000 rows" in cluster.cli("ls", "-l", "shown/").stdout.decode()
    r = cluster.cli("stat", "shown/nothing", check=False)
    assert r.returncode != 0 and b"not-found" in r.stderr, r.stderr
