"""Warm interpreters for function tasks through real twistd processes: a call after the
first runs in an interpreter the worker started beforehand, with everything a cold start
gives it (its own cgroup, the task user, its directory, environment and stdin, its
memory limit); a cancelled call is killed; no warm interpreter outlives its worker,
stopped or killed with -9."""

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
from dsml.localcluster import LocalCluster
from dsml.testing.poll import poll

pytestmark = pytest.mark.processes

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _config(name: str) -> dict[str, object]:
    return {"host": "127.0.0.1", "port": 0, "data_dir": name, "cpus": 2,
            "task_env": ["PYTHONPATH"]}


def _cluster(root: Path) -> LocalCluster:
    workers = {"w1": _config("w1")}
    return LocalCluster(root, workers=("w1",), extra={"workers": workers,
                                                       "cluster": {"replication": 1}})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with _cluster(tmp_path_factory.mktemp("warm")) as c:
        c.start_all()
        yield c


def warm_pids(cluster: LocalCluster) -> set[int]:
    """The warm interpreters of the cluster's worker w1 (by its mark in their environ)
    still waiting (their stdin still the worker's socket)."""
    mark = f"DSML_WORKER_DIR={(cluster.root / 'w1' / 'tasks').resolve()}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if cmdline[-3:-1] == [b"dsml.fnrun", b"--warm"] and mark in environ and state != "Z":
            try:
                if os.readlink(entry / "fd" / "0").startswith("socket:"):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie whose parent is gone does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def probe() -> dict[str, object]:
    import os
    import sys

    return {"pid": os.getpid(), "uid": os.getuid(), "cwd": os.getcwd(),
            "cgroups": open("/proc/self/cgroup").read(), "argv": sys.argv[1:],
            "stdin": os.readlink("/proc/self/fd/0"), "env": dict(os.environ),
            "proc_owner": os.stat(f"/proc/{os.getpid()}/environ").st_uid}


def test_a_call_runs_in_a_warm_interpreter_isolated_as_a_cold_one(
    cluster: LocalCluster, client: ClusterClient
) -> None:
    with dsml.Executor(client) as ex:
        first = ex.submit(probe).result(timeout=120)  # the first starts cold
        assert first["pid"] not in warm_pids(cluster)
        ready = poll(lambda: w if len(w := warm_pids(cluster)) == 2 else None, timeout=60,
                     what="two warm interpreters")
        got = ex.submit(probe).result(timeout=120)
    assert got["pid"] in ready
    if os.geteuid() == 0 and got["uid"] != 0:
        # Waiting, they are not dumpable (/proc/<pid>/environ is root's), so another task of the
        # task user cannot trace one (and plant code for the next attempt) nor read it.
        poll(lambda: (w := warm_pids(cluster)) and all(
            Path(f"/proc/{p}/environ").stat().st_uid == 0 for p in w) or None, timeout=60,
            what="the waiting interpreters not dumpable")
        assert got["proc_owner"] == got["uid"]  # its own attempt: dumpable again
    env = got["env"]
    assert isinstance(env, dict)
    for name in ("DSML_JOB_ID", "DSML_ATTEMPT_ID", "DSML_TASK_INDEX"):
        assert name in env, name
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == "1"
    # The same variables as a cold start's (whose shell joining the cgroup adds PWD).
    assert env.keys() == first["env"].keys() - {"PWD"}  # type: ignore[union-attr]
    assert got["argv"] == first["argv"] == ["-", "result.pkl"]
    assert got["stdin"] == "/dev/null"
    run_dir = (cluster.root / "w1" / "tasks" / "run").resolve()
    assert Path(str(got["cwd"])).parent == run_dir
    assert got["uid"] == first["uid"]
    if os.geteuid() == 0:
        assert got["uid"] != 0  # the task user (nobody), as cold attempts run
    if "/dsml-" in str(first["cgroups"]):  # the worker has cgroups: its own, as a cold one
        own = [line for line in str(got["cgroups"]).splitlines() if "/dsml-" in line]
        assert own and all("/aw" in line for line in own), got["cgroups"]
        path = own[0].split(":", 2)[2]
        gone = Path("/sys/fs/cgroup/unified" + path)
        poll(lambda: not gone.exists() or None, timeout=60, what=f"{gone} removed")


def test_a_warm_call_over_its_mem_ends_out_of_memory(
    cluster: LocalCluster, client: ClusterClient
) -> None:
    log = cluster.log_path("w1").read_text()
    if "memory limits (--mem) NOT enforced" in log:
        pytest.skip("the worker cannot limit memory here")

    def hog() -> int:
        b = bytearray(512 << 20)
        b[::4096] = b"x" * len(b[::4096])
        return len(b)

    with dsml.Executor(client) as ex:
        ex.submit(probe).result(timeout=120)
        ready = poll(lambda: warm_pids(cluster) or None, timeout=60, what="warm interpreters")
        with pytest.raises(FunctionTaskFailed) as e:
            ex.submit(dsml.options(hog, resources={"mem": "64M"}, retries=0)).result(120)
    assert e.value.cause == "out-of-memory", e.value
    assert ready - warm_pids(cluster), "the call did not take a warm interpreter"


