"""The master at a lab's scale: N simulated workers, K keys, an M-task array (issue #11).

    .venv/bin/python benchmarks/scale.py [--workers 1000] [--keys 1000000] [--array 100000]
                                         [--quick] [--window S] [--no-preload] [--no-digest]
                                         [--tmpdir DIR] [--keep]

``--quick`` (a smoke run of under a minute): 50 workers, 20,000 keys, a 2,000-task
array, a 5 s steady window and ``heartbeat_timeout`` 3 s (so the repair's grace is 3 s).

A REAL master (``twistd -n dsml-master``, started by LocalCluster with a config naming N
workers; plain token mode on 127.0.0.1, no TLS) is driven from this one process by N
lightweight simulated workers that speak the real wire protocol over real sockets
(dsml's own codec, :mod:`dsml.protocol.codec`; not the full worker, no SQLite store).
Each simulated worker behaves like ``dsml.worker.link.MasterLink``:

* it connects, authenticates (``auth``, waiting for its answer like the real link), then
  ``register``s with its inventory, the JSON lines ``{key, size, sha256, version}``: the
  K keys ``k/00000000``... of 1 KiB each, each held by 2 workers (replication 2; key i
  on worker ``i % N`` and on another one that varies with ``i // N``);
* with ``Inventory-Digest``, the digest of that inventory
  (:func:`dsml.protocol.inventory.inventory_digest`, kept up to date as copies come and go),
  so a master that holds exactly that inventory for it skips the reconcile (a restart);
  ``--no-digest`` leaves the header out, as ``dsml.worker`` does until it sends one;
* it heartbeats every second (a phase of its own, so the N beats spread over the second),
  at once after each registration, with the real fields (``Free-Slots``, ``Stored-Bytes``,
  ``Stored-Files``, ``Free-Disk``); ``not-registered``/``stale-incarnation`` make it
  reconnect, as the real link does;
* a lost link is redialled with the real worker's backoff (0.3, 0.45, 0.68, ... up to 5 s,
  each plus up to 0.3 s of jitter; at most about 1 s while connects are refused);
* orders: ``ping`` OK; ``replicate`` OK at once (the copy is pretended made: the target
  lists the key in its inventory from then on); ``drop`` OK (the key leaves the
  inventory); ``verify`` OK, good; ``run`` OK and the attempt then "runs" until the end
  (each worker has 1 slot, so it reports ``Free-Slots: 0`` while it runs one, and names it
  in ``Running`` when it registers again); ``kill`` OK and a ``task_result`` saying the
  attempt was killed.  So a submit dispatches at most N tasks and the rest stay queued.

The master's directory is preloaded before it first starts: its state file gets every
worker's copies through the very ``Directory.reconcile`` a registration runs, and the
workers are recorded, as a master that has run a while keeps them; so the first
registrations find their inventories already known, as after a restart.  (Loading a
million keys through registrations on an empty master, ``--no-preload``, took today's
master over four minutes for the first 300 of 1,000 workers here, slowing as it grew:
its repair loop scans the whole directory on every pass.  With ``--no-preload`` one
worker registers empty first and a ``place`` issues the version every key carries: the
master quarantines inventory versions it never issued.)

Phases, each measured from outside the master (its /proc files, and round trips):

1. registration of the N workers with the K keys (at most 32 registrations in flight);
   once they are all in and the repair's copies and trims of keys whose other holder
   was not in yet have stopped (no order for 3 s), the master's RSS (VmRSS, VmHWM);
2. a steady window (20 s; --quick 5 s) with all N heartbeating and nothing else: the
   master's CPU (utime+stime from /proc/PID/stat) per second, as % of one core, and of
   that the repairer's passes' own (``Repair-Cpu-Ms`` of ``nodes``: the master's thread
   CPU clock read around every pass), the figure the 5 % target is on.  It
   starts once the master's repairer says (``Repair-Pending``, ``Repair-Scanning`` of
   its ``nodes`` answer) that its start-up pass over the directory, made once after the
   start's grace, is over: a start-up cost, printed apart;
3. a ``--array M`` submit through ``dsml.client.ClusterClient`` (in a helper process, so
   that encoding M tasks does not hold this process's GIL), until 2 s after it: the
   worst stall, i.e. the worst round trip of a probe connection sending ``ping`` every
   10 ms (one at a time: a stalled ping's round trip is the stall), the master's own
   lag probe's worst (below) and the worst heartbeat round trip;
4. one worker's link closed and kept away: the master declares it dead, waits its grace
   (``heartbeat_timeout``) and re-replicates its keys; the window runs the grace plus 30 s
   (--quick 5 s): the same stall figures, the master's CPU, copies ordered;
5. the master stopped with SIGTERM and started again (same port): the time until all N
   workers are registered again, from the moment it listens (and from the SIGTERM).

This process's own reactor lag (``dsml.lagprobe.LagProbe`` every 10 ms) is printed per
phase: a round trip is only as good as the process measuring it, and the machine may be
shared.  The master's own lag probe (``Lag-Worst-Ms`` of its ``nodes`` answer, the worst
since it started) is read at the start and the end of each phase: when it rose, the
phase's worst stall is exactly that.  Nothing is asserted: the table prints the targets
beside the figures.  Connection limits are raised for the simulation only where one
process stands for N machines: ``max_connections`` to N + 64 and the per-address
unauthenticated limit to the global one (N real workers would come from N addresses).
Everything runs on 127.0.0.1 under one temporary directory, removed at the end; the
master is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    cpu_model,
    cpu_seconds,
    fmt,
    free_port,
    note,
    proc_status_kib,
    say,
    table,
    verdict,
)
from twisted.application.internet import backoffPolicy  # noqa: E402
from twisted.internet.defer import Deferred, DeferredSemaphore, fail  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402
from twisted.internet.error import ConnectionDone  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.internet.task import LoopingCall, deferLater  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from dsml import __version__  # noqa: E402
from dsml.lagprobe import LagProbe  # noqa: E402
from dsml.localcluster import LocalCluster  # noqa: E402
from dsml.net.limits import Limits  # noqa: E402
from dsml.protocol.codec import (  # noqa: E402
    END,
    NEED_DATA,
    PEER,
    PROTOCOL_VERSION,
    RESPONSE,
    Data,
    Head,
    Parser,
    ProtocolError,
    Rejected,
    encode_error,
    encode_request,
    encode_response,
)
from dsml.protocol.inventory import entry_digest  # noqa: E402
from dsml.protocol.methods import worker_order_methods  # noqa: E402
from dsml.worker.link import (  # noqa: E402
    RETRY_FACTOR,
    RETRY_INITIAL,
    RETRY_JITTER,
    RETRY_MAX,
    RETRY_REFUSED_MAX,
)

HOST = "127.0.0.1"
KEY_SIZE = 1024
FREE_DISK = 1 << 40
#: The real worker's reconnection backoff (dsml.worker.link): 0.2 * 1.5**n, at most 5 s,
#: plus up to 0.3 s of jitter; at most about 1 s while connects are refused.
RETRY = backoffPolicy(initialDelay=RETRY_INITIAL, maxDelay=RETRY_MAX, factor=RETRY_FACTOR,
                      jitter=lambda: random.uniform(0.0, RETRY_JITTER))
#: Registrations in flight at once while the cluster is first loaded (under the
#: master's 64 unauthenticated connections).
LOAD_CONCURRENCY = 32
PROBE_INTERVAL = 0.01
#: Most seconds to wait for the loading's copies and trims to settle.
SETTLE_MAX = 120.0
#: Most seconds to wait for every worker to register again after the restart.
REREG_MAX = 600.0
#: Most seconds to wait for the first registration of every worker.
LOAD_MAX = 1200.0
ORDERS = worker_order_methods()

# The table's rows (tests/test_bench_scale_smoke.py looks for these names).
ROW_RSS = "master RSS, all registered with K keys"
ROW_HWM = "master peak RSS (VmHWM), whole run"
ROW_BEATS = "master CPU, steady: N workers' heartbeats + repair"
ROW_CPU = "repair CPU, steady (the repairer's passes)"
ROW_SUBMIT = "worst stall during the array submit"
ROW_REPAIR = "worst stall during a dead worker's repair"
ROW_REREG = "re-registration of all N after a master restart"
ROWS = (ROW_RSS, ROW_HWM, ROW_BEATS, ROW_CPU, ROW_SUBMIT, ROW_REPAIR, ROW_REREG)

TARGET_RSS_MIB = 1024
TARGET_CPU_PCT = 5.0
TARGET_STALL_MS = 50.0
TARGET_REREG_S = 2.0


class Refused(Exception):
    """An ERROR answer from the master."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code


