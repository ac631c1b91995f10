"""Tests for dsml.worker.tasks: the TaskManager runs real commands in their own process groups.

These tests start real processes, so they need a real reactor.  Each test gets a fresh
reactor of its own (a reactor cannot be restarted, but a new one can run), which records
every pid it spawns; the test body is a coroutine run by ``Harness.run`` with a deadline,
and waits on Deferreds (a result, a stop) or polls /proc in short bounded steps.  After each
test a fixture scans /proc for anything left in the groups the test spawned, kills it and
fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import deferLater

from dsml.errors import DsmlError, NotFound
from dsml.worker import runner, tasks
from dsml.worker.tasks import (
    RUN_DIR,
    STDERR_NAME,
    STDOUT_NAME,
    AttemptResult,
    AttemptSpec,
    InputVersion,
    TaskError,
    TaskManager,
    popen_launcher,
    python_launcher,
    scan_groups,
    spawn_launcher,
)

try:
    from twisted.internet.epollreactor import EPollReactor as _ReactorBase
except ImportError:  # not Linux
    from twisted.internet.selectreactor import SelectReactor as _ReactorBase  # type: ignore

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs /proc and setsid")

T = TypeVar("T")

#: The grace period between TERM and KILL in these tests.
GRACE = 0.5


class RecordingReactor(_ReactorBase):  # type: ignore[misc, valid-type]
    """A fresh reactor that remembers the pid (= process group) of every spawned process,
    whether spawned through Twisted or started by Popen (its pidfd is watched at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[int] = []

    def spawnProcess(self, protocol: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        """Spawn and record the pid (as the process connects: a quick one may be reaped, and
        its transport's pid cleared, before spawnProcess returns)."""
        make_connection = protocol.makeConnection

        def record(transport: Any) -> None:
            self.spawned.append(transport.pid)
            make_connection(transport)

        protocol.makeConnection = record
        return super().spawnProcess(protocol, *args, **kwargs)

    def addReader(self, reader: Any) -> None:  # noqa: N802
        """Watch ``reader``; the exit watcher of a Popen-started task names its pid."""
        if isinstance(reader, tasks.watch.ExitWatcher):
            self.spawned.append(reader.pid)
        super().addReader(reader)


class FakeTransfers:
    """Inputs from a dict, outputs into a dict; keys can be made to fail or hang."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.uploaded: dict[str, bytes] = {}
        self.attempts: dict[str, int | None] = {}  # the attempt each output was stored for
        self.broken: dict[str, Exception] = {}
        self.hanging: set[str] = set()
        self.cancelled: list[str] = []
        self.storing: list[str] = []
        self.told: dict[str, InputVersion | None] = {}
        self.released: list[Path] = []

    def fetch(self, key: str, dest: Path, current: InputVersion | None = None) -> Deferred[None]:
        """Write the file for ``key`` to ``dest`` (noting the version it was told of)."""
        self.told[key] = current
        if key in self.hanging:
            return Deferred(lambda d: self.cancelled.append(key))
        if key in self.broken:
            return fail(self.broken[key])
        if key not in self.files:
            return fail(NotFound(f"no key {key!r}"))
        dest.write_bytes(self.files[key])
        return succeed(None)

    def store(self, src: Path, key: str, attempt: int | None = None) -> Deferred[None]:
        """Keep the bytes of ``src`` under ``key`` (stored as ``attempt``'s output)."""
        self.storing.append(key)
        self.attempts[key] = attempt
        if key in self.hanging:
            return Deferred(lambda d: self.cancelled.append(key))
        if key in self.broken:
            return fail(self.broken[key])
        self.uploaded[key] = src.read_bytes()
        return succeed(None)

    def release(self, dest: Path) -> None:
        """Note that the attempt staging ``dest`` ended."""
        self.released.append(dest)


class Harness:
    """One test's reactor, transfers, work directory, results and on_change record."""

    def __init__(self, work_dir: Path) -> None:
        self.reactor = RecordingReactor()
        self.work_dir = work_dir
        self.transfers = FakeTransfers()
        self.results: dict[int, AttemptResult] = {}
        self._waiting: dict[int, list[Deferred[AttemptResult]]] = {}
        self.free_seen: list[int] = []

    def manager(self, **kwargs: Any) -> TaskManager:
        """A TaskManager on this harness (2 slots and a short grace unless told)."""
        kwargs.setdefault("slots", 2)
        kwargs.setdefault("grace", GRACE)
        kwargs.setdefault("work_dir", self.work_dir)
        manager = TaskManager(
            self.reactor,
            transfers=self.transfers,
            on_result=self._on_result,
            on_change=lambda: self.free_seen.append(manager.free_slots()),
            **kwargs,
        )
        return manager

    def _on_result(self, result: AttemptResult) -> None:
        assert result.attempt_id not in self.results, "a result was reported twice"
        self.results[result.attempt_id] = result
        for d in self._waiting.pop(result.attempt_id, []):
            d.callback(result)

    def result(self, attempt_id: int) -> Deferred[AttemptResult]:
        """Fires with the attempt's result once on_result has reported it."""
        if attempt_id in self.results:
            return succeed(self.results[attempt_id])
        d: Deferred[AttemptResult] = Deferred()
        self._waiting.setdefault(attempt_id, []).append(d)
        return d

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 3.0) -> None:
        """Poll ``condition`` every 10 ms until it holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            await deferLater(self.reactor, 0.01)

    async def group_gone(self, pgid: int, timeout: float = 2.0) -> None:
        """Wait until no live process is left in group ``pgid``."""
        await self.wait_for(lambda: pgid not in scan_groups({pgid}), timeout)

    def run(self, body: Callable[[], Coroutine[Any, Any, T]], timeout: float = 8.0) -> T:
        """Run the reactor until ``body`` finishes; cancel it after ``timeout`` seconds."""
        reactor = self.reactor
        outcome: list[Any] = []

        def go() -> None:
            d = Deferred.fromCoroutine(body())
            guard = reactor.callLater(timeout, d.cancel)

            def done(value: Any) -> None:
                if guard.active():
                    guard.cancel()
                outcome.append(value)
                reactor.stop()

            d.addBoth(done)

        reactor.callWhenRunning(go)
        reactor.callLater(timeout + 5, lambda: outcome or reactor.stop())  # last resort
        reactor.run()
        if not outcome:
            raise AssertionError("the test body never finished")
        if hasattr(outcome[0], "raiseException"):
            outcome[0].raiseException()
        return outcome[0]  # type: ignore[no-any-return]


def _task_processes(pgids: set[int]) -> dict[int, list[int]]:
    """Live processes in ``pgids`` that are dsml tasks (their environment says so)."""
    left: dict[int, list[int]] = {}
    for pgid, usage in scan_groups(pgids).items():
        for pid in usage.pids:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if b"DSML_ATTEMPT_ID=" in environ:
                left.setdefault(pgid, []).append(pid)
    return left


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    """A harness; afterwards, no process of any group it spawned may be left running."""
    harness = Harness(tmp_path / "work")
    yield harness
    spawned = set(harness.reactor.spawned)
    left = _task_processes(spawned)
    for pgid in left:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in spawned:  # reap leaders the stopped reactor left as zombies
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    assert not left, f"processes left running after the test: {left}"


@pytest.fixture(params=["popen", "spawn"])
def launcher(request: pytest.FixtureRequest) -> Any:
    """Both ways of starting a task: Popen + pidfd (the default on Linux), and the fallback
    ``env -C dir -- setsid -- command`` through ``reactor.spawnProcess``."""
    return popen_launcher if request.param == "popen" else spawn_launcher()


def spec(attempt_id: int, *command: str, **kwargs: Any) -> AttemptSpec:
    """An AttemptSpec for job 'job-1', task index 7."""
    kwargs.setdefault("job_id", "job-1")
    kwargs.setdefault("task_index", 7)
    return AttemptSpec(attempt_id=attempt_id, command=tuple(command), **kwargs)


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def stat_fields(pid: int) -> tuple[int, int]:
    """(pgrp, session) of ``pid`` from /proc."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rfind(b")") + 2 :].split()
    return int(fields[2]), int(fields[3])


# --- exit codes, logs, environment --------------------------------------------------------


def test_exit_code_and_both_logs(h: Harness, launcher: Any) -> None:
    """A failing command: exit code 3, reason 'exit 3', stdout and stderr in their files."""
    m = h.manager(launcher=launcher)

    async def body() -> AttemptResult:
        m.start(spec(1, "sh", "-c", "echo hi; echo err >&2; exit 3"))
        return await h.result(1)

    result = h.run(body)
    assert (result.exit_code, result.signal, result.reason) == (3, None, "exit 3")
    assert not result.ok
    assert result.duration > 0
    out, err = m.logs(1)
    assert out == h.work_dir / "1" / STDOUT_NAME and err == h.work_dir / "1" / STDERR_NAME
    assert out.read_bytes() == b"hi\n"
    assert err.read_bytes() == b"err\n"


def test_a_task_gets_default_sigpipe(h: Harness, launcher: Any) -> None:
    """The worker (Python) ignores SIGPIPE, and an ignored signal stays ignored across exec;
    its tasks must not inherit that: ``yes | head -n 1`` ends quietly, ``yes`` killed by
    SIGPIPE rather than complaining of a broken pipe."""
    m = h.manager(launcher=launcher)
    script = "yes | head -n 1; grep SigIgn /proc/self/status"

    async def body() -> AttemptResult:
        m.start(spec(1, "sh", "-c", script))
        return await h.result(1)

    assert h.run(body).reason == ""
    out, err = m.logs(1)
    first, ignored = out.read_text().splitlines()
    assert first == "y"
    assert not int(ignored.split()[1], 16) & (1 << (signal.SIGPIPE - 1))
    assert not err.exists()  # nothing written to stderr (an empty log is not made)


def test_environment_and_working_directory(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command sees DSML_* and its spec's env, runs in its attempt dir, and nothing else
    of the worker's environment leaks in."""
    monkeypatch.setenv("WORKER_SECRET", "s3cret")
    m = h.manager()
    script = 'echo "$DSML_TASK_INDEX|$DSML_JOB_ID|$DSML_ATTEMPT_ID|$FOO|$WORKER_SECRET"; pwd'

    async def body() -> AttemptResult:
        m.start(spec(4, "sh", "-c", script, env=(("FOO", "bar baz"),)))
        return await h.result(4)

    result = h.run(body)
    assert result.reason == ""
    lines = m.logs(4)[0].read_text().splitlines()
    assert lines[0] == "7|job-1|4|bar baz|"
    # Its own directory under run/ while it runs; kept as <attempt id> (it holds a log).
    assert Path(lines[1]).resolve().parent == (h.work_dir / RUN_DIR).resolve()
    assert m.logs(4)[0].parent == h.work_dir / "4"
    assert not Path(lines[1]).exists()


@pytest.mark.parametrize("which", ["default", "spawn", "python"])
def test_own_session_and_group_without_fork(h: Harness, which: str) -> None:
    """The spawned pid is the command itself and leads its own session and process group
    (setsid did not fork), with each launcher."""
    chosen = {"default": None, "spawn": spawn_launcher(), "python": python_launcher()}[which]
    m = h.manager(launcher=chosen)

    async def body() -> AttemptResult:
        m.start(spec(1, "sh", "-c", "echo $$; cut -d' ' -f5,6 /proc/$$/stat; pwd"))
        return await h.result(1)

    result = h.run(body)
    assert result.reason == ""
    (spawned,) = h.reactor.spawned
    shell_pid, groups, cwd = m.logs(1)[0].read_text().splitlines()
    assert int(shell_pid) == spawned
    assert groups == f"{spawned} {spawned}"  # pgrp and session both = the pid
    assert Path(cwd).resolve().parent == (h.work_dir / RUN_DIR).resolve()
    assert stat_fields(os.getpid())[0] != spawned


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: tasks run as nobody")
@pytest.mark.parametrize("which", ["default", "spawn", "python"])
def test_a_task_user_runs_the_command_after_the_hand_over(h: Harness, which: str) -> None:
    """With a task user (nobody) the command runs as it, with each launcher: its HOME,
    USER; it reads its input (in a directory staging made), writes its output, and the
    worker uploads it; its directory is nobody's, the worker's task dir still root's."""
    import pwd

    from dsml.worker.tasks.taskuser import resolve

    user = resolve("nobody", euid=0)
    assert user is not None
    nobody = pwd.getpwnam("nobody")
    chosen = {"default": None, "spawn": spawn_launcher(), "python": python_launcher()}[which]
    h.transfers.files["in-key"] = b"hello\n"
    m = h.manager(launcher=chosen, task_user=user)
    script = ('id -u; id -G; echo "$HOME $USER $LOGNAME"; '
              "stat -c %U . data; tr a-z A-Z < data/in.txt > out.txt")

    async def body() -> AttemptResult:
        m.start(spec(1, "sh", "-c", script, inputs=(("in-key", "data/in.txt"),),
                     outputs=(("out.txt", "out-key"),)))
        return await h.result(1)

    result = h.run(body)
    assert result.reason == "", (result, m.logs(1)[1].read_text())
    assert m.logs(1)[0].read_text().splitlines() == [
        str(nobody.pw_uid), str(nobody.pw_gid), f"{nobody.pw_dir} nobody nobody",
        "nobody", "nobody"]
    assert h.transfers.uploaded == {"out-key": b"HELLO\n"}
    assert os.stat(h.work_dir).st_uid == 0 and os.stat(h.work_dir).st_mode & 0o777 == 0o700


# --- inputs and outputs --------------------------------------------------------------------


def test_input_fetched_and_output_uploaded(h: Harness) -> None:
    """Inputs land under the attempt dir before the run; outputs are uploaded after it."""
    h.transfers.files["in-key"] = b"hello\n"
    h.transfers.files["other"] = b"x"
    m = h.manager()

    async def body() -> AttemptResult:
        m.start(
            spec(
                2,
                "sh",
                "-c",
                "tr a-z A-Z < data/in.txt > out.txt; mkdir sub; cat x > sub/copy",
                inputs=(("in-key", "data/in.txt"), ("other", "x")),
                outputs=(("out.txt", "out-key"), ("sub/copy", "copy-key")),
            )
        )
        return await h.result(2)

    result = h.run(body)
    assert result.reason == "" and result.ok, result
    assert result.exit_code == 0
    assert h.transfers.uploaded == {"out-key": b"HELLO\n", "copy-key": b"x"}
    # Stored as this attempt's outputs (the master fences them by it).
    assert h.transfers.attempts == {"out-key": 2, "copy-key": 2}
    assert h.transfers.told == {"in-key": None, "other": None}
    # Once the attempt has ended, whatever staging lent it is given back, input by input.
    data_in, x = h.transfers.released
    assert (data_in.parent.name, data_in.name, x.name) == ("data", "in.txt", "x")
    assert data_in.parent.parent == x.parent and x.parent.parent == h.work_dir / RUN_DIR


def test_the_version_the_master_named_goes_with_each_fetch(h: Harness) -> None:
    """Each input is fetched with the current version the run order named for it (the
    transfers may then stage a local copy), and None for an input it did not name."""
    h.transfers.files.update({"a": b"1", "b": b"2"})
    m = h.manager()
    current = InputVersion(12, "ab" * 32)

    async def body() -> AttemptResult:
        m.start(
            spec(3, "true", inputs=(("a", "a"), ("b", "b")), versions=(("a", current),))
        )
        return await h.result(3)

    assert h.run(body).ok
    assert h.transfers.told == {"a": current, "b": None}


def test_missing_output_fails_despite_exit_0(h: Harness) -> None:
    """A declared output the command did not write: exit 0 but a failure reason."""
    m = h.manager()

    async def body() -> AttemptResult:
        m.start(spec(3, "true", outputs=(("out.txt", "out-key"),)))
        return await h.result(3)

    result = h.run(body)
    assert result.exit_code == 0
    assert result.reason == "output 'out.txt' missing" and not result.ok
    assert h.transfers.uploaded == {}


def test_output_symlink_out_of_the_directory_is_missing(h: Harness) -> None:
    """An output that is a symlink to a file outside the attempt dir is never uploaded."""
    m = h.manager()

    async def body() -> AttemptResult:
        m.start(spec(3, "ln", "-s", "/etc/hostname", "out.txt", outputs=(("out.txt", "k"),)))
        return await h.result(3)

    assert h.run(body).reason == "output 'out.txt' missing"
    assert h.transfers.uploaded == {}


def test_output_upload_failure(h: Harness) -> None:
    """An upload that fails fails the attempt, naming the output."""
    h.transfers.broken["out-key"] = DsmlError("no space left", "disk-full")
    m = h.manager()

    async def body() -> AttemptResult:
        m.start(spec(3, "sh", "-c", "echo x > out.txt", outputs=(("out.txt", "out-key"),)))
        return await h.result(3)

    assert h.run(body).reason == "output 'out.txt' upload failed: no space left"


def test_cancel_while_uploading(h: Harness) -> None:
    """Cancelling while outputs upload cancels the uploads; the attempt is 'cancelled'."""
    h.transfers.hanging.add("slow-key")
    m = h.manager()

    async def body() -> AttemptResult:
        m.start(spec(3, "sh", "-c", "echo x > out.txt", outputs=(("out.txt", "slow-key"),)))
        await h.wait_for(lambda: h.transfers.storing == ["slow-key"])
        m.cancel(3)
        return await h.result(3)

    result = h.run(body)
    assert (result.reason, result.exit_code) == ("cancelled", 0)
    assert h.transfers.cancelled == ["slow-key"]


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        (None, "input 'missing' not found"),
        (DsmlError("connection lost", "unavailable"), "input 'missing' failed: connection lost"),
    ],
)
def test_input_failure_fails_without_spawning(
    h: Harness, broken: Exception | None, reason: str
) -> None:
    """An input that cannot be fetched fails the attempt; the command never starts."""
    h.transfers.files["ok"] = b"1"
    if broken is not None:
        h.transfers.broken["missing"] = broken
    m = h.manager()

    async def body() -> AttemptResult:
        m.start(spec(5, "true", inputs=(("ok", "a"), ("missing", "b"))))
        return await h.result(5)

    result = h.run(body)
    assert (result.reason, result.exit_code, result.duration) == (reason, None, 0.0)
    assert h.reactor.spawned == []
    assert m.free_slots() == 2
    assert [p.name for p in h.transfers.released] == ["a", "b"]  # a failed attempt too


