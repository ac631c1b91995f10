"""Where keys live: the master's answers to clients about writing, reading and removing.

:class:`KeySpace` is the application side of ``place``, ``locate``, ``commit``,
``corrupt``, ``remove`` and ``list``: it combines the directory (which worker holds which
version), the live workers (membership) and drop orders down their links.  It never sees
a payload (clients move bytes straight to and from workers) nor a wire message: the
request handler (:mod:`dsml.master.requests`) decodes and encodes.

Versions are issued here only: ``place`` answers a new version with its grant
(:mod:`dsml.protocol.grants`), which the client hands to the first worker of the
pipeline (and each worker to the next) and back to ``commit``; a commit records the
version its grant names, never one the client picked.  A client's ``corrupt`` is a hint:
the named worker is ordered to ``verify`` its copy (re-hash it against the directory's
sha256); the copy is forgotten only when the worker itself says ``bad_copy``
(:meth:`dsml.master.registry.WorkerRegistry.bad_copy`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from ..errors import DsmlError
from .directory import Directory, DirectoryError, WorkerLoad
from .membership import Membership, WorkerRecord
from .repair import _order

#: A ``list`` page: (key, size, sha256, version, replicas) per key.
Row = tuple[str, int, str, int, list[str]]


@attrs.frozen
class Placement:
    """Where a new write goes: its version, and the workers of its pipeline, in order."""

    version: int
    workers: list[WorkerRecord]
    #: The master's signature of (key, version): what the workers store it under.
    grant: str = ""


@attrs.frozen
class Location:
    """Where a key's current version is: its size, digest, version and holders (live
    ones first)."""

    size: int
    sha256: str
    version: int
    replicas: list[WorkerRecord]


def _ignore(failure: object) -> None:
    """An order whose outcome nobody waits for (the repairer mends what it missed)."""


class KeySpace:
    """Placement, lookups, commits and removals of keys, over the directory and the workers."""

    def __init__(
        self,
        *,
        directory: Directory,
        membership: Membership,
        factor: Callable[[], int],
        full_until: float = 0.0,
        known_workers: int = 0,
    ) -> None:
        self.directory = directory
        self.membership = membership
        self.factor = factor
        #: Until this monotonic time (a master that just started: its workers are still
        #: registering again) a write is placed only on as many workers as the
        #: replication factor asks (or as the master knew of before it started, if
        #: fewer: ``known_workers``), else refused ``unavailable`` (try again); after it,
        #: a cluster with fewer live workers takes writes on those it has.
        self.full_until = full_until
        self.known_workers = known_workers
        #: (key, worker) of verify orders in flight.
        self._verifying: set[tuple[str, str]] = set()
        # Bytes placed on each worker since its last heartbeat (which brings its stored
        # bytes): (that heartbeat's time, bytes placed since).
        self._placed: dict[str, tuple[float, int]] = {}

    def place(self, key: str, size: int) -> Placement:
        """Choose the workers for a new write of ``key`` and its version."""
        alive = {r.name: r for r in self.membership.alive()}
        factor = self.factor()
        starting = self.membership.monotonic() < self.full_until
        need = min(factor, self.known_workers)
        if starting and len(alive) < need:
            raise DsmlError(
                f"the master has just started and {len(alive)} of the {factor} workers a"
                " write needs have registered again: try again in a moment",
                "unavailable",
            )
        loads = {n: WorkerLoad(r.free_disk, r.stored_bytes + self._since(r)) for n, r in
                 alive.items()}
        names = self.directory.place(key, size, loads, factor)
        for n in names:
            self._placed[n] = (alive[n].last_heartbeat, self._since(alive[n]) + size)
        if starting and len(names) < need:
            # Registered, but not all have said how much room they have (their first
            # heartbeat follows the registration): no write below the factor for that.
            raise DsmlError(
                f"the master has just started and {len(names)} of the {factor} workers a"
                " write needs have room known: try again in a moment",
                "unavailable",
            )
        version = self.directory.next_version()
        grant = self.directory.grants.issue(key, version, names)
        return Placement(version, [alive[n] for n in names], grant)

    def _since(self, record: Any) -> int:
        """Bytes placed on a worker since its last heartbeat."""
        base, added = self._placed.get(record.name, (record.last_heartbeat, 0))
        return added if base == record.last_heartbeat else 0

    def locate(self, key: str) -> Location:
        """Where ``key``'s current version is: live holders first (in the directory's
        spread order), then the rest, which a client may still try if it can reach
        them; ``unavailable`` when no known worker holds it."""
        records = {r.name: r for r in self.membership.all()}
        alive = {n for n, r in records.items() if r.live}
        replicas = self.directory.locate(key)
        ordered = [r for r in replicas if r.worker in alive] + [
            r for r in replicas if r.worker not in alive and r.worker in records
        ]
        if not ordered:
            raise DirectoryError(f"no known worker holds {key!r}", "unavailable")
        first = ordered[0]
        return Location(
            first.size, first.sha256, first.version, [records[r.worker] for r in ordered]
        )

    def commit(
        self, key: str, size: int, sha256: str, grant: str, workers: Sequence[str]
    ) -> int:
        """A client's write reached ``workers``: record the copies at once (reads see it).

        The version is the one ``grant`` (place's answer) was issued for ``key``
        (``forbidden`` for any other grant); returns it.
        """
        version = self.directory.grants.version_of(key, grant)
        unknown = [w for w in workers if self.membership.get(w) is None]
        if unknown:
            raise DsmlError(f"no such worker: {', '.join(unknown)}", "bad-header")
        # One transaction (one fsync) for the copies and the committed mark: the mark
        # alone would cost a commit of its own when the workers' reports came first.
        state = self.directory.state
        with state.transaction():
            for worker in workers:
                self.directory.add_replica(
                    key, worker, size, sha256, version, issued=state.last_version,
                    committed=True,
                )
        return version

    def corrupt(self, key: str, worker: str) -> bool:
        """A client says ``worker``'s copy of ``key`` is corrupt: a hint only.

        ``worker`` is ordered to re-hash its copy of the current version against the
        directory's sha256 (``verify``); if it finds it bad it forgets it and says
        ``bad_copy``, and only that makes the master forget the copy.  One check per
        (key, worker) at a time.  Returns whether a check was ordered (False: the key is
        not live, the worker holds no current copy or is not live, or one is running).
        """
        record = self.membership.get(worker)
        if record is None or not record.live or (key, worker) in self._verifying:
            return False
        try:
            mine = [r for r in self.directory.locate(key) if r.worker == worker]
        except DirectoryError:
            return False
        if not mine:
            return False
        self._verifying.add((key, worker))
        d = _order(
            record, "verify", {"Key": key, "Version": mine[0].version, "Sha256": mine[0].sha256}
        )
        d.addErrback(_ignore)
        d.addBoth(lambda _: self._verifying.discard((key, worker)))
        return True

    def remove(self, key: str) -> int:
        """Delete ``key`` everywhere; the version deleted.  Live holders are ordered to
        drop their copies now, the others when they come back."""
        version = self.directory.delete(key)
        for trim in self.directory.pending_deletes_of(key):
            record = self.membership.get(trim.worker)
            if record is not None and record.live:
                _order(record, "drop", {"Key": key, "Version": trim.version}).addCallback(
                    self._dropped, key, trim.worker, trim.version
                ).addErrback(_ignore)
        return version

    def _dropped(self, _: Any, key: str, worker: str, version: int) -> None:
        self.directory.remove_replica(key, worker, version)

    def list(self, prefix: str, after: str | None, limit: int) -> list[Row]:
        """Up to ``limit`` keys under ``prefix`` after ``after``, with their replicas."""
        return self.directory.list(prefix, after, limit)  # type: ignore[no-any-return]
