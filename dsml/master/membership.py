"""The master's view of its workers: who is registered, who is alive, who has died.

Plain logic, no I/O: the net layer calls :meth:`Membership.register`,
:meth:`Membership.heartbeat` and :meth:`Membership.connection_lost` with an opaque
connection object, and turns a :class:`MembershipError` into one ERROR reply with its wire
code.  Liveness lives in memory only; heartbeats never touch disk.

Two time sources, on purpose:

* ``clock`` (an ``IReactorTime``) only *schedules* :meth:`Membership.check`, through a
  ``LoopingCall``;
* ``monotonic`` (``time.monotonic`` in production) is the only time used for liveness
  arithmetic, so a jump of the wall clock (NTP step, a suspended VM, an operator with
  ``date -s``) can never declare every worker dead at once.

States of a :class:`WorkerRecord`::

    register ──▶ alive ──(no heartbeat for suspect_after)──▶ suspect
                   ▲                                            │
                   └────────────── heartbeat ───────────────────┤
                                                                │ (no heartbeat for
    connection_lost / replaced ──────────▶ dead ◀───────────────┘  heartbeat_timeout)

A worker is *dead* after ``heartbeat_timeout`` seconds without a heartbeat (detected by the
next :meth:`~Membership.check`, so at most ``heartbeat_interval / 2`` later while the loop
runs), or at once when its connection closes.  *Suspect* is advisory (the scheduler may
prefer not to send it work); the worker keeps its attempts until it is dead.

Registration rule (name, incarnation, connection), checked in this order:

1. A malformed field is ``bad-header``; a different dsml or protocol version is
   ``version-mismatch`` (the message names what differs and both values).
2. An incarnation *lower* than the highest one this master has seen for the name, alive or
   dead, is ``stale-incarnation``: a newer process has claimed the name since, so this one is
   obsolete (a zombie from before a restart) and retrying will never help.
3. A connection that already carries a live worker under another name is
   ``already-registered``: one connection is one worker.
4. If the name is live (alive or suspect) on *another* connection, the registration is
   ``duplicate-name``, whatever its incarnation: the master cannot tell a second process
   claiming the name from a restart whose old connection is half-open, and taking the name
   from a process that still heartbeats would let two processes act as one worker.  The
   old connection is "already gone" exactly when :meth:`~Membership.connection_lost` has
   been called for it (or it missed ``heartbeat_timeout``): the record is then dead and
   case 6 applies.  A restarting worker therefore gets in at once after a clean exit (the
   kernel closes its socket), and at most ``heartbeat_timeout`` later after a silent one;
   ``duplicate-name`` is worth retrying with backoff, ``stale-incarnation`` is not.
5. If the name is live on the *same* connection: the same incarnation re-registers in place
   (an idempotent retry: fields refreshed, no listener fired); a higher one replaces the
   record: the old incarnation dies (``on_dead``), the new one is born (``on_alive``).
6. An unknown or dead name registers: a new record, alive, ``on_alive`` fired.  Its
   incarnation may equal the dead one's (the same process reconnecting after its connection
   dropped); its old attempts were already declared lost when it died, and stale attempt
   ids are fenced elsewhere.

Costs: :meth:`~Membership.heartbeat`, :meth:`~Membership.register` and
:meth:`~Membership.connection_lost` are O(1).  Live records are kept in an ordered dict by
last heartbeat (a heartbeat moves its worker to the end, monotonic time never goes back),
so :meth:`~Membership.check` walks only the workers that are overdue: O(suspect + newly
dead), not O(n).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Final

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..errors import DsmlError
from ..protocol import limits
from ..protocol.limits import FN_RUNTIME, GPU_ID, MAX_GPUS, MAX_MEM
from .workerrecord import ALIVE, DEAD, SUSPECT, Versions, WorkerRecord

log = Logger()

#: Heartbeat intervals without a heartbeat after which a worker is suspect (by default).
SUSPECT_INTERVALS: Final = 3

#: A worker name: the same rule as the ``workers`` keys of the configuration.
WORKER_NAME: Final = limits.WORKER_NAME
#: Longest host name (DNS limit).
MAX_HOST: Final = 253
#: Most task slots one worker may declare.
MAX_SLOTS: Final = limits.MAX_SLOTS
#: Largest incarnation number (fits a 12-digit header value, as every wire number must).
MAX_INCARNATION: Final = 10**12 - 1

#: Why a record died.
REASON_CONNECTION_LOST: Final = "connection lost"
REASON_TIMEOUT: Final = "heartbeat timeout"
REASON_REPLACED: Final = "replaced by a newer incarnation"

Listener = Callable[["WorkerRecord"], None]


class MembershipError(DsmlError):
    """A refused registration or heartbeat, with its wire ``code``.

    Codes: ``bad-header``, ``version-mismatch``, ``duplicate-name``, ``stale-incarnation``,
    ``already-registered``, ``not-registered``.
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, code)


