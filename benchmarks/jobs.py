"""dsml jobs benchmarks: task throughput and submit-to-start latency, beside xargs and Dask.

    .venv/bin/python benchmarks/jobs.py [--quick] [--profile]

throughput  N tasks that run ``true`` (2,000; --quick: 500) on four slots, three ways:
            dsml     a real master and two real workers (``twistd -n``, LocalCluster) with
                     two slots each; ONE array job, ``ClusterClient.submit(["true"],
                     array=N)``, timed from the submit call to ``Job.wait()`` returning
                     the succeeded job.  Each task is a real attempt: a directory, two log
                     files, ``true`` started in its own session (Popen, one exec), its
                     result committed by the
                     master (SQLite, synchronous=FULL, group commit).
            xargs    ``seq N | xargs -P 4 -n 1 true``: four processes at a time, each
                     ``true <i>`` exec'd directly (no shell, no capture): the floor of
                     spawning N processes four at a time on this machine.
            Dask     distributed.LocalCluster(n_workers=2, threads_per_worker=2,
                     processes=True); ``client.map(f, range(N), pure=False)`` with
                     f = ``subprocess.run(["true"]).returncode``, then ``client.gather``.
            Tasks/s, medians over repetitions (after a small warm-up of each); dsml
            and xargs alternate, then Dask's repetitions run (its cluster is started
            only then: idle, it keeps about 0.15 of a CPU busy, which cost dsml more
            than xargs while it stayed up); ratios dsml/Dask, dsml/xargs.  Beside the
            rate, the CPU each side spent per task (its own processes, their children
            and this process: the machine may be shared, so the rate alone can
            mislead) and how busy the machine was.  The dsml cluster stays up
            throughout, idle (heartbeats) while Dask runs.
latency     one task on an idle cluster, repeated: submit call -> the task's process runs.
            The task is ``date +%s.%N`` (a small C program: it prints the wall clock a
            fraction of a millisecond after its exec); its stdout is read back through
            ``Job.logs()``.  Also: submit -> the attempt's ``started`` (the master's
            assignment time, from ``Job.status()``) and submit -> ``wait()`` returns.
            Beside it, Dask: ``client.submit(f, pure=False).result()`` where f records
            time.time() on entry and runs the same ``date``; and the floor: ``date`` run
            by ``subprocess.run`` from this process.

Nothing here asserts a speed: the targets are printed beside the figures.  Everything runs
on 127.0.0.1 under one temporary directory, deleted at the end; every process started here
is stopped (the Dask cluster with its own ``close``).  --profile adds one more dsml
throughput job, outside the figures, with the master and the workers under cProfile
(twistd --profile, as benchmarks/profile_server.py does), and prints where they spent it.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    CLK_TCK,
    cpu_model,
    cpu_seconds,
    fmt,
    median,
    note,
    ratio,
    say,
    table,
    verdict,
)

from dsml.client import ClusterClient  # noqa: E402
from dsml.localcluster import LocalCluster, venv_bin  # noqa: E402

WORKERS = ("w1", "w2")
SLOTS_PER_WORKER = 2
PARALLEL = len(WORKERS) * SLOTS_PER_WORKER  # xargs -P and Dask's threads match this

#: Longest any one throughput run may take before it counts as failed (seconds).
RUN_TIMEOUT = 120.0

# Targets printed beside the figures (never asserted).
TARGET_VS_DASK = 1.0  # dsml tasks/s >= Dask's
TARGET_VS_XARGS = 0.5  # dsml tasks/s >= half of xargs -P 4
TARGET_LATENCY_MS = 10.0  # median submit -> task process running


@dataclass
class Settings:
    quick: bool
    tasks: int
    reps: int
    latency_samples: int
    tmp_parent: str | None
    command: str


def settings(args: argparse.Namespace) -> Settings:
    cmd = ".venv/bin/python benchmarks/jobs.py" + "".join(f" {a}" for a in sys.argv[1:])
    if args.quick:
        return Settings(True, 500, 2, 15, args.tmpdir, cmd)
    return Settings(False, 2000, 3, 30, args.tmpdir, cmd)


# -- output ---------------------------------------------------------------------------


# fmt, ratio, verdict, table, say and note come from common.py.


def version_of(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def children_cpu_seconds(pid: int) -> float:
    """CPU seconds of the reaped children of ``pid`` (cutime + cstime): its tasks' processes."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        text = f.read()
    fields = text[text.rindex(b")") + 2 :].split()
    return (int(fields[13]) + int(fields[14])) / CLK_TCK  # fields 16 and 17 of stat(5)


