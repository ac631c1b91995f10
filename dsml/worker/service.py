"""Wiring of a worker process: its store, its storage server, its link to the master."""

from __future__ import annotations

import os
import secrets
from typing import Any

import attrs
from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from ..config import Config
from ..net.links import Links, tcp_endpoint_for
from ..net.listen import ListenService, read_addr_file
from ..net.server import ServerFactory, ServerLimits
from .link import MasterLink, WorkerInfo
from .orders import WorkerOrders
from .storage import StorageHandler
from .store import Store

#: The file, under a worker's data_dir, that says where its storage server listens.
ADDR_FILE = "worker.addr"

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


def make_worker_service(config: Config, name: str, reactor: Any) -> service.MultiService:
    """Build the services of worker ``name``: open its store, listen for clients, and
    keep a link to the master."""
    from ..master.service import ADDR_FILE as MASTER_ADDR_FILE

    wc = config.worker(name)
    cc = config.cluster
    wc.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(wc.data_dir / "store", value_max=cc.value_max)
    pool = reactor.getThreadPool()

    def run_in_thread(fn: Any) -> Any:
        return deferToThreadPool(reactor, pool, fn)

    links = Links(reactor, tcp_endpoint_for(reactor), cc.token, name=f"worker {name}")
    handler = StorageHandler(store, run_in_thread, cc.value_max, links=links)
    orders = WorkerOrders(handler, links)
    master = MasterLink(
        clock=reactor,
        endpoint=MasterEndpoint(
            reactor, config.master.host, config.master.port,
            config.master.state_dir / MASTER_ADDR_FILE,
        ),
        token=cc.token,
        info=WorkerInfo(
            name, wc.host, wc.port, wc.slots, boot=f"{os.getpid()}-{secrets.token_hex(4)}"
        ),
        store=store,
        orders=orders,
        heartbeat_interval=cc.heartbeat_interval,
    )
    handler.on_change = master.report
    factory = ServerFactory(handler, reactor, cc.token, server_limits(config))
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
    timer.clock = reactor
    timer.setServiceParent(top)

    def listening(port: Any) -> None:
        # Register with the port the OS chose.
        master.info = attrs.evolve(master.info, port=port.getHost().port)

    ListenService(
        reactor, wc.host, wc.port, factory, wc.data_dir / ADDR_FILE, f"dsml worker {name}",
        on_listening=listening,
    ).setServiceParent(top)
    master.setServiceParent(top)
    return top