def test_a_cancelled_warm_call_is_killed(cluster: LocalCluster, client: ClusterClient,
                                         tmp_path: Path) -> None:
    def long() -> None:
        import time

        time.sleep(300)

    with dsml.Executor(client) as ex:
        ex.submit(probe).result(timeout=120)
        ready = poll(lambda: warm_pids(cluster) or None, timeout=60, what="warm interpreters")
        f = ex.submit(long)
        try:
            taken = poll(lambda: ready - warm_pids(cluster) or None, timeout=60,
                         what="a warm interpreter taken")
        finally:
            assert f.cancel()
        status = client.wait(f.job_id, timeout=120)  # type: ignore[attr-defined]
    assert status["state"] == "cancelled", status
    poll(lambda: not any(alive(p) for p in taken) or None, timeout=60,
         what="the cancelled call's process gone")


@pytest.mark.parametrize("how", ["stop", "kill-9"])
def test_no_warm_interpreter_outlives_its_worker(tmp_path: Path, how: str) -> None:
    c = _cluster(tmp_path)
    try:
        c.start_all()
        with dsml.connect(c.config_path) as client, dsml.Executor(client) as ex:
            ex.submit(probe).result(timeout=120)
            ready = poll(lambda: warm_pids(c) or None, timeout=60, what="warm interpreters")
        c.kill("w1", signal.SIGTERM if how == "stop" else signal.SIGKILL)
        # Stopped: killed by the worker; killed: each sees its socket close and exits.
        poll(lambda: not any(alive(p) for p in ready) or None, timeout=60,
             what="no warm interpreter left")
    finally:
        c.stop()


def test_a_configured_interpreter_runs_function_tasks_cold_and_warm(tmp_path: Path) -> None:
    """``python:`` in a worker's config: ``dsml-python`` names it, its warm interpreters
    run it, and the worker registers what it runs functions with; an interpreter that
    cannot run them is said at start (and registers nothing)."""
    from dsml.fnrun import runtime

    calls = tmp_path / "wrapper.log"
    calls.touch(mode=0o666)
    os.chmod(calls, 0o666)  # the task user appends to it
    wrapper = tmp_path / "fn-python"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >>{calls}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    # As root where the test is root: the task user could not reach this interpreter
    # (under /root here); who the tasks run as is not what this test is about.
    root = {"task_user": "root"} if os.geteuid() == 0 else {}
    workers = {"w1": {**_config("w1"), "python": str(wrapper), **root},
               "w2": {**_config("w2"), "python": str(tmp_path / "no-such-python")}}
    c = LocalCluster(tmp_path / "c", workers=("w1",), extra={
        "workers": workers, "cluster": {"replication": 1}})
    try:
        c.start_all()
        c.start("w2")
        with dsml.connect(c.config_path) as client:
            nodes = poll(lambda: {n.name: n for n in client.nodes()} if len(
                client.nodes()) == 2 else None, timeout=60, what="both workers registered")
            assert nodes["w1"].fn_runtime == runtime() and nodes["w2"].fn_runtime == ""
            assert "function tasks (dsml-python) cannot run on worker w2" in c.log_path(
                "w2").read_text()
            c.kill("w2", signal.SIGTERM)
            with dsml.Executor(client) as ex:
                first = ex.submit(probe).result(timeout=120)
                poll(lambda: warm_pids(c) or None, timeout=60, what="warm interpreters")
                second = ex.submit(probe).result(timeout=120)
        lines = calls.read_text().splitlines()
        assert "-c from dsml.fnrun import runtime; print(runtime())" in lines  # the probe
        assert "-m dsml.fnrun - result.pkl" in lines  # the first call, cold
        assert lines.count("-m dsml.fnrun --warm") >= 2
        assert first["pid"] != second["pid"]
    finally:
        c.stop()


def test_a_workers_preload_is_imported_by_its_warm_interpreters(tmp_path: Path) -> None:
    """``preload: [numpy, ...]``: a call in a warm interpreter finds numpy imported (what
    a map over a dataset's chunks would pay per chunk), the first one too (the pool is
    filled at the worker's start, by its zygote); a module that is not installed is
    left out; a cold start (a PYTHON* variable of its own) imports nothing extra."""
    def imported() -> bool:
        import sys

        return "numpy" in sys.modules

    workers = {"w1": {**_config("w1"), "preload": ["numpy", "no_such_module_here"]}}
    with LocalCluster(tmp_path, workers=("w1",), extra={
            "workers": workers, "cluster": {"replication": 1}}) as c:
        c.start_all()
        with dsml.connect(c.config_path) as client, dsml.Executor(client) as ex:
            poll(lambda: len(warm_pids(c)) == 2 or None, timeout=60, what="warm interpreters")
            assert ex.submit(imported).result(timeout=120) is True  # the first too
            cold = dsml.options(imported, env={"PYTHONHASHSEED": "0"})
            assert ex.submit(cold).result(timeout=120) is False
            assert ex.submit(imported).result(timeout=120) is True