class Busy:
    """How many CPUs the machine kept busy between start and stop (every process)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.b0 = machine_busy()

    def cpus(self) -> float:
        return (machine_busy() - self.b0) / (time.perf_counter() - self.t0)


# -- the three sides --------------------------------------------------------------------


def true_task(_i: int) -> int:
    """A Dask task: run ``true``."""
    return subprocess.run(["true"], check=False).returncode


def date_task() -> tuple[float, str]:
    """A Dask task: the time it started, and ``date``'s own clock."""
    t = time.time()
    out = subprocess.run(["date", "+%s.%N"], capture_output=True, check=False).stdout
    return t, out.decode()


@dataclass
class DsmlSide:
    cluster: LocalCluster
    client: ClusterClient
    master_pid: int
    worker_pids: list[int]


def new_cluster(root: Path) -> LocalCluster:
    """A LocalCluster config for a master and WORKERS, each with SLOTS_PER_WORKER slots."""
    cluster = LocalCluster(root, workers=WORKERS)
    # Slots are a per-worker key of the generated config (localcluster leaves the default):
    # set them in the YAML before anything starts.
    config = yaml.safe_load(cluster.config_path.read_text())
    for name in WORKERS:
        config["workers"][name]["slots"] = SLOTS_PER_WORKER
    cluster.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return cluster


