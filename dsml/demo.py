"""``make demo``: a local dsml cluster, driven by the real ``dsml`` command.

Makes the cluster's CA and certificates (``dsml pki init``: every link is TLS 1.3, each
side verified), starts a master and two workers as twistd processes on 127.0.0.1
(OS-chosen ports, replication 2, a worker is dead after 3 s of silence), uploads a 64 MiB
file to both workers, kills one worker with SIGKILL, shows the master noticing, downloads
the file from the survivor and checks its sha256, sets and gets a value, shows that a bad
request gets one clear line, and ends with a seeded synthetic CSV chunk-uploaded
(``dsml upload --chunk``) and fitted by ``dsml.ml.linear_regression``, its coefficients
printed beside numpy's.  It stops everything it started: also on Ctrl-C, SIGTERM or an
error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from .errors import DsmlError
from .localcluster import LocalCluster, ProcessFailed

WORKERS = ("w1", "w2")
HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 3.0
FILE_MIB = 64
PARTS = 4
KEY = "datasets/dataset.bin"
#: The fit's dataset: rows, chunk size, seed and the model it is drawn from.
FIT_ROWS = 40_000
FIT_CHUNK = "512KiB"
FIT_SEED = 15
FIT_COEF = (2.5, -0.75, 4.0)
FIT_INTERCEPT = 7.0


class DemoFailed(Exception):
    """Something the demo checks did not hold."""


class _OutputClosed(Exception):
    """The reader of stdout went away (``make demo | head``): stop the demo."""


def _say(text: str) -> None:
    """Print a line now; when stdout's reader is gone, send the rest to /dev/null and
    unwind (demo()'s finally then stops the cluster)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise _OutputClosed from None


def _step(n: int, text: str) -> None:
    _say(f"\n== {n}. {text}")


def _note(text: str) -> None:
    _say(f"   {text}")


def _run(cluster: LocalCluster, *args: str, input: bytes | None = None, check: bool = True,
         show: bool = True) -> str:
    """Run ``dsml ARGS`` against the cluster; echo the command and its output."""
    if show:
        _say(f"$ dsml {shlex.join(args)}")
    result = cluster.cli(*args, input=input, check=check)
    out = (result.stdout + result.stderr).decode(errors="replace").rstrip()
    if show and out:
        _say(out)
    if show and not check:
        _say(f"(exit status {result.returncode})")
    return result.stdout.decode(errors="replace")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _states(cluster: LocalCluster) -> dict[str, str]:
    """``dsml nodes`` as worker name -> state."""
    doc = json.loads(_run(cluster, "nodes", "--json", show=False))
    return {w["name"]: w["state"] for w in doc["workers"]}


def _wait(what: str, ok: Callable[[], bool], timeout: float) -> float:
    """Poll ``ok()`` until true; return the seconds it took, or raise DemoFailed."""
    start = time.monotonic()
    while not ok():
        if time.monotonic() - start > timeout:
            raise DemoFailed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def demo(root: Path) -> None:
    """The demo's steps, in a cluster under ``root``; raises on anything unexpected."""
    cluster = LocalCluster(
        root / "cluster",
        workers=WORKERS,
        extra={
            "cluster": {
                "replication": 2,
                "heartbeat_interval": HEARTBEAT_INTERVAL,
                "heartbeat_timeout": HEARTBEAT_TIMEOUT,
            }
        },
        tls=True,
    )
    try:
        _step(1, "start a master and two workers (twistd -n, 127.0.0.1, OS-chosen ports)")
        _note(f"config {cluster.config_path}: replication 2, heartbeat every "
              f"{HEARTBEAT_INTERVAL:g} s, dead after {HEARTBEAT_TIMEOUT:g} s of silence")
        _note(f"TLS 1.3 on every link: `dsml pki init` made a CA and certificates for the "
              f"master, {', '.join(WORKERS)} and the user admin in {cluster.pki_dir}")
        for name in ("master", *WORKERS):
            host, port = cluster.start(name)
            _note(f"{name:<6} pid {cluster.procs[name].pid:<7} listening on {host}:{port}")
        took = _wait("both workers to register",
                     lambda: _states(cluster) == dict.fromkeys(WORKERS, "alive"), 30)
        _note(f"both workers registered with the master within {took:.1f} s")

        _step(2, f"upload a {FILE_MIB} MiB file; the master places it on both workers")
        data = root / "dataset.bin"
        with open(data, "wb") as f:
            for _ in range(FILE_MIB):
                f.write(os.urandom(1 << 20))
        digest = _sha256(data)
        t = time.perf_counter()
        _run(cluster, "upload", str(data), KEY)
        up = time.perf_counter() - t
        _note(f"{FILE_MIB / up:.0f} MiB/s, to two workers in a pipeline, command start included")

        _step(3, "what the master knows")
        _run(cluster, "nodes")
        _run(cluster, "ls", "-l")

        victim = WORKERS[0]
        _step(4, f"kill -9 {victim}")
        killed = time.monotonic()
        cluster.kill(victim, signal.SIGKILL)
        _note(f"{victim} (pid {cluster.procs[victim].pid}) killed with SIGKILL")
        _wait(f"the master to see {victim} dead",
              lambda: _states(cluster).get(victim) == "dead", HEARTBEAT_TIMEOUT + 5)
        _note(f"the master shows it dead {time.monotonic() - killed:.2f} s after the kill "
              f"(its link closed; a silent worker would take {HEARTBEAT_TIMEOUT:g} s)")
        _run(cluster, "nodes")

        _step(5, f"download the file again: {WORKERS[1]} still has a copy")
        copy = root / "copy.bin"
        t = time.perf_counter()
        _run(cluster, "download", KEY, str(copy))
        down = time.perf_counter() - t
        same = _sha256(copy) == digest
        _note(f"sha256 {'matches' if same else 'DIFFERS'}: {digest}")
        _note(f"{FILE_MIB / down:.0f} MiB/s, command start included")
        if not same:
            raise DemoFailed("the downloaded file's sha256 differs from the upload's")

        _step(6, "set and get a value")
        _run(cluster, "set", "experiments/lr", "0.001")
        value = _run(cluster, "get", "experiments/lr")
        if value != "0.001":
            raise DemoFailed(f"get returned {value!r}, not '0.001'")

        _step(7, f"bring {victim} back and run a job over the cluster")
        cluster.start(victim)
        _wait(f"{victim} to register again",
              lambda: _states(cluster) == dict.fromkeys(WORKERS, "alive"), 30)
        words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
        for part in range(PARTS):
            text = root / f"part{part}.txt"
            text.write_text(" ".join(words[: 2 + part * 2] * (part + 1)) + "\n")
            _run(cluster, "upload", str(text), f"corpus/part{part}.txt")
        job = _run(
            cluster, "submit", "--name", "wordcount", "--array", str(PARTS),
            "--input", "corpus/part{index}.txt:part.txt",
            "--output", "count.txt:results/count-{index}.txt",
            "--", "sh", "-c",
            'wc -w < part.txt > count.txt; '
            'echo "task $DSML_TASK_INDEX on $(hostname): $(cat count.txt) words"',
        ).strip()
        _run(cluster, "wait", job)
        _run(cluster, "status", job)
        counts = []
        for i in range(PARTS):
            out = root / f"count-{i}.txt"
            _run(cluster, "download", f"results/count-{i}.txt", str(out))
            counts.append(int(out.read_text().split()[0]))
        _note(f"word counts per part: {counts} (total {sum(counts)})")
        _note("the log of task 1:")
        _run(cluster, "logs", job, "--task", "1")

        _step(8, "bad requests get one clear line and a non-zero exit status")
        _run(cluster, "get", "no/such/key", check=False)
        _run(cluster, "get", KEY, check=False)
        _run(cluster, "--identity", "mallory", "ls", check=False)  # no certificate of hers

        _step(9, "a dataset in chunks, and a linear regression fitted where they are")
        _fit(cluster, root)
    finally:
        cluster.stop()  # first: whatever happens to the lines below, nothing is left running
        _step(10, "stop everything the demo started")
        for name, proc in cluster.procs.items():
            _note(f"{name:<6} pid {proc.pid:<7} {_ended(proc.returncode)}")


def _fit(cluster: LocalCluster, root: Path) -> None:
    """A seeded synthetic CSV, chunk-uploaded with ``dsml upload --chunk``, fitted by
    ``dsml.ml.linear_regression`` (one map per chunk, on a worker holding it), beside
    numpy's ``lstsq`` on the whole file."""
    import numpy as np

    from .client import ClusterClient
    from .ml import linear_regression

    rng = np.random.default_rng(FIT_SEED)
    x = rng.normal(size=(FIT_ROWS, 3)) * [1.0, 10.0, 0.5] + [0.0, 100.0, -2.0]
    y = x @ np.array(FIT_COEF) + FIT_INTERCEPT + rng.normal(scale=0.1, size=FIT_ROWS)
    path = root / "games.csv"
    with open(path, "w") as f:
        f.write("a,b,c,y\n")
        f.writelines(",".join(map(repr, map(float, (*row, t)))) + "\n"
                     for row, t in zip(x, y, strict=True))
    model = "".join(f" {'-' if c < 0 else '+'} {abs(c):g} {n}"
                    for c, n in zip(FIT_COEF, "abc", strict=True))
    _note(f"{FIT_ROWS:,} seeded rows, y = {FIT_INTERCEPT:g}{model} + noise: "
          f"{path.stat().st_size / (1 << 20):.1f} MiB")
    _run(cluster, "upload", "--chunk", FIT_CHUNK, str(path), "datasets/games")
    host, port = cluster.address("master")
    with ClusterClient(host, port, cluster.token, tls=cluster.user_tls()) as client:
        t = time.perf_counter()
        fit = linear_regression("datasets/games", "y", ["a", "b", "c"], client=client,
                                timeout=120)
        took = time.perf_counter() - t
    _note(f">>> dsml.ml.linear_regression('datasets/games', 'y', ['a', 'b', 'c'])  "
          f"# {fit.chunks} maps, {took:.1f} s, {100 * fit.locality:.0f}% data-local")
    back = np.loadtxt(path, delimiter=",", skiprows=1)
    ref = np.linalg.lstsq(np.column_stack([np.ones(len(back)), back[:, :3]]), back[:, 3],
                          rcond=None)[0]
    got = np.concatenate([[fit.intercept], fit.coef])
    _note(f"{'':<10}{'dsml':>22}{'numpy lstsq':>22}{'difference':>12}")
    for name, a, b in zip(("intercept", "a", "b", "c"), got, ref, strict=True):
        _note(f"{name:<10}{a:>22.15f}{b:>22.15f}{a - b:>12.1e}")
    worst = float(np.max(np.abs(got - ref) / np.abs(ref)))
    _note(f"largest relative difference {worst:.1e} over {fit.n:,} rows")
    if fit.n != FIT_ROWS or worst > 1e-9:
        raise DemoFailed(f"the fit differs from numpy's: {worst:.1e} (n {fit.n})")


def _ended(status: int | None) -> str:
    """How a process ended, from its exit status (twistd re-raises SIGTERM once it has
    shut down cleanly, so its status says SIGTERM)."""
    if status is None:
        return "still running"
    if status < 0:
        try:
            return f"ended by {signal.Signals(-status).name}"
        except ValueError:
            return f"ended by signal {-status}"
    return f"exited with status {status}"


class _Terminated(Exception):
    """SIGTERM arrived."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminated  # unwinds through demo()'s finally, which stops the cluster


def main() -> int:
    """Run the demo; return an exit status (0 if every check held)."""
    signal.signal(signal.SIGTERM, _terminate)
    with tempfile.TemporaryDirectory(prefix="dsml-demo-") as tmp:
        try:
            demo(Path(tmp))
        except _OutputClosed:
            return 141  # 128 + SIGPIPE, as a shell reports a process killed by it
        except (KeyboardInterrupt, _Terminated) as e:
            print("\ndemo interrupted; everything it started is stopped", file=sys.stderr)
            return 143 if isinstance(e, _Terminated) else 130
        except (DemoFailed, ProcessFailed, DsmlError, OSError) as e:
            print(f"\ndemo failed: {e}", file=sys.stderr)
            return 1
    try:
        _say("\ndemo finished: every check held")
    except _OutputClosed:
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
