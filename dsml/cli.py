"""The ``dsml`` command.

Errors are one line on stderr and a non-zero exit status, never a traceback:
1 for an error from the cluster or the filesystem, 2 for bad usage or config.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from .client import Client, ClusterClient, Progress
from .errors import DsmlError
from .protocol.methods import HeaderValueError, check_key

DEFAULT_CONFIG = Path("etc/dsml.yaml")

#: Where a master or worker on an OS-chosen port writes its address, under its state_dir
#: or data_dir: the same names as ``dsml.master.service.ADDR_FILE`` and
#: ``dsml.worker.service.ADDR_FILE`` (tests check it).  Spelled out here because importing
#: those modules loads Twisted, which doubled the start-up time of every dsml command.
MASTER_ADDR_FILE = "master.addr"
WORKER_ADDR_FILE = "worker.addr"


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
    command reaches the whole cluster.
    """
    token = args.token or os.environ.get("DSML_TOKEN")
    server = args.server or os.environ.get("DSML_SERVER")
    config_path = args.config or os.environ.get("DSML_CONFIG")
    if server and not config_path:
        host, port = _parse_server(server)
        return "worker", host, port, token
    if not config_path:
        if not DEFAULT_CONFIG.exists():
            raise UsageError(
                "no cluster: give --config FILE or --server HOST:PORT (or set DSML_CONFIG)"
            )
        config_path = str(DEFAULT_CONFIG)
    from .config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as e:
        raise UsageError(str(e)) from None
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
        host, port = _address(
            f"worker {worker.name}", worker.host, worker.port, worker.data_dir / WORKER_ADDR_FILE
        )
        return "worker", host, port, token
    m = config.master
    host, port = _address("the master", m.host, m.port, m.state_dir / MASTER_ADDR_FILE)
    return "master", host, port, token


def _address(what: str, host: str, port: int, addr_file: Path) -> tuple[str, int]:
    """A configured address; port 0 means the OS chose it and the addr file says which."""
    if port:
        return host, port
    try:
        # The format of dsml.net.listen.write_addr_file (not imported: it loads Twisted).
        addr_host, _, addr_port = addr_file.read_text().strip().rpartition(":")
        return addr_host, int(addr_port)
    except (OSError, ValueError):
        raise DsmlError(
            f"{what} listens on an OS-chosen port and {addr_file} is missing: is it running?",
            "connection",
        ) from None


def _connect(args: argparse.Namespace) -> Any:
    role, host, port, token = resolve_server(args)
    if role == "master":
        return ClusterClient(host, port, token, name="dsml-cli")
    return Client(host, port, token, name="dsml-cli")


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


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# -- commands -------------------------------------------------------------------------


def cmd_upload(args: argparse.Namespace) -> int:
    path = Path(args.path)
    key = _key(args.key if args.key is not None else path.name)
    if not path.is_file():
        raise UsageError(f"{path}: not a regular file")
    size = path.stat().st_size
    with _connect(args) as c, _progress(size, f"upload {key}", not args.quiet) as progress:
        stored = c.upload(path, key, progress)
    copies = f", {stored.replicas} replicas" if stored.replicas > 1 else ""
    print(f"uploaded {path} -> {key} ({_human(stored.size)}, version {stored.version}"
          f"{copies}, sha256 {stored.sha256})")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
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
            entry = c.download(key, target, progress)
    print(f"downloaded {key} -> {target} ({_human(entry.size)}, version {entry.version})",
          file=sys.stderr)
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    key = _key(args.key)
    value = sys.stdin.buffer.read() if args.value == "-" else os.fsencode(args.value)
    with _connect(args) as c:
        stored = c.set(key, value)
    print(f"set {key} (version {stored.version}, {stored.size} bytes)", file=sys.stderr)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    key = _key(args.key)
    with _connect(args) as c:
        value = c.get(key)
    out = sys.stdout.buffer
    out.write(value)
    if sys.stdout.isatty() and not value.endswith(b"\n"):
        out.write(b"\n")
    out.flush()
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        for text in args.keys:
            c.delete(_key(text))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    prefix = args.prefix or ""
    if prefix:
        _key(prefix)
    with _connect(args) as c:
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
    with _connect(args) as c:
        e = c.stat(_key(args.key))
    print(f"key:     {e.key}\nkind:    {e.kind}\nsize:    {e.size}\n"
          f"sha256:  {e.sha256}\nversion: {e.version}")
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    c = _connect(args)
    with c:
        if not isinstance(c, ClusterClient):
            raise UsageError("nodes asks the master: use --config, not --server/--worker")
        nodes = c.nodes()
    print(f"{'NAME':<12} {'ADDRESS':<22} {'STATE':<8} {'HEARTBEAT':>9} {'SLOTS':>7} "
          f"{'STORED':>10} {'FILES':>7}")
    for n in nodes:
        print(f"{n.name:<12} {n.host + ':' + str(n.port):<22} {n.state:<8} "
              f"{n.since_heartbeat:>8.1f}s {n.free_slots:>3}/{n.slots:<3} "
              f"{_human(n.stored_bytes):>10} {n.stored_files:>7}")
    return 0


