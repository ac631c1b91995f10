"""The master (the seed's MasterNode): its parts, wired in dependency order.

Workers keep one link each (registration, heartbeats, reports; orders come back down the
same link).  Clients ask it where to write (``place``) and where to read (``locate``),
then move bytes straight to and from workers: the master never carries file payloads.
Liveness lives in memory; the directory, settings and incarnations live in SQLite, so a
restart loses nothing acknowledged and workers simply register again.

The rooms: :mod:`.registry` (workers), :mod:`.keyspace` (keys), :mod:`.jobrouter` (jobs),
:mod:`.repair` (copies), each over :mod:`.membership`, :mod:`.directory` and
:mod:`.jobs`; :mod:`.requests` decodes and answers the wire methods.  This module builds
them, each with what it needs, and the services that start and stop them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from .. import __version__
from ..config import MASTER_ADDR_FILE, Config, Retention
from ..fsutil import private_dir
from ..gcwatch import DaemonGc, GcWatch, freeze_startup
from ..lagprobe import LagProbe
from ..net.access import DEFAULT_ADMINS
from ..net.limits import Limits
from ..net.listen import ListenService
from ..net.responders import Responders
from ..net.server import ServerFactory
from ..net.tls import PeerCheck, load_tls
from ..pki import MASTER_NAME
from ..protocol.codec import PROTOCOL_VERSION
from ..protocol.methods import master_methods
from .directory import Directory
from .jobrouter import JobRouter
from .jobs import JOBS_FILE, JobManager
from .keyspace import KeySpace
from .membership import Membership, Versions
from .registry import WorkerRegistry
from .repair import Repairer
from .requests import MasterHandler
from .state import MasterState
from .tombstones import TombstoneRetention

#: The file, under the master's state_dir, that says where it listens.
ADDR_FILE = MASTER_ADDR_FILE

class _MasterRuntime(service.Service):
    """Starts the membership check and repair loops; closes the state on stop."""

    def __init__(
        self,
        membership: Membership,
        repairer: Repairer,
        state: MasterState,
        jobs: JobManager | None = None,
        probe: LagProbe | None = None,
        retention: Retention | None = None,
        router: JobRouter | None = None,
        orphan_grace: float = 0.0,
        tombstones: TombstoneRetention | None = None,
    ) -> None:
        self.membership = membership
        self.router = router
        self.orphan_grace = orphan_grace
        self.repairer = repairer
        self.state = state
        self.jobs = jobs
        self.probe = probe
        self.retention = retention
        self.tombstones = tombstones

    def startService(self) -> None:
        super().startService()
        self.membership.start()
        self.repairer.start()
        if self.router is not None:
            self.router.start(self.orphan_grace)
        if self.probe is not None:
            self.probe.start()
        if self.jobs is not None and self.retention is not None:
            self.jobs.start_retention(self.retention.jobs_max_age,
                                      self.retention.jobs_max_count)
        if self.tombstones is not None:
            self.tombstones.start()

    def stopService(self) -> None:
        super().stopService()
        if self.probe is not None:
            self.probe.stop()
        if self.tombstones is not None:
            self.tombstones.stop()
        self.repairer.stop()
        self.membership.stop()
        if self.router is not None:
            self.router.stop()
        # Worker links close after this, as the reactor shuts down: a master that is
        # stopping must not record its workers' attempts as lost on the way out.
        self.membership.on_dead.clear()
        self.membership.on_alive.clear()
        if self.jobs is not None:
            self.jobs.close()
        self.state.close()


@attrs.define
class Master:
    """The parts of the master process, wired together (see :func:`build_master`)."""

    state: MasterState
    directory: Directory
    membership: Membership
    handler: MasterHandler
    repairer: Repairer
    factory: ServerFactory
    jobs: JobManager
    router: JobRouter
    #: Starts and stops it all: membership checks, repair, the listener; closes the state.
    service: service.MultiService
    registry: WorkerRegistry
    keys: KeySpace


def build_master(
    *,
    state: MasterState,
    clock: Any,
    monotonic: Callable[[], float],
    replication: int,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    token: str | None,
    limits: Limits,
    listen: Callable[[ServerFactory], service.IService],
    now: Callable[[], float] = time.time,
    run_in_thread: Callable[[Callable[[], None]], Deferred[None]] | None = None,
    peer_check: PeerCheck | None = None,
    admins: Collection[str] = DEFAULT_ADMINS,
    configured: Mapping[str, tuple[str, int]] | None = None,
    retention: Retention | None = None,
    gc: Callable[[], dict[str, Any]] | None = None,
) -> Master:
    """Wire the master over an open ``state``: no reactor or sockets of its own.

    ``clock`` schedules (its ``seconds`` monotonic in production: see :mod:`dsml.clocks`),
    ``monotonic`` decides liveness, ``now`` (wall clock) stamps tombstones and the job
    records, and ``listen(factory)`` makes the service that serves ``factory``;
    ``run_in_thread`` (deferToThreadPool) takes the job state's commits off the reactor
    thread (without it they run inline, as in the simulation).
    :func:`make_master_service` passes the real ones; :mod:`dsml.testing.sim` passes
    a fake clock and an in-memory network.  With ``peer_check`` (TLS: ``listen`` then
    wraps the factory in TLS) each connection's roles come from its peer's certificate;
    ``admins`` are the users who may act on every job (``cluster.admins``); ``gc`` gives
    the process's collector figures for ``nodes`` (:class:`~dsml.gcwatch.GcWatch`);
    ``configured`` (the config's workers: name -> host, port) is who may register over
    TLS, and where.  ``retention`` (the config's section) starts the purge of finished
    jobs; a reactor-lag probe on ``clock`` is in every ``nodes`` answer.
    """
    versions = Versions(__version__, PROTOCOL_VERSION)
    directory = Directory(state, now=now)
    membership = Membership(
        clock=clock,
        monotonic=monotonic,
        versions=versions,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
    )
    # The config is authoritative; the state keeps it so tools reading it agree.
    state.set_setting("replication", replication)

    def factor() -> int:
        return int(state.get_setting("replication", replication))

    # Jobs keep their own SQLite file beside the directory's: the two never share a
    # transaction, and a burst of task results never waits behind a block report.
    jobs = JobManager(Path(state.path).parent / JOBS_FILE, clock, run_in_thread=run_in_thread,
                      now=now)
    router = JobRouter(jobs=jobs, membership=membership, directory=directory, clock=clock)
    registry = WorkerRegistry(
        state=state,
        directory=directory,
        membership=membership,
        versions=versions,
        on_registered=router.registered,
        configured=configured,
    )
    # A restarted master takes no write below the replication factor while the workers
    # it knew are still registering again (within a heartbeat timeout of its start).
    keys = KeySpace(directory=directory, membership=membership, factor=factor,
                    full_until=monotonic() + heartbeat_timeout,
                    known_workers=len(state.workers()))
    probe = LagProbe(clock)
    repairer = Repairer(
        clock=clock,
        monotonic=monotonic,
        directory=directory,
        membership=membership,
        factor=factor,
        grace=heartbeat_timeout,
        interval=max(0.5, heartbeat_interval),
        cpu=time.thread_time,
    )
    handler = MasterHandler(registry=registry, keys=keys, router=router, admins=admins,
                            lag=probe.snapshot, clock=clock, repair=repairer.status, gc=gc)
    factory = ServerFactory(
        Responders(master_methods(), handler),
        clock,
        token,
        limits,
        two_way=True,
        on_lost=handler.link_lost,
        peer_check=peer_check,
    )
    top = service.MultiService()
    top.setName("dsml-master")
    tombstones = None if retention is None else TombstoneRetention(
        clock=clock, now=now, state=state, max_age=retention.tombstones_max_age)
    _MasterRuntime(membership, repairer, state, jobs, probe, retention, router,
                   orphan_grace=heartbeat_timeout, tombstones=tombstones).setServiceParent(top)
    listen(factory).setServiceParent(top)
    return Master(state, directory, membership, handler, repairer, factory, jobs, router, top,
                  registry, keys)


def make_master_service(
    config: Config, reactor: Any, monotonic: Callable[[], float] = time.monotonic
) -> service.MultiService:
    """Build the master's services from the config."""
    mc = config.master
    cc = config.cluster
    # Loaded first: a missing or unsafe key stops the master before anything else.
    tls = load_tls(config, "master", MASTER_NAME)
    private_dir(mc.state_dir)  # 0700; an older install's open one is tightened
    watch = GcWatch()
    master = build_master(
        state=MasterState(mc.state_dir / "master.sqlite3"),
        clock=reactor,
        monotonic=monotonic,
        now=time.time,
        replication=cc.replication,
        heartbeat_interval=cc.heartbeat_interval,
        heartbeat_timeout=cc.heartbeat_timeout,
        token=cc.token,
        limits=config.limits,
        listen=lambda factory: ListenService(
            reactor, mc.host, mc.port, factory if tls is None else tls.wrap_server(factory),
            mc.state_dir / ADDR_FILE, "dsml master",
        ),
        run_in_thread=lambda fn: deferToThreadPool(reactor, reactor.getThreadPool(), fn),
        peer_check=None if tls is None else PeerCheck(tls, frozenset({"worker", "user"})),
        admins=cc.admins,
        configured={name: (w.host, w.port) for name, w in config.workers.items()},
        retention=config.retention,
        gc=watch.snapshot,
    )
    DaemonGc(watch).setServiceParent(master.service)
    frozen = freeze_startup()  # built, not yet listening: see dsml.gcwatch
    Logger().info("{n} start-up objects frozen out of the collector's walks", n=frozen)
    return master.service
