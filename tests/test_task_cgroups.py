"""A cgroup per attempt (issue #13): a task's whole process tree ends with it.

Unit tests of :mod:`dsml.worker.tasks.cgroups` on fake /proc files, then the real thing:
a :class:`TaskManager` (real subprocesses, a real reactor) with real cgroups under this
process's own, where this machine lets us make them (each test says why it skips
otherwise).  The escapes: a ``setsid`` child, and a child that forks and ``setpgid``s,
each still alive when the leader ends (success), times out, or is cancelled.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_tasks import Harness, alive, launcher, spec  # noqa: F401  (launcher: a fixture)

from dsml.testing.poll import poll
from dsml.testing.proctable import marked as in_table
from dsml.worker.tasks.cgroups import (
    JOIN,
    CgroupTree,
    Usage,
    _own_path,
    _v1_mount,
    _v2_mount,
    detect,
    oom_reason,
    tree_path,
    v1_memory_path,
    wrap_command,
)
from dsml.worker.tasks.isolation import Isolation
from dsml.worker.tasks.subreaper import children, marked, stat_of, subreaper_state

MOUNTINFO = (
    "25 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
    "35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n"
)


def test_the_v2_mount_and_own_path_are_read_from_proc(tmp_path: Path) -> None:
    assert _v2_mount(MOUNTINFO) == Path("/sys/fs/cgroup/unified")
    assert _v2_mount("25 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n") is None
    assert _own_path("4:memory:/x\n0::/system.slice/dsml.service\n") == "/system.slice/dsml.service"
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text("25 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    (proc / "self" / "cgroup").write_text("0::/\n")
    tree, why = detect(tmp_path / "work", proc)
    assert tree is None and "no cgroup v2" in why


def test_wrap_command_joins_then_execs() -> None:
    assert wrap_command("/bin/sh", Path("/cg/a7"), ["python", "-c", "x"]) == [
        "/bin/sh", "-c", JOIN, "/cg/a7/cgroup.procs", "python", "-c", "x"]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[CgroupTree]:
    """Real attempt cgroups for a worker whose task dir is under tmp_path."""
    found, why = detect(tmp_path / "work")
    if found is None:
        pytest.skip(f"no cgroups here: {why}")
    yield found
    left = found.sweep()  # (the v1 memory cgroups too)
    for _ in range(200):
        left = [p for p in left if not found.remove(p)]
        if not left:
            break
    assert found.remove(found.root)
    assert not found.root.exists()
    assert found.v1_memory is None or not found.v1_memory.exists()


ESCAPES = {
    # a child in a session of its own, still alive when the leader ends
    "setsid": "setsid sh -c 'echo $$ > tmp; mv tmp escaped.pid; exec sleep 1000' & "
              "while [ ! -e escaped.pid ]; do sleep 0.01; done",
    # a child that forks and leaves the group with setpgid
    "setpgid": "python3 -c 'import os,time\n"
               "if os.fork() == 0:\n"
               "    os.setpgid(0, 0); open(\"tmp\",\"w\").write(str(os.getpid()));"
               " os.rename(\"tmp\",\"escaped.pid\"); time.sleep(1000)\n' & "
               "while [ ! -e escaped.pid ]; do sleep 0.01; done",
}


@pytest.mark.parametrize("how", ["success", "timeout", "cancel"])
@pytest.mark.parametrize("escape", sorted(ESCAPES))
def test_an_escaped_process_dies_with_its_attempt(
    tmp_path: Path, tree: CgroupTree, launcher: Any, escape: str, how: str,  # noqa: F811
) -> None:
    h = Harness(tmp_path / "work")
    m = h.manager(launcher=launcher, cgroups=tree)
    script = ESCAPES[escape] + ("" if how == "success" else "; sleep 1000")
    kwargs = {"timeout": 1.0} if how == "timeout" else {}

    async def body() -> tuple[Any, int]:
        m.start(spec(21, "sh", "-c", script, **kwargs))
        # (In its attempt's directory, which moves when the attempt ends.)
        await h.wait_for(lambda: any(h.work_dir.rglob("escaped.pid")), timeout=10)
        escaped = int(next(h.work_dir.rglob("escaped.pid")).read_text())
        assert how == "success" or alive(escaped)  # (a success may be over already)
        if how == "cancel":
            m.cancel(21)
        result = await h.result(21)
        await h.wait_for(lambda: not alive(escaped), timeout=5)
        await h.wait_for(lambda: not tree.path(21).exists(), timeout=5)
        return result, escaped

    result, escaped = h.run(body, timeout=20)
    assert not alive(escaped)
    expected = {"success": "", "timeout": "timeout", "cancel": "cancelled"}[how]
    assert result.reason.startswith(expected), result.reason


def test_a_missing_command_is_still_command_not_found(tmp_path: Path, tree: CgroupTree) -> None:
    h = Harness(tmp_path / "work")
    m = h.manager(cgroups=tree)

    async def body() -> Any:
        m.start(spec(22, "no-such-program-dsml"))
        return await h.result(22)

    assert h.run(body).reason == "command not found: no-such-program-dsml"
    assert not tree.path(22).exists()


def test_a_new_manager_kills_what_an_earlier_run_left(tmp_path: Path, tree: CgroupTree) -> None:
    """A worker killed with -9 left an attempt's process in its cgroup: the next start
    kills it and removes the cgroup."""
    import subprocess

    left = tree.make(99)
    proc = subprocess.Popen(wrap_command("/bin/sh", left, ["sleep", "1000"]))
    try:
        h = Harness(tmp_path / "work")
        poll(lambda: True if proc.pid in tree.members(left) else None, "the task joined")
        h.manager(cgroups=tree)
        assert proc.wait(timeout=10) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    poll(lambda: True if tree.remove(left) else None, "the cgroup removed")
    assert not left.exists()
    assert os.path.isdir(tree.root)


@pytest.mark.processes
def test_a_real_worker_leaves_no_escaped_process(tmp_path: Path) -> None:
    """Through twistd: a job whose task starts ``setsid sleep ... &`` and exits 0, and
    one cancelled while such a child runs; afterwards no such process is in the process
    table (the worker's log says it runs tasks in cgroups, else the test skips)."""
    import secrets

    from dsml.client import ClusterClient
    from dsml.localcluster import LocalCluster

    probe, why = detect(tmp_path / "probe")
    if probe is None:
        pytest.skip(f"no cgroups here: {why}")
    assert probe.remove(probe.root)
    mark = f"1000.{secrets.randbelow(10**6)}"
    c = LocalCluster(tmp_path / "cluster", workers=("w1",))
    try:
        c.start("master")
        c.start("w1")
        poll(lambda: True if "one cgroup per attempt" in c.log_path("w1").read_text()
             else None, "the worker's cgroups", timeout=60)
        host, port = c.address("master")
        client = ClusterClient(host, port, c.token)
        ok = client.submit(["sh", "-c", f"setsid sleep {mark} & sleep 0.2"], max_attempts=1)
        assert client.wait(ok.id, timeout=120)["state"] == "succeeded"
        poll(lambda: True if not in_table(mark) else None, "no sleeper after success")
        job = client.submit(["sh", "-c", f"setsid sleep {mark} & sleep 1000"], max_attempts=1)
        poll(lambda: True if in_table(mark) else None, "the sleeper started", timeout=60)
        client.cancel(job.id)
        assert client.wait(job.id, timeout=120)["state"] == "cancelled"
        poll(lambda: True if not in_table(mark) else None, "no sleeper after cancel")
        client.close()
    finally:
        c.stop()
        for pid in in_table(mark):
            os.kill(pid, 9)
    root, _ = tree_path(c.root / "w1" / "tasks")
    assert root is not None and not root.exists()  # the worker's cgroups went with it
    v1, _ = v1_memory_path(c.root / "w1" / "tasks")
    assert v1 is None or not v1.exists()


# == memory limits and accounting (issue #13) =================================================

MIB = 1024 * 1024
HYBRID = MOUNTINFO + "36 25 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"


def test_the_v1_memory_mount_and_own_path_are_read_from_proc() -> None:
    assert _v1_mount(HYBRID, "memory") == Path("/sys/fs/cgroup/memory")
    assert _v1_mount(MOUNTINFO, "memory") is None
    cgroup = "4:memory:/process_api/x\n2:cpu,cpuacct:/y\n0::/\n"
    assert _own_path(cgroup, "memory") == "/process_api/x"
    assert _own_path(cgroup, "cpuacct") == "/y"
    assert _own_path(cgroup) == "/"


def test_the_join_line_joins_every_cgroup_then_execs(tmp_path: Path) -> None:
    """The shell line, run for real with plain files as the ``cgroup.procs``: it writes 0
    to each, then execs the command with its own arguments intact."""
    import subprocess

    (tmp_path / "v2").mkdir()
    (tmp_path / "v1").mkdir()
    argv = wrap_command("/bin/sh", tmp_path / "v2", ["printf", "%s|", "a b", "$1"],
                        also=[tmp_path / "v1"])
    out = subprocess.run(argv, capture_output=True, check=True, text=True).stdout
    assert out == "a b|$1|"
    assert (tmp_path / "v2" / "cgroup.procs").read_text() == "0\n"
    assert (tmp_path / "v1" / "cgroup.procs").read_text() == "0\n"
    failing = wrap_command("/bin/sh", tmp_path / "v2", ["true"], also=[tmp_path / "nowhere"])
    assert subprocess.run(failing, capture_output=True, check=False).returncode == 125


def test_the_limit_is_written_and_swap_may_not_absorb_it(tmp_path: Path) -> None:
    """In v2: memory.max, memory.swap.max = 0, memory.oom.group; in v1 beside it:
    memory.limit_in_bytes and memory.memsw.limit_in_bytes (or swappiness 0 without swap
    accounting).  Fake cgroup directories: the files the kernel would offer exist."""
    v2 = tmp_path / "v2"
    v1 = tmp_path / "v1"
    v2.mkdir()
    v1.mkdir()
    tree = CgroupTree(v2, v2_memory=True, v1_memory=v1)
    for name in ("memory.swap.max", "memory.oom.group"):
        (v2 / "a5").mkdir(exist_ok=True)
        (v2 / "a5" / name).write_text("max\n")
    (v1 / "a5").mkdir()
    (v1 / "a5" / "memory.memsw.limit_in_bytes").write_text("9223372036854771712\n")
    tree.limit(v2 / "a5", 64 * MIB)
    assert (v2 / "a5" / "memory.max").read_text() == str(64 * MIB)
    assert (v2 / "a5" / "memory.swap.max").read_text() == "0"
    assert (v2 / "a5" / "memory.oom.group").read_text() == "1"
    assert (v1 / "a5" / "memory.limit_in_bytes").read_text() == str(64 * MIB)
    assert (v1 / "a5" / "memory.memsw.limit_in_bytes").read_text() == str(64 * MIB)
    only_v1 = CgroupTree(v2, v1_memory=v1)
    made = only_v1.make(6, 3 * MIB)
    assert made == v2 / "a6" and (v1 / "a6").is_dir()
    assert not (made / "memory.max").exists()
    assert (v1 / "a6" / "memory.limit_in_bytes").read_text() == str(3 * MIB)
    assert (v1 / "a6" / "memory.swappiness").read_text() == "0"  # no memsw file here
    assert only_v1.v1_paths(v2) == [v1] and only_v1.v1_paths(made) == [v1 / "a6"]


def test_usage_and_out_of_memory_are_read_from_the_cgroup_files(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v1 = tmp_path / "v1"
    (v2 / "a1").mkdir(parents=True)
    (v1 / "a1").mkdir(parents=True)
    (v2 / "a1" / "memory.peak").write_text("1048576\n")
    (v2 / "a1" / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n")
    (v2 / "a1" / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    assert CgroupTree(v2, v2_memory=True).usage(v2 / "a1") == Usage(MIB, 2.5, 1)
    (v1 / "a1" / "memory.max_usage_in_bytes").write_text(str(5 * MIB))
    (v1 / "a1" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert CgroupTree(v2, v1_memory=v1).usage(v2 / "a1") == Usage(5 * MIB, 2.5, 2)
    (v2 / "a2").mkdir()
    assert CgroupTree(v2).usage(v2 / "a2") == Usage(0, None, 0)  # nothing known

    assert oom_reason(64 * MIB) == "out-of-memory: used more than its 64 MiB (--mem)"
    assert oom_reason(3 << 30) == "out-of-memory: used more than its 3 GiB (--mem)"
    assert oom_reason(1000) == "out-of-memory: used more than its 1000 bytes (--mem)"
    assert oom_reason(0).startswith("out-of-memory")
    from twisted.internet.task import Clock

    iso = Isolation(Clock(), tmp_path, CgroupTree(v2, v1_memory=v1))
    big = spec(1, "x", mem=64 * MIB)
    assert iso.ended(big, v2 / "a1", failed=True) == (Usage(5 * MIB, 2.5, 2), oom_reason(64 * MIB))
    assert iso.ended(big, v2 / "a1", failed=False)[1] == ""  # it coped: a success stays one
    assert iso.ended(big, None, failed=True) == (Usage(), "")


def test_mem_in_a_run_order_is_a_non_negative_integer() -> None:
    import json

    from dsml.errors import DsmlError
    from dsml.worker.runner import spec_from_json

    base = {"attempt_id": 1, "job_id": "j", "task_index": 0, "command": ["true"]}
    assert spec_from_json(json.dumps(base).encode()).mem == 0
    assert spec_from_json(json.dumps({**base, "mem": 64 * MIB}).encode()).mem == 64 * MIB
    for bad in (-1, 1.5, "64M", True):
        with pytest.raises(DsmlError, match="mem"):
            spec_from_json(json.dumps({**base, "mem": bad}).encode())
    from dsml.worker.tasks import TaskError
    from dsml.worker.tasks.spec import validate

    with pytest.raises(TaskError, match="mem"):
        validate(spec(1, "true", mem=-1), 1)


def memory_tree(tree: CgroupTree) -> CgroupTree:
    if not tree.limits_memory:
        pytest.skip("no memory controller for the attempt cgroups here (neither v2 nor v1)")
    return tree


def test_an_attempt_over_its_memory_limit_ends_out_of_memory(
    tmp_path: Path, tree: CgroupTree
) -> None:
    """A task that allocates 512 MiB with a 64 MiB limit: the kernel kills it at once, and
    the reason says out-of-memory (not "killed by signal 9")."""
    memory_tree(tree)
    h = Harness(tmp_path / "work")
    m = h.manager(cgroups=tree)
    code = "b = b'x' * (512 * 1024 * 1024); import time; time.sleep(5)"

    async def body() -> Any:
        m.start(spec(31, "python3", "-c", code, mem=64 * MIB, timeout=60))
        return await h.result(31)

    result = h.run(body, timeout=30)
    assert result.reason == "out-of-memory: used more than its 64 MiB (--mem)", result
    assert result.signal == 9
    assert result.duration < 4  # killed, not its sleep ended
    assert result.peak_rss <= 64 * MIB + 4 * MIB  # (v1 may count a little kernel memory)


def test_an_attempt_within_its_memory_limit_succeeds_with_its_peak(
    tmp_path: Path, tree: CgroupTree
) -> None:
    memory_tree(tree)
    h = Harness(tmp_path / "work")
    m = h.manager(cgroups=tree)
    code = "b = b'x' * (100 * 1024 * 1024); b = None"

    async def body() -> Any:
        m.start(spec(32, "python3", "-c", code, mem=512 * MIB))
        return await h.result(32)

    result = h.run(body, timeout=30)
    assert result.reason == "" and result.exit_code == 0
    assert result.peak_rss >= 100 * MIB  # the cgroup's peak: too short to be sampled
    assert result.cpu_seconds is not None and result.cpu_seconds > 0


# == without cgroups: the worker as a child subreaper (issue #13) ===========================

FAKE_ENV = "PATH=/bin\0DSML_WORKER_DIR=/w\0DSML_ATTEMPT_ID=7\0"


def test_the_processes_of_an_attempt_are_found_by_their_environment(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid, env in {10: FAKE_ENV, 11: FAKE_ENV.replace("=7", "=70"),
                     12: FAKE_ENV.replace("/w", "/other"), 13: "DSML_ATTEMPT_ID=7\0"}.items():
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "environ").write_text(env)
        (proc / str(pid) / "stat").write_text(
            f"{pid} (sleep 1) Z 1 {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 4242 0 0\n")
    (proc / "14").mkdir()  # gone, or not ours to read: no environ
    assert marked(Path("/w"), 7, proc) == [10]
    assert stat_of(10, proc) == (b"Z", 1, 4242)
    assert stat_of(99, proc) is None
    (proc / "self" / "task" / "1").mkdir(parents=True)
    (proc / "self" / "task" / "1" / "children").write_text("10 12 ")
    (proc / "self" / "task" / "2").mkdir()
    (proc / "self" / "task" / "2" / "children").write_text("13")
    assert sorted(children(proc)) == [10, 12, 13]


def _gone_or_dead(mark: str, pid: int) -> bool:
    """No live process holds ``mark`` and ``pid`` is reaped (not even a zombie)."""
    return not in_table(mark) and not Path(f"/proc/{pid}").exists()


SUBREAPER_ESCAPES = {
    "setsid": "setsid sh -c 'echo $$ > tmp; mv tmp escaped.pid; exec sleep {mark}' & "
              "while [ ! -e escaped.pid ]; do sleep 0.01; done",
    "setpgid": "python3 -c 'import os,time\n"
               "if os.fork() == 0:\n"
               "    os.setpgid(0, 0); open(\"tmp\",\"w\").write(str(os.getpid()));"
               " os.rename(\"tmp\",\"escaped.pid\"); time.sleep({mark})\n' & "
               "while [ ! -e escaped.pid ]; do sleep 0.01; done",
}


@pytest.mark.parametrize("how", ["success", "timeout"])
@pytest.mark.parametrize("escape", sorted(SUBREAPER_ESCAPES))
def test_without_cgroups_the_subreaper_kills_and_reaps_what_left_the_group(
    tmp_path: Path, launcher: Any, escape: str, how: str,  # noqa: F811
) -> None:
    """cgroups=None, subreaper=True: the escaped process (its marker in its command line)
    is gone after the attempt ends, reaped by the worker (no zombie), and the leader's
    exit status still reached the manager, through Twisted or the pidfd."""
    import secrets

    if sys.platform != "linux":
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) is Linux only")
    was = subreaper_state()
    mark = f"1000.{secrets.randbelow(10**6)}"
    h = Harness(tmp_path / "work")
    m = h.manager(launcher=launcher, cgroups=None, subreaper=True)
    script = SUBREAPER_ESCAPES[escape].replace("{mark}", mark)
    script += "; exit 3" if how == "success" else "; sleep 1000"
    kwargs = {"timeout": 1.0} if how == "timeout" else {}

    async def body() -> tuple[Any, int]:
        assert subreaper_state()
        m.start(spec(41, "sh", "-c", script, **kwargs))
        await h.wait_for(lambda: any(h.work_dir.rglob("escaped.pid")), timeout=10)
        escaped = int(next(h.work_dir.rglob("escaped.pid")).read_text())
        result = await h.result(41)
        await h.wait_for(lambda: _gone_or_dead(mark, escaped), timeout=5)
        await m.stop()
        return result, escaped

    try:
        result, escaped = h.run(body, timeout=20)
    finally:
        for pid in in_table(mark):
            os.kill(pid, 9)
    assert subreaper_state() == was  # stop() gave the flag back
    if how == "success":
        assert (result.reason, result.exit_code) == ("exit 3", 3)
    else:
        assert result.reason.startswith("timeout"), result.reason


def _fake_proc(tmp_path: Path, v1: bool) -> Path:
    """A /proc/self whose cgroup2 mount (and v1 memory mount) are directories in tmp_path."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    mounts = f"35 25 0:30 / {tmp_path / 'cg2'} rw - cgroup2 cgroup2 rw\n"
    if v1:
        mounts += f"36 25 0:32 / {tmp_path / 'mem'} rw - cgroup cgroup rw,memory\n"
    (proc / "self" / "mountinfo").write_text(mounts)
    (proc / "self" / "cgroup").write_text("4:memory:/svc\n0::/svc\n")
    return proc


def test_detect_prefers_the_v2_memory_controller_then_v1_then_says_why_not(
    tmp_path: Path,
) -> None:
    """Fake hierarchies (plain directories, holding the files the kernel would):
    memory among the v2 subtree's controllers: enabled there; else a v1 memory mount:
    v1 cgroups beside the v2 ones; else no limit, and the text says why."""
    work = tmp_path / "work"
    name = tree_path(work, _fake_proc(tmp_path / "a", v1=True))[0]
    assert name is not None
    root = tmp_path / "a" / "cg2" / "svc" / name.name
    root.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    tree, how = detect(work, tmp_path / "a" / "proc")
    assert tree is not None and tree.v2_memory and tree.v1_memory is None, how
    assert (root / "cgroup.subtree_control").read_text() == "+memory"
    assert "memory limits (--mem) in it" in how

    proc = _fake_proc(tmp_path / "b", v1=True)
    v1 = tmp_path / "b" / "mem" / "svc" / name.name
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "b" / "cg2" / "svc").mkdir(parents=True)
    tree, how = detect(work, proc)
    assert tree is not None and not tree.v2_memory and tree.v1_memory == v1, how
    assert tree.limits_memory and f"memory limits (--mem) under {v1}" in how

    (tmp_path / "c" / "cg2" / "svc").mkdir(parents=True)
    tree, how = detect(work, _fake_proc(tmp_path / "c", v1=False))
    assert tree is not None and not tree.limits_memory
    assert "memory limits (--mem) NOT enforced" in how and "no cgroup v1 memory" in how


def test_the_subreaper_reaps_an_orphan_that_ended_by_itself(tmp_path: Path) -> None:
    """A grandchild that left the group and exited before its attempt ended comes back
    to the worker as a zombie; it is reaped when the attempt ends."""
    if sys.platform != "linux":
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) is Linux only")
    h = Harness(tmp_path / "work")
    m = h.manager(cgroups=None, subreaper=True)
    script = (
        "(setsid sh -c 'echo $$ > tmp; mv tmp escaped.pid' &); "
        "while [ ! -e escaped.pid ]; do sleep 0.01; done; p=$(cat escaped.pid); "
        # until it is a zombie (of the worker: its parent, the subshell, is gone)
        "while [ -e /proc/$p ] && ! grep -q ') Z ' /proc/$p/stat; do sleep 0.01; done"
    )

    async def body() -> tuple[Any, int]:
        m.start(spec(42, "sh", "-c", script))
        result = await h.result(42)
        escaped = int(next(h.work_dir.rglob("escaped.pid")).read_text())
        await h.wait_for(lambda: not Path(f"/proc/{escaped}").exists(), timeout=5)
        await m.stop()
        return result, escaped

    result, _ = h.run(body, timeout=20)
    assert result.reason == ""


# == the task environment's allow-list (issue #13) ==========================================


def test_the_environment_allow_list_takes_names_and_prefixes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    from dsml.config import TASK_ENV_DEFAULT
    from dsml.worker.tasks.launch import TaskEnvironment

    for name, value in {"LD_LIBRARY_PATH": "/opt/cuda/lib64", "CUDA_HOME": "/opt/cuda",
                        "LC_ALL": "C.UTF-8", "AWS_SECRET_ACCESS_KEY": "s3cret",
                        "PYTHONPATH": "/venv/lib", "MY_SITE_DATA": "/data"}.items():
        monkeypatch.setenv(name, value)
    env = TaskEnvironment(tmp_path, TASK_ENV_DEFAULT + ("MY_SITE_*",))
    got = env.for_attempt(spec(1, "true"))
    assert got["LD_LIBRARY_PATH"] == "/opt/cuda/lib64" and got["CUDA_HOME"] == "/opt/cuda"
    assert got["LC_ALL"] == "C.UTF-8" and got["MY_SITE_DATA"] == "/data"
    assert "AWS_SECRET_ACCESS_KEY" not in got and "PYTHONPATH" not in got
    assert "CUDA_HOME" not in TaskEnvironment(tmp_path).for_attempt(spec(1, "true"))


def test_config_task_env_is_a_list_of_names(tmp_path: Path) -> None:
    from dsml.config import ConfigError, load_config

    p = tmp_path / "dsml.yaml"
    base = "master: {port: 0, state_dir: state}\nworkers:\n  w1: {port: 0, data_dir: d1"
    p.write_text(base + ", task_env: [HF_HOME, 'NCCL_*']}\n")
    assert load_config(p).workers["w1"].task_env == ("HF_HOME", "NCCL_*")
    p.write_text(base + ", task_env: 'HF_HOME'}\n")
    with pytest.raises(ConfigError, match="workers.w1.task_env: must be a list"):
        load_config(p)
    p.write_text(base + ", task_env: ['A=B']}\n")
    with pytest.raises(ConfigError, match="workers.w1.task_env"):
        load_config(p)


@pytest.mark.processes
def test_a_real_worker_passes_its_allowed_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A twistd worker started with LD_LIBRARY_PATH, CUDA_HOME, a site variable its
    config allows, a secret and CUDA_VISIBLE_DEVICES: the task sees the first three, not
    the secret, and CUDA_VISIBLE_DEVICES naming its own GPUs (none: empty), and its
    thread pools sized to its one CPU."""
    from dsml.client import ClusterClient
    from dsml.localcluster import LocalCluster

    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/cuda/lib64")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("CUDA_HOME", "/opt/cuda")
    monkeypatch.setenv("MY_SITE_DATA", "/data")
    monkeypatch.setenv("MY_SECRET", "hunter2")
    c = LocalCluster(tmp_path / "cluster", workers=("w1",),
                     extra={"workers": {"w1": {"host": "127.0.0.1", "port": 0, "data_dir": "w1",
                                               "task_env": ["MY_SITE_*"]}}})
    try:
        c.start("master")
        c.start("w1")
        host, port = c.address("master")
        with ClusterClient(host, port, c.token) as client:
            job = client.submit(["sh", "-c", "env > env.txt"], outputs=[("env.txt", "env/1")])
            assert client.wait(job.id, timeout=120)["state"] == "succeeded"
            client.download("env/1", tmp_path / "env.txt")
            seen = dict(line.split("=", 1) for line in
                        (tmp_path / "env.txt").read_text().splitlines() if "=" in line)
    finally:
        c.stop()
    assert seen["LD_LIBRARY_PATH"] == "/opt/cuda/lib64" and seen["CUDA_HOME"] == "/opt/cuda"
    assert seen["CUDA_VISIBLE_DEVICES"] == "" and seen["OMP_NUM_THREADS"] == "1"
    assert seen["MY_SITE_DATA"] == "/data" and "MY_SECRET" not in seen
