"""Wiring of a worker process: its store, its storage server, its link to the master."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from ..config import MASTER_ADDR_FILE, WORKER_ADDR_FILE, Config
from ..net.links import EndpointFor, Links, tcp_endpoint_for
from ..net.listen import ListenService, read_addr_file
from ..net.server import ServerFactory, ServerLimits
from .link import MasterLink, WorkerInfo
from .orders import WorkerOrders
from .runner import ClusterTransfers, WorkerJobs
from .storage import RunInThread, StorageHandler
from .store import Store
from .tasks import TaskManager

#: The file, under a worker's data_dir, that says where its storage server listens.
ADDR_FILE = WORKER_ADDR_FILE

#: Seconds between flushes and syncs of the store's values log: the most of
#: acknowledged values a power loss can take.
STORE_SYNC_INTERVAL = 1.0

_log = Logger()


def server_limits(config: Config) -> ServerLimits:
    """The connection rules from the config's ``limits`` section."""
    lim = config.limits
    return ServerLimits(
        max_connections=lim.max_connections,
        max_unauthenticated=lim.max_unauthenticated,
        auth_timeout=lim.auth_timeout,
        head_timeout=lim.head_timeout,
        idle_timeout=lim.idle_timeout,
        payload_timeout=lim.payload_timeout,
    )


