"""A worker's zygote (:mod:`dsml.worker.tasks.zygote`) through real twistd processes: with
``preload`` configured its warm interpreters are ready at the worker's start, forked from
one process that imported the preload modules once; a map over a dataset's chunks runs
in them with pandas imported before the call began; memory limits, timeouts and the
kill of a call's whole tree hold as for spawned ones; a zygote killed with SIGKILL leaves
calls running (spawned) until it is back; none outlives its worker."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest

import dsml
from dsml.client import ClusterClient
from dsml.client.functions import FunctionTaskFailed
from dsml.fnrun import ZYGOTE_ENV
from dsml.localcluster import LocalCluster
from dsml.testing.poll import poll
from tests.test_warm_processes import alive, warm_pids

pytestmark = pytest.mark.processes

cloudpickle.register_pickle_by_value(sys.modules[__name__])

PRELOAD = ["numpy", "pandas"]


def _cluster(root: Path) -> LocalCluster:
    workers = {"w1": {"host": "127.0.0.1", "port": 0, "data_dir": "w1", "cpus": 2,
                      "task_env": ["PYTHONPATH"], "preload": PRELOAD}}
    return LocalCluster(root, workers=("w1",), extra={"workers": workers,
                                                       "cluster": {"replication": 1}})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with _cluster(tmp_path_factory.mktemp("zygote")) as c:
        c.start_all()
        yield c


def zygotes(cluster: LocalCluster) -> set[int]:
    """The live zygotes of the cluster's worker w1: its children with its mark and
    DSML_WARM_ZYGOTE (what a zygote forked has them too, from its exec) and /dev/null
    as their standard input."""
    mark = f"DSML_WORKER_DIR={(cluster.root / 'w1' / 'tasks').resolve()}".encode()
    worker = cluster.procs["w1"].pid
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not alive(int(entry.name)):
            continue
        try:
            if parent(int(entry.name)) != worker:
                continue
        except (OSError, IndexError, ValueError):
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if mark in environ and any(e.startswith(ZYGOTE_ENV.encode() + b"=") for e in environ):
            try:
                if os.readlink(entry / "fd" / "0") == "/dev/null":  # not one it forked
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def the_zygote(cluster: LocalCluster) -> int:
    """w1's zygote once it serves (an earlier test may have killed it): not dumpable
    any more (its /proc files root's) where the test is root."""
    def serving() -> int | None:
        z = zygotes(cluster)
        if len(z) != 1 or (os.geteuid() == 0 and any(
                Path(f"/proc/{p}/environ").stat().st_uid != 0 for p in z)):
            return None
        return next(iter(z))

    return poll(serving, timeout=120, what="w1's zygote serving")


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def at_entry() -> dict[str, object]:
    """What a call finds as it begins, and numpy at work in it."""
    import os
    import sys

    imported = sorted(m for m in ("numpy", "pandas") if m in sys.modules)
    import numpy as np

    a = np.arange(10_000, dtype=float).reshape(100, 100)
    inv = np.linalg.inv(a @ a.T + np.eye(100) * 1e6)
    return {"pid": os.getpid(), "ppid": os.getppid(), "imported": imported,
            "matmul": float((a @ a.T)[3, 7]), "inv_ok": bool(np.isfinite(inv).all()),
            "random": float(np.random.random()),
            "cgroups": open("/proc/self/cgroup").read()}


def test_a_preload_worker_s_calls_run_forked_with_pandas_imported(
        cluster: LocalCluster, client: ClusterClient) -> None:
    # Ready without any call: the pool was filled at the worker's start.
    ready = poll(lambda: w if len(w := warm_pids(cluster)) == 2 else None, timeout=120,
                 what="two forked interpreters at the worker's start")
    zygote = the_zygote(cluster)
    assert all(parent(p) == zygote for p in ready)
    # The zygote is not dumpable (its /proc files are root's, not the task user's).
    assert Path(f"/proc/{zygote}/environ").stat().st_uid == 0
    assert len(os.listdir(f"/proc/{zygote}/task")) == 1, "the zygote started a thread"
    with dsml.Executor(client) as ex:
        got = [ex.submit(at_entry).result(timeout=120) for _ in range(2)]
    assert got[0]["pid"] in ready
    for g in got:
        assert g["ppid"] == zygote, g
        assert g["imported"] == ["numpy", "pandas"], g  # before the call began
        assert g["matmul"] == float(sum((300 + k) * (700 + k) for k in range(100))), g
        assert g["inv_ok"], g
    assert got[0]["random"] != got[1]["random"]  # no random state shared by forks
    if "/dsml-" in str(got[0]["cgroups"]):  # its own cgroup, as a spawned one
        own = [line for line in str(got[0]["cgroups"]).splitlines() if "/dsml-" in line]
        assert own and all("/aw" in line for line in own), got[0]["cgroups"]


def test_a_map_over_chunks_takes_forked_interpreters(
        cluster: LocalCluster, client: ClusterClient, tmp_path: Path) -> None:
    from dsml.datasets import map_chunks

    src = tmp_path / "a.csv"
    src.write_text("x,y\n" + "".join(f"{i},{2 * i}\n" for i in range(20_000)))
    client.upload_dataset(src, "datasets/z", chunk="64KiB")

    def chunk(path: Path) -> tuple[int, list[str], int]:
        import os
        import sys

        imported = sorted(m for m in ("numpy", "pandas") if m in sys.modules)
        import pandas as pd

        return os.getppid(), imported, len(pd.read_csv(path))

    poll(lambda: len(warm_pids(cluster)) == 2 or None, timeout=120, what="forked ones")
    zygote = the_zygote(cluster)
    results = [f.result(timeout=120) for f in map_chunks(client, chunk, "datasets/z")]
    assert len(results) > 1
    assert sum(n for _, _, n in results) == 20_000
    # A chunk takes a forked one, or waits (2 s at most) for one being forked: cold
    # only on a host too loaded to fork in that time.
    assert sum(p == zygote for p, _, _ in results) >= len(results) // 2, results
    assert all(i == ["numpy", "pandas"] for p, i, _ in results if p == zygote), results


def test_a_forked_call_over_its_mem_ends_out_of_memory(
        cluster: LocalCluster, client: ClusterClient) -> None:
    if "memory limits (--mem) NOT enforced" in cluster.log_path("w1").read_text():
        pytest.skip("the worker cannot limit memory here")

    def hog() -> int:
        b = bytearray(512 << 20)
        b[::4096] = b"x" * len(b[::4096])
        return len(b)

    ready = poll(lambda: w if len(w := warm_pids(cluster)) == 2 else None, timeout=120,
                 what="forked ones")
    with dsml.Executor(client) as ex, pytest.raises(FunctionTaskFailed) as e:
        ex.submit(dsml.options(hog, resources={"mem": "64M"}, retries=0)).result(120)
    assert e.value.cause == "out-of-memory", e.value
    assert ready - warm_pids(cluster), "the call did not take a forked interpreter"


def test_a_timed_out_forked_call_s_whole_tree_is_killed(
        cluster: LocalCluster, client: ClusterClient, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.touch(mode=0o666)
    os.chmod(pids, 0o666)  # the task user writes it
    os.chmod(tmp_path, 0o755)

    def tree(where: str) -> None:
        import os
        import subprocess
        import time

        child = subprocess.Popen(["sleep", "300"])
        away = subprocess.Popen(["setsid", "sleep", "300"])  # left the group too
        with open(where, "a") as f:
            f.write(f"{os.getpid()} {child.pid} {away.pid}\n")
        time.sleep(300)

    ready = poll(lambda: w if len(w := warm_pids(cluster)) == 2 else None, timeout=120,
                 what="forked ones")
    with dsml.Executor(client) as ex, pytest.raises(FunctionTaskFailed) as e:
        ex.submit(dsml.options(tree, timeout=5, retries=0), str(pids)).result(120)
    assert e.value.cause == "timeout", e.value
    written = [int(p) for p in pids.read_text().split()]
    assert len(written) == 3 and written[0] in ready
    poll(lambda: not any(alive(p) for p in written) or None, timeout=60,
         what="the call's whole tree gone")


def test_a_killed_zygote_leaves_calls_running_and_comes_back(tmp_path: Path) -> None:
    with _cluster(tmp_path) as c:
        c.start_all()
        with dsml.connect(c.config_path) as client, dsml.Executor(client) as ex:
            (zygote,) = poll(lambda: zygotes(c) or None, timeout=120, what="a zygote")
            poll(lambda: len(warm_pids(c)) == 2 or None, timeout=120, what="forked ones")
            os.kill(zygote, signal.SIGKILL)
            poll(lambda: "zygote of warm interpreters died" in c.log_path(
                "w1").read_text() or None, timeout=60, what="the zygote's death logged")
            # Meanwhile calls run (in spawned interpreters, or cold).
            assert all(ex.submit(at_entry).result(timeout=120)["ppid"] != zygote
                       for _ in range(3))
            again = poll(lambda: zygotes(c) - {zygote} or None, timeout=120,
                         what="a zygote again")
            # Once the spawned ones ready are used, the pool forks from it again.
            ppids = [ex.submit(at_entry).result(timeout=120)["ppid"] for _ in range(4)]
            assert set(ppids) & again, (ppids, again)
        c.kill("w1", signal.SIGTERM)
        poll(lambda: not any(alive(p) for p in again) or None, timeout=60,
             what="the zygote stopped with its worker")


def test_a_call_whose_zygote_dies_under_it_is_killed_lost_and_run_again(
        cluster: LocalCluster, client: ClusterClient, tmp_path: Path) -> None:
    """Its exit status cannot be known: it is killed, ends ``lost: ...`` and is retried."""
    os.chmod(tmp_path, 0o755)
    fifo = tmp_path / "go"
    os.mkfifo(fifo, 0o666)
    os.chmod(fifo, 0o666)
    pids = tmp_path / "pids"
    pids.touch()
    os.chmod(pids, 0o666)

    def blocked(fifo: str, pids: str) -> str:
        import os

        with open(pids, "a") as f:
            f.write(f"{os.getpid()} {os.getppid()}\n")
        with open(fifo) as f:  # until the test writes
            return f.read()

    poll(lambda: len(warm_pids(cluster)) == 2 or None, timeout=120, what="forked ones")
    with dsml.Executor(client) as ex:
        f = ex.submit(blocked, str(fifo), str(pids))
        pid, ppid = map(int, poll(lambda: pids.read_text().split() or None, timeout=120,
                                  what="the call running"))
        assert ppid in zygotes(cluster)
        os.kill(ppid, signal.SIGKILL)
        poll(lambda: not alive(pid) or None, timeout=60, what="the lost call killed")
        # Its retry blocks on the FIFO too: let it through.
        poll(lambda: len(pids.read_text().split()) == 4 or None, timeout=120,
             what="the retry running")
        with open(fifo, "w") as w:
            w.write("done")
        assert f.result(timeout=120) == "done"
        status = client.job_status(f.job_id)  # type: ignore[attr-defined]
    reasons = [a["reason"] for t in status["tasks"] for a in t["attempts"]]
    assert any(r.startswith("lost: its interpreter's zygote died") for r in reasons), reasons


def test_a_call_cannot_reach_into_its_zygote(cluster: LocalCluster,
                                             client: ClusterClient) -> None:
    """Not dumpable, the zygote's descriptors (its socket to the worker), memory and
    environment are closed to the task user's processes; ptrace is refused."""
    if os.geteuid() != 0:
        pytest.skip("tasks run as the worker's own user: only root's tests tell")

    def reach(zpid: int) -> dict[str, str]:
        import ctypes
        import os

        out = {}
        for what in ("fd", "mem", "environ", "fd/3"):
            try:
                if what == "fd":
                    os.listdir(f"/proc/{zpid}/fd")
                else:
                    open(f"/proc/{zpid}/{what}", "rb").close()
                out[what] = "open"
            except OSError as e:
                out[what] = type(e).__name__
        libc = ctypes.CDLL(None, use_errno=True)
        out["ptrace"] = "attached" if libc.ptrace(16, zpid, 0, 0) == 0 else os.strerror(
            ctypes.get_errno())  # PTRACE_ATTACH
        return out

    def started(pid: int) -> str | None:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
        except (OSError, IndexError):
            return None

    # A zygote that was exiting when the call looked (its memory already released: an
    # exiting process passes the kernel's access checks, and an earlier test of the
    # module restarts the zygote) proves nothing: then the next serving one is tried.
    with dsml.Executor(client) as ex:
        for _ in range(3):
            poll(lambda: len(warm_pids(cluster)) == 2 or None, timeout=120,
                 what="forked ones")
            zygote = the_zygote(cluster)
            born = started(zygote)
            got = ex.submit(reach, zygote).result(timeout=120)
            if born is not None and started(zygote) == born and zygote in zygotes(cluster):
                break
    assert got["ptrace"] != "attached", got
    assert all(got[w] in ("PermissionError",) for w in ("fd", "mem", "environ", "fd/3")), got
