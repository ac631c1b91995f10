"""Peer links: both ends of one connection send requests (a worker's link to the master)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.test import iosim

from dsml.errors import DsmlError
from dsml.net.connection import Connection
from dsml.net.links import LinkFactory
from dsml.net.responders import Reply, Responders, responder
from dsml.net.server import ConnectionLost, Response, ServerFactory
from dsml.protocol.codec import Head
from dsml.protocol.methods import ALL_ROLES, MethodSpec, MethodTable, check_text


def _table() -> MethodTable:
    return MethodTable().extend(
        [
            MethodSpec("auth", {"token": check_text}, frozenset({"token"})),
            MethodSpec("echo", {"word": check_text}, frozenset({"word"}), 1024),
            MethodSpec("later"),
            MethodSpec("ask_back"),
        ]
    )


class Handler:
    """Answers echo at once, later when told, and ask_back by asking the other side first."""

    def __init__(self) -> None:
        self.later: list[Deferred[Reply]] = []
        self.seen: list[str] = []

    def responders(self) -> Responders:
        return Responders(_table(), self)

    @responder("echo", roles=ALL_ROLES)
    def _echo(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        self.seen.append(head.kind)
        return Reply({"Word": head.headers["word"]}, payload)

    @responder("later", roles=ALL_ROLES)
    def _later(self, head: Head, payload: bytes, conn: Connection) -> Deferred[Reply]:
        self.seen.append(head.kind)
        d: Deferred[Reply] = Deferred()
        self.later.append(d)
        return d

    @responder("ask_back", roles=ALL_ROLES)
    def _ask_back(self, head: Head, payload: bytes, conn: Connection) -> Any:
        self.seen.append(head.kind)
        asked = conn.request("echo", {"Word": "inner"})
        return asked.addCallback(lambda r: Reply({"Got": r.headers["word"]}))


class Link:
    """A master-side and a worker-side protocol joined by an in-memory pump."""

    def __init__(self, token: str = "secret", master_handler: Handler | None = None) -> None:
        self.clock = Clock()
        self.master_handler = master_handler or Handler()
        self.worker_handler = Handler()
        self.lost: list[Connection] = []
        master_factory = ServerFactory(
            self.master_handler.responders(), self.clock, token, two_way=True,
            on_lost=self.lost.append,
        )
        worker_factory = LinkFactory(
            self.worker_handler.responders(), self.clock, peer_roles=ALL_ROLES
        )
        self.master = master_factory.buildProtocol(None)
        self.worker = worker_factory.buildProtocol(None)
        self.pump = iosim.connect(
            self.master, iosim.makeFakeServer(self.master),
            self.worker, iosim.makeFakeClient(self.worker),
            greet=False,
        )

    def flush(self) -> None:
        self.pump.flush()


def _result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    return results[0]


def test_worker_authenticates_then_both_sides_request() -> None:
    """The dialling side authenticates with a request; then each side's requests are answered."""
    link = Link()
    auth = link.worker.request("auth", {"Token": "secret"})
    link.flush()
    assert isinstance(_result(auth), Response)
    echo = link.worker.request("echo", {"Word": "hi"}, b"payload")
    back = link.master.request("echo", {"Word": "down"})
    link.flush()
    assert _result(echo) == Response({"word": "hi"}, b"payload")
    assert _result(back).headers["word"] == "down"
    assert link.master_handler.seen == ["echo"]
    assert link.worker_handler.seen == ["echo"]


def test_request_before_auth_is_refused_and_closes() -> None:
    """The accepting side still demands auth first; the caller's Deferred fails with the code."""
    link = Link()
    echo = link.worker.request("echo", {"Word": "hi"})
    link.flush()
    failure = _result(echo)
    assert failure.check(DsmlError) and failure.value.code == "auth-required"
    assert link.lost == [link.master]


def test_wrong_token_fails_the_auth_request() -> None:
    """A wrong token fails the auth request with auth-failed and closes the link."""
    link = Link()
    auth = link.worker.request("auth", {"Token": "nope"})
    link.flush()
    assert _result(auth).value.code == "auth-failed"