def wait_for_workers(client: ClusterClient, timeout: float = 30.0) -> None:
    """Until the master sees every worker alive with its slots."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = {n.name: n for n in client.nodes()}
        if all(n in nodes and nodes[n].state == "alive" and nodes[n].slots == SLOTS_PER_WORKER
               for n in WORKERS):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers did not register with {SLOTS_PER_WORKER} slots: {nodes}")
        time.sleep(0.05)


def start_dsml(root: Path) -> tuple[LocalCluster, DsmlSide]:
    """A master and two workers with SLOTS_PER_WORKER slots each; wait until both are in."""
    cluster = new_cluster(root)
    side: DsmlSide | None = None
    try:
        host, port = cluster.start("master")
        for name in WORKERS:
            cluster.start(name)
        client = ClusterClient(host, port, cluster.token, timeout=RUN_TIMEOUT + 30)
        side = DsmlSide(cluster, client, cluster.procs["master"].pid,
                        [cluster.procs[n].pid for n in WORKERS])
        wait_for_workers(client)
    except BaseException:
        if side is not None:
            side.client.close()
        cluster.stop()
        raise
    return cluster, side


def own_cpu(pids: Sequence[int]) -> float:
    """CPU seconds so far of ``pids``, of their reaped children, and of this process."""
    return (sum(cpu_seconds(p) + children_cpu_seconds(p) for p in pids)
            + time.process_time())


def dsml_throughput(side: DsmlSide, n: int) -> dict[str, float]:
    pids = [side.master_pid, *side.worker_pids]
    cpu0 = [cpu_seconds(p) for p in pids]
    kids0 = sum(children_cpu_seconds(p) for p in side.worker_pids)
    own0 = own_cpu(pids)
    busy = Busy()
    t_wall = time.time()
    t0 = time.perf_counter()
    job = side.client.submit(["true"], array=n, name="bench-true")
    t_acked = time.perf_counter()
    status = job.wait(timeout=RUN_TIMEOUT)
    t1 = time.perf_counter()
    cpus = busy.cpus()
    own1 = own_cpu(pids)
    cpu1 = [cpu_seconds(p) for p in pids]
    kids1 = sum(children_cpu_seconds(p) for p in side.worker_pids)
    if status["state"] != "succeeded":
        bad = [t for t in status["tasks"] if t["state"] != "succeeded"][:3]
        raise RuntimeError(f"dsml job {job.id} ended {status['state']}: {bad}")
    ends = [a["ended"] for t in status["tasks"] for a in t["attempts"] if a["ended"]]
    starts = [a["started"] for t in status["tasks"] for a in t["attempts"]]
    attempts = sum(len(t["attempts"]) for t in status["tasks"])
    return {
        "n": n,
        "seconds": t1 - t0,
        "rate": n / (t1 - t0),
        "submit_ack": t_acked - t0,
        "first_start": min(starts) - t_wall,
        "first_done": min(ends) - t_wall,
        "finished": (status["finished"] or 0) - t_wall,
        "attempts": attempts,
        "master_cpu": cpu1[0] - cpu0[0],
        "workers_cpu": sum(cpu1[1:]) - sum(cpu0[1:]),
        "tasks_cpu": kids1 - kids0,
        "own_cpu": own1 - own0,
        "cpus": cpus,
    }


def xargs_throughput(n: int) -> dict[str, float]:
    cmd = f"seq {n} | xargs -P {PARALLEL} -n 1 true"
    busy = Busy()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own0 = time.process_time()
    t0 = time.perf_counter()
    subprocess.run(["sh", "-c", cmd], check=True, timeout=RUN_TIMEOUT,
                   stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
           + time.process_time() - own0)
    return {"n": n, "seconds": dt, "rate": n / dt, "cpus": busy.cpus(), "own_cpu": own}


def dask_throughput(client: Any, pids: Sequence[int], n: int) -> dict[str, float]:
    busy = Busy()
    own0 = own_cpu(pids)
    t0 = time.perf_counter()
    futures = client.map(true_task, range(n), pure=False)
    codes = client.gather(futures)
    dt = time.perf_counter() - t0
    cpus = busy.cpus()
    own = own_cpu(pids) - own0
    del futures
    if any(codes):
        raise RuntimeError("a Dask task's true exited non-zero")
    return {"n": n, "seconds": dt, "rate": n / dt, "cpus": cpus, "own_cpu": own}


def start_dask() -> tuple[Any, Any] | str:
    """A Dask LocalCluster and its client, or why not."""
    try:
        from distributed import Client as DaskClient
        from distributed import LocalCluster as DaskCluster
    except ImportError:
        return "dask/distributed not installed (pip install dask distributed)"
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)
    cluster = DaskCluster(
        n_workers=len(WORKERS), threads_per_worker=SLOTS_PER_WORKER, processes=True,
        host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR,
    )
    try:
        client = DaskClient(cluster)
    except BaseException:
        cluster.close()
        raise
    return cluster, client


def stop_dask(started: tuple[Any, Any]) -> None:
    """Close the Dask client, then its cluster."""
    cluster, client = started
    try:
        client.close()
    finally:
        cluster.close()


# -- throughput -------------------------------------------------------------------------


def bench_throughput(s: Settings, side: DsmlSide) -> dict[str, Any]:
    """dsml and xargs, repetitions alternating, with no Dask process up (see main)."""
    runs: dict[str, list[dict[str, float]]] = {"dsml": [], "xargs": [], "dask": []}
    fns: dict[str, Callable[[], dict[str, float]]] = {
        "dsml": lambda: dsml_throughput(side, s.tasks),
        "xargs": lambda: xargs_throughput(s.tasks),
    }
    # Warm-up (not counted): a small batch each, so first-use costs stay out of the figures.
    note("throughput: warm-up")
    dsml_throughput(side, 20)
    xargs_throughput(20)
    names = list(fns)
    for rep in range(s.reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            note(f"throughput: {name}, {s.tasks} tasks (repetition {rep + 1}/{s.reps})")
            runs[name].append(fns[name]())
    return runs


def bench_dask_throughput(s: Settings, dask_client: Any, runs: dict[str, Any]) -> None:
    """Dask's repetitions, into ``runs`` (dsml idles meanwhile: heartbeats only)."""
    # The worker processes (their children are the `true`s); the scheduler and the
    # nannies run inside this process, which own_cpu counts too.
    dask_pids = sorted(set(dask_client.run(os.getpid).values()))
    note("throughput: Dask warm-up")
    dask_throughput(dask_client, dask_pids, 20)
    for rep in range(s.reps):
        note(f"throughput: dask, {s.tasks} tasks (repetition {rep + 1}/{s.reps})")
        runs["dask"].append(dask_throughput(dask_client, dask_pids, s.tasks))


