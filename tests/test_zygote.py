"""The zygote of warm interpreters (:mod:`dsml.fnzygote`, :mod:`dsml.worker.tasks.zygote`)
without a cluster: a real zygote driven over its socket (fork, run, status, reaping only
once the worker lets go, its end); the worker's :class:`Forked`; and the pool with a fake
clock: forks from the zygote, spawns when it is killed, starts it again, stops it."""

from __future__ import annotations

import base64
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from dsml.client.functions import _dumps, _header
from dsml.fnrun import CALLS_ENV, PRELOAD_ENV, ZYGOTE_ENV, go_message
from dsml.worker.tasks import zygote as zygote_module
from dsml.worker.tasks.isolation import Isolation
from dsml.worker.tasks.launch import THREAD_VARS, Executables
from dsml.worker.tasks.warm import FILL_DELAY, WarmPool
from dsml.worker.tasks.zygote import NO_THREADS, RESTART_DELAY, Forked

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = {"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": str(ROOT)}


def readable(fd: int, timeout: float = 60) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent) of ``pid``; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def until(fn: Callable[[], Any], timeout: float = 60) -> Any:
    """``fn()`` once true, waiting on the clock only between looks at /proc."""
    import time

    deadline = time.monotonic() + timeout
    while not (got := fn()):
        assert time.monotonic() < deadline, "timed out"
        select.select([], [], [], 0.02)
    return got