class _StoreService(service.Service):
    """Closes the store when the process stops."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def stopService(self) -> None:
        super().stopService()
        self.store.close()


class _TasksService(service.Service):
    """Stops every running task (its whole process group) when the worker stops."""

    def __init__(self, tasks: TaskManager) -> None:
        self.tasks = tasks

    def stopService(self) -> Any:
        super().stopService()
        return self.tasks.stop()


class _StoreSyncService(TimerService):
    """A TimerService whose stop is a no-op if it never started (as in a build-only test)."""

    def stopService(self) -> Any:
        if not self.running:
            return None
        return super().stopService()


@implementer(IStreamClientEndpoint)
class MasterEndpoint:
    """Where the master is: the config's address, or (port 0, a local cluster) the
    address its addr file says, read again at every attempt since it may move."""

    def __init__(self, reactor: Any, host: str, port: int, addr_file: Any) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.addr_file = addr_file
        self._tcp = tcp_endpoint_for(reactor)

    def connect(self, factory: Any) -> Deferred[Any]:
        host, port = self.host, self.port
        if port == 0:
            try:
                host, port = read_addr_file(self.addr_file)
            except (OSError, ValueError):
                return fail(ConnectionError(f"master address file {self.addr_file} not there"))
        return self._tcp(host, port).connect(factory)  # type: ignore[no-any-return]


@attrs.define
class Worker:
    """The parts of one worker process, wired together (see :func:`build_worker`)."""

    name: str
    store: Store
    links: Links
    handler: StorageHandler
    orders: WorkerOrders
    master: MasterLink
    factory: ServerFactory
    #: Starts and stops it all: store, store sync timer, listener, master link.
    service: service.MultiService
    #: The job side (None when the worker runs no tasks, as in storage-only tests).
    jobs: Any = None


def build_worker(
    *,
    store: Store,
    clock: Any,
    endpoint_for: EndpointFor,
    master_endpoint: IStreamClientEndpoint,
    token: str | None,
    info: WorkerInfo,
    value_max: int,
    heartbeat_interval: float,
    limits: ServerLimits,
    run_in_thread: RunInThread[Any],
    listen: Callable[[ServerFactory, MasterLink], service.IService],
    free_disk: Callable[[], int] | None = None,
    retry_policy: Callable[[int], float] | None = None,
    jobs: WorkerJobs | None = None,
) -> Worker:
    """Wire a worker over an open ``store``: no reactor, sockets or threads of its own.

    ``endpoint_for`` opens links to other workers, ``master_endpoint`` reaches the
    master, ``run_in_thread`` runs blocking store work (a thread pool in production,
    inline in the simulation), and ``listen(factory, master_link)`` makes the service
    that serves ``factory`` to clients.  :func:`make_worker_service` passes the real
    ones; :mod:`dsml.testing.sim` passes in-memory ones on a fake clock.
    """
    name = info.name
    links = Links(clock, endpoint_for, token, name=f"worker {name}")
    handler = StorageHandler(store, run_in_thread, value_max, links=links)
    orders = WorkerOrders(handler, links, jobs)
    handler.jobs = jobs
    task_hooks: dict[str, Any] = {}
    if jobs is not None and jobs.tasks is not None:
        task_hooks = {
            "running_attempts": jobs.running,
            "on_registered": jobs.send_results_soon,
            "free_slots": jobs.tasks.free_slots,
        }
    master = MasterLink(
        clock=clock,
        endpoint=master_endpoint,
        token=token,
        info=info,
        store=store,
        orders=orders,
        heartbeat_interval=heartbeat_interval,
        free_disk=free_disk,
        retry_policy=retry_policy,
        **task_hooks,
    )
    handler.on_change = master.report
    if jobs is not None:
        jobs.link = master
    factory = ServerFactory(handler, clock, token, limits)
    top = service.MultiService()
    top.setName(f"dsml-worker-{name}")
    _StoreService(store).setServiceParent(top)

    def flush_and_sync() -> None:
        try:
            store.flush()
            store.sync()
        except Exception:
            _log.failure("Flushing or syncing the store of worker {name} failed", name=name)

    # Added after _StoreService, so it stops before the store closes.
    timer = _StoreSyncService(STORE_SYNC_INTERVAL, flush_and_sync)
    timer.clock = clock
    timer.setServiceParent(top)
    listen(factory, master).setServiceParent(top)
    master.setServiceParent(top)
    if jobs is not None and jobs.tasks is not None:
        _TasksService(jobs.tasks).setServiceParent(top)
    return Worker(name, store, links, handler, orders, master, factory, top, jobs)


def make_worker_service(config: Config, name: str, reactor: Any) -> service.MultiService:
    """Build the services of worker ``name``: open its store, listen for clients, and
    keep a link to the master."""
    wc = config.worker(name)
    cc = config.cluster
    wc.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(wc.data_dir / "store", value_max=cc.value_max)
    pool = reactor.getThreadPool()

    def run_in_thread(fn: Any) -> Any:
        return deferToThreadPool(reactor, pool, fn)

    def listen(factory: ServerFactory, master: MasterLink) -> service.IService:
        def listening(port: Any) -> None:
            # Register with the port the OS chose.
            master.info = attrs.evolve(master.info, port=port.getHost().port)

        return ListenService(
            reactor, wc.host, wc.port, factory, wc.data_dir / ADDR_FILE, f"dsml worker {name}",
            on_listening=listening,
        )

    master_addr_file = config.master.state_dir / MASTER_ADDR_FILE

    def master_addr() -> tuple[str, int]:
        if config.master.port:
            return config.master.host, config.master.port
        return read_addr_file(master_addr_file)

    jobs = WorkerJobs(reactor)
    jobs.tasks = TaskManager(
        reactor,
        slots=wc.slots,
        work_dir=wc.data_dir / "tasks",
        transfers=ClusterTransfers(reactor, master_addr, cc.token),
        on_result=jobs.on_result,
    )
    return build_worker(
        jobs=jobs,
        store=store,
        clock=reactor,
        endpoint_for=tcp_endpoint_for(reactor),
        master_endpoint=MasterEndpoint(
            reactor, config.master.host, config.master.port,
            config.master.state_dir / MASTER_ADDR_FILE,
        ),
        token=cc.token,
        info=WorkerInfo(
            name, wc.host, wc.port, wc.slots, boot=f"{os.getpid()}-{secrets.token_hex(4)}"
        ),
        value_max=cc.value_max,
        heartbeat_interval=cc.heartbeat_interval,
        limits=server_limits(config),
        run_in_thread=run_in_thread,
        listen=listen,
    ).service
