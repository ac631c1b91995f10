"""TLS connections without the real reactor: a handshake that never finishes is cut at the
auth deadline (task.Clock), on accepted and on dialled connections alike."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dsml import pki
from dsml.net.limits import Limits
from dsml.net.links import LinkFactory
from dsml.net.responders import NO_REQUESTS
from dsml.net.server import ServerFactory
from dsml.net.tls import PeerCheck, TlsIdentity
from dsml.protocol.methods import Role

AUTH_TIMEOUT = 3.0
ADDR = IPv4Address("TCP", "127.0.0.1", 5555)


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a master, a worker and the admin user."""
    root = tmp_path_factory.mktemp("pki")
    pki.init_cluster(root, "127.0.0.1", [("w1", "127.0.0.1")])
    return root


def test_accepted_handshake_never_finished_is_cut_at_the_deadline(pki_dir: Path) -> None:
    """A peer that opens TCP and never completes TLS is aborted after auth_timeout, and
    counts as unauthenticated until then."""
    tls = TlsIdentity(pki_dir, "master", "master")
    clock = Clock()
    factory = ServerFactory(
        NO_REQUESTS, clock, None, Limits(auth_timeout=AUTH_TIMEOUT),
        peer_check=PeerCheck(tls, frozenset({"user", "worker"})),
    )
    proto = tls.wrap_server(factory).buildProtocol(ADDR)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert factory.unauthenticated == 1
    clock.advance(AUTH_TIMEOUT - 0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
    assert b"timeout" not in transport.value()  # nothing sent in clear


def test_dialled_handshake_never_finished_is_cut_at_the_deadline(pki_dir: Path) -> None:
    """A dialled link whose server never answers the ClientHello is cut too (a dialled
    link otherwise has no auth deadline: it trusts whom it dialled)."""
    tls = TlsIdentity(pki_dir, "worker", "w1")
    clock = Clock()
    factory = LinkFactory(
        NO_REQUESTS, clock, Limits(auth_timeout=AUTH_TIMEOUT),
        peer_roles=frozenset({Role.MASTER}),
        peer_check=PeerCheck(tls, frozenset({"master"})),
    )
    from twisted.protocols.tls import TLSMemoryBIOFactory

    proto = TLSMemoryBIOFactory(tls.options, True, factory).buildProtocol(ADDR)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert transport.value()  # the ClientHello went out
    clock.advance(AUTH_TIMEOUT + 0.1)
    assert transport.disconnecting