class Z:
    """A zygote started by hand, and what it forked."""

    def __init__(self, preload: str = "numpy") -> None:
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**ENV, PRELOAD_ENV: preload, ZYGOTE_ENV: str(theirs.fileno()), **NO_THREADS,
               **dict.fromkeys(THREAD_VARS, "1")}
        self.p = subprocess.Popen([PY, "-m", "dsml.fnrun", "--warm"], env=env, cwd="/",
                                  pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()

    def fork(self) -> tuple[int, int, socket.socket, int, int]:
        """(pid, status socket, its socket, stdout, stderr) of a new interpreter."""
        ours, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        socket.send_fds(self.ctl, [b"F"], [theirs.fileno(), out_w, err_w])
        for fd in (out_w, err_w):
            os.close(fd)
        theirs.close()
        assert readable(self.ctl.fileno())
        data, fds, _, _ = socket.recv_fds(self.ctl, 64, 1)
        assert data[:1] == b"P" and len(fds) == 1, data
        return int(data[1:]), fds[0], ours, out_r, err_r


@pytest.fixture
def z() -> Iterator[Z]:
    zz = Z()
    yield zz
    zz.ctl.close()
    zz.p.wait(60)


def test_a_forked_interpreter_runs_its_attempt_and_its_status_comes_back(
        z: Z, tmp_path: Path) -> None:
    import cloudpickle

    def call() -> tuple[int, list[str], float]:
        import os
        import sys

        import numpy as np

        a = np.arange(9.0).reshape(3, 3)
        return os.getppid(), sorted(m for m in ("numpy",) if m in sys.modules), float(
            (a @ a.T).sum())

    pid, status, ours, out_r, err_r = z.fork()
    assert state(pid)[1] == z.p.pid  # forked by the zygote
    assert len(os.listdir(f"/proc/{z.p.pid}/task")) == 1  # numpy imported, no thread
    assert os.getsid(pid) == pid  # its own session
    (tmp_path / "fn.pkl").write_bytes(cloudpickle.dumps(call))
    calls = _header(_dumps([(0, (), {})], {}), fn="fn.pkl")
    env = {**ENV, CALLS_ENV: base64.b64encode(calls).decode()}
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    socket.send_fds(ours, [go_message(env, ["-", "result.pkl"])], [fd])
    os.close(fd)
    ours.close()
    assert readable(status)
    assert os.read(status, 32) == b"0", os.read(err_r, 65536)
    # A zombie until the worker lets go: its pid (its group's id) is not reused.
    assert state(pid) == ("Z", z.p.pid)
    os.close(status)
    until(lambda: state(pid) is None)
    parts = pickle.loads((tmp_path / "result.pkl").read_bytes().partition(b"\n")[2])
    _, ok, got, _ = cloudpickle.loads(parts[0])
    assert ok, got
    assert got == (z.p.pid, ["numpy"], float((lambda a: (a @ a.T).sum())(
        __import__("numpy").arange(9.0).reshape(3, 3))))
    for fd in (out_r, err_r):
        os.close(fd)


def test_a_killed_interpreter_s_signal_is_its_status(z: Z) -> None:
    pid, status, ours, out_r, err_r = z.fork()
    os.killpg(pid, signal.SIGKILL)
    assert readable(status)
    assert os.read(status, 32) == b"-9"
    os.close(status)
    until(lambda: state(pid) is None)
    for fd in (out_r, err_r):
        os.close(fd)
    ours.close()


def test_the_zygote_ends_with_the_worker_s_socket_and_so_do_its_waiting_ones(z: Z) -> None:
    pid, status, ours, out_r, err_r = z.fork()
    z.ctl.close()
    assert z.p.wait(60) == 0
    ours.close()  # the worker is gone: the waiting interpreter exits quietly
    until(lambda: state(pid) in (None, ("Z", 1)) or (state(pid) or ("", 0))[0] == "Z")
    for fd in (status, out_r, err_r):
        os.close(fd)


def test_forked_reads_the_status_or_knows_it_lost() -> None:
    done: list[int] = []
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    f = Forked(1234, a.fileno(), lambda: done.append(1))
    assert f.poll() is None and f.wait(5) is None  # never blocks
    b.send(b"-15")
    assert f.poll() == -15 and f.wait() == -15 and done == [1]
    a.close()
    b.close()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    f = Forked(1234, a.fileno(), lambda: done.append(2))
    b.close()  # the zygote died
    assert f.poll() == -signal.SIGKILL and f.wait() is None and f.lost
    f.forget()
    assert done == [1, 2]
    a.close()


class ReadersClock(Clock):
    """A fake clock that also takes readers (the zygote's socket), read by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: set[Any] = set()

    def addReader(self, reader: Any) -> None:  # noqa: N802
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:  # noqa: N802
        self.readers.discard(reader)

    def read(self) -> None:
        """Wait for the zygote's socket, then let it be read."""
        (reader,) = self.readers
        assert readable(reader.fileno())
        reader.doRead()


def test_the_pool_forks_spawns_while_the_zygote_is_dead_and_starts_it_again(
        tmp_path: Path, caplog: Any) -> None:
    clock = ReadersClock()
    run = tmp_path / "run"
    run.mkdir()
    pool = WarmPool(clock, Isolation(clock, tmp_path, None), None,
                    {**ENV, PRELOAD_ENV: "json"}, run, Executables(clock.seconds))
    assert pool.wanted  # ready at the start: no call needed
    clock.advance(FILL_DELAY)
    zyg = pool.zygote
    assert zyg is not None and zyg.up
    first = zyg.popen.pid
    for _ in range(2):
        clock.read()
    assert len(pool._ready) == 2 and all(
        state(w.popen.pid)[1] == first for w in pool._ready)
    w = pool.take(0)
    assert w is not None and isinstance(w.popen, Forked)
    pool.drop(w)
    os.kill(first, signal.SIGKILL)
    clock.read()  # its socket closes: down, the fork asked meanwhile given up
    assert not zyg.up and zyg._restart is not None
    clock.advance(FILL_DELAY)  # spawned as before
    assert len(pool._ready) == 2
    spawned = [w for w in pool._ready if not isinstance(w.popen, Forked)]
    assert spawned and all(isinstance(w.popen, subprocess.Popen) for w in spawned)
    clock.advance(RESTART_DELAY)
    assert zyg.up and zyg.popen.pid != first
    while pool._ready:  # used up (the first zygote's are dropped: their status is
        w = pool.take(0)  # lost): the next ones are forked again
        if w is not None:
            assert not isinstance(w.popen, Forked) or state(w.popen.pid)[1] == zyg.popen.pid
            pool.drop(w)
    clock.advance(FILL_DELAY)
    for _ in range(2):
        clock.read()
    assert all(isinstance(w.popen, Forked) for w in pool._ready)
    second = zyg.popen
    pool.close()
    assert second.poll() is not None and not zyg.up  # stopped with the pool


def test_a_stopped_zygote_that_never_answers_counts_as_dead(tmp_path: Path) -> None:
    clock = ReadersClock()
    run = tmp_path / "run"
    run.mkdir()
    pool = WarmPool(clock, Isolation(clock, tmp_path, None), None,
                    {**ENV, PRELOAD_ENV: "json"}, run, Executables(clock.seconds))
    zyg = pool.zygote
    assert zyg is not None
    clock.advance(FILL_DELAY)
    os.kill(zyg.popen.pid, signal.SIGSTOP)
    for w in list(pool._ready):
        pool.drop(w)
    pool._ready.clear()
    clock.advance(zygote_module.FORK_TIMEOUT)
    assert not zyg.up
    pool.close()


def test_an_attempt_whose_zygote_died_is_lost_to_the_master_so_retried() -> None:
    from dsml.master.jobs.model import DEFAULT_RETRY_ON, attempt_cause
    from dsml.worker.tasks.zygote import LOST

    assert attempt_cause("failed", LOST, None, None) == "lost" and "lost" in DEFAULT_RETRY_ON


def _run(z: Z, work: Path, fn: Callable[[], Any], env: dict[str, str]) -> Any:
    """``fn`` run by an interpreter ``z`` forks: its result."""
    import cloudpickle

    pid, status, ours, out_r, err_r = z.fork()
    (work / "fn.pkl").write_bytes(cloudpickle.dumps(fn))
    calls = _header(_dumps([(0, (), {})], {}), fn="fn.pkl")
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    socket.send_fds(ours, [go_message({**env, CALLS_ENV: base64.b64encode(calls).decode()},
                                      ["-", "result.pkl"])], [fd])
    os.close(fd)
    ours.close()
    assert readable(status)
    assert os.read(status, 32) == b"0", os.read(err_r, 65536)
    for fd in (status, out_r, err_r):
        os.close(fd)
    parts = pickle.loads((work / "result.pkl").read_bytes().partition(b"\n")[2])
    _, ok, got, _ = cloudpickle.loads(parts[0])
    assert ok, got
    return got


def test_an_attempt_given_more_cpus_gets_its_blas_threads_back(z: Z, tmp_path: Path) -> None:
    """The zygote imported numpy with one BLAS thread; an attempt of two CPUs has two
    (through threadpoolctl, where installed), one of one CPU keeps one."""
    pytest.importorskip("threadpoolctl")

    def blas() -> list[int]:
        import numpy as np
        from threadpoolctl import threadpool_info

        np.ones((64, 64)) @ np.ones((64, 64))
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    two = _run(z, tmp_path, blas, {**ENV, **dict.fromkeys(THREAD_VARS, "2")})
    (tmp_path / "result.pkl").unlink()
    one = _run(z, tmp_path, blas, {**ENV, **dict.fromkeys(THREAD_VARS, "1")})
    assert two and all(n == 2 for n in two), two
    assert one and all(n == 1 for n in one), one


def test_an_attempt_waits_for_an_interpreter_being_forked_not_longer(tmp_path: Path) -> None:
    from dsml.worker.tasks.warm import FORK_WAIT

    clock = ReadersClock()
    run = tmp_path / "run"
    run.mkdir()
    pool = WarmPool(clock, Isolation(clock, tmp_path, None), None,
                    {**ENV, PRELOAD_ENV: "json"}, run, Executables(clock.seconds))
    command = [PY, "-m", "dsml.fnrun", "-", "result.pkl"]
    clock.advance(FILL_DELAY)  # two forks asked
    d = pool.ready(command)
    assert not d.called
    clock.read()  # one is ready: the attempt goes on
    assert d.called and len(pool._ready) == 1
    assert pool.ready(command).called  # one is ready: no wait
    assert pool.ready(["sh", "-c", "true"]).called  # not a function task: no wait
    clock.read()
    while pool._ready:
        w = pool.take(0)
        if w is not None:
            pool.drop(w)
    zyg = pool.zygote
    assert zyg is not None and zyg.popen is not None
    os.kill(zyg.popen.pid, signal.SIGSTOP)  # it will not answer: not waited for long
    late = pool.ready(command)
    assert not late.called
    clock.advance(FORK_WAIT)
    assert late.called
    pool.close()


def test_a_traced_zygote_does_not_serve(tmp_path: Path) -> None:
    """Attached to before it made itself undumpable, it would stay traced: it exits."""
    script = tmp_path / "traced.py"
    script.write_text(
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "r, w = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.close(r)\n"
        "    libc.ptrace(0, 0, 0, 0)  # PTRACE_TRACEME: its parent traces it\n"
        "    from dsml import fnzygote\n"
        "    a, b = __import__('socket').socketpair()\n"
        "    os.write(w, b'1' if fnzygote.traced() else b'0')\n"
        "    code = fnzygote.serve(a.fileno(), lambda s: 0, os._exit)\n"
        "    os.write(w, str(code).encode())\n"
        "    os._exit(0)\n"
        "os.close(w)\n"
        "os.waitpid(pid, 0)\n"
        "print(os.read(r, 8).decode())\n")
    got = subprocess.run([PY, str(script)], env=ENV, capture_output=True, timeout=60)
    assert got.stdout.decode().strip() == "11", got
