"""Keeps the replication factor: copies under-replicated keys, trims surplus and stale copies.

Runs on a timer.  Decisions come from the :class:`~dsml.master.directory.Directory`; orders
go to workers over their links (``replicate`` to a source, ``drop`` to a holder).  A worker
that died less than ``grace`` seconds ago still counts as a holder, so a restart or a
short network blip does not start copies; past the grace its copies are replaced from the
survivors.  At most ``concurrency`` copies run at once, so repair never swamps a cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .directory import Directory, DirectoryError, WorkerLoad
from .membership import DEAD, Membership, WorkerRecord

log = Logger()


class Repairer:
    """Re-replicates and trims; one pass every ``interval`` seconds."""

    def __init__(
        self,
        *,
        clock: Any,
        monotonic: Callable[[], float],
        directory: Directory,
        membership: Membership,
        factor: Callable[[], int],
        grace: float = 10.0,
        interval: float = 1.0,
        concurrency: int = 4,
    ) -> None:
        self.clock = clock
        self.monotonic = monotonic
        self.directory = directory
        self.membership = membership
        self.factor = factor
        self.grace = grace
        self.interval = interval
        self.concurrency = concurrency
        self.copying: dict[str, str] = {}  # key -> target worker, copies in flight
        self.dropping: set[tuple[str, str]] = set()  # (key, worker) drops in flight
        self.copies_done = 0
        self.drops_done = 0
        self.started_at: float | None = None
        self._loop = LoopingCall(self.run_once)
        self._loop.clock = clock

    def start(self) -> None:
        """Start the timer."""
        self.started_at = self.monotonic()
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("repair loop stopped", f)
        )

    def stop(self) -> None:
        """Stop the timer."""
        if self._loop.running:
            self._loop.stop()

    def run_once(self) -> None:
        """One pass; never raises (the timer would stop for good)."""
        try:
            self._pass()
        except Exception:
            log.failure("repair pass failed")

    def _alive(self) -> dict[str, WorkerRecord]:
        return {r.name: r for r in self.membership.alive()}

    def _counted(self, alive: dict[str, WorkerRecord]) -> set[str]:
        """Workers whose copies still count: alive, or dead for less than the grace."""
        now = self.monotonic()
        counted = set(alive)
        known = set()
        for r in self.membership.all():
            known.add(r.name)
            if r.state != DEAD:
                counted.add(r.name)
            elif r.died_at is not None and now - r.died_at < self.grace:
                counted.add(r.name)
        # After a master (re)start the workers come back one by one, each on its own
        # backoff: until the grace has passed since the start, a worker the state
        # remembers but that has not registered again counts as one that just died, so
        # the first ones back do not copy what the others hold.
        if self.started_at is not None and now - self.started_at < self.grace:
            counted.update(row.name for row in self.directory.state.workers()
                           if row.name not in known)
        return counted

    def _pass(self) -> None:
        alive = self._alive()
        if not alive:
            return
        factor = self.factor()
        counted = self._counted(alive)
        # Copies: keys whose counted copies fall short, sourced from alive holders.
        if len(self.copying) < self.concurrency:
            want = min(factor, len(counted))
            for key, holders, missing in self.directory.under_replicated(counted, want):
                if len(self.copying) >= self.concurrency:
                    break
                if key in self.copying or missing <= 0:
                    continue
                sources = [h for h in holders if h.worker in alive]
                if not sources:
                    continue
                have = {h.worker for h in holders}
                targets = sorted(
                    (r for name, r in alive.items() if name not in have),
                    key=lambda r: (-r.free_disk, r.stored_bytes, r.name),
                )
                if not targets:
                    continue
                self._copy(key, sources[0], alive[sources[0].worker], targets[0])
        # Trims only where every holder is alive (never trim while a copy is pending).
        loads = {n: WorkerLoad(r.free_disk, r.stored_bytes) for n, r in alive.items()}
        if counted == set(alive):
            for key, workers in self.directory.surplus(loads, factor):
                if key in self.copying:
                    continue
                for worker in workers:
                    self._drop_current(key, worker, alive)
        for trim in self.directory.stale_replicas() + self.directory.pending_deletes():
            if trim.worker in alive:
                self._drop(trim.key, trim.worker, trim.version, alive[trim.worker])

    def _copy(self, key: str, source: Any, src: WorkerRecord, target: WorkerRecord) -> None:
        self.copying[key] = target.name
        log.info(
            "re-replicating {key!r} v{version} from {src} to {dst}",
            key=key,
            version=source.version,
            src=src.name,
            dst=target.name,
        )
        d = _order(
            src,
            "replicate",
            {
                "Key": key,
                "Version": source.version,
                "To": f"{target.host}:{target.port}",
                # The target stores the copy only under a version the master signed.
                "Grant": self.directory.grants.issue(key, source.version, [target.name]),
            },
        )

        def done(_: object) -> None:
            self.copies_done += 1
            # The target reports the copy itself; record it now too, so the next
            # pass does not copy again while that report is on its way.
            try:
                self.directory.add_replica(
                    key, target.name, source.size, source.sha256, source.version
                )
            except DirectoryError:
                pass

        def failed(f: Failure) -> None:
            log.warn(
                "copy of {key!r} to {dst} failed: {why}",
                key=key,
                dst=target.name,
                why=f.getErrorMessage(),
            )

        d.addCallbacks(done, failed)
        d.addBoth(lambda _: self.copying.pop(key, None))

    def _drop_current(self, key: str, worker: str, alive: dict[str, WorkerRecord]) -> None:
        try:
            replicas = self.directory.locate(key)
        except DirectoryError:
            return
        for r in replicas:
            if r.worker == worker:
                self._drop(key, worker, r.version, alive[worker])

    def _drop(self, key: str, worker: str, version: int, rec: WorkerRecord) -> None:
        if (key, worker) in self.dropping:
            return
        self.dropping.add((key, worker))
        d = _order(rec, "drop", {"Key": key, "Version": version})

        def done(_: object) -> None:
            self.drops_done += 1
            self.directory.remove_replica(key, worker, version)

        def failed(f: Failure) -> None:
            code = getattr(f.value, "code", "")
            if code in ("not-found",):
                self.directory.remove_replica(key, worker, version)
            else:
                log.info(
                    "drop of {key!r} on {w} not done: {why}",
                    key=key,
                    w=worker,
                    why=f.getErrorMessage(),
                )

        d.addCallbacks(done, failed)
        d.addBoth(lambda _: self.dropping.discard((key, worker)))


def _order(rec: WorkerRecord, method: str, headers: dict[str, object]) -> Deferred[Any]:
    """Send an order down a worker's link."""
    conn = rec.conn
    if conn is None or not getattr(conn, "connected", False):
        d: Deferred[Any] = Deferred()
        d.errback(DirectoryError(f"worker {rec.name} has no link", "unavailable"))
        return d
    return conn.request(method, headers)  # type: ignore[no-any-return]
