"""benchmarks/run.py --tls, run very small: it still prints every side of issue #10's
comparison in one run, with the ratios and targets, and leaves no process behind.

The figures of so small a run mean nothing and are not checked; what is checked is that
the command quoted in the README and the issue works and prints the tables it promises.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"
TIMEOUT = 600.0  # seconds: a busy 2-core machine starts four servers and a CA twice


def _redis_available() -> bool:
    try:
        import redis  # noqa: F401
    except ImportError:
        return False
    return shutil.which("redis-server") is not None


def test_run_tls_prints_every_side_with_ratios_and_targets(tmp_path: Path) -> None:
    """One small --tls run: values dsml+tls / dsml / redis-py+tls, files dsml+tls / dsml /
    raw, the ratios with their targets in the summary, and its scratch directory gone."""
    proc = subprocess.Popen(
        [sys.executable, str(RUN), "--quick", "--tls", "--rounds", "1", "--pairs", "30",
         "--file-mib", "2", "--tmpdir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        cwd=ROOT, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own group: run.py and what it started
            proc.wait()
    text = out.decode()
    assert proc.returncode == 0, err.decode()[-3000:]

    values = text[text.index("VALUES:"):text.index("FILES:")]
    header = next(line for line in values.splitlines() if "tls/plain" in line)
    assert header.split()[:2] == ["dsml+tls", "dsml"]
    assert "tls/redis-tls" in header
    pairs = next(line for line in values.splitlines() if line.strip().startswith("pairs/s"))
    assert re.search(r"pairs/s\s+[\d,]+\s+[\d,]+", pairs)  # both dsml sides measured
    if _redis_available():
        assert "redis-py+tls" in header
        assert "redis-py+tls pairs/s per round:" in values

    files = text[text.index("FILES:"):text.index(" summary ")]
    header = next(line for line in files.splitlines() if "tls/raw" in line)
    assert header.split()[:3] == ["dsml+tls", "dsml", "raw"]
    for op in ("upload", "download"):
        assert re.search(rf"{op} MB/s\s+[\d,]+\s+[\d,]+\s+[\d,]+", files), op

    summary = text[text.index(" summary "):]
    assert "tls/plain" in summary and "[target >= 0.80x:" in summary
    assert "tls/redis-tls" in summary and "[target >= 1.00x:" in summary
    assert summary.count("tls/raw") == 2 and summary.count("[target >= 0.40x:") == 2
    assert list(tmp_path.iterdir()) == []  # the scratch directory was removed