def test_responses_flow_while_a_request_waits() -> None:
    """A handler that asks the other side before answering does not deadlock the link."""
    link = Link()
    link.worker.request("auth", {"Token": "secret"})
    link.flush()
    ask = link.worker.request("ask_back")
    link.flush()
    assert _result(ask).headers["got"] == "inner"


def test_pipelined_requests_wait_their_turn_behind_a_slow_one() -> None:
    """The peer's second request is held until the first is answered; order is kept."""
    link = Link()
    link.worker.request("auth", {"Token": "secret"})
    link.flush()
    first = link.worker.request("later")
    second = link.worker.request("echo", {"Word": "two"})
    link.flush()
    assert link.master_handler.seen == ["later"]
    results: list[Any] = []
    first.addCallback(lambda r: results.append("first"))
    second.addCallback(lambda r: results.append("second"))
    # Meanwhile the master's own request to the worker goes through.
    down = link.master.request("echo", {"Word": "meanwhile"})
    link.flush()
    assert _result(down).headers["word"] == "meanwhile"
    assert results == []
    link.master_handler.later[0].callback(Reply())
    link.flush()
    assert results == ["first", "second"]
    assert link.master_handler.seen == ["later", "echo"]


def test_pending_requests_fail_when_the_link_drops() -> None:
    """Requests still waiting when the connection closes fail with ConnectionLost."""
    link = Link()
    link.worker.request("auth", {"Token": "secret"})
    link.flush()
    pending = link.worker.request("later")
    link.flush()
    link.worker.transport.loseConnection()
    link.flush()
    assert _result(pending).check(ConnectionLost)
    assert link.lost == [link.master]
    with pytest.raises(RuntimeError):
        ServerFactory(Handler().responders(), Clock()).buildProtocol(None).request("echo")


class PipelinedHandler(Handler):
    """Marks ``later`` pipelined: its requests may overlap."""

    @responder("later", roles=ALL_ROLES, pipelined=True)
    def _later(self, head: Head, payload: bytes, conn: Connection) -> Deferred[Reply]:
        return super()._later(head, payload, conn)


def _link_with(handler: Handler) -> Link:
    """An authenticated Link whose master side answers with ``handler``."""
    link = Link(master_handler=handler)
    link.worker.request("auth", {"Token": "secret"})
    link.flush()
    return link


def test_pipelined_methods_overlap_and_are_answered_in_order() -> None:
    """Requests of a method the handler marks pipelined are all taken while the first
    waits for its answer; the answers still go back in request order, and a request of
    any other method waits until every answer owed has gone."""
    link = _link_with(PipelinedHandler())
    handler = link.master_handler
    order: list[str] = []
    first = link.worker.request("later")
    second = link.worker.request("later")
    echo = link.worker.request("echo", {"Word": "after"})
    third = link.worker.request("later")
    for name, d in [("first", first), ("second", second), ("echo", echo), ("third", third)]:
        d.addBoth(lambda r, name=name: (order.append(name), r)[1])
    link.flush()
    assert handler.seen == ["later", "later"]  # both taken; echo (not pipelined) waits
    handler.later[1].callback(Reply({"N": 2}))
    link.flush()
    assert order == []  # the second is ready, but the first is owed before it
    handler.later[0].errback(DsmlError("gone", "not-found"))
    link.flush()
    assert order == ["first", "second", "echo"]
    assert _result(first).value.code == "not-found"
    assert _result(second).headers["n"] == "2"
    assert handler.seen == ["later", "later", "echo", "later"]
    handler.later[2].callback(Reply())
    link.flush()
    assert order == ["first", "second", "echo", "third"]


def test_answers_owed_when_the_link_drops_are_dropped() -> None:
    """A pipelined answer that becomes ready after the link closed is not sent."""
    link = _link_with(PipelinedHandler())
    pending = link.worker.request("later")
    link.flush()
    link.worker.transport.loseConnection()
    link.flush()
    assert _result(pending).check(ConnectionLost)
    link.master_handler.later[0].callback(Reply())  # nothing to send it on: no error
    assert link.lost == [link.master]