def test_inputs_that_collide(h: Harness) -> None:
    """An input whose directory is another input's file fails the attempt, naming it."""
    h.transfers.files.update({"k1": b"1", "k2": b"2"})
    m = h.manager()

    async def body() -> AttemptResult:
        m.start(spec(5, "true", inputs=(("k1", "a"), ("k2", "a/b"))))
        return await h.result(5)

    assert h.run(body).reason.startswith("input 'k2' cannot go to 'a/b': ")
    assert h.reactor.spawned == []


def test_cancel_while_fetching(h: Harness) -> None:
    """Cancelling during staging cancels the transfer; the command never starts."""
    h.transfers.hanging.add("slow")
    m = h.manager()

    async def body() -> AttemptResult:
        m.start(spec(5, "true", inputs=(("slow", "a"),)))
        run = h.work_dir / RUN_DIR
        await h.wait_for(lambda: run.is_dir() and any(run.iterdir()))  # fetching from then on
        m.cancel(5)
        return await h.result(5)

    assert h.run(body).reason == "cancelled"
    assert h.transfers.cancelled == ["slow"]
    assert h.reactor.spawned == []


@pytest.mark.parametrize("command", ["no-such-command-dsml", "./not-here.sh", "/nonexistent/x"])
def test_command_not_found(h: Harness, command: str, launcher: Any) -> None:
    """A command that is not on the task's PATH (or not executable) is reported, not spawned."""
    m = h.manager(launcher=launcher)

    async def body() -> AttemptResult:
        m.start(spec(6, command, "arg"))
        return await h.result(6)

    assert h.run(body).reason == f"command not found: {command}"
    assert h.reactor.spawned == []


