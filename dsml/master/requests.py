"""The master's requests: each method decoded, handed to its application object, answered.

:class:`MasterHandler` declares every method of
:func:`dsml.protocol.methods.master_methods` with the roles that may call it
(docs/protocol.md, section 9): workers register, beat, report and send task results;
clients (and workers acting as clients for task inputs and outputs) place, locate and
commit keys; clients alone remove, list, watch the nodes and run jobs.  The decisions are
the application objects': :class:`~dsml.master.registry.WorkerRegistry` (workers),
:class:`~dsml.master.keyspace.KeySpace` (keys), :class:`~dsml.master.jobrouter.JobRouter`
(jobs).  Here headers become arguments and results become replies.  Registrations,
the heaviest worker request (a whole inventory), run in batches, one per reactor turn:
a batch commits once (:meth:`~dsml.master.registry.WorkerRegistry.register_many`) and
takes at most :data:`REGISTRATIONS_PER_TURN` or :data:`REGISTRATION_BUDGET` seconds.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Collection, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..clocks import timers_of
from ..errors import DsmlError
from ..net.access import DEFAULT_ADMINS, may_act_on, principal
from ..net.connection import Connection
from ..net.links import tune_socket
from ..net.responders import Reply, responder
from ..protocol.codec import Head
from ..protocol.methods import ALL_ROLES, Role
from .jobparse import job_spec_from_payload, job_spec_in_slices
from .jobrouter import JobRouter
from .jobs import FinishedReport, JobError, JobSpec, JobView, Room
from .jobs.slices import Slicer
from .jobwire import finished_report, job_json
from .keyspace import KeySpace
from .membership import Versions, WorkerRecord
from .registry import RegisterRequest, Registration, WorkerRegistry, parse_digest

log = Logger()

LIST_DEFAULT = 1000
#: Most registrations committed together in one reactor turn (one fsync for them all),
#: and the seconds after which a turn takes no more (the rest wait for the next turn).
REGISTRATIONS_PER_TURN = 64
REGISTRATION_BUDGET = 0.02
LIST_MAX = 10_000

_WORKER = frozenset({Role.WORKER})
_CLIENT = frozenset({Role.CLIENT})
#: Clients, and workers fetching and storing task inputs and outputs.
_USERS = frozenset({Role.CLIENT, Role.WORKER})


def worker_addr(r: WorkerRecord) -> str:
    """``name=host:port`` of a worker's storage server (``[host]`` for IPv6)."""
    host = f"[{r.host}]" if ":" in r.host else r.host
    return f"{r.name}={host}:{r.port}"


def _page_headers(view: JobView) -> dict[str, object]:
    """A status page's headers: State, and Next when more tasks follow."""
    return {"State": view.state} if view.next is None else {"State": view.state, "Next": view.next}


def _lines(items: list[str]) -> bytes:
    return ("\n".join(items) + "\n").encode() if items else b""


