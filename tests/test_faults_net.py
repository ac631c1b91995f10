"""Faults on the network (issue #12): a connection that drops mid-response, a blocking
client whose reply came late, a replicate order to a worker that cannot be reached, and
what a write that failed half-way tells its caller.

The cluster tests run on the simulation (:mod:`dsml.testing.sim`); the blocking client's
are against a small server on a real socket, in a thread, that answers as told."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.python.failure import Failure

from dsml.client import ClusterClient
from dsml.client.server import Client
from dsml.errors import ConnectionLost, DsmlError
from dsml.protocol import codec
from dsml.protocol.codec import END, NEED_DATA, Head
from dsml.protocol.methods import master_methods, storage_methods
from dsml.testing.sim import SimCluster

MiB = 1024 * 1024


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimCluster]:
    """Three workers, replication 2; nothing may be logged as a bug."""
    cluster = SimCluster(tmp_path / "cluster", workers=("w1", "w2", "w3"), replication=2)
    yield cluster
    failures = cluster.failures.messages()
    cluster.close()
    assert failures == [], "bugs were logged during the run"
    assert cluster.net.errors == []


@pytest.fixture
def make_sim(tmp_path: Path) -> Iterator[Any]:
    """``make_sim(**options)``: a SimCluster of three workers with those options; at the
    end, nothing may have been logged as a bug."""
    made: list[SimCluster] = []

    def make(**options: Any) -> SimCluster:
        made.append(SimCluster(tmp_path / "cluster", **options))
        return made[-1]

    yield make
    for cluster in made:
        failures = cluster.failures.messages()
        cluster.close()
        assert failures == [], "bugs were logged during the run"
        assert cluster.net.errors == []


def rounds_until(sim: SimCluster, predicate: Any, limit: int = 100_000) -> None:
    """Move the network one round at a time (no time passes) until ``predicate()``."""
    for _ in range(limit):
        if predicate():
            return
        if not sim.net._round():
            break
    assert predicate(), "the network settled before the condition held"


# -- 1. a response whose payload is arriving when its connection drops ---------------------


@pytest.mark.parametrize("half_open", [False, True], ids=["killed", "vanished"])
def test_download_fails_when_its_only_replica_dies_mid_body(
    tmp_path: Path, make_sim: Any, half_open: bool
) -> None:
    """The worker serving a large download dies (its process is killed, or its machine
    vanishes) while the body streams: the client's Deferred fails with ConnectionLost
    (at once, or once the link's deadline passes), and no partial file is left."""
    sim = make_sim(replication=1, chunk=64 * 1024)
    client = sim.client()
    data = bytes(i % 251 for i in range(8 * MiB))
    sim.wait(client.upload("big", data))
    [holder] = sim.replicas()["big"]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    outcome: list[Any] = []
    client.download_file("big", out_dir / "big.bin").addBoth(outcome.append)

    def partly_arrived() -> bool:
        parts = list(out_dir.iterdir())
        return bool(parts) and parts[0].stat().st_size > MiB

    rounds_until(sim, partly_arrived)
    assert outcome == []
    sim.kill(holder, half_open=half_open)
    sim.until(lambda: bool(outcome), timeout=120, what="the download's failure")
    [failure] = outcome
    assert isinstance(failure, Failure)
    assert failure.check(ConnectionLost), failure
    assert list(out_dir.iterdir()) == []


# -- 3. a replicate order whose target cannot be reached -----------------------------------


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """Every warning logged while the test runs, formatted."""
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") is LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def order_replicate(sim: SimCluster, key: str, source: str, target: str) -> Any:
    """The master orders ``source`` to copy ``key`` to ``target`` (as its repair does)."""
    master = sim.master
    assert master is not None
    version = master.directory.locate(key)[0].version
    record = master.membership.get(source)
    assert record is not None and record.conn is not None
    return record.conn.request(
        "replicate",
        {
            "Key": key,
            "Version": version,
            "To": sim.addr(target),
            "Grant": master.directory.grants.issue(key, version, [target]),
        },
    )


@pytest.mark.parametrize("kind", ["file", "value"])
@pytest.mark.parametrize("fault", ["refused", "vanished"])
def test_replicate_to_an_unreachable_worker_answers_unreachable(
    sim: SimCluster, warnings: list[str], kind: str, fault: str
) -> None:
    """A replicate order whose target refuses connections (its storage port is closed)
    or does not answer them (its machine vanished: the connect times out) is answered
    ``unreachable`` naming the target, with one warning line and no traceback (the
    fixture checks that nothing was logged as a bug)."""
    client = sim.client()
    if kind == "file":
        sim.wait(client.upload("k", b"bytes of a file" * 1000))
    else:
        sim.wait(client.set("k", b"a value"))
    holders = sim.replicas()["k"]
    source = sorted(holders)[0]
    [target] = set(sim.names) - holders
    if fault == "refused":
        sim.net.stop_listening(sim.addr(target))
    else:
        sim.power_off(target)
    del warnings[:]
    with pytest.raises(DsmlError) as caught:
        sim.wait(order_replicate(sim, "k", source, target))
    assert caught.value.code == "unreachable"
    assert sim.addr(target) in caught.value.message
    mine = [w for w in warnings if "cannot copy" in w]
    assert len(mine) == 1 and sim.addr(target) in mine[0], warnings
    assert "k" not in sim.holders() or target not in sim.holders()["k"]


def test_repair_retries_a_copy_whose_target_was_unreachable(
    sim: SimCluster, warnings: list[str]
) -> None:
    """Repair's copy to a worker whose storage port refuses is answered ``unreachable``:
    the master logs a warning (no traceback anywhere), tries again, and the copy is made
    once the target listens again."""
    client = sim.client()
    sim.wait(client.upload("k", b"precious" * 1000))
    holders = sim.replicas()["k"]
    gone = sorted(holders)[0]
    [target] = set(sim.names) - holders
    factory = sim.workers[target].factory
    sim.net.stop_listening(sim.addr(target))
    sim.kill(gone)
    sim.until(
        lambda: any("unreachable" in w and "k" in w for w in warnings),
        timeout=60,
        what="a failed copy",
    )
    assert target not in sim.replicas()["k"]
    sim.net.listen(sim.addr(target), factory, target)
    sim.until(lambda: target in sim.replicas(live=True).get("k", ()), timeout=60,
              what="the copy after the target came back")
    assert sim.read(target, "k") == b"precious" * 1000


# -- 2. the blocking client after a reply that came too late -------------------------------


class ScriptedServer:
    """A dsml server on a real socket (127.0.0.1, port 0) that answers as the test says.

    Each connection is served by its own thread.  ``answers[method](conn, head,
    payload)`` gives (headers, payload) of an OK answer (``conn`` numbers connections
    from 1); ``holds[(conn, method)]`` is an Event the server waits on before it answers
    that connection's first request of that method (a late reply), and ``late_sent`` is
    set once such a reply went out (or could not).  An answer that raises DsmlError is
    sent as that error."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {
            "auth": lambda conn, head, payload: ({}, b""),
            "ping": lambda conn, head, payload: ({"Conn": conn}, b""),
        }
        self.holds: dict[tuple[int, str], threading.Event] = {}
        self._held: set[tuple[int, str]] = set()
        self.late_sent = threading.Event()
        self.requests: list[tuple[int, str, int]] = []  # (conn, method, id)
        self._methods = master_methods().extend(storage_methods().specs.values())
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        conn = 0
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            conn += 1
            self._socks.append(sock)
            t = threading.Thread(target=self._serve, args=(sock, conn), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, conn: int) -> None:
        parser = codec.Parser(codec.REQUEST, self._methods)
        head: Head | None = None
        chunks: list[bytes] = []
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                parser.feed(data)
                continue
            if type(event) is Head:
                head, chunks = event, []
                continue
            if type(event) is codec.Rejected:
                self.requests.append((conn, event.method, event.id))
                sock.sendall(codec.encode_error(event.id, event.code, event.message))
                continue
            if event is not END:
                chunks.append(event.data)
                continue
            assert head is not None
            self.requests.append((conn, head.kind, head.id))
            hold = None
            if (conn, head.kind) not in self._held:
                hold = self.holds.get((conn, head.kind))
            if hold is not None:
                self._held.add((conn, head.kind))
                hold.wait()
            try:
                headers, payload = self.answers[head.kind](conn, head, b"".join(chunks))
                answer = codec.encode_response(True, head.id, headers, payload)
            except DsmlError as e:
                answer = codec.encode_error(head.id, e.code, e.message)
            try:
                sock.sendall(answer)
            except OSError:
                pass
            if hold is not None:
                self.late_sent.set()

    def close(self) -> None:
        for event in self.holds.values():
            event.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._listener.close()
        for sock in self._socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for t in self._threads:
            t.join(10)
            assert not t.is_alive()


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    yield server
    server.close()


def late_first(server: ScriptedServer, method: str, conn: int = 1) -> threading.Event:
    """Hold connection ``conn``'s first ``method`` reply until the returned Event is set."""
    event = threading.Event()
    server.holds[(conn, method)] = event
    return event


def test_client_reconnects_after_a_reply_too_late(scripted: ScriptedServer) -> None:
    """A reply later than the client's timeout fails that request (ConnectionLost, saying
    so), and the late reply is never read as the answer to a later request: the next
    request goes over a new connection, authenticated again."""
    late = late_first(scripted, "ping")
    client = Client("127.0.0.1", scripted.port, "token", timeout=0.3)
    try:
        with pytest.raises(ConnectionLost, match="no answer .* within 0.3 s"):
            client.ping()
        late.set()
        assert scripted.late_sent.wait(10)
        assert client.ping() == {"conn": "2"}
        assert client.ping() == {"conn": "2"}
        assert [(c, m) for c, m, _ in scripted.requests] == [
            (1, "auth"), (1, "ping"), (2, "auth"), (2, "ping"), (2, "ping"),
        ]
    finally:
        client.close()
    with pytest.raises(ConnectionLost, match="closed"):
        client.ping()  # closed by the user: no reconnecting


def test_cluster_client_master_connection_recovers_after_a_timeout(
    scripted: ScriptedServer,
) -> None:
    """The same for a ClusterClient's connection to the master."""
    late = late_first(scripted, "ping")
    client = ClusterClient("127.0.0.1", scripted.port, "token", timeout=0.3)
    try:
        with pytest.raises(ConnectionLost, match="no answer from the master"):
            client.ping()
        late.set()
        assert scripted.late_sent.wait(10)
        assert client.ping() == {"conn": "2"}
    finally:
        client.close()


def test_cluster_client_worker_connection_recovers_after_a_timeout(
    scripted: ScriptedServer,
) -> None:
    """The same for a ClusterClient's connection to a worker (a task's log read)."""
    scripted.answers["task_log"] = lambda conn, head, payload: (
        {"Size": 5, "Running": 0, "Conn": conn}, b"hello"
    )
    late = late_first(scripted, "task_log", conn=2)  # 1 is the master's
    addr = f"127.0.0.1:{scripted.port}"
    client = ClusterClient("127.0.0.1", scripted.port, "token", timeout=0.3)
    try:
        with pytest.raises(ConnectionLost, match="no answer"):
            client.read_log(addr, 1)
        late.set()
        assert scripted.late_sent.wait(10)
        assert client.read_log(addr, 1) == (b"hello", 5, False)
        assert [c for c, m, _ in scripted.requests if m == "task_log"] == [2, 3]
    finally:
        client.close()


# -- 4. what a write that failed half-way tells its caller ---------------------------------


def hop(sim: SimCluster, first: str, second: str) -> list[Any]:
    """The open connections from worker ``first`` to ``second``'s storage port."""
    return [
        c for c in sim.net.connections
        if c.client_node == first and c.addr == sim.addr(second)
    ]


def test_a_write_whose_second_hop_is_cut_is_unknown_and_may_become_visible(
    make_sim: Any,
) -> None:
    """The link from the first worker of an upload's pipeline to the second is cut while
    the bytes stream: the first worker keeps its copy (and reports it), so the write is
    not "failed": the caller gets ``outcome-unknown``, saying it may or may not become
    visible; here it does become visible (the first worker's copy, whole), and repair
    brings it to two copies."""
    sim = make_sim(replication=2, chunk=64 * 1024)
    client = sim.client()
    data = bytes(i % 253 for i in range(3 * MiB))
    outcome: list[Any] = []
    client.upload("big", data).addBoth(outcome.append)
    rounds_until(sim, lambda: any(
        hop(sim, a, b) for a in sim.workers for b in sim.workers if a != b
    ))
    [(first, second)] = [
        (a, b) for a in sim.workers for b in sim.workers if a != b and hop(sim, a, b)
    ]
    for _ in range(5):
        sim.net._round()
    assert outcome == [] and "big" not in sim.stored(second)
    sim.net.cut(sim.addr(second))
    sim.until(lambda: bool(outcome), timeout=30, what="the upload's answer")
    [failure] = outcome
    assert isinstance(failure, Failure) and failure.check(DsmlError), failure
    assert failure.value.code == "outcome-unknown", failure.value
    assert "may or may not become visible" in failure.value.message
    assert "replication-failed" in failure.value.message  # the first worker's word
    # Consistent with it: the first worker's whole copy becomes the key's value.
    sim.until(lambda: "big" in sim.replicas(), timeout=30, what="the key visible")
    assert sim.read(first, "big") == data
    assert sim.wait(client.download("big")) == data
    sim.until(lambda: len(sim.replicas(live=True).get("big", ())) == 2, timeout=60)
    assert all(sim.read(w, "big") == data for w in sim.replicas()["big"])


def test_a_value_whose_second_hop_is_unreachable_is_unknown(sim: SimCluster) -> None:
    """A value whose next worker refuses the forward: stored on the first worker, so the
    caller gets ``outcome-unknown`` and the value becomes visible."""
    client = sim.client()
    grant, _, workers = sim.wait(client.placement("v", 5))
    sim.advance(2)  # a heartbeat: the master no longer counts those 5 bytes as placed
    second = workers[1][0]
    factory = sim.workers[second].factory
    sim.net.stop_listening(sim.addr(second))
    with pytest.raises(DsmlError) as caught:
        sim.wait(client.set("v", b"value"))
    assert caught.value.code == "outcome-unknown"
    sim.net.listen(sim.addr(second), factory, second)
    sim.until(lambda: "v" in sim.replicas(), timeout=30, what="the value visible")
    assert sim.wait(client.get("v")) == b"value"


def test_a_write_whose_commit_is_unanswered_is_unknown(make_sim: Any) -> None:
    """Both workers stored the write, then the master dies before it answers the commit:
    ``outcome-unknown``; once a master is back, the workers' copies make it visible."""
    sim = make_sim(replication=2, chunk=64 * 1024)
    client = sim.client()
    data = b"committed or not " * 50_000
    outcome: list[Any] = []
    client.upload("k", data).addBoth(outcome.append)
    rounds_until(sim, lambda: sum("k" in sim.stored(w) for w in sim.workers) == 2)
    assert outcome == []
    sim.kill_master()
    sim.until(lambda: bool(outcome), timeout=30, what="the upload's answer")
    [failure] = outcome
    assert isinstance(failure, Failure) and failure.check(DsmlError), failure
    assert failure.value.code == "outcome-unknown", failure.value
    assert "commit" in failure.value.message
    sim.start_master()
    sim.wait_registered()
    sim.until(lambda: len(sim.replicas().get("k", ())) == 2, timeout=30)
    assert sim.wait(client.download("k")) == data


def test_a_write_cut_before_it_was_sent_whole_failed_and_never_appears(
    make_sim: Any,
) -> None:
    """The first worker dies while the bytes still stream to it: nobody can have stored
    the write, so the caller gets a failure that is not ``outcome-unknown``, and the key
    never appears (not on any worker, not in the directory)."""
    sim = make_sim(replication=2, chunk=64 * 1024)
    client = sim.client()
    data = bytes(i % 241 for i in range(4 * MiB))
    outcome: list[Any] = []
    client.upload("gone", data).addBoth(outcome.append)
    rounds_until(sim, lambda: any(
        hop(sim, a, b) for a in sim.workers for b in sim.workers if a != b
    ))
    [first] = [
        a for a in sim.workers for b in sim.workers if a != b and hop(sim, a, b)
    ]
    for _ in range(5):
        sim.net._round()
    assert outcome == []
    sim.kill(first)
    sim.until(lambda: bool(outcome), timeout=30, what="the upload's answer")
    [failure] = outcome
    assert isinstance(failure, Failure) and failure.check(DsmlError), failure
    assert failure.value.code != "outcome-unknown", failure.value
    sim.restart(first)
    sim.wait_registered()
    sim.advance(30)
    assert "gone" not in sim.replicas()
    assert "gone" not in sim.holders()


def test_a_first_worker_that_fails_to_store_after_the_next_did_answers_unknown(
    sim: SimCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first worker of a pipeline cannot make its own copy durable (its disk filled)
    while the next worker stored the write: its answer is ``outcome-unknown``, not its
    local error (which would say nothing was stored); the next worker's copy becomes
    visible."""
    client = sim.client()
    data = b"only downstream " * 10_000
    grant, _, workers = sim.wait(client.placement("k", len(data)))
    (first, first_addr), (second, second_addr) = workers
    store = sim.workers[first].store
    real = store.begin_file

    def begin_file(*args: Any, **kwargs: Any) -> Any:
        writer = real(*args, **kwargs)

        def prepare() -> None:
            raise DsmlError("no space left on the device", "disk-full")

        writer.prepare = prepare
        return writer

    monkeypatch.setattr(store, "begin_file", begin_file)
    link = sim.wait(client.links.open(first_addr))
    with pytest.raises(DsmlError) as caught:
        sim.wait(link.request(
            "file_upload", {"Key": "k", "Grant": grant, "Forward": second_addr}, data
        ))
    assert caught.value.code == "outcome-unknown", caught.value
    assert "disk-full" in caught.value.message and second_addr in caught.value.message
    assert "k" not in sim.stored(first)
    sim.until(lambda: sim.replicas().get("k") == {second}, timeout=30, what="visible")
    assert sim.wait(client.download("k")) == data


def test_a_first_worker_that_fails_to_store_when_the_next_refused_answers_its_error(
    sim: SimCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same, but the next worker refused the write too (a wrong Sha256): nothing was
    stored anywhere, so the answer is the first worker's own error, and the key never
    appears."""
    client = sim.client()
    data = b"stored nowhere " * 10_000
    grant, _, workers = sim.wait(client.placement("k", len(data)))
    (first, first_addr), (second, second_addr) = workers
    link = sim.wait(client.links.open(first_addr))
    headers = {"Key": "k", "Grant": grant, "Forward": second_addr, "Sha256": "0" * 64}
    with pytest.raises(DsmlError) as caught:
        sim.wait(link.request("file_upload", headers, data))
    assert caught.value.code == "checksum-mismatch", caught.value
    sim.advance(15)
    assert "k" not in sim.replicas() and "k" not in sim.holders()


#: A grant of the right form (a scripted worker does not check it).
GRANT = "1." + "0" * 32 + ",w1=" + "0" * 32


def scripted_cluster(server: ScriptedServer, worker: Any) -> None:
    """Make ``server`` a master that places every write on itself as worker ``w1``
    (``worker(conn, head, payload)`` answers its ``value_upload``) and commits."""
    import hashlib

    server.answers["place"] = lambda conn, head, payload: (
        {"Version": 1, "Grant": GRANT, "Workers": f"w1=127.0.0.1:{server.port}"}, b""
    )
    server.answers["commit"] = lambda conn, head, payload: ({"Version": 1}, b"")
    server.answers["value_upload"] = worker

    def stored(conn: int, head: Head, payload: bytes) -> Any:
        return {"Version": 1, "Sha256": hashlib.sha256(payload).hexdigest(),
                "Size": len(payload)}, b""

    server.stored = stored  # type: ignore[attr-defined]


def refuse(code: str) -> Any:
    def answer(conn: int, head: Head, payload: bytes) -> Any:
        raise DsmlError(f"refused: {code}", code)

    return answer


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        ("replication-failed", "outcome-unknown"),
        ("outcome-unknown", "outcome-unknown"),
        ("forbidden", "forbidden"),
        ("disk-full", "disk-full"),
    ],
)
def test_blocking_client_sorts_a_failed_write(
    scripted: ScriptedServer, answer: str, code: str
) -> None:
    """ClusterClient.set: a first worker's answer saying some worker stored the write is
    ``outcome-unknown``; any other error is passed on as it is (nothing stored)."""
    scripted_cluster(scripted, refuse(answer))
    with ClusterClient("127.0.0.1", scripted.port, "token", timeout=5) as client:
        with pytest.raises(DsmlError) as caught:
            client.set("k", b"v")
    assert caught.value.code == code
    if code == "outcome-unknown":
        assert "may or may not become visible" in caught.value.message
    assert "commit" not in [m for _, m, _ in scripted.requests]


