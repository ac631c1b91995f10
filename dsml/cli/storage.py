"""The storage and cluster commands: upload, download (-r), cat, set, get, rm (-r), ls,
stat, nodes, ping.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..client import ClusterClient
from ..client.tree import download_tree
from ..client.tree import relative_path as _relative_path  # noqa: F401  (tests use them)
from ..client.tree import safe_parent as _safe_parent  # noqa: F401
from ..errors import DsmlError
from .common import (
    UsageError,
    _cluster,
    _connect,
    _human,
    _key,
    _note,
    _print_json,
    _progress,
    _rate,
    _start_hint,
)


def cmd_upload(args: argparse.Namespace) -> int:
    path = Path(args.path)
    key = _key(args.key if args.key is not None else path.name)
    if not path.is_file():
        raise UsageError(f"{path}: not a regular file")
    size = path.stat().st_size
    if args.chunk is not None:
        return _upload_dataset(args, path, key, size)
    if args.format is not None:
        raise UsageError("--format goes with --chunk")
    with _connect(args) as c, _progress(size, f"upload {key}", not args.quiet) as progress:
        start = time.monotonic()
        stored = c.upload(path, key, progress)
        took = time.monotonic() - start
    copies = f", {stored.replicas} replicas" if stored.replicas > 1 else ""
    print(f"uploaded {path} -> {key}: {_rate(stored.size, took)}, version {stored.version}"
          f"{copies}, sha256 {stored.sha256}")
    return 0


def _upload_dataset(args: argparse.Namespace, path: Path, name: str, size: int) -> int:
    from ..config import parse_size
    from ..datasets import ChunkError, upload_dataset

    try:
        chunk = parse_size(args.chunk)
    except ValueError as e:
        raise UsageError(f"--chunk: {e}") from None
    with _connect(args) as c, _progress(size, f"upload {name}", not args.quiet) as progress:
        start = time.monotonic()
        sent = [0]

        def step(chunks: int, done: int) -> None:
            if progress is not None:
                progress(done - sent[0])
            sent[0] = done

        try:
            m = upload_dataset(c, path, name, chunk, args.format, step)
        except ChunkError as e:
            raise UsageError(f"{path}: {e}") from None
        took = time.monotonic() - start
    print(f"uploaded {path} -> dataset {name}: {len(m['chunks'])} chunks, {m['rows']} rows "
          f"({m['kind']}), {_rate(size, took)}; manifest {name}/_manifest.json")
    return 0


def _download_tree(c: Any, prefix: str, root: Path, quiet: bool) -> int:
    """``download -r``: every key under ``prefix`` into ``root``; returns the exit status."""
    failed = 0

    def report(key: str, e: Exception) -> None:
        nonlocal failed
        failed += 1
        if isinstance(e, ValueError):
            _note(f"dsml: download: skipped {key!r}: {e}")
        elif isinstance(e, DsmlError):
            _note(f"dsml: download: {key!r}: {e.message} [{e.code}]")
        else:
            _note(f"dsml: download: {key!r}: {getattr(e, 'strerror', None) or e}")

    start = time.monotonic()
    done, total = download_tree(c, prefix, root, report)
    if root.is_symlink():
        root = root.resolve()
    n = len(done) + failed
    _note(f"downloaded {len(done)} of {n} keys under {prefix!r} -> {root}: "
          f"{_rate(total, time.monotonic() - start)}")
    return 1 if failed else 0


def cmd_download(args: argparse.Namespace) -> int:
    if args.recursive:
        if args.path is None:
            raise UsageError("download -r PREFIX DIR: give the directory to write into")
        if args.path == "-":
            raise UsageError("download -r writes files: give a directory, not -")
        prefix = args.key
        if prefix:
            _key(prefix)
        with _connect(args) as c:
            return _download_tree(c, prefix, Path(args.path), args.quiet)
    key = _key(args.key)
    with _connect(args) as c:
        if args.path == "-":
            out = sys.stdout.buffer
            c.download_to(key, out)
            out.flush()
            return 0
        if args.path is None:
            name = key.rstrip("/").rpartition("/")[2]
            if name in ("", ".", ".."):
                raise UsageError(f"cannot name a file after key {key!r}: give a PATH")
            target = Path(name)
        else:
            target = Path(args.path)
            if target.is_dir():
                target = target / key.rstrip("/").rpartition("/")[2]
        size = c.stat(key).size
        with _progress(size, f"download {key}", not args.quiet) as progress:
            start = time.monotonic()
            entry = c.download(key, target, progress)
            took = time.monotonic() - start
    _note(f"downloaded {key} -> {target}: {_rate(entry.size, took)}, version {entry.version}")
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    keys = [_key(k) for k in args.keys]
    out = sys.stdout.buffer
    with _connect(args) as c:
        for key in keys:
            c.download_to(key, out)  # files and values alike
            out.flush()
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    key = _key(args.key)
    value = sys.stdin.buffer.read() if args.value == "-" else os.fsencode(args.value)
    with _connect(args) as c:
        stored = c.set(key, value)
    _note(f"set {key} (version {stored.version}, {stored.size} bytes)")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    key = _key(args.key)
    with _connect(args) as c:
        try:
            value = c.get(key)
        except DsmlError as e:
            if e.code != "wrong-kind":
                raise
            raise DsmlError(
                f"{key} is a file, not a value: use `dsml cat {key}` or "
                f"`dsml download {key} PATH`", "wrong-kind"
            ) from None
    out = sys.stdout.buffer
    out.write(value)
    if sys.stdout.isatty() and not value.endswith(b"\n"):
        out.write(b"\n")
    out.flush()
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        if not args.recursive:
            for text in args.keys:
                c.delete(_key(text))
            return 0
        removed = 0
        for prefix in args.keys:
            if not prefix:
                raise UsageError("rm -r needs a non-empty prefix (it would remove every key)")
            _key(prefix)
            for key in [e.key for e in c.list(prefix)]:
                try:
                    c.delete(key)
                    removed += 1
                except DsmlError as e:
                    if e.code != "not-found":  # removed meanwhile: what was asked
                        raise
        _note(f"removed {removed} keys under {', '.join(repr(p) for p in args.keys)}")
    return 0


def _listed_json(e: Any) -> dict[str, Any]:
    return {
        "key": e.key,
        "kind": getattr(e, "kind", None),
        "size": e.size,
        "version": e.version,
        "sha256": e.sha256,
        "replicas": list(e.replicas) if hasattr(e, "replicas") else None,
        "mtime": getattr(e, "mtime", None),
    }


def cmd_ls(args: argparse.Namespace) -> int:
    from ..datasets.listing import DatasetEntry, group_datasets

    prefix = args.prefix or ""
    if prefix:
        _key(prefix)
    with _connect(args) as c:
        if args.json:
            _print_json({"prefix": prefix, "keys": [_listed_json(e) for e in c.list(prefix)]})
            return 0
        listed = c.list(prefix)
        if args.long and isinstance(c, ClusterClient):
            listed = group_datasets(c, listed)  # a dataset is one line
        for e in listed:
            if isinstance(e, DatasetEntry):
                print(f"{e.size:>12} {'dataset':<9} {e.spread}, {e.rows} rows ({e.kind})"
                      f"  {e.name}/")
            elif not args.long:
                print(e.key)
            elif hasattr(e, "replicas"):
                print(f"{e.size:>12} v{e.version:<8} {e.sha256[:12]}  "
                      f"{','.join(e.replicas) or '-':<12} {e.key}")
            else:
                print(f"{e.kind:5} {e.size:>12} v{e.version:<8} {e.sha256[:12]}  {e.key}")
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    key = _key(args.key.rstrip("/") or args.key)
    with _connect(args) as c:
        try:
            e = c.stat(key)
        except DsmlError as err:
            if err.code != "not-found" or not isinstance(c, ClusterClient):
                raise
            return _stat_dataset(args, c, key, err)
        replicas = [name for name, _ in c.locate(key).replicas] \
            if isinstance(c, ClusterClient) else None
    if args.json:
        _print_json({"key": e.key, "kind": e.kind, "size": e.size, "version": e.version,
                     "sha256": e.sha256, "replicas": replicas})
        return 0
    print(f"key:      {e.key}\nkind:     {e.kind}\nsize:     {e.size}\n"
          f"sha256:   {e.sha256}\nversion:  {e.version}")
    if replicas is not None:
        print(f"replicas: {', '.join(replicas) or '-'}")
    return 0


def _stat_dataset(args: argparse.Namespace, c: ClusterClient, name: str,
                  err: DsmlError) -> int:
    """``dsml stat NAME`` of a dataset (a key that is not, but ``NAME/_manifest.json``)."""
    from ..datasets.listing import describe

    try:
        d = describe(c, name)
    except DsmlError as e:
        if e.code == "not-found":
            raise err from None  # neither a key nor a dataset: the key's error
        raise
    if args.json:
        _print_json(d.as_json())
        return 0
    held = ", ".join(f"{w} ({n})" for w, n in sorted(d.held.items())) or "-"
    print(f"dataset:  {d.name}\nkind:     {d.kind}\nsize:     {d.size}\n"
          f"rows:     {d.rows}\nchunks:   {d.spread}\nworkers:  {held}\n"
          f"source:   {d.manifest.get('source', '-')}")
    if d.manifest.get("header"):
        print(f"header:   {d.manifest['header']}")
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    with _cluster(args) as c:
        nodes, lag = c.nodes_and_lag()
    configured = list(args.config_loaded.workers) if getattr(args, "config_loaded", None) \
        else []
    known = {n.name for n in nodes}
    missing = [name for name in configured if name not in known]
    if args.json:
        _print_json({"workers": [_node_json(n) for n in nodes], "unregistered": missing,
                     "master": {"reactor_lag_ms": lag}})
        return 0
    if not nodes:
        first = configured[0] if configured else "NAME"
        _note(f"no worker has registered yet: start one with `{_start_hint(args, 'worker', first)}`"
              " (its log says why if it cannot start)")
        return 0
    # A cordoned worker gets no new task (its attempts all fail at once): its state says
    # so in the table, and why under it.
    states = {n.name: f"{n.state}, cordoned" if n.cordoned else n.state for n in nodes}
    width = max(8, *map(len, states.values()))
    print(f"{'NAME':<12} {'ADDRESS':<22} {'STATE':<{width}} {'HEARTBEAT':>9} {'CPUS FREE':>9} "
          f"{'MEM FREE':>19} {'GPUS FREE':>9} {'STORED':>10} {'FILES':>7} {'DISK FREE':>10}")
    for n in nodes:
        mem = f"{_human(n.mem - n.mem_used)} of {_human(n.mem)}" if n.mem else "-"
        print(f"{n.name:<12} {n.host + ':' + str(n.port):<22} {states[n.name]:<{width}} "
              f"{n.since_heartbeat:>8.1f}s {f'{n.slots - n.cpus_used} of {n.slots}':>9} "
              f"{mem:>19} {f'{len(n.gpus) - n.gpus_used} of {len(n.gpus)}':>9} "
              f"{_human(n.stored_bytes):>10} {n.stored_files:>7} {_human(n.free_disk):>10}")
    for n in nodes:
        if n.cordoned:
            print(f"{n.name}: {n.state}, cordoned: {n.cordoned}")
    for name in missing:
        _note(f"worker {name} of the config has not registered: start it with "
              f"`{_start_hint(args, 'worker', name)}`")
    return 0


def _node_json(n: Any) -> dict[str, Any]:
    return {
        "name": n.name, "host": n.host, "port": n.port, "state": n.state,
        "since_heartbeat": n.since_heartbeat, "incarnation": n.incarnation,
        "slots": n.slots, "free_slots": n.free_slots, "stored_bytes": n.stored_bytes,
        "stored_files": n.stored_files, "free_disk": n.free_disk, "mem": n.mem,
        "gpus": list(n.gpus), "cpus_used": n.cpus_used, "mem_used": n.mem_used,
        "gpus_used": n.gpus_used, "cordoned": n.cordoned,
    }


def cmd_ping(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        c.ping()
    print(f"ok {c.host}:{c.port}")
    return 0
