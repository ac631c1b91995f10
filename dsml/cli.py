"""The ``dsml`` command.

Errors are one line on stderr and a non-zero exit status, never a traceback:
1 for an error from the cluster or the filesystem, 2 for bad usage or config, 141 when
the reader of stdout went away (``dsml ls | head``), 130 on Ctrl-C.  Data goes to stdout;
notes, hints and progress to stderr.  ``--json`` makes a listing one JSON document.

The cluster is found as the Python client finds it: ``-c FILE``, else $DSML_CONFIG, else
``etc/dsml.yaml`` in the working directory (:func:`dsml.config.find_config`).  This
module must not import Twisted (every command would pay for it): a test checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from .client import Client, ClusterClient, Progress
from .config import (
    CONFIG_ENV,
    MASTER_ADDR_FILE,
    WORKER_ADDR_FILE,
    ConfigError,
    find_config,
    load_config,
    read_address,
)
from .errors import DsmlError
from .jobfile import JobFileError, input_pair, load_job_file, output_pair
from .protocol.methods import HeaderValueError, check_key

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


def _connect(args: argparse.Namespace) -> Any:
    role, host, port, token = resolve_server(args)
    args.target = f"{'the master' if role == 'master' else 'server'} {host}:{port}"
    if role == "master":
        return ClusterClient(host, port, token, name="dsml-cli")
    return Client(host, port, token, name="dsml-cli")


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


# -- storage --------------------------------------------------------------------------


def cmd_upload(args: argparse.Namespace) -> int:
    path = Path(args.path)
    key = _key(args.key if args.key is not None else path.name)
    if not path.is_file():
        raise UsageError(f"{path}: not a regular file")
    size = path.stat().st_size
    with _connect(args) as c, _progress(size, f"upload {key}", not args.quiet) as progress:
        start = time.monotonic()
        stored = c.upload(path, key, progress)
        took = time.monotonic() - start
    copies = f", {stored.replicas} replicas" if stored.replicas > 1 else ""
    print(f"uploaded {path} -> {key}: {_rate(stored.size, took)}, version {stored.version}"
          f"{copies}, sha256 {stored.sha256}")
    return 0


def _relative_path(key: str, prefix: str) -> list[str]:
    """The path segments under DIR that ``key`` becomes in ``download -r PREFIX DIR``.

    Keys are taken relative to the prefix's directory part (everything up to its last
    ``/``): ``-r datasets/ out`` makes ``out/a.csv`` of ``datasets/a.csv``, ``-r datasets
    out`` makes ``out/datasets/a.csv``.  Raises ValueError for a key that is no safe
    relative path (``..`` or ``.`` or empty segments, a NUL).
    """
    base = prefix[: prefix.rfind("/") + 1]
    rest = key[len(base):]
    segments = rest.split("/")
    for seg in segments:
        if seg in ("", ".", "..") or "\0" in seg:
            raise ValueError(f"key {key!r} is not a safe relative path ({seg!r} segment)")
    return segments


def _safe_parent(root: Path, segments: list[str]) -> Path:
    """Create the directories of ``segments[:-1]`` under ``root`` one at a time, refusing
    to pass through a symbolic link or a non-directory (so nothing lands outside root)."""
    here = root
    for seg in segments[:-1]:
        here = here / seg
        try:
            os.mkdir(here, 0o777)
        except FileExistsError:
            if here.is_symlink() or not here.is_dir():
                raise ValueError(f"{here} exists and is not a plain directory") from None
    return here


def _download_tree(c: Any, prefix: str, root: Path, quiet: bool) -> int:
    """``download -r``: every key under ``prefix`` into ``root``; returns the exit status."""
    keys = [e.key for e in c.list(prefix)]
    if not keys:
        raise DsmlError(f"no keys under {prefix!r}", "not-found")
    root.mkdir(parents=True, exist_ok=True)
    if root.is_symlink():
        root = root.resolve()
    failed = total = 0
    start = time.monotonic()
    for key in keys:
        try:
            segments = _relative_path(key, prefix)
            target = _safe_parent(root, segments) / segments[-1]
            if target.is_dir() and not target.is_symlink():
                raise ValueError(f"{target} is a directory")
            total += c.download(key, target).size
        except ValueError as e:
            failed += 1
            _note(f"dsml: download: skipped {key!r}: {e}")
        except DsmlError as e:
            failed += 1
            _note(f"dsml: download: {key!r}: {e.message} [{e.code}]")
        except OSError as e:
            failed += 1
            _note(f"dsml: download: {key!r}: {e.strerror or e}")
    _note(f"downloaded {len(keys) - failed} of {len(keys)} keys under {prefix!r} -> {root}: "
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
    prefix = args.prefix or ""
    if prefix:
        _key(prefix)
    with _connect(args) as c:
        if args.json:
            _print_json({"prefix": prefix, "keys": [_listed_json(e) for e in c.list(prefix)]})
            return 0
        for e in c.list(prefix):
            if not args.long:
                print(e.key)
            elif hasattr(e, "replicas"):
                print(f"{e.size:>12} v{e.version:<8} {e.sha256[:12]}  "
                      f"{','.join(e.replicas) or '-':<12} {e.key}")
            else:
                print(f"{e.kind:5} {e.size:>12} v{e.version:<8} {e.sha256[:12]}  {e.key}")
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    key = _key(args.key)
    with _connect(args) as c:
        e = c.stat(key)
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


def _start_hint(args: argparse.Namespace, role: str, name: str = "") -> str:
    config = getattr(args, "config_used", None) or "etc/dsml.yaml"
    if role == "master":
        return f"twistd -n dsml-master -c {config}"
    return f"twistd -n dsml-worker -c {config} --name {name}"


def cmd_nodes(args: argparse.Namespace) -> int:
    with _cluster(args) as c:
        nodes = c.nodes()
    configured = list(args.config_loaded.workers) if getattr(args, "config_loaded", None) \
        else []
    known = {n.name for n in nodes}
    missing = [name for name in configured if name not in known]
    if args.json:
        _print_json({"workers": [_node_json(n) for n in nodes], "unregistered": missing})
        return 0
    if not nodes:
        first = configured[0] if configured else "NAME"
        _note(f"no worker has registered yet: start one with `{_start_hint(args, 'worker', first)}`"
              " (its log says why if it cannot start)")
        return 0
    print(f"{'NAME':<12} {'ADDRESS':<22} {'STATE':<8} {'HEARTBEAT':>9} {'FREE SLOTS':>10} "
          f"{'STORED':>10} {'FILES':>7} {'DISK FREE':>10}")
    for n in nodes:
        print(f"{n.name:<12} {n.host + ':' + str(n.port):<22} {n.state:<8} "
              f"{n.since_heartbeat:>8.1f}s {f'{n.free_slots} of {n.slots}':>10} "
              f"{_human(n.stored_bytes):>10} {n.stored_files:>7} {_human(n.free_disk):>10}")
    for name in missing:
        _note(f"worker {name} of the config has not registered: start it with "
              f"`{_start_hint(args, 'worker', name)}`")
    return 0


def _node_json(n: Any) -> dict[str, Any]:
    return {
        "name": n.name, "host": n.host, "port": n.port, "state": n.state,
        "since_heartbeat": n.since_heartbeat, "incarnation": n.incarnation,
        "slots": n.slots, "free_slots": n.free_slots, "stored_bytes": n.stored_bytes,
        "stored_files": n.stored_files, "free_disk": n.free_disk,
    }


# -- jobs -----------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if args.file:
        if command:
            raise UsageError("give either -f FILE or a command, not both")
        try:
            spec = load_job_file(args.file)
        except JobFileError as e:
            raise UsageError(str(e)) from None
        job_kw: dict[str, Any] = {
            "name": args.name or spec.name or Path(args.file).stem,
            "priority": args.priority if args.priority is not None else (spec.priority or 0),
            "after": list(args.after or spec.after),
            "tasks": list(spec.tasks),
        }
    else:
        if not command:
            raise UsageError("nothing to run: dsml submit [options] -- COMMAND ARGS...")
        if args.array < 1:
            raise UsageError("--array must be at least 1")
        env = {}
        for item in args.env or []:
            k, sep, v = item.partition("=")
            if not sep or not k:
                raise UsageError(f"--env wants K=V, got {item!r}")
            env[k] = v
        try:
            inputs = [input_pair(i) for i in args.input or []]
            outputs = [output_pair(o) for o in args.output or []]
        except ValueError as e:
            raise UsageError(str(e)) from None
        job_kw = {
            "command": command,
            "name": args.name or Path(command[0]).name,
            "priority": args.priority or 0,
            "after": args.after or [],
            "array": args.array,
            "env": env,
            "inputs": inputs,
            "outputs": outputs,
            "slots": args.slots,
            "timeout": args.timeout,
            "max_attempts": args.max_attempts,
        }
    with _cluster(args) as c:
        job = c.submit(**job_kw)
    print(job.id)
    return 0


def _age(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0.0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit}"
    return f"{s:.0f}s"


def _progress_text(j: dict[str, Any]) -> str:
    """``3/10 succeeded, 1 failed, 2 running``: every non-zero count, succeeded first."""
    counts = j.get("counts") or {}
    parts = [f"{counts.get('succeeded', 0)}/{j['total']} succeeded"]
    for state in ("failed", "cancelled", "running", "queued", "waiting"):
        if counts.get(state):
            parts.append(f"{counts[state]} {state}")
    return ", ".join(parts)


def cmd_jobs(args: argparse.Namespace) -> int:
    with _cluster(args) as c:
        jobs = c.jobs(args.limit)
    if args.json:
        _print_json({"jobs": [{k: v for k, v in j.items() if k != "tasks"} for j in jobs]})
        return 0
    print(f"{'JOB':<8} {'NAME':<20} {'STATE':<10} {'AGE':>5}  TASKS")
    for j in jobs:
        print(f"{j['id']:<8} {j['name'][:20]:<20} {j['state']:<10} {_age(j['created']):>5}  "
              f"{_progress_text(j)}")
    return 0


def _attempt_how(a: dict[str, Any]) -> str:
    if a["exit_code"] is not None:
        return f"exit {a['exit_code']}"
    if a["signal"] is not None:
        return f"signal {a['signal']}"
    return "-"


def _tail_lines(a: dict[str, Any], indent: str) -> Iterator[str]:
    tail = (a.get("stderr_tail") or "").rstrip("\n")
    if tail:
        for line in tail.split("\n"):
            yield f"{indent}| {line}"


def _attempt_number(a: dict[str, Any], position: int) -> int:
    return int(a.get("number") or position)


def cmd_status(args: argparse.Namespace) -> int:
    with _cluster(args) as c:
        j = c.job_status(args.job)
    if args.json:
        _print_json(j)
        return 0 if j["state"] != "failed" else 1
    reason = f" ({j['reason']})" if j.get("reason") else ""
    print(f"job {j['id']} {j['name']!r}: {j['state']}{reason}, {_progress_text(j)}")
    for t in j["tasks"]:
        treason = f" ({t['reason']})" if t.get("reason") else ""
        waits = t.get("waiting_for") or ""
        if waits:  # "job j3 to succeed", "a free slot (...)", "no live worker"
            waits = f", {waits}" if waits.startswith("no ") else f", waiting for {waits}"
        print(f"  task {t['index']}: {t['state']}{treason}{waits}")
        for position, a in enumerate(t["attempts"], 1):
            dur = f"{a['duration']:.2f}s" if a.get("duration") is not None else "-"
            why = f"  {a['reason']}" if a.get("reason") else ""
            print(f"    attempt {_attempt_number(a, position)} on {a['worker']}: {a['state']}, "
                  f"{_attempt_how(a)}, {dur}, started {_age(a['started'])} ago{why}")
            for line in _tail_lines(a, "      "):
                print(line)
    return 0 if j["state"] != "failed" else 1


def cmd_logs(args: argparse.Namespace) -> int:
    with _cluster(args) as c:
        attempt_id = None
        if args.attempt is not None:
            tasks = [t for t in c.job_status(args.job)["tasks"] if t["index"] == args.task]
            if not tasks:
                raise DsmlError(f"job {args.job} has no task {args.task}", "not-found")
            attempts = tasks[0]["attempts"]
            numbered = {_attempt_number(a, i): a["id"] for i, a in enumerate(attempts, 1)}
            if args.attempt not in numbered:
                raise DsmlError(
                    f"task {args.task} of {args.job} has {len(attempts)} attempt(s), "
                    f"not an attempt {args.attempt}", "not-found"
                )
            attempt_id = numbered[args.attempt]
        attempt, addr, _ = c.log_source(args.job, args.task, attempt_id)
        streams = ["stderr"] if args.stderr else ["stdout"] if args.stdout else [
            "stdout", "stderr"]
        offsets = dict.fromkeys(streams, 0)
        outs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
        while True:
            running = False
            for stream in streams:
                while True:
                    data, size, running = c.read_log(addr, attempt, stream, offsets[stream])
                    if data:
                        outs[stream].write(data)
                        outs[stream].flush()
                        offsets[stream] += len(data)
                    if not data or offsets[stream] >= size:
                        break
            if not args.follow or not running:
                return 0
            time.sleep(0.5)


def _failures(j: dict[str, Any]) -> Iterator[str]:
    """Lines naming each failed task, its reason and its last attempt's stderr tail."""
    for t in j.get("tasks", ()):
        if t["state"] != "failed":
            continue
        yield f"  task {t['index']} failed: {t.get('reason') or 'failed'}"
        if t["attempts"]:
            yield from _tail_lines(t["attempts"][-1], "    ")


