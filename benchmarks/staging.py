"""Staging a task's input: from the worker's own store vs from another worker.

    .venv/bin/python benchmarks/staging.py [--size-mib 256] [--repeat 5] [--tmpdir DIR]

A real master and two real workers (``twistd -n``, LocalCluster) on 127.0.0.1, one slot
each, replication 1.  One input of ``--size-mib`` random bytes is uploaded while w2 is
stopped, so w1 alone holds it.  Then, ``--repeat`` times each, alternating:

local   a job ``true`` with that input: the master sends it to w1 (locality), whose
        run order names the input's current version, and w1 stages it from its own store
        into the attempt's directory with no request and no byte copied: a reflink where
        the filesystem can, else a read-only hard link to the store's object (a copy only
        across filesystems).
remote  the same job while w1's only slot is held by a ``sleep`` task (whose own small
        input only w1 holds, so locality puts it there): the job goes to w2, which asks
        the master where the input is and downloads it from w1 (``file_retrieve``,
        streamed to a temporary file, sha256 checked, renamed).

The figure is the attempt's staging time as its worker measures it: from the first
fetch started to the last one ended, just before the command is spawned (the workers run
with ``DSML_TRACE=1``, whose per-attempt line ``attempt N staged 1 inputs in S s`` is read
from the worker's log).  Before each job the page cache is written back (``sync``, not
timed), so that no run pays for the writeback of the previous runs' copies.  Where the
filesystem of ``--tmpdir`` can clone (XFS with reflink, btrfs) the local stage is a
reflink; on ext4 a hard link (``link`` in the log).  Medians side by
side and their ratio; the target is local at least 10x faster.  Nothing asserts a speed.
Everything lives under one temporary directory, deleted at the end, and every process
started here is stopped.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import MIB, cpu_model, fmt, median, note, ratio, say, table, verdict  # noqa: E402

from dsml.client import ClusterClient  # noqa: E402
from dsml.localcluster import LocalCluster  # noqa: E402

#: The input every job stages.
KEY = "bench/staging/input.bin"
#: A tiny input only w1 holds: it pins the blocking ``sleep`` task to w1.
PIN = "bench/staging/pin"

_STAGED = re.compile(r"attempt (\d+) staged (\d+) inputs in ([0-9.]+) s")
_HOW = re.compile(r"input (\S+) staged from the local store \((\w+)\)")


def filesystem_of(path: Path) -> str:
    """The type of the filesystem ``path`` lives on (the longest mount point above it)."""
    best, kind = "", "?"
    real = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            point = fields[1]
            above = real == point or real.startswith(point.rstrip("/") + "/")
            if above and len(point) > len(best):
                best, kind = point, fields[2]
    return kind


def copy_methods(c: LocalCluster, worker: str) -> list[str]:
    """How ``worker`` made its local copies of the input (clone, copy_file_range...)."""
    text = c.log_path(worker).read_text(errors="replace")
    return sorted({m.group(2) for m in _HOW.finditer(text) if m.group(1) == KEY})


def start_cluster(root: Path) -> LocalCluster:
    """Master, w1, w2: one slot each, replication 1, per-attempt trace lines on, and no
    input cache (``input_cache: 0``), so that every remote run is a real transfer."""
    os.environ["DSML_TRACE"] = "1"  # the workers inherit it: the staging line
    c = LocalCluster(root, workers=("w1", "w2"), extra={"cluster": {"replication": 1}})
    config = yaml.safe_load(c.config_path.read_text())
    for name in ("w1", "w2"):
        config["workers"][name]["slots"] = 1
        config["workers"][name]["input_cache"] = 0
    c.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    c.start("master")
    c.start("w1")
    return c


def client_of(c: LocalCluster) -> ClusterClient:
    host, port = c.address("master")
    return ClusterClient(host, port, c.token, timeout=600.0, name="bench-staging")


def wait_alive(client: ClusterClient, names: set[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while {n.name for n in client.nodes() if n.state == "alive"} != names:
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers {sorted(names)} did not register")
        time.sleep(0.05)


def write_input(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MIB)
            f.write(os.urandom(n))
            left -= n


def staged_seconds(c: LocalCluster, worker: str, attempt_id: int, timeout: float = 10.0) -> float:
    """The staging time worker ``worker`` logged for ``attempt_id``."""
    deadline = time.monotonic() + timeout
    while True:
        for m in _STAGED.finditer(c.log_path(worker).read_text(errors="replace")):
            if int(m.group(1)) == attempt_id:
                return float(m.group(3))
        if time.monotonic() > deadline:
            raise RuntimeError(f"no staging line for attempt {attempt_id} in {worker}'s log")
        time.sleep(0.05)


def run_job(client: ClusterClient) -> tuple[str, int, str]:
    """Submit ``true`` with the input; (worker, attempt id, state) once it ended.

    The page cache is written back first (``sync``, not timed): each staging writes the
    input's size anew, and without it a run would pay for the previous runs' writeback
    (the kernel throttles writers once enough is dirty), whichever path it takes.
    """
    os.sync()
    job = client.submit(["true"], inputs=[(KEY, "input.bin")], max_attempts=1)
    status = job.wait(timeout=600)
    attempt = status["tasks"][0]["attempts"][-1]
    return attempt["worker"], int(attempt["id"]), status["state"]


def hold_w1(client: ClusterClient) -> str:
    """A ``sleep`` task on w1's only slot (its input only w1 holds); its job id once
    it runs."""
    job = client.submit(["sleep", "600"], inputs=[(PIN, "pin")], max_attempts=1)
    deadline = time.monotonic() + 30
    while True:
        attempts = job.status()["tasks"][0]["attempts"]
        if attempts and attempts[-1]["state"] == "running":
            if attempts[-1]["worker"] != "w1":
                raise RuntimeError(f"the pin task went to {attempts[-1]['worker']}, not w1")
            return job.id
        if time.monotonic() > deadline:
            raise RuntimeError("the pin task did not start")
        time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="staging an input locally vs from another worker")
    p.add_argument("--size-mib", type=int, default=256, help="input size (default 256 MiB)")
    p.add_argument("--repeat", type=int, default=5, help="repetitions of each (default 5)")
    p.add_argument("--tmpdir", help="parent of the scratch directory (default: $TMPDIR or /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (logs)")
    args = p.parse_args(argv)
    size = args.size_mib * MIB
    say("dsml staging benchmark: an input held by the worker itself vs by another worker")
    say(f"  machine: nproc={os.cpu_count()}, {cpu_model()}, Python "
        f"{platform.python_version()}, {platform.platform()}")
    tmp = Path(tempfile.mkdtemp(prefix="dsml-staging-bench-", dir=args.tmpdir))
    cluster: LocalCluster | None = None
    local: list[float] = []
    remote: list[float] = []
    methods: list[str] = []
    fs = filesystem_of(tmp)
    try:
        note("starting a master and w1 (w2 later, so that only w1 holds the input)")
        cluster = start_cluster(tmp / "cluster")
        with client_of(cluster) as client:
            wait_alive(client, {"w1"})
            src = tmp / "input.bin"
            write_input(src, size)
            note(f"uploading {args.size_mib} MiB to w1")
            client.upload(src, KEY)
            client.set(PIN, b"w1")
            src.unlink()
            cluster.start("w2")
            wait_alive(client, {"w1", "w2"})
            for rep in range(args.repeat):
                note(f"repetition {rep + 1} of {args.repeat}: local")
                for _ in range(10):
                    # w1's slot may still be held by the last pin task being killed:
                    # a job that went to w2 meanwhile is not a local run; run it again.
                    worker, attempt, state = run_job(client)
                    if worker == "w1":
                        break
                    time.sleep(0.5)
                if (worker, state) != ("w1", "succeeded"):
                    raise RuntimeError(f"the local job ran on {worker}: {state}")
                local.append(staged_seconds(cluster, worker, attempt))
                note(f"repetition {rep + 1} of {args.repeat}: remote")
                pin = hold_w1(client)
                try:
                    worker, attempt, state = run_job(client)
                finally:
                    client.cancel(pin)
                    client.wait(pin, timeout=60)
                if (worker, state) != ("w2", "succeeded"):
                    raise RuntimeError(f"the remote job ran on {worker}: {state}")
                remote.append(staged_seconds(cluster, worker, attempt))
            methods = copy_methods(cluster, "w1")
    finally:
        if cluster is not None:
            cluster.stop()
        if args.keep:
            note(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    lm, rm = median(local), median(remote)
    faster = ratio(rm, lm)
    say()
    say(f"staging one {args.size_mib} MiB input, seconds as the worker measured them "
        f"(median of {args.repeat})")
    say(table(
        ["held by", "median s", "MiB/s", "runs (s)"],
        [
            ["the worker itself (local stage)", fmt(lm, 3), fmt(args.size_mib / lm, 0),
             " ".join(f"{x:.3f}" for x in local)],
            ["the other worker (network)", fmt(rm, 3), fmt(args.size_mib / rm, 0),
             " ".join(f"{x:.3f}" for x in remote)],
        ],
    ))
    say(f"  scratch filesystem: {fs}; local stages made by: {', '.join(methods) or '?'}")
    say(f"  local is {fmt(faster, 1)}x faster; target at least 10x: "
        f"{verdict(None if faster is None else faster >= 10)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
