"""Real processes: twistd workers and the master on 127.0.0.1, driven by the real dsml CLI."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsml.client import Client
from dsml.errors import DsmlError
from dsml.localcluster import LocalCluster
from dsml.protocol.codec import encode_request

pytestmark = pytest.mark.processes


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A one-worker cluster that is always stopped, whatever the test does."""
    c = LocalCluster(tmp_path / "cluster", workers=("w1",))
    try:
        yield c
    finally:
        c.stop()
        for proc in c.procs.values():
            assert proc.poll() is not None, "a process outlived its test"


def cli(cluster: LocalCluster, *args: str, **kw: object):  # type: ignore[no-untyped-def]
    """The real dsml command, aimed at worker w1 directly (these tests need no master)."""
    return cluster.cli(*args, worker="w1", **kw)  # type: ignore[arg-type]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _random_file(path: Path, mib: int) -> Path:
    with open(path, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(mib):
            # Vary every MiB cheaply so a misplaced chunk changes the hash.
            f.write(i.to_bytes(8, "little") + block[8:])
    return path


def _wait_for(predicate, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_cli_upload_download_100mb_and_values(cluster: LocalCluster, tmp_path: Path) -> None:
    """The real CLI moves a 100 MB file through a real worker intact, and sets and gets values."""
    cluster.start("w1")
    src = _random_file(tmp_path / "big.bin", 100)
    out = cli(cluster, "upload", str(src), "data/big.bin")
    assert b"data/big.bin" in out.stdout
    dst = tmp_path / "copy.bin"
    cli(cluster, "download", "data/big.bin", str(dst))
    assert _sha256(dst) == _sha256(src)
    assert not list(tmp_path.glob(".copy.bin.*")), "download left its temporary file"

    cli(cluster, "set", "lr", "0.001")
    cli(cluster, "set", "notes", "-", input=b"line one\nline two\n")
    assert cli(cluster, "get", "lr").stdout == b"0.001"
    assert cli(cluster, "get", "notes").stdout == b"line one\nline two\n"
    listing = cli(cluster, "ls", "-l").stdout.decode()
    assert [line.split()[-1] for line in listing.splitlines()] == ["data/big.bin", "lr", "notes"]

    cli(cluster, "rm", "lr")
    missing = cli(cluster, "get", "lr", check=False)
    assert missing.returncode == 1
    assert missing.stderr.decode().strip() == "dsml: get: key 'lr' not found [not-found]"
    assert b"Traceback" not in missing.stderr


def test_cli_errors_are_one_line(cluster: LocalCluster, tmp_path: Path) -> None:
    """Bad keys, wrong tokens and unreachable servers give one line and a non-zero exit."""
    cluster.start("w1")
    bad_key = cli(cluster, "set", "a\x01b", "v", check=False)
    assert bad_key.returncode == 2 and b"control character" in bad_key.stderr
    host, port = cluster.address("w1")
    wrong = cli(cluster, "--server", f"{host}:{port}", "--token", "nope", "ls", check=False)
    assert wrong.returncode == 1
    assert b"wrong token [auth-failed]" in wrong.stderr
    cluster.stop()
    down = cli(cluster, "--server", f"{host}:{port}", "ls", check=False)
    assert down.returncode == 1 and b"cannot connect" in down.stderr
    for result in (bad_key, wrong, down):
        assert len(result.stderr.decode().strip().splitlines()) == 1
        assert b"Traceback" not in result.stderr


def test_kill_9_mid_upload_leaves_nothing_partial(cluster: LocalCluster, tmp_path: Path) -> None:
    """kill -9 of a worker in the middle of an upload: after a restart nothing partial is
    listed, the temporary file is gone, and earlier data is intact."""
    cluster.start("w1")
    earlier = _random_file(tmp_path / "earlier.bin", 3)
    with cluster.client("w1") as c:
        c.upload(earlier, "earlier.bin")
        c.set("counter", b"41")

    host, port = cluster.address("w1")
    store_tmp = cluster.root / "w1" / "store" / "tmp"
    sock = socket.create_connection((host, port))
    try:
        sock.sendall(encode_request("auth", 1, {"Token": cluster.token}))
        sock.sendall(encode_request("file_upload", 2, {"Key": "partial.bin"}, 64 << 20))
        sock.sendall(os.urandom(8 << 20))  # an eighth of what the head promised

        def temp_file_written() -> bool:
            return any(p.stat().st_size > 0 for p in store_tmp.iterdir())

        _wait_for(temp_file_written, "the worker to write part of the upload")
        cluster.kill("w1", signal.SIGKILL)
    finally:
        sock.close()

    cluster.start("w1")
    assert list(store_tmp.iterdir()) == [], "temporary file survived the restart"
    with cluster.client("w1") as c:
        keys = [e.key for e in c.list()]
        assert keys == ["counter", "earlier.bin"]
        with pytest.raises(DsmlError) as e:
            c.stat("partial.bin")
        assert e.value.code == "not-found"
        assert c.get("counter") == b"41"
        c.download("earlier.bin", tmp_path / "earlier.copy")
    assert _sha256(tmp_path / "earlier.copy") == _sha256(earlier)


def test_values_survive_restart(cluster: LocalCluster) -> None:
    """Acknowledged values are still there after kill -9 and a restart."""
    cluster.start("w1")
    with cluster.client("w1") as c:
        for i in range(200):
            c.set(f"v/{i:03}", str(i).encode())
    cluster.kill("w1", signal.SIGKILL)
    cluster.start("w1")
    with cluster.client("w1") as c:
        assert [c.get(f"v/{i:03}") for i in range(200)] == [str(i).encode() for i in range(200)]


def test_master_starts_and_answers(cluster: LocalCluster) -> None:
    """twistd -n dsml-master starts, listens and answers an authenticated ping."""
    host, port = cluster.start("master")
    with Client(host, port, cluster.token) as c:
        assert c.ping()["role"] == "master"