def test_blocking_client_write_unanswered_after_it_was_sent_is_unknown(
    scripted: ScriptedServer,
) -> None:
    """The worker's answer to a value sent whole comes later than the timeout: the worker
    may have stored it, so ``outcome-unknown``; the commit refused by the master is
    ``outcome-unknown`` too (the workers report their copies themselves)."""
    scripted_cluster(scripted, lambda conn, head, payload: scripted.stored(conn, head, payload))
    late = late_first(scripted, "value_upload", conn=2)  # 1 is the master's
    with ClusterClient("127.0.0.1", scripted.port, "token", timeout=0.3) as client:
        with pytest.raises(DsmlError) as caught:
            client.set("k", b"v")
        assert caught.value.code == "outcome-unknown"
        assert "no answer" in caught.value.message
        late.set()
        assert scripted.late_sent.wait(10)
        scripted.answers["commit"] = refuse("forbidden")
        with pytest.raises(DsmlError) as caught:
            client.set("k", b"v")
        assert caught.value.code == "outcome-unknown"
        assert "commit failed" in caught.value.message
        scripted.answers["commit"] = lambda conn, head, payload: ({"Version": 1}, b"")
        assert client.set("k", b"v").version == 1


# -- 5. a pipeline hop that stops answering ------------------------------------------------


