"""The ``dsml`` parser and entry point: one line per error, exit statuses.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import DsmlError
from .common import (
    EXIT_BROKEN_PIPE,
    UsageError,
    _start_hint,
)
from .jobs import cmd_cancel, cmd_jobs, cmd_logs, cmd_status, cmd_submit, cmd_wait
from .pki import add_pki_commands
from .storage import (
    cmd_cat,
    cmd_download,
    cmd_get,
    cmd_ls,
    cmd_nodes,
    cmd_ping,
    cmd_rm,
    cmd_set,
    cmd_stat,
    cmd_upload,
)

_EPILOG = """\
storage:  upload, download (-r for a prefix), cat, set, get, rm (-r), ls, stat
jobs:     submit, jobs, status, logs, wait, cancel
cluster:  nodes, ping
trust:    pki init, pki issue worker|user NAME, pki revoke NAME, pki show

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
    p.add_argument("-i", "--identity", metavar="NAME",
                   help="with cluster.tls: the user certificate to present, from the "
                        "config's pki_dir (default: $DSML_IDENTITY, else admin)")
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
    sp.add_argument("--chunk", metavar="SIZE",
                    help="store it as a dataset: chunks of about SIZE (e.g. 64MiB) split on "
                         "record boundaries, and a manifest, under KEY/")
    sp.add_argument("--format", choices=("csv", "text", "npy", "parquet"),
                    help="with --chunk: how to split (default: from the file's name)")
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
                    help="size, version, sha256 and replicas (or kind, on one server); "
                    "a dataset as one line: its size, chunks, spread and rows")
    json_flag(sp)
    sp = add("stat", cmd_stat, "describe a key (kind, size, version, sha256, replicas) or "
             "a dataset (chunks, the workers holding them, rows)")
    sp.add_argument("key", help="the key")
    json_flag(sp)
    add("ping", cmd_ping, "check that the server answers")
    sp = add("nodes", cmd_nodes, "list the workers the master knows, with their state")
    json_flag(sp)

    sp = add("submit", cmd_submit, "submit a job: dsml submit [options] -- COMMAND ARGS...")
    sp.add_argument("-f", "--file", help="a YAML job file listing tasks (see the README)")
    sp.add_argument("--name", help="the job's name (default: the command's or file's name)")
    sp.add_argument("--cpus", "--slots", dest="slots", type=int, default=1,
                    help="CPUs each task takes on its worker (default 1; its thread pools "
                         "are told: OMP_NUM_THREADS...); --slots is the same")
    sp.add_argument("--mem", default="0", metavar="SIZE",
                    help="memory each task reserves and may use, e.g. 4G or 512MiB (a task "
                         "over it ends out-of-memory; default: none reserved, no limit)")
    sp.add_argument("--gpus", type=int, default=0,
                    help="GPUs each task takes (CUDA_VISIBLE_DEVICES names them; default 0)")
    sp.add_argument("--timeout", type=float, help="seconds an attempt may run before it is "
                                                  "killed (default: no limit)")
    sp.add_argument("--max-attempts", type=int, default=3,
                    help="attempts per task before it fails (default 3)")
    sp.add_argument("--retry-on", metavar="CAUSES",
                    help="the causes of a failed attempt that are retried, comma-separated, "
                         "among exit, signal, timeout, out-of-memory, lost, staging, spawn, "
                         "output (default: lost,staging)")
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
    sp.add_argument("--chunks", metavar="DATASET",
                    help="one task per chunk of DATASET (see `dsml upload --chunk`), run "
                         "where the chunk is stored and staged from there: {chunk} in the "
                         "command is its path, {index} in outputs the chunk's number")
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
    add_pki_commands(add)
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