def key_name(i: int) -> str:
    return f"k/{i:08d}"


def key_line(i: int, version: int) -> bytes:
    """One inventory line of key ``i`` (its sha256 is a fake but well-formed digest)."""
    return b'{"key":"k/%08d","size":%d,"sha256":"%064x","version":%d}' % (
        i, KEY_SIZE, i, version)


# -- one link, either way, over dsml's codec --------------------------------------------


class Link(Protocol):
    """A dsml connection: our requests answered in order, the master's orders answered
    by ``owner.on_order`` (a worker link) — or a plain client connection (``peer=False``)."""

    def __init__(self, owner: Any, peer: bool) -> None:
        self.owner = owner
        self.parser = Parser(PEER, ORDERS, whole=True) if peer else Parser(RESPONSE, whole=True)
        self.next_id = 1
        self.waiting: deque[Deferred[tuple[Head, bytes]]] = deque()
        self.head: Head | None = None
        self.chunks: list[bytes] = []
        self.closed = False

    def request(
        self, method: str, headers: dict[str, object], payload: bytes = b""
    ) -> Deferred[tuple[Head, bytes]]:
        if self.closed or self.transport is None:
            return fail(ConnectionDone("link closed"))
        rid, self.next_id = self.next_id, self.next_id + 1
        d: Deferred[tuple[Head, bytes]] = Deferred()
        self.waiting.append(d)
        self.transport.write(encode_request(method, rid, headers, payload))
        return d

    def answer(self, rid: int, headers: dict[str, object] | None = None) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(encode_response(True, rid, headers or {}))

    def dataReceived(self, data: bytes) -> None:
        parser = self.parser
        try:
            parser.feed(data)
            while True:
                ev = parser.next_event()
                if ev is NEED_DATA:
                    return
                if isinstance(ev, Head):
                    if ev.body is not None:
                        self.message(ev, ev.body)
                    else:
                        self.head, self.chunks = ev, []
                elif isinstance(ev, Data):
                    self.chunks.append(ev.data)
                elif ev is END:
                    head, self.head = self.head, None
                    assert head is not None
                    self.message(head, b"".join(self.chunks))
                    self.chunks = []
                elif isinstance(ev, Rejected):
                    self.transport.write(encode_error(ev.id, ev.code, ev.message))
        except ProtocolError:
            self.transport.abortConnection()

    def message(self, head: Head, payload: bytes) -> None:
        if head.kind in ("OK", "ERROR"):
            if not self.waiting:
                self.transport.abortConnection()
                return
            d = self.waiting.popleft()
            if head.kind == "OK":
                d.callback((head, payload))
            else:
                d.errback(Refused(head.headers.get("code", "?"), head.headers.get("message", "")))
        else:
            self.owner.on_order(self, head, payload)

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:  # noqa: B008
        self.closed = True
        waiting, self.waiting = self.waiting, deque()
        for d in waiting:
            d.errback(ConnectionDone("link lost"))
        self.owner.on_lost(self)


# -- what is measured ---------------------------------------------------------------------


class Bench:
    """Shared state of the simulation: the master's address, round trips by phase."""

    def __init__(self, reactor: Any, port: int, token: str, version: int = 0) -> None:
        self.reactor = reactor
        self.port = port
        self.token = token
        self.version = version
        self.phase = "load"
        self.beats: dict[str, list[float]] = {}
        self.probes: dict[str, list[float]] = {}
        self.registered: dict[str, float] = {}  # name -> time of its latest registration
        #: Failed registration tries per phase and why (refused, dropped, an error code).
        self.failed: dict[str, Counter[str]] = {}
        self.orders: dict[str, int] = {}
        self.replicate_times: list[float] = []
        self.last_order_at = 0.0  # when the last replicate or drop order came
        self.by_port: dict[int, SimWorker] = {}
        self.lag = LagProbe(reactor, interval=PROBE_INTERVAL)

    def beat_rtt(self, rtt: float) -> None:
        self.beats.setdefault(self.phase, []).append(rtt)

    def endpoint(self) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(self.reactor, HOST, self.port, timeout=10)


