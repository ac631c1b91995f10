"""benchmarks/datasets.py run very small: it prints the one process, Dask (or why not:
the test extra leaves Dask to `make bench`) and the dsml fit side by side with the
peak RSS of two sizes and the targets, every fit exact (the figures are not checked)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent


def test_the_datasets_benchmark_prints_every_side(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "datasets.py"), "--size", "2MiB",
         "--small", "512KiB", "--chunk", "256KiB", "--dir", str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=600,
        check=False,
    )
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    lines = out.splitlines()
    for side in ("one process", "dsml ml.linear_regression"):
        (line,) = [ln for ln in lines if ln.startswith(side)]
        diff = float(line.split()[-1])
        # Every side's fit is the one process's, to the last bits of the parsers (pandas'
        # float parser is not always correctly rounded, Python's float() is) times the
        # condition of a column of 1000 +- 0.1.
        assert diff < 1e-6, line
    for side in ("dsml ml.linear_regression",):
        (line,) = [ln for ln in lines if ln.startswith(side)]
        assert re.search(r" (\d+)/\1 100% ", line), line  # an idle cluster: every map local
    assert re.search(r"worker daemon \(VmHWM\) +[\d.]+ MiB", out), out
    assert sum(ln.startswith("targets, ") for ln in lines) == 1, out
    try:
        import dask.dataframe  # noqa: F401  (the reference: `make bench` installs it)
    except ImportError:
        assert "not run: " in out, out
    else:
        assert any(ln.startswith("dask (read_csv") for ln in lines), out
