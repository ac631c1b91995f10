"""A TLS cluster as real processes (cluster.tls: true, certificates from `dsml pki init`):
it works end to end, and every peer is who its certificate says or is refused."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsml import pki
from dsml.client import ClusterClient, DsmlError
from dsml.client.server import Client, ClientTls
from dsml.errors import ConnectionLost
from dsml.localcluster import LocalCluster
from dsml.net.listen import write_addr_file
from dsml.testing.poll import poll

pytestmark = pytest.mark.processes

AUTH_TIMEOUT = 1.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A TLS master and two workers; always stopped."""
    c = LocalCluster(
        tmp_path / "c",
        workers=("w1", "w2"),
        tls=True,
        extra={"limits": {"auth_timeout": AUTH_TIMEOUT}},
    )
    try:
        yield c
    finally:
        c.stop()


def _started(c: LocalCluster, *names: str) -> None:
    """Start the master and the workers ``names``; wait until they are all alive."""
    for name in ("master", *names):
        c.start(name)
    if names:
        poll(lambda: c.cli("nodes").stdout.count(b"alive") == len(names) or None,
             "workers registered")


def _master(c: LocalCluster, tls: ClientTls | None) -> ClusterClient:
    host, port = c.address("master")
    return ClusterClient(host, port, c.token, timeout=10, tls=tls)


def test_tls_cluster_end_to_end(cluster: LocalCluster, tmp_path: Path) -> None:
    """Upload (a pipeline between workers), download, values and a job, all over TLS."""
    _started(cluster, "w1", "w2")
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 20_000)
    cluster.cli("upload", str(data), "d/data.bin")
    cluster.cli("download", "d/data.bin", str(tmp_path / "copy.bin"))
    assert (tmp_path / "copy.bin").read_bytes() == data.read_bytes()
    cluster.cli("set", "v", "42")
    assert cluster.cli("get", "v").stdout.strip() == b"42"
    assert b"replicas" in cluster.cli("stat", "d/data.bin").stdout
    job = cluster.cli("-q", "submit", "--", "sh", "-c", "echo tls-job").stdout.strip().decode()
    cluster.cli("wait", job, "--timeout", "60")
    assert b"tls-job" in cluster.cli("logs", job).stdout
    with cluster.client("w2") as w2:  # a worker's storage server, directly
        assert w2.get("v") == b"42"
    # A user issued while the cluster runs is known at once (same CA); -i picks it.
    cluster.cli("pki", "issue", "user", "alice")
    assert cluster.cli("-i", "alice", "get", "v").stdout.strip() == b"42"
    # The cluster client insists on the master's certificate at the master's address.
    host, port = cluster.address("w1")
    with pytest.raises(DsmlError, match="is not a dsml server"):
        ClusterClient(host, port, cluster.token, timeout=5, tls=cluster.user_tls())


def test_certificate_from_another_ca_is_refused(cluster: LocalCluster, tmp_path: Path) -> None:
    """A user certificate from another CA is refused by the master, and a client that
    trusts another CA refuses the master."""
    _started(cluster)
    other = tmp_path / "other-pki"
    pki.init_cluster(other, "127.0.0.1", [])
    host, port = cluster.address("master")
    # Trusts the cluster CA (so the client side is happy) but presents a foreign cert.
    foreign = ClientTls(other, "admin")
    foreign.context.load_verify_locations(cafile=str(pki.ca_paths(cluster.pki_dir).cert))
    with pytest.raises((ConnectionLost, DsmlError)):
        Client(host, port, cluster.token, timeout=5, tls=foreign).nodes()
    # Trusts only the other CA: the master's certificate fails verification.
    with pytest.raises(ConnectionLost):
        Client(host, port, cluster.token, timeout=5, tls=ClientTls(other, "admin"))
    # The cluster's own user gets in.
    with _master(cluster, cluster.user_tls()) as c:
        assert c.nodes() == []


def test_user_certificate_cannot_register(cluster: LocalCluster) -> None:
    """A user's certificate holds the client role only: register is forbidden, and so is
    a worker registering under another worker's name."""
    _started(cluster)
    host, port = cluster.address("master")
    headers = {"Name": "w1", "Host": "127.0.0.1", "Port": 1, "Slots": 1,
               "Dsml-Version": "0", "Protocol-Version": 1}
    with Client(host, port, cluster.token, timeout=5, tls=cluster.user_tls()) as c:
        with pytest.raises(DsmlError) as info:
            c.call("register", headers)
        assert info.value.code == "forbidden"
    w2 = ClientTls(cluster.pki_dir, "w2", kind="worker")
    with Client(host, port, cluster.token, timeout=5, tls=w2) as c:
        with pytest.raises(DsmlError) as info:
            c.call("register", headers)
        assert info.value.code == "forbidden"
        assert "worker w2 may not register as worker 'w1'" in info.value.message


