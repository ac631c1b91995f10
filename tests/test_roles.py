"""Who may call what: every method of every node's table declares the roles that may call
it and has a responder; the table in docs/protocol.md says the same; a connection that
authenticated with fewer roles is refused per method with ``forbidden`` and keeps working.

The tables are built from the real handler classes over inert collaborators: a refused
request never reaches them (one that did would fail with ``internal``, not ``forbidden``).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dsml.master.requests import MasterHandler
from dsml.net.connection import Connection
from dsml.net.links import LinkFactory
from dsml.net.responders import AUTH, Reply, Responders, responder
from dsml.net.server import ServerFactory, TokenAuthenticator
from dsml.protocol import codec, methods
from dsml.protocol.codec import Head, Parser
from dsml.protocol.limits import MAX_SKIP
from dsml.protocol.methods import ALL_ROLES, MethodSpec, MethodTable, Role, master_methods
from dsml.worker.orders import WorkerOrders, order_responders
from dsml.worker.runner import TaskLogs, TaskOrders
from dsml.worker.storage import StorageHandler, storage_responders

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

#: The docs table's columns, by node.
STORAGE, MASTER, ORDERS = "storage server", "master", "worker link"


class _Inert:
    """A collaborator that must never be reached."""

    store = None


def node_tables() -> dict[str, Responders]:
    """Each node's table, from the real handler classes."""
    storage = StorageHandler(_Inert(), _Inert())  # type: ignore[arg-type]
    return {
        STORAGE: storage_responders(storage, TaskLogs(None)),
        ORDERS: order_responders(WorkerOrders(storage, _Inert()), TaskOrders(None)),  # type: ignore[arg-type]
        MASTER: Responders(
            master_methods(),
            MasterHandler(registry=_Inert(), keys=_Inert(), router=_Inert()),  # type: ignore[arg-type]
        ),
    }


# -- the tables ---------------------------------------------------------------------------


@pytest.mark.parametrize("node", [STORAGE, MASTER, ORDERS])
def test_every_method_has_roles_and_a_responder(node: str) -> None:
    """Every method of the node's spec but auth has a responder with a non-empty role set;
    a streamed method's takes (head, conn), a buffered one's (head, payload, conn)."""
    table = node_tables()[node]
    names = [n for n in table.methods.specs if n != AUTH]
    assert names and len(table) == len(names)
    for name in names:
        r = table.get(name)
        assert r is not None, name
        assert r.roles and r.roles <= ALL_ROLES, name
        params = list(inspect.signature(r.fn).parameters)
        assert params == (["head", "conn"] if r.spec.streamed else ["head", "payload", "conn"])
        assert r.spec is table.methods.get(name)


def _docs_table() -> dict[str, dict[str, str]]:
    """The role table of docs/protocol.md: method -> {node: cell}."""
    text = DOCS.read_text()
    start = text.index("| method | storage server")
    rows: dict[str, dict[str, str]] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        method = cells[0].strip("`")
        rows[method] = dict(zip((STORAGE, MASTER, ORDERS), cells[1:], strict=True))
    return rows


def test_the_documented_table_is_the_code() -> None:
    """docs/protocol.md's table of roles names exactly the methods and roles of the code."""
    documented = _docs_table()
    tables = node_tables()
    for node, table in tables.items():
        for name in table.methods.specs:
            cell = documented[name][node]
            if name == AUTH:
                assert cell == "anyone"
                continue
            roles = {Role(word.strip()) for word in cell.split(",")}
            assert roles == set(table.get(name).roles), (node, name)  # type: ignore[union-attr]
    for name, cells in documented.items():
        for node, cell in cells.items():
            assert (cell == "—") == (tables[node].methods.get(name) is None), (node, name)


def test_ping_needs_no_particular_role() -> None:
    """Whoever authenticated may ping any node (the liveness check)."""
    for table in node_tables().values():
        assert table.get("ping").roles == ALL_ROLES  # type: ignore[union-attr]


