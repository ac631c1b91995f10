"""The simulated cluster: the production master and workers on a fake network and clock.

Owns :class:`SimCluster` (starting, killing, silencing and restarting the master and the
workers; moving time; looking inside them), :class:`SimTimeout`, :class:`ResultSeen` (what
the master made of each task result) and :class:`FailureLog` (the ``log.failure`` events of
a run).  The network is :mod:`.network`, a process's clock :mod:`.process`, the task runner
:mod:`.tasks`; clients are :class:`~dsml.net.cluster_client.AsyncClusterClient` on the
simulated network (:meth:`SimCluster.client`).
"""

from __future__ import annotations

import gc
import itertools
import random
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from ...master.jobs import JobManager, JobView
from ...master.membership import ALIVE
from ...master.service import Master, build_master
from ...master.state import MasterState
from ...net.cluster_client import AsyncClusterClient
from ...net.links import USER_TIMEOUT_MS, Links
from ...net.server import ServerLimits
from ...protocol.limits import DEFAULT_VALUE_MAX
from ...worker.link import RETRY_FACTOR, RETRY_INITIAL, RETRY_MAX, MasterLink, WorkerInfo
from ...worker.service import Worker, build_worker
from ...worker.store import IndexEntry, Store
from ...worker.tasks import AttemptResult
from ...worker.transfers import TaskTransfers
from . import disk as disk_model
from .logs import FailureLog
from .network import FakeNetwork
from .process import NetListen, ProcessClock, run_later
from .tasks import FakeTaskManager, Orphan, Script, TaskEvent, default_script

T = TypeVar("T")

#: The simulation's clients are the production async client (the name tests know).
SimClient = AsyncClusterClient

#: Where the master listens in a simulated cluster; workers get the next ports in order.
MASTER_HOST = "master"
MASTER_PORT = 7000


class SimTimeout(AssertionError):
    """Simulated time ran out before what a test waited for happened."""


@attrs.frozen
class ResultSeen:
    """A result the master was given (``JobManager.finished``): taken or refused."""

    time: float
    attempt_id: int
    worker: str
    incarnation: int
    taken: bool
    reason: str