class Membership:
    """Registered workers and their liveness, driven by a clock; see the module docstring.

    :param clock: schedules :meth:`check` once :meth:`start` is called (``IReactorTime``).
    :param monotonic: the time source of every liveness decision; never the wall clock.
    :param heartbeat_interval: seconds between a worker's heartbeats.
    :param heartbeat_timeout: seconds without a heartbeat after which a worker is dead.
    :param versions: what this master runs; a worker must run the same.
    :param suspect_after: seconds without a heartbeat after which a worker is suspect;
        by default ``SUSPECT_INTERVALS`` intervals, capped at half the timeout.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        monotonic: Callable[[], float],
        versions: Versions,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        suspect_after: float | None = None,
    ) -> None:
        if not (math.isfinite(heartbeat_interval) and heartbeat_interval > 0):
            raise ValueError(f"heartbeat_interval must be > 0, got {heartbeat_interval!r}")
        if not (math.isfinite(heartbeat_timeout) and heartbeat_timeout > heartbeat_interval):
            raise ValueError(
                f"heartbeat_timeout must be greater than heartbeat_interval "
                f"({heartbeat_interval:g}), got {heartbeat_timeout!r}"
            )
        if suspect_after is None:
            suspect_after = min(SUSPECT_INTERVALS * heartbeat_interval, heartbeat_timeout / 2)
        if not (math.isfinite(suspect_after) and 0 < suspect_after < heartbeat_timeout):
            raise ValueError(
                f"suspect_after must be > 0 and below heartbeat_timeout "
                f"({heartbeat_timeout:g}), got {suspect_after!r}"
            )
        self.clock = clock
        self.monotonic = monotonic
        #: True while every live worker is overdue at once (see :meth:`check`).
        self._isolated = False
        self.versions = versions
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.suspect_after = suspect_after
        #: Called with the new record when a worker (incarnation) becomes alive.
        self.on_alive: list[Listener] = []
        #: Called with the record when a worker dies (timeout, closed connection, replaced).
        self.on_dead: list[Listener] = []
        # Every record by name, live or dead (dead ones remember the incarnation).
        self._records: dict[str, WorkerRecord] = {}
        # Live records only, oldest heartbeat first.
        self._by_heartbeat: OrderedDict[str, WorkerRecord] = OrderedDict()
        # Live records by the id of their connection (connections need not be hashable).
        self._by_conn: dict[int, WorkerRecord] = {}
        self._loop: LoopingCall | None = None

    # -- queries -----------------------------------------------------------------------

    def get(self, name: str) -> WorkerRecord | None:
        """The latest record of ``name`` (live or dead), or None if it never registered."""
        return self._records.get(name)

    def all(self) -> list[WorkerRecord]:
        """The latest record of every worker ever registered, dead ones included, by name."""
        return sorted(self._records.values(), key=lambda r: r.name)

    def alive(self) -> list[WorkerRecord]:
        """Workers in state ``alive`` (not suspect, not dead), by name."""
        return sorted(
            (r for r in self._by_heartbeat.values() if r.state == ALIVE), key=lambda r: r.name
        )

    def heard_lately(self) -> bool:
        """Whether some live worker was heard within ``suspect_after`` (False while the
        master hears nobody: cut off, just started, or every worker gone)."""
        newest = next(reversed(self._by_heartbeat.values()), None)
        return newest is not None and (
            newest.seconds_since_heartbeat(self.monotonic()) < self.suspect_after)

    @property
    def isolated(self) -> bool:
        """All live workers (two or more) fell silent at once: see :meth:`check`."""
        return self._isolated

    def alive_map(self) -> dict[str, WorkerRecord]:
        """Workers in state ``alive``, by name, in no particular order: O(n), no sort
        (for callers that ask on every pass)."""
        return {n: r for n, r in self._by_heartbeat.items() if r.state == ALIVE}

    def records(self) -> Iterable[WorkerRecord]:
        """The latest record of every worker ever registered, in no particular order
        (a view: do not register or kill while walking it)."""
        return self._records.values()

    def live(self) -> list[WorkerRecord]:
        """Workers not dead (alive or suspect), by name: those that still own attempts."""
        return sorted(self._by_heartbeat.values(), key=lambda r: r.name)

    def by_conn(self, conn: object) -> WorkerRecord | None:
        """The live worker registered on ``conn``, if any."""
        return self._by_conn.get(id(conn))

    # -- registration and heartbeats -----------------------------------------------------

    def register(
        self,
        name: str,
        incarnation: int,
        *,
        host: str,
        port: int,
        slots: int,
        versions: Versions,
        conn: object,
        free_slots: int | None = None,
        stored_bytes: int = 0,
        stored_files: int = 0,
        free_disk: int = 0,
        mem: int = 0,
        gpus: tuple[str, ...] = (),
        fn_runtime: str = "",
    ) -> WorkerRecord:
        """Register worker ``name`` at ``incarnation`` on ``conn``; return its live record.

        The rule is in the module docstring.  Raises :class:`MembershipError`.
        ``free_slots`` defaults to ``slots``; the other statistics come with heartbeats.
        """
        try:
            _check_name(name)
            _check_int("incarnation", incarnation, 0, MAX_INCARNATION)
            if not isinstance(host, str) or not 0 < len(host) <= MAX_HOST or not host.isprintable():
                raise MembershipError(
                    f"host must be 1 to {MAX_HOST} printable characters, got {host!r}",
                    "bad-header",
                )
            _check_int("port", port, 1, 65535)
            _check_int("slots", slots, 0, MAX_SLOTS)
            _check_int("mem", mem, 0, MAX_MEM)
            _check_gpus(gpus)
            if not isinstance(fn_runtime, str) or not FN_RUNTIME.match(fn_runtime):
                raise MembershipError(
                    f"Fn-Runtime must be up to 128 of A-Z a-z 0-9 _ . + = - and spaces, "
                    f"got {str(fn_runtime)[:200]!r}", "bad-header")
            if free_slots is None:
                free_slots = slots
            _check_stats(free_slots, stored_bytes, stored_files, free_disk)
            self.check_versions(name, versions)
            old = self._records.get(name)
            if old is not None and incarnation < old.incarnation:
                raise MembershipError(
                    f"worker {name!r} incarnation {incarnation} is stale: incarnation "
                    f"{old.incarnation} has registered since ({old.state}); this process "
                    f"is obsolete",
                    "stale-incarnation",
                )
            other = self._by_conn.get(id(conn))
            if other is not None and other.name != name:
                raise MembershipError(
                    f"this connection already carries worker {other.name!r}; "
                    f"cannot register {name!r} on it too",
                    "already-registered",
                )
            now = self.monotonic()
            if old is not None and old.live and old.conn is not None and old.conn is not conn:
                raise MembershipError(
                    f"worker {name!r} is already registered (incarnation {old.incarnation}, "
                    f"{old.state}, last heartbeat {old.seconds_since_heartbeat(now):.1f} s ago) "
                    f"on another connection; if that process is gone, retry: the name is "
                    f"freed when its connection closes or within "
                    f"{self.heartbeat_timeout:g} s of silence",
                    "duplicate-name",
                )
        except MembershipError as e:
            log.warn("refused registration of worker {name!r}: {error}", name=name, error=e)
            raise

        if old is not None and old.live and incarnation == old.incarnation:
            # Same connection, same incarnation: an idempotent retry; refresh in place.
            (old.host, old.port, old.slots, old.mem, old.gpus,
             old.fn_runtime) = host, port, slots, mem, gpus, fn_runtime
            self._set_stats(old, free_slots, stored_bytes, stored_files, free_disk)
            self._touch(old, now)
            log.info(
                "worker {name!r} re-registered (incarnation {incarnation})",
                name=name,
                incarnation=incarnation,
            )
            return old

        if old is not None and old.live and old.conn is None:
            # Its link died of silence (connection_lost) and it is back: the same record
            # on the new link; the caller reconciles its attempts.
            old.incarnation = incarnation
            old.conn = conn
            (old.host, old.port, old.slots, old.mem, old.gpus,
             old.fn_runtime) = host, port, slots, mem, gpus, fn_runtime
            self._set_stats(old, free_slots, stored_bytes, stored_files, free_disk)
            self._by_conn[id(conn)] = old
            self._touch(old, now)
            log.info("worker {name!r} is back on a new link (incarnation {inc})", name=name,
                     inc=incarnation)
            return old

        replaced = None
        if old is not None and old.live:
            # Same connection, higher incarnation: the old incarnation ends here.
            self._kill(old, now, REASON_REPLACED)
            replaced = old
        record = WorkerRecord(
            name=name,
            incarnation=incarnation,
            host=host,
            port=port,
            slots=slots,
            free_slots=free_slots,
            stored_bytes=stored_bytes,
            stored_files=stored_files,
            free_disk=free_disk,
            state=ALIVE,
            last_heartbeat=now,
            registered_at=now,
            conn=conn,
            mem=mem,
            gpus=gpus,
            fn_runtime=fn_runtime,
        )
        self._records[name] = record
        self._by_heartbeat[name] = record
        self._by_conn[id(conn)] = record
        self._touch(record, now)  # a sign of life: ends an isolation (see check)
        # (Logged once, with its inventory's figures, by the registry.)
        if replaced is not None:
            self._fire(self.on_dead, replaced, "on_dead")
        self._fire(self.on_alive, record, "on_alive")
        return record

    def heartbeat(
        self,
        name: str,
        incarnation: int,
        *,
        free_slots: int,
        stored_bytes: int,
        stored_files: int,
        free_disk: int,
        conn: object,
    ) -> WorkerRecord:
        """Record a heartbeat of ``name`` at ``incarnation`` on ``conn``; O(1).

        Updates the statistics and the heartbeat time; a suspect worker becomes alive again.
        Raises :class:`MembershipError`: ``not-registered`` (unknown name, dead, a higher
        incarnation than the registered one, or another connection than the registered
        one), ``stale-incarnation`` (a lower incarnation) or ``bad-header``.
        """
        try:
            _check_name(name)
            _check_int("incarnation", incarnation, 0, MAX_INCARNATION)
            _check_stats(free_slots, stored_bytes, stored_files, free_disk)
            record = self._records.get(name)
            if record is None:
                raise MembershipError(
                    f"worker {name!r} is not registered; register first", "not-registered"
                )
            if incarnation < record.incarnation:
                raise MembershipError(
                    f"worker {name!r} incarnation {incarnation} is stale: incarnation "
                    f"{record.incarnation} has registered since",
                    "stale-incarnation",
                )
            if incarnation > record.incarnation:
                raise MembershipError(
                    f"worker {name!r} incarnation {incarnation} is not registered "
                    f"(incarnation {record.incarnation} is); register first",
                    "not-registered",
                )
            if not record.live:
                raise MembershipError(
                    f"worker {name!r} incarnation {incarnation} was declared dead "
                    f"({record.dead_reason}); register again",
                    "not-registered",
                )
            if record.conn is not conn:
                raise MembershipError(
                    f"worker {name!r} is registered on another connection; "
                    f"register on this one first",
                    "not-registered",
                )
        except MembershipError as e:
            log.warn("refused heartbeat of worker {name!r}: {error}", name=name, error=e)
            raise
        self._set_stats(record, free_slots, stored_bytes, stored_files, free_disk)
        self._touch(record, self.monotonic())
        return record

    def connection_lost(self, conn: object) -> WorkerRecord | None:
        """The connection ``conn`` closed: its worker is dead at once, unless the link
        died of silence (see below).  Returns the record killed, or None."""
        record = self._by_conn.get(id(conn))
        if record is None or record.conn is not conn:
            return None
        now = self.monotonic()
        silent = record.seconds_since_heartbeat(now)
        if silent >= self.suspect_after:
            # The link died of silence (TCP's user timeout), not of a process closing
            # it: the worker stays live without a link (no work is sent to it) until it
            # registers again, or the check declares it dead (by check's rules).
            del self._by_conn[id(conn)]
            record.conn = None
            log.info("worker {name!r}: link closed after {s:.1f} s of silence",
                     name=record.name, s=silent)
            return None
        self._kill(record, now, REASON_CONNECTION_LOST)
        self._fire(self.on_dead, record, "on_dead")
        return record

    # -- liveness ------------------------------------------------------------------------

    def check(self) -> list[WorkerRecord]:
        """Mark overdue workers suspect or dead by the monotonic clock; return the newly dead.

        Walks the live workers oldest heartbeat first and stops at the first one heard from
        within ``suspect_after``, so the cost is the number of overdue workers, not n.
        ``on_dead`` listeners fire after the walk, in order of death.
        """
        now = self.monotonic()
        newly_dead: list[WorkerRecord] = []
        # No copy of the dict: the walk only reads; deaths are applied after it.
        for record in self._by_heartbeat.values():
            silent = record.seconds_since_heartbeat(now)
            if silent < self.suspect_after:
                break
            if silent >= self.heartbeat_timeout:
                newly_dead.append(record)
            elif record.state == ALIVE:
                record.state = SUSPECT
                log.info(
                    "worker {name!r} is suspect: no heartbeat for {silent:.1f} s",
                    name=record.name,
                    silent=silent,
                )
        if newly_dead and len(self._by_heartbeat) >= 2 and not self.heard_lately():
            # None of two or more live workers heard lately: the master is likelier cut
            # off (or paused) than all of them dead, and there would be nowhere to move
            # their work.  Hold the verdict until one is heard (_touch).  A lone
            # worker's silence says nothing either way: it dies.
            if not self._isolated:
                self._isolated = True
                log.warn("no worker heard lately: this master looks cut off; none is"
                         " declared dead until one is heard again")
            return []
        for record in newly_dead:
            silent = record.seconds_since_heartbeat(now)
            self._kill(record, now, REASON_TIMEOUT, silent)
        for record in newly_dead:
            self._fire(self.on_dead, record, "on_dead")
        return newly_dead

    def start(self) -> None:
        """Run :meth:`check` every ``heartbeat_interval / 2`` seconds on ``clock``."""
        if self._loop is not None and self._loop.running:
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        d = self._loop.start(self.heartbeat_interval / 2, now=False)
        d.addErrback(lambda f: log.failure("membership check loop stopped", f))

    def stop(self) -> None:
        """Stop the check loop (a no-op if it is not running)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    @property
    def running(self) -> bool:
        """True while the check loop runs."""
        return self._loop is not None and self._loop.running

    # -- internals -----------------------------------------------------------------------

    def _tick(self) -> None:
        """One loop step: :meth:`check`, whose failure is logged and never ends the loop."""
        try:
            self.check()
        except Exception:
            log.failure("membership check failed; the loop carries on")

    def check_versions(self, name: str, versions: Versions) -> None:
        """MembershipError (``version-mismatch``) unless ``versions`` are the master's."""
        mine = self.versions
        if not isinstance(versions, Versions):
            raise MembershipError(f"versions must be given, got {versions!r}", "bad-header")
        differ = []
        if versions.dsml != mine.dsml:
            differ.append(f"dsml version: worker {versions.dsml}, master {mine.dsml}")
        if versions.protocol != mine.protocol:
            differ.append(f"protocol version: worker {versions.protocol}, master {mine.protocol}")
        if differ:
            raise MembershipError(
                f"worker {name!r} runs {versions}, the master runs {mine}; "
                + "; ".join(differ)
                + " (run the same dsml release everywhere)",
                "version-mismatch",
            )

    def _touch(self, record: WorkerRecord, now: float) -> None:
        """A sign of life from ``record`` at ``now``: alive again, newest in the order."""
        if self._isolated:
            # Heard again after all went silent: every live worker gets a whole timeout
            # from now (their silence was the master's, not theirs).
            self._isolated = False
            for other in self._by_heartbeat.values():
                other.last_heartbeat = now
                other.state = ALIVE  # suspect again, if it stays silent, by the check
            log.info("a worker is heard again: failure detection resumes")
        record.last_heartbeat = now
        self._by_heartbeat.move_to_end(record.name)
        if record.state == SUSPECT:
            record.state = ALIVE
            log.info("worker {name!r} is alive again", name=record.name)

    @staticmethod
    def _set_stats(
        record: WorkerRecord, free_slots: int, stored_bytes: int, stored_files: int, free_disk: int
    ) -> None:
        record.free_slots = free_slots
        record.stored_bytes = stored_bytes
        record.stored_files = stored_files
        record.free_disk = free_disk

    def _kill(
        self, record: WorkerRecord, now: float, reason: str, silent: float | None = None
    ) -> None:
        """Mark a live record dead and drop it from the live indexes (no listeners)."""
        record.state = DEAD
        record.died_at = now
        record.dead_reason = reason
        if self._by_heartbeat.get(record.name) is record:
            del self._by_heartbeat[record.name]
        if self._by_conn.get(id(record.conn)) is record:
            del self._by_conn[id(record.conn)]
        if silent is None:
            silent = record.seconds_since_heartbeat(now)
        log.warn(
            "worker {name!r} (incarnation {incarnation}) is dead: {reason} "
            "(last heartbeat {silent:.1f} s ago)",
            name=record.name,
            incarnation=record.incarnation,
            reason=reason,
            silent=silent,
        )

    def _fire(self, listeners: list[Listener], record: WorkerRecord, event: str) -> None:
        """Call every listener; one that raises is logged and the others still run."""
        for listener in list(listeners):
            try:
                listener(record)
            except Exception:
                log.failure(
                    "membership {event} listener {listener!r} failed for worker {name!r}",
                    event=event,
                    listener=listener,
                    name=record.name,
                )


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not WORKER_NAME.match(name):
        raise MembershipError(
            f"worker name must be 1 to 64 of A-Z a-z 0-9 _ . -, got {name!r}", "bad-header"
        )


def _check_int(what: str, value: object, low: int, high: int | None = None) -> None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise MembershipError(f"{what} must be an integer {bound}, got {value!r}", "bad-header")


def _check_gpus(gpus: object) -> None:
    if (not isinstance(gpus, tuple) or len(gpus) > MAX_GPUS
            or not all(isinstance(g, str) and GPU_ID.match(g) for g in gpus)
            or len(set(gpus)) != len(gpus)):
        raise MembershipError(
            f"gpus must be at most {MAX_GPUS} distinct ids of 1 to 128 of A-Z a-z 0-9"
            f" _ . : -, got {str(gpus)[:200]}", "bad-header")


def _check_stats(free_slots: int, stored_bytes: int, stored_files: int, free_disk: int) -> None:
    _check_int("free_slots", free_slots, 0, MAX_SLOTS)
    _check_int("stored_bytes", stored_bytes, 0)
    _check_int("stored_files", stored_files, 0)
    _check_int("free_disk", free_disk, 0)