def test_a_hop_that_stops_taking_bytes_leaves_the_pipeline_fast(make_sim: Any) -> None:
    """The second worker of an upload's pipeline goes silent mid-write (nothing closes:
    no TCP user timeout here): the first worker drops it once it has taken no bytes for
    FORWARD_STALL seconds, lets the client's bytes flow again, stores its own copy and
    answers; the caller hears ``outcome-unknown`` well before the 60 s payload
    deadline, and the first worker's copy becomes visible."""
    from dsml.worker.storage import FORWARD_STALL

    sim = make_sim(replication=2, chunk=64 * 1024, user_timeout=None)
    client = sim.client()
    data = bytes(i % 239 for i in range(8 * MiB))
    outcome: list[Any] = []
    start = sim.clock.seconds()
    client.upload("big", data).addBoth(outcome.append)
    rounds_until(sim, lambda: any(
        hop(sim, a, b) for a in sim.workers for b in sim.workers if a != b
    ))
    [(first, second)] = [
        (a, b) for a in sim.workers for b in sim.workers if a != b and hop(sim, a, b)
    ]
    for _ in range(5):
        sim.net._round()
    assert outcome == []
    sim.silence(second)
    sim.until(lambda: bool(outcome), timeout=120, what="the upload's answer")
    took = sim.clock.seconds() - start
    assert took <= FORWARD_STALL + 1, took
    [failure] = outcome
    assert isinstance(failure, Failure) and failure.check(DsmlError), failure
    assert failure.value.code == "outcome-unknown", failure.value
    assert "took no bytes" in failure.value.message
    assert sim.read(first, "big") == data
    sim.unsilence(second)
    sim.until(lambda: first in sim.replicas().get("big", ()), timeout=30)
    assert sim.wait(client.download("big")) == data


