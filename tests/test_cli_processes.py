"""The ``dsml`` command in a user's first hour, against real twistd processes on 127.0.0.1:
--json listings, recursive download and remove, cat, a failed task's stderr in status,
pipes that close early, and the words said when nothing is running."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsml.client import ClusterClient
from dsml.localcluster import LocalCluster, venv_bin
from dsml.testing.poll import poll

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(
        tmp_path_factory.mktemp("cli"), workers=("w1", "w2"),
        extra={"cluster": {"heartbeat_interval": 0.5, "heartbeat_timeout": 3.0}},
    )
    try:
        for name in ("master", "w1", "w2"):
            c.start(name)
        poll(lambda: True if _alive(c) == {"w1", "w2"} else None, "both workers")
        yield c
    finally:
        c.stop()


def _alive(c: LocalCluster) -> set[str]:
    doc = json.loads(c.cli("nodes", "--json").stdout)
    return {w["name"] for w in doc["workers"] if w["state"] == "alive"}


def _client(c: LocalCluster) -> ClusterClient:
    host, port = c.address("master")
    return ClusterClient(host, port, c.token)


def _shell(c: LocalCluster, script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in bash with the venv's dsml first on PATH and the cluster's config."""
    env = {**os.environ, "DSML_TOKEN": c.token, "DSML_CONFIG": str(c.config_path),
           "PATH": f"{Path(venv_bin('dsml')).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


# -- --json ---------------------------------------------------------------------------


def test_every_listing_is_one_json_document(cluster: LocalCluster, tmp_path: Path) -> None:
    """ls, stat, nodes, jobs and status with --json: each parses whole with json.load,
    through a pipe into another program, as a user's script would use it."""
    cluster.cli("set", "json/value", "0.5")
    job = cluster.cli("submit", "--name", "json-job", "--", "true").stdout.decode().strip()
    cluster.cli("wait", job)
    check = "python3 -c 'import json,sys; d = json.load(sys.stdin); print(type(d).__name__)'"
    for command in ("ls --json", "ls --json json/", "stat --json json/value", "nodes --json",
                    "jobs --json", f"status --json {job}"):
        r = _shell(cluster, f"dsml {command} | {check}", tmp_path)
        assert (r.returncode, r.stdout, r.stderr) == (0, "dict\n", ""), command

    listing = json.loads(cluster.cli("ls", "--json", "json/").stdout)
    (entry,) = listing["keys"]
    assert listing["prefix"] == "json/"
    assert entry["key"] == "json/value" and entry["size"] == 3
    assert sorted(entry["replicas"]) == ["w1", "w2"]
    stat = json.loads(cluster.cli("stat", "--json", "json/value").stdout)
    assert (stat["kind"], stat["size"], sorted(stat["replicas"])) == ("value", 3, ["w1", "w2"])
    nodes = json.loads(cluster.cli("nodes", "--json").stdout)
    assert {w["name"] for w in nodes["workers"]} == {"w1", "w2"}
    assert nodes["unregistered"] == []
    assert all(w["free_disk"] > 0 and w["slots"] >= 1 for w in nodes["workers"])
    # The master's reactor-lag probe (a 100 ms timer) has run since the master started.
    lag = nodes["master"]["reactor_lag_ms"]
    assert set(lag) == {"worst", "recent_worst", "last"}
    assert 0 <= lag["last"] <= lag["recent_worst"] <= lag["worst"]
    jobs = json.loads(cluster.cli("jobs", "--json").stdout)["jobs"]
    assert [j for j in jobs if j["id"] == job][0]["state"] == "succeeded"
    assert [j for j in jobs if j["id"] == job][0]["owner"] == "token"  # no TLS here
    status = json.loads(cluster.cli("status", "--json", job).stdout)
    assert status["id"] == job and status["tasks"][0]["attempts"][0]["exit_code"] == 0
    assert status["owner"] == "token"


def test_the_master_daemon_runs_its_timers_on_the_monotonic_clock(cluster: LocalCluster) -> None:
    """The twistd master (dsml.tap) says in its ``nodes`` answer which clock its
    reactor's timers run on: the monotonic one, so a step of the machine's wall clock
    (which a test cannot make) would move none of them (see tests/test_clocks.py)."""
    with _client(cluster) as c:
        head, _ = c.master.call("nodes", {})
    assert head.headers["timers"] == "monotonic"


def test_stat_says_file_or_value(cluster: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("a file\n")
    cluster.cli("upload", str(tmp_path / "f.txt"), "kinds/file")
    cluster.cli("set", "kinds/value", "v")
    assert "kind:     file" in cluster.cli("stat", "kinds/file").stdout.decode()
    assert "kind:     value" in cluster.cli("stat", "kinds/value").stdout.decode()


# -- collecting -----------------------------------------------------------------------


def test_download_r_writes_nothing_outside_its_directory(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """Keys with `..`, `.` and empty segments under the prefix are skipped with a line
    each (exit 1); every other key lands under DIR, values included; a symlink planted
    in DIR is not followed."""
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    keys = ["dl/a.bin", "dl/sub/b.bin", "dl/../../escape1", "dl/sub/../../../escape2",
            "dl/./dot", "dl//double", "dl/link/through"]
    for key in keys:
        cluster.cli("upload", str(src), key)
    cluster.cli("set", "dl/sub/value", "42")
    work = tmp_path / "work"
    out = work / "deep" / "out"
    out.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "link").symlink_to(outside)
    before = sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(out))

    r = cluster.cli("download", "-r", "dl/", str(out), check=False)
    assert r.returncode == 1, r
    err = r.stderr.decode()
    for bad in ("dl/../../escape1", "dl/sub/../../../escape2", "dl/./dot", "dl//double",
                "dl/link/through"):
        assert f"skipped {bad!r}" in err, err
    assert "downloaded 3 of 8 keys" in err, err
    assert (out / "a.bin").read_bytes() == src.read_bytes()
    assert (out / "sub" / "b.bin").read_bytes() == src.read_bytes()
    assert (out / "sub" / "value").read_bytes() == b"42"
    after = sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(out))
    assert after == before  # nothing written anywhere but under DIR
    assert list(outside.iterdir()) == []


