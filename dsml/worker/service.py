"""Wiring of a worker process: its store, its storage server, its link to the master, its
client of the cluster (for its tasks' inputs and outputs), and what it takes on the
master's word (:class:`~dsml.worker.trust.MasterTrust`: write grants, registered peers).

A part that finds one of the worker's copies bad (a task input changed under it, a
failed read) calls :meth:`Worker.check_copy` (re-hash in a thread, then report if bad)
or, when it already knows, :meth:`Worker.report_corrupt`; both run on the reactor thread.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable, Collection
from typing import Any

import attrs
from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ..config import MASTER_ADDR_FILE, TASK_ENV_DEFAULT, WORKER_ADDR_FILE, Config, WorkerConfig
from ..fsutil import private_dir
from ..net.access import DEFAULT_ADMINS
from ..net.cluster_client import AsyncClusterClient
from ..net.limits import Limits
from ..net.links import (
    AddressEndpoint,
    EndpointFor,
    Links,
    join_addr,
    tcp_endpoint_for,
    tls_endpoint_for,
)
from ..net.listen import ListenService, read_addr_file
from ..net.server import ServerFactory
from ..net.tls import PeerCheck, TlsIdentity, load_tls
from ..protocol.methods import Role
from .inputcache import InputCache
from .link import MasterLink, MasterSession, StoreReports, WorkerInfo
from .orders import WorkerOrders, order_responders
from .resources import detect_gpus, detect_memory
from .runner import OnResult, TaskLogs, TaskOrders, WorkerJobs
from .storage import RunInThread, StorageHandler, storage_responders
from .store import Store
from .tasks import TaskManager
from .tasks.cgroups import detect as detect_cgroups
from .tasks.launch import TaskEnvironment
from .tasks.taskuser import for_worker, lent_mode
from .tasks.warm import probe_runtime
from .transfers import TaskTransfers
from .trust import MasterTrust

#: The file, under a worker's data_dir, that says where its storage server listens.
ADDR_FILE = WORKER_ADDR_FILE

#: Seconds between flushes and syncs of the store's values log: the most of
#: acknowledged values a power loss can take.
STORE_SYNC_INTERVAL = 1.0

_log = Logger()


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
    #: The worker's client of the cluster (its tasks' inputs and outputs).
    client: AsyncClusterClient | None = None
    #: Its tasks' inputs and outputs: local copies, downloads, uploads, retries.
    transfers: TaskTransfers | None = None
    #: The master's grants and registered peers, as of the current registration.
    trust: MasterTrust | None = None

    def report_corrupt(self, key: str, version: int | None = None) -> Deferred[bool]:
        """This worker's copy of ``key`` is known bad: forget it (no tombstone) and tell
        the master (``bad_copy``), which forgets it and copies a good one back.

        Call on the reactor thread.  With ``version``, only that version is forgotten
        (a newer write since stays).  Fires True once the master has forgotten the copy,
        False if there was none to forget or the master could not be told (the next
        registration's inventory then tells it).  Never fails.
        """
        return self.orders.forget_bad_copy(key, version)

    def check_copy(self, key: str) -> Deferred[bool]:
        """Re-hash this worker's copy of ``key`` against its stored sha256 (in a thread,
        :meth:`Store.verifier <dsml.worker.store.Store.verifier>`); if it does not match,
        :meth:`report_corrupt` it.  Fires True if the copy is good, False if it was bad
        or absent.  Call on the reactor thread."""
        return self.orders.check_copy(key)


#: Builds the task manager, given the callback for its results and the transfers of its
#: inputs and outputs (production: a TaskManager; the simulation: its fake one).
MakeTaskRunner = Callable[[OnResult, TaskTransfers], TaskManager]


def build_worker(
    *,
    store: Store,
    clock: Any,
    endpoint_for: EndpointFor,
    master_addr: Callable[[], str],
    token: str | None,
    info: WorkerInfo,
    value_max: int,
    heartbeat_interval: float,
    limits: Limits,
    run_in_thread: RunInThread[Any],
    listen: Callable[[ServerFactory, MasterLink], service.IService],
    free_disk: Callable[[], int] | None = None,
    retry_policy: Callable[[int], float] | None = None,
    tasks: MakeTaskRunner | None = None,
    tls: TlsIdentity | None = None,
    admins: Collection[str] = DEFAULT_ADMINS,
    input_cache: InputCache | None = None,
    lend: tuple[int, int | None] = (0o400, None),
) -> Worker:
    """Wire a worker over an open ``store``: no reactor, sockets or threads of its own.

    ``endpoint_for`` opens links (to other workers, and to the master at the address
    ``master_addr()`` says at each connect), ``run_in_thread`` runs blocking store work
    (a thread pool in production, inline in the simulation), and
    ``listen(factory, master_link)`` makes the service that serves ``factory`` to
    clients.  ``tasks(on_result, transfers)`` builds the task manager (without it the
    worker runs no tasks).  :func:`make_worker_service` passes the real ones;
    :mod:`dsml.testing.sim` passes in-memory ones on a fake clock.

    Everything is built in dependency order, each part with what it needs: the links
    first, then the cluster client over them and the tasks' transfers over the client
    and the store; the store's reports to the master (the storage server tells them of
    every change); the master link last (it answers the master's orders and tells the
    reports and the jobs of each registration).

    With ``tls`` (``endpoint_for`` then dials TLS) every peer is checked by its
    certificate: the master link's must be the master's, other links' the master's or a
    worker's, and the storage server accepts workers and users, each with its role;
    ``admins`` (``cluster.admins``) may read every attempt's logs, other users only
    their own jobs'.  ``lend``: the mode and group of store objects lent to tasks by a
    link (:func:`~.tasks.taskuser.lent_mode`).
    """
    name = info.name
    # Over TLS the certificates say who is who and nobody checks the token: it is never
    # sent (not even to a peer that turns out not to be the master).
    sent_token = None if tls is not None else token
    links = Links(
        clock, endpoint_for, sent_token, name=f"worker {name}",
        peer_roles=frozenset({Role.WORKER}),
        peer_check=None if tls is None else PeerCheck(tls, frozenset({"master", "worker"})),
    )
    client = AsyncClusterClient(master_addr, links, clock)
    transfers = TaskTransfers(
        client, store, clock, run_in_thread, cache=input_cache, lend=lend,
        # A task changed its read-only input through the store's object: forget the
        # copy and tell the master (``orders`` is built below, before any task runs).
        report_corrupt=lambda key: orders.forget_bad_copy(key),
    )
    jobs = (
        WorkerJobs(clock, lambda on_result: tasks(on_result, transfers))
        if tasks is not None
        else None
    )
    reports = StoreReports(clock)
    trust = MasterTrust(clock, name)
    handler = StorageHandler(
        store, run_in_thread, links=links, on_change=reports.report, trust=trust
    )
    orders = WorkerOrders(handler, links, report_bad=reports.bad_copy)
    task_side: dict[str, Any] = {}
    if jobs is not None and jobs.tasks is not None:
        task_side = {
            "running_attempts": jobs.running,
            "on_session": jobs.session_changed,
            "free_slots": jobs.tasks.free_slots,
        }
    master = MasterLink(
        clock=clock,
        endpoint=AddressEndpoint(endpoint_for, master_addr),
        token=sent_token,
        info=info,
        store=store,
        orders=order_responders(orders, TaskOrders(jobs)),
        reports=reports,
        heartbeat_interval=heartbeat_interval,
        free_disk=free_disk,
        retry_policy=retry_policy,
        peer_check=None if tls is None else PeerCheck(tls, frozenset({"master"})),
        **task_side,
    )

    def trust_session(session: MasterSession | None) -> None:
        if session is None:
            trust.lost()
            return
        if session.grant_key:
            store.mark_joined()  # no ungranted write from now on, even after a restart
        trust.registered(
            session.grant_key, lambda: session.request("peers").addCallback(_payload)
        )

    master.add_listener(trust_session)
    factory = ServerFactory(
        storage_responders(handler, TaskLogs(jobs, admins), value_max), clock, token, limits,
        peer_check=None if tls is None else PeerCheck(tls, frozenset({"worker", "user"})),
    )
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
    return Worker(
        name, store, links, handler, orders, master, factory, top, jobs, client, transfers,
        trust,
    )


def _payload(response: Any) -> bytes:
    return response.payload  # type: ignore[no-any-return]


def _resources(name: str, wc: WorkerConfig) -> tuple[int, tuple[str, ...]]:
    """The memory and GPU ids the worker offers: the config's, else the machine's."""
    mem = wc.mem if wc.mem is not None else detect_memory()
    if wc.gpus is not None:
        gpus, how = wc.gpus, "from the config"
        shown = ", ".join(gpus) or "none"
    else:
        found, how = detect_gpus()
        gpus, shown = tuple(g.id for g in found), ", ".join(g.describe() for g in found)
    _log.info("worker {name} offers tasks {cpus} CPUs, {mem} MiB, GPUs ({how}): {gpus}",
              name=name, cpus=wc.slots, mem=mem >> 20, how=how, gpus=shown or "none")
    return mem, gpus


def make_worker_service(config: Config, name: str, reactor: Any) -> service.MultiService:
    """Build the services of worker ``name``: open its store, listen for clients, and
    keep a link to the master."""
    wc = config.worker(name)
    cc = config.cluster
    task_user = for_worker(config, name)  # ConfigError (one line) if it cannot be used
    # Loaded first: a missing or unsafe key stops the worker before anything else.
    tls = load_tls(config, "worker", name)
    private_dir(wc.data_dir)  # 0700; an older install's open one is tightened
    store = Store(wc.data_dir / "store", value_max=cc.value_max)
    pool = reactor.getThreadPool()

    def run_in_thread(fn: Any) -> Any:
        return deferToThreadPool(reactor, pool, fn)

    def listen(factory: ServerFactory, master: MasterLink) -> service.IService:
        def listening(port: Any) -> None:
            # Register with the port the OS chose.
            master.info = attrs.evolve(master.info, port=port.getHost().port)

        return ListenService(
            reactor, wc.host, wc.port, factory if tls is None else tls.wrap_server(factory),
            wc.data_dir / ADDR_FILE, f"dsml worker {name}", on_listening=listening,
        )

    master_addr_file = config.master.state_dir / MASTER_ADDR_FILE
    mem, gpus = _resources(name, wc)
    fn_python = wc.python or sys.executable
    fn_rt, why = probe_runtime(fn_python, TaskEnvironment(
        wc.data_dir / "tasks", TASK_ENV_DEFAULT + wc.task_env).for_warm())
    if why:
        _log.warn("function tasks (dsml-python) cannot run on worker {name}: {why}",
                  name=name, why=why)

    def master_addr() -> str:
        # The config's address, or (port 0, a local cluster) what the master's address
        # file says now: read again at every connect, since the master may move.
        if config.master.port:
            return join_addr(config.master.host, config.master.port)
        return join_addr(*read_addr_file(master_addr_file))

    def make_tasks(on_result: OnResult, transfers: TaskTransfers) -> TaskManager:
        work_dir = wc.data_dir / "tasks"
        cgroups, how = detect_cgroups(work_dir)
        if cgroups is None:
            how = (f"no cgroups ({how}): the worker is their child subreaper; "
                   "memory limits (--mem) NOT enforced")
        who = ("the worker's own user" if task_user is None
               else f"{task_user.name} (uid {task_user.uid})")
        _log.info("tasks of worker {name}: {how}; they run as {who}", name=name, how=how,
                  who=who)
        return TaskManager(
            reactor,
            cgroups=cgroups,
            subreaper=cgroups is None,  # without cgroups, orphans come back to the worker
            task_env=TASK_ENV_DEFAULT + wc.task_env,
            slots=wc.slots,
            mem=mem,
            gpus=gpus,
            task_user=task_user,
            python=fn_python,
            preload=wc.preload,
            work_dir=work_dir,
            transfers=transfers,
            on_result=on_result,
            keep_finished=config.retention.attempt_dirs_max_count,
            dirs_max_bytes=config.retention.attempt_dirs_max_bytes,
            dirs_max_age=config.retention.attempt_dirs_max_age,
        )

    return build_worker(
        tasks=make_tasks,
        store=store,
        clock=reactor,
        endpoint_for=tls_endpoint_for(tcp_endpoint_for(reactor), tls),
        master_addr=master_addr,
        token=cc.token,
        info=WorkerInfo(
            name, wc.host, wc.port, wc.slots, boot=f"{os.getpid()}-{secrets.token_hex(4)}",
            mem=mem, gpus=gpus, fn_runtime=fn_rt,
        ),
        value_max=cc.value_max,
        heartbeat_interval=cc.heartbeat_interval,
        limits=config.limits,
        run_in_thread=run_in_thread,
        listen=listen,
        tls=tls,
        admins=cc.admins,
        # Beside tasks/ under data_dir: one filesystem, so an entry can be lent by a link.
        input_cache=(InputCache(wc.data_dir / "cache", wc.input_cache, lend=lent_mode(task_user))
                     if wc.input_cache else None),
        lend=lent_mode(task_user),
    ).service