def test_a_hop_that_does_not_answer_its_connect_leaves_the_pipeline_fast(
    sim: SimCluster,
) -> None:
    """The second worker's machine vanished (connects to it hang until the network's
    10 s timeout): the first worker gives up on it after FORWARD_CONNECT_TIMEOUT
    seconds, stores its own copy and answers ``replication-failed`` naming it."""
    from dsml.worker.storage import FORWARD_CONNECT_TIMEOUT

    client = sim.client()
    data = b"no second hop " * 50_000
    grant, _, workers = sim.wait(client.placement("k", len(data)))
    (first, first_addr), (second, second_addr) = workers
    assert FORWARD_CONNECT_TIMEOUT < sim.net.connect_timeout
    link = sim.wait(client.links.open(first_addr))
    sim.power_off(second)
    start = sim.clock.seconds()
    with pytest.raises(DsmlError) as caught:
        sim.wait(link.request(
            "file_upload", {"Key": "k", "Grant": grant, "Forward": second_addr}, data
        ))
    took = sim.clock.seconds() - start
    assert took <= FORWARD_CONNECT_TIMEOUT + 0.5, took
    assert caught.value.code == "replication-failed"
    assert f"no link to {second_addr}" in caught.value.message
    assert sim.read(first, "k") == data


def test_a_value_whose_next_hop_does_not_answer_its_connect_is_answered_fast(
    sim: SimCluster,
) -> None:
    """The same for a value: ``replication-failed`` (stored on the first worker) within
    FORWARD_CONNECT_TIMEOUT seconds, not the network's 10 s connect timeout."""
    from dsml.worker.storage import FORWARD_CONNECT_TIMEOUT

    client = sim.client()
    grant, _, workers = sim.wait(client.placement("v", 5))
    (first, first_addr), (second, second_addr) = workers
    link = sim.wait(client.links.open(first_addr))
    sim.power_off(second)
    start = sim.clock.seconds()
    with pytest.raises(DsmlError) as caught:
        sim.wait(link.request(
            "value_upload", {"Key": "v", "Grant": grant, "Forward": second_addr}, b"value"
        ))
    assert sim.clock.seconds() - start <= FORWARD_CONNECT_TIMEOUT + 0.5
    assert caught.value.code == "replication-failed"
    assert sim.read(first, "v") == b"value"


