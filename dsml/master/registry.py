"""The master's workers: who registers, on which link, and what each one reports holding.

:class:`WorkerRegistry` is the application side of the worker methods (``register``,
``heartbeat``, ``report``, and the fencing of ``task_result``): it checks a registration
against the rules (docs/protocol.md, section 12), takes a new incarnation, records the
worker in :class:`~dsml.master.membership.Membership` and the state, reconciles its
inventory with the directory (ordering copies of deleted keys dropped; stale ones are
the repairer's, :mod:`dsml.master.repair`), and tells the listeners
(the job router) which attempts the worker still runs.  The incarnation, the worker's
row and the inventory are one transaction with one durable commit: a registration costs
one fsync, and the master's directory is never left with half of one.  Links are opaque here: the
request handler (:mod:`dsml.master.requests`) decodes and encodes.

Over TLS a worker registers only under its own certificate's name, only as a worker of
the config and at the config's host (and port, when the config fixes one).  What a
worker claims is checked, not believed: an inventory entry or a report of a
version the master never issued (above its counter) is quarantined by the directory,
logged once per (worker, key, version), and never ordered dropped nor allowed to make
other copies stale.  A worker's ``bad_copy`` (its own re-hash failed, :meth:`bad_copy`)
is the only thing that makes the master forget a copy as corrupt.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.logger import Logger

from .directory import (
    DELETED,
    QUARANTINED,
    STALE,
    Directory,
    DirectoryError,
    ReconcileResult,
)
from .membership import Membership, MembershipError, Versions, WorkerRecord
from .repair import _order
from .state import MasterState

log = Logger()

#: Quarantined claims remembered so each is logged once (past this, the set restarts).
QUARANTINE_LOG_MAX = 10_000

#: Told of each registration with the attempts the worker says it still runs.
OnRegistered = Callable[[WorkerRecord, list[int]], None]


@attrs.frozen
class Registration:
    """What a registration did: the worker's new incarnation and its inventory's fate."""

    record: WorkerRecord
    incarnation: int
    added: int
    removed: int
    rejected: int


@attrs.frozen
class RegisterRequest:
    """One ``register`` request, decoded (see :meth:`WorkerRegistry.register`)."""

    name: str
    host: str
    port: int
    slots: int
    versions: Versions
    inventory: bytes
    running: list[int]
    link: object
    digest: int | None = None
    #: What the worker's first heartbeat will say, said at once (optional headers):
    #: without them a worker just registered has no room the master knows of.
    free_disk: int = 0
    stored_bytes: int = 0
    #: The memory (bytes) and the GPUs (their ids) it offers tasks.
    mem: int = 0
    gpus: tuple[str, ...] = ()
    #: What it runs function tasks with (``Fn-Runtime``), "" if it did not say.
    fn_runtime: str = ""


@attrs.frozen
class _Staged:
    """A registration done inside the transaction, not yet committed nor told."""

    req: RegisterRequest
    record: WorkerRecord
    incarnation: int
    result: ReconcileResult
    entries: list[tuple[Any, Any, Any, Any]]
    unreadable: int


@attrs.frozen
class Report:
    """What became of a worker's report of stores and deletes."""

    taken: int
    refused: int


def parse_inventory(payload: bytes) -> tuple[list[tuple[Any, Any, Any, Any]], int]:
    """JSON lines {key,size,sha256,version} -> entries, and the count of unreadable lines."""
    entries: list[tuple[Any, Any, Any, Any]] = []
    bad = 0
    for line in payload.splitlines():
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            entries.append((d["key"], d["size"], d["sha256"], d["version"]))
        except (ValueError, KeyError, TypeError):
            bad += 1
    return entries, bad


def parse_digest(value: object) -> int | None:
    """An ``Inventory-Digest`` header (16 hex digits) as a number; None if absent or
    malformed (the inventory is then reconciled)."""
    if type(value) is not str or len(value) != 16:
        return None
    try:
        return int(value, 16)
    except ValueError:
        return None


