"""Issue #14's functions as tasks through real twistd processes: ``dsml.Executor``
(``map`` in order, ``as_completed``, a remote exception with its traceback, cancel, a
worker killed with -9 mid-map), ``ClusterClient.submit``/``map`` with a callable,
content-addressed functions and arguments, ``dsml.Key`` arguments staged as inputs, a
version mismatch refused by the task side, and the sweep example.

The workers pass their PYTHONPATH to tasks (``task_env``); the executor's calls run
with the worker's own interpreter (the default, ``dsml-python``), the others with this
test's (``python=sys.executable``): either has this tree's ``dsml.fnrun`` and its
cloudpickle.  This module's functions are pickled by value (the workers cannot import a
test module by name).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, as_completed, wait
from pathlib import Path

import cloudpickle
import pytest

import dsml
from dsml.client import ClusterClient
from dsml.client.functions import FunctionTaskFailed
from dsml.errors import DsmlError
from dsml.fnrun import CALLS_ENV, RemoteTraceback
from dsml.localcluster import LocalCluster
from dsml.testing.poll import poll

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    workers = {name: {"host": "127.0.0.1", "port": 0, "data_dir": name, "cpus": 2,
                      "task_env": ["PYTHONPATH"]} for name in ("w1", "w2")}
    with LocalCluster(tmp_path_factory.mktemp("fn"), workers=tuple(workers),
                      extra={"workers": workers}) as c:
        c.start_all()
        yield c


@pytest.fixture
def ex(client: ClusterClient) -> Iterator[dsml.Executor]:
    with dsml.Executor(client) as e:  # the worker's own Python (the default)
        yield e


def square(x: int) -> int:
    return x * x


def boom(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad input {x}")
    return x


def wait_for(gate: str, value: int) -> int:
    while not os.path.exists(gate):
        time.sleep(0.02)
    return value


def slow_square(x: int) -> int:
    time.sleep(0.1)
    return x * x


def read_key(path: Path, extra: bytes) -> tuple[str, bool, bytes, int]:
    return type(path).__name__, path.is_absolute(), path.read_bytes(), len(extra)



def fn_keys(client: ClusterClient) -> set[str]:
    return {k.key for k in client.list("_dsml/fn/")}


# -- the Executor --------------------------------------------------------------------


def test_map_of_200_in_order_is_one_batched_job(ex: dsml.Executor,
                                                client: ClusterClient) -> None:
    """200 calls: results in order, from ONE job of at most 3 tasks per CPU (4 CPUs)."""
    before = {j["id"] for j in client.jobs(50)}
    assert list(ex.map(square, range(200), timeout=120)) == [x * x for x in range(200)]
    (job,) = [j for j in client.jobs(50) if j["id"] not in before]
    status = client.job_status(job["id"])
    assert status["state"] == "succeeded" and len(status["tasks"]) == 12
    assert status["name"] == "fn:square"
    assert status["tasks"][0]["outputs"][0].startswith("_dsml/result/")


def test_a_small_result_comes_back_through_the_master_a_big_one_through_the_store(
        ex: dsml.Executor, client: ClusterClient) -> None:
    """A task's result up to 64 KiB rides in its worker's report and the master answers
    ``result`` with it (no cluster write, no read from a worker); a bigger one is stored
    under the task's result key as any output, and read from there."""
    from dsml.fnrun import read_header

    small, big = ex.submit(bytes, 100), ex.submit(bytes, 100 * 1024)
    assert (small.result(timeout=120), big.result(timeout=120)) == (bytes(100),
                                                                     bytes(100 * 1024))
    _, data = client.master.call("result", {"Job": small.job_id, "Task": 0})
    head, _ = read_header(data)
    assert head["format"] == 1 and len(data) < 1024
    with pytest.raises(DsmlError) as e:
        client.master.call("result", {"Job": big.job_id, "Task": 0})
    assert e.value.code == "not-found"


def test_as_completed_and_wait(ex: dsml.Executor) -> None:
    fs = [ex.submit(square, i) for i in range(4)]
    assert sorted(f.result() for f in as_completed(fs, timeout=120)) == [0, 1, 4, 9]
    done, _ = wait([ex.submit(square, 7)], timeout=120, return_when=FIRST_COMPLETED)
    assert [f.result() for f in done] == [49]