def report_throughput(s: Settings, runs: dict[str, list[dict[str, float]]],
                      dask_missing: str | None) -> dict[str, Any]:
    say()
    say(f"THROUGHPUT: {s.tasks:,} tasks running `true`, {PARALLEL} at a time, "
        f"{s.reps} repetitions (dsml and xargs alternating, then Dask), medians")
    say(f"  dsml:  master + {len(WORKERS)} workers x {SLOTS_PER_WORKER} slots (twistd), ONE "
        f"array job, submit -> wait() returns succeeded")
    say(f"  xargs: seq N | xargs -P {PARALLEL} -n 1 true  (true exec'd directly, no shell, "
        "no capture)")
    say(f"  dask:  LocalCluster(n_workers={len(WORKERS)}, threads_per_worker={SLOTS_PER_WORKER},"
        " processes=True), client.map(subprocess.run(['true'])) + gather")
    say()
    med = {k: median([r["rate"] for r in v]) for k, v in runs.items() if v}
    d = med.get("dsml")
    q_dask = ratio(d, med.get("dask"))
    q_xargs = ratio(d, med.get("xargs"))
    ok_dask = None if q_dask is None else q_dask >= TARGET_VS_DASK
    ok_xargs = None if q_xargs is None else q_xargs >= TARGET_VS_XARGS
    rows = []
    for name in ("dsml", "xargs", "dask"):
        rs = runs.get(name) or []
        if not rs:
            rows.append([name, "n/a", "", "", "", "", ""])
            continue
        q = ratio(d, med[name])
        target = ""
        if name == "dask":
            target = f"dsml >= {TARGET_VS_DASK:.2f}x: {verdict(ok_dask)}"
        elif name == "xargs":
            target = f"dsml >= {TARGET_VS_XARGS:.2f}x: {verdict(ok_xargs)}"
        rows.append([name, fmt(med[name]), " ".join(fmt(r["rate"]) for r in rs),
                     "" if name == "dsml" else fmt(q, 2),
                     fmt(median([r["own_cpu"] / r["n"] * 1e3 for r in rs]), 2),
                     f"{median([r['cpus'] for r in rs]):.2f} of {os.cpu_count()}", target])
    say(table(["", "tasks/s", "per run", "dsml/this", "CPU ms/task", "machine busy",
               "target"], rows))
    say("  CPU ms/task: user+system of the side's own processes and their children, and of "
        "this one")
    say("  machine busy: CPUs busy during the run, every process on the machine (incl. "
        "unrelated load)")
    dr = runs.get("dsml") or []
    if dr:
        say()
        say("  dsml, medians over the runs (times from the submit call):")
        dsml_rows = [
            ["submit acknowledged (job durable)", fmt(ms(median([r["submit_ack"] for r in dr])),
                                                      1), "ms"],
            ["first attempt assigned (master clock)",
             fmt(ms(median([r["first_start"] for r in dr])), 1), "ms"],
            ["first result recorded (master clock)",
             fmt(ms(median([r["first_done"] for r in dr])), 1), "ms"],
            ["job finished (master clock)", fmt(median([r["finished"] for r in dr]), 2), "s"],
            ["wait() returned", fmt(median([r["seconds"] for r in dr]), 2), "s"],
            ["attempts per run (= tasks: no retries)",
             " ".join(str(int(r["attempts"])) for r in dr), ""],
            ["master CPU per task", fmt(median([r["master_cpu"] / r["n"] * 1e6 for r in dr])),
             "us"],
            ["workers' CPU per task (the twistd processes)",
             fmt(median([r["workers_cpu"] / r["n"] * 1e6 for r in dr])), "us"],
            ["task processes' CPU per task (true, own session)",
             fmt(median([r["tasks_cpu"] / r["n"] * 1e6 for r in dr])), "us"],
        ]
        say(table(["", "value", ""], dsml_rows))
    if dask_missing:
        say(f"  Dask skipped: {dask_missing}")
    return {"med": med, "q_dask": q_dask, "q_xargs": q_xargs, "ok_dask": ok_dask,
            "ok_xargs": ok_xargs}


