"""A worker's one long-lived link to the master (the seed's WorkerServer heartbeat).

Over it the worker authenticates, registers (name, storage address, slots, versions and
its full inventory, like an HDFS block report), sends a heartbeat every
``heartbeat_interval`` and batched reports of what it stored and deleted; the master
sends orders back down the same link (replicate a key to another worker, drop a surplus
copy, run or kill a task).  ``ClientService`` reconnects with backoff and the worker
registers again, getting a new incarnation from the master each time.

Each registration is a :class:`MasterSession`; the link tells its listeners of each new
one and of its loss, and they send on it: :class:`StoreReports` (what was stored and
deleted) and the worker's jobs (task results, :mod:`dsml.worker.runner`).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import __version__
from ..errors import DsmlError
from ..net.connection import Connection
from ..net.limits import Limits
from ..net.links import LinkFactory, tune_socket
from ..net.responders import Responders
from ..net.server import Response
from ..net.tls import PeerCheck
from ..net.twisted_private import forget_reconnecting_connection
from ..protocol.codec import PROTOCOL_VERSION
from ..protocol.inventory import HEADER as INVENTORY_HEADER
from ..protocol.inventory import format_digest, inventory_digest
from ..protocol.methods import Role
from .store import IndexEntry as Entry
from .store import Store

log = Logger()

#: Seconds a batch of store/delete reports may wait before it is sent.
REPORT_DELAY = 0.05

#: Changes kept while a registration is answered (its inventory lacks them); beyond
#: this many, the worker registers again instead.
REPORTS_MAX = 10_000

#: Reconnection backoff to the master: retry n waits RETRY_INITIAL * RETRY_FACTOR**n
#: seconds (0.3, 0.45, 0.68, 1.0, ...), at most RETRY_MAX, plus up to RETRY_JITTER s of
#: jitter so workers that lost the master together do not all come back in one burst
#: (backoffPolicy).  With 1 s of jitter and a factor of 2, the last of 1,000 workers
#: first dialled a restarted master about 2.5 s after it listened (issue #11): the
#: master now takes a crowd of registrations in batches with one commit, and a worker
#: whose inventory digest it knows costs a lookup, so a tighter spread is affordable.
RETRY_INITIAL = 0.2
RETRY_FACTOR = 1.5
RETRY_MAX = 5.0
RETRY_JITTER = 0.3

#: While the master's host refuses the connect (its process is down, as in a restart,
#: and will be back on that port), or takes it and drops it or says ``busy`` before the
#: registration is answered (a crowd of workers at once), a worker redials within about
#: this many seconds (plus the jitter) however long it has failed: such a failure costs
#: a round trip, and a restarted master has its workers back within about this long of
#: listening.  A host that does not answer at all keeps the backoff above, and so does a
#: registration the master refuses (forbidden, a version mismatch).
RETRY_REFUSED_MAX = 1.0


@attrs.frozen
class WorkerInfo:
    """What a worker says about itself when it registers."""

    name: str
    host: str
    port: int
    slots: int
    boot: str = ""
    #: Memory (bytes) and GPUs (ids) it offers tasks.
    mem: int = 0
    gpus: tuple[str, ...] = ()
    #: What its function tasks run with (:func:`dsml.fnrun.runtime`), "" if unknown.
    fn_runtime: str = ""


def inventory_payload(store: Store) -> tuple[bytes, str]:
    """The full inventory as JSON lines {key, size, sha256, version}, and its digest
    (the ``Inventory-Digest`` header, :mod:`dsml.protocol.inventory`)."""
    entries = list(store.inventory())
    lines = [
        json.dumps(
            {"key": e.key, "size": e.size, "sha256": e.sha256, "version": e.version},
            ensure_ascii=False,
        )
        for e in entries
    ]
    digest = inventory_digest((e.key, e.size, e.sha256, e.version) for e in entries)
    return (("\n".join(lines) + "\n").encode() if lines else b""), format_digest(digest)


@attrs.frozen
class MasterSession:
    """One registration with the master: the link it holds and the incarnation it got.

    Heartbeats, reports and task results are sent on it, carrying both.
    """

    link: Connection
    name: str
    incarnation: int
    #: The master's grant secret (hex), from the registration reply.
    grant_key: str = ""

    def request(
        self, method: str, payload: bytes = b"", headers: dict[str, object] | None = None
    ) -> Deferred[Response]:
        """Send ``method`` to the master as this registration (``Name``, ``Incarnation``)."""
        return self.link.request(
            method, {"Name": self.name, "Incarnation": self.incarnation, **(headers or {})},
            payload,
        )


#: Told of each new registration (a session) and of its loss (None).
SessionListener = Callable[[MasterSession | None], None]


class StoreReports:
    """What the store committed (stores, deletes), reported to the master in batches.

    A change made while the worker is not registered is not queued: the next
    registration's inventory says it.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._session: MasterSession | None = None
        self._reports: list[tuple[str, Entry]] = []
        self._report_call: Any = None
        #: A registration's inventory was taken and its answer has not come: changes
        #: from now on are not in it, so they wait for the session it opens.
        self._registering = False
        self._overflow = False

    def inventory_taken(self) -> None:
        """A registration is about to send the store's inventory: what was queued is in
        it; what changes from now until its session opens is not, and is kept."""
        self._reports = []
        self._registering = True
        self._overflow = False

    def session_changed(self, session: MasterSession | None) -> None:
        """A new registration (changes since its inventory was taken are sent now), or
        the link lost (the next registration's inventory covers everything)."""
        self._session = session
        self._registering = False
        if session is None:
            self._reports = []
            return
        if self._overflow:
            # More changed during the registration than a queue should hold: register
            # again, with an inventory that has them all.
            self._overflow, self._reports = False, []
            session.link.transport.loseConnection()  # type: ignore[union-attr]
            return
        if self._reports:
            self._schedule()

    def report(self, op: str, entry: Entry) -> None:
        """Queue a store or delete for the master; sent in batches."""
        if self._session is None and not self._registering:
            return  # the next registration's inventory says it
        if self._session is None and len(self._reports) >= REPORTS_MAX:
            self._overflow = True
            return
        # Encoded when sent, not here: this runs before the write is answered.
        self._reports.append((op, entry))
        if self._session is not None:
            self._schedule()

    def _schedule(self) -> None:
        if self._report_call is None or not self._report_call.active():
            self._report_call = self.clock.callLater(REPORT_DELAY, self._send_reports)

    def bad_copy(self, entry: Entry) -> Deferred[bool]:
        """Tell the master now that this worker's copy ``entry`` failed its re-hash and
        was forgotten (``bad_copy``); fires True if the master forgot it too, False if it
        had no such copy or the worker is not registered (the next registration's
        inventory lacks the copy: the master learns it then)."""
        session = self._session
        if session is None:
            d: Deferred[bool] = Deferred()
            d.callback(False)
            return d
        sent = session.request("bad_copy", headers={"Key": entry.key, "Version": entry.version})

        def failed(f: Failure) -> bool:
            log.info("bad_copy of {key!r} not taken ({f}); the next registration covers it",
                     key=entry.key, f=f.getErrorMessage())
            return False

        return sent.addCallbacks(lambda r: r.headers.get("forgotten") == "1", failed)

    def stop(self) -> None:
        """Send nothing more."""
        if self._report_call is not None and self._report_call.active():
            self._report_call.cancel()

    def _send_reports(self) -> None:
        reports, self._reports = self._reports, []
        session = self._session
        if not reports or session is None:
            return
        lines = [
            json.dumps(
                {"op": op, "key": e.key, "size": e.size, "sha256": e.sha256, "version": e.version},
                ensure_ascii=False,
            )
            for op, e in reports
        ]
        d = session.request("report", ("\n".join(lines) + "\n").encode())

        def failed(f: Failure) -> None:
            log.info("report not taken ({f}); the next registration covers it",
                     f=f.getErrorMessage())
            if self._session is session:
                # The link is still up, so no registration is coming by itself: start
                # one (its inventory says what this report would have).
                session.link.transport.loseConnection()  # type: ignore[union-attr]

        d.addErrback(failed)