def test_rm_r_removes_a_prefix_and_nothing_else(cluster: LocalCluster) -> None:
    for key in ("rmr/a", "rmr/b/c", "rmrx"):
        cluster.cli("set", key, "1")
    r = cluster.cli("rm", "-r", "rmr/")
    assert "removed 2 keys" in r.stderr.decode()
    assert cluster.cli("ls", "rmr").stdout.decode().split() == ["rmrx"]
    empty = cluster.cli("rm", "-r", "", check=False)
    assert empty.returncode == 2 and "non-empty prefix" in empty.stderr.decode()


def test_cat_writes_files_and_values_and_get_points_at_it(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    (tmp_path / "f.txt").write_bytes(b"file bytes\n")
    cluster.cli("upload", str(tmp_path / "f.txt"), "cat/file")
    cluster.cli("set", "cat/value", "value bytes")
    assert cluster.cli("cat", "cat/file", "cat/value").stdout == b"file bytes\nvalue bytes"
    r = cluster.cli("get", "cat/file", check=False)
    assert r.returncode == 1 and r.stdout == b""
    assert "use `dsml cat cat/file`" in r.stderr.decode()


# -- pipes ----------------------------------------------------------------------------


def test_output_into_a_closed_pipe_ends_quietly(cluster: LocalCluster, tmp_path: Path) -> None:
    """`dsml ls | head -1` and `dsml cat BIG | head -c 10`: head's exit status, nothing on
    stderr; dsml itself ends with 141 (128 + SIGPIPE), as a killed process would."""
    with _client(cluster) as c:
        long = "x" * 900
        for i in range(120):  # ~110 KB of listing: more than a pipe holds
            c.set(f"pipe/{i:04d}/{long}", b"1")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * 1024 * 1024))
    cluster.cli("upload", str(big), "pipe-big")
    r = _shell(cluster, "dsml ls pipe/ | head -1", tmp_path)
    assert (r.returncode, r.stderr) == (0, ""), r
    assert r.stdout.startswith("pipe/0000/")
    r = _shell(cluster, "dsml ls pipe/ | head -1 >/dev/null; echo ${PIPESTATUS[0]}", tmp_path)
    assert r.stdout.strip() == "141" and r.stderr == "", r
    r = _shell(cluster, "dsml cat pipe-big | head -c 10 | wc -c", tmp_path)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "10", ""), r


# -- reading a job --------------------------------------------------------------------


