"""The security suite (issue #10): every attack of the issue and every role rule, tried
against real processes (a twistd master and two workers over mutual TLS, started once for
the module; a plain-token cluster where a case needs one) through raw sockets and raw TLS
connections speaking the wire protocol by hand (:mod:`dsml.testing.rawwire`).

Each case asserts its exact refusal (``forbidden``, a TLS alert, a close) and then, with
:func:`unchanged`, that the cluster's keys, versions, replicas, workers, jobs and version
counter are what they were before, and that it still serves a normal client.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

from dsml import pki
from dsml.client import ClusterClient
from dsml.client.server import ClientTls
from dsml.localcluster import LocalCluster, ProcessFailed
from dsml.master.requests import MasterHandler
from dsml.net import responders
from dsml.net.listen import write_addr_file
from dsml.protocol.codec import Head
from dsml.protocol.grants import Grants
from dsml.protocol.methods import Role
from dsml.testing.poll import poll
from dsml.testing.rawwire import (
    Closed,
    RawConn,
    accept_from,
    client_context,
    forge_certificate,
    peer_is_process,
    server_context,
)
from dsml.worker.orders import WorkerOrders
from dsml.worker.runner import TaskLogs, TaskOrders
from dsml.worker.storage import StorageHandler

pytestmark = pytest.mark.processes

#: The authentication (and handshake) deadline of the module's cluster, in seconds.
AUTH_TIMEOUT = 1.0
#: w3 is in the config (host 127.0.0.1, this port) but never started: its certificate
#: stands for a real worker identity whose process is not running.
W3_PORT = 9
#: Far above any version the module's cluster issues.
HUGE_VERSION = 999_999_999_999_999
#: A task environment value that must never reach another user.
SECRET = "alice-secret-8f3a1c"
#: Generous bound on waiting for a peer to act (a busy shared machine).
WAIT = 30.0


@attrs.define
class Sec:
    """The module's TLS cluster and what the attacks need of it."""

    c: LocalCluster
    pki: Path
    other_pki: Path  # a second CA with its own master, w1 and admin
    forged: Path  # hand-made certificates
    revoked: tuple[Path, Path]  # mallory's certificate and key, revoked before start-up
    idle_job: str  # alice's, running `sleep 600`
    done_job: str  # alice's, finished, wrote alice-out
    done_attempt: int
    done_worker: str  # the worker that ran done_job
    seed_file: bytes

    def addr(self, name: str) -> tuple[str, int]:
        """Where ``master`` or a worker listens."""
        return self.c.address(name)

    def ctx(self, kind: str, name: str) -> ssl.SSLContext:
        """A client context presenting the cluster identity ``kind``/``name``."""
        p = pki.identity_paths(self.pki, kind, name)
        return client_context(pki.ca_paths(self.pki).cert, p.cert, p.key)

    def conn(self, where: str, kind: str = "user", name: str = "admin") -> RawConn:
        """A raw TLS connection to ``where`` as ``kind``/``name``."""
        return RawConn.open(self.addr(where), self.ctx(kind, name))

    def client(self, user: str = "admin") -> ClusterClient:
        """A normal cluster client as ``user``."""
        host, port = self.addr("master")
        return ClusterClient(host, port, None, timeout=WAIT, tls=ClientTls(self.pki, user))


def _jsonl(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def _ok(head: Head, body: bytes = b"") -> None:
    assert head.ok, (head, body)


@pytest.fixture(scope="module")
def sec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sec]:
    """A TLS master, w1 and w2 (w3 configured, not started), users alice, bob and a
    revoked mallory, a worker certificate w9 for a name not in the config, a second CA;
    seeded with a value, a file and two of alice's jobs.  Always stopped."""
    root = tmp_path_factory.mktemp("security")
    c = LocalCluster(
        root / "c",
        workers=("w1", "w2"),
        tls=True,
        extra={
            "limits": {"auth_timeout": AUTH_TIMEOUT},
            "workers": {"w3": {"host": "127.0.0.1", "port": W3_PORT, "data_dir": "w3"}},
            # A busy shared machine must not make a worker look suspect or dead between
            # snapshots (placement, and so the counter probe, takes alive workers only).
            "cluster": {"heartbeat_interval": 5.0, "heartbeat_timeout": 120.0},
        },
    )
    try:
        for user in ("alice", "bob"):  # as an operator would
            c.cli("pki", "issue", "user", user)
        pki.issue(c.pki_dir, "user", "mallory")
        pki.issue(c.pki_dir, "user", "w1")  # a user who took a worker's name
        pki.issue(c.pki_dir, "worker", "w9", ["127.0.0.1"])
        mallory_cert = pki.identity_paths(c.pki_dir, "user", "mallory").cert
        mallory = pki.identity_of(pki.load_cert(mallory_cert))
        pki.revoke(c.pki_dir, "mallory")
        users = c.pki_dir / "users"
        revoked = (
            users / f"mallory.crt.revoked-{mallory.serial:x}",
            users / f"mallory.key.revoked-{mallory.serial:x}",
        )
        other = root / "other-pki"
        pki.init_cluster(other, "127.0.0.1", [("w1", "127.0.0.1")])
        for name in ("master", "w1", "w2"):
            c.start(name)
        host, port = c.address("master")
        admin = ClusterClient(host, port, None, timeout=WAIT, tls=ClientTls(c.pki_dir, "admin"))
        with admin:
            poll(lambda: sum(n.state == "alive" for n in admin.nodes()) == 2 or None,
                 "w1 and w2 registered", timeout=WAIT)
            seed = os.urandom(100_000)
            (root / "seed.bin").write_bytes(seed)
            admin.upload(str(root / "seed.bin"), "seed/file")
            admin.set("seed/value", b"seed-value")
        with ClusterClient(host, port, None, timeout=WAIT, tls=ClientTls(c.pki_dir, "alice")) as a:
            done = a.submit(["sh", "-c", "echo alice-out"], name="done", env={"SECRET": SECRET})
            final = a.wait(done.id, timeout=WAIT)
            assert final["state"] == "succeeded", final
            attempt = final["tasks"][0]["attempts"][0]["id"]
            ran_on = final["tasks"][0]["attempts"][0]["worker"]
            idle = a.submit(["sleep", "600"], name="idle", env={"SECRET": SECRET})
            poll(lambda: a.job_status(idle.id)["state"] == "running" or None,
                 "alice's idle job running", timeout=WAIT)
        yield Sec(c, c.pki_dir, other, root / "forged", revoked, idle.id, done.id, attempt,
                  ran_on, seed)
    finally:
        c.stop()