class SimCluster:
    """A master and named workers over a :class:`FakeNetwork`, on one :class:`Clock`.

    Worker ``name`` listens at ``name:<port>`` and keeps its store under
    ``root/name/store``; the master listens at ``master:7000`` with its state in
    ``root/master``.  Everything is the production code, built by
    :func:`~dsml.master.service.build_master` and
    :func:`~dsml.worker.service.build_worker`; only the clock, the network and
    ``run_in_thread`` (inline) are simulated.  Workers report a free disk of ``disk``
    minus what they store, so placement does not depend on the machine running the test,
    and back off with a jitter drawn from ``random.Random(seed)``.  ``chunk`` caps the
    bytes a connection delivers per round (every message then arrives in pieces);
    ``user_timeout`` is how long a silent link lasts (TCP_USER_TIMEOUT, keepalive);
    with ``tcp="socket"`` each end of a link gives up as its socket options say
    instead (:mod:`.tcp`: only the links the code tunes time out in 15 s); ``rate``
    (bytes per second per direction of a link) makes transfers take time.
    ``wall_clocks`` (machine name -> seconds ahead) gives every process a wall clock of
    its own, apart from the shared monotonic one (see :meth:`jump_clock`).

    With ``start`` (the default) the master and every worker start and the constructor
    returns once every worker is registered.

    Jobs: every worker runs tasks with a :class:`FakeTaskManager` (no processes) whose
    attempts go as :attr:`script` says (by default, as their ``SIM_*`` environment says:
    see :func:`default_script`); ``slots`` may give each worker its own number.  What the
    runners do is in :attr:`task_events`, what the master made of each result in
    :attr:`results`; :attr:`checks` run after every step (say, to assert an invariant
    at every simulated instant).
    """

    def __init__(
        self,
        root: Path | str,
        workers: Iterable[str] = ("w1", "w2", "w3"),
        replication: int = 2,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        *,
        token: str = "sim-token",
        value_max: int = DEFAULT_VALUE_MAX,
        slots: int | Mapping[str, int] = 2,
        disk: int = 10**12,
        seed: int = 0,
        user_timeout: float | None = USER_TIMEOUT_MS / 1000,
        limits: ServerLimits | None = None,
        chunk: int | None = None,
        start: bool = True,
        script: Script = default_script,
        move_outputs: bool = False,
        tcp: str = "uniform",
        rate: float | None = None,
        wall_clocks: Mapping[str, float] | None = None,
    ) -> None:
        self.root = Path(root)
        self.clock = Clock()
        self.net = FakeNetwork(
            self.clock, user_timeout=user_timeout, chunk=chunk, tcp=tcp, rate=rate
        )
        self.names = list(workers)
        self.replication = replication
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.token = token
        self.value_max = value_max
        self.slots = slots
        self.disk = disk
        self.limits = limits or ServerLimits()
        self.random = random.Random(seed)
        self.master_addr = f"{MASTER_HOST}:{MASTER_PORT}"
        self.ports = {name: MASTER_PORT + 1 + i for i, name in enumerate(self.names)}
        #: The running master (None while it is down).
        self.master: Master | None = None
        #: The running workers, by name.
        self.workers: dict[str, Worker] = {}
        #: The clock of each running process ("master" and worker names).
        self.clocks: dict[str, ProcessClock] = {}
        self._boots = itertools.count(1)
        self._clients = itertools.count(1)
        #: How each fake attempt goes (may be replaced at any time).
        self.script = script
        #: Whether fake attempts that exit 0 store their declared outputs through the
        #: worker's real transfers (as attempt-scoped, fenced writes) before reporting.
        self.move_outputs = move_outputs
        #: The task runner of each running worker.
        self.runners: dict[str, FakeTaskManager] = {}
        #: Everything every task runner did, in order.
        self.task_events: list[TaskEvent] = []
        #: Every result the master was given, taken or refused, in order.
        self.results: list[ResultSeen] = []
        #: Called after every step of the clock (once the network has settled).
        self.checks: list[Callable[[], None]] = []
        #: Workers whose disk fails (see :meth:`disk_fault`): "full" or "io".
        self.disk_faults: dict[str, str] = {}
        #: Workers whose thread pool is slow (see :meth:`slow_disk`): the most delay.
        self.disk_delays: dict[str, float] = {}
        #: Attempts each dead worker process left "running" (see :meth:`restart`).
        self._orphans: dict[str, list[Orphan]] = {}
        #: What each worker's disk made durable (see :mod:`.disk`); a power loss
        #: (:meth:`power_off`) takes the rest.  Lines of what each power loss undid.
        self.durable = disk_model.acquire()
        self.power_losses: list[tuple[float, str, list[str]]] = []
        #: Each machine's wall clock: seconds ahead of the monotonic time (None: no
        #: wall clocks, every machine's is the shared time, and none steps).
        self.walls = None if wall_clocks is None else dict(wall_clocks)
        self.walls_at_start = dict(self.walls or {})
        #: Every step of a wall clock: (monotonic time, machine, its offset after).
        self.wall_steps: list[tuple[float, str, float]] = []
        self._closed = False
        gc.collect()  # an earlier cluster's garbage logs its errors before this listens
        self.failures = FailureLog()
        globalLogPublisher.addObserver(self.failures)
        if start:
            self.start()

    # -- life ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the master and every worker; wait until all are registered."""
        self.start_master()
        for name in self.names:
            self.start_worker(name)
        self.wait_registered()

    def close(self) -> None:
        """Stop everything (as crashes: nothing more runs) and close stores and state."""
        for name in list(self.workers):
            self.kill(name)
        if self.master is not None:
            self.kill_master()
        globalLogPublisher.removeObserver(self.failures)
        if not self._closed:
            self._closed = True
            disk_model.release([self.root / name / "store" for name in self.names])

    def __enter__(self) -> SimCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def addr(self, name: str) -> str:
        """The storage address of worker ``name``."""
        return f"{name}:{self.ports[name]}"

    def start_master(self) -> Master:
        """Start the master over its state directory (created on first start)."""
        if self.master is not None:
            raise RuntimeError("the master is already running")
        state_dir = self.root / "master"
        state_dir.mkdir(parents=True, exist_ok=True)
        self.net.revive(MASTER_HOST)
        clock = self._process_clock(MASTER_HOST)
        state = MasterState(state_dir / "master.sqlite3")
        disk_model.watch_wal(state)
        master = build_master(
            state=state,
            clock=clock,
            monotonic=self.clock.seconds,
            replication=self.replication,
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_timeout=self.heartbeat_timeout,
            token=self.token,
            limits=self.limits,
            listen=lambda factory: NetListen(self.net, self.master_addr, factory, MASTER_HOST),
            now=clock.wall_time,
        )
        self._watch_results(master.jobs)
        master.service.startService()
        self.master = master
        self.clocks[MASTER_HOST] = clock
        return master

    def _watch_results(self, jobs: JobManager) -> None:
        """Record in :attr:`results` every result ``jobs`` is given, taken or refused."""
        finished = jobs.finished

        def watched(attempt_id: int, worker: str, incarnation: int, **kw: Any) -> Any:
            d = finished(attempt_id, worker, incarnation, **kw)
            # A refused result fires False at once; a taken one fires once committed.
            refused = d.called and d.result is False
            self.results.append(
                ResultSeen(self.clock.seconds(), attempt_id, worker, incarnation,
                           not refused, str(kw.get("reason", "")))
            )
            return d

        jobs.finished = watched  # type: ignore[method-assign]

    def kill_master(self, power: bool = False) -> None:
        """The master process dies: its links close, its state is closed (what it had
        not committed yet is lost, as in a crash).  With ``power`` its machine loses
        power: nobody sees its links close, and its state file loses what SQLite had not
        made durable (:func:`.disk.lose_wal`)."""
        master = self._master()
        restore = None
        if power:
            restore, lost = disk_model.lose_wal(master.state)
            self.power_losses.append((self.clock.seconds(), MASTER_HOST, [f"{lost} WAL bytes"]))
        self.net.crash_node(MASTER_HOST, half_open=power)
        master.jobs.close(flush=False)  # a crash: the pending batch never reaches disk
        master.service.stopService()
        if restore is not None:
            restore()
        self.clocks.pop(MASTER_HOST).stop()
        self.master = None

    def restart_master(self, downtime: float = 0.0) -> Master:
        """Kill the master, wait ``downtime`` seconds, start it again over the same state.

        Workers find it again by themselves (backoff, then a new registration)."""
        self.kill_master()
        if downtime:
            self.advance(downtime)
        return self.start_master()

    def start_worker(self, name: str, adopt: bool = False) -> Worker:
        """Start worker ``name`` (a new process: a new boot id) over its store directory.

        With ``adopt``, the attempts its last process left running go on in this one
        (as task processes that outlived their worker), to their scripted end; those that
        ended meanwhile have their results waiting to be sent.  Without, they are gone."""
        if name in self.workers:
            raise RuntimeError(f"worker {name} is already running")
        self.net.revive(name)
        self.net.unsilence(name)
        (self.root / name).mkdir(parents=True, exist_ok=True)
        self.durable.watch(self.root / name / "store")
        store = Store(self.root / name / "store", value_max=self.value_max)
        endpoint_for = self.net.endpoint_for(name)
        addr = self.addr(name)
        clock = self._process_clock(name)
        slots = self.worker_slots(name)
        orphans = self._orphans.pop(name, [])

        def make_runner(
            on_result: Callable[[AttemptResult], None], transfers: TaskTransfers
        ) -> FakeTaskManager:
            runner = FakeTaskManager(
                clock,
                name=name,
                slots=slots,
                work_dir=self.root / name / "tasks",
                on_result=on_result,
                script=lambda worker, spec: self.script(worker, spec),
                events=self.task_events,
                transfers=transfers if self.move_outputs else None,
            )
            if adopt:
                runner.adopt(orphans)
            return runner

        worker = build_worker(
            tasks=make_runner,
            store=store,
            clock=clock,
            endpoint_for=endpoint_for,
            master_addr=lambda: self.master_addr,
            token=self.token,
            info=WorkerInfo(name, name, self.ports[name], slots,
                            boot=f"sim-{next(self._boots)}"),
            value_max=self.value_max,
            heartbeat_interval=self.heartbeat_interval,
            limits=self.limits,
            run_in_thread=run_later(clock, lambda: self._thread_delay(name)),
            listen=lambda factory, _master: NetListen(self.net, addr, factory, name),
            free_disk=lambda: max(0, self.disk - store.stored_bytes),
            retry_policy=backoffPolicy(
                initialDelay=RETRY_INITIAL,
                maxDelay=RETRY_MAX,
                factor=RETRY_FACTOR,
                jitter=self.random.random,
            ),
        )
        if name in self.disk_faults:
            disk_model.break_store(store, self.disk_faults[name])
        worker.service.startService()
        self.workers[name] = worker
        self.clocks[name] = clock
        self.runners[name] = worker.jobs.tasks  # type: ignore[assignment]
        return worker

    def _process_clock(self, name: str) -> ProcessClock:
        if self.walls is None:
            return ProcessClock(self.clock)
        return ProcessClock(self.clock, self.walls.setdefault(name, 0.0))

    def jump_clock(self, name: str, delta: float) -> None:
        """Machine ``name``'s wall clock steps by ``delta`` seconds (what its node is
        given as ``now``, and its timers if they run on it: see :class:`ProcessClock`);
        the monotonic time goes on."""
        assert self.walls is not None, "SimCluster(wall_clocks=...) first"
        self.walls[name] = self.walls.get(name, 0.0) + delta
        self.wall_steps.append((self.clock.seconds(), name, self.walls[name]))
        if name in self.clocks:
            self.clocks[name].jump(delta)

    def worker_slots(self, name: str) -> int:
        """The task slots worker ``name`` declares."""
        if isinstance(self.slots, Mapping):
            return int(self.slots.get(name, 2))
        return self.slots

    def kill(self, name: str, half_open: bool = False) -> None:
        """Worker ``name``'s process dies: its connections close (the master sees it dead
        at once), its timers stop, its store is closed as a crash leaves it.

        With ``half_open`` its machine vanishes instead (power loss): nobody sees its
        connections close, so the master only notices the missed heartbeats, and its
        disk keeps only what the store made durable (see :mod:`.disk`)."""
        worker = self.workers.pop(name)
        self._orphans[name] = self.runners.pop(name).orphans()
        self.net.crash_node(name, half_open=half_open)
        if half_open:
            # No clean close: what the values log holds stays there (unapplied), and
            # the disk keeps only what was made durable.
            worker.store.flush = lambda: None  # type: ignore[method-assign]
        worker.service.stopService()
        self.clocks.pop(name).stop()
        if half_open:
            undone = self.durable.lose_power(self.root / name / "store")
            self.power_losses.append((self.clock.seconds(), name, undone))

    def power_off(self, name: str) -> None:
        """``kill(name, half_open=True)``."""
        self.kill(name, half_open=True)

    def restart(self, name: str, adopt: bool = False) -> Worker:
        """A new process of worker ``name`` over its old store (killing the old one if it
        still runs); it registers by itself.  ``adopt``: see :meth:`start_worker`."""
        if name in self.workers:
            self.kill(name)
        return self.start_worker(name, adopt)

    def silence(self, name: str) -> None:
        """Worker (or ``master``) ``name`` goes silent: bytes are held, nothing closes."""
        self.net.silence(name)

    def record_links(self) -> None:
        """From now on keep what each worker process sends the master on its link (the
        bytes, from the connection's first), for :meth:`replay_old_link`."""
        self.transcripts: dict[str, dict[int, bytearray]] = {}

        def tap(t: Any, data: bytes) -> None:
            conn = t.conn
            if t is conn.client and conn.addr == self.master_addr and t.node in self.ports:
                self.transcripts.setdefault(t.node, {}).setdefault(id(conn), bytearray()) \
                    .extend(data)

        self.net.tap = tap

    def replay_old_link(self, name: str) -> bool:
        """An old incarnation of worker ``name`` speaks again: a new connection from its
        host to the master carries, byte for byte, everything one of its earlier links
        sent (authentication, registration, heartbeats, reports, task results).  The
        answers are ignored.  False if nothing was recorded."""
        links = getattr(self, "transcripts", {}).get(name, {})
        if not links:
            return False
        first = bytes(next(iter(links.values())))
        host, _, port = self.master_addr.rpartition(":")
        endpoint = self.net.endpoint_for(name)(host, int(port))

        class Replay(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(first)  # type: ignore[union-attr]

        factory = Factory.forProtocol(Replay)
        endpoint.connect(factory).addErrback(lambda f: None)
        return True

    def disk_fault(self, name: str, fault: str | None) -> None:
        """Worker ``name``'s disk fails: ``"full"`` (every new value or file is refused
        for lack of space, as ENOSPC makes the store do), ``"io"`` (reads and writes
        raise EIO); None: the disk works again.  Applies to the running process and to
        any process started while it lasts."""
        if fault is None:
            self.disk_faults.pop(name, None)
        else:
            self.disk_faults[name] = fault
        if name in self.workers:
            disk_model.break_store(self.workers[name].store, fault)

    def slow_disk(self, name: str, max_delay: float) -> None:
        """Worker ``name``'s blocking work (store writes and commits: its thread pool)
        finishes up to ``max_delay`` simulated seconds late, at random; 0: inline again."""
        self.disk_delays[name] = max_delay

    def _thread_delay(self, name: str) -> float:
        top = self.disk_delays.get(name, 0.0)
        return self.random.uniform(0.0, top) if top > 0 else 0.0

    def pause(self, name: str) -> None:
        """SIGSTOP worker ``name`` (or "master"): its timers stop and its links go quiet
        (held, nothing closes but by TCP's user timeout), until :meth:`resume`."""
        self.net.silence(name)
        self.clocks[name].pause()

    def resume(self, name: str) -> None:
        """SIGCONT: its overdue timers fire at once, its held bytes flow again."""
        self.clocks[name].resume()
        self.net.unsilence(name)

    def unsilence(self, name: str) -> None:
        """The network of ``name`` works again."""
        self.net.unsilence(name)

    # -- time ---------------------------------------------------------------------

    def flush(self) -> None:
        """Deliver everything that can move without time passing, then run the checks."""
        self.net.flush()
        for check in self.checks:
            check()

    def advance(self, seconds: float, step: float = 0.1) -> None:
        """Move the clock ``seconds`` forward in steps of ``step``, flushing after each."""
        self.flush()
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.flush()

    def wait(
        self,
        d: Deferred[T] | Coroutine[Any, Any, T],
        timeout: float = 60.0,
        step: float = 0.1,
    ) -> T:
        """Advance the clock until ``d`` fires; return its result or raise its error.

        :class:`SimTimeout` if it has not fired within ``timeout`` simulated seconds."""
        if not isinstance(d, Deferred):
            d = Deferred.fromCoroutine(d)
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        self.flush()
        end = self.clock.seconds() + timeout
        while not outcome:
            if self.clock.seconds() >= end - 1e-9:
                raise SimTimeout(f"not done after {timeout:g} simulated seconds")
            self.clock.advance(step)
            self.flush()
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[no-any-return]

    def until(
        self,
        predicate: Callable[[], Any],
        timeout: float = 60.0,
        step: float = 0.1,
        what: str = "",
    ) -> float:
        """Advance until ``predicate()`` is true; return the simulated seconds it took.

        :class:`SimTimeout` (naming ``what``) if it stays false for ``timeout`` seconds."""
        self.flush()
        start = self.clock.seconds()
        end = start + timeout
        while not predicate():
            if self.clock.seconds() >= end - 1e-9:
                raise SimTimeout(
                    f"{what or 'condition'} still false after {timeout:g} simulated seconds"
                )
            self.clock.advance(step)
            self.flush()
        return self.clock.seconds() - start

    def wait_registered(self, names: Iterable[str] | None = None, timeout: float = 60.0) -> None:
        """Advance until the named running workers (all by default) are registered and
        alive on the running master."""
        wanted = list(self.workers if names is None else names)
        self.until(
            lambda: all(self.registered(n) for n in wanted),
            timeout,
            what=f"registration of {', '.join(wanted)}",
        )

    # -- looking inside -----------------------------------------------------------

    def _master(self) -> Master:
        if self.master is None:
            raise RuntimeError("the master is not running")
        return self.master

    def registered(self, name: str) -> bool:
        """True if worker ``name`` runs and the master has it alive at its incarnation."""
        worker = self.workers.get(name)
        if worker is None or self.master is None:
            return False
        record = self.master.membership.get(name)
        return (
            record is not None
            and record.state == ALIVE
            and worker.master.incarnation == record.incarnation
        )

    def link(self, name: str) -> MasterLink:
        """Worker ``name``'s link to the master."""
        return self.workers[name].master

    def state(self, name: str) -> str | None:
        """The master's view of worker ``name``: alive, suspect, dead (None: unknown)."""
        record = self._master().membership.get(name)
        return None if record is None else record.state

    def replicas(self, prefix: str = "", live: bool = False) -> dict[str, set[str]]:
        """The master's directory: each live key and the workers holding its current
        version (with ``live``, only workers the master does not count as dead; the
        directory remembers a dead worker's copies, since it may come back)."""
        master = self._master()
        rows = master.directory.list(prefix, None, 10**9)
        out = {key: set(workers) for key, _, _, _, workers in rows}
        if live:
            alive = {r.name for r in master.membership.live()}
            out = {key: workers & alive for key, workers in out.items()}
        return out

    def stored(self, name: str) -> dict[str, IndexEntry]:
        """What running worker ``name`` has in its store, by key."""
        return {e.key: e for e in self.workers[name].store.inventory()}

    def holders(self) -> dict[str, set[str]]:
        """Each key any running worker stores, and which running workers store it."""
        out: dict[str, set[str]] = {}
        for name in self.workers:
            for key in self.stored(name):
                out.setdefault(key, set()).add(name)
        return out

    def read(self, name: str, key: str) -> bytes:
        """The bytes running worker ``name`` stores for ``key``."""
        _, body = self.workers[name].store.open_read(key)
        with body:
            return body.read()

    def object_path(self, name: str, key: str) -> Path:
        """The file holding ``key`` on running worker ``name`` (a file, not a value)."""
        _, body = self.workers[name].store.open_read(key)
        with body:
            path = getattr(body, "name", None)
        if not isinstance(path, str):
            raise ValueError(f"{key!r} on {name} is a value, not a file")
        return Path(path)

    def job(self, job_id: str) -> JobView:
        """The running master's view of a job, with its tasks and attempts."""
        return self._master().jobs.job(job_id)

    def events(self, what: str = "start", job_id: str | None = None) -> list[TaskEvent]:
        """The task runners' events of one kind (of one job), in order."""
        return [
            e for e in self.task_events
            if e.what == what and (job_id is None or e.job_id == job_id)
        ]

    def client(self, name: str | None = None) -> AsyncClusterClient:
        """A new client node on the network: the production async client, over links
        of its own, on the simulation's clock."""
        links = Links(
            self.clock,
            self.net.endpoint_for(name or f"client{next(self._clients)}"),
            self.token,
            name=name or "sim-client",
        )
        return AsyncClusterClient(lambda: self.master_addr, links, self.clock)


__all__ = [
    "MASTER_HOST",
    "MASTER_PORT",
    "FailureLog",
    "ResultSeen",
    "SimClient",
    "SimCluster",
    "SimTimeout",
]