def _tool(directory: Path, says: str) -> None:
    """An executable ``tool`` in ``directory`` that prints ``says``."""
    directory.mkdir(parents=True, exist_ok=True)
    tool = directory / "tool"
    tool.write_text(f"#!/bin/sh\necho {says}\n")
    tool.chmod(0o755)


def test_where_a_command_is_is_remembered_briefly(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PATH search is remembered (WHICH_TTL): a program that vanished from where it
    was found is looked for again at once, and one installed earlier in PATH is used
    once the memory has expired."""
    early, late = h.work_dir.parent / "early", h.work_dir.parent / "late"
    _tool(late, "late")
    early.mkdir()
    m = h.manager()
    path = f"{early}:{late}:/usr/bin:/bin"

    async def run_tool(attempt_id: int) -> str:
        m.start(spec(attempt_id, "tool", env=(("PATH", path),)))
        result = await h.result(attempt_id)
        assert result.reason == ""
        return m.logs(attempt_id)[0].read_text().strip()

    async def body() -> list[str]:
        said = [await run_tool(1)]
        _tool(early, "early")  # installed earlier in PATH: not seen while remembered
        said.append(await run_tool(2))
        (late / "tool").unlink()  # the remembered one vanished: searched again at once
        said.append(await run_tool(3))
        _tool(late, "late")
        (early / "tool").unlink()
        monkeypatch.setattr(tasks.launch, "WHICH_TTL", 0.0)  # nothing remembered
        said.append(await run_tool(4))
        return said

    assert h.run(body) == ["late", "late", "early", "late"]


def test_a_relative_path_entry_is_searched_from_the_task_directory(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative PATH entry names a directory in the task's working directory (as
    execvp reads it there, after the chdir), never one in the worker's."""
    worker_cwd = h.work_dir.parent / "worker-cwd"
    _tool(worker_cwd / "wbin", "worker-copy")  # not in the task's directory: never runs
    monkeypatch.chdir(worker_cwd)
    h.transfers.files["tool"] = b"#!/bin/sh\necho task-copy\n"
    fetch = h.transfers.fetch

    def fetch_executable(
        key: str, dest: Path, current: InputVersion | None = None
    ) -> Deferred[None]:
        d = fetch(key, dest, current)
        dest.chmod(0o755)
        return d

    monkeypatch.setattr(h.transfers, "fetch", fetch_executable)
    m = h.manager()

    async def body() -> list[str]:
        said = []
        for attempt_id in (1, 2):  # the second from memory
            m.start(spec(attempt_id, "tool", env=(("PATH", "wbin:bin:/usr/bin:/bin"),),
                         inputs=(("tool", "bin/tool"),)))
            assert (await h.result(attempt_id)).reason == ""
            said.append(m.logs(attempt_id)[0].read_text().strip())
        return said

    assert h.run(body) == ["task-copy", "task-copy"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"command": ()}, "empty command"),
        ({"command": ("",)}, "empty command"),
        ({"inputs": (("k", "../escape"),)}, "input path '../escape'"),
        ({"inputs": (("k", "/etc/passwd"),)}, "input path '/etc/passwd'"),
        ({"inputs": (("k", STDOUT_NAME),)}, "input path"),
        ({"outputs": (("a/../../b", "k"),)}, "output path"),
        ({"slots": 0}, "needs 0 slots"),
        ({"slots": 3}, "needs 3 slots"),
        ({"timeout": 0}, "timeout must be positive"),
        ({"env": (("A=B", "x"),)}, "bad environment variable"),
    ],
)
def test_bad_specs_are_refused(h: Harness, bad: dict[str, Any], message: str) -> None:
    """A spec that can never run is refused by start() and holds no slot."""
    m = h.manager()
    fields: dict[str, Any] = {"command": ("true",)}
    fields.update(bad)
    with pytest.raises(TaskError, match=message) as caught:
        m.start(spec(1, *fields.pop("command"), **fields))
    assert caught.value.code == "bad-task"
    assert m.free_slots() == 2 and m.running() == [] and h.free_seen == []