# -- the cluster, before and after ----------------------------------------------------


@attrs.frozen
class Snapshot:
    """What an attack must not change: keys with versions and replicas, workers, jobs,
    and the master's version counter (the version a probe ``place`` is given)."""

    keys: list[tuple[Any, ...]]
    nodes: dict[str, tuple[Any, ...]]
    jobs: list[tuple[Any, ...]]
    counter: int


def snapshot(s: Sec) -> Snapshot:
    """Read the cluster's state as admin, by hand on the wire."""
    with s.conn("master") as m:
        head, body = m.call("list", {"Limit": 10000})
        _ok(head, body)
        keys = sorted(
            (e["key"], e["size"], e["sha256"], e["version"], tuple(sorted(e["replicas"])))
            for e in _jsonl(body)
        )
        head, body = m.call("nodes")
        _ok(head, body)
        # alive and suspect are one (a late heartbeat on a busy machine); dead is not.
        nodes = {
            n["name"]: (n["state"] == "dead", n["incarnation"], n["host"], n["port"])
            for n in _jsonl(body)
        }
        head, body = m.call("jobs", {"Limit": 1000})
        _ok(head, body)
        jobs = sorted((j["id"], j["state"], j["owner"]) for j in _jsonl(body))
        head, body = m.call("place", {"Key": "probe/counter", "Size": 1})
        _ok(head, body)
        counter = int(head.headers["version"])
    return Snapshot(keys, nodes, jobs, counter)


def settled_snapshot(s: Sec, replication: int = 2) -> Snapshot:
    """:func:`snapshot`, once repair has finished what an earlier test set in motion
    (every key at ``replication`` copies, or WAIT seconds): a "before" must not catch a
    copy still on its way, which would then look like a change the attack made.  Only
    the "before" waits: an "after" that waited would hide a copy an attack destroyed
    and repair put back."""
    deadline = time.monotonic() + WAIT
    while True:
        snap = snapshot(s)
        if all(len(k[4]) >= replication for k in snap.keys) or time.monotonic() > deadline:
            return snap
        time.sleep(0.1)


def unchanged(
    s: Sec, before: Snapshot, registered: str | None = None, placed: int = 0
) -> None:
    """The cluster is as ``before`` (the counter moved by the second probe only, and by
    ``placed`` legitimate ``place`` requests of the test) and a normal client still reads
    the seeded value and file from it.  ``registered`` names a worker the test
    registered legitimately (its incarnation moved): it is left out."""
    after = snapshot(s)
    assert after.keys == before.keys
    skip = {registered}
    assert {k: v for k, v in after.nodes.items() if k not in skip} == {
        k: v for k, v in before.nodes.items() if k not in skip
    }
    assert after.jobs == before.jobs
    assert after.counter == before.counter + 1 + placed, "the master's version counter moved"
    with s.client() as c:
        assert c.get("seed/value") == b"seed-value"
        assert c.stat("seed/file").sha256 == hashlib.sha256(s.seed_file).hexdigest()


def refused(conn: RawConn, method: str, headers: dict[str, object] | None = None,
            payload: bytes = b"", code: str = "forbidden") -> Head:
    """``method`` is answered with the request-level error ``code``, and the connection
    stays open and answers the next request."""
    head, body = conn.call(method, headers, payload)
    assert (head.kind, head.headers.get("code")) == ("ERROR", code), (head, body)
    pong, _ = conn.call("ping")
    assert pong.ok, pong
    return head


def cut_by_tls(addr: tuple[str, int], ctx: ssl.SSLContext) -> str:
    """Connecting with ``ctx`` is refused by the TLS layer: the handshake fails or the
    first request is answered only by a close or an alert, never by the protocol.
    Returns what the client saw (the alert's text, or "closed")."""
    try:
        conn = RawConn.open(addr, ctx, timeout=WAIT)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        return str(e)
    with conn:
        try:
            head, body = conn.call("ping")
        except (Closed, BrokenPipeError) as e:
            return str(e)
        raise AssertionError(f"the server answered {head!r}")


def refused_identity(addr: tuple[str, int], ctx: ssl.SSLContext, why: str) -> None:
    """A certificate that verifies but names no identity the server accepts: the first
    request is answered ``ERROR 0`` with ``forbidden`` and a message saying ``why``
    ("certificate refused: ..."), then the server closes the connection."""
    with RawConn.open(addr, ctx, timeout=WAIT) as conn:
        head, _ = conn.call("ping")
        assert (head.kind, head.id, head.headers.get("code")) == ("ERROR", 0, "forbidden"), head
        assert head.headers["message"].startswith("certificate refused: "), head
        assert why in head.headers["message"], head
        assert conn.wait_closed() == b""


# -- TLS ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["master", "w1"])
def test_tls_certificate_from_another_ca_is_refused(sec: Sec, where: str) -> None:
    """A user certificate signed by another CA (named admin, like the real one) is cut
    in the handshake with an unknown-CA alert, on the master and on a worker."""
    before = settled_snapshot(sec)
    p = pki.identity_paths(sec.other_pki, "user", "admin")
    ctx = client_context(pki.ca_paths(sec.pki).cert, p.cert, p.key)
    assert "unknown ca" in cut_by_tls(sec.addr(where), ctx).lower()
    unchanged(sec, before)


def test_tls_expired_certificate_is_refused(sec: Sec) -> None:
    """A certificate the cluster CA signed but that has expired is cut in the handshake."""
    before = settled_snapshot(sec)
    ca = pki.ca_paths(sec.pki)
    cert, key = forge_certificate(sec.forged, ca.cert, ca.key, cn="admin", ou="user",
                                  days_valid=(-30, -1), name="expired-admin")
    ctx = client_context(ca.cert, cert, key)
    assert "certificate expired" in cut_by_tls(sec.addr("master"), ctx).lower()
    unchanged(sec, before)


