"""The cluster PKI (dsml.pki, `dsml pki`): files and modes, identities read back from the
certificates, unsafe keys refused, revocation, and the TLS identity built from them."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from dsml import pki
from dsml.cli import main
from dsml.config import load_config
from dsml.net.tls import TlsIdentity
from dsml.protocol.methods import Role

CONFIG = """\
cluster:
  tls: true
  pki_dir: keys
master:
  host: 127.0.0.1
  port: 0
  state_dir: master
workers:
  w1: {host: 10.0.0.5, port: 0, data_dir: w1}
  w2: {host: node2.example, port: 0, data_dir: w2}
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_open() -> Iterator[None]:
    """A permissive umask: the key files must be 0600 whatever it is."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def pki_dir(tmp_path: Path, umask_open: None) -> Path:
    """A cluster made by `dsml pki init` from CONFIG."""
    (tmp_path / "dsml.yaml").write_text(CONFIG)
    assert main(["-c", str(tmp_path / "dsml.yaml"), "pki", "init"]) == 0
    return tmp_path / "keys"


def test_init_writes_every_identity_with_safe_modes(pki_dir: Path) -> None:
    """init makes the CA, the master, each configured worker and admin; keys 0600, the
    directory 0700, even under umask 0."""
    assert _mode(pki_dir) == 0o700
    for kind, name in [("master", "master"), ("worker", "w1"), ("worker", "w2"),
                       ("user", "admin")]:
        paths = pki.identity_paths(pki_dir, kind, name)
        assert _mode(paths.key) == 0o600
        assert _mode(paths.cert) == 0o644
    assert _mode(pki.ca_paths(pki_dir).key) == 0o600


def test_identities_read_back_from_certificates(pki_dir: Path) -> None:
    """CN is the name, OU the role; master and workers carry their configured host."""
    master = pki.load_cert(pki.identity_paths(pki_dir, "master", "master").cert)
    w1 = pki.load_cert(pki.identity_paths(pki_dir, "worker", "w1").cert)
    w2 = pki.load_cert(pki.identity_paths(pki_dir, "worker", "w2").cert)
    admin = pki.load_cert(pki.identity_paths(pki_dir, "user", "admin").cert)
    assert pki.identity_of(master).role is Role.MASTER
    ident = pki.identity_of(w1)
    assert (ident.name, ident.kind, ident.role) == ("w1", "worker", Role.WORKER)
    assert pki.identity_of(admin).role is Role.CLIENT

    def sans(cert: x509.Certificate) -> list[str]:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        return [str(n.value) for n in ext.value]  # type: ignore[attr-defined]

    assert sans(master) == ["127.0.0.1"]
    assert sans(w1) == ["10.0.0.5"]
    assert sans(w2) == ["node2.example"]
    ca = pki.load_cert(pki.ca_paths(pki_dir).cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not w1.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    leaf_days = (w1.not_valid_after_utc - w1.not_valid_before_utc).days
    ca_days = (ca.not_valid_after_utc - ca.not_valid_before_utc).days
    assert leaf_days == pki.LEAF_DAYS and ca_days == pki.CA_DAYS


def test_group_readable_key_is_refused_naming_the_file(pki_dir: Path) -> None:
    """A key with mode 0644 is refused at load, by dsml.pki and by the TLS identity."""
    key = pki.identity_paths(pki_dir, "worker", "w1").key
    os.chmod(key, 0o644)
    with pytest.raises(pki.PkiError) as info:
        pki.load_key(key)
    assert str(key) in info.value.message and "0644" in info.value.message
    with pytest.raises(pki.PkiError, match="accessible by group or others"):
        TlsIdentity(pki_dir, "worker", "w1")
    os.chmod(key, 0o600)
    assert TlsIdentity(pki_dir, "worker", "w1").identity.name == "w1"


def test_issue_never_overwrites(pki_dir: Path) -> None:
    """Issuing an identity that exists is refused; a new one is added."""
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.issue(pki_dir, "worker", "w1")
    paths = pki.issue(pki_dir, "user", "alice")
    assert pki.identity_of(pki.load_cert(paths.cert)).kind == "user"
    with pytest.raises(pki.PkiError, match="identity name"):
        pki.issue(pki_dir, "user", "../evil")


def test_revoked_serial_is_recognised_and_reissue_works(pki_dir: Path) -> None:
    """revoke puts the serial in the signed CRL; a TLS identity refuses that peer, and a
    new certificate can be issued under the same name."""
    old = pki.identity_of(pki.load_cert(pki.identity_paths(pki_dir, "worker", "w2").cert))
    assert pki.revoked_serials(pki_dir) == frozenset()
    assert [i.serial for i in pki.revoke(pki_dir, "w2")] == [old.serial]
    assert old.serial in pki.revoked_serials(pki_dir)
    with pytest.raises(pki.PkiError, match="does not exist"):
        TlsIdentity(pki_dir, "worker", "w2")
    new_paths = pki.issue(pki_dir, "worker", "w2")
    new = pki.identity_of(pki.load_cert(new_paths.cert))
    assert new.serial != old.serial and new.serial not in pki.revoked_serials(pki_dir)
    assert TlsIdentity(pki_dir, "master", "master").revoked == frozenset({old.serial})


def test_crl_not_signed_by_the_ca_is_refused(pki_dir: Path, tmp_path: Path) -> None:
    """A CRL from another CA is an error, not an empty list."""
    other = tmp_path / "other"
    pki.init_cluster(other, "127.0.0.1", [("w1", "127.0.0.1")])
    pki.revoke(other, "w1")
    (pki_dir / pki.CRL_FILE).write_bytes((other / pki.CRL_FILE).read_bytes())
    with pytest.raises(pki.PkiError, match="not signed by the cluster CA"):
        pki.revoked_serials(pki_dir)


def test_cli_issue_and_revoke(pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`dsml pki issue user NAME`, `revoke NAME` and `show` through the command."""
    config = str(pki_dir.parent / "dsml.yaml")
    assert main(["-c", config, "pki", "issue", "user", "bob"]) == 0
    assert main(["-c", config, "pki", "revoke", "bob"]) == 0
    assert main(["-c", config, "pki", "show"]) == 0
    out = capsys.readouterr().out
    assert "revoked user bob" in out
    assert "bob" not in out.split("restart the cluster's processes", 1)[1]  # renamed aside
    assert main(["-c", config, "pki", "revoke", "nobody"]) == 1