def _count_lines(payload: bytes) -> int:
    """Entries of an inventory as :func:`parse_inventory` reads it, if no line is blank
    or unreadable (then the count is off, no digest matches, and it is reconciled)."""
    if not payload:
        return 0
    return payload.count(b"\n") + (0 if payload.endswith(b"\n") else 1)


def _ignore(failure: object) -> None:
    """An order whose outcome nobody waits for (the repairer mends what it missed)."""


class WorkerRegistry:
    """Registrations, heartbeats and reports of the workers, each on its own link."""

    def __init__(
        self,
        *,
        state: MasterState,
        directory: Directory,
        membership: Membership,
        versions: Versions,
        on_registered: OnRegistered | None = None,
        configured: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        self.state = state
        #: The config's workers (name -> host, port; port 0: any), which a worker over TLS
        #: must be one of, at that address (None: any name, as in the simulation).
        self.configured = configured
        self.directory = directory
        self.membership = membership
        self.versions = versions
        self.on_registered = on_registered
        #: (worker, key, version) of quarantined claims already logged.
        self._quarantined: set[tuple[str, str, int]] = set()
        #: Claims quarantined since start (for tests and ``nodes`` diagnostics).
        self.quarantined = 0

    def _quarantine(self, worker: str, key: str, version: Any, why: str) -> None:
        """Log a claim of a version never issued, once per (worker, key, version)."""
        self.quarantined += 1
        mark = (worker, str(key), version if type(version) is int else -1)
        if mark in self._quarantined:
            return
        if len(self._quarantined) >= QUARANTINE_LOG_MAX:
            self._quarantined.clear()
        self._quarantined.add(mark)
        log.warn("worker {worker} claims {key!r}: {why}; quarantined, not trusted",
                 worker=worker, key=key, why=why)

    def register(
        self,
        name: str,
        *,
        host: str,
        port: int,
        slots: int,
        versions: Versions,
        inventory: bytes,
        running: list[int],
        link: object,
        digest: int | None = None,
    ) -> Registration:
        """Register worker ``name`` on ``link``; MembershipError when the rules refuse it.

        ``digest``: the worker's :func:`~dsml.protocol.inventory.inventory_digest` of
        ``inventory`` (its ``Inventory-Digest``), if it sent one.
        """
        (out,) = self.register_many([RegisterRequest(
            name, host, port, slots, versions, inventory, running, link, digest)])
        if isinstance(out, BaseException):
            raise out
        return out

    def register_many(
        self, requests: Sequence[RegisterRequest], more: Callable[[], bool] | None = None
    ) -> list[Registration | Exception]:
        """Several registrations with one durable commit: each one whole or not at all.

        Each registration (its incarnation, its worker's row, its inventory) runs in a
        savepoint of one transaction, so one that fails leaves nothing and the others
        stand; the transaction commits once (one fsync for a crowd of workers coming
        back after a master restart), and only then is any of them told, ordered or
        handed to the listeners.  Returns, in order, each one's Registration or the
        exception that refused it.  If the commit itself fails, none is registered and
        the exception propagates.  With ``more``, asked before each registration after
        the first, the rest are left undone once it says no: the list is then shorter.
        """
        staged: list[_Staged | Exception] = []
        try:
            with self.state.transaction():
                for req in requests:
                    if staged and more is not None and not more():
                        break
                    try:
                        staged.append(self._stage(req))
                    except Exception as e:
                        staged.append(e)
        except BaseException:
            # Nothing was committed: none of them is registered after all.
            for st in staged:
                if not isinstance(st, Exception):
                    self.membership.connection_lost(st.req.link)
            raise
        out: list[Registration | Exception] = []
        for st in staged:
            if isinstance(st, Exception):
                out.append(st)
                continue
            try:
                out.append(self._finish(st))
            except Exception as e:
                out.append(e)
        return out

    def _stage(self, req: RegisterRequest) -> _Staged:
        """One registration inside the caller's transaction, in a savepoint of its own."""
        name, link, inventory = req.name, req.link, req.inventory
        try:
            # Over TLS the link's certificate says who it is: a worker registers only
            # under its own name.
            ident = getattr(link, "identity", None)
            if ident is not None and (ident.kind != "worker" or ident.name != name):
                raise MembershipError(
                    f"{ident} may not register as worker {name!r}", "forbidden"
                )
            # Over TLS and with the token alike: only the config's workers, where it
            # says (a token holder is not thereby a worker of this cluster).
            if self.configured is not None:
                self._check_configured(name, req.host, req.port)
            if req.versions != self.versions:
                # Checked before an incarnation is used up for a worker that is refused.
                self.membership.check_versions(name, req.versions)
            current = self.membership.get(name)
            if (current is not None and current.live and current.conn is not None
                    and current.conn is not link):
                raise MembershipError(
                    f"worker {name!r} is already registered from another link "
                    f"(incarnation {current.incarnation}); retry once it is gone",
                    "duplicate-name",
                )
        except MembershipError as e:
            log.warn("refused registration of {name}: {why} [{code}]", name=name,
                     why=e.message, code=e.code)
            raise
        entries: list[tuple[Any, Any, Any, Any]] = []
        unreadable = 0
        # One savepoint: the incarnation, the worker's row and its inventory.
        # Membership refuses a malformed registration before it changes anything, and
        # the savepoint then rolls back (no incarnation used up).
        with self.state.savepoint():
            incarnation = self.state.next_incarnation(name)
            record = self.membership.register(
                name, incarnation, host=req.host, port=req.port, slots=req.slots,
                versions=req.versions, conn=link, free_disk=req.free_disk,
                stored_bytes=req.stored_bytes, mem=req.mem, gpus=req.gpus,
                fn_runtime=req.fn_runtime,
            )
            try:
                self.state.record_worker(
                    name, incarnation, record.host, record.port, record.slots
                )
                # A worker that says what its inventory digests to, and holds what the
                # directory has for it (a master restart, a link that dropped): no
                # inventory to parse or reconcile.
                known = None
                if req.digest is not None:
                    known = self.directory.known_inventory(
                        name, req.digest, _count_lines(inventory))
                if known is not None:
                    result = known
                else:
                    entries, unreadable = parse_inventory(inventory)
                    result = self.directory.reconcile(
                        name, entries, issued=self.state.last_version,
                        digest=req.digest is not None)
            except BaseException:
                # Rolled back: the worker is not registered after all.
                self.membership.connection_lost(link)
                raise
        return _Staged(req, record, incarnation, result, entries, unreadable)

    def _finish(self, st: _Staged) -> Registration:
        """What follows a registration once it is committed: logs, trims, listeners."""
        name, record, result = st.req.name, st.record, st.result
        if result.rejected:
            versions_of = {e[0]: e[3] for e in st.entries if type(e[0]) is str}
            for r in result.rejected:
                if r.reason.startswith(QUARANTINED):
                    self._quarantine(name, r.key, versions_of.get(r.key), r.reason)
        rejected = len(result.rejected) + st.unreadable
        if rejected:
            log.warn(
                "worker {name}: {n} inventory entries rejected, e.g. {why}",
                name=name,
                n=rejected,
                why=result.rejected[0].reason if result.rejected else "unreadable line",
            )
        for trim in result.trim:
            # A stale copy waits for the repairer: it may be the only durable copy while
            # the current version is short of its copies (or never reaches them).
            if trim.reason != STALE:
                _order(record, "drop", {"Key": trim.key, "Version": trim.version}
                       ).addErrback(_ignore)
        log.info(
            "worker {name} registered: incarnation {inc}, {host}:{port}, {room}, "
            "{n} keys ({added} new, {removed} gone, {rejected} rejected)",
            name=name,
            inc=st.incarnation,
            host=record.host,
            port=record.port,
            room=record.room.describe(),
            n=result.added + result.unchanged + len(result.rejected),
            added=result.added,
            removed=result.removed,
            rejected=rejected,
        )
        if self.on_registered is not None:
            self.on_registered(record, st.req.running)
        return Registration(record, st.incarnation, result.added, result.removed, rejected)

    def _check_configured(self, name: str, host: str, port: int) -> None:
        """``forbidden`` unless ``name`` is a worker of the config, at its host (and its
        port, when the config fixes one): else uploads would go where it chose."""
        assert self.configured is not None
        where = self.configured.get(name)
        if where is None:
            raise MembershipError(f"worker {name!r} is not in the config", "forbidden")
        want_host, want_port = where
        if host != want_host or (want_port and port != want_port):
            at = f"{want_host}:{want_port}" if want_port else f"{want_host} (any port)"
            raise MembershipError(
                f"worker {name!r} must register at {at}, as the config says, not "
                f"{host}:{port}",
                "forbidden",
            )

    def registered_on(self, link: object, name: str, incarnation: int, what: str) -> WorkerRecord:
        """The record of worker ``name`` if ``link`` carries its registration at
        ``incarnation`` (``not-registered``, ``stale-incarnation`` otherwise, logged as a
        refusal of ``what``)."""
        try:
            record = self.membership.get(name)
            if record is None or not record.live or record.conn is not link:
                raise MembershipError(
                    f"worker {name!r} is not registered on this link", "not-registered"
                )
            if record.incarnation != incarnation:
                raise MembershipError(
                    f"worker {name!r} is incarnation {record.incarnation}, not {incarnation}",
                    "stale-incarnation",
                )
            return record
        except MembershipError as e:
            log.warn("refused {method} from {name}: {why} [{code}]", method=what,
                     name=name, why=e.message, code=e.code)
            raise

    def heartbeat(
        self,
        name: str,
        incarnation: int,
        *,
        free_slots: int,
        stored_bytes: int,
        stored_files: int,
        free_disk: int,
        link: object,
    ) -> None:
        """A worker's heartbeat over ``link`` (Membership checks it)."""
        self.membership.heartbeat(
            name,
            incarnation,
            free_slots=free_slots,
            stored_bytes=stored_bytes,
            stored_files=stored_files,
            free_disk=free_disk,
            conn=link,
        )

    def report(self, record: WorkerRecord, payload: bytes) -> Report:
        """Apply a worker's report (JSON lines of stores and deletes) to the directory.

        A store of a deleted key is ordered dropped (a stale one is the repairer's); a
        delete removes only the version deleted (a crossing report of a newer write
        stays).  Unreadable lines are refused and counted.
        """
        taken = refused = 0
        for line in payload.splitlines():
            try:
                d = json.loads(line)
                op, key = d["op"], d["key"]
                if op == "store":
                    try:
                        verdict = self.directory.add_replica(
                            key, record.name, d["size"], d["sha256"], d["version"],
                            issued=self.state.last_version,
                        )
                    except DirectoryError as e:
                        if e.code == "forbidden":  # a version never issued
                            self._quarantine(record.name, key, d["version"], e.message)
                        raise
                    if verdict == DELETED:  # a stale one is the repairer's (as above)
                        _order(record, "drop", {"Key": key, "Version": d["version"]}).addErrback(
                            _ignore
                        )
                elif op == "delete":
                    self.directory.remove_replica(key, record.name, d.get("version"))
                else:
                    raise ValueError(op)
                taken += 1
            except (ValueError, KeyError, TypeError, DirectoryError):
                refused += 1
        return Report(taken, refused)

    def bad_copy(self, record: WorkerRecord, key: str, version: int) -> bool:
        """Worker ``record`` re-hashed its copy of ``key`` at ``version``, found it bad and
        forgot it: forget it here too (the repairer copies a good one back).  False if
        the directory had no such copy (or a newer one) of that worker."""
        forgotten = self.directory.remove_replica(key, record.name, version)
        log.warn("worker {name} found its copy of {key!r} v{version} corrupt and dropped it"
                 "{known}", name=record.name, key=key, version=version,
                 known="" if forgotten else " (the directory had no such copy)")
        return forgotten

    def link_lost(self, link: object) -> None:
        """A link closed: its worker is dead at once."""
        record = self.membership.connection_lost(link)
        if record is not None:
            log.warn("worker {name} is dead: its link closed", name=record.name)

    def workers(self) -> list[WorkerRecord]:
        """Every worker the master knows, live or dead."""
        return self.membership.all()
