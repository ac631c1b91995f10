"""benchmarks/functions.py run very small: it prints dsml, Dask and the process pool side
by side with the ratios (Dask "not run" where it is not installed: the test extra leaves
it to `make bench`), and leaves no process behind (the figures are not checked)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent


def test_the_functions_benchmark_prints_every_side() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "functions.py"), "--calls", "40",
         "--latency-runs", "3"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=300,
        check=False,
    )
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert re.search(r"the sweep: \d+ lines of code with dsml .*, \d+ with Dask", out), out
    for side in ("dsml", "dask", "process pool"):
        assert any(line.startswith(side) for line in out.splitlines()), out
    try:
        import distributed  # noqa: F401  (the reference: `make bench` installs it)
    except ImportError:
        assert "not run: " in out, out  # said so, the other sides measured
    else:
        assert "dsml/dask: rate" in out, out