def test_config_pki_dir(pki_dir: Path) -> None:
    """cluster.pki_dir is relative to the config file."""
    config = load_config(pki_dir.parent / "dsml.yaml")
    assert config.pki_dir == pki_dir.resolve() and config.cluster.tls


def test_init_again_keeps_what_exists(pki_dir: Path) -> None:
    """A second init keeps the CA and the identities, and issues only missing ones."""
    ca = pki.ca_paths(pki_dir).cert.read_bytes()
    w1 = pki.identity_paths(pki_dir, "worker", "w1").cert.read_bytes()
    made = pki.init_cluster(pki_dir, "127.0.0.1", [("w1", "127.0.0.1"), ("w3", "127.0.0.1")])
    assert made == [pki.identity_paths(pki_dir, "worker", "w3")]
    assert pki.ca_paths(pki_dir).cert.read_bytes() == ca
    assert pki.identity_paths(pki_dir, "worker", "w1").cert.read_bytes() == w1


def test_twistd_options_refuse_an_unsafe_or_missing_key(pki_dir: Path) -> None:
    """With cluster.tls, a role whose key is unsafe or missing stops at option time with
    one line naming the file."""
    from twisted.python import usage

    from dsml.tap import MasterOptions, WorkerOptions

    config = str(pki_dir.parent / "dsml.yaml")
    key = pki.identity_paths(pki_dir, "master", "master").key
    os.chmod(key, 0o640)
    with pytest.raises(usage.UsageError, match=f"private key {key} is accessible"):
        MasterOptions().parseOptions(["-c", config])
    os.chmod(key, 0o600)
    MasterOptions().parseOptions(["-c", config])
    pki.identity_paths(pki_dir, "worker", "w2").key.unlink()
    with pytest.raises(usage.UsageError, match="w2.key does not exist"):
        WorkerOptions().parseOptions(["-c", config, "--name", "w2"])


def test_the_token_owner_name_is_not_a_user() -> None:
    """Jobs submitted in token mode belong to "token": no certificate may claim it."""
    from dsml import pki
    from dsml.net.access import TOKEN_OWNER

    with pytest.raises(pki.PkiError, match="reserved"):
        pki.check_name("user", TOKEN_OWNER)
    pki.check_name("worker", TOKEN_OWNER)  # a worker called so owns no jobs
    pki.check_name("user", "alice")