@attrs.define
class Window:
    """Figures of one measured phase."""

    seconds: float = 0.0
    cpu_pct: float | None = None
    #: The repairer's passes' CPU (``Repair-Cpu-Ms`` of ``nodes``), % of a core.
    repair_cpu_pct: float | None = None
    #: The master's garbage collector in the window (``Gc-*`` of ``nodes``): full
    #: collections, their total ms; the longest collection since start.
    gc_full: int | None = None
    gc_full_ms: float | None = None
    gc_worst_ms: float | None = None
    probe_worst_ms: float | None = None
    probe_p99_ms: float | None = None
    probe_n: int = 0
    beat_worst_ms: float | None = None
    beat_median_ms: float | None = None
    beat_n: int = 0
    own_lag_ms: float | None = None
    master_lag_ms: float | None = None
    master_lag_rose: bool = False


def _ms(xs: list[float], q: float | None = None) -> float | None:
    if not xs:
        return None
    if q is None:
        return max(xs) * 1000
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


class SimWorker:
    """One simulated worker's link to the master (see the module docstring)."""

    def __init__(self, bench: Bench, index: int, name: str, port: int, base: bytes,
                 digest: int | None = None, version: int = 0) -> None:
        self.bench = bench
        self.index = index
        self.name = name
        self.port = port
        self.base = base  # the inventory as first built
        self.base_digest = digest  # its digest (None: send none)
        self.version = version  # the version of its keys
        self.files = base.count(b"\n")
        self.extra: dict[str, bytes] = {}  # copies the master had made onto this worker
        self.dropped: set[str] = set()
        self.link: Link | None = None
        self.pending: Link | None = None
        self.incarnation: int | None = None
        self.failures = 0
        self.refused = False  # the last connect was refused (the master restarting)
        self.keep_away = False
        self.stopped = False
        self.running: dict[int, float] = {}
        self.retry_call: Any = None
        self.waiters: list[Deferred[None]] = []
        self.beat = LoopingCall(self.heartbeat)
        self.beat.clock = bench.reactor
        self.phase_call: Any = None
        self.first_beat_pending = False

    # -- life ---------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Connect and register; fires after the first heartbeat is answered."""
        d: Deferred[None] = Deferred()
        self.waiters.append(d)
        self.phase_call = self.bench.reactor.callLater(
            random.random(), lambda: self.beat.start(1.0, now=False))
        self.connect()
        return d

    def stop(self) -> None:
        self.stopped = True
        if self.phase_call is not None and self.phase_call.active():
            self.phase_call.cancel()
        if self.beat.running:
            self.beat.stop()
        if self.retry_call is not None and self.retry_call.active():
            self.retry_call.cancel()
        for link in (self.link, self.pending):
            if link is not None and link.transport is not None:
                link.transport.loseConnection()

    def drop_link(self) -> None:
        """Close the registered link (the master sees it close)."""
        if self.link is not None and self.link.transport is not None:
            self.link.transport.loseConnection()

    def inventory(self) -> bytes:
        if not self.extra and not self.dropped:
            return self.base
        lines = [
            line for line in self.base.splitlines()
            if line[8:18].decode() not in self.dropped
        ] if self.dropped else self.base.splitlines()
        lines += [v for k, v in self.extra.items() if k not in self.dropped]
        return b"\n".join(lines) + b"\n"

    def digest(self) -> int | None:
        """The digest of :meth:`inventory`, from the base's and the changes since (a
        dropped key is one it held: of the base unless it came as a copy)."""
        if self.base_digest is None:
            return None
        d = self.base_digest
        for key in self.dropped:
            if key not in self.extra and key.startswith("k/"):
                d ^= key_digest(int(key[2:]), self.version)
        for key, line in self.extra.items():
            if key not in self.dropped:
                entry = json.loads(line)
                d ^= entry_digest(entry["key"], entry["size"], entry["sha256"],
                                  entry["version"])
        return d

    def connect(self) -> None:
        self.retry_call = None
        if self.stopped or self.keep_away or self.link is not None or self.pending is not None:
            return
        link = Link(self, peer=True)
        self.pending = link
        d = connectProtocol(self.bench.endpoint(), link)
        d.addCallback(lambda _: self._register(link))
        d.addErrback(self._failed, link)

    def _register(self, link: Link) -> Deferred[None]:
        headers: dict[str, object] = {
            "Name": self.name,
            "Host": HOST,
            "Port": self.port,
            "Slots": 1,
            "Dsml-Version": __version__,
            "Protocol-Version": PROTOCOL_VERSION,
        }
        if self.running:
            headers["Running"] = ",".join(str(a) for a in self.running)
        digest = self.digest()
        if digest is not None:
            headers["Inventory-Digest"] = f"{digest:016x}"
        d = link.request("auth", {"Token": self.bench.token, "Client": f"worker {self.name}"})
        d.addCallback(lambda _: link.request("register", headers, self.inventory()))
        return d.addCallback(self._registered, link)

    def _registered(self, answer: tuple[Head, bytes], link: Link) -> None:
        self.pending = None
        if link.closed:
            self.schedule_retry()
            return
        self.link = link
        self.incarnation = int(answer[0].headers["incarnation"])
        self.failures = 0
        self.bench.registered[self.name] = time.monotonic()
        self.first_beat_pending = True
        self.heartbeat()

    def _failed(self, failure: Failure, link: Link) -> None:
        # Refused, or taken and dropped before the registration was answered (the
        # master's unauthenticated pool full): come back soon, as MasterLink does.
        self.refused = not failure.check(Refused) or failure.value.code in ("busy",
                                                                          "unavailable")
        why = (failure.value.code if failure.check(Refused)
               else type(failure.value).__name__)
        self.bench.failed.setdefault(self.bench.phase, Counter())[why] += 1
        if self.pending is link:
            self.pending = None
        if link.transport is not None and not link.closed:
            link.transport.loseConnection()
        self.schedule_retry()

    def on_lost(self, link: Link) -> None:
        if link is self.link:
            self.link = None
            self.incarnation = None
            self.schedule_retry()

    def schedule_retry(self) -> None:
        if self.stopped or self.keep_away:
            return
        if self.retry_call is not None and self.retry_call.active():
            return
        self.failures += 1
        delay = RETRY(self.failures)
        if self.refused:  # as MasterLink._retry_delay
            delay = min(delay, RETRY_REFUSED_MAX - RETRY_INITIAL + RETRY(0))
        self.retry_call = self.bench.reactor.callLater(delay, self.connect)

    # -- heartbeats -----------------------------------------------------------------------

    def heartbeat(self) -> None:
        link, inc = self.link, self.incarnation
        if link is None or inc is None:
            return
        sent = time.monotonic()
        d = link.request("heartbeat", {
            "Name": self.name,
            "Incarnation": inc,
            "Free-Slots": 0 if self.running else 1,
            "Stored-Bytes": self.files * KEY_SIZE,
            "Stored-Files": self.files,
            "Free-Disk": FREE_DISK,
        })

        def answered(_: object) -> None:
            self.bench.beat_rtt(time.monotonic() - sent)
            if self.first_beat_pending:
                self.first_beat_pending = False
                waiters, self.waiters = self.waiters, []
                for w in waiters:
                    w.callback(None)

        def failed(f: Failure) -> None:
            if f.check(Refused) and f.value.code in ("not-registered", "stale-incarnation"):
                if link.transport is not None:
                    link.transport.loseConnection()

        d.addCallbacks(answered, failed)

    # -- orders ---------------------------------------------------------------------------

    def on_order(self, link: Link, head: Head, payload: bytes) -> None:
        method = head.kind
        orders = self.bench.orders
        orders[method] = orders.get(method, 0) + 1
        h = head.headers
        if method in ("replicate", "drop"):
            self.bench.last_order_at = time.monotonic()
        if method == "replicate":
            self.bench.replicate_times.append(time.monotonic())
            try:
                target = self.bench.by_port.get(int(h["to"].rpartition(":")[2]))
                key, version = h["key"], int(h["version"])
                if target is not None and key.startswith("k/"):
                    target.extra[key] = key_line(int(key[2:]), version)
                    target.files += 1
            except (KeyError, ValueError):
                pass
            link.answer(head.id)
        elif method == "drop":
            self.dropped.add(h.get("key", ""))
            link.answer(head.id)
        elif method == "verify":
            link.answer(head.id, {"Good": 1})
        elif method == "run":
            self.running[int(h["attempt"])] = time.monotonic()
            link.answer(head.id)
        elif method == "kill":
            attempt = int(h["attempt"])
            link.answer(head.id)
            started = self.running.pop(attempt, None)
            if started is not None and self.incarnation is not None:
                result = {"attempt_id": attempt, "exit_code": None, "signal": 15,
                          "duration": time.monotonic() - started, "peak_rss": 0,
                          "reason": "killed"}
                link.request(
                    "task_result", {"Name": self.name, "Incarnation": self.incarnation},
                    json.dumps(result).encode() + b"\n",
                ).addErrback(lambda f: None)
        else:  # ping, and anything new: OK
            link.answer(head.id)


