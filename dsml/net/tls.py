"""TLS 1.3 on every dsml link, both sides verified against the cluster CA.

:class:`TlsIdentity` holds one process's own certificate and key, the CA and the revoked
serials (:mod:`dsml.pki`), and makes Twisted's ``CertificateOptions`` for both sides:
TLS 1.3 only, a peer certificate required and verified against the cluster CA.  A
listener's factory is wrapped in a ``TLSMemoryBIOFactory`` (:meth:`TlsIdentity.wrap_server`),
a dialled endpoint with ``wrapClientTLS`` (:meth:`TlsIdentity.wrap_endpoint`).

Who the peer is comes from its certificate (:meth:`TlsIdentity.peer_identity`): CN the
name, OU the role.  :class:`~dsml.net.connection.Connection` asks for it when the first
bytes arrive after the handshake, and sets the connection's roles from it (see
:class:`PeerCheck`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory

from .. import pki
from ..protocol.methods import Role


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
    """One process's certificate and key, the cluster CA and the CRL, as TLS options."""

    def __init__(self, pki_dir: Path, kind: str, name: str) -> None:
        paths = pki.identity_paths(pki_dir, kind, name)
        ca = pki.ca_paths(pki_dir)
        # Loaded (and the key's mode checked) through dsml.pki: one clear error per file.
        own_key = pki.load_key(paths.key)
        own_cert = pki.load_cert(paths.cert)
        ca_cert = pki.load_cert(ca.cert)
        self.identity = pki.identity_of(own_cert)
        self.revoked = pki.revoked_serials(pki_dir)
        if self.identity.serial in self.revoked:
            raise pki.PkiError(f"{paths.cert} is revoked (serial {self.identity.serial:x})")
        self.cert_path = paths.cert
        self.key_path = paths.key
        self.ca_path = ca.cert
        # pyOpenSSL takes cryptography's key and certificate (its own wrappers are
        # deprecated); its X509Store still wants its own X509 for the CA.
        self._options = ssl.CertificateOptions(
            privateKey=own_key,  # type: ignore[arg-type]
            certificate=own_cert,  # type: ignore[arg-type]
            verify=True,
            caCerts=[crypto.X509.from_cryptography(ca_cert)],
            requireCertificate=True,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_3,
        )

    @property
    def options(self) -> ssl.CertificateOptions:
        """The context factory of both sides (TLS 1.3, peer verified against the CA)."""
        return self._options

    def wrap_server(self, factory: Any) -> TLSMemoryBIOFactory:
        """``factory`` behind TLS, for a listener."""
        return TLSMemoryBIOFactory(self._options, False, factory)

    def wrap_endpoint(self, endpoint: IStreamClientEndpoint) -> IStreamClientEndpoint:
        """``endpoint`` with TLS on top, for dialling."""
        from twisted.internet.endpoints import wrapClientTLS

        # CertificateOptions is a context factory, not a creator for one host: the peer
        # is checked by its certificate's identity (PeerCheck), not by the name dialled.
        # (TLSMemoryBIOFactory adapts the context factory itself.)
        return wrapClientTLS(self._options, endpoint)  # type: ignore[arg-type]

    def peer_identity(self, transport: Any) -> pki.Identity:
        """The identity in the (already verified) peer certificate of ``transport``."""
        peer = transport.getPeerCertificate()
        if peer is None:
            raise PeerRefused("peer presented no certificate")
        try:
            ident = pki.identity_of(peer.to_cryptography())
        except pki.PkiError as e:
            raise PeerRefused(str(e)) from None
        if ident.serial in self.revoked:
            raise PeerRefused(f"{ident}'s certificate (serial {ident.serial:x}) is revoked")
        return ident


def roles_of(ident: pki.Identity) -> frozenset[Role]:
    """The connection roles a certificate's identity holds."""
    return frozenset({ident.role})


def load_tls(config: Any, kind: str, name: str) -> TlsIdentity | None:
    """The TLS identity ``kind``/``name`` from the config's pki_dir, or None without TLS."""
    if not config.cluster.tls:
        return None
    return TlsIdentity(config.pki_dir, kind, name)


__all__ = ["PeerCheck", "PeerRefused", "TlsIdentity", "load_tls", "roles_of"]
