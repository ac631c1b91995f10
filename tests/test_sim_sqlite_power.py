"""The simulated power loss of the master's machine (:func:`dsml.testing.sim.disk.lose_wal`):
its state file keeps what SQLite made durable under the master's settings (WAL; FULL for
commits that acknowledge something, NORMAL for the rest), and nothing more."""

from __future__ import annotations

from pathlib import Path

from dsml.master.state import MasterState
from dsml.testing.sim import disk


def test_a_power_loss_takes_the_normal_commits_since_the_last_full_one(tmp_path: Path) -> None:
    state = MasterState(tmp_path / "master.sqlite3")
    disk.watch_wal(state)
    state.set_setting("acknowledged", 1)  # FULL: durable when it returns
    with state.transaction(lazy=True):  # NORMAL: survives a crash, not a power loss
        state.set_setting("lazy", 2)
    restore, lost = disk.lose_wal(state)
    state.close()
    restore()
    assert lost > 0
    again = MasterState(tmp_path / "master.sqlite3")
    try:
        assert again.get_setting("acknowledged") == 1
        assert again.get_setting("lazy") is None
    finally:
        again.close()


def test_a_full_commit_makes_the_normal_ones_before_it_durable(tmp_path: Path) -> None:
    state = MasterState(tmp_path / "master.sqlite3")
    disk.watch_wal(state)
    with state.transaction(lazy=True):
        state.set_setting("lazy", 2)
    state.set_setting("acknowledged", 1)
    restore, lost = disk.lose_wal(state)
    state.close()
    restore()
    assert lost == 0
    again = MasterState(tmp_path / "master.sqlite3")
    try:
        assert again.get_setting("lazy") == 2 and again.get_setting("acknowledged") == 1
    finally:
        again.close()
