"""Issue #15's datasets benchmark: a linear regression over a chunked CSV on four local
workers, beside one process and Dask, in one run.

    PYTHONPATH=. python benchmarks/datasets.py [--size 2GiB] [--chunk 256MiB] [--small 512MiB]

A seeded synthetic CSV of ``--size`` bytes (four features and a target, six decimals) is
written to ``--dir`` (default: a temporary directory, removed after), then the same fit
(count, means and centred co-moments merged block by block: ``dsml.ml``'s statistics;
the coefficients solved the same way) is timed on each side:

- one process: ``pandas.read_csv`` in blocks of a million rows, numpy sums;
- Dask: ``dask.dataframe.read_csv`` (blocks of ``--chunk``), the same sums per partition,
  on a distributed ``LocalCluster`` of 4 worker processes of one thread;
- dsml: a LocalCluster of 4 workers of one CPU (``preload: [numpy, pandas, dsml.ml]``:
  their warm interpreters import those ahead, as Dask's workers have them imported),
  replication 2; the file chunk-uploaded
  (``upload_dataset``, timed apart), then ``dsml.ml.linear_regression`` (its chunks
  parsed by pandas' C reader in blocks, on the workers).  Locality is the master's report
  (the job's attempts started on a holder of their chunk); peak RSS is each worker
  daemon's VmHWM and each map process's peak as its worker measured it.

The dsml side runs again on a ``--small`` dataset with fresh workers: peak RSS flat in
the dataset's size means the two peaks alike.  The targets: faster than the one
process, at least Dask's rate, locality at least 95%, RSS flat (within 25%).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import proc_status_kib  # noqa: E402

WORKERS = ("w1", "w2", "w3", "w4")
COLUMNS = ("a", "b", "c", "d", "y")
#: The synthetic model: y = INTERCEPT + x . COEF + noise, x scaled and offset per column.
COEF = (1.5, -2.0, 0.25, 3.0)
INTERCEPT = 2.0
SCALE = (1.0, 10.0, 100.0, 0.1)
OFFSET = (0.0, 5.0, -3.0, 1000.0)
#: Rows per block of the one-process reader (and of the generator).
BLOCK = 1_000_000
#: RSS is flat when the big dataset's peak is within this factor of the small one's.
FLAT = 1.25
GIB, MIB = 1 << 30, 1 << 20

Stats = tuple[int, Any, Any]


# -- the data ------------------------------------------------------------------------


def generate(path: Path, size: int, seed: int = 15) -> int:
    """Write a seeded CSV of about ``size`` bytes (at least one row); its row count."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = 0
    per_row = 0.0
    with open(path, "wb") as f:
        f.write((",".join(COLUMNS) + "\n").encode())
        while f.tell() < size:
            # A first block of a thousand rows measures a row's size; then the rest.
            left = size - f.tell()
            want = 1000 if not per_row else max(1, min(BLOCK, int(left / per_row)))
            x = rng.normal(size=(want, 4)) * SCALE + OFFSET
            y = x @ COEF + INTERCEPT + rng.normal(scale=0.5, size=want)
            z = np.round(np.column_stack([x, y]), 6)
            start = f.tell()
            _write_rows(f, z)
            per_row = (f.tell() - start) / want
            rows += want
    return rows


def _write_rows(f: Any, z: Any) -> None:
    try:
        import pyarrow as pa
        import pyarrow.csv as pc
    except ImportError:  # pandas formats a tenth as fast
        import pandas as pd

        pd.DataFrame(z).to_csv(f, header=False, index=False, float_format="%.6f")
        return
    table = pa.table({name: z[:, i] for i, name in enumerate(COLUMNS)})
    pc.write_csv(table, f, pc.WriteOptions(include_header=False))


# -- the sums (every side alike) --------------------------------------------------------


def block_stats(z: Any) -> Stats:
    import dsml.ml

    return dsml.ml._block_stats(z)  # noqa: SLF001  (the library's own, for equal work)


def solve(stats: Stats) -> Any:
    import numpy as np

    import dsml.ml

    coef, intercept = dsml.ml.solve(stats)
    return np.concatenate([[intercept], coef])