def cmd_wait(args: argparse.Namespace) -> int:
    tty = sys.stderr.isatty() and not args.quiet
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    shown = ""
    with _cluster(args) as c:
        while True:
            # On a terminal ask again every second to show progress; else hold one request.
            step = 1.0 if tty else args.timeout
            if deadline is not None:
                step = min(step or 60.0, max(0.0, deadline - time.monotonic()))
            j = c.wait(args.job, step)
            final = j["state"] in ("succeeded", "failed", "cancelled")
            if tty:
                line = f"\r{j['id']}: {j['state']}, {_progress_text(j)}"
                sys.stderr.write(line + " " * max(0, len(shown) - len(line)))
                sys.stderr.flush()
                shown = line
            if final or (deadline is not None and time.monotonic() >= deadline):
                break
    if tty:
        sys.stderr.write("\n")
    reason = f" ({j['reason']})" if j.get("reason") else ""
    _note(f"job {j['id']}: {j['state']}{reason}, {_progress_text(j)}")
    for line in _failures(j):
        _note(line)
    return 0 if j["state"] == "succeeded" else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    with _cluster(args) as c:
        killed = c.cancel(args.job)
    _note(f"cancelled {args.job} ({killed} running attempts stopped)")
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        c.ping()
    print(f"ok {c.host}:{c.port}")
    return 0