# --- killing process groups ----------------------------------------------------------------


def test_timeout_kills_the_whole_group(h: Harness, launcher: Any) -> None:
    """timeout=1 on a shell with a background and a foreground sleep: TERM to the group, the
    result says timeout, and no process of the group is left."""
    m = h.manager(launcher=launcher)

    async def body() -> tuple[AttemptResult, int, float]:
        m.start(spec(8, "sh", "-c", "sleep 1000 & sleep 1000", timeout=1))
        await h.wait_for(lambda: m.process_group(8) is not None)
        pgid = m.process_group(8)
        assert pgid is not None
        # sh and its two sleeps, all in the group led by the spawned pid
        await h.wait_for(lambda: len(scan_groups({pgid}).get(pgid, ((),)).pids) == 3)
        assert stat_fields(pgid) == (pgid, pgid)
        started = time.monotonic()
        result = await h.result(8)
        elapsed = time.monotonic() - started
        await h.group_gone(pgid)
        return result, pgid, elapsed

    result, pgid, elapsed = h.run(body)
    assert result.reason == "timeout after 1 s" and result.timed_out
    assert result.signal == signal.SIGTERM and result.exit_code is None
    assert elapsed < 1 + GRACE
    assert 0.9 < result.duration < 1 + GRACE
    assert scan_groups({pgid}) == {}


