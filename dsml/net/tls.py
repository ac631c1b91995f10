"""TLS 1.3 on every dsml link, both sides verified against the cluster CA.

:class:`TlsIdentity` holds one process's own certificate and key, the CA and the revoked
serials (:mod:`dsml.pki`), and makes the stdlib ``ssl`` contexts of both sides: TLS 1.3
only, a peer certificate required and verified against the cluster CA.  A listener's
factory is wrapped in a :class:`~dsml.net.tls_transport.TlsFactory`
(:meth:`TlsIdentity.wrap_server`), a dialled endpoint with
:func:`~dsml.net.tls_transport.tls_client_endpoint` (:meth:`TlsIdentity.wrap_endpoint`);
that module is the TLS transport itself (why not Twisted's: see there).

Who the peer is comes from its certificate (:meth:`TlsIdentity.peer_identity`): CN the
name, OU the role.  :class:`~dsml.net.connection.Connection` asks for it when the first
bytes arrive after the handshake, and sets the connection's roles from it (see
:class:`PeerCheck`).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.interfaces import IStreamClientEndpoint

from .. import pki
from ..protocol.methods import Role
from .tls_transport import TlsFactory, tls_client_endpoint


class PeerRefused(Exception):
    """The peer's certificate does not name an identity allowed here."""


@attrs.frozen
class PeerCheck:
    """What a connection demands of its peer's certificate.

    ``accept``: the identity kinds (master, worker, user) allowed to connect; for a
    listener, the connection's roles are then the certificate's role; for a dialled link
    the peer must be one of them (a worker's link to the master: ``{"master"}``).
    """

    tls: TlsIdentity
    accept: frozenset[str]

    def identify(self, transport: Any) -> pki.Identity:
        """The verified peer's identity; PeerRefused when it is not acceptable."""
        ident = self.tls.peer_identity(transport)
        if ident.kind not in self.accept:
            raise PeerRefused(
                f"peer is {ident}, expected {' or '.join(sorted(self.accept))}"
            )
        return ident


class TlsIdentity:
    """One process's certificate and key, the cluster CA and the CRL, as ``ssl`` contexts
    for both sides of a connection."""

    def __init__(self, pki_dir: Path, kind: str, name: str) -> None:
        paths = pki.identity_paths(pki_dir, kind, name)
        ca = pki.ca_paths(pki_dir)
        # Loaded (and the key's mode checked) through dsml.pki: one clear error per file.
        pki.load_key(paths.key)
        own_cert = pki.load_cert(paths.cert)
        pki.load_cert(ca.cert)
        self.identity = pki.identity_of(own_cert)
        self.revoked = pki.revoked_serials(pki_dir)
        if self.identity.serial in self.revoked:
            raise pki.PkiError(f"{paths.cert} is revoked (serial {self.identity.serial:x})")
        self.cert_path = paths.cert
        self.key_path = paths.key
        self.ca_path = ca.cert
        self.server_context = _context(True, paths, ca.cert)
        self.client_context = _context(False, paths, ca.cert)

    def wrap_server(self, factory: Any) -> TlsFactory:
        """``factory`` behind TLS, for a listener."""
        return TlsFactory(self.server_context, False, factory)

    def wrap_endpoint(self, endpoint: IStreamClientEndpoint) -> IStreamClientEndpoint:
        """``endpoint`` with TLS on top, for dialling."""
        return tls_client_endpoint(self.client_context, endpoint)

    def peer_identity(self, transport: Any) -> pki.Identity:
        """The identity in the (already verified) peer certificate of ``transport``."""
        peer = transport.getPeerCertificate()
        if peer is None:
            raise PeerRefused("peer presented no certificate")
        try:
            ident = pki.identity_of(peer)
        except pki.PkiError as e:
            raise PeerRefused(str(e)) from None
        if ident.serial in self.revoked:
            raise PeerRefused(f"{ident}'s certificate (serial {ident.serial:x}) is revoked")
        return ident


def _context(server_side: bool, own: pki.Paths, ca_cert: Path) -> ssl.SSLContext:
    """TLS 1.3 only, ``own`` certificate presented, the peer's required and verified
    against the CA (expiry included).  A client does not check the host name: the peer
    is checked by its certificate's identity (:class:`PeerCheck`), not the name dialled."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if not server_side:
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(ca_cert))
        ctx.load_cert_chain(str(own.cert), str(own.key))
    except (OSError, ssl.SSLError) as e:
        raise pki.PkiError(f"cannot load {own.cert} or {ca_cert}: {e}") from None
    if server_side:
        ctx.num_tickets = 0  # no session resumption: every link is long-lived
    return ctx


def roles_of(ident: pki.Identity) -> frozenset[Role]:
    """The connection roles a certificate's identity holds."""
    return frozenset({ident.role})


def load_tls(config: Any, kind: str, name: str) -> TlsIdentity | None:
    """The TLS identity ``kind``/``name`` from the config's pki_dir, or None without TLS."""
    if not config.cluster.tls:
        return None
    return TlsIdentity(config.pki_dir, kind, name)


__all__ = ["PeerCheck", "PeerRefused", "TlsIdentity", "load_tls", "roles_of"]
