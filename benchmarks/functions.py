"""Issue #14's functions benchmark: dsml's Executor beside Dask distributed and a local
process pool, in one run.

    PYTHONPATH=. python benchmarks/functions.py [--calls 2000] [--latency-runs 15]

Each side runs ``--calls`` tiny calls (``tiny(i) = i + 1``) as one map (tasks/s, from
the map's submission to its last result), then the median submit-to-result latency of
one call on the idle system (each sample after :data:`IDLE_GAP` seconds of quiet):

- dsml: a LocalCluster of 2 workers x 2 CPUs, ``dsml.Executor`` (the map is one job,
  batched into at most 3 tasks per CPU); the workers run calls with this interpreter;
- Dask distributed: ``LocalCluster(n_workers=2, threads_per_worker=2, processes=True)``;
- ``concurrent.futures.ProcessPoolExecutor(4)`` (already started: a warm pool).

Figures depend on the machine; the ratios (dsml / Dask) are the point, against the
issue's targets: a rate at least Dask's, a latency under 3x Dask's.
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


#: Seconds of quiet before each latency sample, on every side alike: the target is the
#: latency of one call on an idle cluster, so a sample must not pay for the work the
#: call before it left behind (a dsml worker starting the next warm interpreter, ~50 ms
#: of CPU; a Dask worker's own housekeeping).
IDLE_GAP = 0.3


def tiny(i: int) -> int:
    return i + 1


def measure(submit_map: Callable[[list[int]], list[Any]],
            one: Callable[[int], Any], calls: int, runs: int) -> dict[str, float]:
    one(0)  # warm: the function stored, connections open, workers up
    start = time.perf_counter()
    out = submit_map(list(range(calls)))
    rate = calls / (time.perf_counter() - start)
    assert out == [i + 1 for i in range(calls)]
    lat = []
    for i in range(runs):
        time.sleep(IDLE_GAP)  # each call on an idle cluster, as the target says
        t = time.perf_counter()
        assert one(i) == i + 1
        lat.append(time.perf_counter() - t)
    return {"rate": rate, "latency_ms": 1000 * statistics.median(lat)}


def dsml_side(calls: int, runs: int) -> dict[str, float]:
    import dsml
    from dsml.localcluster import LocalCluster

    workers = {n: {"host": "127.0.0.1", "port": 0, "data_dir": n, "cpus": 2,
                   "task_env": ["PYTHONPATH"]} for n in ("w1", "w2")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(
            Path(tmp), workers=tuple(workers), extra={"workers": workers}) as c:
        for name in ("master", "w1", "w2"):
            c.start(name)
        with dsml.connect(c.config_path) as client:
            deadline = time.monotonic() + 30
            while len(client.nodes()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            with dsml.Executor(client, python=sys.executable) as ex:
                return measure(lambda xs: list(ex.map(tiny, xs)),
                               lambda i: ex.submit(tiny, i).result(), calls, runs)


def dask_side(calls: int, runs: int) -> dict[str, float] | str:
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:
        return f"not run: {e}"
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        return measure(lambda xs: client.gather(client.map(tiny, xs, pure=False)),
                       lambda i: client.submit(tiny, i, pure=False).result(), calls, runs)


def pool_side(calls: int, runs: int) -> dict[str, float]:
    ex: Executor
    with ProcessPoolExecutor(4) as ex:
        return measure(lambda xs: list(ex.map(tiny, xs)),
                       lambda i: ex.submit(tiny, i).result(), calls, runs)


def code_lines(path: Path) -> int:
    """Lines of a script that are code: not blank, not comments, not docstrings."""
    tree = ast.parse(path.read_text())
    doc_lines: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(
                body[0].value.value, str):
            doc_lines.update(range(body[0].lineno, (body[0].end_lineno or 0) + 1))
    return sum(1 for n, line in enumerate(path.read_text().splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and n not in doc_lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--latency-runs", type=int, default=15)
    a = p.parse_args(argv)
    sides = {"dsml": dsml_side(a.calls, a.latency_runs),
             "dask": dask_side(a.calls, a.latency_runs),
             "process pool": pool_side(a.calls, a.latency_runs)}
    print(f"{a.calls} tiny calls as one map; median latency of one call over "
          f"{a.latency_runs} (cpus: {os.cpu_count()})")
    print(f"{'side':<14}{'calls/s':>12}{'latency ms':>12}")
    for name, r in sides.items():
        if isinstance(r, str):
            print(f"{name:<14}{r}")
        else:
            print(f"{name:<14}{r['rate']:>12.0f}{r['latency_ms']:>12.1f}")
    examples = Path(__file__).resolve().parent.parent / "examples"
    print(f"the sweep: {code_lines(examples / 'sweep.py')} lines of code with dsml"
          f" (examples/sweep.py), {code_lines(examples / 'sweep_dask.py')} with Dask"
          " (examples/sweep_dask.py); docstrings, comments and blank lines not counted")
    d, k = sides["dsml"], sides["dask"]
    if isinstance(d, dict) and isinstance(k, dict):
        rate, lat = d["rate"] / k["rate"], d["latency_ms"] / k["latency_ms"]
        print(f"dsml/dask: rate {rate:.2f}x (target >= 1: {'met' if rate >= 1 else 'NOT met'})"
              f", latency {lat:.2f}x (target < 3: {'met' if lat < 3 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