def test_a_call_s_end_wakes_its_future_without_waiting_for_a_poll(
    client: ClusterClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiter thread long-polls the master (``wait``) and wakes the poll as soon as
    the job ends: with the poll's pace slowed to a minute, a call still resolves well
    within that; shutting down interrupts the waiter's blocked wait."""
    from dsml.client import functions

    monkeypatch.setattr(functions, "POLL_MIN", 60.0)
    monkeypatch.setattr(functions, "POLL_MAX", 60.0)
    with dsml.Executor(client) as ex:
        assert ex.submit(square, 6).result(timeout=40) == 36
        assert ex.submit(square, 7).result(timeout=40) == 49
        gate = ex.submit(wait_for, "/nonexistent/gate", 1)  # keeps the waiter waiting
        waiter = ex._runner._waiter
        assert waiter is not None and waiter.is_alive()
        gate.cancel()
    assert not waiter.is_alive()


def test_a_remote_exception_reaches_result_with_its_traceback(ex: dsml.Executor) -> None:
    """A raising call is a result: its batch's other calls succeed; ``result()`` raises
    the ValueError itself, its ``__cause__`` the remote traceback."""
    fs = [ex.submit(boom, 3)] + ex._runner.map(boom, range(6), batch_size=6)
    with pytest.raises(ValueError, match="bad input 3") as e:
        fs[0].result(timeout=120)
    cause = e.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    text = str(cause)  # (the source line only where the worker can read the file)
    assert ", in boom\n" in text and text.endswith("ValueError: bad input 3\n"), text
    assert "fnrun" not in text
    assert [f.exception(120) is None for f in fs[1:]] == [True] * 3 + [False] + [True] * 2
    assert [f.result() for i, f in enumerate(fs[1:]) if i != 3] == [0, 1, 2, 4, 5]


def test_cancel_of_pending_futures_cancels_their_jobs(ex: dsml.Executor,
                                                      client: ClusterClient,
                                                      tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    fs = [ex.submit(wait_for, gate, i) for i in range(3)]
    assert all(f.cancel() for f in fs) and all(f.cancelled() for f in fs)
    for f in fs:
        poll(lambda f=f: True if client.job_status(f.job_id)["state"] == "cancelled" else None,
             "the cancelled call's job to be cancelled", timeout=60)
    # A map whose futures are all cancelled is cancelled too; shutdown(cancel_futures).
    fs = ex._runner.map(wait_for, [gate] * 4, range(4))
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in fs)
    poll(lambda: True if client.job_status(fs[0].job_id)["state"] == "cancelled" else None,
         "the map's job to be cancelled", timeout=60)


# -- the client ------------------------------------------------------------------------


def test_client_submit_and_map_with_a_callable(client: ClusterClient,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``resources`` is the one reserved keyword; through ``dsml.options`` none is.
    ($DSML_PYTHON on the client names the workers' interpreter.)"""
    monkeypatch.setenv("DSML_PYTHON", sys.executable)
    assert client.submit(square, 6, resources={"cpus": 1}).result(120) == 36
    both = dsml.options(lambda x, resources: (x, resources))
    assert client.submit(both, 1, resources="mine").result(120) == (1, "mine")
    fs = client.map(square, [1, 2, 3], resources={"mem": "64M"})
    assert [f.result(120) for f in fs] == [1, 4, 9]
    job = client.submit(["true"])  # a command still makes a job
    assert job.wait(timeout=120)["state"] == "succeeded"


def test_functions_and_large_args_are_stored_once(client: ClusterClient) -> None:
    big = os.urandom(200_000)

    def fresh(data: bytes, tag: str = "f9d1") -> int:  # a function no other test sent
        return len(data)

    before = fn_keys(client)
    args_before = {k.key for k in client.list("_dsml/arg/")}
    fn = dsml.options(fresh, python=sys.executable)
    assert [client.submit(fn, big).result(120) for _ in range(2)] == [200_000] * 2
    assert len(fn_keys(client) - before) == 1
    assert len({k.key for k in client.list("_dsml/arg/")} - args_before) == 1


def test_a_key_argument_is_staged_as_an_input(client: ClusterClient) -> None:
    client.upload(b"x" * 1000, "datasets/fn-input.bin")
    fn = dsml.options(read_key, python=sys.executable)
    f = client.submit(fn, dsml.Key("datasets/fn-input.bin"), b"small")
    # The staged copy, by a path relative to the task's directory (a task user cannot
    # pass through the worker's data dir).
    assert f.result(120) == ("PosixPath", False, b"x" * 1000, 5)


def test_a_version_mismatch_is_a_clear_error(client: ClusterClient) -> None:
    """A calls file written under another Python: the task exits 2 with one line naming
    both versions, and the future fails with it."""
    bad = base64.b64encode(b'{"format": 1, "python": "2.7", "cloudpickle": "0.1", '
                           b'"fn": "fn.pkl"}\n').decode()
    job = client.submit([sys.executable, "-m", "dsml.fnrun", "-", "out.pkl"],
                        env={CALLS_ENV: bad, "PYTHONPATH": str(ROOT)})
    status = job.wait(timeout=120, check=False)
    tail = status["tasks"][0]["attempts"][-1]["stderr_tail"]
    assert "version mismatch: the client has Python 2.7 and cloudpickle 0.1" in tail


def test_a_client_whose_versions_differ_from_the_workers_is_refused_at_submit(
    client: ClusterClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers say at registration what they run functions with (``nodes``); a client
    with another Python or cloudpickle is refused when it submits, naming them, unless
    it names its own interpreter for the workers to run."""
    from dsml.client import functions
    from dsml.fnrun import runtime

    assert {n.fn_runtime for n in client.nodes()} == {runtime()}
    monkeypatch.setattr(functions, "runtime", lambda: "python 2.7 cloudpickle 0.1")
    with dsml.Executor(client) as ex:
        with pytest.raises(functions.FunctionVersionMismatch) as e:
            ex.submit(square, 3)
        assert e.value.code == "version-mismatch"
        assert "w1, w2" in str(e.value) and "python 2.7 cloudpickle 0.1" in str(e.value)
        assert ex.submit(dsml.options(square, python=sys.executable), 3).result(120) == 9


def test_a_dead_task_fails_its_future_naming_the_cause(client: ClusterClient) -> None:
    fn = dsml.options(os._exit, python=sys.executable)
    with pytest.raises(FunctionTaskFailed, match=r"exit 7 \[exit\]") as e:
        client.submit(fn, 7).result(120)
    assert e.value.cause == "exit"


# -- the example, then the worker killed (last: it leaves one worker) ---------------------


def test_the_sweep_example(cluster: LocalCluster) -> None:
    env = {**os.environ, "DSML_CONFIG": str(cluster.config_path), "DSML_TOKEN": cluster.token,
           "DSML_PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "sweep.py")], env=env,
                       capture_output=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr.decode()
    assert "best: lr=0.3" in r.stdout.decode(), r.stdout.decode()


def test_the_scatter_gather_example(cluster: LocalCluster) -> None:
    """numpy parts scattered as keys, summed on the workers (the worker's own Python),
    gathered: the example checks the result against numpy itself."""
    env = {**os.environ, "DSML_CONFIG": str(cluster.config_path), "DSML_TOKEN": cluster.token,
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "scatter_gather.py")],
                       env=env, capture_output=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr.decode()
    assert "400000 values in 8 parts" in r.stdout.decode(), r.stdout.decode()
    assert "the same as numpy over the whole array" in r.stdout.decode()


def test_a_worker_killed_mid_map_and_every_future_resolved_once(
        cluster: LocalCluster, client: ClusterClient) -> None:
    resolved: dict[int, int] = {}
    lock = threading.Lock()
    with dsml.Executor(client, python=sys.executable) as ex:
        fs = ex._runner.map(slow_square, range(60), batch_size=3)
        for i, f in enumerate(fs):
            def count(_f: object, i: int = i) -> None:
                with lock:
                    resolved[i] = resolved.get(i, 0) + 1
            f.add_done_callback(count)

        def running_on_w2() -> bool | None:
            tasks = client.job_status(fs[0].job_id)["tasks"]
            return True if any(a["worker"] == "w2" and a["state"] == "running"
                               for t in tasks for a in t["attempts"]) else None

        poll(running_on_w2, "a task running on w2", timeout=60)
        cluster.kill("w2", signal.SIGKILL)
        assert [f.result(timeout=120) for f in fs] == [x * x for x in range(60)]
    assert resolved == {i: 1 for i in range(60)}
    tasks = client.job_status(fs[0].job_id)["tasks"]
    assert any(a["cause"] == "lost" for t in tasks for a in t["attempts"])
