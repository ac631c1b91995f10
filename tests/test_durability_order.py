"""What must reach the disk, and the clock that decides liveness, before anything is said.

Issue #12's mutation check planted these bugs and no test caught them: an object file
renamed into place without fsync, its directory entry not fsynced, and the production
wiring handing the wall clock to the failure detector.  The simulation keeps every file
(it has no power-loss model yet), so these are checked here, at the system calls: each
write records its fsyncs and renames in order, and the test names the order a crash needs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

import dsml.worker.store as store_module
from dsml.config import load_config
from dsml.master.membership import Versions
from dsml.master.service import make_master_service
from dsml.worker.store import Store


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str]]]:
    """Every fsync (of a file or a directory) and rename the store makes, in order."""
    seen: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        kind = "fsync-dir" if os.path.isdir(path) else "fsync"
        seen.append((kind, path))
        real_fsync(fd)

    def rename(src: str, dst: str) -> None:
        seen.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(store_module, "_fdatasync", fsync, raising=False)
    yield seen


def test_a_file_is_fsynced_renamed_and_its_directory_fsynced_before_commit(
    tmp_path: Path, calls: list[tuple[str, str]]
) -> None:
    store = Store(tmp_path / "store")
    try:
        w = store.begin_file("k")
        w.write(b"payload" * 1000)
        calls.clear()
        w.prepare()
        entry = w.commit()
    finally:
        store.close()
    obj = next(p for kind, p in calls if kind == "rename")
    kinds = [kind for kind, _ in calls]
    # The data is on disk before the name points at it, and the name before the commit.
    assert "fsync" in kinds and "rename" in kinds and "fsync-dir" in kinds, calls
    first_fsync = kinds.index("fsync")
    rename_at = kinds.index("rename")
    dir_fsync = [i for i, (kind, p) in enumerate(calls)
                 if kind == "fsync-dir" and p == os.path.dirname(obj)]
    assert first_fsync < rename_at, calls
    assert dir_fsync and dir_fsync[0] > rename_at, f"{obj}'s directory never fsynced: {calls}"
    assert entry.size == 7000


def test_the_failure_detector_runs_on_the_monotonic_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The production wiring: an hour of wall clock passing at once, as when NTP steps
    the clock (``time.time``, and the reactor's seconds of a reactor left on it), does
    not make a worker that just registered dead."""
    cfg = tmp_path / "dsml.yaml"
    cfg.write_text(
        "cluster: {token: a-long-enough-token-for-tests}\n"
        f"master: {{host: 127.0.0.1, port: 0, state_dir: {tmp_path / 'm'}}}\n"
        "workers: {w1: {host: 127.0.0.1, port: 7601, data_dir: w1}}\n"
    )
    reactor = MemoryReactorClock()
    reactor.advance(time.time())  # a reactor left on the wall clock
    real, step = time.time, [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + step[0])  # before the wiring reads it
    top = make_master_service(load_config(cfg), reactor)
    runtime = next(s for s in top if hasattr(s, "membership"))
    membership = runtime.membership
    try:
        versions = membership.versions
        assert isinstance(versions, Versions)
        membership.register("w1", 1, host="127.0.0.1", port=7601, slots=1, versions=versions,
                            conn=object())
        reactor.advance(3600.0)
        step[0] = 3600.0
        assert membership.check() == []
        assert membership.get("w1").live  # type: ignore[union-attr]
    finally:
        runtime.state.close()