def test_worker_refuses_a_master_with_a_worker_certificate(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """A TLS server holding a valid worker certificate, where the master should be, is
    cut by the worker after the handshake: it never registers with it."""
    w2 = pki.identity_paths(cluster.pki_dir, "worker", "w2")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(pki.ca_paths(cluster.pki_dir).cert))
    ctx.load_cert_chain(str(w2.cert), str(w2.key))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)
    seen: list[bytes] = []
    closed = threading.Event()

    def impostor() -> None:
        try:
            raw, _ = listener.accept()
            with ctx.wrap_socket(raw, server_side=True) as conn:
                conn.settimeout(10)
                seen.append(conn.recv(65536))  # the worker's auth request
                conn.sendall(b"OK 1 0\r\n\r\n")  # whatever it is, the worker reads it
                while conn.recv(65536):
                    seen.append(b"more")
        except OSError:
            pass
        finally:
            closed.set()

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    (tmp_path / "c" / "master").mkdir(parents=True, exist_ok=True)
    write_addr_file(cluster.addr_file("master"), "127.0.0.1", listener.getsockname()[1])
    try:
        cluster.start("w1")
        assert closed.wait(20), "the worker kept its link to a non-master"
        assert seen and seen[0].startswith(b"auth ")
        assert b"more" not in seen  # no register ever followed
        poll(lambda: "expected master" in cluster.tail("w1", 200) or None, "refusal logged")
    finally:
        listener.close()
        thread.join(5)


def test_plaintext_to_a_tls_port_is_closed(cluster: LocalCluster) -> None:
    """A client speaking the protocol in clear to a TLS port gets no answer, only a close."""
    _started(cluster)
    host, port = cluster.address("master")
    with pytest.raises(ConnectionLost):
        Client(host, port, cluster.token, timeout=5)


def test_handshake_that_never_finishes_is_closed(cluster: LocalCluster) -> None:
    """A connection that never starts its handshake is closed after auth_timeout."""
    _started(cluster)
    started = time.monotonic()
    with socket.create_connection(cluster.address("master"), timeout=10) as s:
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass  # cut (no TLS session to close politely)
    assert AUTH_TIMEOUT * 0.9 < time.monotonic() - started < 5.0


def test_rotation_revoked_worker_is_refused_until_restarted_with_a_new_certificate(
    cluster: LocalCluster,
) -> None:
    """The README's rotation: revoke w2's certificate, issue a new one, restart the master
    (it reads the CRL at start-up): the old w2 is refused; w2 restarted gets back in."""
    _started(cluster, "w1", "w2")
    cluster.cli("pki", "revoke", "w2")
    cluster.cli("pki", "issue", "worker", "w2")
    cluster.kill("master", signal.SIGTERM)
    cluster.start("master")

    def states() -> dict[str, str]:
        doc = json.loads(cluster.cli("nodes", "--json").stdout)
        return {w["name"]: w["state"] for w in doc["workers"]}

    poll(lambda: states().get("w1") == "alive" or None, "w1 back with the new master")
    poll(lambda: "revoked" in cluster.tail("master", 300) or None, "the old w2 refused")
    assert states().get("w2") != "alive"
    cluster.kill("w2", signal.SIGTERM)
    cluster.start("w2")
    poll(lambda: states().get("w2") == "alive" or None, "w2 back with its new certificate")


def _user(c: LocalCluster, name: str) -> ClientTls:
    return ClientTls(c.pki_dir, name)


def _job_id(r: object) -> str:
    return r.stdout.strip().decode()  # type: ignore[attr-defined, no-any-return]


