"""The master (the seed's MasterNode): membership, the data directory, placement, repair.

Workers keep one link each (registration, heartbeats, reports; orders come back down the
same link).  Clients ask it where to write (``place``) and where to read (``locate``),
then move bytes straight to and from workers: the master never carries file payloads.
Liveness lives in memory; the directory, settings and incarnations live in SQLite, so a
restart loses nothing acknowledged and workers simply register again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from .. import __version__
from ..config import MASTER_ADDR_FILE, Config
from ..errors import DsmlError
from ..net.links import tune_socket
from ..net.listen import ListenService
from ..net.server import Reply, ServerFactory, ServerLimits, ServerProtocol
from ..protocol.codec import PROTOCOL_VERSION, Head
from ..protocol.methods import master_methods
from .directory import Directory, DirectoryError, WorkerLoad
from .jobrouter import JobRouter
from .jobs import JOBS_FILE, JobManager
from .membership import Membership, MembershipError, Versions, WorkerRecord
from .repair import Repairer, _order
from .state import MasterState

log = Logger()

#: The file, under the master's state_dir, that says where it listens.
ADDR_FILE = MASTER_ADDR_FILE

LIST_DEFAULT = 1000
LIST_MAX = 10_000


def _addr(r: WorkerRecord) -> str:
    host = f"[{r.host}]" if ":" in r.host else r.host
    return f"{r.name}={host}:{r.port}"


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


class MasterHandler:
    """Answers the master's methods (see :func:`dsml.protocol.methods.master_methods`)."""

    #: Requests a worker's link may have in progress together (answers still go back in
    #: order): a batch of task results is applied at once and answered after its commit,
    #: so the next batch must not wait for that commit (measured: results serialized
    #: behind commits left slots idle, ~15% of the throughput of one-shot tasks).
    pipelined = frozenset({"task_result"})

    def __init__(
        self,
        *,
        state: MasterState,
        directory: Directory,
        membership: Membership,
        factor: Callable[[], int],
    ) -> None:
        self.state = state
        self.directory = directory
        self.membership = membership
        self.factor = factor
        self.methods = master_methods()
        self.versions = Versions(__version__, PROTOCOL_VERSION)
        self._fns: dict[str, Callable[[Head, bytes, ServerProtocol], Reply]] = {
            "ping": self._ping,
            "register": self._register,
            "heartbeat": self._heartbeat,
            "report": self._report,
            "place": self._place,
            "locate": self._locate,
            "commit": self._commit,
            "corrupt": self._corrupt,
            "remove": self._remove,
            "list": self._list,
            "nodes": self._nodes,
        }

    #: The job side (set by build_master); its methods are answered here too.
    router: Any = None

    def handle(self, head: Head, payload: bytes, conn: ServerProtocol) -> Any:
        """Answer a request."""
        fn = self._fns.get(head.kind)
        if fn is None and self.router is not None:
            fn = self.router.fns.get(head.kind)
            if head.kind == "task_result":
                self._worker(head, conn)  # fencing: only the registered link reports
        if fn is None:
            raise DsmlError(f"method {head.kind!r} is not served here", "unknown-method")
        return fn(head, payload, conn)

    def open(self, head: Head, conn: ServerProtocol) -> Any:
        """The master takes no streamed requests: it never carries file payloads."""
        raise DsmlError(f"method {head.kind!r} is not served here", "unknown-method")

    def connection_lost(self, conn: ServerProtocol) -> None:
        """A link closed: its worker is dead at once."""
        record = self.membership.connection_lost(conn)
        if record is not None:
            log.warn("worker {name} is dead: its link closed", name=record.name)

    # -- workers ----------------------------------------------------------------------

    def _ping(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        return Reply({"Role": "master"})

    def _register(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        h = head.headers
        name = h["name"]
        versions = Versions(h["dsml-version"], int(h["protocol-version"]))
        try:
            if versions != self.versions:
                # Checked before an incarnation is used up for a worker that is refused.
                self.membership._check_versions(name, versions)
            current = self.membership.get(name)
            if current is not None and current.live and current.conn is not conn:
                raise MembershipError(
                    f"worker {name!r} is already registered from another link "
                    f"(incarnation {current.incarnation}); retry once it is gone",
                    "duplicate-name",
                )
        except MembershipError as e:
            log.warn("refused registration of {name}: {why} [{code}]", name=name,
                     why=e.message, code=e.code)
            raise
        tune_socket(conn.transport)  # keepalive + TCP_USER_TIMEOUT on worker links
        incarnation = self.state.next_incarnation(name)
        record = self.membership.register(
            name,
            incarnation,
            host=h["host"],
            port=int(h["port"]),
            slots=int(h["slots"]),
            versions=versions,
            conn=conn,
        )
        self.state.record_worker(name, incarnation, record.host, record.port, record.slots)
        entries, unreadable = parse_inventory(payload)
        result = self.directory.reconcile(name, entries)
        rejected = len(result.rejected) + unreadable
        if rejected:
            log.warn(
                "worker {name}: {n} inventory entries rejected, e.g. {why}",
                name=name,
                n=rejected,
                why=result.rejected[0].reason if result.rejected else "unreadable line",
            )
        for trim in result.trim:
            _order(record, "drop", {"Key": trim.key, "Version": trim.version}).addErrback(
                lambda f: None
            )
        log.info(
            "worker {name} registered: incarnation {inc}, {n} keys ({added} new, "
            "{removed} gone, {rejected} rejected)",
            name=name,
            inc=incarnation,
            n=len(entries),
            added=result.added,
            removed=result.removed,
            rejected=rejected,
        )
        if self.router is not None:
            running = [int(x) for x in h.get("running", "").split(",") if x.strip().isdigit()]
            self.router.registered(record, running)
        return Reply(
            {
                "Incarnation": incarnation,
                "Added": result.added,
                "Removed": result.removed,
                "Rejected": rejected,
            }
        )

    def _worker(self, head: Head, conn: ServerProtocol) -> WorkerRecord:
        try:
            return self._check_worker(head, conn)
        except MembershipError as e:
            log.warn("refused {method} from {name}: {why} [{code}]", method=head.kind,
                     name=head.headers.get("name"), why=e.message, code=e.code)
            raise

    def _check_worker(self, head: Head, conn: ServerProtocol) -> WorkerRecord:
        name, incarnation = head.headers["name"], int(head.headers["incarnation"])
        record = self.membership.get(name)
        if record is None or not record.live or record.conn is not conn:
            raise MembershipError(
                f"worker {name!r} is not registered on this link", "not-registered"
            )
        if record.incarnation != incarnation:
            raise MembershipError(
                f"worker {name!r} is incarnation {record.incarnation}, not {incarnation}",
                "stale-incarnation",
            )
        return record

    def _heartbeat(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        h = head.headers
        self.membership.heartbeat(
            h["name"],
            int(h["incarnation"]),
            free_slots=int(h["free-slots"]),
            stored_bytes=int(h["stored-bytes"]),
            stored_files=int(h["stored-files"]),
            free_disk=int(h["free-disk"]),
            conn=conn,
        )
        return Reply()

    def _report(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        record = self._worker(head, conn)
        taken = refused = 0
        for line in payload.splitlines():
            try:
                d = json.loads(line)
                op, key = d["op"], d["key"]
                if op == "store":
                    verdict = self.directory.add_replica(
                        key, record.name, d["size"], d["sha256"], d["version"]
                    )
                    if verdict != "current":
                        _order(record, "drop", {"Key": key, "Version": d["version"]}).addErrback(
                            lambda f: None
                        )
                elif op == "delete":
                    # Only the version deleted: a crossing report of a newer write stays.
                    self.directory.remove_replica(key, record.name, d.get("version"))
                else:
                    raise ValueError(op)
                taken += 1
            except (ValueError, KeyError, TypeError, DirectoryError):
                refused += 1
        return Reply({"Taken": taken, "Refused": refused})

    # -- clients ----------------------------------------------------------------------

    def _place(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        key, size = head.headers["key"], int(head.headers["size"])
        alive = {r.name: r for r in self.membership.alive()}
        loads = {n: WorkerLoad(r.free_disk, r.stored_bytes) for n, r in alive.items()}
        names = self.directory.place(key, size, loads, self.factor())
        version = self.directory.next_version()
        return Reply({"Version": version, "Workers": ",".join(_addr(alive[n]) for n in names)})

    def _locate(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        key = head.headers["key"]
        records = {r.name: r for r in self.membership.all()}
        alive = {n for n, r in records.items() if r.live}
        replicas = self.directory.locate(key)
        # Live holders first (in the directory's spread order), then the rest, which a
        # client may still try if it can reach them.
        ordered = [r for r in replicas if r.worker in alive] + [
            r for r in replicas if r.worker not in alive and r.worker in records
        ]
        if not ordered:
            raise DirectoryError("unavailable", f"no known worker holds {key!r}")
        first = ordered[0]
        return Reply(
            {
                "Size": first.size,
                "Sha256": first.sha256,
                "Version": first.version,
                "Replicas": ",".join(_addr(records[r.worker]) for r in ordered),
            }
        )

    def _commit(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        h = head.headers
        unknown = [w for w in h["workers"].split(",") if self.membership.get(w) is None]
        if unknown:
            raise DsmlError(f"no such worker: {', '.join(unknown)}", "bad-header")
        for worker in h["workers"].split(","):
            self.directory.add_replica(
                h["key"], worker, int(h["size"]), h["sha256"], int(h["version"])
            )
        return Reply()

    def _corrupt(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        key, worker = head.headers["key"], head.headers["worker"]
        log.warn("a client found {worker}'s copy of {key!r} corrupt", worker=worker, key=key)
        removed = self.directory.remove_replica(key, worker)
        record = self.membership.get(worker)
        if removed and record is not None and record.live:
            try:
                version = self.directory.locate(key)[0].version
            except DirectoryError:
                version = 0
            if version:
                _order(record, "drop", {"Key": key, "Version": version}).addErrback(lambda f: None)
        return Reply()

    def _remove(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        key = head.headers["key"]
        version = self.directory.delete(key)
        for trim in self.directory.pending_deletes():
            if trim.key != key:
                continue
            record = self.membership.get(trim.worker)
            if record is not None and record.live:
                _order(record, "drop", {"Key": key, "Version": trim.version}).addCallback(
                    lambda _, w=trim.worker, v=trim.version: self.directory.remove_replica(
                        key, w, v
                    )
                ).addErrback(lambda f: None)
        return Reply({"Version": version})

    def _list(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        h = head.headers
        limit = int(h.get("limit", LIST_DEFAULT))
        if not 1 <= limit <= LIST_MAX:
            raise DsmlError(f"Limit must be from 1 to {LIST_MAX}", "bad-header")
        rows = self.directory.list(h.get("prefix", ""), h.get("after"), limit + 1)
        lines = [
            json.dumps(
                {"key": k, "size": size, "sha256": sha, "version": v, "replicas": workers},
                ensure_ascii=False,
            )
            for k, size, sha, v, workers in rows[:limit]
        ]
        body = ("\n".join(lines) + "\n").encode() if lines else b""
        return Reply({"More": 1} if len(rows) > limit else {}, body)

    def _nodes(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        now = self.membership.monotonic()
        lines = [
            json.dumps(
                {
                    "name": r.name,
                    "host": r.host,
                    "port": r.port,
                    "state": r.state,
                    "since_heartbeat": round(r.seconds_since_heartbeat(now), 3),
                    "incarnation": r.incarnation,
                    "slots": r.slots,
                    "free_slots": r.free_slots,
                    "stored_bytes": r.stored_bytes,
                    "stored_files": r.stored_files,
                    "free_disk": r.free_disk,
                }
            )
            for r in self.membership.all()
        ]
        return Reply({}, ("\n".join(lines) + "\n").encode() if lines else b"")


class _MasterRuntime(service.Service):
    """Starts the membership check and repair loops; closes the state on stop."""

    def __init__(
        self,
        membership: Membership,
        repairer: Repairer,
        state: MasterState,
        jobs: JobManager | None = None,
    ) -> None:
        self.membership = membership
        self.repairer = repairer
        self.state = state
        self.jobs = jobs

    def startService(self) -> None:
        super().startService()
        self.membership.start()
        self.repairer.start()

    def stopService(self) -> None:
        super().stopService()
        self.repairer.stop()
        self.membership.stop()
        # Worker links close after this, as the reactor shuts down: a master that is
        # stopping must not record its workers' attempts as lost on the way out.
        self.membership.on_dead.clear()
        self.membership.on_alive.clear()
        if self.jobs is not None:
            self.jobs.close()
        self.state.close()


@attrs.define
class Master:
    """The parts of the master process, wired together (see :func:`build_master`)."""

    state: MasterState
    directory: Directory
    membership: Membership
    handler: MasterHandler
    repairer: Repairer
    factory: ServerFactory
    jobs: JobManager
    router: JobRouter
    #: Starts and stops it all: membership checks, repair, the listener; closes the state.
    service: service.MultiService


def build_master(
    *,
    state: MasterState,
    clock: Any,
    monotonic: Callable[[], float],
    replication: int,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    token: str | None,
    limits: ServerLimits,
    listen: Callable[[ServerFactory], service.IService],
    now: Callable[[], float] = time.time,
    run_in_thread: Callable[[Callable[[], None]], Deferred[None]] | None = None,
) -> Master:
    """Wire the master over an open ``state``: no reactor or sockets of its own.

    ``clock`` schedules, ``monotonic`` decides liveness, ``now`` (wall clock) stamps
    tombstones, and ``listen(factory)`` makes the service that serves ``factory``;
    ``run_in_thread`` (deferToThreadPool) takes the job state's commits off the reactor
    thread (without it they run inline, as in the simulation).
    :func:`make_master_service` passes the real ones; :mod:`dsml.testing.sim` passes
    a fake clock and an in-memory network.
    """
    directory = Directory(state, now=now)
    membership = Membership(
        clock=clock,
        monotonic=monotonic,
        versions=Versions(__version__, PROTOCOL_VERSION),
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
    )
    # The config is authoritative; the state keeps it so tools reading it agree.
    state.set_setting("replication", replication)

    def factor() -> int:
        return int(state.get_setting("replication", replication))

    handler = MasterHandler(state=state, directory=directory, membership=membership, factor=factor)
    # Jobs keep their own SQLite file beside the directory's: the two never share a
    # transaction, and a burst of task results never waits behind a block report.
    jobs = JobManager(Path(state.path).parent / JOBS_FILE, clock, run_in_thread=run_in_thread)
    router = JobRouter(jobs=jobs, membership=membership, directory=directory, clock=clock)
    handler.router = router
    repairer = Repairer(
        clock=clock,
        monotonic=monotonic,
        directory=directory,
        membership=membership,
        factor=factor,
        grace=heartbeat_timeout,
        interval=max(0.5, heartbeat_interval),
    )
    factory = ServerFactory(
        handler,
        clock,
        token,
        limits,
        peer=True,
        on_lost=handler.connection_lost,
    )
    top = service.MultiService()
    top.setName("dsml-master")
    _MasterRuntime(membership, repairer, state, jobs).setServiceParent(top)
    listen(factory).setServiceParent(top)
    return Master(state, directory, membership, handler, repairer, factory, jobs, router, top)


def make_master_service(
    config: Config, reactor: Any, monotonic: Callable[[], float] = time.monotonic
) -> service.MultiService:
    """Build the master's services from the config."""
    from ..worker.service import server_limits

    mc = config.master
    cc = config.cluster
    mc.state_dir.mkdir(parents=True, exist_ok=True)
    return build_master(
        state=MasterState(mc.state_dir / "master.sqlite3"),
        clock=reactor,
        monotonic=monotonic,
        replication=cc.replication,
        heartbeat_interval=cc.heartbeat_interval,
        heartbeat_timeout=cc.heartbeat_timeout,
        token=cc.token,
        limits=server_limits(config),
        listen=lambda factory: ListenService(
            reactor, mc.host, mc.port, factory, mc.state_dir / ADDR_FILE, "dsml master"
        ),
        run_in_thread=lambda fn: deferToThreadPool(reactor, reactor.getThreadPool(), fn),
    ).service