class Probe:
    """A client connection to the master: one ``ping`` every 10 ms, one at a time."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.link: Link | None = None
        self.loop: LoopingCall | None = None
        self.busy = False

    async def open(self) -> Link:
        link = Link(self, peer=False)
        await connectProtocol(self.bench.endpoint(), link)
        await link.request("auth", {"Token": self.bench.token, "Client": "scale-probe"})
        self.link = link
        return link

    def on_lost(self, link: Link) -> None:
        pass

    def on_order(self, link: Link, head: Head, payload: bytes) -> None:
        pass

    def start(self, phase: str) -> None:
        rtts = self.bench.probes.setdefault(phase, [])

        def tick() -> None:
            if self.busy or self.link is None or self.link.closed:
                return
            self.busy = True
            sent = time.monotonic()

            def done(_: object) -> None:
                self.busy = False
                rtts.append(time.monotonic() - sent)

            self.link.request("ping", {}).addBoth(done)

        self.loop = LoopingCall(tick)
        self.loop.clock = self.bench.reactor
        self.loop.start(PROBE_INTERVAL, now=True)

    async def finish(self) -> None:
        """Stop pinging; wait (bounded) for the ping in flight."""
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        for _ in range(3000):
            if not self.busy:
                break
            await sleep(self.bench.reactor, 0.01)

    def close(self) -> None:
        if self.link is not None and self.link.transport is not None:
            self.link.transport.loseConnection()


def sleep(reactor: Any, seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def until(reactor: Any, cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        await sleep(reactor, 0.02)


class LagReader:
    """The master's own reactor-lag probe, read from the ``Lag-Worst-Ms`` header of its
    ``nodes`` answer at the start and at the end of a phase, on a connection of its own.

    That figure is the worst since the master started: when it rose during the phase,
    the phase holds the master's worst stall so far and the figure is exact; when it did
    not, the phase's worst was at most that.  (``Lag-Recent-Worst-Ms`` is no help here:
    it covers the last 100 runs of the probe, which span minutes when the reactor is
    stalled for seconds at a time.)
    """

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.link: Link | None = None
        self.first: float | None = None
        self.last: float | None = None
        self.repair: tuple[Any, Any] = (None, None)
        #: ``Repair-Cpu-Ms`` (the repairer's passes' CPU since start) at start and end.
        self.repair_cpu: list[float | None] = []
        #: (``Gc-Full``, ``Gc-Full-Ms``, ``Gc-Worst-Ms``) at each reading.
        self.gc: list[tuple[float, float, float] | None] = []

    async def read(self) -> float | None:
        """One reading of ``Lag-Worst-Ms`` (None when the master has no such header)."""
        if self.link is None:
            link = Link(self, peer=False)
            await connectProtocol(self.bench.endpoint(), link)
            await link.request("auth", {"Token": self.bench.token, "Client": "scale-lag"})
            self.link = link
        head, _ = await self.link.request("nodes", {})
        self.repair = (head.headers.get("repair-pending"), head.headers.get("repair-scanning"))
        cpu_ms = head.headers.get("repair-cpu-ms")
        self.repair_cpu.append(None if cpu_ms is None else float(cpu_ms))
        gc = [head.headers.get(h) for h in ("gc-full", "gc-full-ms", "gc-worst-ms")]
        self.gc.append(None if None in gc else (float(gc[0]), float(gc[1]), float(gc[2])))
        value = head.headers.get("lag-worst-ms")
        return None if value is None else float(value)

    async def repair_busy(self) -> bool | None:
        """Whether the master's repairer has keys waiting or a walk under way (its
        ``Repair-Pending`` and ``Repair-Scanning``; None if it does not say)."""
        await self.read()
        pending, scanning = self.repair
        if pending is None or scanning is None:
            return None
        return int(pending) > 0 or int(scanning) > 0

    def close(self) -> None:
        if self.link is not None and self.link.transport is not None:
            self.link.transport.loseConnection()

    async def start(self) -> None:
        self.first = await self.read()

    async def finish(self) -> tuple[float | None, bool]:
        """The master's worst lag so far and whether it rose during the phase."""
        self.last = await self.read()
        if self.link is not None and self.link.transport is not None:
            self.link.transport.loseConnection()
        if self.last is None:
            return None, False
        return self.last, self.first is None or self.last > self.first

    def on_lost(self, link: Link) -> None:
        pass

    def on_order(self, link: Link, head: Head, payload: bytes) -> None:
        pass


