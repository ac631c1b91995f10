"""The whole cluster in one process, on one fake clock, over an in-memory network.

Layer 3 of the test plan (see ``design.md``): a real master and real workers (the
production wiring of :func:`dsml.master.service.build_master` and
:func:`dsml.worker.service.build_worker`: SQLite state, stores on disk, storage servers,
orders, the link to the master with its heartbeats and backoff, the worker's own cluster
client) and clients (the production async client), all driven by one
:class:`twisted.internet.task.Clock`.  Nothing touches the real reactor, a socket or a
thread, so a run is fast and repeats exactly.

Faults are injected with the network (:class:`FakeNetwork`: cut a link, crash a node,
make a node silent) and with the cluster (:class:`SimCluster`: kill, silence, restart a
worker, restart the master)::

    sim = SimCluster(tmp_path, workers=("w1", "w2", "w3"), replication=2)
    client = sim.client()
    sim.wait(client.upload("a", b"bytes"))
    sim.kill("w1")
    assert sim.wait(client.download("a")) == b"bytes"
    sim.advance(15)            # past the grace period: re-replication
    sim.restart("w1")          # over its old store
    sim.until(lambda: all(len(w) == 2 for w in sim.replicas().values()))
    sim.close()

Time only moves when the test moves it (:meth:`SimCluster.advance`, :meth:`SimCluster.wait`,
:meth:`SimCluster.until`); after every step the network is flushed until nothing moves.

Jobs run on the production master and worker glue too, but every worker's task runner is
a :class:`FakeTaskManager`: an attempt "runs" for the simulated seconds its
:class:`FakeRun` says (scripted per attempt, by default from the task's ``SIM_*``
environment) on its worker's clock, so it dies with its worker::

    job = sim.wait(client.submit(["work"], array=4, env={"SIM_DURATION": "5"}))
    sim.kill("w1")                      # its attempts are lost, their tasks rerun
    sim.restart("w1", adopt=True)       # ... or its fake tasks go on in the new process
    assert sim.wait(client.wait(job))["state"] == "succeeded"
    sim.events("start", job), sim.results   # what the runners did, what the master took

The rooms: :mod:`.network` (the in-memory TCP and its faults), :mod:`.process` (a
process's clock, inline threads, listening), :mod:`.tasks` (the fake task runner),
:mod:`.cluster` (:class:`SimCluster`).  Its clients are the production async client,
:class:`dsml.net.cluster_client.AsyncClusterClient` (here also named :data:`SimClient`), over
the simulated network.  Every public name is importable from here.
"""

from __future__ import annotations

from ...errors import ConnectionLost
from .cluster import (
    MASTER_HOST,
    MASTER_PORT,
    FailureLog,
    ResultSeen,
    SimClient,
    SimCluster,
    SimTimeout,
)
from .network import (
    HIGH_WATER,
    MAX_ROUNDS,
    FakeConnection,
    FakeEndpoint,
    FakeNetwork,
    FakeTransport,
)
from .process import NetListen, ProcessClock, run_inline
from .tasks import SIGTERM, FakeRun, FakeTaskManager, Orphan, Script, TaskEvent, default_script

#: :class:`FakeConnection` under the name this package has always exported it by
#: (``dsml.net.connection.Connection`` is the real one).
Connection = FakeConnection

__all__ = [
    "HIGH_WATER",
    "MASTER_HOST",
    "MASTER_PORT",
    "MAX_ROUNDS",
    "SIGTERM",
    "Connection",
    "ConnectionLost",
    "FailureLog",
    "FakeConnection",
    "FakeEndpoint",
    "FakeNetwork",
    "FakeRun",
    "FakeTaskManager",
    "FakeTransport",
    "NetListen",
    "Orphan",
    "ProcessClock",
    "ResultSeen",
    "Script",
    "SimClient",
    "SimCluster",
    "SimTimeout",
    "TaskEvent",
    "default_script",
    "run_inline",
]
