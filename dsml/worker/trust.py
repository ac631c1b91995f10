"""What a worker takes on the master's word: write grants and the registered peers.

A write's version is the master's (:mod:`dsml.protocol.grants`): this worker's own
grant key comes in each registration reply (``Grant-Key``), and
:meth:`MasterTrust.version_of` checks that a write's ``Grant`` names this worker with a
MAC under that key.  An upload's ``Forward`` hops go only to workers the
master has registered: :meth:`MasterTrust.forward_check` looks each ``host:port`` up in
the master's table of live workers (``peers``), fetched at each registration and again
(one request at a time) when an address is missing or the table is older than
:data:`PEERS_TTL`.  Anything else is refused ``forbidden`` before any connection to it
is attempted.  Until the worker has registered it can check neither (``unavailable``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import DsmlError
from ..protocol.grants import WorkerGrants

__all__ = ["PEERS_TTL", "MasterTrust"]

log = Logger()

#: Seconds a fetched peer table is trusted for a hit; a miss always asks again.
PEERS_TTL = 30.0

#: Asks the master for its live workers: the ``peers`` reply's payload.
AskPeers = Callable[[], "Deferred[bytes]"]


def _refused(addr: str) -> DsmlError:
    return DsmlError(
        f"Forward names {addr}, which is not a worker registered with the master: "
        "not forwarded",
        "forbidden",
    )


class MasterTrust:
    """The grant key and the peer table of the worker's current registration."""

    def __init__(self, clock: Any, name: str = "") -> None:
        self.clock = clock
        #: This worker's name: the grants it takes are those naming it.
        self.name = name
        self._grants: WorkerGrants | None = None
        self._ask: AskPeers | None = None
        self._peers: frozenset[str] = frozenset()
        self._fetched: float | None = None
        self._in_flight = False
        self._waiters: list[Deferred[None]] = []
        #: Peer tables fetched (tests: no request when the table answers).
        self.fetches = 0

    # -- the registration --------------------------------------------------------------

    def registered(self, grant_key: str, ask: AskPeers | None) -> None:
        """A new registration: this worker's grant key (hex), and how to ask the master
        for peers."""
        try:
            self._grants = WorkerGrants(self.name, grant_key) if grant_key else None
        except ValueError:
            log.error("the master's Grant-Key is malformed: writes will be refused")
            self._grants = None
        self._ask = ask
        self._fetched = None
        if ask is not None:
            self._refresh().addErrback(lambda _: None)

    def lost(self) -> None:
        """The registration is gone: keep the key (grants stay valid), ask nobody."""
        self._ask = None

    # -- grants ------------------------------------------------------------------------

    def version_of(self, key: str, grant: str | None) -> int:
        """The version a write of ``key`` carrying ``grant`` is stored under.

        ``forbidden`` without a grant or with one the master did not sign for ``key``;
        ``unavailable`` before the first registration (no key to check with).
        """
        if grant is None:
            raise DsmlError(
                "a write to a cluster worker needs the Grant that place answered "
                "(write through the master)",
                "forbidden",
            )
        if self._grants is None:
            raise DsmlError("not registered with the master yet: cannot check grants",
                            "unavailable")
        return self._grants.version_of(key, grant)

    # -- peers -------------------------------------------------------------------------

    def forward_check(self, addrs: Sequence[str]) -> Deferred[None] | None:
        """Whether every address of ``addrs`` is a registered worker's.

        None when the table in hand says yes; raises ``forbidden`` (an address not in a
        table just fetched) or ``unavailable`` (no registration to ask); otherwise a
        Deferred that fires once the master's fresh table says yes, or fails
        ``forbidden``.
        """
        fresh = self._fetched is not None and self.clock.seconds() - self._fetched < PEERS_TTL
        missing = [a for a in addrs if a not in self._peers]
        if fresh and not missing:
            return None
        if self._ask is None:
            if missing:
                raise DsmlError(
                    f"not registered with the master: cannot check Forward {missing[0]}",
                    "unavailable",
                )
            return None
        d = self._refresh()

        def check(_: object) -> None:
            for addr in addrs:
                if addr not in self._peers:
                    log.warn("refused to forward an upload to {addr}: not a registered worker",
                             addr=addr)
                    raise _refused(addr)

        return d.addCallback(check)

    def _refresh(self) -> Deferred[None]:
        """Fetch the table (joining a fetch in flight); fires when it is in."""
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if not self._in_flight:
            assert self._ask is not None
            self._in_flight = True
            asked = self.clock.seconds()
            self._ask().addCallbacks(self._got, self._failed, (asked,))
        return waiter

    def _got(self, payload: bytes, asked: float) -> None:
        peers = set()
        for line in payload.splitlines():
            try:
                peers.add(str(json.loads(line)["addr"]))
            except (ValueError, KeyError, TypeError):
                continue
        self._peers = frozenset(peers)
        self._fetched = asked
        self.fetches += 1
        waiters, self._waiters, self._in_flight = self._waiters, [], False
        for w in waiters:
            w.callback(None)

    def _failed(self, failure: Failure) -> None:
        e = failure.value
        why = e.message if isinstance(e, DsmlError) else failure.getErrorMessage()
        waiters, self._waiters, self._in_flight = self._waiters, [], False
        for w in waiters:
            w.errback(DsmlError(f"cannot check Forward with the master: {why}", "unavailable"))

    @property
    def peers(self) -> frozenset[str]:
        """The addresses of the last table fetched."""
        return self._peers
