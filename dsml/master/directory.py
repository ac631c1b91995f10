"""The data directory: which worker holds which version of which key, and where to put more.

Pure logic over :class:`~dsml.master.state.MasterState`: no I/O of its own, no Twisted,
no notion of liveness (callers pass the set of live workers, and their load, in).

Versions and tombstones.  A key's version is a cluster-wide number that only moves up
(:meth:`Directory.next_version` issues them).  The directory records every copy a worker
reports, with its version, and keeps for each live key the highest version reported so
far as its *current* one:

* a report newer than the current version makes it current; copies of older versions
  become *stale* (:meth:`Directory.stale_replicas`): they are never located, and the
  master asks their workers to trim them;
* a report older than the current version is recorded as stale on arrival;
* a report of the current version with another size or sha256 is refused
  (``checksum-mismatch``): one version has one content;
* :meth:`Directory.delete` replaces the key's entry by a *tombstone* at its current
  version.  Its copies are listed by :meth:`Directory.pending_deletes` until the workers
  say they trimmed them.  A later report of a version at or below the tombstone's (a
  worker that was down during the delete) never brings the key back: it is recorded
  as a copy pending deletion.  A report of a *higher* version is a write after the delete
  and makes the key live again (the tombstone goes).
* a key whose current copies are all gone stays in the directory (it is *lost*, see
  :meth:`Directory.lost`), unless only workers reported that version (never committed for
  a client): :meth:`Directory.fall_back` then makes its newest surviving older copy
  current, never one behind a committed version (``add_replica(committed=True)``, delete).

Every write that acknowledges something (a replica report, a delete, a reconcile) is
committed durably before the method returns; :meth:`Directory.remove_replica`
acknowledges nothing and commits lazily.

Versions are the master's alone (:mod:`dsml.protocol.grants`).  A worker's report
or inventory entry of a version above ``issued`` (the highest version the master ever
handed out, which the caller passes) was never issued: it is *quarantined*, neither
recorded nor trusted over what the directory has, nor able to make real copies look
stale (:data:`QUARANTINED`).  The counter itself never moves for a report.

Trim orders carry the version they apply to (:class:`Trim`): a worker should only drop
its copy if it still holds that version (or an older one), since it may have stored a
newer one in the meantime.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import attrs

from ..errors import DsmlError
from ..protocol import limits
from ..protocol.grants import Grants
from ..protocol.methods import HeaderValueError, check_key
from .placement import WorkerLoad, pipeline_order, rank
from .state import MAX_INT, MAX_VERSION, Conflict, MasterState

__all__ = [
    "CURRENT",
    "QUARANTINED",
    "DELETED",
    "STALE",
    "SURPLUS",
    "Directory",
    "DirectoryError",
    "KeyView",
    "ReconcileResult",
    "Rejection",
    "Replica",
    "Stats",
    "Trim",
    "WorkerLoad",
]

#: Verdicts of :meth:`Directory.add_replica`, and reasons of a :class:`Trim`.
CURRENT = "current"  #: the copy is (one of) the key's current version
STALE = "stale"  #: older than the key's current version: trim it
DELETED = "deleted"  #: the key was deleted at this version or later: trim it
SURPLUS = "surplus"  #: a current copy beyond the replication factor: trim it
#: The reason a report of a version never issued is set aside (:class:`Rejection`).
QUARANTINED = "quarantined"

_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
#: Keys that check_key surely accepts: at most MAX_KEY / 4 characters (so at most MAX_KEY
#: bytes of UTF-8), no control character, no surrogate.  Others go through check_key.
_KEY_FAST = re.compile(rf"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]{{1,{limits.MAX_KEY // 4}}}\Z")
#: A worker name: any printable text (membership is stricter); never a control character.
_WORKER = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,256}\Z")


class DirectoryError(DsmlError):
    """A directory operation failed; ``code`` is the wire error code.

    Codes: ``not-found``, ``unavailable`` (no live copy), ``no-workers``, ``no-space``,
    ``bad-key``, ``bad-checksum`` (a malformed sha256), ``checksum-mismatch`` (another
    content for a version already known), ``bad-request``.
    """


@attrs.frozen
class Replica:
    """One worker's copy of a key."""

    worker: str
    size: int
    sha256: str
    version: int