def test_status_shows_a_failed_attempts_stderr_tail(cluster: LocalCluster) -> None:
    """With --retry-on exit a failing command is retried (each attempt's tail shown)."""
    job = cluster.cli(
        "submit", "--max-attempts", "2", "--retry-on", "exit", "--",
        "sh", "-c", "for i in $(seq 1 30); do echo line$i >&2; done; exit 3",
    ).stdout.decode().strip()
    wait = cluster.cli("wait", job, check=False)
    assert wait.returncode == 1
    err = wait.stderr.decode()
    assert f"job {job}: failed" in err and "task 0 failed: exit 3" in err, err
    assert "| line30" in err, err
    text = cluster.cli("status", job, check=False).stdout.decode()
    lines = text.splitlines()
    assert lines[0].startswith(f"job {job} ") and "0/1 succeeded, 1 failed" in lines[0], text
    assert "attempt 1 on" in text and "attempt 2 on" in text, text  # numbered per task
    assert text.count("      | line30") == 2, text
    assert "| line1\n" not in text, text  # a tail, not the whole stream
    assert cluster.cli("logs", job, "--attempt", "2", "--stderr").stderr.startswith(b"line1\n")


def test_a_python_exception_is_not_retried_and_says_what_it_was(cluster: LocalCluster) -> None:
    """By default an exception in the task's own code is not retried (max_attempts 3 is
    left unused): one attempt, cause exit, the exception's last line in status and wait;
    the Python client's status says the same."""
    job = cluster.cli(
        "submit", "--", "python3", "-c", "raise ValueError('learning rate 1e9 diverged')",
    ).stdout.decode().strip()
    wait = cluster.cli("wait", job, check=False)
    assert wait.returncode == 1
    assert "ValueError: learning rate 1e9 diverged" in wait.stderr.decode(), wait.stderr
    text = cluster.cli("status", job, check=False).stdout.decode()
    assert "attempt 1 on" in text and "attempt 2 on" not in text, text
    assert "[cause: exit]" in text and "ValueError: learning rate 1e9 diverged" in text, text
    host, port = cluster.address("master")
    with ClusterClient(host, port, cluster.token) as c:
        [t] = c.job_status(job)["tasks"]
    assert [a["cause"] for a in t["attempts"]] == ["exit"]


def test_a_cancelled_job_says_cancelled(cluster: LocalCluster) -> None:
    job = cluster.cli("submit", "--array", "3", "--", "sleep", "60").stdout.decode().strip()
    poll(lambda: True if json.loads(cluster.cli("status", "--json", job).stdout)["state"]
         == "running" else None, f"{job} to run")
    cluster.cli("cancel", job)
    line = [ln for ln in cluster.cli("jobs").stdout.decode().splitlines()
            if ln.startswith(job + " ")][0]
    assert " cancelled " in line and "3 cancelled" in line and "done" not in line, line
    assert line.split()[2] == "token", line  # OWNER: every token holder is one principal


def test_nodes_resource_and_disk_columns(cluster: LocalCluster) -> None:
    header, *rows = cluster.cli("nodes").stdout.decode().splitlines()
    assert all(c in header for c in ("CPUS FREE", "MEM FREE", "GPUS FREE", "DISK FREE"))
    # Idle workers: all their CPUs and GPUs free ("N of N"), memory detected (GiB).
    assert all("GiB of" in row and len(re.findall(r" (\d+) of \1 ", row)) == 2
               for row in rows), rows
    assert len(rows) == 2


# -- nothing running ------------------------------------------------------------------


def test_nodes_with_no_worker_says_how_to_start_one(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path / "c", workers=("w1", "w2"))
    try:
        c.start("master")
        r = c.cli("nodes")
        assert r.stdout == b""
        err = r.stderr.decode()
        assert "no worker has registered yet" in err, err
        assert f"twistd -n dsml-worker -c {c.config_path} --name w1" in err, err
        c.start("w1")
        poll(lambda: True if c.cli("nodes").stdout.count(b"alive") == 1 else None, "w1")
        err = c.cli("nodes").stderr.decode()
        assert f"worker w2 of the config has not registered: start it with `twistd -n " \
               f"dsml-worker -c {c.config_path} --name w2`" in err, err
    finally:
        c.stop()


def test_no_master_names_the_config_it_used(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path / "c", workers=("w1",))
    config = c.config_path.read_text().replace("port: 0", "port: 9", 1)  # discard port
    c.config_path.write_text(config)
    r = c.cli("nodes", check=False)
    err = r.stderr.decode()
    assert r.returncode == 1 and len(err.splitlines()) == 1, err
    assert f"from config {c.config_path}" in err and "twistd -n dsml-master" in err, err