def test_a_first_worker_that_fails_to_store_waits_for_a_silent_next_worker_boundedly(
    sim: SimCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first worker's own copy fails while the next worker, which has the whole
    payload, goes silent before it answers: the first worker waits FORWARD_STALL seconds
    for its answer at most, then answers ``outcome-unknown`` (the next worker may have
    stored it)."""
    from dsml.worker.storage import FORWARD_STALL

    client = sim.client()
    data = b"silent after " * 10_000
    grant, _, workers = sim.wait(client.placement("k", len(data)))
    (first, first_addr), (second, second_addr) = workers
    store = sim.workers[first].store
    real = store.begin_file

    def begin_file(*args: Any, **kwargs: Any) -> Any:
        writer = real(*args, **kwargs)

        def prepare() -> None:
            sim.silence(second)  # its answer will not come
            raise DsmlError("no space left on the device", "disk-full")

        writer.prepare = prepare
        return writer

    monkeypatch.setattr(store, "begin_file", begin_file)
    link = sim.wait(client.links.open(first_addr))
    answer = link.request(
        "file_upload", {"Key": "k", "Grant": grant, "Forward": second_addr}, len(data)
    )
    sim.flush()
    assert hop(sim, first, second)  # the pipeline is up: the payload goes down it whole
    start = sim.clock.seconds()
    link.transport.write(data)  # type: ignore[union-attr]
    with pytest.raises(DsmlError) as caught:
        sim.wait(answer)
    assert sim.clock.seconds() - start <= FORWARD_STALL + 0.5
    assert caught.value.code == "outcome-unknown", caught.value
    assert "disk-full" in caught.value.message
    sim.unsilence(second)