# -- the run --------------------------------------------------------------------------------


@attrs.define
class Settings:
    workers: int
    keys: int
    array: int
    steady: float
    repair_window: float
    heartbeat_timeout: float | None
    #: The simulated workers send ``Inventory-Digest`` with their registrations.
    digest: bool = True
    #: Where the restarted master's cProfile stats go (None: not profiled).
    profile_restart: str | None = None


@attrs.define
class Results:
    load_seconds: float = 0.0
    load_orders: tuple[int, int] = (0, 0)
    repair_start_s: float | None = None
    loaded: int = 0
    rss_mib: float | None = None
    hwm_after_load_mib: float | None = None
    hwm_mib: float | None = None
    steady: Window = attrs.Factory(Window)
    submit: Window = attrs.Factory(Window)
    submit_seconds: float | None = None
    submit_dispatched: int = 0
    submit_error: str | None = None
    repair: Window = attrs.Factory(Window)
    repair_copies: int = 0
    repair_first_copy_s: float | None = None
    restart_down_s: float | None = None
    restart_start_s: float | None = None
    rereg_from_listen_s: float | None = None
    rereg_from_term_s: float | None = None
    rereg_spread_s: float | None = None
    #: Registrations after the restart, seconds from listening: first, 10%, 50%, 90%, last.
    rereg_quantiles: list[float] = attrs.Factory(list)
    #: Registration tries that failed after the restart, by why.
    rereg_failed: dict[str, int] = attrs.Factory(dict)
    rss_after_restart_mib: float | None = None
    registered_after: int = 0


