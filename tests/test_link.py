"""A worker's link to the master (MasterLink) on a fake clock, against a scripted master
over the simulated network: backoff, registration, heartbeats that cannot die."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from dsml.errors import DsmlError
from dsml.net.connection import Connection
from dsml.net.responders import NO_REQUESTS, Reply, Responders, responder
from dsml.net.server import ServerFactory
from dsml.protocol.codec import Head
from dsml.protocol.methods import MethodTable, Role, master_methods
from dsml.testing.sim import FailureLog, FakeNetwork
from dsml.worker.link import (
    RETRY_FACTOR,
    RETRY_INITIAL,
    RETRY_JITTER,
    RETRY_MAX,
    RETRY_REFUSED_MAX,
    MasterLink,
    WorkerInfo,
)
from dsml.worker.store import IndexEntry

TOKEN = "t0ken"
INTERVAL = 1.0
_WORKER = {Role.WORKER}


class FakeMaster:
    """Answers register, heartbeat and report as the test scripts it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        every = master_methods()
        self.methods = MethodTable(
            {n: every.specs[n] for n in ("auth", "register", "heartbeat", "report")}
        )
        self.seen: list[tuple[float, str, dict[str, str]]] = []
        self.incarnation = 0
        #: While set, registrations wait here until the test fires them.
        self.hold: list[tuple[Deferred[Reply], Reply]] | None = None
        #: Error codes to answer the next heartbeats with, in order.
        self.heartbeat_errors: list[str] = []
        #: Error codes to answer the next reports with, in order.
        self.report_errors: list[str] = []
        #: The payload of every report taken.
        self.reports: list[bytes] = []
        self.conns: list[Connection] = []

    def responders(self) -> Responders:
        return Responders(self.methods, self)

    def _note(self, head: Head) -> None:
        self.seen.append((self.clock.seconds(), head.kind, dict(head.headers)))

    @responder("register", roles=_WORKER)
    def _register(self, head: Head, payload: bytes, conn: Connection) -> Any:
        self._note(head)
        self.incarnation += 1
        self.conns.append(conn)
        reply = Reply({"Incarnation": self.incarnation})
        if self.hold is not None:
            d: Deferred[Reply] = Deferred()
            self.hold.append((d, reply))
            return d
        return reply

    @responder("heartbeat", roles=_WORKER)
    def _heartbeat(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        self._note(head)
        if self.heartbeat_errors:
            raise DsmlError("scripted refusal", self.heartbeat_errors.pop(0))
        return Reply()

    @responder("report", roles=_WORKER)
    def _report(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        self._note(head)
        if self.report_errors:
            raise DsmlError("scripted refusal", self.report_errors.pop(0))
        self.reports.append(payload)
        return Reply({"Taken": len(payload.splitlines()), "Refused": 0})

    def times(self, kind: str) -> list[float]:
        """When each request of ``kind`` arrived."""
        return [t for t, k, _ in self.seen if k == kind]

    def heartbeats(self) -> list[dict[str, str]]:
        """The headers of each heartbeat."""
        return [h for _, k, h in self.seen if k == "heartbeat"]


class FakeStore:
    """What MasterLink reads of a store; ``stored_bytes`` raises while ``broken`` > 0."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0
        self.broken = 0

    @property
    def stored_bytes(self) -> int:
        if self.broken:
            self.broken -= 1
            raise OSError("the disk went away for a moment")
        return 0

    def inventory(self) -> Iterator[Any]:
        return iter([])


@implementer(IStreamClientEndpoint)
class FlakyEndpoint:
    """Fails the first ``failures`` connects (refused, or with ``silent`` timed out: a
    host that does not answer), then dials through to ``inner``."""

    def __init__(self, clock: Clock, inner: Any, failures: int, silent: bool = False) -> None:
        self.clock = clock
        self.inner = inner
        self.failures = failures
        self.silent = silent
        self.attempts: list[float] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts.append(self.clock.seconds())
        if len(self.attempts) <= self.failures:
            if self.silent:
                return fail(TimeoutError("no answer"))
            return fail(ConnectionRefusedError("nobody home"))
        return self.inner.connect(factory)  # type: ignore[no-any-return]


class Rig:
    """A MasterLink, a FakeMaster listening on a FakeNetwork, one Clock."""

    def __init__(self, tmp_path: Path, failures: int = 0, silent: bool = False,
                 **link_kwargs: Any) -> None:
        self.clock = Clock()
        self.net = FakeNetwork(self.clock)
        self.master = FakeMaster(self.clock)
        self.net.listen(
            "master:7000",
            ServerFactory(self.master.responders(), self.clock, TOKEN, two_way=True),
            "master",
        )
        self.store = FakeStore(tmp_path)
        self.endpoint = FlakyEndpoint(
            self.clock, self.net.endpoint_for("w1")("master", 7000), failures, silent
        )
        self.link = MasterLink(
            clock=self.clock,
            endpoint=self.endpoint,
            token=TOKEN,
            info=WorkerInfo("w1", "w1", 7001, 2),
            store=self.store,  # type: ignore[arg-type]
            orders=NO_REQUESTS,
            heartbeat_interval=INTERVAL,
            free_disk=lambda: 10**9,
            **link_kwargs,
        )

    def advance(self, seconds: float, step: float = 0.05) -> None:
        self.net.flush()
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.net.flush()

    def next_call(self) -> None:
        """Advance exactly to the next scheduled call, then flush."""
        when = min(c.getTime() for c in self.clock.getDelayedCalls())
        self.clock.advance(max(0.0, when - self.clock.seconds()))
        self.net.flush()


@pytest.fixture
def failures() -> Iterator[FailureLog]:
    log = FailureLog()
    globalLogPublisher.addObserver(log)
    yield log
    globalLogPublisher.removeObserver(log)


def test_reconnects_with_growing_capped_backoff(tmp_path: Path, failures: FailureLog) -> None:
    """Connects that get no answer are retried after delays that grow by RETRY_FACTOR up
    to RETRY_MAX (plus under RETRY_JITTER of jitter each); the first connect that works
    registers."""
    n = 9
    rig = Rig(tmp_path, failures=n, silent=True)
    rig.link.startService()
    rig.net.flush()
    while len(rig.endpoint.attempts) <= n:
        rig.next_call()
    rig.net.flush()
    assert rig.link.incarnation == 1
    attempts = rig.endpoint.attempts
    assert len(attempts) == n + 1
    delays = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    for i, delay in enumerate(delays, start=1):
        base = min(RETRY_INITIAL * RETRY_FACTOR**i, RETRY_MAX)
        assert base - 1e-9 <= delay < base + RETRY_JITTER, (i, delay)
    bases = [min(RETRY_INITIAL * RETRY_FACTOR**i, RETRY_MAX) for i in range(1, n + 1)]
    assert bases == sorted(bases) and bases[-1] == RETRY_MAX and bases[0] < 1
    assert max(delays) < RETRY_MAX + RETRY_JITTER
    assert failures.messages() == []
    rig.link.stopService()


def test_backoff_without_jitter_is_exact(tmp_path: Path) -> None:
    """With the jitter taken out, the delays are exactly 0.2 * 1.5**n: 0.3, 0.45, ...,
    at most 5 s, while the master's host does not answer; while it refuses (its process
    restarting on that port) at most RETRY_REFUSED_MAX, so a crowd of workers finds a
    restarted master within about a second of its listening."""
    from twisted.application.internet import backoffPolicy

    for silent, expected in (
        (True, [0.3, 0.45, 0.675, 1.0125, 1.51875, 2.278125, 3.417188, 5.0, 5.0]),
        # Refused (the master's process restarting): never more than about a second.
        (False, [0.3, 0.45, 0.675, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ):
        rig = Rig(
            tmp_path,
            failures=9,
            silent=silent,
            retry_policy=backoffPolicy(RETRY_INITIAL, RETRY_MAX, RETRY_FACTOR,
                                       jitter=lambda: 0.0),
        )
        rig.link.startService()
        rig.net.flush()
        while len(rig.endpoint.attempts) <= 9:
            rig.next_call()
        attempts = rig.endpoint.attempts
        delays = [round(b - a, 6) for a, b in zip(attempts, attempts[1:], strict=False)]
        assert delays == expected, silent
        assert RETRY_REFUSED_MAX == 1.0
        rig.link.stopService()


def test_heartbeats_only_once_registered_then_every_interval(tmp_path: Path) -> None:
    """Nothing is sent before the registration is answered (however long that takes);
    from then on a heartbeat goes every interval, carrying the incarnation."""
    rig = Rig(tmp_path)
    rig.master.hold = []
    rig.link.startService()
    rig.advance(5)
    assert rig.master.times("register") == [0.0]
    assert rig.master.times("heartbeat") == []
    assert rig.link.incarnation is None
    d, reply = rig.master.hold.pop()
    rig.master.hold = None
    d.callback(reply)
    rig.net.flush()
    registered = rig.clock.seconds()
    assert rig.link.incarnation == 1
    rig.advance(10)
    beats = rig.master.times("heartbeat")
    assert beats[0] == pytest.approx(registered)  # at once: the master learns the disk
    gaps = [b - a for a, b in zip(beats[1:], beats[2:], strict=False)]
    assert len(beats) >= 10
    assert all(g == pytest.approx(INTERVAL, abs=0.06) for g in gaps), gaps
    assert beats[1] - beats[0] <= INTERVAL + 0.06
    assert {h["incarnation"] for h in rig.master.heartbeats()} == {"1"}
    assert {h["name"] for h in rig.master.heartbeats()} == {"w1"}
    rig.link.stopService()


def test_a_raising_heartbeat_does_not_stop_the_loop(tmp_path: Path, failures: FailureLog) -> None:
    """The store raising while a heartbeat is built is logged once; the LoopingCall goes
    on and the next beats are sent."""
    rig = Rig(tmp_path)
    rig.link.startService()
    rig.advance(2.5)
    before = len(rig.master.heartbeats())
    rig.store.broken = 1
    rig.advance(5)
    assert rig.link._beat.running
    assert len(rig.master.heartbeats()) >= before + 4  # one beat lost, the rest sent
    assert len(failures.events) == 1
    assert "heartbeat failed" in failures.messages()[0]
    rig.link.stopService()


def test_not_registered_reply_makes_it_register_again(tmp_path: Path) -> None:
    """A heartbeat answered ``not-registered`` (the master declared the worker dead or
    restarted) drops the link; the worker reconnects and registers again, and its
    heartbeats then carry the new incarnation."""
    rig = Rig(tmp_path)
    rig.link.startService()
    rig.advance(2.5)
    first = rig.master.conns[0]
    assert rig.link.incarnation == 1
    rig.master.heartbeat_errors = ["not-registered"]
    rig.advance(1)
    assert first.transport.disconnected  # type: ignore[union-attr]
    rig.advance(3)
    assert rig.link.incarnation == 2
    assert rig.link.registrations == 2
    assert len(rig.master.conns) == 2
    rig.advance(3)
    last = rig.master.heartbeats()[-3:]
    assert {h["incarnation"] for h in last} == {"2"}
    rig.link.stopService()


def test_a_lost_link_forgets_the_registration_at_once(tmp_path: Path) -> None:
    """When the link to the master closes, the worker stops counting itself registered
    (no heartbeats or reports to a dead link) until it has registered again."""
    rig = Rig(tmp_path)
    rig.link.startService()
    rig.advance(1.5)
    assert rig.link.link is not None and rig.link.incarnation == 1
    rig.net.cut("master:7000")
    assert rig.link.link is None and rig.link.incarnation is None
    rig.advance(3)
    assert rig.link.incarnation == 2
    rig.link.stopService()


def test_link_lost_during_registration_is_retried(tmp_path: Path, failures: FailureLog) -> None:
    """A link that closes while the registration is in flight is retried like a refused
    connect, with nothing logged as a bug."""
    rig = Rig(tmp_path)
    rig.master.hold = []
    rig.link.startService()
    rig.advance(0.5)
    assert rig.master.times("register") == [0.0]
    rig.master.hold = None
    rig.net.cut("master:7000")
    rig.advance(3)
    assert rig.link.incarnation == 2
    assert failures.messages() == []
    rig.link.stopService()


def _entry(key: str, version: int) -> IndexEntry:
    return IndexEntry(key, "value", 3, "a" * 64, version, 0.0)


def test_a_write_while_the_registration_is_answered_is_reported_after_it(
    tmp_path: Path,
) -> None:
    """The store changes after the registration's inventory was taken but before the
    master's answer: the change is in neither unless it is kept and reported once the
    session opens (found by nemesis seed 23: a write replaced a copy in that window and
    the master never learnt of it)."""
    rig = Rig(tmp_path)
    rig.master.hold = []
    rig.link.startService()
    rig.advance(0.5)
    assert rig.master.times("register") == [0.0] and rig.link.incarnation is None
    rig.link.reports.report("store", _entry("k", 7))
    (d, reply), = rig.master.hold
    rig.master.hold = None
    d.callback(reply)
    rig.advance(0.5)
    assert rig.link.incarnation == 1
    assert [b'"key": "k"' in p for p in rig.master.reports] == [True]
    rig.link.stopService()


def test_what_changed_before_the_inventory_was_taken_is_not_reported_again(
    tmp_path: Path,
) -> None:
    """While unregistered, a change is not queued (the next inventory has it)."""
    rig = Rig(tmp_path, failures=2)
    rig.link.startService()
    rig.link.reports.report("store", _entry("before", 1))
    rig.advance(3)
    assert rig.link.incarnation == 1
    assert rig.master.reports == []
    rig.link.stopService()


def test_a_report_refused_on_a_live_link_makes_the_worker_register_again(
    tmp_path: Path,
) -> None:
    """A report the master did not take leaves its view of this worker wrong, and no
    registration is coming while the link stays up: the worker drops the link and
    registers again (its inventory says what the report would have)."""
    rig = Rig(tmp_path)
    rig.link.startService()
    rig.advance(1.5)
    assert rig.link.incarnation == 1
    rig.master.report_errors = ["busy"]
    rig.link.reports.report("store", _entry("k", 7))
    rig.advance(3)
    assert rig.link.incarnation == 2
    assert rig.master.reports == []  # the new registration's inventory covers it
    rig.link.stopService()


def test_the_registration_says_how_much_room_the_worker_has(tmp_path: Path) -> None:
    """``Free-Disk`` and ``Stored-Bytes`` go with the registration, so the master can
    place writes on the worker before its first heartbeat (a client that saw the worker
    alive was refused ``no-space`` in that moment)."""
    rig = Rig(tmp_path)
    rig.link.startService()
    rig.advance(0.5)
    (_, _, headers), = [s for s in rig.master.seen if s[1] == "register"]
    assert headers["free-disk"] == str(10**9) and headers["stored-bytes"] == "0"
    rig.link.stopService()


def test_a_master_that_drops_the_registration_is_redialled_soon(tmp_path: Path) -> None:
    """A master that takes the connect and drops it before answering the registration
    (its unauthenticated pool full of a crowd of workers after a restart) is up: the
    worker comes back within RETRY_REFUSED_MAX (plus the jitter) every time, instead of
    backing off towards RETRY_MAX."""
    rig = Rig(tmp_path)
    rig.master.hold = []
    rig.link.startService()
    rig.advance(0.1)
    for _ in range(8):
        assert len(rig.master.hold) == 1
        rig.master.hold = []
        rig.net.cut("master:7000")
        rig.advance(RETRY_REFUSED_MAX + RETRY_JITTER + 0.1)
    assert len(rig.master.times("register")) == 9
    rig.master.hold = None
    rig.net.cut("master:7000")
    rig.advance(RETRY_REFUSED_MAX + RETRY_JITTER + 0.1)
    assert rig.link.incarnation is not None
    rig.link.stopService()