def test_the_jobs_of_one_user_are_not_anothers(tmp_path: Path) -> None:
    """Jobs have owners: alice's jobs cannot be cancelled by bob, nor their logs read
    (through the master, or from the worker directly), nor their stderr tails seen in
    the status; alice and the admins (``admin``, and ``carol`` from ``cluster.admins``)
    can; ``dsml jobs`` and ``dsml status`` show the owners."""
    c = LocalCluster(tmp_path / "c", workers=("w1",), tls=True,
                     extra={"cluster": {"admins": ["admin", "carol"]},
                            "workers": {"w1": {"host": "127.0.0.1", "port": 0,
                                               "data_dir": "w1", "slots": 4}}})
    try:
        _started(c, "w1")
        for name in ("alice", "bob", "carol"):
            c.cli("pki", "issue", "user", name)
        idle = _job_id(c.cli("-i", "alice", "-q", "submit", "--name", "idle", "--",
                             "sleep", "600"))
        idle2 = _job_id(c.cli("-i", "alice", "-q", "submit", "--name", "idle2", "--",
                              "sleep", "600"))
        done = _job_id(c.cli(
            "-i", "alice", "-q", "submit", "--name", "secret", "--max-attempts", "1", "--",
            "sh", "-c", "echo alice-out; echo alice-err >&2; exit 3",
        ))
        c.cli("-i", "alice", "wait", done, "--timeout", "60", check=False)
        mine = _job_id(c.cli("-i", "bob", "-q", "submit", "--name", "bobs", "--", "true"))
        c.cli("-i", "bob", "wait", mine, "--timeout", "60")

        # dsml jobs shows each job's owner, to anyone.
        listing = c.cli("-i", "bob", "jobs").stdout.decode()
        header, *rows = listing.splitlines()
        assert header.split() == ["JOB", "NAME", "OWNER", "STATE", "AGE", "TASKS"], listing
        owners = {row.split()[0]: row.split()[2] for row in rows}
        assert owners == {idle: "alice", idle2: "alice", done: "alice", mine: "bob"}, listing
        jobs = json.loads(c.cli("-i", "bob", "jobs", "--json").stdout)["jobs"]
        assert {j["id"]: j["owner"] for j in jobs} == owners
        assert "  owner: alice" in c.cli("-i", "bob", "status", idle).stdout.decode()

        # bob may neither cancel alice's job nor read its logs.
        r = c.cli("-i", "bob", "cancel", idle, check=False)
        assert r.returncode != 0 and b"[forbidden]" in r.stderr, r.stderr
        assert b"belongs to alice" in r.stderr, r.stderr
        r = c.cli("-i", "bob", "logs", done, check=False)
        assert r.returncode != 0 and b"[forbidden]" in r.stderr, r.stderr
        assert b"alice-out" not in r.stdout
        # Nor its failed attempt's stderr tail in the status (alice sees it).
        theirs = json.loads(c.cli("-i", "bob", "status", "--json", done, check=False).stdout)
        assert theirs["owner"] == "alice"
        assert theirs["tasks"][0]["attempts"][0]["stderr_tail"] == ""
        hers = json.loads(c.cli("-i", "alice", "status", "--json", done, check=False).stdout)
        assert "alice-err" in hers["tasks"][0]["attempts"][0]["stderr_tail"]
        # Nor from the worker that ran it, asked directly.
        attempt = hers["tasks"][0]["attempts"][0]["id"]
        host, port = c.address("w1")
        request = {"Attempt": attempt, "Stream": "stdout"}
        with Client(host, port, c.token, timeout=10, tls=_user(c, "bob")) as w1:
            with pytest.raises(DsmlError) as info:
                w1.call("task_log", request)
            assert info.value.code == "forbidden"
        for who in ("alice", "admin", "carol"):
            with Client(host, port, c.token, timeout=10, tls=_user(c, who)) as w1:
                assert w1.call("task_log", request)[1] == b"alice-out\n", who
        # bob's own job is his.
        assert c.cli("-i", "bob", "logs", mine).returncode == 0

        # The owner and the admins may do both; the job is still running after bob.
        assert json.loads(c.cli("-i", "alice", "status", "--json", idle).stdout)["state"] in (
            "queued", "running")
        for who in ("alice", "admin", "carol"):
            r = c.cli("-i", who, "logs", done, check=False)
            assert (r.stdout, r.stderr) == (b"alice-out\n", b"alice-err\n"), who
        c.cli("-i", "admin", "cancel", idle)
        c.cli("-i", "alice", "cancel", idle2)
        for job in (idle, idle2):
            state = json.loads(c.cli("-i", "bob", "status", "--json", job, check=False).stdout)
            assert state["state"] == "cancelled", state
    finally:
        c.stop()