# -- latency ----------------------------------------------------------------------------


def dsml_latency(side: DsmlSide) -> dict[str, float]:
    t0 = time.time()
    job = side.client.submit(["date", "+%s.%N"], name="bench-latency")
    status = job.wait(timeout=RUN_TIMEOUT)
    t_wait = time.time()
    if status["state"] != "succeeded":
        raise RuntimeError(f"latency job {job.id} ended {status['state']}: {status['tasks']}")
    started = status["tasks"][0]["attempts"][-1]["started"]
    ran = float(job.logs().decode().strip())
    return {"start": ran - t0, "assigned": started - t0, "wait": t_wait - t0}


def dask_latency(client: Any) -> dict[str, float]:
    t0 = time.time()
    entered, out = client.submit(date_task, pure=False).result()
    t1 = time.time()
    return {"start": float(out.strip()) - t0, "entered": entered - t0, "result": t1 - t0}


def local_latency() -> dict[str, float]:
    t0 = time.time()
    out = subprocess.run(["date", "+%s.%N"], capture_output=True, check=True).stdout
    t1 = time.time()
    return {"start": float(out.strip()) - t0, "result": t1 - t0}


def bench_latency(s: Settings, side: DsmlSide) -> dict[str, list[Any]]:
    """dsml's samples and the floor's, alternating, with no Dask process up."""
    out: dict[str, list[Any]] = {"dsml": [], "dask": [], "local": []}
    note(f"latency: {s.latency_samples} single-task jobs of dsml")
    dsml_latency(side)  # warm-up
    for _ in range(s.latency_samples):
        # Idle between samples: results acknowledged, heartbeats in their own rhythm.
        time.sleep(0.05)
        out["dsml"].append(dsml_latency(side))
        out["local"].append(local_latency())
    return out


def bench_dask_latency(s: Settings, dask_client: Any, out: dict[str, list[Any]]) -> None:
    """Dask's samples, into ``out``."""
    note(f"latency: {s.latency_samples} single-task jobs of Dask")
    dask_latency(dask_client)  # warm-up
    for _ in range(s.latency_samples):
        time.sleep(0.05)
        out["dask"].append(dask_latency(dask_client))


def report_latency(s: Settings, res: dict[str, list[Any]]) -> dict[str, Any]:
    def col(side: str, key: str) -> float | None:
        vals = [r[key] for r in res[side]]
        return ms(median(vals)) if vals else None

    def spread(side: str, key: str) -> str:
        vals = sorted(r[key] for r in res[side])
        if not vals:
            return ""
        return f"{vals[0] * 1000:.1f} .. {vals[-1] * 1000:.1f}"

    say()
    say(f"LATENCY: one task on an idle cluster, {s.latency_samples} samples per side "
        "(dsml with the floor, then Dask), ms from the submit call, medians (min .. max)")
    say("  the task is `date +%s.%N`: its output is the wall clock right after its exec")
    say()
    rows = [
        ["dsml: submit -> task process runs", fmt(col("dsml", "start"), 1),
         spread("dsml", "start")],
        ["dsml: submit -> attempt assigned (master)", fmt(col("dsml", "assigned"), 1),
         spread("dsml", "assigned")],
        ["dsml: submit -> wait() returns", fmt(col("dsml", "wait"), 1), spread("dsml", "wait")],
    ]
    if res["dask"]:
        rows += [
            ["dask: submit -> task function entered", fmt(col("dask", "entered"), 1),
             spread("dask", "entered")],
            ["dask: submit -> `date` runs in the task", fmt(col("dask", "start"), 1),
             spread("dask", "start")],
            ["dask: submit -> result()", fmt(col("dask", "result"), 1),
             spread("dask", "result")],
        ]
    rows += [
        ["floor: subprocess.run here -> `date` runs", fmt(col("local", "start"), 1),
         spread("local", "start")],
        ["floor: subprocess.run here, whole", fmt(col("local", "result"), 1),
         spread("local", "result")],
    ]
    say(table(["", "median", "min .. max"], rows))
    start = col("dsml", "start")
    ok = None if start is None else start < TARGET_LATENCY_MS
    say(f"  target: dsml median submit -> start < {TARGET_LATENCY_MS:g} ms: {verdict(ok)}")
    return {"start": start, "ok": ok, "assigned": col("dsml", "assigned"),
            "wait": col("dsml", "wait"), "dask_result": col("dask", "result"),
            "dask_start": col("dask", "start")}