@attrs.frozen
class Trim:
    """A copy a worker should delete, if it still holds ``version`` or older."""

    key: str
    worker: str
    version: int
    reason: str  #: STALE, DELETED or SURPLUS


@attrs.frozen
class Rejection:
    """An inventory entry that was skipped, and why."""

    key: Any  #: as received (it may not even be a string)
    reason: str


@attrs.frozen
class ReconcileResult:
    """What :meth:`Directory.reconcile` did with one worker's inventory."""

    worker: str
    added: int  #: entries new to the directory (or changed) for this worker, recorded
    unchanged: int  #: entries the directory already had exactly
    removed: int  #: copies the directory listed for this worker that the inventory lacks
    rejected: tuple[Rejection, ...]  #: malformed or conflicting entries, skipped
    trim: tuple[Trim, ...]  #: copies on this worker to delete (stale, deleted, surplus)

    @property
    def stale(self) -> int:
        """Copies of older versions on this worker."""
        return sum(1 for t in self.trim if t.reason == STALE)

    @property
    def deleted(self) -> int:
        """Copies of tombstoned keys on this worker."""
        return sum(1 for t in self.trim if t.reason == DELETED)


@attrs.frozen
class KeyView:
    """One key as the repairer sees it: its current version (None if it is not live:
    deleted) and every copy, as (worker, version), by worker."""

    key: str
    version: int | None
    size: int
    sha256: str
    copies: list[tuple[str, int]]


class Stats(NamedTuple):
    """Directory totals."""

    keys: int  #: live keys
    replicas: int  #: copies of current versions
    bytes: int  #: size of the live keys' current versions (one copy each)


def _entry_problem(key: Any, size: Any, sha256: Any, version: Any) -> tuple[str, str] | None:
    """(code, message) if a replica report is malformed, else None."""
    if type(key) is not str:
        return "bad-key", f"key must be a string, not {type(key).__name__}"
    try:
        check_key(key)
    except HeaderValueError as e:
        return "bad-key", e.message
    if type(sha256) is not str or not _SHA256.match(sha256):
        return "bad-checksum", "sha256 must be 64 lowercase hex digits"
    if type(size) is not int or not 0 <= size <= MAX_INT:
        return "bad-request", f"size must be an integer from 0 to {MAX_INT}, not {size!r}"
    if type(version) is not int or not 1 <= version <= MAX_VERSION:
        return "bad-request", (
            f"version must be an integer from 1 to {MAX_VERSION}, not {version!r}"
        )
    return None


def _conflict_error(worker: str, c: Conflict) -> DirectoryError:
    return DirectoryError(
        f"worker {worker!r} reports key {c.key!r} version {c.version} with size {c.size} "
        f"and sha256 {c.sha256}, but that version has size {c.known_size} and sha256 "
        f"{c.known_sha256}",
        "checksum-mismatch",
    )


def _never_issued(version: int, issued: int) -> str:
    return f"version {version} was never issued (the master's counter is at {issued})"


def _check_worker(worker: Any) -> str:
    if type(worker) is not str or not _WORKER.match(worker):
        raise DirectoryError(f"bad worker name {worker!r}", "bad-request")
    return worker


def _check_factor(factor: int) -> int:
    if type(factor) is not int or factor < 1:
        raise ValueError(f"replication factor must be a positive integer, not {factor!r}")
    return factor


_rank = rank  # spreads reads over the holders too


def _keep_order(live: Collection[str] | Mapping[str, WorkerLoad]) -> Callable[[str], Any]:
    """Sort key for the copies to keep first: most free disk, then name."""
    if isinstance(live, Mapping):
        loads = live
        return lambda w: (-loads[w].free_disk, w)
    return lambda w: w