def test_term_ignored_then_kill_after_grace(h: Harness, launcher: Any) -> None:
    """A group that ignores SIGTERM gets SIGKILL after the grace period; none of it is left."""
    m = h.manager(launcher=launcher)

    async def body() -> tuple[AttemptResult, int, float]:
        m.start(spec(9, "sh", "-c", "trap '' TERM; sleep 1000 & sleep 1000"))
        await h.wait_for(lambda: m.process_group(9) is not None)
        pgid = m.process_group(9)
        assert pgid is not None
        await h.wait_for(lambda: len(scan_groups({pgid}).get(pgid, ((),)).pids) == 3)
        started = time.monotonic()
        m.cancel(9)
        result = await h.result(9)
        elapsed = time.monotonic() - started
        await h.group_gone(pgid)
        return result, pgid, elapsed

    result, pgid, elapsed = h.run(body)
    assert result.reason == "cancelled"
    assert result.signal == signal.SIGKILL
    assert GRACE * 0.9 < elapsed < GRACE + 1
    assert scan_groups({pgid}) == {}


def test_cancel_kills_the_whole_group(h: Harness) -> None:
    """cancel() on a running tree: reason 'cancelled', the group is gone."""
    m = h.manager()

    async def body() -> tuple[AttemptResult, int]:
        m.start(spec(10, "sh", "-c", "sleep 1000 & sleep 1000"))
        await h.wait_for(lambda: m.process_group(10) is not None)
        pgid = m.process_group(10)
        assert pgid is not None
        m.cancel(10)
        m.cancel(10)  # twice is harmless
        m.cancel(12345)  # unknown: ignored
        result = await h.result(10)
        await h.group_gone(pgid)
        return result, pgid

    result, pgid = h.run(body)
    assert result.reason == "cancelled" and result.signal is not None
    assert scan_groups({pgid}) == {}


def test_cancel_right_after_spawn(h: Harness) -> None:
    """Cancelling in the instant after the spawn (maybe before setsid ran) still kills it."""
    m = h.manager()

    async def body() -> AttemptResult:
        m.start(spec(11, "sleep", "1000"))
        await h.wait_for(lambda: bool(h.reactor.spawned), timeout=2)
        m.cancel(11)
        return await h.result(11)

    assert h.run(body).reason == "cancelled"


@pytest.mark.parametrize(
    "script",
    [
        # the child keeps the log pipes open: the attempt must not wait for it
        "sleep 1000 & echo $! > bg.pid",
        # the child let go of the pipes
        "sleep 1000 >/dev/null 2>&1 & echo $! > bg.pid",
    ],
)
def test_background_child_is_killed_when_the_leader_exits(
    h: Harness, script: str, launcher: Any
) -> None:
    """A leader that exits 0 leaving a background child: the child is killed, promptly."""
    m = h.manager(launcher=launcher)

    async def body() -> tuple[AttemptResult, int, float]:
        started = time.monotonic()
        m.start(spec(12, "sh", "-c", script))
        result = await h.result(12)
        elapsed = time.monotonic() - started
        pgid = h.reactor.spawned[0]
        await h.group_gone(pgid)
        return result, pgid, elapsed

    result, pgid, elapsed = h.run(body)
    assert result.reason == "" and result.exit_code == 0
    assert elapsed < 1.5  # well under DRAIN_TIMEOUT: the KILL closed the pipes
    child = int((h.work_dir / "12" / "bg.pid").read_text())
    assert scan_groups({pgid}) == {}
    assert not alive(child)