# -- binding ------------------------------------------------------------------------------


def _spec_table(*names: str) -> MethodTable:
    return MethodTable({n: MethodSpec(n) for n in names})


class _Echo:
    @responder("echo", roles={Role.CLIENT})
    def _echo(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        return Reply()


def test_a_method_without_a_responder_is_an_error() -> None:
    with pytest.raises(ValueError, match="no responder for other"):
        Responders(_spec_table("echo", "other"), _Echo())


def test_a_responder_of_a_method_not_in_the_table_is_an_error() -> None:
    with pytest.raises(ValueError, match="'echo', not a method of its table"):
        Responders(_spec_table("other"), _Echo())


def test_two_responders_of_one_method_are_an_error() -> None:
    with pytest.raises(ValueError, match="two responders"):
        Responders(_spec_table("echo"), _Echo(), _Echo())


def test_auth_is_the_connections_own() -> None:
    class Auth:
        @responder("auth", roles=ALL_ROLES)
        def _auth(self, head: Head, payload: bytes, conn: Connection) -> Reply:
            return Reply()

    with pytest.raises(ValueError, match="not a method of its table"):
        Responders(_spec_table("auth"), Auth())


def test_a_responder_names_at_least_one_role() -> None:
    with pytest.raises(ValueError, match="names no role"):
        responder("echo", roles=())


def test_the_token_grants_every_role() -> None:
    """The cluster token speaks for every kind of peer; a wrong one for none."""
    check = TokenAuthenticator("s3cret")
    assert check(Head("auth", 1, {"token": "s3cret"}, 0)) == ALL_ROLES
    assert check(Head("auth", 1, {"token": "nope"}, 0)) is None
    assert TokenAuthenticator(None)(Head("auth", 1, {"token": ""}, 0)) == ALL_ROLES


# -- refusals on the wire -----------------------------------------------------------------

#: A valid value for each header validator, to build a request of any method.
SAMPLES = {
    methods.check_key: "k",
    methods.check_prefix: "p",
    methods.check_uint: "1",
    methods.check_sha256: "a" * 64,
    methods.check_text: "x",
    methods.check_addr: "h:1",
    methods.check_forward: "h:1",
    methods.check_name: "w1",
    methods.check_names: "w1",
    methods.check_grant: "1." + "0" * 32,
}

#: Tokens that grant one role each (the next issue fills roles from certificates).
TOKENS = {role.value: frozenset({role}) for role in Role}


def _authenticate(head: Head) -> frozenset[Role] | None:
    return TOKENS.get(head.headers.get("token", ""))


def _request(spec: MethodSpec, rid: int, payload: bytes = b"") -> bytes:
    headers = {name: SAMPLES[spec.headers[name]] for name in sorted(spec.required)}
    return codec.encode_request(spec.name, rid, headers, payload)


def _responses(transport: StringTransport) -> list[Head]:
    parser = Parser(codec.RESPONSE)
    parser.feed(transport.value())
    heads = []
    while (event := parser.next_event()) is not codec.NEED_DATA:
        if isinstance(event, Head):
            heads.append(event)
    return heads


def _connect(table: Responders, role: Role, two_way: bool) -> tuple[Connection, StringTransport]:
    """A connection holding ``role`` alone: authenticated as it, or (a table without
    ``auth``, the worker link's) a dialled link to a peer of that role."""
    transport = StringTransport()
    if table.methods.get(AUTH) is None:
        link = LinkFactory(table, Clock(), peer_roles=frozenset({role})).buildProtocol(None)
        link.makeConnection(transport)
        return link, transport
    factory = ServerFactory(table, Clock(), authenticate=_authenticate, two_way=two_way)
    conn = factory.buildProtocol(None)
    conn.makeConnection(transport)
    conn.dataReceived(codec.encode_request("auth", 1, {"Token": role.value}, b""))
    [head] = _responses(transport)
    assert head.ok
    assert conn.roles == frozenset({role})
    transport.clear()
    return conn, transport


@pytest.mark.parametrize("node", [STORAGE, MASTER, ORDERS])
@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
@pytest.mark.parametrize("two_way", [False, True], ids=["server", "two-way"])
def test_a_connection_with_fewer_roles_is_refused_per_method(
    node: str, role: Role, two_way: bool
) -> None:
    """Each method the role may not call is answered ``forbidden``, naming who may;
    the connection stays open and the next request (a ping) is answered."""
    if node == ORDERS and not two_way:
        pytest.skip("a worker link is only ever dialled (two-way)")
    table = node_tables()[node]
    conn, transport = _connect(table, role, two_way)
    rid = 2
    refused = 0
    for r in table:
        if role in r.roles:
            continue
        conn.dataReceived(_request(r.spec, rid) + codec.encode_request("ping", rid + 1, {}, b""))
        error, ping = _responses(transport)
        assert (error.kind, error.id, error.headers["code"]) == ("ERROR", rid, "forbidden")
        assert error.headers["message"] == (
            f"{r.name} may be called by {methods.roles_text(r.roles)}, not a {role.value}"
        )
        assert (ping.kind, ping.id) == ("OK", rid + 1)
        assert not transport.disconnecting
        transport.clear()
        rid += 2
        refused += 1
    may_call_all = {(STORAGE, Role.CLIENT), (ORDERS, Role.MASTER)}
    assert bool(refused) is ((node, role) not in may_call_all)


def test_register_from_a_client_says_who_may() -> None:
    """The message of the brief's example, word for word."""
    conn, transport = _connect(node_tables()[MASTER], Role.CLIENT, two_way=True)
    conn.dataReceived(_request(master_methods().specs["register"], 2, b"{}\n"))
    [error] = _responses(transport)
    assert error.headers["message"] == "register may be called by a worker, not a client"


def test_a_forbidden_upload_is_drained_then_answered() -> None:
    """A streamed request that is refused has its payload read and dropped, in pieces;
    only then is it answered, and the connection goes on."""
    table = node_tables()[STORAGE]
    conn, transport = _connect(table, Role.MASTER, two_way=False)
    spec = table.methods.specs["file_upload"]
    whole = _request(spec, 2, b"x" * 5000)
    conn.dataReceived(whole[:-3000])
    assert _responses(transport) == []
    conn.dataReceived(whole[-3000:] + codec.encode_request("ping", 3, {}, b""))
    error, ping = _responses(transport)
    assert (error.id, error.headers["code"], ping.id, ping.kind) == (2, "forbidden", 3, "OK")


def test_a_forbidden_request_too_large_to_drain_closes() -> None:
    """Past MAX_SKIP the payload is not drained: the refusal is answered, then the
    connection closes (as for any rejection)."""
    table = node_tables()[STORAGE]
    conn, transport = _connect(table, Role.MASTER, two_way=False)
    head = codec.encode_request("file_upload", 2, {"Key": "k"}, MAX_SKIP + 1)
    conn.dataReceived(head)
    [error] = _responses(transport)
    assert (error.id, error.headers["code"]) == (2, "forbidden")
    assert transport.disconnecting


def test_the_token_connection_may_call_everything() -> None:
    """A connection that authenticated with the cluster token holds every role: nothing
    is forbidden to it (today's behaviour)."""
    for node in (STORAGE, MASTER):
        table = node_tables()[node]
        factory = ServerFactory(table, Clock(), token="t")
        conn = factory.buildProtocol(None)
        conn.makeConnection(StringTransport())
        conn.dataReceived(codec.encode_request("auth", 1, {"Token": "t"}, b""))
        assert conn.roles == ALL_ROLES
        assert set(conn.allowed) == {r.name for r in table}