@pytest.mark.parametrize("where", ["master", "w1"])
def test_tls_revoked_certificate_is_refused(sec: Sec, where: str) -> None:
    """A user certificate revoked before the cluster started (its CRL is read at
    start-up) is refused by the master and the workers, naming the revocation."""
    before = settled_snapshot(sec)
    cert, key = sec.revoked
    ctx = client_context(pki.ca_paths(sec.pki).cert, cert, key)
    refused_identity(sec.addr(where), ctx, "is revoked")
    unchanged(sec, before)


def test_tls_no_client_certificate_is_refused(sec: Sec) -> None:
    """A client that trusts the cluster CA but presents no certificate is cut."""
    before = settled_snapshot(sec)
    ctx = client_context(pki.ca_paths(sec.pki).cert)
    assert "certificate required" in cut_by_tls(sec.addr("master"), ctx).lower()
    unchanged(sec, before)


@pytest.mark.parametrize("where", ["master", "w1"])
def test_tls_certificate_naming_no_identity_is_refused(sec: Sec, where: str) -> None:
    """A certificate the cluster CA signed with no OU (no dsml role) holds no role: it
    is refused on the master and on a worker."""
    before = settled_snapshot(sec)
    ca = pki.ca_paths(sec.pki)
    cert, key = forge_certificate(sec.forged, ca.cert, ca.key, cn="admin", ou=None,
                                  name=f"no-role-{where}")
    refused_identity(sec.addr(where), client_context(ca.cert, cert, key), "not a dsml identity")
    unchanged(sec, before)


@pytest.mark.parametrize("where", ["master", "w1"])
def test_tls_plaintext_to_a_tls_port_gets_no_answer(sec: Sec, where: str) -> None:
    """The protocol in clear to a TLS port (with the cluster token) gets no protocol
    answer: at most a TLS alert record, then the close."""
    before = settled_snapshot(sec)
    with RawConn.open(sec.addr(where), None, timeout=WAIT) as conn:
        conn.send(f"auth 1\r\nToken: {sec.c.token}\r\n\r\nnodes 2\r\n\r\n".encode())
        seen = conn.wait_closed()
    assert seen == b"" or seen[:1] == b"\x15", seen  # nothing, or a TLS alert
    unchanged(sec, before)


@pytest.mark.parametrize("where", ["master", "w1"])
def test_tls_silent_connection_is_closed_by_the_deadline(sec: Sec, where: str) -> None:
    """A TCP connection that never starts its handshake is closed by the server (the
    authentication deadline): we wait on the close, not on a clock."""
    before = settled_snapshot(sec)
    with RawConn.open(sec.addr(where), None, timeout=WAIT) as conn:
        assert conn.wait_closed() == b""
    unchanged(sec, before)


@pytest.mark.parametrize("where", ["master", "w1"])
def test_tls_handshake_that_never_finishes_is_closed_by_the_deadline(
    sec: Sec, where: str
) -> None:
    """A ClientHello and then silence: the server answers its part of the handshake,
    then closes the connection when the deadline passes."""
    before = settled_snapshot(sec)
    ctx = sec.ctx("user", "admin")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a handshake record
    with RawConn.open(sec.addr(where), None, timeout=WAIT) as conn:
        conn.send(hello)
        seen = conn.wait_closed()  # never finishing our side
    assert seen[:1] == b"\x16", seen[:16]  # the server's ServerHello came, then the close
    unchanged(sec, before)


@pytest.mark.parametrize("where", ["master", "w1"])
def test_tls_master_certificate_dialling_a_node_is_forbidden(sec: Sec, where: str) -> None:
    """The master's own certificate is not a kind a node accepts from a peer that
    dials it (orders travel only down a worker's own link): ``forbidden``, then closed."""
    before = settled_snapshot(sec)
    refused_identity(sec.addr(where), sec.ctx("master", "master"), "expected user or worker")
    unchanged(sec, before)


# -- the impostor master ---------------------------------------------------------------