# -- the parser -----------------------------------------------------------------------

_EPILOG = """\
storage:  upload, download (-r for a prefix), cat, set, get, rm (-r), ls, stat
jobs:     submit, jobs, status, logs, wait, cancel
cluster:  nodes, ping

The cluster is found from -c FILE, else $DSML_CONFIG, else ./etc/dsml.yaml; the token
from $DSML_TOKEN, else the config.  `dsml COMMAND -h` describes one command.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dsml`` command."""
    p = argparse.ArgumentParser(
        prog="dsml",
        description="Store files and values on a dsml cluster and run jobs on its workers.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config",
                   help="cluster config file (default: $DSML_CONFIG, else ./etc/dsml.yaml)")
    p.add_argument("--server", metavar="HOST:PORT",
                   help="talk to one storage server directly, not the master")
    p.add_argument("--worker", metavar="NAME",
                   help="talk to this worker of the config directly, not the master")
    p.add_argument("--token",
                   help="cluster token; avoid: other users see it in `ps`. Prefer "
                        "$DSML_TOKEN or the config's token/token_file")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars or progress lines")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> Any:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn)
        return sp

    def json_flag(sp: Any) -> None:
        sp.add_argument("--json", action="store_true",
                        help="print one JSON document (see the README for its fields)")

    sp = add("upload", cmd_upload, "upload a file (KEY defaults to the file's name)")
    sp.add_argument("path", help="the local file")
    sp.add_argument("key", nargs="?", help="the key to store it under")
    sp = add("download", cmd_download,
             "download a key to PATH (- for stdout), or with -r every key under a prefix")
    sp.add_argument("key", help="the key (with -r: the prefix)")
    sp.add_argument("path", nargs="?",
                    help="where to write (default: the key's last part; with -r: a directory)")
    sp.add_argument("-r", "--recursive", action="store_true",
                    help="download every key under the prefix KEY into directory PATH")
    sp = add("cat", cmd_cat, "write keys (files or values) to stdout, one after another")
    sp.add_argument("keys", nargs="+", metavar="key", help="keys to write")
    sp = add("set", cmd_set, "store a small value (- reads it from stdin)")
    sp.add_argument("key", help="the key")
    sp.add_argument("value", help="the value, or - to read it from stdin")
    sp = add("get", cmd_get, "print a value (for a file use cat or download)")
    sp.add_argument("key", help="the key")
    sp = add("rm", cmd_rm, "delete keys (with -r: every key under each prefix)")
    sp.add_argument("keys", nargs="+", metavar="key", help="keys (with -r: prefixes)")
    sp.add_argument("-r", "--recursive", action="store_true",
                    help="treat each argument as a prefix and delete every key under it")
    sp = add("ls", cmd_ls, "list keys, optionally under a prefix")
    sp.add_argument("prefix", nargs="?", help="only keys starting with this")
    sp.add_argument("-l", "--long", action="store_true",
                    help="size, version, sha256 and replicas (or kind, on one server)")
    json_flag(sp)
    sp = add("stat", cmd_stat, "describe a key: kind, size, version, sha256, replicas")
    sp.add_argument("key", help="the key")
    json_flag(sp)
    add("ping", cmd_ping, "check that the server answers")
    sp = add("nodes", cmd_nodes, "list the workers the master knows, with their state")
    json_flag(sp)

    sp = add("submit", cmd_submit, "submit a job: dsml submit [options] -- COMMAND ARGS...")
    sp.add_argument("-f", "--file", help="a YAML job file listing tasks (see the README)")
    sp.add_argument("--name", help="the job's name (default: the command's or file's name)")
    sp.add_argument("--slots", type=int, default=1,
                    help="task slots each task takes on its worker (default 1)")
    sp.add_argument("--timeout", type=float, help="seconds an attempt may run before it is "
                                                  "killed (default: no limit)")
    sp.add_argument("--max-attempts", type=int, default=3,
                    help="attempts per task before it fails (default 3)")
    sp.add_argument("--priority", type=int, help="higher runs first (default 0)")
    sp.add_argument("--after", action="append", metavar="JOB", help="run after JOB succeeds")
    sp.add_argument("--input", action="append", metavar="KEY[:PATH]",
                    help="fetch KEY into the task's directory ({index} = task index)")
    sp.add_argument("--output", action="append", metavar="PATH[:KEY]",
                    help="upload PATH as KEY after a success ({index} = task index)")
    sp.add_argument("--env", action="append", metavar="K=V",
                    help="set an environment variable in the task")
    sp.add_argument("--array", type=int, default=1, metavar="N",
                    help="N tasks, each with DSML_TASK_INDEX")
    sp.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                    help="the command and its arguments, after --")
    sp = add("jobs", cmd_jobs, "list recent jobs")
    sp.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    json_flag(sp)
    sp = add("status", cmd_status, "show a job's tasks and attempts")
    sp.add_argument("job", help="the job id (jN)")
    json_flag(sp)
    sp = add("logs", cmd_logs, "print a task's stdout and stderr")
    sp.add_argument("job", help="the job id (jN)")
    sp.add_argument("--task", type=int, default=0, help="the task index (default 0)")
    sp.add_argument("--attempt", type=int,
                    help="the task's attempt number, 1, 2, ... (default: the last)")
    sp.add_argument("-f", "--follow", action="store_true",
                    help="keep printing while the attempt runs")
    sp.add_argument("--stdout", action="store_true", help="stdout only")
    sp.add_argument("--stderr", action="store_true", help="stderr only")
    sp = add("wait", cmd_wait, "wait until a job ends; non-zero exit unless it succeeded")
    sp.add_argument("job", help="the job id (jN)")
    sp.add_argument("--timeout", type=float, help="give up after this many seconds")
    sp = add("cancel", cmd_cancel, "cancel a job and stop its running attempts")
    sp.add_argument("job", help="the job id (jN)")
    return p


def _where(args: argparse.Namespace) -> str:
    """Where the command was trying to reach and how to start it, for a connection error."""
    config = getattr(args, "config_used", None)
    target = getattr(args, "target", None) or "the server"
    if config is None:
        return f"{target}, given without a config"
    hint = f"; start it with `{_start_hint(args, 'master')}`" \
        if target.startswith("the master") else ""
    return f"{target}, from config {config}: is it running?{hint}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"dsml: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of stdout is gone (`dsml ls | head`): end quietly, as a killed
        # process would, and keep Python from complaining when it flushes at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except DsmlError as e:
        hint = ""
        if e.code == "connection":
            hint = f" ({_where(args)})"
        print(f"dsml: {args.command}: {e.message}{hint} [{e.code}]", file=sys.stderr)
        return 1
    except OSError as e:
        text = e.strerror or str(e)
        print(f"dsml: {args.command}: {text}" + (f": {e.filename}" if e.filename else ""),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dsml: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
