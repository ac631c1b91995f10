"""Keeps the replication factor: copies under-replicated keys, trims surplus and stale copies.

Works from a queue, never by scanning the directory on a timer.  The queue holds the
keys whose copies may need work; they come from:

* the :class:`~dsml.master.directory.Directory` itself, which tells its watchers the keys
  each commit touched (a report or an inventory that changed a worker's copies, a copy
  forgotten or corrupt, a delete);
* a worker entering or leaving the set of workers whose copies count (registered, or
  dead past its grace): its copies, walked in slices of one indexed query each;
* a full pass over the directory (in slices, one per reactor turn) once after the
  master starts (when the start's grace has passed) and whenever the number of copies
  to keep changes (the replication factor, or a cluster smaller than it that grows).

Each pass takes a bounded batch (``batch`` keys, one query for all of them) and decides
per key.  A key that needs work that cannot be done now waits in a side set: a copy
when ``concurrency`` copies are already running (the *backlog*, taken first as copies
finish), a copy without a live source or target or a trim while some counted worker is
not alive (*parked*, back in the queue whenever the alive or counted workers change),
an order that failed (*retry*, back at the next tick).  So the steady cost is zero
when nothing changes, and a dead worker costs a pass over its own keys.

Stale copies (older than the key's current version) are this module's alone to trim,
and only once the current version has its copies on live workers: until then a stale
copy may be the only durable one of an acknowledged write.  A key whose current version
has no copy left on a counted worker is handed to :meth:`Directory.fall_back`, which
makes its newest surviving older copy current if that version was never committed.

Orders go to workers over their links (``replicate`` to a source, ``drop`` to a holder).
A worker that died less than ``grace`` seconds ago still counts as a holder, so a restart
or a short network blip does not start copies; past the grace its copies are replaced
from the survivors.  At most ``concurrency`` copies run at once, so repair never swamps a
cluster.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .directory import Directory, DirectoryError, KeyView, Replica
from .membership import DEAD, Membership, WorkerRecord

log = Logger()

#: Keys examined per pass (one query); small enough to keep a pass to milliseconds.
BATCH = 500

#: Keys a start-up (or factor change) pass walks per reactor turn, in SQL.
SCAN_SLICE = 5000

Scan = Iterator[list[str]]


def _take(queue: OrderedDict[str, None], n: int) -> list[str]:
    """Pop up to ``n`` keys from the front of ``queue``."""
    return [queue.popitem(last=False)[0] for _ in range(min(n, len(queue)))]


class _Pass(NamedTuple):
    """What one repair pass decides every key against."""

    alive: dict[str, WorkerRecord]
    counted: set[str]  #: workers whose copies count (alive, or dead within the grace)
    factor: int
    want: int  #: copies each key should have: min(factor, len(counted))
    trims_ok: bool  #: every counted worker is alive: surplus copies may go


class Repairer:
    """Re-replicates and trims, from a queue of keys; see the module docstring."""

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
        batch: int = BATCH,
        cpu: Callable[[], float] | None = None,
    ) -> None:
        self.clock = clock
        #: This thread's CPU clock (``time.thread_time`` in production): the passes' CPU
        #: time is summed in ``cpu_seconds``, a figure for ``nodes`` and the benchmarks.
        self.cpu = cpu
        self.cpu_seconds = 0.0
        self.monotonic = monotonic
        self.directory = directory
        self.membership = membership
        self.factor = factor
        self.grace = grace
        self.interval = interval
        self.concurrency = concurrency
        self.batch = batch
        self.copying: dict[str, str] = {}  # key -> target worker, copies in flight
        self.dropping: set[tuple[str, str]] = set()  # (key, worker) drops in flight
        self.copies_done = 0
        self.copies_started = 0
        self.drops_done = 0
        #: Keys examined since start (a figure for tests and benchmarks).
        self.examined = 0
        self.started_at: float | None = None
        #: Keys to examine, oldest first.
        self.queue: OrderedDict[str, None] = OrderedDict()
        self._backlog: OrderedDict[str, None] = OrderedDict()
        self._parked: dict[str, None] = {}
        #: The alive or counted workers changed since the parked keys were last looked
        #: at: they go back to the queue at the next timer pass (not at once: with many
        #: workers some flap between alive and suspect all the time under load, and
        #: re-examining every parked key each reactor turn kept a saturated master so).
        self._unpark = False
        self._retry: dict[str, None] = {}
        #: Per key, the targets its last copies failed to (a full or failing disk): the
        #: next copy goes elsewhere if it can, not to the same best-ranked worker again.
        self._failed_to: dict[str, set[str]] = {}
        #: Slices of keys still to feed the queue (full passes, workers' copies).
        self._scans: list[Scan] = []
        self._seeded = False
        #: The workers the state remembered at the start (read once, in the start grace).
        self._remembered: frozenset[str] | None = None
        self._counted_before: set[str] | None = None
        self._alive_before: set[str] = set()
        self._want_before: tuple[int, int] | None = None
        self._next: Any = None  # the follow-up pass scheduled on the clock
        self._rank: list[WorkerRecord] | None = None  # this pass's copy targets, best first
        self._loop = LoopingCall(self.run_once)
        self._loop.clock = clock
        directory.watchers.append(self.enqueue)

    def start(self) -> None:
        """Start the timer."""
        self.started_at = self.monotonic()
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("repair loop stopped", f)
        )

    def stop(self) -> None:
        """Stop the timer (and any follow-up pass)."""
        if self._loop.running:
            self._loop.stop()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None

    def enqueue(self, keys: Iterable[str]) -> None:
        """Have ``keys`` examined by a coming pass (the directory's watcher)."""
        self.queue.update((k, None) for k in keys)

    def rescan(self) -> None:
        """Feed every key of the directory (live and deleted) to the queue, in slices."""
        self._scans.append(self._table(tombstones=False))
        self._scans.append(self._table(tombstones=True))

    @property
    def pending(self) -> int:
        """Keys waiting: queued, for a copy slot, parked or to retry."""
        return len(self.queue) + len(self._backlog) + len(self._parked) + len(self._retry)

    def status(self) -> dict[str, int]:
        """For the ``nodes`` answer: keys waiting, and 1 while a walk of the directory
        (the start-up pass, a factor change) or of a worker's copies is still to end."""
        return {"pending": self.pending,
                "scanning": int(bool(self._scans) or not self._seeded),
                "cpu_ms": round(self.cpu_seconds * 1000)}

    def run_once(self) -> None:
        """One pass (the timer's); never raises (the timer would stop for good)."""
        started = self.cpu() if self.cpu is not None else 0.0
        self._run_once()
        if self.cpu is not None:
            self.cpu_seconds += self.cpu() - started

    def _run_once(self) -> None:
        if self._retry:
            self.queue.update(self._retry)
            self._retry.clear()
        if self._unpark:
            self._unpark = False
            self.queue.update(self._parked)
            self._parked.clear()
        self._step()

    def _follow_up(self) -> None:
        started = self.cpu() if self.cpu is not None else 0.0
        self._step()
        if self.cpu is not None:
            self.cpu_seconds += self.cpu() - started

    def _step(self) -> None:
        """One bounded pass, then another on the next reactor turn if work is left."""
        self._next = None
        more = False
        try:
            more = self._pass()
        except Exception:
            log.failure("repair pass failed")
        if more:
            self._soon()

    def _soon(self) -> None:
        if self._next is None and self._loop.running:
            self._next = self.clock.callLater(0, self._follow_up)

    # -- feeding the queue ---------------------------------------------------------------

    def _table(self, tombstones: bool) -> Scan:
        """Slices of the directory's keys that may need work (a healthy key, with the
        right number of current copies and no stale one, is never queued: the workers
        whose copies stop counting have theirs queued themselves)."""
        after: str | None = ""
        while after is not None:
            factor = self.factor()
            low = self._want_before[1] if self._want_before is not None else factor
            keys, after = self.directory.keys_off(
                after, SCAN_SLICE, low, factor, tombstones
            )
            yield keys

    def _held(self, worker: str) -> Scan:
        after = (0, "")
        while True:
            rows = self.directory.held_after(worker, after, self.batch)
            if not rows:
                return
            yield [key for _, key in rows]
            after = rows[-1]

    def _feed(self) -> None:
        """One slice of the oldest scan into the queue, if the queue runs low."""
        while self._scans and len(self.queue) < self.batch:
            try:
                self.enqueue(next(self._scans[0]))
                return
            except StopIteration:
                self._scans.pop(0)

    def _changes(self, alive: set[str], counted: set[str], want: tuple[int, int]) -> None:
        """Queue what a change of the alive or counted workers, or of the factor, may need."""
        before = self._counted_before
        if before is not None:
            for name in sorted(counted ^ before):
                self._scans.append(self._held(name))
            if self._want_before != want:
                self.rescan()
        if self._parked and (alive != self._alive_before or counted != before):
            self._unpark = True
        self._counted_before, self._alive_before, self._want_before = counted, alive, want

    # -- a pass ---------------------------------------------------------------------------

    def _alive(self) -> dict[str, WorkerRecord]:
        # Every pass asks: a map in no particular order (nothing here depends on it),
        # never a sorted list (1,000 workers, a pass per reactor turn while work lasts).
        return self.membership.alive_map()

    def _counted(self, alive: dict[str, WorkerRecord]) -> set[str]:
        """Workers whose copies still count: alive, or dead for less than the grace."""
        now = self.monotonic()
        counted = set(alive)
        grace = self.grace
        for r in self.membership.records():
            if r.state != DEAD or (r.died_at is not None and now - r.died_at < grace):
                counted.add(r.name)
        # After a master (re)start the workers come back one by one, each on its own
        # backoff: until the grace has passed since the start, a worker the state
        # remembers but that has not registered again counts as one that just died, so
        # the first ones back do not copy what the others hold.
        if self._in_start_grace(now):
            if self._remembered is None:
                # Read once: the workers the state knew at the start (a worker that
                # registers since is in the membership, and counts from there).
                self._remembered = frozenset(row.name for row in self.directory.state.workers())
            counted.update(name for name in self._remembered
                           if self.membership.get(name) is None)
        return counted

    def _in_start_grace(self, now: float) -> bool:
        return self.started_at is not None and now - self.started_at < self.grace

    def _ranked(self, alive: dict[str, WorkerRecord]) -> list[WorkerRecord]:
        """The alive workers, best copy target first (most free disk, fewest stored
        bytes, name): sorted once per pass, not once per key to copy."""
        if self._rank is None:
            self._rank = sorted(alive.values(),
                                key=lambda r: (-r.free_disk, r.stored_bytes, r.name))
        return self._rank

    def _pass(self) -> bool:
        """Examine one batch of keys; True if more work can be done at once."""
        self._rank = None
        alive = self._alive()
        if not alive:
            return False
        factor = self.factor()
        counted = self._counted(alive)
        want = min(factor, len(counted))
        self._changes(set(alive), counted, (factor, want))
        if not self._seeded and not self._in_start_grace(self.monotonic()):
            # Once after the start, when the workers have had their grace to come back.
            self._seeded = True
            self.rescan()
        self._feed()
        pass_ = _Pass(alive, counted, factor, want, counted == set(alive))
        budget = self.batch
        # The backlog first, while copy slots are free: a few keys at a time (each may
        # take a slot), twice as many after a round that started no copy, within one
        # batch.  Keys that wait for a slot mostly need nothing any more by the time
        # they come up (their other holder came back, a report crossed): taking only
        # as many as there were free slots, one pass per reactor turn, kept a master
        # with a backlog of 100,000 such keys busy for minutes.
        chunk = max(1, self.concurrency - len(self.copying))
        while budget > 0 and self._backlog and len(self.copying) < self.concurrency:
            keys = _take(self._backlog, min(chunk, budget))
            budget -= len(keys)
            before = self.copies_started
            self._examine(keys, pass_)
            if self.copies_started == before:
                chunk *= 2
            else:
                chunk = max(1, self.concurrency - len(self.copying))
        keys = _take(self.queue, budget)
        if keys:
            self._examine(keys, pass_)
        elif budget == self.batch:
            return bool(self._scans)
        return bool(self.queue or self._scans
                    or (self._backlog and len(self.copying) < self.concurrency))

    def _examine(self, keys: list[str], pass_: _Pass) -> None:
        self.examined += len(keys)
        for view in self.directory.examine(keys):
            self._decide(view, pass_)

    def _decide(self, view: KeyView, pass_: _Pass) -> None:
        """What one key needs: a copy, surplus trims, trims of stale or deleted copies."""
        alive, counted, factor, want, trims_ok = pass_
        key = view.key
        if key in self.copying:
            return  # examined again when the copy ends
        if view.version is None:  # deleted: every copy goes (the dead ones' at return)
            self._failed_to.pop(key, None)
            for worker, version in view.copies:
                if worker in alive:
                    self._drop(key, worker, version, alive[worker])
                elif worker in counted:
                    # Suspect, or its link lost to silence: not dead, so it will not
                    # register again and be told then; look again at the next pass.
                    self._parked[key] = None
            return
        current = []
        stale = []
        for worker, version in view.copies:
            if version == view.version:
                current.append(worker)
            elif worker in alive:
                stale.append((worker, version))
            elif worker in counted:
                self._parked[key] = None  # as above: a suspect worker's stale copy
        holders = [w for w in current if w in counted]
        if not holders:
            # Lost: queued again when a holder comes back.  Unless only a worker ever
            # reported that version (its write never committed): then the newest
            # surviving older copy becomes current, and is examined again.
            if self.directory.fall_back(key, counted) is not None:
                log.warn("{key!r} v{version} has no copy left and was never committed: "
                         "back to its newest surviving copy", key=key, version=view.version)
                self.queue[key] = None
            return
        # Stale copies go only once the current version has its copies on live workers:
        # until then a stale copy may be the only durable one of an acknowledged write
        # (the current version only reported, its worker gone before it was copied).
        if stale and len([w for w in current if w in alive]) < want:
            self._parked[key] = None  # looked at again when a copy ends or workers change
        else:
            for worker, version in stale:
                self._drop(key, worker, version, alive[worker])
        if len(holders) < want:
            if len(self.copying) >= self.concurrency:
                self._backlog[key] = None
                return
            sources = [w for w in holders if w in alive]
            have = set(holders)
            failed = self._failed_to.get(key, ())
            ranked = self._ranked(alive)
            target = next(
                (r for r in ranked if r.name not in have and r.name not in failed), None)
            if target is None and failed:  # every one failed once: round again
                self._failed_to.pop(key, None)
                target = next((r for r in ranked if r.name not in have), None)
            if not sources or target is None:
                self._parked[key] = None
                return
            source = Replica(sources[0], view.size, view.sha256, view.version)
            self._copy(key, source, alive[sources[0]], target)
            return
        self._failed_to.pop(key, None)
        if len(holders) < factor:
            # Enough for a cluster smaller than the factor, short of it once the cluster
            # grows back: look again when the workers change (no scan finds it then, as
            # the directory still counts a dead worker's copy).
            self._parked[key] = None
        live = [w for w in current if w in alive]
        if len(live) > factor:
            # Trims only where every counted holder is alive (a copy may be pending).
            if not trims_ok:
                self._parked[key] = None
                return
            # Keep the copies on the most free disk (then by name), as
            # Directory.surplus does with the workers' loads.
            order = sorted(live, key=lambda w: (-alive[w].free_disk, w))
            for worker in sorted(order[factor:]):
                self._drop(key, worker, view.version, alive[worker])

    def _copy(self, key: str, source: Any, src: WorkerRecord, target: WorkerRecord) -> None:
        self.copying[key] = target.name
        self.copies_started += 1
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
            # pass does not copy again while that report is on its way.  Lazily: it
            # acknowledges nothing (the target's report or inventory is the durable
            # word), and a full commit per copy cost an fsync each.
            try:
                self.directory.add_replica(
                    key, target.name, source.size, source.sha256, source.version,
                    lazy=True,
                )
            except DirectoryError:
                self._retry[key] = None

        def failed(f: Failure) -> None:
            self._failed_to.setdefault(key, set()).add(target.name)
            log.warn(
                "copy of {key!r} to {dst} failed: {why}",
                key=key,
                dst=target.name,
                why=f.getErrorMessage(),
            )
            self._retry[key] = None

        def ended(_: object) -> None:
            self.copying.pop(key, None)
            if key not in self._retry:
                # Examined again: a report that crossed the copy was skipped meanwhile,
                # and the key may need more (a third copy, a trim).
                self.queue[key] = None
            # A copy slot is free for the backlog.
            self._soon()

        d.addCallbacks(done, failed)
        d.addBoth(ended)

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
                self._retry[key] = None
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