def merged(parts: Iterator[Stats] | list[Stats]) -> Stats:
    import numpy as np

    import dsml.ml

    total: Stats = (0, np.zeros(len(COLUMNS)), np.zeros((len(COLUMNS),) * 2))
    for s in parts:
        total = dsml.ml.merge(total, s)
    return total


# -- the sides -------------------------------------------------------------------------


def one_process(path: Path) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    start = time.perf_counter()
    stats = merged(block_stats(b.to_numpy(dtype=np.float64))
                   for b in pd.read_csv(path, dtype=np.float64, chunksize=BLOCK))
    return {"wall": time.perf_counter() - start, "n": stats[0], "coef": solve(stats)}


def _frame_stats(frame: Any) -> Stats:
    import numpy as np

    return block_stats(frame.to_numpy(dtype=np.float64))


def dask_side(path: Path, chunk: int) -> dict[str, Any] | str:
    try:
        import dask
        import dask.dataframe as dd
        from distributed import Client, LocalCluster
    except ImportError as e:
        return f"not run: {e}"
    import numpy as np

    with LocalCluster(n_workers=len(WORKERS), threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster):
        start = time.perf_counter()
        frame = dd.read_csv(str(path), blocksize=chunk, dtype=np.float64)
        parts = dask.compute(*[dask.delayed(_frame_stats)(p) for p in frame.to_delayed()])
        stats = merged(list(parts))
        return {"wall": time.perf_counter() - start, "n": stats[0], "coef": solve(stats),
                "chunks": len(parts)}


def dsml_side(path: Path, chunk: int, root: Path) -> dict[str, Any]:
    """Upload, then both fits, on a fresh cluster: timings, locality, peak RSS."""
    import dsml
    import dsml.ml
    from dsml.localcluster import LocalCluster

    workers = {n: {"host": "127.0.0.1", "port": 0, "data_dir": n, "cpus": 1,
                   "task_env": ["PYTHONPATH"], "preload": ["numpy", "pandas", "dsml.ml"]}
               for n in WORKERS}
    # The map processes import this checkout's dsml (the fast parser is new).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))
    out: dict[str, Any] = {}
    with LocalCluster(root, workers=WORKERS, extra={
            "workers": workers, "cluster": {"replication": 2}}) as c:
        c.start_all()
        with dsml.connect(c.config_path) as client:
            start = time.perf_counter()
            m = client.upload_dataset(path, "datasets/bench", chunk=chunk)
            out["upload"] = time.perf_counter() - start
            out["chunks"] = len(m["chunks"])
            out["rows"] = m["rows"]

            def fit_ml() -> Any:
                fit = dsml.ml.linear_regression("datasets/bench", "y", list(COLUMNS[:-1]),
                                                client=client, timeout=3600)
                return fit.n, [fit.intercept, *fit.coef]

            out["ml"] = _timed_fit(client, fit_ml)
        out["daemon_rss"] = max(_hwm(c.procs[w].pid) for w in WORKERS)
    return out


def _timed_fit(client: Any, fit: Callable[[], Any]) -> dict[str, Any]:
    from dsml.client.jobhandle import locality_of

    start = time.perf_counter()
    n, coef = fit()
    wall = time.perf_counter() - start
    job = client.job_status(client.jobs(1)[0]["id"])  # the map just run: the newest job
    peak = max((a.get("peak_rss") or 0 for t in job["tasks"] for a in t["attempts"]),
               default=0)
    return {"wall": wall, "n": n, "coef": coef, "locality": locality_of(job),
            "task_rss": peak}


def _hwm(pid: int) -> int:
    """A live process's peak RSS (bytes)."""
    return (proc_status_kib(pid, "VmHWM") or 0) * 1024