class Impostor:
    """A TLS listener on 127.0.0.1:0 standing where the master should be: it takes the
    first connection of the worker process (``pid``, given once known; anyone else's is
    closed unread), records every byte it receives, and sends orders a trusting worker
    would execute."""

    def __init__(self, ctx: ssl.SSLContext, orders: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(WAIT)
        self.port = self.listener.getsockname()[1]
        self.ctx = ctx
        self.orders = orders
        self.pid = 0
        self.pid_known = threading.Event()
        self.received: list[bytes] = []
        self.handshake_error: str | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def worker_started(self, pid: int) -> None:
        """The worker process whose connections count."""
        self.pid = pid
        self.pid_known.set()

    def _accept(self) -> socket.socket | None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return None
            if self.pid_known.wait(WAIT) and peer_is_process(raw, self.pid):
                return raw
            raw.close()  # not the worker's (or already gone: it will dial again)

    def _serve(self) -> None:
        raw = self._accept()
        if raw is None:
            self.done.set()
            return
        try:
            raw.settimeout(WAIT)
            try:
                conn = self.ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as e:
                self.handshake_error = str(e)
                return
            with conn:
                try:
                    conn.sendall(self.orders)
                    while data := conn.recv(65536):
                        self.received.append(data)
                except (ssl.SSLError, OSError):
                    pass
        finally:
            raw.close()
            self.done.set()

    def stop(self) -> None:
        """Close the listener and wait for the thread."""
        self.listener.close()
        self.thread.join(WAIT)


def _run_order(marker: Path) -> bytes:
    """A `run` order (and a `drop`) the impostor sends a worker down its link."""
    task = {
        "attempt_id": 4242, "job_id": "j4242", "task_index": 0,
        "command": ["sh", "-c", f"touch {marker}"], "env": {}, "inputs": [], "outputs": [],
        "slots": 1, "timeout": 60, "owner": "admin",
    }
    payload = json.dumps(task).encode()
    return (
        f"run 1\r\nAttempt: 4242\r\nLength: {len(payload)}\r\n\r\n".encode() + payload
        + b"drop 2\r\nKey: seed/value\r\nVersion: 1\r\n\r\n"
    )


def _impostor_cluster(s: Sec, root: Path) -> LocalCluster:
    """A second cluster root holding a copy of the module's PKI (so its w1 has a valid
    certificate) whose master address file the test writes itself."""
    shutil.copytree(s.pki, root / "pki")
    c = LocalCluster(root, workers=("w1",), tls=True,
                     extra={"limits": {"auth_timeout": AUTH_TIMEOUT}})
    (root / "master").mkdir(parents=True, exist_ok=True)
    return c


def _worker_meets(
    s: Sec, tmp_path: Path, ctx: ssl.SSLContext
) -> tuple[Impostor, LocalCluster, Path]:
    """Start a real worker whose master address is an :class:`Impostor` presenting
    ``ctx``; return once the impostor's connection has ended."""
    marker = tmp_path / "order-executed"
    imp = Impostor(ctx, _run_order(marker))
    c = _impostor_cluster(s, tmp_path / "imp")
    write_addr_file(c.addr_file("master"), "127.0.0.1", imp.port)
    try:
        c.start("w1")
        imp.worker_started(c.procs["w1"].pid)
        assert imp.done.wait(WAIT), "the worker kept its link to a non-master"
    finally:
        c.stop()
        imp.stop()
    return imp, c, marker


def test_worker_refuses_a_master_presenting_a_worker_certificate(
    sec: Sec, tmp_path: Path
) -> None:
    """A listener at the master's address with w2's valid certificate: the worker cuts
    the link; it never registers, never sends the cluster token, never runs its orders."""
    w2 = pki.identity_paths(sec.pki, "worker", "w2")
    ctx = server_context(pki.ca_paths(sec.pki).cert, w2.cert, w2.key)
    imp, c, marker = _worker_meets(sec, tmp_path, ctx)
    seen = b"".join(imp.received)
    assert b"register " not in seen, seen[:200]
    assert not marker.exists(), "the impostor's run order was executed"
    assert "expected master" in c.tail("w1", 300)
    assert c.token.encode() not in seen, "the worker sent the cluster token to a non-master"


def test_worker_refuses_a_master_from_another_ca(sec: Sec, tmp_path: Path) -> None:
    """A listener at the master's address with a master certificate of another CA: the
    worker fails the handshake; nothing of the protocol crosses, no order runs."""
    m = pki.identity_paths(sec.other_pki, "master", "master")
    ctx = server_context(pki.ca_paths(sec.pki).cert, m.cert, m.key)
    imp, c, marker = _worker_meets(sec, tmp_path, ctx)
    assert imp.received == []
    assert imp.handshake_error is not None and "unknown ca" in imp.handshake_error.lower()
    assert not marker.exists()


def test_worker_refuses_a_plaintext_master(sec: Sec, tmp_path: Path) -> None:
    """A plain TCP listener at the master's address (a stopped master's port taken):
    the TLS worker sends it a ClientHello and nothing else; no token, no register."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)
    c = _impostor_cluster(sec, tmp_path / "imp")
    write_addr_file(c.addr_file("master"), "127.0.0.1", listener.getsockname()[1])
    received = []
    try:
        c.start("w1")
        # The first connection of this worker that is still open when looked at.
        conn = accept_from(listener, c.procs["w1"].pid)
        with conn:
            conn.settimeout(WAIT)
            try:
                while data := conn.recv(65536):
                    received.append(data)
                    if len(received) == 1:
                        conn.sendall(_run_order(tmp_path / "order-executed"))
            except OSError:
                pass  # cut by the worker
    finally:
        c.stop()
        listener.close()
    seen = b"".join(received)
    assert seen[:1] == b"\x16", seen[:64]  # a TLS ClientHello, not the protocol
    assert c.token.encode() not in seen and b"register" not in seen
    assert not (tmp_path / "order-executed").exists()


# -- roles: who may call what ------------------------------------------------------------

#: The orders only the master may give a worker (over the worker's own link): every
#: method declared ``roles={Role.MASTER}`` in dsml/worker/orders.py and runner.py.
ORDERS = {
    "run": ({"Attempt": 4242}, json.dumps({"attempt_id": 4242, "command": ["true"]}).encode()),
    "kill": ({"Attempt": 1}, b""),
    "replicate": ({"Key": "seed/value", "Version": 1, "To": "127.0.0.1:1"}, b""),
    "drop": ({"Key": "seed/value", "Version": 1}, b""),
    "verify": ({"Key": "seed/value", "Version": 1, "Sha256": "0" * 64}, b""),
}


def _declared(*handlers: type) -> dict[str, frozenset[Role]]:
    """The roles each ``@responder`` of the handler classes declares, by method."""
    found = {}
    for cls in handlers:
        for fn in vars(cls).values():
            mark = getattr(fn, responders._MARK, None)
            if mark is not None:
                found[mark.name] = mark.roles
    return found


def _only(declared: dict[str, frozenset[Role]], role: Role) -> set[str]:
    return {name for name, roles in declared.items() if roles == {role}}


def test_role_every_single_role_method_is_tried() -> None:
    """The tables of this suite hold every method that one role alone may call, read
    from the ``@responder`` declarations: a new one is tried below, or this fails."""
    master = _declared(MasterHandler)
    storage = _declared(StorageHandler, TaskLogs)
    orders = _declared(WorkerOrders, TaskOrders)
    assert _only(orders, Role.MASTER) == set(ORDERS)
    assert set(orders) - set(ORDERS) == {"ping"}
    assert _only(master, Role.WORKER) == set(WORKER_ONLY)
    assert _only(master, Role.CLIENT) == set(CLIENT_ONLY_MASTER)
    assert _only(storage, Role.CLIENT) == set(CLIENT_ONLY_STORAGE)


@pytest.mark.parametrize("method", sorted(ORDERS))
@pytest.mark.parametrize("kind,name", [("user", "alice"), ("worker", "w2")])
def test_role_worker_orders_from_a_user_or_worker_are_refused(
    sec: Sec, method: str, kind: str, name: str
) -> None:
    """A user, or another worker, sending a master's order to a worker's storage server:
    the order is not served there (only down the worker's own link to the master)."""
    before = settled_snapshot(sec)
    headers, payload = ORDERS[method]
    with sec.conn("w1", kind, name) as conn:
        head = refused(conn, method, headers, payload, code="unknown-method")
    assert method in head.headers.get("message", "")
    unchanged(sec, before)


WORKER_ONLY = {
    "register": {"Name": "w1", "Host": "127.0.0.1", "Port": 1, "Slots": 1,
                 "Dsml-Version": "0", "Protocol-Version": 1},
    "heartbeat": {"Name": "w1", "Incarnation": 1, "Free-Slots": 0, "Stored-Bytes": 0,
                  "Stored-Files": 0, "Free-Disk": 0},
    "report": {"Name": "w1", "Incarnation": 1},
    "task_result": {"Name": "w1", "Incarnation": 1},
    "bad_copy": {"Name": "w1", "Incarnation": 1, "Key": "seed/file", "Version": 1},
    "peers": {"Name": "w1", "Incarnation": 1},
}


@pytest.mark.parametrize("method", sorted(WORKER_ONLY))
def test_role_user_calling_worker_methods_on_the_master_is_forbidden(
    sec: Sec, method: str
) -> None:
    """A user certificate (even an admin's) may not register, beat, report or send
    task results: ``forbidden``, naming who may."""
    before = settled_snapshot(sec)
    with sec.conn("master", "user", "admin") as conn:
        head = refused(conn, method, WORKER_ONLY[method])
    assert "worker" in head.headers["message"]
    unchanged(sec, before)


CLIENT_ONLY_MASTER = {
    "remove": {"Key": "seed/value"},
    "nodes": {},
    "list": {},
    "submit": {},
    "jobs": {},
    "status": {"Job": "j1"},
    "cancel": {"Job": "j1"},
    "wait": {"Job": "j1", "Timeout": 1},
    "logs": {"Job": "j1"},
    "result": {"Job": "j1", "Task": 0},
}


@pytest.mark.parametrize("method", sorted(CLIENT_ONLY_MASTER))
def test_role_worker_calling_client_methods_on_the_master_is_forbidden(
    sec: Sec, method: str
) -> None:
    """A worker certificate may not use the master's client methods (remove a key, run
    or cancel jobs, list): ``forbidden``."""
    before = settled_snapshot(sec)
    payload = json.dumps({"tasks": [{"command": ["true"]}]}).encode() if method == "submit" else b""
    with sec.conn("master", "worker", "w1") as conn:
        refused(conn, method, CLIENT_ONLY_MASTER[method], payload)
    unchanged(sec, before)


CLIENT_ONLY_STORAGE = {
    "delete": {"Key": "seed/value"},
    "stat": {"Key": "seed/value"},
    "list": {},
    "task_log": {"Attempt": 1, "Stream": "stdout"},
}


@pytest.mark.parametrize("method", sorted(CLIENT_ONLY_STORAGE))
def test_role_worker_calling_client_methods_on_a_worker_is_forbidden(
    sec: Sec, method: str
) -> None:
    """A worker certificate may not delete, stat, list or read task logs on another
    worker's storage server: ``forbidden``."""
    before = settled_snapshot(sec)
    with sec.conn("w1", "worker", "w2") as conn:
        refused(conn, method, CLIENT_ONLY_STORAGE[method])
    unchanged(sec, before)


def _register(name: str, host: str = "127.0.0.1", port: int = W3_PORT) -> dict[str, object]:
    from dsml import __version__
    from dsml.protocol.codec import PROTOCOL_VERSION

    return {"Name": name, "Host": host, "Port": port, "Slots": 1,
            "Dsml-Version": __version__, "Protocol-Version": PROTOCOL_VERSION}


def test_role_user_certificate_named_like_a_worker_cannot_register(sec: Sec) -> None:
    """A user certificate named w1 (a worker of the config) registering as w1:
    its role is client, so ``forbidden``, whatever its name."""
    before = settled_snapshot(sec)
    with sec.conn("master", "user", "w1") as conn:
        head = refused(conn, "register", _register("w1"))
    assert "worker" in head.headers["message"]
    unchanged(sec, before)


def test_role_worker_registering_under_another_workers_name_is_forbidden(sec: Sec) -> None:
    """w2's certificate registering as w3: ``forbidden``, naming both."""
    before = settled_snapshot(sec)
    with sec.conn("master", "worker", "w2") as conn:
        head = refused(conn, "register", _register("w3"))
    assert "w2" in head.headers["message"] and "w3" in head.headers["message"]
    unchanged(sec, before)


def test_role_register_of_a_name_not_in_the_config_is_forbidden(sec: Sec) -> None:
    """A valid worker certificate for w9, a name the config does not list, may not
    register: ``forbidden``."""
    before = settled_snapshot(sec)
    with sec.conn("master", "worker", "w9") as conn:
        refused(conn, "register", _register("w9"))
    unchanged(sec, before)


@pytest.mark.parametrize("host,port", [("10.9.9.9", W3_PORT), ("127.0.0.1", W3_PORT + 1)])
def test_role_register_with_another_host_or_port_than_the_configs_is_forbidden(
    sec: Sec, host: str, port: int
) -> None:
    """w3's own certificate registering w3 at a host or port other than the config's
    (127.0.0.1:9): ``forbidden`` (else uploads would be sent where w3 chose)."""
    before = settled_snapshot(sec)
    with sec.conn("master", "worker", "w3") as conn:
        refused(conn, "register", _register("w3", host, port))
    unchanged(sec, before)


def test_role_user_cannot_cancel_another_users_job(sec: Sec) -> None:
    """bob cancelling alice's running job: ``forbidden`` naming the owner; it runs on."""
    before = settled_snapshot(sec)
    with sec.conn("master", "user", "bob") as conn:
        head = refused(conn, "cancel", {"Job": sec.idle_job})
    assert "alice" in head.headers["message"]
    unchanged(sec, before)


def test_role_user_cannot_locate_another_users_logs(sec: Sec) -> None:
    """bob asking the master where alice's logs are: ``forbidden``."""
    before = settled_snapshot(sec)
    with sec.conn("master", "user", "bob") as conn:
        refused(conn, "logs", {"Job": sec.done_job})
    unchanged(sec, before)


def test_role_user_cannot_read_another_users_task_results(sec: Sec) -> None:
    """bob asking the master for a result of alice's job (a function's return value is
    her data): ``forbidden``; alice is answered (``not-found``: her task declared none)."""
    before = settled_snapshot(sec)
    with sec.conn("master", "user", "bob") as conn:
        head = refused(conn, "result", {"Job": sec.done_job, "Task": 0})
    assert "alice" in head.headers["message"]
    with sec.conn("master", "user", "alice") as conn:
        refused(conn, "result", {"Job": sec.done_job, "Task": 0}, code="not-found")
    unchanged(sec, before)


def test_role_user_cannot_read_another_users_logs_from_the_worker(sec: Sec) -> None:
    """bob asking the worker that ran alice's attempt for its log: ``forbidden``; alice
    herself reads it there."""
    before = settled_snapshot(sec)
    request = {"Attempt": sec.done_attempt, "Stream": "stdout"}
    with sec.conn(sec.done_worker, "user", "bob") as conn:
        head = refused(conn, "task_log", request)
    assert "not yours" in head.headers["message"]
    with sec.conn(sec.done_worker, "user", "alice") as conn:
        head, body = conn.call("task_log", request)
        _ok(head, body)
        assert body == b"alice-out\n"
    unchanged(sec, before)


def test_role_no_user_reads_a_jobs_environment(sec: Sec) -> None:
    """A task's env holds secrets: it is in no answer to bob (status, wait, jobs), nor
    even to alice, its owner."""
    before = settled_snapshot(sec)
    for user in ("bob", "alice"):
        with sec.conn("master", "user", user) as conn:
            for method, headers in [("status", {"Job": sec.done_job}),
                                    ("status", {"Job": sec.idle_job}),
                                    ("wait", {"Job": sec.done_job, "Timeout": 1}),
                                    ("jobs", {"Limit": 1000})]:
                head, body = conn.call(method, headers)
                _ok(head, body)
                assert SECRET.encode() not in body, (user, method)
                assert SECRET not in repr(head.headers), (user, method)
    unchanged(sec, before)


def test_role_the_reserved_user_name_token_cannot_be_issued(sec: Sec) -> None:
    """``dsml pki issue user token`` is refused: ``token`` owns every job submitted with
    the cluster token."""
    r = sec.c.cli("pki", "issue", "user", "token", check=False)
    assert r.returncode != 0 and b"reserved" in r.stderr, r.stderr


def test_role_a_forged_certificate_named_token_is_refused(sec: Sec) -> None:
    """A certificate the CA signed for user ``token`` (made by hand, around the CLI's
    refusal) would speak for every token holder (the owner of every job submitted with
    the token): the master refuses it like any certificate naming no identity it takes."""
    before = settled_snapshot(sec)
    ca = pki.ca_paths(sec.pki)
    cert, key = forge_certificate(sec.forged, ca.cert, ca.key, cn="token", ou="user",
                                  name="token-user")
    refused_identity(sec.addr("master"), client_context(ca.cert, cert, key), "token")
    unchanged(sec, before)


# -- the attacks of the issue ------------------------------------------------------------


def test_attack_direct_write_with_a_huge_version_is_forbidden(sec: Sec) -> None:
    """A user writing straight to a worker with ``Version: 999999999999999``:
    ``forbidden``; the key's version and the master's counter are unchanged."""
    before = settled_snapshot(sec)
    with sec.conn("w1", "user", "admin") as conn:
        refused(conn, "value_upload", {"Key": "seed/value", "Version": HUGE_VERSION}, b"evil")
        refused(conn, "file_upload", {"Key": "seed/file", "Version": HUGE_VERSION}, b"evil")
        head, body = conn.call("stat", {"Key": "seed/value"})
        _ok(head, body)
        assert int(head.headers["version"]) < HUGE_VERSION
    unchanged(sec, before)


def test_attack_forward_to_an_address_the_client_chose_is_forbidden(sec: Sec) -> None:
    """An upload whose ``Forward`` names a listener of the attacker's: ``forbidden``, and
    no connection ever reaches that listener (the worker answers only after its forward
    has connected or failed, so a connection would already be queued)."""
    before = settled_snapshot(sec)
    trap = socket.create_server(("127.0.0.1", 0))
    trap.setblocking(False)
    try:
        forward = f"127.0.0.1:{trap.getsockname()[1]}"
        with sec.conn("w1", "user", "admin") as conn:
            refused(conn, "value_upload", {"Key": "attack/fwd", "Forward": forward}, b"x")
            refused(conn, "file_upload", {"Key": "attack/fwd", "Forward": forward}, b"x")
        # Whatever is queued: none of it from w1 (another test run's stray dial may be).
        w1 = sec.c.procs["w1"].pid
        while True:
            try:
                conn, _ = trap.accept()
            except BlockingIOError:
                break
            with conn:
                assert not peer_is_process(conn, w1), "w1 connected to the client's address"
    finally:
        trap.close()
    unchanged(sec, before)


def test_attack_corrupt_report_from_a_client_keeps_the_healthy_copy(sec: Sec) -> None:
    """A client reporting a healthy copy corrupt: the copy stays in the directory (same
    replicas, same version) and stays readable from that worker."""
    before = settled_snapshot(sec)
    entry = next(k for k in before.keys if k[0] == "seed/file")
    victim = entry[4][0]
    with sec.conn("master", "user", "admin") as conn:
        head, body = conn.call("corrupt", {"Key": "seed/file", "Worker": victim})
        _ok(head, body)
        assert head.headers["checking"] == "1"  # the holder is asked to re-hash its copy
        # One check per copy at a time: a second hint starts a check only once the first
        # has ended, and only while the copy is still the directory's.
        poll(lambda: conn.call("corrupt", {"Key": "seed/file", "Worker": victim})[0]
             .headers.get("checking") == "1" or None, "the first re-hash ended, copy kept",
             timeout=WAIT)
    with sec.conn(victim, "user", "admin") as conn:
        head, body = conn.call("file_retrieve", {"Key": "seed/file"})
        _ok(head, body)
        assert body == sec.seed_file
    unchanged(sec, before)


FORGED_GRANT = f"{HUGE_VERSION}.{'0' * 32}"


def test_attack_write_with_a_forged_grant_is_forbidden(sec: Sec) -> None:
    """A write carrying a grant the master never signed (a huge version, any MAC):
    ``forbidden``; the key's version and the counter are unchanged."""
    before = settled_snapshot(sec)
    with sec.conn("w1", "user", "admin") as conn:
        refused(conn, "value_upload", {"Key": "seed/value", "Grant": FORGED_GRANT}, b"evil")
        refused(conn, "file_upload", {"Key": "seed/file", "Grant": FORGED_GRANT}, b"evil")
    unchanged(sec, before)


def test_attack_grant_of_one_key_replayed_on_another_is_forbidden(sec: Sec) -> None:
    """The master's real grant for a key of the attacker's, used to overwrite another
    key: ``forbidden`` (a grant is for its key only); seed/value keeps its version."""
    before = settled_snapshot(sec)
    with sec.conn("master", "user", "bob") as m:
        head, body = m.call("place", {"Key": "bob/own", "Size": 4})
        _ok(head, body)
        grant = head.headers["grant"]
    with sec.conn("w1", "user", "bob") as conn:
        refused(conn, "value_upload", {"Key": "seed/value", "Grant": grant}, b"evil")
    unchanged(sec, before, placed=1)


def test_attack_commit_with_a_forged_grant_is_refused(sec: Sec) -> None:
    """A client committing seed/value at a version of its choosing (a forged grant):
    refused with ``forbidden``; the directory is unchanged."""
    before = settled_snapshot(sec)
    entry = next(k for k in before.keys if k[0] == "seed/value")
    with sec.conn("master", "user", "admin") as conn:
        refused(conn, "commit", {"Key": "seed/value", "Size": entry[1], "Sha256": entry[2],
                                 "Grant": FORGED_GRANT, "Workers": ",".join(entry[4])})
    unchanged(sec, before)


def test_role_bad_copy_about_another_workers_copy_is_refused(sec: Sec) -> None:
    """w2's certificate saying w1's copy is bad, on a link that does not carry w1's
    registration: ``not-registered`` (only the holder, on its own link, speaks for its
    copy); w1's copy stays."""
    before = settled_snapshot(sec)
    entry = next(k for k in before.keys if k[0] == "seed/file")
    with sec.conn("master", "worker", "w2") as conn:
        refused(conn, "bad_copy", {"Name": "w1", "Incarnation": before.nodes["w1"][1],
                                   "Key": "seed/file", "Version": entry[3]},
                code="not-registered")
    unchanged(sec, before)


def _inventory(key: str, version: int) -> bytes:
    return (json.dumps({"key": key, "size": 5, "sha256": hashlib.sha256(b"evil!").hexdigest(),
                        "version": version}) + "\n").encode()


def test_attack_register_with_a_never_issued_newer_version_is_not_trusted(sec: Sec) -> None:
    """w3 (a real identity, its process not running) registers with an inventory
    claiming seed/file at a version the master never issued: the claim is not trusted,
    the real copies are not dropped, the counter does not move."""
    before = settled_snapshot(sec)
    with sec.conn("master", "worker", "w3") as conn:
        head, body = conn.call("register", _register("w3"), _inventory("seed/file", HUGE_VERSION))
        # Registered or refused, the inventory must not be believed.
        if head.ok:
            assert int(head.headers["rejected"]) >= 1, head
    unchanged(sec, before, registered="w3")


def test_attack_report_of_a_never_issued_version_is_not_trusted(sec: Sec) -> None:
    """A registered w3 reporting a store of seed/value at a never-issued version: not
    taken; the real copies stay; the counter does not move."""
    before = settled_snapshot(sec)
    with sec.conn("master", "worker", "w3") as conn:
        head, body = conn.call("register", _register("w3"))
        _ok(head, body)
        report = json.dumps({"op": "store", "key": "seed/value", "size": 5,
                             "sha256": hashlib.sha256(b"evil!").hexdigest(),
                             "version": HUGE_VERSION}).encode() + b"\n"
        head, body = conn.call("report", {"Name": "w3", "Incarnation": head.headers["incarnation"]},
                               report)
        _ok(head, body)
        assert int(head.headers["refused"]) == 1 and int(head.headers["taken"]) == 0, head
    unchanged(sec, before, registered="w3")


# -- at rest ---------------------------------------------------------------------------


def test_at_rest_state_and_data_are_private(sec: Sec) -> None:
    """Every directory under the master's state and the workers' data is 0700, every
    file 0600 (SQLite with job environments included), whatever the umask."""
    checked = 0
    for top in ("master", "w1", "w2"):
        for dirpath, _dirnames, filenames in os.walk(sec.c.root / top):
            assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
            for f in filenames:
                path = Path(dirpath) / f
                assert stat.S_IMODE(path.lstat().st_mode) == 0o600, path
                checked += 1
    assert checked > 3


def test_at_rest_no_secret_in_logs_or_argv(sec: Sec) -> None:
    """Neither the cluster token nor a task's secret environment appears in any
    process's log or command line (what ``ps`` shows)."""
    hidden = [sec.c.token.encode(), SECRET.encode()]
    for name, proc in sec.c.procs.items():
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        log = sec.c.log_path(name).read_bytes()
        for secret in hidden:
            assert secret not in argv, name
            assert secret not in log, name


def _token_cluster(
    root: Path, token: str | None = None, token_file: Path | None = None
) -> LocalCluster:
    """A plain-token cluster (master and w1) under ``root``; with ``token_file``, its
    config reads the token from that file instead."""
    c = LocalCluster(root, workers=("w1",), token=token or secrets.token_hex(16),
                     extra={"cluster": {"heartbeat_interval": 5.0,
                                        "heartbeat_timeout": 120.0}})
    if token_file is not None:
        config = yaml.safe_load(c.config_path.read_text())
        del config["cluster"]["token"]
        config["cluster"]["token_file"] = str(token_file)
        c.config_path.write_text(yaml.safe_dump(config))
    return c


def test_at_rest_a_one_character_token_is_refused_at_start_up(tmp_path: Path) -> None:
    """A master configured with a 1-character token does not start; it says why."""
    c = _token_cluster(tmp_path / "c", token="x")
    try:
        with pytest.raises(ProcessFailed) as info:
            c.start("master")
        assert "token" in str(info.value)
    finally:
        c.stop()


def test_at_rest_an_oversized_token_file_is_refused_at_start_up(tmp_path: Path) -> None:
    """A token_file over the size bound (1 MiB of token) is refused at start-up, not read."""
    big = tmp_path / "token"
    big.write_bytes(b"a" * (1 << 20))
    big.chmod(0o600)
    c = _token_cluster(tmp_path / "c", token_file=big)
    try:
        with pytest.raises(ProcessFailed) as info:
            c.start("master")
        assert "token_file" in str(info.value)
    finally:
        c.stop()


# -- the plain-token cluster (loopback development mode) -------------------------------


@attrs.define
class Plain:
    """The module's plain-token cluster: a master and w1, every token holder every role."""

    c: LocalCluster

    def conn(self, where: str) -> RawConn:
        """A raw TCP connection to ``where``, authenticated with the cluster token."""
        conn = RawConn.open(self.c.address(where), None, timeout=WAIT)
        _ok(*conn.call("auth", {"Token": self.c.token}))
        return conn

    def state(self) -> tuple[Any, ...]:
        """Keys with versions and replicas, the workers, and the counter (a probe place)."""
        with self.conn("master") as m:
            head, body = m.call("list", {"Limit": 10000})
            keys = sorted((e["key"], e["version"], tuple(e["replicas"])) for e in _jsonl(body))
            head, body = m.call("nodes")
            nodes = sorted((n["name"], n["incarnation"]) for n in _jsonl(body))
            head, body = m.call("place", {"Key": "probe/counter", "Size": 1})
            _ok(head, body)
            return keys, nodes, int(head.headers["version"])

    def unchanged(self, before: tuple[Any, ...]) -> None:
        """As ``before`` but for the counter, moved by the second probe only; the key k
        still reads back."""
        keys, nodes, counter = self.state()
        assert (keys, nodes, counter) == (before[0], before[1], before[2] + 1)
        host, port = self.c.address("master")
        with ClusterClient(host, port, self.c.token, timeout=WAIT) as client:
            assert client.get("k") == b"real"


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plain]:
    """A plain-token master and w1 holding the value k; always stopped."""
    c = _token_cluster(tmp_path_factory.mktemp("plain") / "c")
    try:
        c.start("master")
        c.start("w1")
        host, port = c.address("master")
        with ClusterClient(host, port, c.token, timeout=WAIT) as client:
            poll(lambda: [n.state for n in client.nodes()] == ["alive"] or None, "w1 alive",
                 timeout=WAIT)
            client.set("k", b"real")
        yield Plain(c)
    finally:
        c.stop()


def test_token_mode_register_of_a_name_not_in_the_config_is_refused(plain: Plain) -> None:
    """The issue's first attack, with the token every lab member has: a ``register`` of
    a name the config does not list, its inventory claiming a newer version of a real
    key, is refused (``forbidden``); the real copy stays and the counter does not move."""
    before = plain.state()
    with plain.conn("master") as conn:
        head, _ = conn.call("register", _register("fake", "127.0.0.1", 1),
                            _inventory("k", HUGE_VERSION))
        assert (head.kind, head.headers.get("code")) == ("ERROR", "forbidden"), head
    plain.unchanged(before)


def test_token_mode_direct_write_with_a_huge_version_is_forbidden(plain: Plain) -> None:
    """The issue's second attack: ``Version: 999999999999999`` on a write straight to a
    worker, with the token: ``forbidden``; k's version and the counter stay."""
    before = plain.state()
    with plain.conn("w1") as conn:
        refused(conn, "value_upload", {"Key": "k", "Version": HUGE_VERSION}, b"evil")
    plain.unchanged(before)


def test_token_mode_forward_to_the_clients_address_is_forbidden(plain: Plain) -> None:
    """The issue's fourth attack: ``Forward`` naming a listener of the client's, with the
    token: ``forbidden``, and w1 never connects there (so never sends it the token)."""
    before = plain.state()
    trap = socket.create_server(("127.0.0.1", 0))
    trap.setblocking(False)
    try:
        forward = f"127.0.0.1:{trap.getsockname()[1]}"
        with plain.conn("w1") as conn:
            refused(conn, "value_upload", {"Key": "attack/fwd", "Forward": forward}, b"x")
        w1 = plain.c.procs["w1"].pid
        while True:
            try:
                got, _ = trap.accept()
            except BlockingIOError:
                break
            with got:
                assert not peer_is_process(got, w1), "w1 connected to the client's address"
    finally:
        trap.close()
    plain.unchanged(before)


def test_token_mode_corrupt_from_a_client_keeps_the_copy(plain: Plain) -> None:
    """The issue's third attack: ``corrupt`` about w1's healthy copy of k, with the
    token: w1 re-hashes it, finds it good, and the copy stays (read back below)."""
    before = plain.state()
    with plain.conn("master") as conn:
        head, body = conn.call("corrupt", {"Key": "k", "Worker": "w1"})
        _ok(head, body)
        assert head.headers["checking"] == "1"
        poll(lambda: conn.call("corrupt", {"Key": "k", "Worker": "w1"})[0]
             .headers.get("checking") == "1" or None, "the first re-hash ended, copy kept",
             timeout=WAIT)
    plain.unchanged(before)


def test_token_mode_no_outsider_gets_the_grant_key(plain: Plain) -> None:
    """The chain behind the first two attacks: a name not in the config must not become
    a worker, or its registration answer would hand it the master's grant key, and a
    grant it signs itself (k at 999999999999999) would be a valid write on w1.  Either
    the registration is ``forbidden``, or w1 refuses the self-signed write."""
    before = plain.state()
    with plain.conn("master") as conn:
        head, _ = conn.call("register", _register("outsider", "127.0.0.1", 1))
        if not head.ok:
            assert head.headers.get("code") == "forbidden", head
        else:
            grant = Grants(head.headers["grant-key"]).issue("k", HUGE_VERSION)
            with plain.conn("w1") as w1:
                refused(w1, "value_upload", {"Key": "k", "Grant": grant}, b"evil")
    if not head.ok:
        plain.unchanged(before)
