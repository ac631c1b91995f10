"""The cluster's public-key infrastructure: a CA and one certificate per identity.

Every identity (the master, each worker, each user) has a key and a certificate signed
by the cluster CA, all kept in one directory (``cluster.pki_dir`` of the config)::

    pki_dir/
      ca.crt  ca.key             the cluster CA (10 years; basicConstraints CA, keyCertSign)
      master.crt  master.key     the master (OU=master, CN=master, SAN = its configured host)
      workers/NAME.crt NAME.key  one per worker (OU=worker, CN=NAME, SAN = its host)
      users/NAME.crt NAME.key    one per user (OU=user, CN=NAME; ``admin`` made by init)
      crl.pem                    the revoked serials, signed by the CA

The identity is in the certificate: CN is the name, OU the role.  A connection's peer
is who its certificate says it is (:func:`identity_of`), and its role decides what it
may call (master -> MASTER, worker -> WORKER, user -> CLIENT).

Keys are EC P-256.  Private keys are created 0600 whatever the umask (``O_EXCL``, then
``fchmod``), never overwritten, and refused at load time when group or others may read
them (:func:`load_key`).  Leaf certificates last :data:`LEAF_DAYS`, the CA
:data:`CA_DAYS`.  Revoking (:func:`revoke`) adds a serial to the signed CRL, which
servers read at start-up: to rotate an identity, issue a new certificate, revoke the
old serial, restart that process.

This module knows nothing of Twisted; :mod:`dsml.net.tls` builds TLS contexts from it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import DsmlError
from .net.access import TOKEN_OWNER
from .protocol.limits import WORKER_NAME
from .protocol.methods import Role

#: Days a leaf certificate (master, worker, user) is valid.
LEAF_DAYS: Final = 365
#: Days the CA certificate is valid.
CA_DAYS: Final = 3650
#: The role written in a certificate's OU, and the connection role it grants.
ROLE_OF_OU: Final = {"master": Role.MASTER, "worker": Role.WORKER, "user": Role.CLIENT}
#: The name of the user ``dsml pki init`` creates, and the CLI's default identity.
DEFAULT_USER: Final = "admin"
#: Environment variable naming the user identity the CLI and client present.
IDENTITY_ENV: Final = "DSML_IDENTITY"
#: The name of the master's identity.
MASTER_NAME: Final = "master"
#: The CA's common name.
CA_NAME: Final = "dsml cluster CA"
CRL_FILE: Final = "crl.pem"


class PkiError(DsmlError):
    """A PKI file is missing, unsafe or invalid; one line naming the file."""

    code = "pki"


@attrs.frozen
class Identity:
    """Who a certificate speaks for: its name (CN), role (OU) and serial."""

    name: str
    kind: str  # "master", "worker" or "user"
    serial: int

    @property
    def role(self) -> Role:
        """The connection role this identity holds."""
        return ROLE_OF_OU[self.kind]

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@attrs.frozen
class Paths:
    """Where the files of one identity live."""

    cert: Path
    key: Path


def identity_paths(pki_dir: Path, kind: str, name: str) -> Paths:
    """The certificate and key files of identity ``kind``/``name`` under ``pki_dir``."""
    check_name(kind, name)
    if kind == "master":
        base = pki_dir / MASTER_NAME
    else:
        base = pki_dir / f"{kind}s" / name
    return Paths(base.with_name(base.name + ".crt"), base.with_name(base.name + ".key"))


def ca_paths(pki_dir: Path) -> Paths:
    """The CA's certificate and key files."""
    return Paths(pki_dir / "ca.crt", pki_dir / "ca.key")


def check_name(kind: str, name: str) -> None:
    """Refuse an unknown kind or a name that is not a worker-style name."""
    if kind not in ROLE_OF_OU:
        raise PkiError(f"unknown identity kind {kind!r} (master, worker or user)")
    if not WORKER_NAME.match(name):
        raise PkiError(f"identity name must be 1 to 64 of A-Z a-z 0-9 _ . -, got {name!r}")
    if kind == "user" and name == TOKEN_OWNER:
        raise PkiError(
            f"user name {name!r} is reserved: it owns the jobs submitted with the token"
        )