class Directory:
    """Which worker holds which key; placement and replication decisions.

    Holds nothing in memory but the state handle: every answer comes from SQLite.
    """

    def __init__(self, state: MasterState, now: Callable[[], float] = time.time) -> None:
        """Work over ``state``; ``now`` (wall clock) only timestamps tombstones."""
        self.state = state
        self._now = now
        self._grants: Grants | None = None
        #: Told, after each commit, of the keys whose copies it may have changed (the
        #: repairer's queue: it re-examines those keys and never scans for them).
        self.watchers: list[Callable[[Iterable[str]], None]] = []

    def _changed(self, keys: Iterable[str]) -> None:
        """Tell the watchers that the copies of ``keys`` may have changed."""
        keys = tuple(keys)
        if keys:
            for watcher in self.watchers:
                watcher(keys)

    # -- writes ------------------------------------------------------------------------

    def next_version(self) -> int:
        """A new version for a write (higher than every version the directory knows)."""
        return self.state.issue_version()

    @property
    def grants(self) -> Grants:
        """Signs and checks the grants of the versions :meth:`next_version` issues."""
        if self._grants is None:
            self._grants = Grants(self.state.grant_secret)
        return self._grants

    def add_replica(
        self,
        key: str,
        worker: str,
        size: int,
        sha256: str,
        version: int,
        issued: int | None = None,
        lazy: bool = False,
        committed: bool = False,
    ) -> str:
        """Record that ``worker`` stored ``key`` at ``version``; committed on return (at
        the lazy level with ``lazy``: for a record that acknowledges nothing).  With
        ``committed`` (a client's commit), the key never goes back behind ``version``.

        Returns the verdict: CURRENT (the copy is current), STALE (older than the
        current version: trim it) or DELETED (the key was deleted at this version or
        later: trim it).  Raises DirectoryError for a malformed report (``bad-key``,
        ``bad-checksum``, ``bad-request``) or another content for the current version
        (``checksum-mismatch``), and ``forbidden`` for a version above ``issued`` (one
        the master never issued, see the module docstring); nothing is recorded then.
        """
        _check_worker(worker)
        problem = _entry_problem(key, size, sha256, version)
        if problem is not None:
            raise DirectoryError(problem[1], problem[0])
        if issued is not None and version > issued:
            raise DirectoryError(_never_issued(version, issued), "forbidden")
        st = self.state
        with st.transaction(lazy=lazy):
            outcome = st.apply_reports(worker, [(key, size, sha256, version)])
            if outcome.conflicts:
                raise _conflict_error(worker, outcome.conflicts[0])
            if committed:
                st.commit_version(key, version)
            cur = st.get_key(key)
        self._changed(outcome.changed)
        if cur is None:
            return DELETED
        return CURRENT if cur.version == version else STALE

    def remove_replica(self, key: str, worker: str, version: int | None = None) -> bool:
        """Forget ``worker``'s copy of ``key`` (it deleted or lost it); False if unknown.

        With ``version`` (the version the worker deleted), the copy is only forgotten if
        the directory has it at that version or older: a trim confirmation that crosses
        a report of a newer write must not forget the new copy.

        Acknowledges nothing, so the commit is lazy (NORMAL): after a power loss the
        worker's next inventory corrects it.
        """
        st = self.state
        with st.transaction(lazy=True):
            if version is not None:
                row = st.get_replica(key, worker)
                if row is None or row.version > version:
                    return False
            dropped = st.drop_replica(key, worker)
        if dropped:
            self._changed((key,))
        return dropped

    def delete(self, key: str) -> int:
        """Delete ``key`` (a client's delete); return the version deleted.

        The tombstone, committed before return, carries a new version: a write placed
        before the delete whose copies are reported later (its commit lost) never brings
        the key back.  The copies to remove are then listed by :meth:`pending_deletes`.
        ``not-found`` (after a tombstone all the same) if the key is not live."""
        st = self.state
        stamp = self.next_version()
        with st.transaction():
            cur = st.get_key(key)  # (the counter is above both, unless tests skip it)
            stamp = max(stamp, cur.version if cur else 0, st.get_tombstone(key) or 0)
            if cur is not None:
                st.drop_key(key)
            st.put_tombstone(key, stamp, self._now())
            st.commit_version(key, stamp)
        self._changed((key,))
        if cur is None:
            raise DirectoryError(f"key {key!r} not found", "not-found")
        return cur.version

    def fall_back(self, key: str, survivors: Collection[str]) -> int | None:
        """A lost key's newest surviving older copy made current, if it may go back (see
        :meth:`MasterState.fall_back`): that version, or None."""
        row = self.state.fall_back(key, survivors)
        self._changed((key,) if row else ())
        return row.version if row else None

    def purge_tombstones(self, before: float) -> int:
        """Forget every tombstone set before ``before`` of a key no worker is known to
        hold, in one go (:mod:`dsml.master.tombstones` walks them in slices); how many."""
        n, after = self.state.purge_tombstones(before)
        while after is not None:
            more, after = self.state.purge_tombstones(before, after)
            n += more
        return n

    @property
    def generation(self) -> int:
        """A number that changes whenever the directory does (for skipping idle scans)."""
        return self.state.generation

    def reconcile(
        self,
        worker: str,
        inventory: Iterable[Sequence[Any]],
        live: Collection[str] | Mapping[str, WorkerLoad] | None = None,
        factor: int | None = None,
        issued: int | None = None,
        digest: bool = True,
    ) -> ReconcileResult:
        """Make the directory's view of ``worker`` match its full inventory, in one commit.

        ``inventory`` holds (key, size, sha256, version) for everything the worker
        stores.  Copies the directory lists for the worker but the inventory lacks are
        forgotten; the others are recorded by the rules of :meth:`add_replica`.  A
        malformed entry, a second entry for one key, or another content for a known
        version is skipped and listed in ``rejected``; the directory keeps what it had
        for that key on this worker.

        The result's ``trim`` lists the copies on this worker to delete: stale versions
        and tombstoned keys, and, if ``live`` and ``factor`` are given, current copies
        beyond the factor that :meth:`surplus` would trim from this worker.

        With ``issued``, an entry of a higher version is quarantined: rejected (its reason
        starts with :data:`QUARANTINED`) and the directory keeps what it had for the key
        on this worker.  Its copies are then digested for :meth:`known_inventory`
        (unless ``digest`` is false: a worker that sends no digest)."""
        _check_worker(worker)
        if factor is not None:
            _check_factor(factor)
        st = self.state
        rejected: list[Rejection] = []
        reports: list[tuple[str, int, str, int]] = []
        keep: list[str] = []  # keys of rejected entries: their copies stay as they were
        seen: set[str] = set()
        add_seen, add_report = seen.add, reports.append
        sha_ok, key_ok = _SHA256.match, _KEY_FAST.match
        for entry in inventory:
            try:
                key, size, sha256, version = entry
            except (TypeError, ValueError):
                rejected.append(Rejection(entry, "malformed entry: expected 4 fields"))
                continue
            # The common case in one expression; anything else takes the slow path.
            if (
                type(key) is str
                and type(size) is int
                and type(version) is int
                and type(sha256) is str
                and 0 <= size <= MAX_INT
                and 0 < version <= MAX_VERSION
                and key not in seen
                and sha_ok(sha256)
                and key_ok(key)
            ):
                add_seen(key)
                add_report((key, size, sha256, version))
                continue
            if type(key) is str and key in seen:
                rejected.append(Rejection(key, "duplicate key in inventory"))
                continue
            problem = _entry_problem(key, size, sha256, version)
            if problem is not None:
                if type(key) is str:
                    add_seen(key)
                    if problem[0] != "bad-key":  # a bad key cannot be in the directory
                        keep.append(key)
                rejected.append(Rejection(key, f"{problem[0]}: {problem[1]}"))
                continue
            add_seen(key)
            add_report((key, size, sha256, version))
        if issued is not None:
            trusted = []
            for report in reports:
                if report[3] > issued:
                    keep.append(report[0])
                    rejected.append(
                        Rejection(report[0], f"{QUARANTINED}: {_never_issued(report[3], issued)}")
                    )
                else:
                    trusted.append(report)
            reports = trusted
        with st.transaction():
            outcome = st.apply_reports(worker, reports, keep, full=True)
            trim = self._trims(worker)
            # For its next registration: if none was refused, the reports are all it holds.
            exact = reports if not rejected and not outcome.conflicts else None
            st.digest_worker(worker, not trim, exact) if digest else st.forget_digest(worker)
            if live is not None and factor is not None:
                trim.extend(self._surplus_on(worker, live, factor))
        self._changed(outcome.changed)
        for c in outcome.conflicts:
            err = _conflict_error(worker, c)
            rejected.append(Rejection(c.key, f"{err.code}: {err.message}"))
        return ReconcileResult(
            worker,
            outcome.applied,
            outcome.unchanged,
            outcome.removed,
            tuple(rejected),
            tuple(trim),
        )

    def known_inventory(self, worker: str, digest: int, entries: int, live: Collection[str]
                        | Mapping[str, WorkerLoad] | None = None, factor: int | None = None,
                        ) -> ReconcileResult | None:
        """What :meth:`reconcile` would do with ``worker``'s inventory known by its digest
        (:mod:`dsml.protocol.inventory`) and count, if they are those of what the directory
        holds for it (kept up to date by every write to its copies); else None.  A match
        records nothing; stale and deleted copies are looked up unless the state knows
        there are none, the surplus as :meth:`reconcile` does."""
        _check_worker(worker)
        if factor is not None:
            _check_factor(factor)
        known = self.state.inventory(worker)
        if known is None or known[:2] != (digest, entries):
            return None
        trim = [] if known[2] else self._trims(worker)
        if not known[2] and not trim:
            self.state.set_clean(worker)
        if live is not None and factor is not None:
            trim.extend(self._surplus_on(worker, live, factor))
        return ReconcileResult(worker, 0, entries, 0, (), tuple(trim))

    # -- trimming ----------------------------------------------------------------------

    def stale_replicas(self, worker: str | None = None) -> list[Trim]:
        """Copies older than their key's current version (on ``worker``, or anywhere)."""
        return [Trim(k, w, v, STALE) for k, w, v in self.state.stale_rows(worker)]

    def pending_deletes(self, worker: str | None = None) -> list[Trim]:
        """Copies of deleted keys still on some worker (on ``worker``, or anywhere)."""
        return [Trim(k, w, v, DELETED) for k, w, v in self.state.doomed_rows(worker)]

    def pending_deletes_of(self, key: str) -> list[Trim]:
        """Copies of ``key`` still on some worker, if ``key`` is deleted (one key's rows)."""
        if self.state.get_key(key) is not None:
            return []
        return [Trim(key, r.worker, r.version, DELETED) for r in self.state.replicas_of(key)]

    def _trims(self, worker: str) -> list[Trim]:
        return [
            Trim(key, worker, version, DELETED if doomed else STALE)
            for key, version, doomed in self.state.trim_rows(worker)
        ]

    def _surplus_on(
        self, worker: str, live: Collection[str] | Mapping[str, WorkerLoad], factor: int
    ) -> list[Trim]:
        """The surplus trims of :meth:`surplus` that fall on ``worker``."""
        if worker not in live:
            return []
        order = _keep_order(live)
        return [
            Trim(key, worker, version, SURPLUS)
            for key, _, _, version, holders in self.state.live_holders(
                live, factor + 1, MAX_INT, holder=worker
            )
            if worker in sorted(holders, key=order)[factor:]
        ]

    # -- reads -------------------------------------------------------------------------

    def current(self, key: str) -> tuple[int, str] | None:
        """``(version, sha256)`` of ``key``'s current version, or None if it is not live."""
        row = self.state.get_key(key)
        return None if row is None else (row.version, row.sha256)

    def locate(self, key: str, live: Collection[str] | None = None) -> list[Replica]:
        """The copies of ``key``'s current version, best first.

        Without ``live``: all of them.  With it: only those on live workers
        (``unavailable`` if none is).  The order is a rendezvous hash of (key, worker),
        so reads of different keys spread over the workers while each key's order is
        stable.  ``not-found`` if the key is not live.
        """
        st = self.state
        cur = st.get_key(key)
        if cur is None:
            raise DirectoryError(f"key {key!r} not found", "not-found")
        holders = [
            Replica(r.worker, r.size, r.sha256, r.version)
            for r in st.replicas_of(key)
            if r.version == cur.version and (live is None or r.worker in live)
        ]
        if not holders:
            where = "" if live is None else " live"
            raise DirectoryError(
                f"key {key!r} version {cur.version} has no{where} replica", "unavailable"
            )
        holders.sort(key=lambda r: _rank(key, r.worker))
        return holders

    def place(self, key: str, size: int, live: Mapping[str, WorkerLoad], factor: int) -> list[str]:
        """Choose the workers to store a new version of ``key`` (``size`` bytes) on.

        ``min(factor, len(live))`` distinct live workers with at least ``size`` bytes
        free (fewer if fewer have room; ``no-space`` if none has), in the pipeline
        order of :mod:`.placement`.  ``no-workers`` if nobody is live.
        """
        _check_factor(factor)
        problem = _entry_problem(key, size, "0" * 64, 1)
        if problem is not None:
            raise DirectoryError(problem[1], problem[0])
        if not live:
            raise DirectoryError("no live workers", "no-workers")
        fits = [w for w, load in live.items() if load.free_disk >= size]
        if not fits:
            raise DirectoryError(
                f"no live worker has {size} bytes free for key {key!r}", "no-space"
            )
        holders = {r.worker for r in self.state.replicas_of(key)}
        return pipeline_order(key, fits, live, holders)[: min(factor, len(live))]

    def list(
        self, prefix: str = "", after: str | None = None, limit: int = 1000
    ) -> list[tuple[str, int, str, int, list[str]]]:
        """Live keys starting with ``prefix``, greater than ``after``, at most ``limit``.

        Each as (key, size, sha256, version, workers with the current version), sorted
        by key.
        """
        return self.state.list_keys(prefix, after, limit)

    def under_replicated(
        self, live: Collection[str], factor: int
    ) -> list[tuple[str, list[Replica], int]]:
        """Keys with fewer live current copies than ``min(factor, len(live))``, but some.

        Each as (key, live copies to copy from, number of copies missing), by key.
        Keys without any live copy are :meth:`lost` instead.
        """
        _check_factor(factor)
        want = min(factor, len(live))
        return [
            (key, [Replica(w, size, digest, version) for w in workers], want - len(workers))
            for key, size, digest, version, workers in self.state.live_holders(live, 1, want - 1)
        ]

    def lost(self, live: Collection[str]) -> list[str]:
        """Live keys with no copy of their current version on a live worker, by key."""
        return [row[0] for row in self.state.live_holders(live, 0, 0)]

    def surplus(
        self, live: Collection[str] | Mapping[str, WorkerLoad], factor: int
    ) -> list[tuple[str, list[str]]]:
        """Keys with more live current copies than ``factor``, and the workers to trim.

        Keeps the copies on the workers with the most free disk (when ``live`` maps
        workers to their :class:`WorkerLoad`; by name otherwise, and to break ties).
        """
        _check_factor(factor)
        order = _keep_order(live)
        return [
            (key, sorted(sorted(holders, key=order)[factor:]))
            for key, _, _, _, holders in self.state.live_holders(live, factor + 1, MAX_INT)
        ]

    def examine(self, keys: Iterable[str]) -> list[KeyView]:
        """The current version and every copy of each of ``keys`` (one query), by key.

        For the repairer, which works through a bounded batch of keys at a time.
        """
        out: list[KeyView] = []
        for key, version, size, digest, worker, have in self.state.examine(keys):
            if not out or out[-1].key != key:
                out.append(KeyView(key, version, size or 0, digest or "", []))
            if worker is not None:
                out[-1].copies.append((worker, have))
        return out

    def keys_off(
        self, after: str, limit: int, low: int, high: int, tombstones: bool = False
    ) -> tuple[list[str], str | None]:
        """A slice of the directory's keys that may need repair (see
        :meth:`MasterState.keys_off`), and the cursor of the next slice (None: done)."""
        return self.state.keys_off(after, limit, low, high, tombstones)

    def held_after(
        self, worker: str, after: tuple[int, str], limit: int
    ) -> list[tuple[int, str]]:
        """A slice of ``worker``'s copies after the cursor ``after``, as (version, key)."""
        return self.state.held_after(worker, after, limit)

    def stats(self) -> Stats:
        """(live keys, current copies, bytes of the current versions)."""
        return Stats(*self.state.counts())
