"""A real black-hole worker (issue 13), through twistd: w2's attempt directories cannot be
made (its ``tasks/run`` is a regular file), so every attempt on it fails at once; the
master cordons it, the job's tasks all succeed on w1 with their outputs intact, and
``nodes`` says why w2 is cordoned."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from dsml.testing.poll import poll

TASKS = 12


@pytest.mark.processes
def test_a_real_black_hole_worker_is_cordoned(tmp_path: Path) -> None:
    from dsml.client import ClusterClient
    from dsml.localcluster import LocalCluster
    from dsml.master.cordon import STREAK
    from dsml.worker.tasks.workdirs import RUN_DIR

    workers = {name: {"host": "127.0.0.1", "port": 0, "data_dir": name, "slots": slots}
               for name, slots in (("w1", 1), ("w2", 2))}
    c = LocalCluster(tmp_path / "cluster", workers=("w1", "w2"), extra={"workers": workers})
    client = None
    try:
        c.start("master")
        c.start("w1")
        c.start("w2")
        host, port = c.address("master")
        client = ClusterClient(host, port, c.token)
        live = client  # for the lambdas below

        poll(lambda: True if {n.name for n in live.nodes() if n.state == "alive"}
             == {"w1", "w2"} else None, "both workers registered", timeout=60)
        run = c.root / "w2" / "tasks" / RUN_DIR
        shutil.rmtree(run, ignore_errors=True)
        run.parent.mkdir(parents=True, exist_ok=True)
        run.write_text("not a directory: every attempt here fails at once\n")

        job = client.submit(
            ["sh", "-c", 'sleep 0.3; echo "task $DSML_TASK_INDEX" > out'],
            array=TASKS, outputs=[("out", "blackhole/{index}")],
            max_attempts=3,  # the default retry_on: a workspace failure is "staging"
        )
        final = client.wait(job.id, timeout=180)
        assert final["state"] == "succeeded", [
            (t["index"], [(a["worker"], a["state"], a["reason"]) for a in t["attempts"]])
            for t in final["tasks"]
        ]
        attempts = [a for t in final["tasks"] for a in t["attempts"]]
        assert {a["worker"] for a in attempts if a["state"] == "succeeded"} == {"w1"}
        burned = [a for a in attempts if a["state"] == "failed"]
        assert {a["worker"] for a in burned} == {"w2"}
        assert STREAK <= len(burned) <= STREAK + 2, [a["reason"] for a in burned]
        assert all(a["reason"].startswith("workspace: ") and a["cause"] == "staging"
                   for a in burned)
        for i in range(TASKS):
            out = io.BytesIO()
            client.download_to(f"blackhole/{i}", out)
            assert out.getvalue() == f"task {i}\n".encode()

        why = {n.name: n.cordoned for n in client.nodes()}
        assert why["w1"] == ""
        assert why["w2"].startswith(f"{STREAK} attempts in a row failed within 2 s")
        assert "workspace: " in why["w2"]
        shown = c.cli("nodes").stdout.decode()
        assert "alive, cordoned" in shown
        assert f"w2: alive, cordoned: {STREAK} attempts in a row" in shown
        assert "cordoned" in c.log_path("master").read_text()
    finally:
        if client is not None:
            client.close()
        c.stop()