# -- files --------------------------------------------------------------------------


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never overwriting) with exactly ``mode``, whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise PkiError(f"{path} already exists; refusing to overwrite it") from None
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path} does not exist (run `dsml pki init`?)") from None
    except OSError as e:
        raise PkiError(f"cannot read {path}: {e.strerror or e}") from None


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a private key, refusing one that group or others may read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PkiError(f"private key {path} does not exist (run `dsml pki init`?)") from None
    if st.st_mode & 0o077:
        raise PkiError(
            f"private key {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except ValueError as e:
        raise PkiError(f"private key {path} is not a PEM private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"private key {path} is not an EC key")
    return key


def load_cert(path: Path) -> x509.Certificate:
    """Load a PEM certificate."""
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as e:
        raise PkiError(f"{path} is not a PEM certificate: {e}") from None


# -- certificates -------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def identity_of(cert: x509.Certificate) -> Identity:
    """The identity a certificate states (CN and OU); PkiError when it states none."""
    subject = cert.subject
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cns) != 1 or len(ous) != 1:
        raise PkiError("certificate has no single CN and OU: not a dsml identity")
    name, kind = str(cns[0].value), str(ous[0].value)
    if kind not in ROLE_OF_OU or not WORKER_NAME.match(name):
        raise PkiError(f"certificate names no dsml identity (OU={kind!r}, CN={name!r})")
    if kind == "user" and name == TOKEN_OWNER:
        # ``dsml pki issue`` never makes one (:func:`check_name`); one made some other
        # way would speak for every job submitted with the token.
        raise PkiError(f"certificate names the reserved user {name!r}")
    return Identity(name, kind, cert.serial_number)


def create_ca(pki_dir: Path, days: int = CA_DAYS) -> x509.Certificate:
    """Create the cluster CA's key and self-signed certificate in ``pki_dir``."""
    paths = ca_paths(pki_dir)
    if paths.cert.exists() or paths.key.exists():
        raise PkiError(f"{paths.cert} already exists; refusing to make a second CA")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_new(paths.key, _key_pem(key), 0o600)
    _write_new(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def issue(
    pki_dir: Path, kind: str, name: str, hosts: Iterable[str] = (), days: int = LEAF_DAYS
) -> Paths:
    """Issue identity ``kind``/``name`` (SANs: ``hosts``), signed by the CA in ``pki_dir``.

    Refuses to overwrite an existing certificate or key: revoke the old one first.
    """
    paths = identity_paths(pki_dir, kind, name)
    if paths.cert.exists() or paths.key.exists():
        raise PkiError(
            f"{paths.cert} already exists; revoke it first (`dsml pki revoke {name}`)"
        )
    ca = ca_paths(pki_dir)
    ca_cert = load_cert(ca.cert)
    ca_key = load_key(ca.key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if kind != "user":
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    sans = list(dict.fromkeys(hosts))
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h) for h in sans]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_new(paths.key, _key_pem(key), 0o600)
    _write_new(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


# -- revocation -----------------------------------------------------------------------


def revoked_serials(pki_dir: Path) -> frozenset[int]:
    """The serials in ``pki_dir``'s CRL (none when there is no CRL), its signature checked
    against the CA."""
    path = pki_dir / CRL_FILE
    if not path.exists():
        return frozenset()
    try:
        crl = x509.load_pem_x509_crl(_read(path))
    except ValueError as e:
        raise PkiError(f"{path} is not a PEM CRL: {e}") from None
    ca_cert = load_cert(ca_paths(pki_dir).cert)
    if not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise PkiError(f"{path} is not signed by the cluster CA")
    return frozenset(r.serial_number for r in crl)


def revoke_serials(pki_dir: Path, serials: Iterable[int]) -> frozenset[int]:
    """Add ``serials`` to the signed CRL (rewritten atomically); returns every revoked serial."""
    ca = ca_paths(pki_dir)
    ca_cert = load_cert(ca.cert)
    ca_key = load_key(ca.key)
    every = revoked_serials(pki_dir) | frozenset(serials)
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(days=CA_DAYS))
    )
    for serial in sorted(every):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    path = pki_dir / CRL_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    _write_new(tmp, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    os.replace(tmp, path)
    return every


def find_identity(pki_dir: Path, name: str) -> list[tuple[Paths, Identity]]:
    """Every issued identity called ``name`` (the master, a worker, a user)."""
    found = []
    for kind in ROLE_OF_OU:
        if kind == "master" and name != MASTER_NAME:
            continue
        try:
            paths = identity_paths(pki_dir, kind, name)
        except PkiError:
            continue
        if paths.cert.exists():
            found.append((paths, identity_of(load_cert(paths.cert))))
    return found


def revoke(pki_dir: Path, name: str) -> list[Identity]:
    """Revoke every identity called ``name``: its serial goes into the CRL, and its
    certificate and key are renamed aside (``NAME.crt.revoked-SERIAL``) so a new one can
    be issued under the same name."""
    found = find_identity(pki_dir, name)
    if not found:
        raise PkiError(f"no certificate named {name!r} under {pki_dir}")
    revoke_serials(pki_dir, [ident.serial for _, ident in found])
    for paths, ident in found:
        for p in (paths.cert, paths.key):
            if p.exists():
                os.replace(p, p.with_name(f"{p.name}.revoked-{ident.serial:x}"))
    return [ident for _, ident in found]


# -- a whole cluster ------------------------------------------------------------------


def init_cluster(
    pki_dir: Path, master_host: str, workers: Iterable[tuple[str, str]], user: str = DEFAULT_USER
) -> list[Paths]:
    """Create the CA, the master's identity, one per ``(name, host)`` worker and ``user``;
    returns the identities made.

    Run again, it keeps the CA and every identity that exists and issues only the
    missing ones (a worker added to the config), so it is safe to repeat.
    """
    pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not ca_paths(pki_dir).cert.exists():
        create_ca(pki_dir)
    wanted = [("master", MASTER_NAME, [master_host])]
    wanted += [("worker", name, [host]) for name, host in workers]
    wanted.append(("user", user, []))
    made = []
    for kind, name, hosts in wanted:
        paths = identity_paths(pki_dir, kind, name)
        if not paths.cert.exists():
            made.append(issue(pki_dir, kind, name, hosts))
    return made