def test_a_process_that_left_the_group_cannot_hold_the_attempt(
    h: Harness, monkeypatch: pytest.MonkeyPatch, launcher: Any
) -> None:
    """A child that made its own session escapes the group kill (only a cgroup would catch
    it) and keeps the log pipes open: the attempt still ends, DRAIN_TIMEOUT after the
    leader."""
    monkeypatch.setattr(tasks.manager, "DRAIN_TIMEOUT", 0.3)
    m = h.manager(launcher=launcher)

    async def body() -> tuple[AttemptResult, float]:
        started = time.monotonic()
        # the leader exits only once the child has made its own session
        script = (
            "setsid sh -c 'echo $$ > tmp; mv tmp escaped.pid; exec sleep 1000' & "
            "while [ ! -e escaped.pid ]; do sleep 0.01; done"
        )
        m.start(spec(18, "sh", "-c", script))
        result = await h.result(18)
        return result, time.monotonic() - started

    try:
        result, elapsed = h.run(body)
    finally:
        escaped = int((h.work_dir / "18" / "escaped.pid").read_text())
        session = stat_fields(escaped)[1] if alive(escaped) else None
        os.kill(escaped, signal.SIGKILL)
    assert session == escaped  # it did escape: alive, in a session of its own
    assert result.reason == "" and 0.3 <= elapsed < 1.5


def test_stop_kills_everything_and_waits(h: Harness, launcher: Any) -> None:
    """stop(): every group gets TERM then KILL, the Deferred fires once all are reaped, every
    attempt is reported as 'worker stopping', and no new attempt is accepted."""
    m = h.manager(launcher=launcher)

    async def body() -> tuple[list[int], float]:
        m.start(spec(13, "sh", "-c", "sleep 1000 & sleep 1000"))
        m.start(spec(14, "sh", "-c", "trap '' TERM; sleep 1000 & sleep 1000"))
        await h.wait_for(lambda: len(h.reactor.spawned) == 2)
        pgids = list(h.reactor.spawned)
        await h.wait_for(lambda: all(len(u.pids) == 3 for u in scan_groups(set(pgids)).values()))
        started = time.monotonic()
        await m.stop()
        elapsed = time.monotonic() - started
        with pytest.raises(TaskError) as caught:
            m.start(spec(15, "true"))
        assert caught.value.code == "stopping"
        for pgid in pgids:
            await h.group_gone(pgid)
        return pgids, elapsed

    pgids, elapsed = h.run(body)
    assert elapsed < GRACE + 1
    assert {r.attempt_id: r.reason for r in h.results.values()} == {
        13: "worker stopping",
        14: "worker stopping",
    }
    assert h.results[14].signal == signal.SIGKILL
    assert m.running() == [] and m.free_slots() == 2
    assert scan_groups(set(pgids)) == {}


# --- logs, memory, slots, results, cleanup ---------------------------------------------


def test_log_cap_keeps_the_tail(h: Harness, launcher: Any) -> None:
    """A task printing 5x the cap: the log holds a 'dropped' line then the exact tail."""
    cap = 64 * 1024
    lines = 5 * cap // 8
    expected = "".join(f"{i:07d}\n" for i in range(lines)).encode()
    m = h.manager(log_cap=cap, launcher=launcher)
    program = f"import sys; sys.stdout.write(''.join(f'{{i:07d}}\\n' for i in range({lines})))"

    async def body() -> AttemptResult:
        m.start(spec(16, sys.executable, "-c", program))
        return await h.result(16)

    assert h.run(body).reason == ""
    data = m.logs(16)[0].read_bytes()
    header, _, tail = data.partition(b"\n")
    dropped = int(header.removeprefix(b"[dsml: ").removesuffix(b" earlier bytes dropped]"))
    assert header == f"[dsml: {dropped} earlier bytes dropped]".encode()
    assert cap <= len(tail) <= 2 * cap
    assert dropped + len(tail) == len(expected)
    assert tail == expected[-len(tail) :]
    assert not (h.work_dir / "16" / (STDOUT_NAME + ".tmp")).exists()


