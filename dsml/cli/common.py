"""What every ``dsml`` command shares: finding the cluster, connecting, keys, printing.

The cluster is found as the Python client finds it: ``-c FILE``, else $DSML_CONFIG, else
``etc/dsml.yaml`` in the working directory (:func:`dsml.config.find_config`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from ..client import Client, ClusterClient, Progress
from ..client.server import ClientTls, client_tls
from ..config import (
    CONFIG_ENV,
    MASTER_ADDR_FILE,
    WORKER_ADDR_FILE,
    ConfigError,
    find_config,
    load_config,
    read_address,
)
from ..protocol.methods import HeaderValueError, check_key

#: Exit status when stdout is a pipe whose reader has gone (128 + SIGPIPE, as a shell
#: reports a process killed by it).
EXIT_BROKEN_PIPE = 141


class UsageError(Exception):
    """Bad arguments or configuration (exit status 2)."""


def _parse_server(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"--server must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def resolve_server(args: argparse.Namespace) -> tuple[str, str, int, str | None]:
    """Whom to talk to: ("worker" or "master", host, port, token).

    ``--server`` (or $DSML_SERVER) names one storage server directly; ``--worker NAME``
    picks one from the config; otherwise the config's master, through which every
    command reaches the whole cluster.  Sets ``args.config_used`` to the config file read.
    """
    token = args.token or os.environ.get("DSML_TOKEN")
    server = args.server or os.environ.get("DSML_SERVER")
    args.config_used = None
    explicit = args.config or os.environ.get(CONFIG_ENV)
    if server and not explicit:
        host, port = _parse_server(server)
        return "worker", host, port, token
    config_path = find_config(explicit)
    if config_path is None:
        raise UsageError(
            "no cluster config: give -c FILE (or set DSML_CONFIG), run where etc/dsml.yaml"
            " is, or name one server with --server HOST:PORT"
        )
    try:
        config = load_config(config_path)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    args.config_used = config_path
    args.config_loaded = config
    if token is None:
        token = config.cluster.token
    if server:
        host, port = _parse_server(server)
        return "worker", host, port, token
    if args.worker:
        try:
            worker = config.worker(args.worker)
        except ConfigError as e:
            raise UsageError(str(e)) from None
        host, port = read_address(
            f"worker {worker.name}", worker.host, worker.port, worker.data_dir / WORKER_ADDR_FILE
        )
        return "worker", host, port, token
    m = config.master
    host, port = read_address("the master", m.host, m.port, m.state_dir / MASTER_ADDR_FILE)
    return "master", host, port, token


def _tls(args: argparse.Namespace) -> ClientTls | None:
    """The user certificate to present when the config says ``cluster.tls``."""
    config = getattr(args, "config_loaded", None)
    if config is None:
        return None
    return client_tls(config, getattr(args, "identity", None))


def _connect(args: argparse.Namespace) -> Any:
    role, host, port, token = resolve_server(args)
    args.target = f"{'the master' if role == 'master' else 'server'} {host}:{port}"
    tls = _tls(args)
    if role == "master":
        return ClusterClient(host, port, token, name="dsml-cli", tls=tls)
    return Client(host, port, token, name="dsml-cli", tls=tls)


def _cluster(args: argparse.Namespace) -> ClusterClient:
    c = _connect(args)
    if not isinstance(c, ClusterClient):
        c.close()
        raise UsageError(f"{args.command} asks the master: use --config, not --server/--worker")
    return c


def _key(text: str) -> str:
    try:
        return check_key(text)
    except HeaderValueError as e:
        raise UsageError(f"bad key {text!r}: {e.message}") from None


def _progress(total: int, label: str, enabled: bool) -> AbstractContextManager[Progress | None]:
    """A tqdm bar on a terminal for transfers worth watching; nothing when piped."""
    if not enabled or total < 8 * 1024 * 1024 or not sys.stderr.isatty():
        return nullcontext(None)
    from tqdm import tqdm

    class _Bar(AbstractContextManager[Progress]):
        def __enter__(self) -> Progress:
            self.bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False
            )
            return self.bar.update

        def __exit__(self, *exc: object) -> None:
            self.bar.close()

    return _Bar()


def _human(n: float) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _rate(size: int, seconds: float) -> str:
    """``64.0 MiB in 0.42 s (152.4 MiB/s)``."""
    speed = f"{_human(size / seconds)}/s" if seconds > 0 else "-"
    return f"{_human(size)} in {seconds:.2f} s ({speed})"


def _print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False))


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def _start_hint(args: argparse.Namespace, role: str, name: str = "") -> str:
    config = getattr(args, "config_used", None) or "etc/dsml.yaml"
    if role == "master":
        return f"twistd -n dsml-master -c {config}"
    return f"twistd -n dsml-worker -c {config} --name {name}"