# -- profile (an extra run, outside the figures) ----------------------------------------


def profile_dsml(s: Settings, tmp: Path) -> dict[str, str]:
    """One throughput job with the master and the workers under twistd's cProfile.

    The processes are started as LocalCluster starts them, plus ``--profile FILE
    --profiler cprofile --savestats`` (as benchmarks/profile_server.py does); SIGTERM makes
    twistd write the stats.  Returns the printed stats of the master and of one worker.
    """
    import io
    import pstats
    import signal

    cluster = new_cluster(tmp / "profile-cluster")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: list[Any] = []
    out: dict[str, str] = {}
    try:
        for name in ("master", *WORKERS):
            args = [venv_bin("twistd"), "-n", "--pidfile", str(cluster.root / f"{name}.pid"),
                    "--profile", str(tmp / f"{name}.prof"), "--profiler", "cprofile",
                    "--savestats"]
            args += ["dsml-master"] if name == "master" else ["dsml-worker"]
            args += ["-c", str(cluster.config_path)]
            if name != "master":
                args += ["--name", name]
            log = open(cluster.log_path(name), "ab")  # noqa: SIM115 - closed in finally
            logs.append(log)
            procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, cwd=cluster.root)
            deadline = time.monotonic() + 30
            while not cluster.addr_file(name).exists():
                if procs[name].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start under the profiler:\n"
                                       + cluster.tail(name))
                time.sleep(0.02)
        host, port = cluster.address("master")
        with ClusterClient(host, port, cluster.token, timeout=RUN_TIMEOUT + 30) as client:
            wait_for_workers(client)
            note(f"profile: dsml, {s.tasks} tasks under cProfile (not part of the figures)")
            t0 = time.perf_counter()
            status = client.submit(["true"], array=s.tasks, name="bench-profile").wait(
                timeout=RUN_TIMEOUT * 2)
            dt = time.perf_counter() - t0
        out["rate"] = (f"{s.tasks / dt:,.0f} tasks/s under the profiler (job "
                       f"{status['state']})")
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait(timeout=60)
        for name in ("master", WORKERS[0]):
            buf = io.StringIO()
            stats = pstats.Stats(str(tmp / f"{name}.prof"), stream=buf)
            stats.sort_stats("tottime").print_stats(15)
            stats.sort_stats("cumulative").print_stats(r"dsml/|process\.py|_flush", 20)
            out[name] = buf.getvalue()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    return out


def report_profile(res: dict[str, str]) -> None:
    say()
    say(f"PROFILE (an extra run, not in the figures): {res['rate']}")
    say("  cProfile measures wall time: a call that blocks (fdatasync, a vfork until the "
        "child execs) counts whole")
    prefixes = sorted({str(HERE.parent) + "/", *(p + "/" for p in sys.path if
                                                  p.endswith("-packages"))}, key=len)[::-1]
    for name in ("master", WORKERS[0]):
        say()
        say(f"  {name}:")
        for line in res[name].strip().splitlines():
            if not line.strip() or ".prof" in line or "List reduced" in line:
                continue
            for prefix in prefixes:
                line = line.replace(prefix, "")
            say("    " + line.rstrip())