def test_a_failed_attempt_reports_the_tail_of_its_stderr(
    h: Harness, launcher: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing attempt's result (and its ``task_result`` line) carries the last 10 lines
    of its stderr, within its last 2,048 bytes, as UTF-8 text with control characters but
    newline and tab replaced; a successful one carries none and reads no log for it, even
    when it wrote to stderr; a failure that wrote nothing to stderr carries none."""
    reads: list[Path] = []
    real_tail = tasks.stderr_tail

    def counted(log: Any) -> str:
        reads.append(log.path)
        return real_tail(log)

    monkeypatch.setattr(tasks.attempt, "stderr_tail", counted)
    m = h.manager(launcher=launcher, slots=4)
    twelve = "for i in $(seq 1 12); do echo line$i >&2; done"
    escape = "printf 'tab\\there \\033[31mred\\r\\n' >&2; printf 'caf\\303\\251\\n' >&2"
    long_line = "head -c 5000 /dev/zero | tr '\\0' x >&2; echo >&2; echo last >&2"
    failing = {
        60: f"{twelve}; exit 3",
        61: f"{escape}; exit 4",
        62: f"{long_line}; kill -9 $$",
        64: "echo only-stdout; exit 5",
    }

    async def body() -> tuple[AttemptResult, list[Path], dict[int, AttemptResult]]:
        m.start(spec(63, "sh", "-c", "echo noise >&2; exit 0"))
        ok = await h.result(63)
        read_for_ok = list(reads)
        for aid, script in failing.items():
            m.start(spec(aid, "sh", "-c", script))
        return ok, read_for_ok, {aid: await h.result(aid) for aid in failing}

    ok, read_for_ok, results = h.run(body)
    assert ok.reason == "" and ok.stderr_tail == ""
    assert read_for_ok == []  # a success does not even look at its stderr log

    lines = results[60].stderr_tail
    assert lines == "".join(f"line{i}\n" for i in range(3, 13)), lines
    assert results[61].stderr_tail == "tab\there \ufffd[31mred\ufffd\ncaf\u00e9\n"
    wide = results[62]
    assert wide.signal == 9 and wide.stderr_tail.endswith("x\nlast\n")
    assert len(wide.stderr_tail.encode()) <= 2048
    assert wide.stderr_tail == ("x" * 5000 + "\nlast\n")[-2048:]
    assert results[64].reason == "exit 5" and results[64].stderr_tail == ""
    assert len(reads) == len(failing)
    line = json.loads(runner.result_json(results[60]))
    assert line["stderr_tail"] == lines
    assert "stderr_tail" not in json.loads(runner.result_json(ok))


def test_the_stderr_tail_of_a_capped_log_skips_the_dropped_line(h: Harness) -> None:
    """With a log cap smaller than the tail, the tail is the log's kept bytes, without
    the '[dsml: N earlier bytes dropped]' line the cap wrote (it is not the task's)."""
    m = h.manager(log_cap=16)

    async def body() -> AttemptResult:
        m.start(spec(65, "sh", "-c", "for i in $(seq 1 40); do echo e$i >&2; done; exit 1"))
        return await h.result(65)

    result = h.run(body)
    assert m.logs(65)[1].read_bytes().startswith(b"[dsml: ")
    assert "dsml" not in result.stderr_tail
    assert result.stderr_tail.endswith("e39\ne40\n")
    assert "e40\n" in result.stderr_tail and len(result.stderr_tail) <= 32


def test_peak_memory_is_sampled(h: Harness) -> None:
    """A task holding ~64 MB reports a peak RSS at least that large."""
    m = h.manager(sample_interval=0.1)
    program = "import time; b = b'x' * 64_000_000; time.sleep(0.5)"

    async def body() -> AttemptResult:
        m.start(spec(17, sys.executable, "-c", program))
        return await h.result(17)

    result = h.run(body)
    assert result.reason == ""
    assert 64_000_000 <= result.peak_rss < 1_000_000_000


def test_slots_busy_and_on_change(h: Harness) -> None:
    """start() beyond the free slots raises busy; on_change follows every change of slots."""
    m = h.manager(slots=2)

    async def body() -> None:
        m.start(spec(20, "true"))
        m.start(spec(21, "true"))
        assert m.free_slots() == 0 and sorted(m.running()) == [20, 21]
        with pytest.raises(TaskError) as caught:
            m.start(spec(22, "true"))
        assert caught.value.code == "busy"
        with pytest.raises(TaskError) as caught:
            m.start(spec(20, "true"))
        assert caught.value.code == "duplicate"
        await h.result(20)
        await h.result(21)
        assert m.free_slots() == 2
        m.start(spec(23, "true", slots=2))
        assert m.free_slots() == 0
        await h.result(23)

    h.run(body)
    assert h.free_seen == [1, 0, 1, 2, 0, 2]
    assert m.running() == []


def test_results_wait_for_ack(h: Harness) -> None:
    """Finished results stay listed until acknowledged; a finished id cannot run again."""
    m = h.manager()

    async def body() -> None:
        m.start(spec(30, "sh", "-c", "echo done"))
        m.start(spec(31, "false"))
        await h.result(30)
        await h.result(31)

    h.run(body)
    # Listed in the order they finished, which between two processes is up to the kernel.
    assert sorted((r.attempt_id, r.reason) for r in m.finished_results()) == [
        (30, ""),
        (31, "exit 1"),
    ]
    with pytest.raises(TaskError):
        m.start(spec(30, "true"))
    m.ack(30)
    m.ack(999)  # unknown: ignored
    assert [r.attempt_id for r in m.finished_results()] == [31]
    assert m.logs(30)[0].parent.is_dir()  # acknowledged, but the directory stays a while


def test_every_attempt_gets_a_fresh_directory_never_a_lent_one(h: Harness) -> None:
    """An attempt that writes nothing keeps no directory (its logs read as empty, the
    directory removed); every attempt works in a new one (one was once lent to the next
    attempt: a process left behind then read the next job's input)."""
    m = h.manager()
    cwds = h.work_dir.parent / "cwds"

    async def body() -> None:
        for attempt_id, script in [(50, ""), (51, ""), (52, "touch f")]:
            m.start(spec(attempt_id, "sh", "-c", f"pwd >> {cwds}; {script}"))
            assert (await h.result(attempt_id)).reason == ""
        m.start(spec(53, "sh", "-c", f"pwd >> {cwds}; ls -A | wc -l"))
        await h.result(53)

    h.run(body)
    assert len(set(cwds.read_text().splitlines())) == 4
    assert sorted(p.name for p in h.work_dir.iterdir()) == ["52", "53", RUN_DIR]
    assert (h.work_dir / "52" / "f").exists()
    assert (h.work_dir / "53" / STDOUT_NAME).read_text().strip() == "0"  # it started empty
    assert not m.logs(50)[0].exists()  # it left nothing: its logs read as empty
    assert list((h.work_dir / RUN_DIR).iterdir()) == []


def test_symlinks_a_task_plants_cost_only_its_own_attempt(h: Harness, tmp_path: Path) -> None:
    """A task that replaces its directory by a symlink, and plants symlinks at the next
    names: the next attempts run in fresh directories of their own, none of them in the
    symlinks' target, and nothing is kept of the symlinked one."""
    m = h.manager()
    target = tmp_path / "elsewhere"
    target.mkdir()
    run = h.work_dir / RUN_DIR
    plant = (f"cd ..; for n in 1 2 3 4 5; do ln -s {target} $n; done; "
             f"d=$(basename \"$OLDPWD\"); rm -rf \"$d\"; ln -s {target} \"$d\"")

    async def body() -> list[Any]:
        m.start(spec(60, "sh", "-c", plant))
        results = [await h.result(60)]
        for attempt_id in (61, 62):
            m.start(spec(attempt_id, "sh", "-c", "pwd -P; echo mine > out.txt",
                         outputs=(("out.txt", f"k{attempt_id}"),)))
            results.append(await h.result(attempt_id))
        return results

    results = h.run(body)
    assert [r.reason for r in results[1:]] == ["", ""]
    assert list(target.iterdir()) == []  # nobody ran (or wrote) there
    for attempt_id in (61, 62):
        cwd = (h.work_dir / str(attempt_id) / STDOUT_NAME).read_text().strip()
        assert Path(cwd).parent == run.resolve()
    assert h.transfers.uploaded["k61"] == b"mine\n" and h.transfers.uploaded["k62"] == b"mine\n"
    assert not (h.work_dir / "60").exists()  # the symlinked directory: nothing kept


def test_a_hard_link_or_symlink_is_not_an_output(h: Harness, tmp_path: Path) -> None:
    """An output must be a regular file of its own: a hard link to a file the worker can
    read, or a symlink, is refused and nothing is uploaded."""
    secret = tmp_path / "worker-secret.db"
    secret.write_bytes(b"index")
    m = h.manager()

    async def body() -> list[str]:
        reasons = []
        for attempt_id, how in ((70, "ln"), (71, "ln -s")):
            m.start(spec(attempt_id, "sh", "-c", f"{how} {secret} out.db",
                         outputs=(("out.db", f"stolen{attempt_id}"),)))
            reasons.append((await h.result(attempt_id)).reason)
        return reasons

    reasons = h.run(body)
    assert reasons == ["output 'out.db' a link to another file (not a file of its own)",
                       "output 'out.db' missing"]
    assert not any(k.startswith("stolen") for k in h.transfers.uploaded)


def test_old_attempt_directories_are_removed(h: Harness) -> None:
    """Only the last keep_finished attempt dirs stay, counting ones left by an earlier run."""
    (h.work_dir / "5").mkdir(parents=True)
    (h.work_dir / "notes").mkdir()
    m = h.manager(keep_finished=2)

    async def body() -> None:
        for attempt_id in (40, 41, 42):
            m.start(spec(attempt_id, "sh", "-c", "echo out"))
            await h.result(attempt_id)

    h.run(body)
    assert sorted(p.name for p in h.work_dir.iterdir()) == ["41", "42", "notes", RUN_DIR]
    with pytest.raises(TaskError) as caught:
        m.logs(40)
    assert caught.value.code == "not-found"
    assert [r.attempt_id for r in m.finished_results()] == [40, 41, 42]  # until acknowledged


def test_callbacks_that_raise_do_not_break_the_manager(h: Harness) -> None:
    """An on_result that raises is logged; the slots are freed all the same."""
    m = TaskManager(
        h.reactor,
        slots=1,
        work_dir=h.work_dir,
        transfers=h.transfers,
        on_result=lambda r: (h._on_result(r), 1 / 0),  # type: ignore[func-returns-value]
        grace=GRACE,
    )

    async def body() -> None:
        m.start(spec(50, "true"))
        await h.result(50)

    h.run(body)
    assert m.free_slots() == 1
    assert [r.attempt_id for r in m.finished_results()] == [50]


# --- how tasks are started -----------------------------------------------------------------


def test_default_launcher_is_popen_on_linux() -> None:
    """On Linux with pidfds, tasks start through Popen (one exec) and are watched by pidfd."""
    assert hasattr(os, "pidfd_open")
    assert tasks.default_launcher() is popen_launcher


def test_without_pidfd_the_default_falls_back_to_spawn(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where os.pidfd_open is missing or fails, the default is ``env -C ... setsid`` through
    spawnProcess, and tasks still run."""
    tasks.default_launcher.cache_clear()
    try:
        monkeypatch.delattr(os, "pidfd_open")
        assert tasks.default_launcher() is spawn_launcher()
        tasks.default_launcher.cache_clear()

        def refuse(pid: int, flags: int = 0) -> int:
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(os, "pidfd_open", refuse, raising=False)
        assert tasks.default_launcher() is spawn_launcher()
        m = h.manager()
        assert m.launcher is spawn_launcher()
    finally:
        tasks.default_launcher.cache_clear()

    async def body() -> AttemptResult:
        m.start(spec(1, "sh", "-c", "echo hi; exit 4"))
        return await h.result(1)

    assert h.run(body).reason == "exit 4"
    assert m.logs(1)[0].read_bytes() == b"hi\n"


def test_pidfd_failure_at_spawn_kills_the_process(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the pidfd cannot be had after Popen (e.g. out of descriptors), the process is
    killed and reaped, and the attempt fails: nothing runs unwatched."""
    m = h.manager(launcher=popen_launcher)

    def refuse(pid: int, flags: int = 0) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "pidfd_open", refuse)

    async def body() -> AttemptResult:
        m.start(spec(1, "sleep", "1000"))
        return await h.result(1)

    assert h.run(body).reason == "spawn failed: Too many open files"
    assert m.free_slots() == 2


def test_popen_task_gets_only_its_three_descriptors(h: Harness) -> None:
    """The Popen-started command inherits stdin, stdout and stderr and nothing else of the
    worker (no pidfd, no other pipe, no log file)."""
    m = h.manager(launcher=popen_launcher)

    async def body() -> AttemptResult:
        m.start(spec(2, "sleep", "0.3"))  # its pipes and pidfd are open in the worker
        m.start(spec(1, "sh", "-c", "ls /proc/$$/fd"))
        await h.result(2)
        return await h.result(1)

    result = h.run(body)
    assert result.reason == ""
    assert sorted(m.logs(1)[0].read_text().split()) == ["0", "1", "2"]


def test_a_task_that_removes_or_locks_its_directory_harms_no_other(h: Harness) -> None:
    """A task that deletes its working directory, or makes it unreadable, still gets its
    result, and the next attempt works in a fresh, empty directory of its own."""
    m = h.manager()
    cwds = h.work_dir.parent / "cwds"

    async def body() -> list[str]:
        reasons = []
        for attempt_id, script in [
            (60, "rmdir \"$PWD\""),
            (61, "touch f; chmod 000 \"$PWD\""),
            (62, "ls -A | wc -l"),
        ]:
            m.start(spec(attempt_id, "sh", "-c", f"pwd >> {cwds}; {script}"))
            reasons.append((await h.result(attempt_id)).reason)
        return reasons

    try:
        assert h.run(body) == ["", "", ""]
    finally:
        for p in h.work_dir.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)
    first, second, third = cwds.read_text().splitlines()
    assert len({first, second, third}) == 3
    assert (h.work_dir / "62" / STDOUT_NAME).read_text().strip() == "0"
