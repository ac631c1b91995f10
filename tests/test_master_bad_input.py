"""Bad input to a real master: a ``twistd -n dsml-master`` process on 127.0.0.1 (OS-chosen
port), spoken to over raw sockets or the blocking :class:`dsml.client.Client` posing as a
worker (``client.call(method, headers, payload)``).

Each refusal is one error with a clear code and message; the connection stays usable
unless the byte stream or the peer cannot be trusted (wrong token); nothing else is
disturbed: workers already registered keep working and good data is kept.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from dsml import __version__
from dsml.client import Client
from dsml.errors import DsmlError
from dsml.localcluster import LocalCluster
from dsml.protocol import codec
from dsml.protocol.codec import END, NEED_DATA, PROTOCOL_VERSION, Head, Parser
from dsml.protocol.methods import check_uint
from dsml.testing.poll import poll

pytestmark = pytest.mark.processes

HEARTBEAT_INTERVAL = 0.5
T = TypeVar("T")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A running master (the fake workers these tests register configured, at any port,
    none started); always stopped.

    Replication 1, so the master never sends a copy order down a fake worker's link.
    """
    c = LocalCluster(
        tmp_path / "cluster",
        workers=("w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "w9", "wa", "wb", "wv"),
        extra={
            "cluster": {
                "replication": 1,
                "heartbeat_interval": HEARTBEAT_INTERVAL,
                "heartbeat_timeout": 10,
            }
        },
    )
    try:
        c.start("master")
        yield c
    finally:
        c.stop()
        for proc in c.procs.values():
            assert proc.poll() is not None, "a process outlived its test"


def connect(cluster: LocalCluster, token: str | None = None) -> Client:
    """An authenticated blocking connection to the master."""
    host, port = cluster.address("master")
    return Client(host, port, cluster.token if token is None else token, timeout=10)


def register_headers(name: str, **changes: object) -> dict[str, object]:
    """The headers a real worker sends with ``register`` (see dsml.worker.link)."""
    headers: dict[str, object] = {
        "Name": name,
        "Host": "127.0.0.1",
        "Port": 9,
        "Slots": 1,
        "Dsml-Version": __version__,
        "Protocol-Version": PROTOCOL_VERSION,
    }
    headers.update(changes)
    return headers


def register(c: Client, name: str, inventory: bytes = b"", **changes: object) -> Head:
    """Register as worker ``name``; return the master's response head."""
    head, _ = c.call("register", register_headers(name, **changes), inventory)
    return head


def heartbeat(c: Client, name: str, incarnation: int) -> Head:
    """One heartbeat as a worker sends it."""
    head, _ = c.call(
        "heartbeat",
        {
            "Name": name,
            "Incarnation": incarnation,
            "Free-Slots": 1,
            "Stored-Bytes": 0,
            "Stored-Files": 0,
            "Free-Disk": 10**9,
        },
    )
    return head


def refused(fn: Callable[[], object]) -> DsmlError:
    """Run ``fn``, which must fail with an error response; return that error."""
    with pytest.raises(DsmlError) as e:
        fn()
    return e.value


def master_keys(c: Client) -> dict[str, dict[str, object]]:
    """The master's ``list``: key -> its row."""
    _, body = c.call("list", {"Limit": 10_000})
    rows = [json.loads(line) for line in body.decode().splitlines()]
    return {row["key"]: row for row in rows}


def nodes(c: Client) -> dict[str, dict[str, object]]:
    """The master's ``nodes``: worker name -> its row."""
    _, body = c.call("nodes", {})
    return {d["name"]: d for d in map(json.loads, body.decode().splitlines())}




def master_log_has(cluster: LocalCluster, text: str) -> bool | None:
    """True once the master's log contains ``text`` (None until then, for :func:`poll`)."""
    return True if text in cluster.log_path("master").read_text(errors="replace") else None


def raw_exchange(
    cluster: LocalCluster, data: bytes, timeout: float = 10.0
) -> tuple[list[Head], bool]:
    """Send raw bytes to the master; read until it closes the connection or ``timeout``.

    Returns the response heads and whether the master closed the connection (every
    caller expects a close, so the full timeout is only spent when a test fails).
    """
    host, port = cluster.address("master")
    parser = Parser(codec.RESPONSE)
    heads: list[Head] = []
    closed = False
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break  # still open
            if not chunk:
                closed = True
                break
            parser.feed(chunk)
            while (event := parser.next_event()) is not NEED_DATA:
                if isinstance(event, Head):
                    heads.append(event)
                else:
                    assert event is END or hasattr(event, "data"), event
    return heads, closed


# -- authentication and registration -----------------------------------------------------


def test_wrong_token_is_refused_and_closed(cluster: LocalCluster) -> None:
    """A worker with the wrong token gets one ``auth-failed`` error, the master closes the
    connection (a register sent right behind it is never answered), and says so in its log."""
    data = codec.encode_request("auth", 1, {"Token": "not-the-token", "Client": "worker evil"})
    data += codec.encode_request("register", 2, register_headers("evil"))
    heads, closed = raw_exchange(cluster, data)
    assert closed, "the master kept a connection with a wrong token open"
    assert [(h.ok, h.headers.get("code"), h.headers.get("message")) for h in heads] == [
        (False, "auth-failed", "wrong token")
    ]
    poll(lambda: master_log_has(cluster, "wrong token"), "the refusal in the master's log")
    # The blocking client says the same, and nothing registered.
    e = refused(lambda: connect(cluster, token="not-the-token"))
    assert e.code == "auth-failed"
    with connect(cluster) as c:
        assert nodes(c) == {}


def test_register_before_auth_is_refused_and_closed(cluster: LocalCluster) -> None:
    """A register with no auth first is ``auth-required`` and the connection is closed."""
    heads, closed = raw_exchange(
        cluster, codec.encode_request("register", 1, register_headers("w9"))
    )
    assert closed
    assert [(h.ok, h.headers.get("code")) for h in heads] == [(False, "auth-required")]
    with connect(cluster) as c:
        assert nodes(c) == {}


@pytest.mark.parametrize(
    ("changes", "theirs", "ours"),
    [
        ({"Dsml-Version": "0.0.0+elsewhere"}, "0.0.0+elsewhere", __version__),
        (
            {"Protocol-Version": PROTOCOL_VERSION + 1},
            f"protocol version: worker {PROTOCOL_VERSION + 1}",
            f"master {PROTOCOL_VERSION}",
        ),
    ],
    ids=["dsml-version", "protocol-version"],
)
def test_version_mismatch_names_both_versions(
    cluster: LocalCluster, changes: dict[str, object], theirs: str, ours: str
) -> None:
    """A worker running another dsml release or wire protocol gets ``version-mismatch``,
    whose message names the worker's and the master's version; it is not registered, and
    the same connection can still register with the right versions."""
    with connect(cluster) as c:
        e = refused(lambda: register(c, "w9", **changes))
        assert e.code == "version-mismatch"
        assert theirs in e.message and ours in e.message, e.message
        assert nodes(c) == {}
        assert int(register(c, "w9").headers["incarnation"]) >= 1
        assert nodes(c)["w9"]["state"] == "alive"


def test_version_mismatch_is_logged_by_the_master(cluster: LocalCluster) -> None:
    """The master's log says why a worker was refused (design: "one clear error message
    on the wire and in the log"), as it does for a duplicate name."""
    with connect(cluster) as c:
        refused(lambda: register(c, "w9", **{"Dsml-Version": "0.0.0+elsewhere"}))
        register(c, "w9")  # a later line in the log: everything before it is written
    poll(lambda: master_log_has(cluster, "worker w9 registered"), "the registration log line")
    assert master_log_has(cluster, "0.0.0+elsewhere"), cluster.tail("master")


def test_malformed_register_headers_are_bad_header(cluster: LocalCluster) -> None:
    """A worker name with a space, or a port that is not a number, is refused as a bad
    header before anything is registered; the connection stays usable."""
    with connect(cluster) as c:
        for changes in ({"Name": "two words"}, {"Port": "eighty"}, {"Port": 0}):
            e = refused(lambda changes=changes: c.call(
                "register", register_headers("w9", **changes)
            ))
            assert e.code == "bad-header", (changes, e)
        assert nodes(c) == {}
        assert c.ping()["role"] == "master"


def test_duplicate_name_is_refused_and_first_worker_keeps_working(cluster: LocalCluster) -> None:
    """A second process claiming the name of a live worker gets ``duplicate-name``; the first
    keeps its incarnation and its heartbeats are still answered."""
    with connect(cluster) as first, connect(cluster) as second:
        inc = int(register(first, "w5").headers["incarnation"])
        e = refused(lambda: register(second, "w5"))
        assert e.code == "duplicate-name"
        assert "already registered" in e.message and "w5" in e.message
        # The impostor's link is no worker: its heartbeats are refused...
        assert refused(lambda: heartbeat(second, "w5", inc)).code == "not-registered"
        # ... while the first's are answered, and it is still that incarnation.
        for _ in range(3):
            assert heartbeat(first, "w5", inc).ok
        row = nodes(first)["w5"]
        assert (row["state"], row["incarnation"]) == ("alive", inc)


def test_duplicate_name_leaves_a_real_worker_alive(cluster: LocalCluster) -> None:
    """The same against a real ``twistd dsml-worker``: after the refused duplicate, its
    heartbeats keep arriving (``nodes`` shows a recent heartbeat, same incarnation)."""
    cluster.start("w1")
    with connect(cluster) as c:
        row = poll(lambda: nodes(c).get("w1"), "w1 to register")
        inc = row["incarnation"]
        e = refused(lambda: register(c, "w1"))
        assert e.code == "duplicate-name"
        refused_at = time.monotonic()

        def beat_after_refusal() -> dict[str, object] | None:
            # The master's clock reads at least ``asked``, so a heartbeat younger than
            # ``asked - refused_at`` arrived after the refusal (both are CLOCK_MONOTONIC).
            asked = time.monotonic()
            row = nodes(c)["w1"]
            late = asked - refused_at > 2 * HEARTBEAT_INTERVAL
            return row if late and row["since_heartbeat"] < asked - refused_at else None

        row = poll(beat_after_refusal, "a heartbeat of w1 after the refused duplicate")
        assert row["state"] == "alive" and row["incarnation"] == inc, row
    # And it still stores data: the whole path through the master works.
    cluster.cli("set", "still/works", "yes")
    assert cluster.cli("get", "still/works").stdout == b"yes"


def test_heartbeat_before_registration_is_not_registered(cluster: LocalCluster) -> None:
    """A heartbeat from a link that never registered is ``not-registered``, also when it
    names a worker that is registered on another link; the connection stays usable."""
    with connect(cluster) as c, connect(cluster) as other:
        assert refused(lambda: heartbeat(c, "w7", 1)).code == "not-registered"
        inc = int(register(other, "w8").headers["incarnation"])
        assert refused(lambda: heartbeat(c, "w8", inc)).code == "not-registered"
        assert heartbeat(other, "w8", inc).ok
        assert c.ping()["role"] == "master"


# -- inventories and reports ---------------------------------------------------------------


def issue_versions(cluster: LocalCluster, n: int) -> None:
    """Have the master issue ``n`` versions (``place`` through a throwaway worker "wv"):
    an inventory or report is trusted only up to the versions the master issued."""
    with connect(cluster) as w, connect(cluster) as c:
        heartbeat(w, "wv", int(register(w, "wv").headers["incarnation"]))
        for i in range(n):
            c.call("place", {"Key": f"issue/{i}", "Size": 1})


def _entry(key: str, data: bytes, version: int = 1) -> dict[str, object]:
    return {"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "version": version}


def test_bad_inventory_entries_are_rejected_and_good_ones_kept(cluster: LocalCluster) -> None:
    """An inventory mixing good entries with bad checksums, negative sizes, keys with
    control characters and unreadable lines: the registration succeeds, ``Rejected`` counts
    exactly the bad lines, and the master lists every good key and none of the bad ones."""
    good = [_entry(f"good/{i}", f"data {i}".encode(), version=i + 1) for i in range(5)]
    good.append(_entry("good/empty", b"", version=9))
    ok_sha = hashlib.sha256(b"x").hexdigest()
    bad_entries = [
        {"key": "bad/short-sha", "size": 1, "sha256": "abc123", "version": 1},
        {"key": "bad/upper-sha", "size": 1, "sha256": ok_sha.upper(), "version": 1},
        {"key": "bad/sha-not-text", "size": 1, "sha256": 12345, "version": 1},
        {"key": "bad/negative", "size": -1, "sha256": ok_sha, "version": 1},
        {"key": "bad/size-text", "size": "1", "sha256": ok_sha, "version": 1},
        {"key": "bad/version-0", "size": 1, "sha256": ok_sha, "version": 0},
        {"key": "bad\x01ctl", "size": 1, "sha256": ok_sha, "version": 1},
        {"key": "bad\x7fdel", "size": 1, "sha256": ok_sha, "version": 1},
        {"key": "bad\nnewline", "size": 1, "sha256": ok_sha, "version": 1},
        {"key": "", "size": 1, "sha256": ok_sha, "version": 1},
        {"key": 42, "size": 1, "sha256": ok_sha, "version": 1},
    ]
    unreadable = [b"this is not json", b"{\"key\": \"bad/truncated\"", b"[1, 2, 3]",
                  b"{\"key\": \"bad/missing-fields\"}", b"\xff\xfe not utf-8"]
    lines = [json.dumps(e).encode() for e in good[:3]]
    lines += [json.dumps(e).encode() for e in bad_entries] + unreadable
    lines += [json.dumps(e).encode() for e in good[3:]]
    issue_versions(cluster, 9)
    with connect(cluster) as c:
        head = register(c, "w3", b"\n".join(lines) + b"\n")
        assert head.ok
        h = head.headers
        assert int(h["rejected"]) == len(bad_entries) + len(unreadable), h
        assert int(h["added"]) == len(good), h
        listed = master_keys(c)
        assert set(listed) == {e["key"] for e in good}, sorted(listed)
        for e in good:
            row = listed[e["key"]]  # type: ignore[index]
            assert (row["size"], row["sha256"], row["version"], row["replicas"]) == (
                e["size"], e["sha256"], e["version"], ["w3"]
            )
        # The worker is registered and usable.
        assert heartbeat(c, "w3", int(h["incarnation"])).ok
    poll(lambda: master_log_has(cluster, "inventory entries rejected"), "the log line")


_WEDGE = (
    "versions are accepted up to 2**63-1 (dsml.master.state.MAX_INT) but a header number "
    "has at most 18 digits (dsml.protocol.methods._DIGITS): after one such version the "
    "master issues versions no worker accepts (bad-header) or overflows SQLite "
    "(internal), for every write, and it persists across a master restart"
)


def _place_fits_the_wire(c: Client, key: str) -> None:
    """``place`` answers with a version that a worker's ``Version`` header accepts."""
    head, _ = c.call("place", {"Key": key, "Size": 1})
    check_uint(head.headers["version"])


def test_inventory_versions_beyond_the_wire_are_rejected(cluster: LocalCluster) -> None:
    """Inventory entries whose version no header can carry (10**18, 2**63-1) are rejected
    like any malformed entry, and do not push the master's version counter past what the
    wire carries: later writes still get usable versions."""
    sha = hashlib.sha256(b"x").hexdigest()
    inventory = b"".join(
        json.dumps({"key": key, "size": 1, "sha256": sha, "version": version}).encode() + b"\n"
        for key, version in (("ok", 1), ("huge/1e18", 10**18), ("huge/max", 2**63 - 1))
    )
    issue_versions(cluster, 1)
    with connect(cluster) as c:
        head = register(c, "w6", inventory)
        heartbeat(c, "w6", int(head.headers["incarnation"]))
        _place_fits_the_wire(c, "next")
        assert head.headers["rejected"] == "2", head.headers
        assert set(master_keys(c)) == {"ok"}


def test_commit_of_a_version_never_issued_does_not_wedge_writes(cluster: LocalCluster) -> None:
    """A client's ``commit`` naming the largest version a header can carry (one buggy or
    hostile client) must not leave the master issuing versions no worker accepts."""
    sha = hashlib.sha256(b"x").hexdigest()
    with connect(cluster) as c, connect(cluster) as w:
        heartbeat(w, "w6", int(register(w, "w6").headers["incarnation"]))
        try:
            c.call("commit", {"Key": "k", "Size": 1, "Sha256": sha, "Version": "9" * 18,
                               "Grant": f"{'9' * 18}.{'0' * 32}", "Workers": "w6"})
        except DsmlError:
            pass  # refusing it is fine too
        _place_fits_the_wire(c, "next")


def test_report_from_another_link_or_incarnation_is_refused(cluster: LocalCluster) -> None:
    """A report naming a worker that is not this link's is ``not-registered``; one naming
    this link's worker at another incarnation is ``stale-incarnation``; neither changes the
    directory, and the link's own report is still taken."""
    store = (json.dumps({"op": "store", **_entry("report/k", b"payload")}) + "\n").encode()
    issue_versions(cluster, 1)
    with connect(cluster) as a, connect(cluster) as b, connect(cluster) as stranger:
        inc_a = int(register(a, "wa").headers["incarnation"])
        inc_b = int(register(b, "wb").headers["incarnation"])

        def report(c: Client, name: str, inc: int) -> Head:
            return c.call("report", {"Name": name, "Incarnation": inc}, store)[0]

        assert refused(lambda: report(a, "wb", inc_b)).code == "not-registered"
        assert refused(lambda: report(stranger, "wa", inc_a)).code == "not-registered"
        assert refused(lambda: report(a, "nobody", 1)).code == "not-registered"
        e = refused(lambda: report(a, "wa", inc_a + 1))
        assert e.code == "stale-incarnation" and str(inc_a) in e.message, e.message
        assert master_keys(a) == {}
        taken = report(a, "wa", inc_a).headers
        assert (taken["taken"], taken["refused"]) == ("1", "0")
        assert master_keys(a)["report/k"]["replicas"] == ["wa"]


def test_refused_report_is_logged_by_the_master(cluster: LocalCluster) -> None:
    """The master's log says why it refused a worker's report, as it does for a refused
    heartbeat: a worker whose reports bounce is otherwise invisible to the operator."""
    with connect(cluster) as a:
        inc = int(register(a, "wa").headers["incarnation"])
        refused(lambda: a.call("report", {"Name": "wa", "Incarnation": inc + 1}, b""))
        refused(lambda: heartbeat(a, "wa", inc + 1))  # logged: a marker after the report
    poll(lambda: master_log_has(cluster, "refused heartbeat"), "the heartbeat refusal")
    assert master_log_has(cluster, "stale-incarnation"), cluster.tail("master")


# -- clients -------------------------------------------------------------------------------


def test_place_with_no_live_workers_is_no_workers(cluster: LocalCluster) -> None:
    """``place`` with no worker registered, and again once the only worker's link has
    closed (dead at once), is ``no-workers``."""
    with connect(cluster) as c:
        e = refused(lambda: c.call("place", {"Key": "k", "Size": 10}))
        assert e.code == "no-workers", e
        with connect(cluster) as w:
            heartbeat(w, "w4", int(register(w, "w4").headers["incarnation"]))
            head, _ = c.call("place", {"Key": "k", "Size": 10})
            assert head.headers["workers"].startswith("w4=")
        poll(lambda: True if nodes(c)["w4"]["state"] == "dead" else None, "w4 to die")
        e = refused(lambda: c.call("place", {"Key": "k", "Size": 10}))
        assert e.code == "no-workers", e
        assert c.ping()["role"] == "master"


def test_locate_of_unknown_key_is_not_found(cluster: LocalCluster) -> None:
    """``locate`` of a key the master never heard of is ``not-found`` naming the key; the
    CLI turns it into one line and exit status 1."""
    with connect(cluster) as c:
        e = refused(lambda: c.call("locate", {"Key": "no/such/key"}))
        assert e.code == "not-found" and "no/such/key" in e.message, e
        assert c.ping()["role"] == "master"
    result = cluster.cli("get", "no/such/key", check=False)
    assert result.returncode == 1
    assert result.stderr.decode().strip() == "dsml: get: key 'no/such/key' not found [not-found]"

