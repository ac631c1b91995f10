"""Issue #13's failures through real processes: each attempt ends with a cause, and a
retry is made only where one can help (a lost worker, a transfer), or where the user
asked for it (``--retry-on exit``).  A Python exception's last line reaches ``dsml
status`` and the error :meth:`Job.wait` raises.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsml.client import ClusterClient, JobFailed
from dsml.localcluster import LocalCluster
from dsml.testing.poll import poll

pytestmark = pytest.mark.processes


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path / "cluster", workers=("w1", "w2"))
    try:
        c.start_all()
        yield c
    finally:
        c.stop()


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[ClusterClient]:
    host, port = cluster.address("master")
    with ClusterClient(host, port, cluster.token) as c:
        yield c


def test_a_python_exception_is_not_retried_and_its_last_line_is_shown(
    cluster: LocalCluster, client: ClusterClient
) -> None:
    """A task raising ValueError fails after ONE attempt (cause ``exit``, not retried
    by default although it has three); ``dsml status`` shows the traceback's last line,
    and ``Job.wait()`` raises JobFailed naming the task and that line."""
    code = "def train(lr):\n    raise ValueError(f'lr {lr} diverged')\ntrain(0.5)\n"
    job = client.submit(["python3", "-c", code], max_attempts=3)
    with pytest.raises(JobFailed) as e:
        job.wait(timeout=120)
    assert "task 0: exit 1 [exit]: ValueError: lr 0.5 diverged" in str(e.value), str(e.value)
    assert e.value.failures == {0: "exit 1 [exit]: ValueError: lr 0.5 diverged"}
    (task,) = e.value.status["tasks"]
    assert [a["cause"] for a in task["attempts"]] == ["exit"]  # one attempt: not retried
    r = cluster.cli("status", job.id, check=False)
    assert r.returncode == 1
    text = r.stdout.decode()
    assert "| ValueError: lr 0.5 diverged" in text and "[cause: exit]" in text, text
    assert job.wait(timeout=10, check=False)["state"] == "failed"  # (no raise when asked)


def test_retry_on_exit_retries_a_failing_command(
    cluster: LocalCluster, client: ClusterClient, tmp_path: Path
) -> None:
    """A command that fails its first run and succeeds its second: failed after one
    attempt by default; with ``--retry-on exit`` (the CLI) it succeeds on the second."""
    flaky = f'if [ -e {tmp_path}/"$0" ]; then exit 0; fi; touch {tmp_path}/"$0"; exit 3'
    plain = client.submit(["sh", "-c", flaky, "plain"])
    assert plain.wait(timeout=120, check=False)["state"] == "failed"
    r = cluster.cli("submit", "--retry-on", "exit", "--", "sh", "-c", flaky, "asked")
    assert r.returncode == 0, r.stderr
    status = client.wait(r.stdout.decode().strip(), timeout=120)
    assert status["state"] == "succeeded"
    attempts = status["tasks"][0]["attempts"]
    assert [(a["state"], a["cause"]) for a in attempts] == [("failed", "exit"),
                                                            ("succeeded", None)]


def test_a_lost_workers_attempt_is_retried_elsewhere(
    cluster: LocalCluster, client: ClusterClient, tmp_path: Path
) -> None:
    """The worker running a task is killed with -9: its attempt ends ``lost`` and the
    task runs again on the other worker, by default, and succeeds."""
    gate = tmp_path / "open"
    job = client.submit(["sh", "-c", f'while [ ! -e {gate} ]; do sleep 0.05; done'],
                        max_attempts=2)

    def running_on() -> str | None:
        attempts = client.job_status(job.id)["tasks"][0]["attempts"]
        return attempts[-1]["worker"] if attempts and attempts[-1]["state"] == "running" \
            else None

    victim = poll(running_on, "the task to start", timeout=60)
    cluster.kill(victim, signal.SIGKILL)
    other = poll(lambda: (w if (w := running_on()) and w != victim else None),
                 "the task to run again on the other worker", timeout=60)
    gate.touch()
    status = job.wait(timeout=120)
    attempts = status["tasks"][0]["attempts"]
    assert [(a["worker"], a["cause"]) for a in attempts] == [(victim, "lost"), (other, None)]
