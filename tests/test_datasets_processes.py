"""Datasets through real processes (issue #15, its first part): ``dsml upload --chunk``
and ``ClusterClient.upload_dataset`` store a file as chunks split on record boundaries
and a manifest written last; the chunks give back the file's bytes; an upload over a
dataset replaces it whole; a file that cannot be split is refused with nothing stored; a
Parquet file is stored as chunks of whole row groups and a linear model fits it."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsml.client import ClusterClient
from dsml.datasets import read_manifest
from dsml.localcluster import LocalCluster

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # Connections idle 3 s are closed (a client reopens them: the last test).
    workers = {n: {"host": "127.0.0.1", "port": 0, "data_dir": n, "task_env": ["PYTHONPATH"]}
               for n in ("w1", "w2")}
    with LocalCluster(tmp_path_factory.mktemp("ds"), workers=("w1", "w2"),
                      extra={"limits": {"idle_timeout": 3}, "workers": workers}) as c:
        c.start_all()
        yield c


def _a_csv(path: Path, rows: int) -> bytes:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["id", "text", "y"])
    for i in range(rows):
        w.writerow([i, f'line {i}\nwith "quotes", commas' if i % 7 == 0 else f"t{i}", i * 0.5])
    data = out.getvalue().encode()
    path.write_bytes(data)
    return data


def _joined(client: ClusterClient, manifest: dict[str, object], header: bytes) -> bytes:
    parts = [client.read(c["key"]) for c in manifest["chunks"]]  # type: ignore[attr-defined]
    assert all(p.startswith(header) for p in parts)
    return header + b"".join(p[len(header):] for p in parts)


def test_the_cli_stores_a_csv_as_chunks_and_a_manifest(
    cluster: LocalCluster, client: ClusterClient, tmp_path: Path
) -> None:
    data = _a_csv(tmp_path / "games.csv", 3000)
    out = cluster.cli("upload", "--chunk", "16KiB", str(tmp_path / "games.csv"),
                      "datasets/games").stdout.decode()
    m = read_manifest(client, "datasets/games")
    assert f"{len(m['chunks'])} chunks, 3000 rows (csv)" in out
    assert len(m["chunks"]) > 3 and m["rows"] == 3000 and m["header"] == "id,text,y"
    assert _joined(client, m, b"id,text,y\n") == data
    for c in m["chunks"]:
        got = client.read(c["key"])
        assert len(got) == c["size"]
        assert len(list(csv.reader(io.StringIO(got.decode(), newline="")))) - 1 == c["rows"]
    keys = {k.key for k in client.list("datasets/games/")}
    assert keys == {c["key"] for c in m["chunks"]} | {"datasets/games/_manifest.json"}


def test_the_cli_runs_a_command_on_each_chunk_where_it_is_stored(
    cluster: LocalCluster, client: ClusterClient, tmp_path: Path
) -> None:
    """``dsml submit --chunks DATASET -- CMD {chunk}``: one task per chunk, the chunk
    staged as ``{chunk}``, ``{index}`` in the outputs; each ran where its chunk is (the
    master's record), and the chunks' line counts add up to the file's."""
    data = _a_csv(tmp_path / "count.csv", 2000)
    cluster.cli("upload", "--chunk", "8KiB", str(tmp_path / "count.csv"), "datasets/count")
    m = read_manifest(client, "datasets/count")
    job = cluster.cli("submit", "--chunks", "datasets/count", "--output",
                      "n.txt:counts/{index}", "--", "sh", "-c",
                      "wc -c < {chunk} > n.txt").stdout.decode().strip()
    status = client.wait(job, timeout=120)
    assert status["state"] == "succeeded", status
    assert len(status["tasks"]) == len(m["chunks"]) > 3
    sizes = [int(client.read(f"counts/{i}")) for i in range(len(m["chunks"]))]
    assert sizes == [c["size"] for c in m["chunks"]]
    header = len(b"id,text,y\n")
    assert sum(sizes) - header * (len(sizes) - 1) == len(data)
    assert status["locality"] == {"local": len(sizes), "remote": 0}
    r = cluster.cli("submit", "--chunks", "datasets/nope", "--", "true", check=False)
    assert r.returncode == 1 and b"not-found" in r.stderr


def test_an_upload_over_a_dataset_replaces_it_whole(
    client: ClusterClient, tmp_path: Path
) -> None:
    data = _a_csv(tmp_path / "a.csv", 2000)
    small = client.upload_dataset(tmp_path / "a.csv", "datasets/again", chunk="8KiB")
    big = client.upload_dataset(tmp_path / "a.csv", "datasets/again", chunk="1MiB")
    assert len(small["chunks"]) > 1 and len(big["chunks"]) == 1
    assert {k.key for k in client.list("datasets/again/")} == {
        big["chunks"][0]["key"], "datasets/again/_manifest.json"}
    assert json.loads(client.read("datasets/again/_manifest.json")) == big
    assert client.read(big["chunks"][0]["key"]) == data


def test_npy_and_text_datasets(client: ClusterClient, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    a = np.random.default_rng(7).normal(size=(1000, 4))
    np.save(tmp_path / "x.npy", a)
    m = client.upload_dataset(tmp_path / "x.npy", "datasets/x", chunk="8KiB")
    parts = [np.load(io.BytesIO(client.read(c["key"]))) for c in m["chunks"]]
    assert m["kind"] == "npy" and len(parts) > 1 and m["rows"] == 1000
    assert np.array_equal(np.concatenate(parts), a)
    (tmp_path / "log.txt").write_bytes(b"".join(b"event %d\n" % i for i in range(500)))
    m = client.upload_dataset(tmp_path / "log.txt", "datasets/log", chunk="1KiB")
    assert b"".join(client.read(c["key"]) for c in m["chunks"]) == (
        tmp_path / "log.txt").read_bytes()


def test_a_file_that_cannot_be_split_is_refused_and_nothing_stored(
    cluster: LocalCluster, client: ClusterClient, tmp_path: Path
) -> None:
    (tmp_path / "blob.bin").write_bytes(b"\x00" * 100)
    r = cluster.cli("upload", "--chunk", "1KiB", str(tmp_path / "blob.bin"), "datasets/blob",
                    check=False)
    assert r.returncode == 2 and b"name a format" in r.stderr
    r = cluster.cli("upload", "--chunk", "1KiB", "--format", "npy", str(tmp_path / "blob.bin"),
                    "datasets/blob", check=False)
    assert r.returncode == 2 and b"not a .npy" in r.stderr
    assert list(client.list("datasets/blob")) == []


def test_a_dataset_uploads_from_a_url_fsspec_opens(client: ClusterClient, tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    data = _a_csv(tmp_path / "local.csv", 1500)
    with fsspec.open("memory://bucket/remote.csv", "wb") as f:
        f.write(data)
    m = client.upload_dataset("memory://bucket/remote.csv", "datasets/remote", chunk="8KiB")
    assert m["source"] == "remote.csv" and m["source_size"] == len(data)
    assert len(m["chunks"]) > 1 and m["rows"] == 1500
    assert _joined(client, m, b"id,text,y\n") == data


def test_a_parquet_dataset_is_chunked_by_row_group_and_fitted(
    cluster: LocalCluster, client: ClusterClient, tmp_path: Path
) -> None:
    import dsml.ml

    np = pytest.importorskip("numpy")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6000, 2)) + np.array([300.0, -2.0])
    y = x @ np.array([1.5, -4.0]) + 2.0 + rng.normal(scale=0.01, size=6000)
    table = pa.table({"a": x[:, 0], "label": pa.array(["r"] * 6000), "b": x[:, 1], "y": y})
    pq.write_table(table, tmp_path / "games.parquet", row_group_size=500)
    out = cluster.cli("upload", "--chunk", "20KiB", str(tmp_path / "games.parquet"),
                      "datasets/pq").stdout.decode()
    m = read_manifest(client, "datasets/pq")
    assert f"{len(m['chunks'])} chunks, 6000 rows (parquet)" in out
    assert m["columns"] == ["a", "label", "b", "y"] and len(m["chunks"]) > 2
    parts = [pq.read_table(io.BytesIO(client.read(c["key"]))) for c in m["chunks"]]
    assert all(p.num_rows % 500 == 0 for p in parts)  # whole row groups only
    assert pa.concat_tables(parts).equals(table)
    listed = cluster.cli("ls", "-l", "datasets/").stdout.decode()
    assert f"{len(m['chunks'])} chunks" in listed and "6000 rows" in listed
    fit = dsml.ml.linear_regression("datasets/pq", "y", ["a", "b"], client=client,
                                    timeout=300)
    ref = np.linalg.lstsq(np.column_stack([np.ones(6000), x]), y, rcond=None)[0]
    got = np.concatenate([[fit.intercept], fit.coef])
    assert fit.n == 6000 and np.max(np.abs(got - ref) / np.abs(ref)) < 1e-9, (got, ref)
    with pytest.raises(ValueError, match="no column 'c'"):
        dsml.ml.linear_regression("datasets/pq", "y", ["a", "c"], client=client)


def test_fsspec_put_with_a_chunk_size_stores_a_dataset(client: ClusterClient,
                                                       tmp_path: Path) -> None:
    from fsspec.callbacks import Callback

    from dsml.fs import DsmlFileSystem

    data = _a_csv(tmp_path / "put.csv", 2000)
    fs = DsmlFileSystem(client=client, skip_instance_cache=True)
    seen: list[int] = []

    class Seen(Callback):
        def call(self, *args: object, **kwargs: object) -> None:
            seen.append(self.value)

    fs.put(str(tmp_path / "put.csv"), "dsml://datasets/put", chunk="8KiB")
    m = read_manifest(client, "datasets/put")
    assert m["rows"] == 2000 and len(m["chunks"]) > 2
    assert _joined(client, m, b"id,text,y\n") == data
    fs.put_file(str(tmp_path / "put.csv"), "datasets/put2", chunk=8192, callback=Seen())
    m2 = read_manifest(client, "datasets/put2")
    assert [c["sha256"] for c in m2["chunks"]] == [c["sha256"] for c in m["chunks"]]
    assert seen == sorted(seen) and seen[-1] == sum(c["size"] for c in m["chunks"])
    assert fs.info("dsml://datasets/put/_manifest.json")["type"] == "file"
