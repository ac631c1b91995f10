"""Issue #14's storage side through real twistd processes: ``dsml.connect``, uploads of
bytes and file objects, downloads into file objects, ``Job.outputs`` and
``download_prefix``, and the ``dsml://`` filesystem run through fsspec's own abstract
test suite, pandas and the example.

The venv's installed metadata may predate the ``fsspec.specs`` entry point (an
editable install of another checkout): the protocol is registered here from the value
pyproject.toml declares, and the example's process finds it as an installed entry point.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from fsspec.tests.abstract import (
    AbstractCopyTests,
    AbstractFixtures,
    AbstractGetTests,
    AbstractOpenTests,
    AbstractPipeTests,
    AbstractPutTests,
)

import dsml
from dsml.client import ClusterClient
from dsml.fs import DsmlFileSystem
from dsml.localcluster import LocalCluster

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent
#: What pyproject.toml declares (read as text: tomllib is Python 3.11's).
ENTRY_POINT = re.search(  # type: ignore[union-attr]
    r'\[project\.entry-points\."fsspec\.specs"\]\s*\ndsml = "([^"]+)"',
    (ROOT / "pyproject.toml").read_text(),
).group(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("fs"), workers=("w1", "w2")) as c:
        c.start_all()
        fsspec.register_implementation("dsml", ENTRY_POINT.replace(":", "."), clobber=True)
        yield c


@pytest.fixture(scope="module")
def dfs(client: ClusterClient) -> DsmlFileSystem:
    return DsmlFileSystem(client=client, skip_instance_cache=True)


# -- fsspec's abstract suite ---------------------------------------------------------


class DsmlFixtures(AbstractFixtures):
    @pytest.fixture
    def fs(self, dfs: DsmlFileSystem) -> DsmlFileSystem:
        return dfs

    @pytest.fixture
    def fs_join(self):  # type: ignore[no-untyped-def]
        return lambda *parts: "/".join(parts)  # as fsspec's memory filesystem tests

    @pytest.fixture
    def fs_path(self) -> str:
        return f"fsspec/{uuid.uuid4().hex[:8]}"  # each test its own prefix

    @pytest.fixture
    def supports_empty_directories(self) -> bool:
        return False  # a directory is a prefix of keys: there is no empty one



class TestDsmlCopy(DsmlFixtures, AbstractCopyTests):
    pass


class TestDsmlGet(DsmlFixtures, AbstractGetTests):
    pass


class TestDsmlPut(DsmlFixtures, AbstractPutTests):
    pass


class TestDsmlOpen(DsmlFixtures, AbstractOpenTests):
    pass


class TestDsmlPipe(DsmlFixtures, AbstractPipeTests):
    pass


# -- the filesystem's own behaviour --------------------------------------------------


def test_keys_with_slashes_list_as_directories(dfs: DsmlFileSystem) -> None:
    dfs.pipe({"dsml://tree/a.csv": b"a\n1\n", "tree/sub/b.csv": b"b\n", "tree/sub/c/d": b"d"})
    assert dfs.ls("dsml://tree", detail=False) == ["tree/a.csv", "tree/sub"]
    listing = {d["name"]: d for d in dfs.ls("tree")}
    assert listing["tree/a.csv"]["type"] == "file" and listing["tree/a.csv"]["size"] == 4
    assert sorted(listing["tree/a.csv"]["replicas"]) == ["w1", "w2"]
    assert listing["tree/sub"]["type"] == "directory"
    assert dfs.info("tree/sub")["type"] == "directory"
    assert dfs.isdir("tree/sub") and not dfs.isfile("tree/sub")
    assert dfs.isfile("tree/sub/b.csv") and not dfs.isdir("tree/sub/b.csv")
    assert dfs.exists("tree") and not dfs.exists("tree/nope") and not dfs.exists("tre")
    assert dfs.find("tree") == ["tree/a.csv", "tree/sub/b.csv", "tree/sub/c/d"]
    with pytest.raises(FileNotFoundError):
        dfs.info("tree/nope")
    with pytest.raises(FileNotFoundError):
        dfs.cat("tree/nope")
    dfs.rm("tree/sub", recursive=True)
    assert dfs.ls("tree", detail=False) == ["tree/a.csv"]
    dfs.mv("tree/a.csv", "tree/moved.csv")
    assert dfs.ls("tree", detail=False) == ["tree/moved.csv"]
    assert dfs.cat("tree/moved.csv") == b"a\n1\n"


def test_open_for_writing_is_visible_only_when_closed(dfs: DsmlFileSystem) -> None:
    with dfs.open("atomic/x.bin", "wb", block_size=1024) as f:
        f.write(os.urandom(5000))  # more than a block: flushed to the temp file
        assert not dfs.exists("atomic/x.bin")
    assert dfs.info("atomic/x.bin")["size"] == 5000
    with pytest.raises(RuntimeError), dfs.open("atomic/y.bin", "wb") as f:
        f.write(b"half of it")
        raise RuntimeError("the writer fails")
    assert not dfs.exists("atomic/y.bin")  # nothing uploaded
    with dfs.open("atomic/x.bin", "wb") as f:  # an overwrite that fails keeps the old
        f.write(b"new")
    with pytest.raises(ZeroDivisionError), dfs.open("atomic/x.bin", "wb") as f:
        f.write(b"never")
        1 / 0  # noqa: B018
    assert dfs.cat("atomic/x.bin") == b"new"


def test_reads_seek_and_ranges(dfs: DsmlFileSystem) -> None:
    data = os.urandom(200_000)
    dfs.pipe_file("ranged/blob", data)
    with dfs.open("dsml://ranged/blob", "rb") as f:
        assert f.size == len(data)
        f.seek(150_000)
        assert f.read(10) == data[150_000:150_010]
        f.seek(5)
        assert f.read(3) == data[5:8]
    assert dfs.cat_file("ranged/blob", start=10, end=20) == data[10:20]
    assert dfs.read_block("ranged/blob", 1000, 100) == data[1000:1100]
    with fsspec.open("dsml://ranged/blob", "rb", client=dfs.client) as f:
        assert f.read() == data
    with pytest.raises(IsADirectoryError):
        dfs.open("ranged", "rb")


def test_pandas_reads_and_writes_a_csv(cluster: LocalCluster) -> None:
    import pandas as pd

    options = {"config": str(cluster.config_path)}
    df = pd.DataFrame({"lr": [0.1, 0.01], "loss": [0.9, 0.4]})
    df.to_csv("dsml://pandas/sweep.csv", index=False, storage_options=options)
    back = pd.read_csv("dsml://pandas/sweep.csv", storage_options=options)
    assert back.equals(df)
    host, port = cluster.address("master")
    by_address = {"host": host, "port": port, "token": cluster.token}
    assert pd.read_csv("dsml://pandas/sweep.csv", storage_options=by_address).equals(df)


# -- the client ----------------------------------------------------------------------


def test_connect_finds_the_cluster_from_dsml_config(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DSML_CONFIG", str(cluster.config_path))
    monkeypatch.chdir(tmp_path)  # no etc/dsml.yaml here
    with dsml.connect() as c:
        assert c.port == cluster.address("master")[1]
        c.set("connect/probe", b"found")
        assert c.get("connect/probe") == b"found"
    monkeypatch.delenv("DSML_CONFIG")
    with pytest.raises(dsml.client.DsmlError, match="no cluster config"):
        dsml.connect()
    with pytest.raises(dsml.client.DsmlError, match="no cluster config"):
        fsspec.filesystem("dsml", skip_instance_cache=True)  # the filesystem looks alike


def test_uploads_take_bytes_and_file_objects(client: ClusterClient, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one 1 MiB chunk
    assert client.upload(data, "up/bytes").size == len(data)
    buf = io.BytesIO(b"skipped" + data)
    buf.seek(7)  # from its position to its end
    assert client.upload(buf, "up/bytesio").sha256 == client.locate("up/bytes").sha256
    r, w = os.pipe()  # a stream whose size is not known: spooled to disk first
    writer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdout.buffer.write("
                               "b'piped ' * 50000)"], stdout=w)
    os.close(w)
    with open(r, "rb") as pipe:
        assert client.upload(pipe, "up/pipe").size == 6 * 50000
    writer.wait()
    out = io.BytesIO()
    entry = client.download("up/bytesio", out)  # a file object, not a path
    assert out.getvalue() == data and entry.size == len(data)
    assert client.read("up/pipe") == b"piped " * 50000  # a file's bytes
    with pytest.raises(dsml.client.DsmlError) as refused:
        client.get("up/pipe")  # get is for values: a file may be large
    assert refused.value.code == "wrong-kind"
    path = tmp_path / "down.bin"
    client.download("up/bytes", path)
    assert path.read_bytes() == data


def test_job_outputs_and_download_prefix(client: ClusterClient, tmp_path: Path) -> None:
    job = client.submit(
        ["sh", "-c", 'echo "result $DSML_TASK_INDEX" > out.txt; echo log > log.txt'],
        array=3, outputs=[("out.txt", "jobs/sweep/{index}/out.txt"),
                          ("log.txt", "jobs/sweep/{index}/log.txt")],
    )
    status = job.wait(timeout=60)
    assert status["state"] == "succeeded"
    outputs = job.outputs()
    assert outputs == {i: [f"jobs/sweep/{i}/out.txt", f"jobs/sweep/{i}/log.txt"]
                       for i in range(3)}
    assert job.outputs(status) == outputs
    assert client.read(outputs[2][0]) == b"result 2\n"
    got = client.download_prefix("jobs/sweep/", tmp_path / "results")
    assert sorted(got) == sorted(k for keys in outputs.values() for k in keys)
    for i in range(3):
        assert (tmp_path / "results" / str(i) / "out.txt").read_text() == f"result {i}\n"
    client.set("jobs/sweep/../escape", b"x")  # skipped: it would leave the directory
    errors: list[str] = []
    client.download_prefix("jobs/sweep/", tmp_path / "again", lambda k, e: errors.append(k))
    assert errors == ["jobs/sweep/../escape"]
    assert not (tmp_path / "escape").exists()
    with pytest.raises(ValueError, match="not a safe relative path"):
        client.download_prefix("jobs/sweep/", tmp_path / "strict")


# -- the example ---------------------------------------------------------------------


def test_the_pandas_example_runs(cluster: LocalCluster, tmp_path: Path) -> None:
    """Run as a user would, in its own process; fsspec finds ``dsml://`` through the
    entry point of an installed distribution (one written here with pyproject's)."""
    site = tmp_path / "site"
    info = site / "dsml_entry_point-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dsml-entry-point\n"
                                   "Version: 0.0\n")
    (info / "entry_points.txt").write_text(f"[fsspec.specs]\ndsml = {ENTRY_POINT}\n")
    env = {**os.environ, "DSML_CONFIG": str(cluster.config_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "read_csv_with_pandas.py")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [line.split() for line in r.stdout.splitlines()] == [
        ["lr", "loss"], ["0.01", "0.41"], ["['examples/sweep/results.csv']"]]
