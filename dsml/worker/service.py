"""Wiring of a worker process: its store, its storage server, and (later) its link to the master."""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ..config import Config
from ..net.listen import ListenService
from ..net.server import ServerFactory, ServerLimits
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


def make_worker_service(config: Config, name: str, reactor: Any) -> service.MultiService:
    """Build the services of worker ``name``: open its store and listen for clients."""
    wc = config.worker(name)
    wc.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(wc.data_dir / "store", value_max=config.cluster.value_max)
    pool = reactor.getThreadPool()

    def run_in_thread(fn: Any) -> Any:
        return deferToThreadPool(reactor, pool, fn)

    handler = StorageHandler(store, run_in_thread, config.cluster.value_max)
    factory = ServerFactory(handler, reactor, config.cluster.token, server_limits(config))
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
    ListenService(
        reactor, wc.host, wc.port, factory, wc.data_dir / ADDR_FILE, f"dsml worker {name}"
    ).setServiceParent(top)
    return top