class MasterHandler:
    """Answers the master's methods (see :func:`dsml.protocol.methods.master_methods`)."""

    def __init__(
        self,
        *,
        registry: WorkerRegistry,
        keys: KeySpace,
        router: JobRouter,
        admins: Collection[str] = DEFAULT_ADMINS,
        lag: Callable[[], Mapping[str, object]] | None = None,
        clock: IReactorTime | None = None,
        repair: Callable[[], Mapping[str, int]] | None = None,
        gc: Callable[[], Mapping[str, float | int]] | None = None,
    ) -> None:
        self.registry = registry
        #: With a clock, at most one registration runs per reactor turn (the others
        #: wait their turn), so a crowd of workers re-registering after a master restart
        #: never holds the reactor for the whole crowd at once.
        self.clock = clock
        self._registrations: deque[tuple[Deferred[Reply], Head, bytes, Connection]] = deque()
        self._turn: IDelayedCall | None = None
        #: Big submit payloads are read a slice per turn here (without a clock: at once).
        self._parsing = None if clock is None else Slicer(clock)
        self.keys = keys
        self.router = router
        #: The reactor-lag probe's figures (in the ``nodes`` answer's headers).
        self.lag = lag
        #: The repairer's backlog (``Repair-Pending``, ``Repair-Scanning`` in ``nodes``).
        self.repair = repair
        #: The process's collector figures (``Gc-Worst-Ms``, ``Gc-Full``, ``Gc-Full-Ms``).
        self.gc = gc
        #: Users who may act on every job (``cluster.admins``).
        self.admins = frozenset(admins)

    def _check_owner(self, view: JobView, conn: Connection, what: str) -> None:
        """``forbidden`` unless the peer may act on the job (its owner, an admin)."""
        if not may_act_on(conn, view.owner, self.admins):
            owner = view.owner or "an unknown user"
            raise DsmlError(
                f"job {view.id} belongs to {owner}; only its owner or an admin may {what}",
                "forbidden",
            )

    def link_lost(self, conn: Connection) -> None:
        """A link closed: its worker is dead at once."""
        self.registry.link_lost(conn)

    # -- workers ----------------------------------------------------------------------

    @responder("ping", roles=ALL_ROLES)
    def _ping(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        return Reply({"Role": "master"})

    @responder("register", roles=_WORKER)
    def _register(self, head: Head, payload: bytes, conn: Connection) -> Reply | Deferred[Reply]:
        if self.clock is None:
            return self._register_now(head, payload, conn)
        if self._turn is None:
            # The first of this reactor turn runs at once; the turn ends with the next.
            self._turn = self.clock.callLater(0, self._next_registration)
            return self._register_now(head, payload, conn)
        d: Deferred[Reply] = Deferred()
        self._registrations.append((d, head, payload, conn))
        return d

    def _next_registration(self) -> None:
        """The registrations waiting (up to :data:`REGISTRATIONS_PER_TURN`), with one
        commit, then the next ones on the next turn."""
        self._turn = None
        assert self.clock is not None
        clock = self.clock
        batch: list[tuple[tuple[Deferred[Reply], Head, bytes, Connection], RegisterRequest]] = []
        while self._registrations and len(batch) < REGISTRATIONS_PER_TURN:
            waiting = self._registrations.popleft()
            d, head, payload, conn = waiting
            if not getattr(conn, "connected", False):
                # The link closed while it waited: nothing to register, nobody to answer.
                d.errback(DsmlError("the link closed before its registration", "unavailable"))
                continue
            try:
                batch.append((waiting, self._decode(head, payload, conn)))
            except Exception as e:
                d.errback(e)
        if batch:
            # Within a time budget: a registration that has to reconcile a big inventory
            # takes tens of ms, one that its digest spares well under one.
            start = clock.seconds()
            try:
                outcomes = self.registry.register_many(
                    [req for _, req in batch],
                    more=lambda: clock.seconds() - start < REGISTRATION_BUDGET,
                )
            except Exception as e:
                outcomes = [e] * len(batch)
            # Those left for lack of time go first next turn.
            self._registrations.extendleft(reversed([w for w, _ in batch[len(outcomes):]]))
            for ((d, head, _, conn), _), out in zip(batch[: len(outcomes)], outcomes, strict=True):
                if isinstance(out, Exception):
                    d.errback(out)
                else:
                    d.callback(self._registered(head, conn, out))
        if self._registrations and self._turn is None:
            self._turn = clock.callLater(0, self._next_registration)

    def _register_now(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        done = self.registry.register_many([self._decode(head, payload, conn)])[0]
        if isinstance(done, Exception):
            raise done
        return self._registered(head, conn, done)

    @staticmethod
    def _decode(head: Head, payload: bytes, conn: Connection) -> RegisterRequest:
        h = head.headers
        running = [int(x) for x in h.get("running", "").split(",") if x.strip().isdigit()]
        return RegisterRequest(
            h["name"],
            h["host"],
            int(h["port"]),
            int(h["slots"]),
            Versions(h["dsml-version"], int(h["protocol-version"])),
            payload,
            running,
            conn,
            parse_digest(h.get("inventory-digest")),
            int(h.get("free-disk", 0)),
            int(h.get("stored-bytes", 0)),
            int(h.get("mem", 0)),
            tuple(g for g in h.get("gpus", "").split(",") if g),
            h.get("fn-runtime", ""),
        )

    def _registered(self, head: Head, conn: Connection, done: Registration) -> Reply:
        tune_socket(conn.transport)  # keepalive + TCP_USER_TIMEOUT on worker links
        return Reply(
            {
                "Incarnation": done.incarnation,
                "Added": done.added,
                "Removed": done.removed,
                "Rejected": done.rejected,
                # Its own key: it checks the grants of writes placed on it (and can sign
                # for nobody else).
                "Grant-Key": self.keys.directory.grants.worker_key(head.headers["name"]),
            }
        )

    @responder("heartbeat", roles=_WORKER)
    def _heartbeat(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        h = head.headers
        self.registry.heartbeat(
            h["name"],
            int(h["incarnation"]),
            free_slots=int(h["free-slots"]),
            stored_bytes=int(h["stored-bytes"]),
            stored_files=int(h["stored-files"]),
            free_disk=int(h["free-disk"]),
            link=conn,
        )
        return Reply()

    def _sender(self, head: Head, conn: Connection) -> WorkerRecord:
        """The worker registered on ``conn`` under the request's Name and Incarnation."""
        h = head.headers
        return self.registry.registered_on(conn, h["name"], int(h["incarnation"]), head.kind)

    @responder("report", roles=_WORKER)
    def _report(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        done = self.registry.report(self._sender(head, conn), payload)
        return Reply({"Taken": done.taken, "Refused": done.refused})

    @responder("bad_copy", roles=_WORKER)
    def _bad_copy(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        # Only on the worker's own registered link, about its own copy.
        record = self._sender(head, conn)
        h = head.headers
        forgotten = self.registry.bad_copy(record, h["key"], int(h["version"]))
        return Reply({"Forgotten": 1 if forgotten else 0})

    @responder("peers", roles=_WORKER)
    def _peers(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        # Where a worker may forward an upload: the live registered workers.
        self._sender(head, conn)
        return Reply({}, _lines([
            json.dumps({"name": r.name, "addr": worker_addr(r).split("=", 1)[1]})
            for r in self.registry.workers()
            if r.live
        ]))

    @responder("task_result", roles=_WORKER, pipelined=True)
    def _task_result(self, head: Head, payload: bytes, conn: Connection) -> Deferred[Reply]:
        # Pipelined: a batch of results is answered after its commit, and the next batch
        # must not wait for that commit (results serialized behind commits left slots
        # idle: measured ~15% of the throughput of one-shot tasks).
        record = self._sender(head, conn)
        reports: list[FinishedReport] = []
        for line in payload.splitlines():
            try:
                reports.append(finished_report(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                continue
        d = self.router.results(record.name, int(head.headers["incarnation"]), reports)
        return d.addCallback(lambda n: Reply({"Taken": n[0], "Refused": n[1]}))

    @responder("nodes", roles=_CLIENT)
    def _nodes(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        now = self.registry.membership.monotonic()
        lag = self.lag() if self.lag is not None else {}
        headers: dict[str, object] = {
            f"Lag-{name[:-3].replace('_', '-').title()}-Ms": lag[name]
            for name in ("worst_ms", "recent_worst_ms", "last_ms") if name in lag}
        if self.clock is not None:
            headers["Timers"] = timers_of(self.clock)  # "monotonic" from a daemon
        if self.repair is not None:
            repair = self.repair()
            headers["Repair-Pending"] = repair["pending"]
            headers["Repair-Scanning"] = repair["scanning"]
            headers["Repair-Cpu-Ms"] = repair["cpu_ms"]
        if self.gc is not None:
            collector = self.gc()
            headers["Gc-Worst-Ms"] = collector["worst_ms"]
            headers["Gc-Full"] = collector["full"]
            headers["Gc-Full-Ms"] = collector["full_ms"]
        return Reply(headers, _lines([
            json.dumps(
                {
                    **self._resources(r),
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
                    # Why it gets no new task ("" if it does: see dsml.master.cordon).
                    "cordoned": self.router.cordoned(r.name) if self._live(r) else "",
                }
            )
            for r in self.registry.workers()
        ]))

    def _live(self, r: WorkerRecord) -> bool:
        """A live worker, and a router to ask about it (a handler built for membership
        alone, as a registration benchmark does, has none)."""
        return r.live and self.router is not None

    def _resources(self, r: WorkerRecord) -> dict[str, object]:
        """What a worker offers tasks, and what its running attempts hold (the master's
        count: the attempts it gave it, and those told to stop not yet ended)."""
        used = self.router.used(r.name) if self._live(r) else Room(0)
        return {"mem": r.mem, "gpus": list(r.gpus), "cpus_used": used.cpus,
                "mem_used": used.mem, "gpus_used": used.gpus, "fn_runtime": r.fn_runtime}

    # -- keys -------------------------------------------------------------------------

    @responder("place", roles=_USERS)
    def _place(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        h = head.headers
        if "attempt" in h:
            # A task's output: only its running attempt may write it (fenced otherwise).
            ident = getattr(conn, "identity", None)
            worker = ident.name if ident is not None and ident.kind == "worker" else None
            self.router.check_output(int(h["attempt"]), h["key"], worker)
        placed = self.keys.place(h["key"], int(h["size"]))
        return Reply(
            {
                "Version": placed.version,
                "Grant": placed.grant,
                "Workers": ",".join(map(worker_addr, placed.workers)),
            }
        )

    @responder("locate", roles=_USERS)
    def _locate(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        where = self.keys.locate(head.headers["key"])
        return Reply(
            {
                "Size": where.size,
                "Sha256": where.sha256,
                "Version": where.version,
                "Replicas": ",".join(map(worker_addr, where.replicas)),
            }
        )

    @responder("commit", roles=_USERS)
    def _commit(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        h = head.headers
        version = self.keys.commit(
            h["key"], int(h["size"]), h["sha256"], h["grant"], h["workers"].split(",")
        )
        if "version" in h and int(h["version"]) != version:
            # Recorded all the same: the grant, not the claim, says the version.
            log.warn("a commit of {key!r} claimed version {claimed}; its grant says {v}",
                     key=h["key"], claimed=h["version"], v=version)
        return Reply({"Version": version})

    @responder("corrupt", roles=_USERS)
    def _corrupt(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        # A hint: the worker re-hashes its copy; only its own bad_copy forgets it.
        key, worker = head.headers["key"], head.headers["worker"]
        checking = self.keys.corrupt(key, worker)
        log.info("a client says {worker}'s copy of {key!r} is corrupt: {what}", worker=worker,
                 key=key, what="ordered a re-hash" if checking else "nothing to check")
        return Reply({"Checking": 1 if checking else 0})

    @responder("remove", roles=_CLIENT)
    def _remove(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        return Reply({"Version": self.keys.remove(head.headers["key"])})

    @responder("list", roles=_CLIENT)
    def _list(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        h = head.headers
        limit = int(h.get("limit", LIST_DEFAULT))
        if not 1 <= limit <= LIST_MAX:
            raise DsmlError(f"Limit must be from 1 to {LIST_MAX}", "bad-header")
        rows = self.keys.list(h.get("prefix", ""), h.get("after"), limit + 1)
        body = _lines([
            json.dumps(
                {"key": k, "size": size, "sha256": sha, "version": v, "replicas": workers},
                ensure_ascii=False,
            )
            for k, size, sha, v, workers in rows[:limit]
        ])
        return Reply({"More": 1} if len(rows) > limit else {}, body)

    # -- jobs -------------------------------------------------------------------------

    @responder("submit", roles=_CLIENT)
    def _submit(self, head: Head, payload: bytes, conn: Connection) -> Deferred[Reply]:
        # A big payload is read a slice of tasks per reactor turn (jobparse).
        if self._parsing is None:
            parsed = succeed(job_spec_from_payload(payload))
        else:
            parsed = job_spec_in_slices(payload, self._parsing)

        def submit(spec: JobSpec) -> Deferred[Reply]:
            d = self.router.submit(spec, principal(conn))
            return d.addCallback(lambda job_id: Reply({"Job": job_id, "Tasks": spec.count}))

        return parsed.addCallback(submit)

    @responder("jobs", roles=_CLIENT)
    def _jobs(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        h = head.headers
        views, nxt = self.router.recent(int(h.get("limit", 100)), h.get("before"))
        body = _lines([json.dumps(job_json(v)) for v in views])
        return Reply({} if nxt is None else {"Next": nxt}, body)

    def _status_json(self, view: JobView, conn: Connection) -> bytes:
        """The status payload: the job's JSON, with why its queued tasks wait now (the
        stderr tails only for its owner and the admins)."""
        private = may_act_on(conn, view.owner, self.admins)
        return json.dumps(
            job_json(view, self.router.queued_reasons(view), private=private)
        ).encode()

    @responder("status", roles=_CLIENT)
    def _status(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        h = head.headers
        view = self.router.status(h["job"], int(h.get("from", 0)), int(h.get("limit", 1000)))
        return Reply(_page_headers(view), self._status_json(view, conn))

    @responder("cancel", roles=_CLIENT)
    def _cancel(self, head: Head, payload: bytes, conn: Connection) -> Deferred[Reply]:
        self._check_owner(self.router.job(head.headers["job"], tasks=False), conn, "cancel it")
        d = self.router.cancel(head.headers["job"])
        return d.addCallback(lambda killed: Reply({"Killed": killed}))

    @responder("wait", roles=_CLIENT)
    def _wait(self, head: Head, payload: bytes, conn: Connection) -> Deferred[Reply]:
        d = self.router.wait(head.headers["job"], int(head.headers.get("timeout", 60)))

        def answer(result: tuple[JobView, bool]) -> Reply:
            view, final = result
            return Reply({**_page_headers(view), "Final": 1 if final else 0},
                         self._status_json(view, conn))

        return d.addCallback(answer)

    @responder("result", roles=_CLIENT)
    def _result(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        # The owner's (or an admin's), as the logs are: a function's result is its data.
        h = head.headers
        view = self.router.job(h["job"], tasks=False)
        self._check_owner(view, conn, "read its results")
        data = self.router.jobs.result(view, int(h["task"]))
        if data is None:
            raise JobError(f"task {h['task']} of {h['job']} has no result here", "not-found")
        return Reply({}, data)

    @responder("logs", roles=_CLIENT)
    def _logs(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        h = head.headers
        attempt = int(h["attempt"]) if "attempt" in h else None
        self._check_owner(self.router.job(h["job"], tasks=False), conn, "read its logs")
        a, record = self.router.log_source(h["job"], int(h.get("task", 0)), attempt)
        return Reply(
            {
                "Attempt": a.id,
                "Worker": f"{record.name}={record.host}:{record.port}",
                "State": a.state,
                "Live": 1 if record.live else 0,
            }
        )