@implementer(IStreamClientEndpoint)
class _Dialler:
    """The master's endpoint, noting whether the master is up and only turned the last
    try away (the connect refused here; a registration dropped or busy: MasterLink), so
    the next try should come soon (RETRY_REFUSED_MAX)."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint
        self.soon = False

    def connect(self, factory: Any) -> Deferred[Any]:
        def done(result: Any) -> Any:
            self.soon = isinstance(result, Failure) and bool(
                result.check(ConnectionRefusedError))
            return result

        return self.endpoint.connect(factory).addBoth(done)


class MasterLink(service.Service):
    """Keeps the worker registered with the master; heartbeats that cannot die.

    ``orders`` answers the master's requests down the link (the master may call them:
    the link trusts the peer it dialled as :attr:`Role.MASTER`).  ``reports`` and each
    of ``on_session`` hear of every registration and loss (:class:`MasterSession`).
    ``retry_policy`` maps the number of failed attempts to the delay before the next (a
    jittered exponential backoff by default; the simulation passes a seeded jitter so
    runs repeat exactly).
    """

    def __init__(
        self,
        *,
        clock: Any,
        endpoint: IStreamClientEndpoint,
        token: str | None,
        info: WorkerInfo,
        store: Store,
        orders: Responders,
        reports: StoreReports | None = None,
        heartbeat_interval: float = 1.0,
        free_slots: Callable[[], int] | None = None,
        free_disk: Callable[[], int] | None = None,
        retry_policy: Callable[[int], float] | None = None,
        running_attempts: Callable[[], list[int]] | None = None,
        on_session: SessionListener | None = None,
        peer_check: PeerCheck | None = None,
    ) -> None:
        self.clock = clock
        self.token = token
        self.info = info
        self.store = store
        self.heartbeat_interval = heartbeat_interval
        self.reports = reports if reports is not None else StoreReports(clock)
        self.free_slots = free_slots or (lambda: info.slots)
        #: Task attempts running here (told to the master at each registration).
        #: (Not ``running``: that is Service's own started flag.)
        self.running_attempts = running_attempts or (lambda: [])
        self._listeners: list[SessionListener] = [self.reports.session_changed]
        if on_session is not None:
            self._listeners.append(on_session)
        self.free_disk = free_disk or (lambda: shutil.disk_usage(store.root).free)
        self.link: Connection | None = None
        self.incarnation: int | None = None
        self.registrations = 0
        factory = LinkFactory(
            orders,
            clock,
            Limits(idle_timeout=max(60.0, 10 * heartbeat_interval)),
            peer_roles=frozenset({Role.MASTER}),
            on_lost=self._lost,
            # Over TLS the peer must hold the master's certificate: a worker's or a
            # user's, however valid, cannot send this worker orders.
            peer_check=peer_check,
        )
        self._policy = retry_policy or backoffPolicy(
            initialDelay=RETRY_INITIAL, maxDelay=RETRY_MAX, factor=RETRY_FACTOR,
            jitter=lambda: random.uniform(0.0, RETRY_JITTER))
        self._dialler = _Dialler(endpoint)
        self._client = ClientService(
            self._dialler,
            factory,
            retryPolicy=self._retry_delay,
            clock=clock,
            prepareConnection=self._register,
        )
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = clock

    def _retry_delay(self, failures: int) -> float:
        delay = self._policy(failures)
        if self._dialler.soon:
            # The first delay carries the policy's own jitter (seeded in simulations).
            delay = min(delay, RETRY_REFUSED_MAX - RETRY_INITIAL + self._policy(0))
        return delay

    # -- service ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._client.startService()
        self._beat.start(self.heartbeat_interval, now=False).addErrback(
            lambda f: log.failure("heartbeat loop stopped", f)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._beat.running:
            self._beat.stop()
        self.reports.stop()
        return self._client.stopService()

    def add_listener(self, listener: SessionListener) -> None:
        """Tell ``listener`` too of every registration and loss from now on."""
        self._listeners.append(listener)

    def whenRegistered(self) -> Deferred[Connection]:
        """Fires with the link once it is connected and registered."""
        return self._client.whenConnected()

    def _tell(self, session: MasterSession | None) -> None:
        for listener in self._listeners:
            try:
                listener(session)
            except Exception:
                log.failure("a listener of the master link failed")

    # -- registration -----------------------------------------------------------------

    def _register(self, link: Connection) -> Deferred[None]:
        """Authenticate and register; ClientService hands out the link only after."""
        tune_socket(link.transport)
        info = self.info
        headers: dict[str, object] = {
            "Name": info.name,
            "Host": info.host,
            "Port": info.port,
            "Slots": info.slots,
            "Dsml-Version": __version__,
            "Protocol-Version": PROTOCOL_VERSION,
        }
        if info.boot:
            headers["Boot"] = info.boot
        if info.mem:
            headers["Mem"] = info.mem
        if info.gpus:
            headers["Gpus"] = ",".join(info.gpus)
        if info.fn_runtime:
            headers["Fn-Runtime"] = info.fn_runtime
        running = self.running_attempts()
        if running:
            headers["Running"] = ",".join(str(a) for a in running)
        d = link.request("auth", {"Token": self.token or "", "Client": f"worker {info.name}"})
        def register(_: object) -> Deferred[Response]:
            self.reports.inventory_taken()
            payload, digest = inventory_payload(self.store)
            # Its room at once (the first heartbeat follows): until the master knows
            # it, no write is placed here.
            room = {"Free-Disk": self.free_disk(), "Stored-Bytes": self.store.stored_bytes}
            return link.request("register", {**headers, **room, INVENTORY_HEADER: digest},
                                payload)

        d.addCallback(register)

        def registered(response: Response) -> None:
            self.link = link
            self.incarnation = int(response.headers["incarnation"])
            self.registrations += 1
            log.info(
                "worker {name} registered with the master (incarnation {inc})",
                name=info.name,
                inc=self.incarnation,
            )
            # Beat at once: a registration says nothing of free disk, and until the
            # first heartbeat the master would see none and refuse uploads.
            self._heartbeat()
            self._tell(MasterSession(link, info.name, self.incarnation,
                                     response.headers.get("grant-key", "")))

        def refused(failure: Failure) -> Failure:
            e = failure.value
            why = f"{e.message} [{e.code}]" if isinstance(e, DsmlError) else str(e)
            log.error("master refused worker {name}: {why}", name=info.name, why=why)
            # A master that took the connect and then dropped it or said busy (a crowd
            # of workers after its restart) is up: come back soon, as after a refusal.
            self._dialler.soon = not isinstance(e, DsmlError) or e.code in (
                "connection", "busy", "unavailable")
            # Returning the failure makes ClientService count the attempt failed and
            # wait to retry; it must then not also hear that this connection closed.
            forget_reconnecting_connection(link)
            link.transport.loseConnection()  # type: ignore[union-attr]
            return failure

        return d.addCallbacks(registered, refused)

    def _lost(self, link: Connection) -> None:
        # ``self.link`` is what ClientService handed to _register: a proxy wrapping the
        # protocol.  The proxy and the protocol share one transport.
        current = self.link
        if current is not None and current.transport is link.transport:
            log.warn("worker {name} lost its link to the master", name=self.info.name)
            self.link = None
            self.incarnation = None
            self._tell(None)

    # -- heartbeats -------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """One beat; never raises (a LoopingCall stops for good when its function does)."""
        try:
            link, incarnation = self.link, self.incarnation
            if link is None or incarnation is None:
                return
            d = link.request(
                "heartbeat",
                {
                    "Name": self.info.name,
                    "Incarnation": incarnation,
                    "Free-Slots": self.free_slots(),
                    "Stored-Bytes": self.store.stored_bytes,
                    "Stored-Files": self.store.count,
                    "Free-Disk": self.free_disk(),
                },
            )
            d.addErrback(self._heartbeat_failed, link)
        except Exception:
            log.failure("heartbeat failed")

    def _heartbeat_failed(self, failure: Failure, link: Connection) -> None:
        if failure.check(DsmlError) and failure.value.code in (
            "not-registered",
            "stale-incarnation",
        ):
            # The master declared us dead (or restarted): register again.
            log.warn("master no longer knows worker {name}: reconnecting", name=self.info.name)
            link.transport.loseConnection()  # type: ignore[union-attr]
        elif not failure.check(DsmlError):
            log.info("heartbeat not answered: {f}", f=failure.getErrorMessage())
