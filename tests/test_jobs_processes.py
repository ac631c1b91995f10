"""Jobs on a whole cluster of real processes: a twistd master and twistd workers on
127.0.0.1, driven by the real ``dsml`` command through the master.

Most tests share one cluster (two workers with two slots each) and each leaves it idle; the
tests that kill a process start a cluster of their own.  Every cluster is always stopped,
no cluster process may outlive it, and no process of a task (found by its working
directory, which lies under the cluster's root) may outlive its test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import yaml

from dsml.client import ClusterClient
from dsml.localcluster import LocalCluster
from dsml.testing.poll import poll

pytestmark = pytest.mark.processes

HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 3.0
#: Seconds between SIGTERM and SIGKILL of a task's process group (the worker's default).
GRACE = 5.0
#: Every bounded wait of this file gives up after this many seconds.
PATIENCE = 30.0

T = TypeVar("T")


# -- clusters -------------------------------------------------------------------------


def _make_cluster(root: Path, workers: Sequence[str], slots: int) -> LocalCluster:
    """A cluster with short heartbeats whose workers have ``slots`` slots each.

    LocalCluster builds the ``workers`` mapping itself (and ``extra`` would replace a
    worker's whole entry), so the slots are written into its config file before anything
    starts.
    """
    c = LocalCluster(
        root,
        workers=workers,
        extra={
            "cluster": {
                "heartbeat_interval": HEARTBEAT_INTERVAL,
                "heartbeat_timeout": HEARTBEAT_TIMEOUT,
            }
        },
    )
    config = yaml.safe_load(c.config_path.read_text())
    for name in workers:
        config["workers"][name]["slots"] = slots
    c.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return c


def _start(c: LocalCluster) -> None:
    """The master, then the workers together; until every worker is alive (``nodes``)."""
    c.start_all()


def _shutdown(c: LocalCluster) -> None:
    """Stop every process of ``c``; fail if one outlived it or a task process was left."""
    try:
        c.stop()
    finally:
        leftovers = _task_processes(c.root)
        for p in leftovers:  # started (indirectly) by this test: never leak them
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in c.procs.values():
        assert proc.poll() is not None, "a process outlived its test"
    assert not leftovers, f"task processes outlived their cluster: {leftovers}"


@pytest.fixture
def new_cluster(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """Make and start a cluster of one's own; every one made is always stopped."""
    made: list[LocalCluster] = []

    def make(workers: Sequence[str] = ("w1", "w2"), slots: int = 2) -> LocalCluster:
        c = _make_cluster(tmp_path / f"cluster{len(made)}", workers, slots)
        made.append(c)
        _start(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            _shutdown(c)


@pytest.fixture(scope="module")
def _shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = _make_cluster(tmp_path_factory.mktemp("jobs") / "cluster", ("w1", "w2"), 2)
    try:
        _start(c)
        yield c
    finally:
        _shutdown(c)


@pytest.fixture
def cluster(_shared_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The shared cluster (two workers, two slots each); the test must leave it idle:
    afterwards no job may be unfinished and no task process may be left."""
    c = _shared_cluster
    for name, proc in c.procs.items():
        assert proc.poll() is None, f"{name} of the shared cluster is down:\n{c.tail(name)}"
    yield c
    try:
        _poll(lambda: True if not _task_processes(c.root) else None,
              "the test's task processes to end", timeout=GRACE + 5)
    finally:
        for p in _task_processes(c.root):
            os.kill(p.pid, signal.SIGKILL)
    unfinished = [j for j in _jobs(c) if j["state"] not in ("succeeded", "failed", "cancelled")]
    for j in unfinished:
        c.cli("cancel", j["id"], check=False)
    assert not unfinished, f"the test left jobs unfinished: {unfinished}"


# -- helpers --------------------------------------------------------------------------


def _poll(fn: Callable[[], T | None], what: str, timeout: float = PATIENCE) -> T:
    """:func:`dsml.testing.poll.poll`, with this file's patience."""
    return poll(fn, what, timeout)


def submit(c: LocalCluster, *args: str) -> str:
    """``dsml submit ARGS``; the job id it prints."""
    out = c.cli("submit", *args).stdout.decode().strip()
    assert re.fullmatch(r"j[0-9]+", out), out
    return out


def wait(
    c: LocalCluster, job: str, timeout: float = PATIENCE
) -> subprocess.CompletedProcess[bytes]:
    """``dsml wait JOB --timeout N``, which must have seen the job end."""
    r = c.cli("wait", job, "--timeout", f"{timeout:g}", check=False)
    line = r.stderr.decode().strip()
    assert re.match(rf"job {job}: (succeeded|failed|cancelled)\b", line), (job, line)
    return r


def refused(c: LocalCluster, *args: str) -> str:
    """Run a dsml command that must fail cleanly: non-zero, one line on stderr, no traceback;
    return that line."""
    r = c.cli(*args, check=False)
    err = r.stderr.decode()
    assert r.returncode != 0, (args, r.stdout, err)
    assert "Traceback" not in err, (args, err)
    assert len(err.strip().splitlines()) == 1, (args, err)
    assert r.stdout == b"", (args, r.stdout)
    return err.strip()


@attrs.frozen
class Attempt:
    id: int  # the master's attempt id
    number: int  # 1, 2, ... within its task
    worker: str
    state: str
    how: str  # "exit N", "signal N" or "-"
    reason: str


@attrs.frozen
class Task:
    index: int
    state: str
    reason: str
    attempts: tuple[Attempt, ...]


@attrs.frozen
class Status:
    job: str
    state: str
    reason: str
    done: int
    total: int
    tasks: tuple[Task, ...]


def status(c: LocalCluster, job: str) -> Status:
    """``dsml status --json JOB``, read into the test's records; the text form must agree
    on the job line and show every attempt."""
    r = c.cli("status", "--json", job, check=False)
    j = json.loads(r.stdout)
    assert r.returncode == (1 if j["state"] == "failed" else 0), (r.returncode, j["state"])
    # The text form, read a moment later: the job may have moved on since (its state, new
    # attempts), but every attempt seen above is still there, on the same worker.
    text = c.cli("status", job, check=False).stdout.decode()
    assert text.startswith(f"job {j['id']} {j['name']!r}: "), text
    tasks = []
    for t in j["tasks"]:
        attempts = []
        for a in t["attempts"]:
            how = (f"exit {a['exit_code']}" if a["exit_code"] is not None
                   else f"signal {a['signal']}" if a["signal"] is not None else "-")
            attempts.append(
                Attempt(a["id"], a["number"], a["worker"], a["state"], how, a["reason"])
            )
            assert f"    attempt {a['number']} on {a['worker']}: " in text, text
        tasks.append(Task(t["index"], t["state"], t["reason"], tuple(attempts)))
    return Status(j["id"], j["state"], j["reason"], j["done"], j["total"], tuple(tasks))


def _client(c: LocalCluster) -> ClusterClient:
    host, port = c.address("master")
    return ClusterClient(host, port, c.token)


def _jobs(c: LocalCluster) -> list[dict[str, Any]]:
    with _client(c) as client:
        return client.jobs(1000)


def _job_json(c: LocalCluster, job: str) -> dict[str, Any]:
    """The job as the master's JSON (for the exact times ``dsml status`` rounds away)."""
    with _client(c) as client:
        return client.job_status(job)


@attrs.frozen
class Proc:
    pid: int
    cmdline: str
    job: str
    attempt: str
    cwd: str


def _task_processes(root: Path) -> list[Proc]:
    """Live processes whose working directory is an attempt directory of a worker under
    ``root`` (``<data_dir>/tasks/run/<n>`` while it runs, ``<data_dir>/tasks/<attempt>``
    once kept), with the job and attempt of their environment.  (The cluster's own
    processes run in ``root`` itself.)"""
    task_dir = re.compile(
        re.escape(str(Path(root).resolve())) + r"/[^/]+/tasks/(run/)?-?[0-9]+(/.*)?"
    )
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")  # fails for zombies and other users
            if not task_dir.fullmatch(cwd):
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(
                    item.partition(b"=")[::2] for item in f.read().split(b"\0") if b"=" in item
                )
        except OSError:
            continue
        if not argv[0]:
            continue  # a zombie
        found.append(
            Proc(
                int(entry),
                " ".join(a.decode(errors="replace") for a in argv if a),
                env.get(b"DSML_JOB_ID", b"").decode(),
                env.get(b"DSML_ATTEMPT_ID", b"").decode(),
                cwd,
            )
        )
    return found


def _sleepers(c: LocalCluster, job: str) -> list[Proc]:
    """The ``sleep 1000`` processes of ``job`` on ``c``."""
    return [p for p in _task_processes(c.root) if p.job == job and p.cmdline == "sleep 1000"]


def _download(c: LocalCluster, key: str) -> bytes:
    return c.cli("download", key, "-").stdout


# -- 1. many tasks ----------------------------------------------------------------------


def test_array_of_200_tasks_all_succeed_with_outputs(cluster: LocalCluster) -> None:
    """200 short tasks (one ``--array 200`` job) over 2 workers with 2 slots each: each
    writes a file derived from ``$DSML_TASK_INDEX``, declared ``--output
    out.txt:results/{index}.txt``.  ``dsml wait`` exits 0, every task succeeded at its
    first attempt, both workers ran some, ``dsml ls results/`` lists exactly the 200 keys
    and a few of them hold what their task wrote."""
    t0 = time.monotonic()
    job = submit(
        cluster, "--name", "squares", "--array", "200", "--output", "out.txt:results/{index}.txt",
        "--", "sh", "-c", 'echo "task $DSML_TASK_INDEX: $((DSML_TASK_INDEX * DSML_TASK_INDEX))"'
        " > out.txt",
    )
    r = wait(cluster, job, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    st = status(cluster, job)
    assert (st.state, st.done, st.total) == ("succeeded", 200, 200)
    assert [t.index for t in st.tasks] == list(range(200))
    for t in st.tasks:
        assert t.state == "succeeded" and [a.state for a in t.attempts] == ["succeeded"], t
        assert t.attempts[0].how == "exit 0", t
    assert {a.worker for t in st.tasks for a in t.attempts} == {"w1", "w2"}

    keys = cluster.cli("ls", "results/").stdout.decode().split()
    assert sorted(keys) == sorted(f"results/{i}.txt" for i in range(200))
    for i in (0, 1, 57, 123, 199):
        assert _download(cluster, f"results/{i}.txt") == f"task {i}: {i * i}\n".encode()
    print(f"\n200 tasks submitted, run and stored in {elapsed:.1f} s")


# -- 2. a worker dies ---------------------------------------------------------------------


def test_task_of_a_worker_killed_9_completes_on_the_other(
    new_cluster: Callable[..., LocalCluster], tmp_path: Path,
) -> None:
    """kill -9 of the worker running a task (seen running there, its process up): the
    task is completed by the other worker.  ``dsml status`` shows a ``lost`` attempt on
    the killed worker and a ``succeeded`` one on the other, exactly one succeeded; the
    job succeeds and its output is stored."""
    c = new_cluster(slots=1)
    go = tmp_path / "go"  # the task ends once its first worker is killed
    job = submit(
        c, "--output", "out.txt:killed/out.txt", "--",
        "sh", "-c", f"while [ ! -e {go} ]; do sleep 0.05; done; echo done > out.txt",
    )

    def running_on() -> Attempt | None:
        attempts = status(c, job).tasks[0].attempts
        return attempts[-1] if attempts and attempts[-1].state == "running" else None

    first = _poll(running_on, "the task to run on a worker")
    victim = first.worker
    _poll(lambda: [p for p in _task_processes(c.root) if p.attempt == str(first.id)] or None,
          "the task's process to start")
    killed_at = time.monotonic()
    c.kill(victim, signal.SIGKILL)
    go.touch()

    r = wait(c, job)
    took = time.monotonic() - killed_at
    assert r.returncode == 0, r.stderr
    st = status(c, job)
    assert st.state == "succeeded"
    attempts = st.tasks[0].attempts
    other = ({"w1", "w2"} - {victim}).pop()
    assert [(a.id, a.worker, a.state) for a in attempts[:1]] == [(first.id, victim, "lost")]
    assert "worker died" in attempts[0].reason, attempts[0]
    assert [(a.worker, a.state) for a in attempts[1:]] == [(other, "succeeded")]
    assert sum(a.state == "succeeded" for a in attempts) == 1
    assert _download(c, "killed/out.txt") == b"done\n"
    print(f"\n{victim} killed; task done on {other} {took:.1f} s later "
          f"(heartbeat timeout {HEARTBEAT_TIMEOUT:g} s)")


def test_task_of_a_worker_killed_9_does_not_outlive_its_restart(
    new_cluster: Callable[..., LocalCluster],
) -> None:
    """kill -9 of a worker running ``sleep 1000`` (one attempt allowed), then the worker
    restarts: the attempt is lost, the job fails, and the orphaned ``sleep 1000`` is
    gone within the grace period after the restart.  (Else a killed worker's tasks run on
    forever, twice once their task is retried elsewhere.)"""
    c = new_cluster(workers=("w1",), slots=1)
    job = submit(c, "--max-attempts", "1", "--", "sh", "-c", "sleep 1000 & sleep 1000")
    _poll(lambda: True if len(_sleepers(c, job)) == 2 else None, "the task's two sleeps")
    try:
        c.kill("w1", signal.SIGKILL)
        c.start("w1")
        r = wait(c, job)
        assert r.returncode == 1
        st = status(c, job)
        assert st.state == "failed" and st.tasks[0].attempts[0].state == "lost", st
        _poll(lambda: True if not _sleepers(c, job) else None,
              "the orphaned sleeps of the killed worker to be killed", timeout=GRACE + 1)
    finally:
        for p in _task_processes(c.root):  # the orphans, if the worker did not kill them
            os.kill(p.pid, signal.SIGKILL)


# -- 3, 4. timeouts and cancelling leave no process behind ---------------------------------


def test_timeout_fails_job_and_kills_every_process(cluster: LocalCluster) -> None:
    """``--timeout 2 --max-attempts 1`` of ``sh -c 'sleep 1000 & sleep 1000'``: both
    sleeps run (found in /proc with the attempt's ``DSML_ATTEMPT_ID``), the job fails with
    a timeout reason, the attempt's state is ``timeout``, and no process of it remains
    within the grace period (plus a bound) after the timeout."""
    job = submit(cluster, "--timeout", "2", "--max-attempts", "1", "--",
                 "sh", "-c", "sleep 1000 & sleep 1000")
    procs = _poll(lambda: s if len(s := _sleepers(cluster, job)) == 2 else None,
                  "the task's two sleeps")
    assert all(p.attempt.isdigit() for p in procs), procs
    t0 = time.monotonic()
    r = wait(cluster, job, timeout=2 + GRACE + 10)
    assert r.returncode == 1
    st = status(cluster, job)
    assert st.state == "failed" and "timeout" in st.reason, st
    (attempt,) = st.tasks[0].attempts
    assert attempt.state == "timeout" and "timeout" in attempt.reason, attempt
    _poll(lambda: True if not _sleepers(cluster, job) else None,
          "no sleep of the timed-out task to remain", timeout=GRACE + 3)
    print(f"\ntimed out and cleaned up {time.monotonic() - t0:.1f} s after the sleeps started")


def test_cancel_stops_every_process_and_wait_fails(cluster: LocalCluster) -> None:
    """``dsml cancel`` of a running ``sh -c 'sleep 1000 & sleep 1000'``: the job and its
    attempt are ``cancelled``, no process of it remains within the grace period (plus a
    bound), and ``dsml wait`` exits non-zero."""
    job = submit(cluster, "--", "sh", "-c", "sleep 1000 & sleep 1000")
    _poll(lambda: True if len(_sleepers(cluster, job)) == 2 else None, "the task's two sleeps")
    r = cluster.cli("cancel", job)
    assert f"cancelled {job} (1 running attempts stopped)" in r.stderr.decode(), r.stderr
    t0 = time.monotonic()
    _poll(lambda: True if not _sleepers(cluster, job) else None,
          "no sleep of the cancelled task to remain", timeout=GRACE + 3)
    gone = time.monotonic() - t0
    w = wait(cluster, job)
    assert w.returncode != 0
    assert w.stderr.decode().startswith(f"job {job}: cancelled"), w.stderr
    st = status(cluster, job)
    assert st.state == "cancelled", st
    assert [a.state for a in st.tasks[0].attempts] == ["cancelled"], st
    print(f"\ncancelled task's processes gone {gone:.1f} s after the cancel")


# -- 5. the master dies ---------------------------------------------------------------------


def _one_success_each(st: Status) -> None:
    for t in st.tasks:
        assert t.state == "succeeded", t
        assert sum(a.state == "succeeded" for a in t.attempts) == 1, t


def test_master_killed_9_while_tasks_run(new_cluster: Callable[..., LocalCluster]) -> None:
    """kill -9 of the master while an array of 8 one-second tasks runs on 2 workers of one
    slot each, a second job being submitted (and acknowledged) just before the kill; the
    master restarts.  Both jobs succeed, every task has exactly one succeeded attempt and
    no lost one (no worker died), and every output is stored: nothing acknowledged is
    lost."""
    c = new_cluster(slots=1)
    sweep = submit(c, "--array", "8", "--output", "out.txt:sweep/{index}.txt", "--",
                   "sh", "-c", 'sleep 1; echo "task $DSML_TASK_INDEX" > out.txt')
    _poll(lambda: True if sum(t.state == "running" for t in status(c, sweep).tasks) == 2
          else None, "two tasks to run")
    late = submit(c, "--name", "late", "--output", "late.txt:late.txt", "--",
                  "sh", "-c", "echo late > late.txt")
    killed_at = time.monotonic()
    c.kill("master", signal.SIGKILL)
    c.start("master")

    r = wait(c, sweep)
    assert r.returncode == 0, r.stderr
    assert wait(c, late).returncode == 0
    took = time.monotonic() - killed_at
    st = status(c, sweep)
    assert (st.state, st.done, st.total) == ("succeeded", 8, 8)
    _one_success_each(st)
    _one_success_each(status(c, late))
    # No worker died: no attempt is lost (one that ended during the outage keeps its result).
    assert not [a for t in st.tasks for a in t.attempts if a.state == "lost"], st
    for i in range(8):
        assert _download(c, f"sweep/{i}.txt") == f"task {i}\n".encode()
    assert _download(c, "late.txt") == b"late\n"
    print(f"\nboth jobs done {took:.1f} s after the master's kill -9")


def test_result_of_an_attempt_ended_while_the_master_was_down_is_kept(
    new_cluster: Callable[..., LocalCluster],
) -> None:
    """A task that ends while the master is down (kill -9, restarted after the task ended)
    keeps its result: its attempt succeeds, it is not ``lost`` and not run a second time
    (the JobManager's docstring: results that arrived while the master was down are
    committed when the worker reconciles)."""
    c = new_cluster(workers=("w1",), slots=1)
    job = submit(c, "--", "sh", "-c", "sleep 1")
    first = _poll(lambda: a[0] if (a := status(c, job).tasks[0].attempts) else None,
                  "the task to run")
    c.kill("master", signal.SIGKILL)
    # Its process gone (the worker notices within milliseconds; the master's restart
    # below takes far longer): the attempt ended while the master was down.
    _poll(lambda: None if any(p.attempt == str(first.id) for p in _task_processes(c.root))
          else True, "the attempt's process to end on w1")
    c.start("master")
    assert wait(c, job).returncode == 0
    attempts = status(c, job).tasks[0].attempts
    assert [(a.id, a.state) for a in attempts] == [(first.id, "succeeded")], attempts


def test_output_upload_survives_a_master_restart(
    new_cluster: Callable[..., LocalCluster], tmp_path: Path,
) -> None:
    """A task (one attempt allowed) whose command ends while the master is down, with an
    output to upload: once the master is back the output is stored and the job succeeds
    (a master restart is not the task's failure)."""
    c = new_cluster(workers=("w1",), slots=1)
    go = tmp_path / "go"  # the task ends once the master is down
    job = submit(c, "--max-attempts", "1", "--output", "out.txt:outage/out.txt", "--",
                 "sh", "-c", f"while [ ! -e {go} ]; do sleep 0.05; done; echo ok > out.txt")
    first = _poll(lambda: a[0] if (a := status(c, job).tasks[0].attempts) else None,
                  "the task to run")
    _poll(lambda: True if _task_processes(c.root) else None, "the task's process to start")
    c.kill("master", signal.SIGKILL)
    go.touch()
    exited = _poll(lambda: time.monotonic() if not _task_processes(c.root) else None,
                   "the task's process to end")
    # Its upload is tried now: give it the time to fail, or to be waiting for the master.
    _poll(lambda: True if f"attempt {first.id} ended" in c.tail("w1", 200)
          or time.monotonic() > exited + 1 else None, "the upload to be tried")
    c.start("master")
    r = wait(c, job)
    st = status(c, job)
    assert r.returncode == 0, st
    assert _download(c, "outage/out.txt") == b"ok\n"


def test_clean_master_stop_logs_no_traceback(new_cluster: Callable[..., LocalCluster]) -> None:
    """SIGTERM to the master while a worker is connected (what LocalCluster.stop and an
    operator's ``kill`` do): the master shuts down with no traceback in its log."""
    c = new_cluster(workers=("w1",), slots=1)
    c.kill("master", signal.SIGTERM)
    log = c.log_path("master").read_text(errors="replace")
    assert "Server Shut Down." in log
    bad = [line for line in log.splitlines() if "Traceback" in line or "#critical" in line]
    assert not bad, "\n".join(bad) + "\n" + c.tail("master", 40)


# -- 6. logs --------------------------------------------------------------------------------


def test_logs_of_a_failing_task(cluster: LocalCluster) -> None:
    """A task that writes to stderr and exits 3, retried on exit (``--retry-on exit``),
    fails 3 times (max_attempts' default): ``dsml status`` shows 3 failed attempts with
    exit 3; ``dsml logs`` shows its stderr (on stderr), and so does ``--stderr`` while
    ``--stdout`` shows its stdout only."""
    job = submit(cluster, "--retry-on", "exit", "--",
                 "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3")
    assert wait(cluster, job).returncode == 1
    st = status(cluster, job)
    assert st.state == "failed" and "exit 3" in st.reason, st
    (task,) = st.tasks
    assert task.state == "failed" and "exit 3" in task.reason, task
    assert [(a.state, a.how) for a in task.attempts] == [("failed", "exit 3")] * 3, task
    text = cluster.cli("status", job, check=False).stdout.decode()
    assert text.count(": failed, exit 3,") == 3, text

    both = cluster.cli("logs", job)
    assert (both.stdout, both.stderr) == (b"to-stdout\n", b"to-stderr\n")
    err = cluster.cli("logs", job, "--stderr")
    assert (err.stdout, err.stderr) == (b"", b"to-stderr\n")
    out = cluster.cli("logs", job, "--stdout")
    assert (out.stdout, out.stderr) == (b"to-stdout\n", b"")
    first = cluster.cli("logs", job, "--attempt", str(task.attempts[0].number), "--stderr")
    assert first.stderr == b"to-stderr\n"
    assert "no task 5" in refused(cluster, "logs", job, "--task", "5")


def test_status_shows_the_stderr_tail_of_a_failed_attempt(cluster: LocalCluster) -> None:
    """A real task that writes two lines to stderr and exits 3 (one attempt allowed): the
    master's status JSON shows its attempt as number 1, exit code 3, with the tail of its
    stderr as the worker read it from the log; a task that succeeds shows none."""
    job = submit(cluster, "--max-attempts", "1", "--", "sh", "-c",
                 "echo first >&2; echo boom >&2; exit 3")
    fine = submit(cluster, "--", "sh", "-c", "echo just a warning >&2")
    assert wait(cluster, job).returncode == 1
    assert wait(cluster, fine).returncode == 0
    (task,) = _job_json(cluster, job)["tasks"]
    (attempt,) = task["attempts"]
    assert (attempt["number"], attempt["state"], attempt["exit_code"]) == (1, "failed", 3)
    assert attempt["stderr_tail"].endswith("boom\n"), attempt
    assert attempt["stderr_tail"] == "first\nboom\n", attempt
    assert task["waiting_for"] == ""
    (ok,) = _job_json(cluster, fine)["tasks"][0]["attempts"]
    assert (ok["number"], ok["state"], ok["stderr_tail"]) == (1, "succeeded", "")


# -- 7. bad input ---------------------------------------------------------------------------


BAD_SUBMISSIONS = {
    "empty command": (("--",), "nothing to run"),
    "no command at all": ((), "nothing to run"),
    "unknown --after": (("--after", "j999", "--", "true"), "j999"),
    "--after not a job id": (("--after", "nonsense", "--", "true"), "nonsense"),
    "--slots 0": (("--slots", "0", "--", "true"), "slots"),
    "--slots 100000": (("--slots", "100000", "--", "true"), "slots"),
    "--timeout -1": (("--timeout", "-1", "--", "true"), "timeout"),
    "--timeout 0": (("--timeout", "0", "--", "true"), "timeout"),
    "--timeout nan": (("--timeout", "nan", "--", "true"), "timeout"),
    "--max-attempts 0": (("--max-attempts", "0", "--", "true"), "max_attempts"),
    "--max-attempts 1000": (("--max-attempts", "1000", "--", "true"), "max_attempts"),
    "--array 0": (("--array", "0", "--", "true"), "--array"),
    "--array -3": (("--array", "-3", "--", "true"), "--array"),
    "--env without =": (("--env", "NOEQUALS", "--", "true"), "K=V"),
    "--env bad name": (("--env", "1X=2", "--", "true"), "environment name"),
    "--output escaping": (("--output", "../x:k", "--", "true"), ".."),
    "--input absolute": (("--input", "k:/etc/passwd", "--", "true"), "absolute"),
}

BAD_FILES = {
    "not YAML": ("tasks: [unclosed\n  - {", "not valid YAML"),
    "no tasks": ("name: nothing\n", "tasks: must be a non-empty list"),
    "empty tasks": ("tasks: []\n", "tasks: must be a non-empty list"),
    "a list": ("- echo hi\n", "a job file is a mapping with a list 'tasks'"),
    "task without command": ("tasks:\n  - {slots: 1}\n", "tasks[0].command: missing"),
    "empty command": ("tasks:\n  - ''\n", "tasks[0].command: is empty"),
}


def test_bad_submissions_are_refused_at_once(cluster: LocalCluster, tmp_path: Path) -> None:
    """Each bad submission (empty command, unknown ``--after``, absurd slots, timeouts,
    attempts or array sizes, a bad ``--env``, paths escaping the task directory, job files
    that are not YAML or have no tasks) is refused by ``dsml submit`` with a one-line error
    naming the problem, a non-zero exit and no traceback, and creates no job."""
    before = [j["id"] for j in _jobs(cluster)]
    cases = {what: (args, words) for what, (args, words) in BAD_SUBMISSIONS.items()}
    for i, (what, (text, words)) in enumerate(BAD_FILES.items()):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text)
        cases[f"file {what}"] = (("-f", str(path)), words)
    cases["missing file"] = (("-f", str(tmp_path / "missing.yaml")), "missing.yaml")
    # Three dsml commands at a time: each is a Python start-up.
    with ThreadPoolExecutor(3) as pool:
        lines = dict(zip(cases, pool.map(lambda a: refused(cluster, "submit", *a[0]),
                                         cases.values()), strict=True))
    problems = [f"{what}: {lines[what]!r} does not mention {words!r}"
                for what, (_, words) in cases.items() if words not in lines[what]]
    assert not problems, "\n".join(problems)
    assert [j["id"] for j in _jobs(cluster)] == before, "a refused submission made a job"


def test_tasks_that_cannot_run_fail_with_a_reason(cluster: LocalCluster) -> None:
    """A missing input key is refused at submit.  A task whose input is still missing
    when it runs (its job comes after another, which could have written it: not checked
    at submit), and one whose command is not found, each end (no stuck job): the job
    fails, its reason names the missing key or command.  An input not staged is retried
    (cause staging: 3 attempts by default); a command not found is not (cause spawn: a
    retry cannot mend it)."""
    r = cluster.cli("submit", "--input", "no/such/key.txt:in.txt", "--", "cat", "in.txt",
                    check=False)
    assert r.returncode != 0 and "input 'no/such/key.txt' is not stored" in r.stderr.decode()
    first = submit(cluster, "--", "true")
    missing_input = submit(cluster, "--after", first, "--input", "no/such/key.txt:in.txt",
                           "--", "cat", "in.txt")
    missing_command = submit(cluster, "--", "no-such-command-dsml", "arg")
    for job, words, attempts in (
        (missing_input, "'no/such/key.txt' not found", 3),
        (missing_command, "command not found: no-such-command-dsml", 1),
    ):
        assert wait(cluster, job).returncode == 1
        st = status(cluster, job)
        assert st.state == "failed" and words in st.reason, st
        (task,) = st.tasks
        assert task.state == "failed" and words in task.reason, task
        assert [a.state for a in task.attempts] == ["failed"] * attempts, task
        assert all(words in a.reason for a in task.attempts), task


def test_task_wider_than_every_worker_does_not_wait_forever(cluster: LocalCluster) -> None:
    """A task asking for more slots (64 CPUs) than any worker has (2) can never run.
    Right behaviour: refused at submit (exit non-zero, a message about CPUs), or failed
    at once with a reason about them; never left queued with nothing said."""
    r = cluster.cli("submit", "--slots", "64", "--", "true", check=False)
    if r.returncode != 0:
        assert "needs 64 CPUs" in r.stderr.decode() and "Traceback" not in r.stderr.decode()
        return
    job = r.stdout.decode().strip()
    try:
        w = wait(cluster, job, timeout=3)
        st = status(cluster, job)
        assert w.returncode == 1 and st.state == "failed" and "CPUs" in st.reason, st
    finally:
        cluster.cli("cancel", job, check=False)


# -- 8. job files -----------------------------------------------------------------------------


def test_job_file_with_three_tasks(cluster: LocalCluster, tmp_path: Path) -> None:
    """``dsml submit -f job.yaml`` listing 3 tasks with different commands (a string and
    lists), inputs, outputs and environment: the job takes its name from the file, all
    three succeed and every output is stored with the expected content."""
    (tmp_path / "a.txt").write_text("hello jobs\n")
    (tmp_path / "b.bin").write_bytes(bytes(range(256)) * 40)
    cluster.cli("upload", str(tmp_path / "a.txt"), "f8/in/a.txt")
    cluster.cli("upload", str(tmp_path / "b.bin"), "f8/in/b.bin")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({
        "name": "three",
        "tasks": [
            {
                "command": "sh -c 'tr a-z A-Z < in.txt > upper.txt'",
                "inputs": [["f8/in/a.txt", "in.txt"]],
                "outputs": [["upper.txt", "f8/out/upper.txt"]],
            },
            {
                "command": ["sh", "-c", "mkdir -p sub/dir && wc -c < data/b.bin | tr -d ' '"
                            " > sub/dir/count.txt"],
                "inputs": [["f8/in/b.bin", "data/b.bin"]],
                "outputs": [["sub/dir/count.txt", "f8/out/count.txt"]],
            },
            {
                "command": ["sh", "-c",
                            'cat x.txt y.txt > both.txt && echo "$GREETING $DSML_TASK_INDEX"'
                            " > greeting.txt"],
                "env": {"GREETING": "hi from"},
                "inputs": [["f8/in/a.txt", "x.txt"], ["f8/in/a.txt", "y.txt"]],
                "outputs": [["both.txt", "f8/out/both.txt"],
                            ["greeting.txt", "f8/out/greeting.txt"]],
                "max_attempts": 1,
            },
        ],
    }))
    job = submit(cluster, "-f", str(job_file))
    assert wait(cluster, job).returncode == 0
    assert _job_json(cluster, job)["name"] == "three"
    st = status(cluster, job)
    assert (st.state, st.done, st.total) == ("succeeded", 3, 3), st
    _one_success_each(st)
    assert sorted(cluster.cli("ls", "f8/out/").stdout.decode().split()) == [
        "f8/out/both.txt", "f8/out/count.txt", "f8/out/greeting.txt", "f8/out/upper.txt",
    ]
    assert _download(cluster, "f8/out/upper.txt") == b"HELLO JOBS\n"
    assert _download(cluster, "f8/out/count.txt") == b"10240\n"
    assert _download(cluster, "f8/out/both.txt") == b"hello jobs\n" * 2
    assert _download(cluster, "f8/out/greeting.txt") == b"hi from 2\n"


def test_an_input_the_worker_holds_is_copied_from_its_own_store(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """Both workers hold every key here (replication 2): the worker running the task
    copies the input from its own store (its log says so) and the task reads the right
    bytes; what the task then writes over its copy never reaches the stored object (as
    the task user, nobody on a root worker, the write through the link is refused: it
    replaces the file instead)."""
    data = os.urandom(3 * 1024 * 1024 + 7)
    (tmp_path / "in.bin").write_bytes(data)
    cluster.cli("upload", str(tmp_path / "in.bin"), "local/in.bin")
    job = submit(
        cluster, "--input", "local/in.bin:in.bin", "--output", "copy.bin:local/copy.bin",
        "--", "sh", "-c", "cp in.bin copy.bin && { (echo overwritten > in.bin) 2>/dev/null "
        "|| { rm in.bin && echo overwritten > in.bin; }; }",
    )
    assert wait(cluster, job).returncode == 0
    [task] = status(cluster, job).tasks
    worker = task.attempts[-1].worker
    assert _download(cluster, "local/copy.bin") == data
    assert _download(cluster, "local/in.bin") == data
    _poll(
        lambda: True if "input local/in.bin staged from the local store"
        in cluster.log_path(worker).read_text(errors="replace") else None,
        f"{worker}'s log line of the local copy",
    )


# -- 9. dependencies --------------------------------------------------------------------------


def test_after_runs_only_after_success_and_fails_after_failure(cluster: LocalCluster) -> None:
    """``--after``: job B (after A) waits while A runs and its task starts only after A's
    end; a job after a failing job fails, with a reason naming the dependency, without
    running; so does one submitted after that job already failed."""
    a = submit(cluster, "--", "sh", "-c", "sleep 1.5")
    b = submit(cluster, "--after", a, "--output", "b.txt:after/b.txt", "--",
               "sh", "-c", "echo b > b.txt")
    _poll(lambda: True if status(cluster, a).tasks[0].attempts else None, "A to start")
    st_b = status(cluster, b)
    if status(cluster, a).state == "running":  # read after B's: B was read while A ran
        assert st_b.state == "queued" and st_b.tasks[0].state == "waiting", st_b
    assert wait(cluster, b).returncode == 0
    ja, jb = _job_json(cluster, a), _job_json(cluster, b)
    assert ja["state"] == "succeeded" and jb["state"] == "succeeded"
    a_end = ja["tasks"][0]["attempts"][-1]["ended"]
    (b_attempt,) = jb["tasks"][0]["attempts"]
    assert b_attempt["started"] >= ja["finished"] >= a_end, (ja, jb)
    assert _download(cluster, "after/b.txt") == b"b\n"

    c = submit(cluster, "--max-attempts", "1", "--", "sh", "-c", "sleep 0.5; exit 1")
    d = submit(cluster, "--after", c, "--", "true")
    assert wait(cluster, d).returncode == 1
    st_d = status(cluster, d)
    assert st_d.state == "failed" and c in st_d.reason and "failed" in st_d.reason, st_d
    assert st_d.tasks[0].state == "cancelled" and not st_d.tasks[0].attempts, st_d
    assert status(cluster, c).state == "failed"
    e = submit(cluster, "--after", c, "--", "true")
    assert wait(cluster, e).returncode == 1
    st_e = status(cluster, e)
    assert st_e.state == "failed" and c in st_e.reason and not st_e.tasks[0].attempts, st_e