# -- jobs -----------------------------------------------------------------------------


def _cluster(args: argparse.Namespace) -> Any:
    c = _connect(args)
    if not isinstance(c, ClusterClient):
        c.close()
        raise UsageError(f"{args.command} asks the master: use --config, not --server/--worker")
    return c


def _pair(text: str, what: str, default_second: Callable[[str], str]) -> tuple[str, str]:
    first, sep, second = text.partition(":")
    if not first:
        raise UsageError(f"bad {what} {text!r}")
    return first, (second if sep else default_second(first))


def _tasks_from_file(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import shlex

    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list) or not doc["tasks"]:
        raise UsageError(f"{path}: a job file is a mapping with a non-empty list 'tasks'")
    tasks = []
    for i, t in enumerate(doc["tasks"]):
        if isinstance(t, (str, list)):
            t = {"command": t}
        if not isinstance(t, dict) or "command" not in t:
            raise UsageError(f"{path}: tasks[{i}]: needs a command")
        t = dict(t)
        if isinstance(t["command"], str):
            t["command"] = shlex.split(t["command"])
        tasks.append(t)
    meta = {k: doc[k] for k in ("name", "priority", "after") if k in doc}
    return meta, tasks


def cmd_submit(args: argparse.Namespace) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if args.file:
        if command:
            raise UsageError("give either -f FILE or a command, not both")
        meta, tasks = _tasks_from_file(args.file)
        job_kw: dict[str, Any] = {
            "name": args.name or meta.get("name", Path(args.file).stem),
            "priority": args.priority if args.priority is not None else meta.get("priority", 0),
            "after": list(args.after or meta.get("after", [])),
            "tasks": tasks,
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
        inputs = [_pair(i, "--input", lambda k: k.rstrip("/").rpartition("/")[2])
                  for i in args.input or []]
        outputs = [_pair(o, "--output", lambda p: p) for o in args.output or []]
        tasks = []
        for index in range(args.array):
            def fill(text: str, index: int = index) -> str:
                return text.replace("{index}", str(index))

            tasks.append({
                "command": command,
                "env": env,
                "inputs": [[fill(k), fill(p)] for k, p in inputs],
                "outputs": [[fill(p), fill(k)] for p, k in outputs],
                "slots": args.slots,
                "timeout": args.timeout,
                "max_attempts": args.max_attempts,
            })
        job_kw = {
            "name": args.name or Path(command[0]).name,
            "priority": args.priority or 0,
            "after": args.after or [],
            "tasks": tasks,
        }
    with _cluster(args) as c:
        job = c.submit(**job_kw)
    print(job.id)
    return 0


def _age(t: float | None) -> str:
    import time

    if not t:
        return "-"
    s = max(0.0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit}"
    return f"{s:.0f}s"


def cmd_jobs(args: argparse.Namespace) -> int:
    with _cluster(args) as c:
        jobs = c.jobs(args.limit)
    print(f"{'JOB':<8} {'NAME':<20} {'STATE':<10} {'DONE':>11} {'AGE':>5}")
    for j in jobs:
        print(f"{j['id']:<8} {j['name'][:20]:<20} {j['state']:<10} "
              f"{str(j['done']) + '/' + str(j['total']):>11} {_age(j['created']):>5}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _cluster(args) as c:
        j = c.job_status(args.job)
    reason = f" ({j['reason']})" if j.get("reason") else ""
    print(f"job {j['id']} {j['name']!r}: {j['state']}{reason}, {j['done']}/{j['total']} tasks done")
    for t in j["tasks"]:
        treason = f" ({t['reason']})" if t.get("reason") else ""
        print(f"  task {t['index']}: {t['state']}{treason}")
        for a in t["attempts"]:
            how = (f"exit {a['exit_code']}" if a["exit_code"] is not None
                   else f"signal {a['signal']}" if a["signal"] is not None else "-")
            dur = f"{a['duration']:.2f}s" if a.get("duration") is not None else "-"
            why = f"  {a['reason']}" if a.get("reason") else ""
            print(f"    attempt {a['id']} on {a['worker']}: {a['state']}, {how}, {dur}, "
                  f"started {_age(a['started'])} ago{why}")
    return 0 if j["state"] != "failed" else 1


def cmd_logs(args: argparse.Namespace) -> int:
    import time

    with _cluster(args) as c:
        attempt, addr, _ = c.log_source(args.job, args.task, args.attempt)
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


def cmd_wait(args: argparse.Namespace) -> int:
    with _cluster(args) as c:
        j = c.wait(args.job, args.timeout)
    reason = f" ({j['reason']})" if j.get("reason") else ""
    print(f"job {j['id']}: {j['state']}{reason}, {j['done']}/{j['total']} tasks done",
          file=sys.stderr)
    return 0 if j["state"] == "succeeded" else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    with _cluster(args) as c:
        killed = c.cancel(args.job)
    print(f"cancelled {args.job} ({killed} running attempts stopped)", file=sys.stderr)
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    with _connect(args) as c:
        c.ping()
    print(f"ok {c.host}:{c.port}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dsml`` command."""
    p = argparse.ArgumentParser(
        prog="dsml", description="Store files and values on a dsml cluster."
    )
    p.add_argument("-c", "--config", help="cluster config (default $DSML_CONFIG or etc/dsml.yaml)")
    p.add_argument("--server", help="talk to one storage server HOST:PORT directly")
    p.add_argument("--worker", help="talk to this worker of the config directly")
    p.add_argument("--token", help="cluster token (default $DSML_TOKEN or the config's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> Any:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn)
        return sp

    sp = add("upload", cmd_upload, "upload a file (KEY defaults to the file's name)")
    sp.add_argument("path")
    sp.add_argument("key", nargs="?")
    sp = add("download", cmd_download, "download a file to PATH (- for stdout)")
    sp.add_argument("key")
    sp.add_argument("path", nargs="?")
    sp = add("set", cmd_set, "store a small value (- reads it from stdin)")
    sp.add_argument("key")
    sp.add_argument("value")
    sp = add("get", cmd_get, "print a value")
    sp.add_argument("key")
    sp = add("rm", cmd_rm, "delete keys")
    sp.add_argument("keys", nargs="+", metavar="key")
    sp = add("ls", cmd_ls, "list keys, optionally under a prefix")
    sp.add_argument("prefix", nargs="?")
    sp.add_argument("-l", "--long", action="store_true", help="kind, size, version, sha256")
    sp = add("stat", cmd_stat, "describe a key")
    sp.add_argument("key")
    add("ping", cmd_ping, "check that the server answers")
    add("nodes", cmd_nodes, "list the workers the master knows, with their state")
    sp = add("submit", cmd_submit, "submit a job: dsml submit [options] -- COMMAND ARGS...")
    sp.add_argument("-f", "--file", help="a YAML job file listing tasks")
    sp.add_argument("--name")
    sp.add_argument("--slots", type=int, default=1)
    sp.add_argument("--timeout", type=float, help="seconds per attempt")
    sp.add_argument("--max-attempts", type=int, default=3)
    sp.add_argument("--priority", type=int)
    sp.add_argument("--after", action="append", metavar="JOB", help="run after JOB succeeds")
    sp.add_argument("--input", action="append", metavar="KEY[:PATH]",
                    help="fetch KEY into the task's directory ({index} = task index)")
    sp.add_argument("--output", action="append", metavar="PATH[:KEY]",
                    help="upload PATH as KEY after a success ({index} = task index)")
    sp.add_argument("--env", action="append", metavar="K=V")
    sp.add_argument("--array", type=int, default=1, metavar="N",
                    help="N tasks, each with DSML_TASK_INDEX")
    sp.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    sp = add("jobs", cmd_jobs, "list recent jobs")
    sp.add_argument("--limit", type=int, default=50)
    sp = add("status", cmd_status, "show a job's tasks and attempts")
    sp.add_argument("job")
    sp = add("logs", cmd_logs, "print a task's stdout and stderr")
    sp.add_argument("job")
    sp.add_argument("--task", type=int, default=0)
    sp.add_argument("--attempt", type=int)
    sp.add_argument("-f", "--follow", action="store_true")
    sp.add_argument("--stdout", action="store_true", help="stdout only")
    sp.add_argument("--stderr", action="store_true", help="stderr only")
    sp = add("wait", cmd_wait, "wait until a job ends; non-zero exit unless it succeeded")
    sp.add_argument("job")
    sp.add_argument("--timeout", type=float)
    sp = add("cancel", cmd_cancel, "cancel a job and stop its running attempts")
    sp.add_argument("job")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"dsml: {e}", file=sys.stderr)
        return 2
    except DsmlError as e:
        print(f"dsml: {args.command}: {e.message} [{e.code}]", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"dsml: {args.command}: {e.strerror or e}"
              + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dsml: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