def key_holders(n: int, k: int) -> list[list[int]]:
    """Which keys each worker holds: key i on worker i % n and on a second one that
    varies with i // n (so a dead worker's keys have their other copies all over)."""
    held: list[list[int]] = [[] for _ in range(n)]
    for i in range(k):
        a = i % n
        held[a].append(i)
        if n > 1:
            held[(a + 1 + (i // n) % (n - 1)) % n].append(i)
    return held


def build_inventories(held: list[list[int]], version: int) -> list[bytes]:
    """Each worker's inventory payload (JSON lines)."""
    return [b"\n".join(key_line(i, version) for i in keys) + b"\n" if keys else b""
            for keys in held]


def key_digest(i: int, version: int) -> int:
    """Key ``i``'s entry in an inventory digest (as the line key_line makes)."""
    return entry_digest(key_name(i), KEY_SIZE, f"{i:064x}", version)


def build_digests(held: list[list[int]], version: int) -> list[int]:
    """Each worker's inventory digest (dsml.protocol.inventory.inventory_digest), as the
    real worker would send it beside its inventory."""
    out = []
    for keys in held:
        d = 0
        for i in keys:
            d ^= key_digest(i, version)
        out.append(d)
    return out


def preload_state(state_dir: Path, names: Sequence[str], held: list[list[int]]) -> int:
    """Write the master's directory before it first starts, as a master that has run a
    while keeps it: every worker's copies (the very ``reconcile`` a registration runs)
    and the workers themselves.  Returns the version every key carries (issued here).

    Loading a million keys through registrations instead is what ``--no-preload`` does;
    on today's master that is slow (its repair loop scans the whole directory every
    pass), and it is not one of the figures.
    """
    from dsml.master.directory import Directory
    from dsml.master.state import MasterState

    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    state = MasterState(state_dir / "master.sqlite3", synchronous="NORMAL")
    try:
        version = state.issue_version()
        directory = Directory(state)
        with state.transaction():
            for i, name in enumerate(names):
                entries = [(key_name(j), KEY_SIZE, f"{j:064x}", version) for j in held[i]]
                result = directory.reconcile(name, entries)
                if result.rejected:
                    raise RuntimeError(f"preload: {name}: {result.rejected[0]}")
                state.record_worker(name, state.next_incarnation(name), HOST, fake_port(i), 1)
    finally:
        state.close()
    return version


def fake_port(index: int) -> int:
    """The storage port a simulated worker registers (nobody dials it; unique)."""
    return 20000 + index % 40000


def master_pid(cluster: LocalCluster) -> int:
    return cluster.procs["master"].pid


def rss_mib(pid: int, field: str) -> float | None:
    kib = proc_status_kib(pid, field)
    return None if kib is None else kib / 1024


async def measure_window(
    bench: Bench, cluster: LocalCluster, phase: str, seconds: float, probe: bool,
    during: Callable[[], Deferred[Any]] | None = None,
) -> Window:
    """Run phase ``phase`` for ``seconds`` (and until ``during`` is done): CPU, round trips."""
    reactor = bench.reactor
    pid = master_pid(cluster)
    bench.phase = phase
    bench.lag.reset_worst()
    lag = LagReader(bench)
    await lag.start()
    p: Probe | None = None
    if probe:
        p = Probe(bench)
        await p.open()
        p.start(phase)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    if during is not None:
        await during()
    left = seconds - (time.monotonic() - t0)
    if left > 0:
        await sleep(reactor, left)
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    own = bench.lag.worst * 1000
    w = Window(seconds=t1 - t0, cpu_pct=100 * (cpu1 - cpu0) / (t1 - t0), own_lag_ms=own)
    if p is not None:
        await p.finish()
        rtts = bench.probes.get(phase, [])
        w.probe_worst_ms, w.probe_p99_ms, w.probe_n = _ms(rtts), _ms(rtts, 0.99), len(rtts)
        p.close()
    w.master_lag_ms, w.master_lag_rose = await lag.finish()
    first, last = lag.repair_cpu[0], lag.repair_cpu[-1]
    if first is not None and last is not None:
        w.repair_cpu_pct = 100 * (last - first) / 1000 / (t1 - t0)
    gc0, gc1 = lag.gc[0], lag.gc[-1]
    if gc0 is not None and gc1 is not None:
        w.gc_full, w.gc_full_ms, w.gc_worst_ms = int(gc1[0] - gc0[0]), gc1[1] - gc0[1], gc1[2]
    beats = bench.beats.get(phase, [])
    w.beat_worst_ms, w.beat_median_ms, w.beat_n = _ms(beats), _ms(beats, 0.5), len(beats)
    return w


async def bootstrap_version(bench: Bench, name: str) -> int:
    """Register ``name`` empty, heartbeat, ``place`` once: the version every key carries."""
    w = SimWorker(bench, 0, name, fake_port(0), b"")
    await w.start()
    p = Probe(bench)
    link = await p.open()
    head, _ = await link.request("place", {"Key": "bench/scale/bootstrap", "Size": 1})
    p.close()
    w.stop()
    return int(head.headers["version"])


def submit_helper(cluster: LocalCluster, m: int) -> dict[str, Any]:
    """Submit ``true`` as an M-task array through ClusterClient, in a helper process."""
    host, port = cluster.address("master")
    code = (
        "import json, os, sys, time\n"
        "from dsml.client import ClusterClient\n"
        f"c = ClusterClient({host!r}, {port}, os.environ['DSML_TOKEN'], timeout=900.0,"
        " name='bench-scale')\n"
        "t = time.monotonic()\n"
        f"job = c.submit(['true'], array={m}, max_attempts=1, name='scale')\n"
        "print(json.dumps({'job': job.id, 'seconds': time.monotonic() - t}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=600,
        env={**os.environ, "DSML_TOKEN": cluster.token},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"submit helper exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


async def run(
    reactor: Any, cluster: LocalCluster, s: Settings, r: Results,
    held: list[list[int]], version: int | None,
) -> None:
    bench = Bench(reactor, cluster.address("master")[1], cluster.token)
    bench.lag.start()
    names = list(cluster.worker_names)
    n = len(names)
    workers: list[SimWorker] = []
    try:
        if version is None:
            note("issuing a version (one worker registers empty, one place)")
            version = await bootstrap_version(bench, names[0])
        note(f"building {n:,} inventories")
        inventories = build_inventories(held, version)
        digests = build_digests(held, version) if s.digest else [None] * n
        workers = [SimWorker(bench, i, names[i], fake_port(i), inventories[i],
                             digests[i], version)
                   for i in range(n)]
        del inventories
        for w in workers:
            bench.by_port[w.port] = w

        # 1. registration of every worker, with its inventory
        note(f"registering {n:,} workers ({LOAD_CONCURRENCY} at a time)")
        t0 = time.monotonic()
        sem = DeferredSemaphore(LOAD_CONCURRENCY)
        started = [sem.run(w.start) for w in workers]
        try:
            await until(reactor, lambda: all(d.called for d in started), LOAD_MAX,
                        "every worker to register")
        except RuntimeError as e:  # measure what there is, and say so
            note(str(e))
        r.load_seconds = time.monotonic() - t0
        r.loaded = sum(1 for d in started if d.called)
        pid = master_pid(cluster)
        # While the workers come in one by one, keys with one holder so far are copied
        # (at the repair's pace) and the surplus trimmed once the other holder is in:
        # let that settle before anything is measured.
        note("waiting for the loading's copies and trims to settle (no order for 3 s)")
        await sleep(reactor, 3.0)
        try:
            await until(reactor, lambda: time.monotonic() - bench.last_order_at > 3.0,
                        SETTLE_MAX, "the copies and trims of the loading to settle")
        except RuntimeError as e:
            note(str(e))
        r.load_orders = (bench.orders.get("replicate", 0), bench.orders.get("drop", 0))
        r.rss_mib = rss_mib(pid, "VmRSS")
        r.hwm_after_load_mib = rss_mib(pid, "VmHWM")
        note(f"{r.loaded:,} of {n:,} registered in {r.load_seconds:.1f} s; master RSS "
             f"{fmt(r.rss_mib)} MiB")

        # The master's start-up repair pass (one walk of the directory in SQL slices,
        # once its start's grace has passed) is a start-up cost, not a steady one: the
        # steady window begins once the repairer says it has nothing under way.
        t1 = time.monotonic()
        reader = LagReader(bench)
        try:
            while time.monotonic() - t1 < SETTLE_MAX:
                if not await reader.repair_busy():
                    break
                await sleep(reactor, 0.5)
        finally:
            reader.close()
        r.repair_start_s = time.monotonic() - t1
        note(f"the master's start-up repair pass was over {r.repair_start_s:.1f} s later")

        # 2. steady heartbeats
        note(f"steady window: {s.steady:g} s of heartbeats")
        r.steady = await measure_window(bench, cluster, "steady", s.steady, probe=False)

        # 3. the array submit
        note(f"submitting a {s.array:,}-task array through ClusterClient")
        before = bench.orders.get("run", 0)
        submitted: dict[str, Any] = {}

        async def submit() -> None:
            try:
                submitted.update(await deferToThread(submit_helper, cluster, s.array))
            except Exception as e:  # measure the rest; the report says it failed
                note(f"the submit failed: {e}")
                submitted["error"] = str(e).splitlines()[0][:200]

        r.submit = await measure_window(
            bench, cluster, "submit", 2.0, probe=True,
            during=lambda: Deferred.fromCoroutine(_then_wait(reactor, submit(), 2.0)))
        r.submit_seconds = submitted.get("seconds")
        r.submit_error = submitted.get("error")
        r.submit_dispatched = bench.orders.get("run", 0) - before

        # 4. a dead worker's keys re-replicated
        victim = workers[n // 2]
        grace = s.heartbeat_timeout or 10.0
        note(f"closing {victim.name}'s link and keeping it away: {grace:g} s grace, then "
             f"{s.repair_window:g} s of repair")
        copies0 = len(bench.replicate_times)
        t_kill = time.monotonic()

        async def kill_victim() -> None:
            victim.keep_away = True
            victim.drop_link()

        r.repair = await measure_window(
            bench, cluster, "repair", grace + s.repair_window, probe=True,
            during=lambda: Deferred.fromCoroutine(kill_victim()))
        copies = bench.replicate_times[copies0:]
        r.repair_copies = len(copies)
        r.repair_first_copy_s = (copies[0] - t_kill) if copies else None

        # 5. master restart: every worker (the victim too) registers again
        note("restarting the master (SIGTERM, start again on the same port)")
        bench.phase = "restart"
        bench.registered.clear()
        victim.keep_away = False
        victim.failures = 0
        hwm_before = rss_mib(master_pid(cluster), "VmHWM")
        t_term = time.monotonic()
        await deferToThread(cluster.kill, "master", signal.SIGTERM)
        t_down = time.monotonic()
        victim.connect()
        if s.profile_restart:
            cluster.twistd_options["master"] = [
                "--profile", str(Path(s.profile_restart).resolve()), "--profiler", "cprofile",
                "--savestats"]
        await deferToThread(cluster.start, "master", 120.0)
        t_listen = time.monotonic()
        bench.phase = "reregister"  # (tries failed before this: the master was down)
        r.restart_down_s = t_down - t_term
        r.restart_start_s = t_listen - t_down
        try:
            await until(reactor, lambda: len(bench.registered) >= n, REREG_MAX,
                        "every worker to register again")
        except RuntimeError as e:
            note(str(e))
        r.registered_after = len(bench.registered)
        if bench.registered:
            last, first = max(bench.registered.values()), min(bench.registered.values())
            if r.registered_after >= n:
                r.rereg_from_listen_s = last - t_listen
                r.rereg_from_term_s = last - t_term
            r.rereg_spread_s = last - first
            after = sorted(t - t_listen for t in bench.registered.values())
            r.rereg_quantiles = [after[min(len(after) - 1, int(q * len(after)))]
                                 for q in (0.0, 0.1, 0.5, 0.9, 1.0)]
        r.rereg_failed = dict(bench.failed.get("reregister", {}))
        await sleep(reactor, 1.0)
        pid = master_pid(cluster)
        r.rss_after_restart_mib = rss_mib(pid, "VmRSS")
        r.hwm_mib = max(x for x in (r.hwm_after_load_mib, hwm_before, rss_mib(pid, "VmHWM"))
                        if x is not None)
    finally:
        for w in workers:
            w.stop()
        bench.lag.stop()
        await sleep(reactor, 0.2)


async def _then_wait(reactor: Any, coro: Any, seconds: float) -> None:
    await coro
    await sleep(reactor, seconds)


def write_config(cluster: LocalCluster, s: Settings) -> None:
    """Fix the master's port (workers redial it after a restart) and raise the limits
    that N workers from one address would hit (see the module docstring)."""
    config = yaml.safe_load(cluster.config_path.read_text())
    config["master"]["port"] = free_port()
    known = {f.name for f in attrs.fields(Limits)}
    limits: dict[str, object] = {}
    if "max_connections" in known:
        limits["max_connections"] = max(1024, s.workers + 64)
    if "max_unauthenticated_per_host" in known:
        limits["max_unauthenticated_per_host"] = Limits().max_unauthenticated
    if limits:
        config.setdefault("limits", {}).update(limits)
    if s.heartbeat_timeout is not None:
        config["cluster"]["heartbeat_timeout"] = s.heartbeat_timeout
    cluster.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def report(s: Settings, r: Results) -> None:
    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x:,.1f} ms"

    def lag_text(w: Window) -> str:
        if w.master_lag_ms is None:
            return "n/a"
        if w.master_lag_rose:
            return ms(w.master_lag_ms)
        return f"<= {ms(w.master_lag_ms)}"

    def under(x: float | None, target: float) -> str:
        return verdict(None if x is None else x < target)

    def stall_ms(w: Window) -> float | None:
        """The ping's worst, or the master's own worst lag if it rose in the phase
        and is the higher."""
        if w.master_lag_ms is not None and w.master_lag_rose:
            return max(w.master_lag_ms, w.probe_worst_ms or 0.0)
        return w.probe_worst_ms

    def stall(w: Window) -> str:
        return f"ping {ms(w.probe_worst_ms)}, lag {lag_text(w)}"

    rows = [
        [ROW_RSS, f"{fmt(r.rss_mib)} MiB", f"< {TARGET_RSS_MIB:,} MiB",
         under(r.rss_mib, TARGET_RSS_MIB)],
        [ROW_HWM, f"{fmt(r.hwm_mib)} MiB", f"< {TARGET_RSS_MIB:,} MiB",
         under(r.hwm_mib, TARGET_RSS_MIB)],
        [ROW_BEATS, f"{fmt(r.steady.cpu_pct, 1)} % of a core", "(printed)", ""],
        [ROW_CPU, f"{fmt(r.steady.repair_cpu_pct, 2)} % of a core", f"< {TARGET_CPU_PCT:g} %",
         under(r.steady.repair_cpu_pct, TARGET_CPU_PCT)],
        [ROW_SUBMIT, stall(r.submit), f"< {TARGET_STALL_MS:g} ms",
         under(stall_ms(r.submit), TARGET_STALL_MS)],
        [ROW_REPAIR, stall(r.repair), f"< {TARGET_STALL_MS:g} ms",
         under(stall_ms(r.repair), TARGET_STALL_MS)],
        [ROW_REREG, "n/a" if r.rereg_from_listen_s is None else f"{r.rereg_from_listen_s:.2f} s",
         f"< {TARGET_REREG_S:g} s", under(r.rereg_from_listen_s, TARGET_REREG_S)],
    ]
    say()
    say(f"the master at scale: {s.workers:,} simulated workers at 1 Hz, {s.keys:,} keys x 2 "
        f"replicas, a {s.array:,}-task array")
    say(table(["measure", "figure", "target", "verdict"], rows))
    say()
    say("  stall: ping = the worst round trip of a ping every 10 ms on a connection of its")
    say("    own; lag = the master's own reactor-lag probe (Lag-Worst-Ms of its nodes answer,")
    say("    the worst since it started): exact when it rose during the phase, else '<='; the")
    say("    verdict is on the higher of ping and an exact lag")
    say("  details (heartbeats are the simulated workers' own round trips):")
    say(f"  - loading: {r.loaded:,} of {s.workers:,} workers registered with their "
        f"inventories in {r.load_seconds:.1f} s ({LOAD_CONCURRENCY} in flight), meanwhile "
        f"{r.load_orders[0]:,} copies and {r.load_orders[1]:,} trims ordered (keys whose "
        f"other holder was not in yet); VmHWM then {fmt(r.hwm_after_load_mib)} MiB; RSS "
        f"after the restart and re-registration {fmt(r.rss_after_restart_mib)} MiB")
    say(f"  - start-up repair pass (one walk of the directory after the start's grace): "
        f"over {fmt(r.repair_start_s, 1)} s after the loading settled; the steady window "
        "began then")
    for label, w in (("steady", r.steady), ("submit", r.submit), ("repair", r.repair)):
        parts = [f"{w.seconds:.1f} s", f"master CPU {fmt(w.cpu_pct, 1)} % of a core",
                 f"of which repair passes {fmt(w.repair_cpu_pct, 2)} %"]
        if w.probe_n:
            parts.append(f"probe worst {ms(w.probe_worst_ms)}, p99 {ms(w.probe_p99_ms)} "
                         f"({w.probe_n:,} pings)")
        parts.append(f"heartbeat RTT worst {ms(w.beat_worst_ms)}, median "
                     f"{ms(w.beat_median_ms)} ({w.beat_n:,} beats)")
        if w.master_lag_ms is not None:
            parts.append(f"the master's own lag probe worst {lag_text(w)}")
        if w.gc_full is not None:
            parts.append(f"the master's full collections {w.gc_full} taking "
                         f"{ms(w.gc_full_ms)} (its longest collection since start "
                         f"{ms(w.gc_worst_ms)})")
        parts.append(f"this process's own reactor lag worst {ms(w.own_lag_ms)}")
        say(f"  - {label}: " + "; ".join(parts))
    say(f"  - submit: {fmt(r.submit_seconds, 2)} s for the client; {r.submit_dispatched:,} "
        "run orders dispatched (1 slot per worker)"
        + (f"; FAILED: {r.submit_error}" if r.submit_error else ""))
    first = "none" if r.repair_first_copy_s is None else f"{r.repair_first_copy_s:.1f} s"
    say(f"  - repair: {r.repair_copies:,} copies ordered in the window (of about "
        f"{2 * s.keys // max(1, s.workers):,} keys the dead worker held); first one "
        f"{first} after its link closed (grace {s.heartbeat_timeout or 10.0:g} s)")
    say(f"  - restart: SIGTERM to exit {fmt(r.restart_down_s, 2)} s, start to listening "
        f"{fmt(r.restart_start_s, 2)} s; {r.registered_after:,} of {s.workers:,} registered "
        f"again, {fmt(r.rereg_from_term_s, 2)} s after the SIGTERM, first to last "
        f"{fmt(r.rereg_spread_s, 2)} s (workers redial with the real backoff: at most "
        f"{RETRY_REFUSED_MAX:g} s plus up to {RETRY_JITTER:g} s of jitter while refused "
        "or dropped)"
        + ("; with Inventory-Digest" if s.digest else "; without Inventory-Digest")
        + "; registered after listening (first, 10%, 50%, 90%, last): "
        + (", ".join(f"{x:.2f}" for x in r.rereg_quantiles) or "n/a") + " s"
        + "; tries that failed once it listened: "
        + (", ".join(f"{n:,} {why}" for why, n in sorted(r.rereg_failed.items())) or "none"))
    missed = [row[0] for row in rows if row[3] == "NOT met"]
    say(f"  targets missed: {', '.join(missed) if missed else 'none'}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the master at scale, with simulated workers")
    p.add_argument("--workers", type=int, help="simulated workers (default 1,000)")
    p.add_argument("--keys", type=int, help="keys in the directory (default 1,000,000)")
    p.add_argument("--array", type=int, help="tasks of the submitted array (default 100,000)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 50 workers, 20,000 keys, 2,000 tasks, short windows")
    p.add_argument("--window", type=float,
                   help="seconds of the steady window and of the repair's after its grace "
                        "(default 20 and 30; --quick 5 and 5)")
    p.add_argument("--profile-restart", metavar="FILE",
                   help="run the restarted master under cProfile, stats to FILE (a profile "
                        "of its start and the re-registration; slower: not a figure)")
    p.add_argument("--tmpdir", help="parent of the scratch directory (default: $TMPDIR or /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (logs)")
    p.add_argument("--no-digest", action="store_true",
                   help="register without Inventory-Digest (as a worker of an older dsml does)")
    p.add_argument("--no-preload", action="store_true",
                   help="load the keys through the registrations alone (slow at scale)")
    args = p.parse_args(argv)
    q = args.quick
    s = Settings(
        workers=args.workers or (50 if q else 1000),
        keys=args.keys if args.keys is not None else (20_000 if q else 1_000_000),
        array=args.array or (2_000 if q else 100_000),
        steady=args.window if args.window is not None else (5.0 if q else 20.0),
        repair_window=args.window if args.window is not None else (5.0 if q else 30.0),
        heartbeat_timeout=3.0 if q else None,
        digest=not args.no_digest,
        profile_restart=args.profile_restart,
    )
    if s.workers < 2:
        p.error("--workers must be at least 2")
    say("dsml scale benchmark: one real master, simulated workers over real sockets")
    say(f"  command: {' '.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}")
    say(f"  machine: nproc={os.cpu_count()}, {cpu_model()}, Python "
        f"{platform.python_version()}, {platform.platform()}")
    tmp = Path(tempfile.mkdtemp(prefix="dsml-scale-bench-", dir=args.tmpdir))
    cluster: LocalCluster | None = None
    results = Results()
    failure: list[Failure] = []
    finished: list[bool] = []
    try:
        names = [f"w{i:05d}" for i in range(s.workers)]
        cluster = LocalCluster(tmp / "cluster", workers=names)
        write_config(cluster, s)
        note(f"placing {s.keys:,} keys x 2 replicas over {s.workers:,} workers")
        held = key_holders(s.workers, s.keys)
        version: int | None = None
        if not args.no_preload:
            note("preloading the master's directory (its state file, before it starts)")
            t = time.monotonic()
            version = preload_state(cluster.root / "master", names, held)
            note(f"preloaded in {time.monotonic() - t:.1f} s")
        note(f"starting the master ({s.workers:,} workers in its config)")
        cluster.start("master", timeout=300.0)

        from twisted.internet import reactor

        def go() -> None:
            d = Deferred.fromCoroutine(
                run(reactor, cluster, s, results, held, version))  # type: ignore[arg-type]
            d.addCallbacks(finished.append, failure.append)
            d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

        reactor.callWhenRunning(go)  # type: ignore[attr-defined]
        reactor.run()  # type: ignore[attr-defined]
    finally:
        if cluster is not None:
            cluster.stop()
            if failure or args.keep:
                note("master log tail:\n" + cluster.tail("master", 20))
        if args.keep:
            note(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if failure:
        failure[0].printTraceback(file=sys.stderr)
        return 1
    if not finished:
        note("interrupted: no figures")
        return 1
    report(s, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