# -- the report ------------------------------------------------------------------------


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _rate(r: float) -> str:
    return f"{r / 1e6:.2f}M" if r >= 1e6 else f"{r / 1e3:.0f}k"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(size: int, small: int, rows: int, base: dict[str, Any], dask: dict[str, Any] | str,
           big: dict[str, Any], little: dict[str, Any], tmp: Path) -> None:
    import numpy as np

    print(f"dataset: {_size(size)} CSV, {rows:,} rows x {len(COLUMNS)} columns (seeded), "
          f"{big['chunks']} chunks; dsml: 4 workers x 1 CPU, replication 2; "
          f"dask: 4 processes x 1 thread (cpus: {os.cpu_count()}; data in {tmp})")
    print(f"dsml chunk upload: {big['upload']:.1f} s, {size / big['upload'] / MIB:.0f} MiB/s "
          f"(not in the fits' times)")
    ref = np.asarray(base["coef"])
    print(f"{'side':<34}{'wall s':>8}{'rows/s':>9}{'vs 1 proc':>11}{'locality':>15}"
          f"{'coef rel diff':>15}")
    rows_of: dict[str, tuple[str, dict[str, Any]]] = {
        "one process (pandas + numpy)": ("-", base)}
    if isinstance(dask, dict):
        rows_of["dask (read_csv + the sums)"] = ("-", dask)
    where = big["ml"]["locality"]
    local = (f"{where['local']}/{where['local'] + where['remote']} "
             f"{100 * (where['fraction'] or 0):.0f}%")
    rows_of["dsml ml.linear_regression"] = (local, big["ml"])
    for label, (local, r) in rows_of.items():
        assert r["n"] == rows, (label, r["n"], rows)
        diff = float(np.max(np.abs(np.asarray(r["coef"]) - ref) / np.abs(ref)))
        print(f"{label:<34}{r['wall']:>8.2f}{_rate(rows / r['wall']):>9}"
              f"{base['wall'] / r['wall']:>10.2f}x{local:>15}{diff:>15.1e}")
    if isinstance(dask, str):
        print(f"{'dask':<34}{dask}")
    print(f"peak RSS (max over processes)  {_size(size):>10} {_size(small):>10}   ratio")
    for label, get in (("dsml worker daemon (VmHWM)", lambda d: d["daemon_rss"]),
                       ("map process", lambda d: d["ml"]["task_rss"])):
        a, b = get(big), get(little)
        print(f"  {label:<29}{_size(a):>10} {_size(b):>10}   {a / b if b else float('nan'):.2f}")
    for key, label in (("ml", "dsml.ml.linear_regression"),):
        r = big[key]
        speed = base["wall"] / r["wall"]
        vs_dask = dask["wall"] / r["wall"] if isinstance(dask, dict) else None
        fraction = r["locality"]["fraction"] or 0.0
        flat = max(big["daemon_rss"] / little["daemon_rss"],
                   r["task_rss"] / max(1, little[key]["task_rss"]))
        print(f"targets, {label}: faster than one process {_met(speed > 1)} ({speed:.2f}x); "
              + (f"at least Dask's rate {_met(vs_dask >= 1)} ({vs_dask:.2f}x); "
                 if vs_dask is not None else "Dask not run; ")
              + f"locality >= 95% {_met(fraction >= 0.95)} ({100 * fraction:.0f}%); "
              f"RSS flat {_met(flat <= FLAT)} ({flat:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    from dsml.config import parse_size

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2GiB", help="the dataset's size (default 2GiB)")
    p.add_argument("--small", default=None,
                   help="the second dataset, for the RSS comparison (default: size / 4)")
    p.add_argument("--chunk", default="256MiB",
                   help="chunk (and Dask block) size (default 256MiB: a map task pays "
                        "about 0.7 s of imports, which a 64MiB chunk parses in a third of)")
    p.add_argument("--dir", default=None, help="where to write the data (default: a "
                   "temporary directory under $TMPDIR, removed after)")
    a = p.parse_args(argv)
    size, chunk = parse_size(a.size), parse_size(a.chunk)
    small = parse_size(a.small) if a.small else max(1, size // 4)
    tmp = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="dsml-bench-datasets-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        rows = generate(tmp / "big.csv", size)
        generate(tmp / "small.csv", small, seed=16)
        print(f"generated in {time.perf_counter() - t:.1f} s", flush=True)
        base = one_process(tmp / "big.csv")
        dask = dask_side(tmp / "big.csv", chunk)
        big = dsml_side(tmp / "big.csv", chunk, tmp / "cluster-big")
        shutil.rmtree(tmp / "cluster-big", ignore_errors=True)  # its disk, before the next
        little = dsml_side(tmp / "small.csv", chunk, tmp / "cluster-small")
        report(size, small, rows, base, dask, big, little, tmp)
    finally:
        if not a.dir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
