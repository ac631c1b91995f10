"""Warm interpreters (:mod:`dsml.worker.tasks.warm`) in one process: which commands a
warm interpreter may run, the one message it takes (:func:`dsml.fnrun.read_go`), and
a real ``python -m dsml.fnrun --warm`` given an attempt over a socket."""

from __future__ import annotations

import base64
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dsml.client.functions import _dumps, _header
from dsml.fnrun import CALLS_ENV, GO_LENGTH, GO_MAX, go_message, read_go
from dsml.worker.tasks.warm import warm_args

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def test_only_the_worker_s_own_python_running_fnrun_is_warm() -> None:
    env = {"PATH": "/bin", "PYTHONPATH": "/src"}
    assert warm_args([PY, "-m", "dsml.fnrun", "-", "result.pkl"], env, env) == [
        "-", "result.pkl"]
    for command in (
        ["python3", "-m", "dsml.fnrun", "-", "result.pkl"],  # not the worker's interpreter
        [PY, "-m", "dsml.other", "-", "result.pkl"],
        [PY, "-m", "dsml.fnrun", "--warm", "result.pkl"],
        [PY, "-m", "dsml.fnrun", "-"],
        [PY, "-c", "pass"],
    ):
        assert warm_args(command, env, env) is None, command


def test_a_python_variable_of_its_own_makes_an_attempt_start_cold() -> None:
    """PYTHONPATH (and the like) is read when an interpreter starts: an attempt whose
    value differs from the warm interpreter's, or that sets one it lacks, cannot use it."""
    cmd = [PY, "-m", "dsml.fnrun", "calls.pkl", "result.pkl"]
    warm = {"PATH": "/bin", "PYTHONPATH": "/src"}
    assert warm_args(cmd, {**warm, "PYTHONPATH": "/other"}, warm) is None
    assert warm_args(cmd, {**warm, "PYTHONHASHSEED": "0"}, warm) is None
    assert warm_args(cmd, {"PATH": "/bin"}, warm) is None
    assert warm_args(cmd, {**warm, "OMP_NUM_THREADS": "4"}, warm) == ["calls.pkl", "result.pkl"]


def test_the_message_carries_a_directory_environment_and_arguments(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    ours, theirs = pair
    env = {"A": "1", CALLS_ENV: "x" * 100_000}  # longer than one read
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        socket.send_fds(ours, [go_message(env, ["-", "result.pkl"])], [fd])
    finally:
        os.close(fd)
    got = read_go(theirs)
    assert got is not None
    dir_fd, got_env, args = got
    try:
        assert os.path.samestat(os.fstat(dir_fd), os.stat(tmp_path))
    finally:
        os.close(dir_fd)
    assert (got_env, args) == (env, ["-", "result.pkl"])


def test_a_closed_socket_is_no_attempt(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    ours.close()
    assert read_go(theirs) is None


@pytest.mark.parametrize("case", ["no-directory", "oversized", "cut-short", "not-strings"])
def test_a_malformed_message_is_refused(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path, case: str
) -> None:
    ours, theirs = pair
    fds = [] if case == "no-directory" else [os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)]
    message = {
        "no-directory": go_message({}, []),
        "oversized": GO_LENGTH.pack(GO_MAX + 1) + b"{}",
        "cut-short": go_message({"A": "1"}, [])[:-3],
        "not-strings": GO_LENGTH.pack(len(b'{"env": {"A": 1}, "args": []}'))
        + b'{"env": {"A": 1}, "args": []}',
    }[case]
    socket.send_fds(ours, [message], fds)
    for fd in fds:
        os.close(fd)
    ours.shutdown(socket.SHUT_WR)
    with pytest.raises(ValueError):
        read_go(theirs)


def _start_warm(tmp_path: Path) -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = {"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([PY, "-m", "dsml.fnrun", "--warm"], stdin=theirs,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env=env)
    theirs.close()
    return p, ours


def _run_warm(tmp_path: Path, fn: Callable[[], Any],
              env: dict[str, str]) -> tuple[Any, Path]:
    """Run ``fn`` through a warm interpreter given its attempt: (its result, the dir)."""
    import cloudpickle

    work = tmp_path / "attempt"
    work.mkdir()
    (work / "fn.pkl").write_bytes(cloudpickle.dumps(fn))
    calls = _header(_dumps([(0, (), {})], {}), fn="fn.pkl")
    env = {**env, CALLS_ENV: base64.b64encode(calls).decode()}
    p, ours = _start_warm(tmp_path)
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    socket.send_fds(ours, [go_message(env, ["-", "result.pkl"])], [fd])
    os.close(fd)
    ours.close()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    data = (work / "result.pkl").read_bytes()
    parts = pickle.loads(data.partition(b"\n")[2])
    _, ok, got, _ = cloudpickle.loads(parts[0])
    assert ok, got
    return got, work


def test_a_warm_interpreter_runs_its_attempt_where_and_as_it_is_told(tmp_path: Path) -> None:
    """Its directory, environment (nothing left of its own), arguments and a stdin of
    /dev/null, as ``python -m dsml.fnrun`` started there would have them."""

    def probe() -> dict[str, object]:
        import os
        import sys

        return {"cwd": os.getcwd(), "argv": sys.argv[1:], "env": dict(os.environ),
                "stdin": os.readlink("/proc/self/fd/0"), "path0": sys.path[0]}

    env = {"PATH": os.defpath, "ONLY": "this"}
    got, work = _run_warm(tmp_path, probe, env)
    assert got["cwd"] == str(work) and got["path0"] == str(work)
    assert got["argv"] == ["-", "result.pkl"]
    assert got["env"].keys() == {*env, CALLS_ENV} and got["env"]["ONLY"] == "this"
    assert got["stdin"] == "/dev/null"


def test_the_run_ends_as_python_would_threads_joined_atexit_run(tmp_path: Path) -> None:
    """The quick exit (no module teardown) still joins the threads a call left running
    and runs its atexit handlers."""

    def leaves_work() -> str:
        import atexit
        import threading
        import time

        def later() -> None:
            time.sleep(0.2)
            with open("thread.txt", "w") as f:
                f.write("joined")

        threading.Thread(target=later).start()
        atexit.register(lambda: open("atexit.txt", "w").write("ran"))
        return "returned"

    got, work = _run_warm(tmp_path, leaves_work, {"PATH": os.defpath})
    assert got == "returned"
    assert (work / "thread.txt").read_text() == "joined"
    assert (work / "atexit.txt").read_text() == "ran"


def test_a_warm_interpreter_not_wanted_exits_quietly(tmp_path: Path) -> None:
    p, ours = _start_warm(tmp_path)
    ours.close()
    out, err = p.communicate(timeout=60)
    assert (p.returncode, out, err) == (0, b"", b"")
