"""``dsml pki``: the cluster's CA and certificates, in the config's ``cluster.pki_dir``.

``init`` makes the CA, the master's certificate, one per worker of the config and the
``admin`` user; ``issue worker|user NAME`` adds one; ``revoke NAME`` puts its serial in
the CRL (servers read it at start-up: restart them); ``show`` lists what is there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .. import pki
from ..config import Config, ConfigError, find_config, load_config
from .common import UsageError


def _config(args: argparse.Namespace) -> Config:
    path = find_config(args.config)
    if path is None:
        raise UsageError(
            "no cluster config: give -c FILE (or set DSML_CONFIG), or run where "
            "etc/dsml.yaml is"
        )
    try:
        return load_config(path)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def cmd_pki_init(args: argparse.Namespace) -> int:
    """Create the CA and every identity the config names, plus one user; what exists
    already is kept."""
    config = _config(args)
    made = pki.init_cluster(
        config.pki_dir,
        config.master.host,
        [(w.name, w.host) for w in config.workers.values()],
        user=args.user,
    )
    print(f"{len(made)} new certificates in {config.pki_dir} (existing ones kept)")
    for paths in made:
        print(f"  {paths.cert}")
    return 0


def cmd_pki_issue(args: argparse.Namespace) -> int:
    """Issue one more worker or user certificate."""
    config = _config(args)
    hosts = list(args.host or [])
    if args.kind == "worker" and not hosts and args.name in config.workers:
        hosts = [config.workers[args.name].host]
    paths = pki.issue(config.pki_dir, args.kind, args.name, hosts)
    print(f"{args.kind} {args.name}: {paths.cert} (key {paths.key})")
    return 0


def cmd_pki_revoke(args: argparse.Namespace) -> int:
    """Revoke every certificate called NAME."""
    config = _config(args)
    for ident in pki.revoke(config.pki_dir, args.name):
        print(f"revoked {ident} (serial {ident.serial:x}); restart the cluster's processes")
    return 0


def cmd_pki_show(args: argparse.Namespace) -> int:
    """List the identities under pki_dir with serial, expiry and revocation."""
    config = _config(args)
    revoked = pki.revoked_serials(config.pki_dir)
    for path in sorted(config.pki_dir.rglob("*.crt")):
        if path.name == "ca.crt":
            continue
        cert = pki.load_cert(path)
        ident = pki.identity_of(cert)
        state = "revoked" if ident.serial in revoked else "valid"
        expires = cert.not_valid_after_utc.date().isoformat()
        print(f"{ident.kind:6} {ident.name:20} {ident.serial:x} until {expires} {state}")
    return 0


def add_pki_commands(add: Callable[[str, Callable[[argparse.Namespace], int], str], Any]) -> None:
    """Register ``dsml pki ...`` with the top-level parser's ``add``."""
    sp = add("pki", cmd_pki_show, "the cluster's CA and certificates (for cluster.tls)")
    sub = sp.add_subparsers(dest="pki_command", required=True, metavar="PKI_COMMAND")

    def add_sub(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> Any:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=fn)
        return p

    p = add_sub("init", cmd_pki_init,
                "create the CA, the master's, every configured worker's and a user's "
                "certificate in the config's pki_dir (keeps what exists)")
    p.add_argument("--user", default=pki.DEFAULT_USER,
                   help=f"the user certificate to create (default {pki.DEFAULT_USER})")
    p = add_sub("issue", cmd_pki_issue, "issue a certificate for one more worker or user")
    p.add_argument("kind", choices=["worker", "user"], help="what the identity is")
    p.add_argument("name", help="its name (a worker's as in the config)")
    p.add_argument("--host", action="append",
                   help="a host name or address for the certificate (default: a configured "
                        "worker's host); repeatable")
    p = add_sub("revoke", cmd_pki_revoke,
                "revoke the certificate(s) called NAME; restart the processes to apply")
    p.add_argument("name", help="the identity's name")
    add_sub("show", cmd_pki_show, "list the certificates: kind, name, serial, expiry, state")
