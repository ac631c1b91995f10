"""What every test module shares: process tests' ``tmp_path`` is open to the task user.

A worker running as root runs its tasks as ``nobody`` (``task_user``,
:mod:`dsml.worker.tasks.taskuser`).  Process tests hand files to their tasks and back
through ``tmp_path`` (a file a task waits for, one it writes its pid to), as a user would
through a shared directory: where the tests run as root, a ``processes`` test's
``tmp_path`` is made writable by anyone and its parents searchable (not listable) by
anyone.  The workers' data dirs under it stay 0700, their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import dsml
from dsml.client import ClusterClient
from dsml.localcluster import LocalCluster


@pytest.fixture(autouse=True)
def _tmp_path_open_to_the_task_user(request: pytest.FixtureRequest) -> None:
    if os.geteuid() != 0 or request.node.get_closest_marker("processes") is None:
        return
    if "tmp_path" not in request.fixturenames:
        return
    tmp: Path = request.getfixturevalue("tmp_path")
    base = request.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    for parent in tmp.parents:
        if parent == base.parent.parent:  # up to the pytest-of-<user> directory
            break
        parent.chmod(parent.stat().st_mode & 0o7777 | 0o111)
    tmp.chmod(0o777)


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> Iterator[ClusterClient]:
    """A client of the module's ``cluster`` fixture (a module may define its own)."""
    with dsml.connect(cluster.config_path) as c:
        yield c


@pytest.fixture(scope="session")
def ml_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Four workers of two slots, every key on two of them, tasks importing this
    checkout: one cluster for the modules of the ML fits (``test_ml_processes``,
    ``test_logistic_processes``), started once.  Their keys are their own."""
    names = ("w1", "w2", "w3", "w4")
    workers = {n: {"host": "127.0.0.1", "port": 0, "data_dir": n, "cpus": 2,
                   "task_env": ["PYTHONPATH"]} for n in names}
    with LocalCluster(tmp_path_factory.mktemp("ml"), workers=names,
                      extra={"workers": workers, "cluster": {"replication": 2}}) as c:
        c.start_all()
        yield c
