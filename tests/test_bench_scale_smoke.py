"""benchmarks/scale.py still runs: its quick size ends cleanly and prints the table.

A smoke test of the benchmark, not of the master's figures: it runs ``scale.py --quick
--window 1`` (a real master, 50 simulated workers, 20,000 keys, a 2,000-task array, 1 s
steady and repair windows: about 15 s on an idle machine) and asserts only that it exits
0 and prints every row of its table.
Nothing about the figures themselves is asserted: they are the benchmark's to print.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "scale.py"
#: The table's row names (benchmarks/scale.py: ROW_*).
ROWS = (
    "master RSS, all registered with K keys",
    "master peak RSS (VmHWM), whole run",
    "master CPU, steady: N workers' heartbeats + repair",
    "repair CPU, steady (the repairer's passes)",
    "worst stall during the array submit",
    "worst stall during a dead worker's repair",
    "re-registration of all N after a master restart",
)
#: The whole run's bound (the brief: under 90 s).
TIMEOUT = 90.0


def test_scale_quick_prints_its_table(tmp_path: Path) -> None:
    """``scale.py --quick`` exits 0 and prints every row name of its table."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--window", "1", "--tmpdir", str(tmp_path)],
        capture_output=True,
        timeout=TIMEOUT,
        cwd=ROOT,
    )
    out = result.stdout.decode(errors="replace")
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 0, f"exit {result.returncode}\n{out}\n{err[-3000:]}"
    for row in ROWS:
        assert row in out, f"row {row!r} missing from:\n{out}"
    # Everything lived under the one scratch directory, and it is gone.
    assert not list(tmp_path.glob("dsml-scale-bench-*"))