# -- main -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="dsml job throughput and latency beside xargs, Dask")
    p.add_argument("--quick", action="store_true", help="500 tasks, fewer repetitions")
    p.add_argument("--profile", action="store_true",
                   help="also run one throughput job with master and workers under cProfile")
    p.add_argument("--tmpdir", help="parent of the scratch directory (default: $TMPDIR or /tmp)")
    args = p.parse_args(argv)
    s = settings(args)
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    info = (f"nproc={os.cpu_count()}, {cpu_model()}, Python {platform.python_version()}, "
            f"{platform.platform()}, dask {version_of('dask')}, distributed "
            f"{version_of('distributed')}")
    say(f"dsml jobs benchmarks ({'quick' if s.quick else 'full'} run)")
    say(f"  machine: {info}")
    say(f"  load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")

    tmp = Path(tempfile.mkdtemp(prefix="dsml-jobs-bench-", dir=s.tmp_parent))
    cluster: LocalCluster | None = None
    side: DsmlSide | None = None
    dask_started: tuple[Any, Any] | None = None
    dask_missing: str | None = None
    try:
        note("starting a dsml master and two workers")
        cluster, side = start_dsml(tmp / "cluster")
        # dsml and xargs first, with no Dask process up: an idle Dask cluster keeps about
        # 0.15 of a CPU busy (its scheduler's loop runs in this process, beside dsml's
        # client), which cost dsml 4-8% more than xargs when it stayed up throughout.
        # Then Dask, with dsml idle (heartbeats once a second).
        thr_runs = bench_throughput(s, side)
        lat_runs = bench_latency(s, side)
        note("starting a Dask LocalCluster")
        started = start_dask()
        if isinstance(started, str):
            dask_missing = started
        else:
            dask_started = started
            bench_dask_throughput(s, started[1], thr_runs)
            bench_dask_latency(s, started[1], lat_runs)
            stop_dask(started)
            dask_started = None
        thr = report_throughput(s, thr_runs, dask_missing)
        lat = report_latency(s, lat_runs)
        if args.profile:
            report_profile(profile_dsml(s, tmp))
    finally:
        if dask_started is not None:
            stop_dask(dask_started)
        if side is not None:
            side.client.close()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    load1 = os.getloadavg()

    say()
    say("=" * 30 + " summary " + "=" * 30)
    say(f"command: {s.command}   ({elapsed:.0f} s)")
    say(f"machine: {info}, load {load0[0]:.1f} -> {load1[0]:.1f}")
    med = thr["med"]
    say(f"throughput ({s.tasks:,} x `true`, {PARALLEL} slots, {s.reps} reps, medians): dsml "
        f"{fmt(med.get('dsml'))}/s, Dask {fmt(med.get('dask'))}/s, xargs -P {PARALLEL} "
        f"{fmt(med.get('xargs'))}/s")
    say(f"  dsml/Dask = {fmt(thr['q_dask'], 2)}x [target >= {TARGET_VS_DASK:.2f}x: "
        f"{verdict(thr['ok_dask'])}]; dsml/xargs = {fmt(thr['q_xargs'], 2)}x [target >= "
        f"{TARGET_VS_XARGS:.2f}x: {verdict(thr['ok_xargs'])}]")
    say(f"latency (1 task, idle cluster, {s.latency_samples} samples, medians): dsml submit -> "
        f"process start {fmt(lat['start'], 1)} ms [target < {TARGET_LATENCY_MS:g} ms: "
        f"{verdict(lat['ok'])}]; -> assigned {fmt(lat['assigned'], 1)} ms; -> wait() "
        f"{fmt(lat['wait'], 1)} ms; Dask submit -> result {fmt(lat['dask_result'], 1)} ms "
        f"(-> date runs {fmt(lat['dask_start'], 1)} ms)")
    if dask_missing:
        say(f"  Dask skipped: {dask_missing}")
    say("=" * 69)
    return 0


if __name__ == "__main__":
    sys.exit(main())
