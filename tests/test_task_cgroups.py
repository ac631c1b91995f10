"""A cgroup per attempt (issue #13): a task's whole process tree ends with it.

Unit tests of :mod:`dsml.worker.tasks.cgroups` on fake /proc files, then the real thing:
a :class:`TaskManager` (real subprocesses, a real reactor) with real cgroups under this
process's own, where this machine lets us make them (each test says why it skips
otherwise).  The escapes: a ``setsid`` child, and a child that forks and ``setpgid``s,
each still alive when the leader ends (success), times out, or is cancelled.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_tasks import Harness, alive, launcher, spec  # noqa: F401  (launcher: a fixture)

from dsml.testing.poll import poll
from dsml.worker.tasks.cgroups import (
    JOIN,
    CgroupTree,
    _own_path,
    _v2_mount,
    detect,
    tree_path,
    wrap_command,
)

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
    for p in found.root.iterdir():
        if p.is_dir():
            found.kill(p)
    for _ in range(200):
        left = [p for p in found.root.iterdir() if p.is_dir() and not found.remove(p)]
        if not left:
            break
    found.root.rmdir()


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


def _sleepers(mark: str) -> list[int]:
    """Live processes whose command line holds ``mark`` (the process table)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if mark.encode() in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


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
    probe.root.rmdir()
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
        poll(lambda: True if not _sleepers(mark) else None, "no sleeper after success")
        job = client.submit(["sh", "-c", f"setsid sleep {mark} & sleep 1000"], max_attempts=1)
        poll(lambda: True if _sleepers(mark) else None, "the sleeper started", timeout=60)
        client.cancel(job.id)
        assert client.wait(job.id, timeout=120)["state"] == "cancelled"
        poll(lambda: True if not _sleepers(mark) else None, "no sleeper after cancel")
        client.close()
    finally:
        c.stop()
        for pid in _sleepers(mark):
            os.kill(pid, 9)
    root, _ = tree_path(c.root / "w1" / "tasks")
    assert root is not None and not root.exists()  # the worker's cgroups went with it


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
