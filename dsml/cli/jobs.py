"""The job commands: submit, jobs, status, logs, wait, cancel.

``status`` reads a job's tasks a page at a time (the client follows the master's
``Next``); ``wait`` on a terminal polls the first page only, for its progress line.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DsmlError
from ..jobfile import JobFileError, input_pair, load_job_file, output_pair
from .common import (
    UsageError,
    _cluster,
    _human,
    _note,
    _print_json,
)


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
        if args.chunks and args.array != 1:
            raise UsageError("give either --chunks or --array, not both")
        env = {}
        for item in args.env or []:
            k, sep, v = item.partition("=")
            if not sep or not k:
                # Not quoted: what was meant as a value may be a secret.
                raise UsageError("--env wants K=V, got one with no K= (its text not shown)")
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
            "mem": args.mem,
            "gpus": args.gpus,
            "timeout": args.timeout,
            "max_attempts": args.max_attempts,
            "retry_on": None if args.retry_on is None else [
                c.strip() for c in args.retry_on.split(",") if c.strip()],
        }
    with _cluster(args) as c:
        if not args.file and args.chunks:
            job_kw = _per_chunk(c, args.chunks, job_kw)
        job = c.submit(**job_kw)
    print(job.id)
    return 0


def _per_chunk(c: Any, dataset: str, job_kw: dict[str, Any]) -> dict[str, Any]:
    """The job of ``job_kw`` as one task per chunk of ``dataset``: the chunk an input
    (so the master runs it where the chunk is stored, and the worker stages it from its
    own store), ``{chunk}`` in the command its path, ``{index}`` in the outputs the
    chunk's number."""
    from ..config import parse_size
    from ..datasets import read_manifest

    chunks = read_manifest(c, dataset.rstrip("/"))["chunks"]
    if not chunks:
        raise UsageError(f"dataset {dataset} has no chunks")
    per_task = {k: job_kw.pop(k) for k in ("command", "env", "inputs", "outputs", "slots",
                                             "mem", "gpus", "timeout", "max_attempts",
                                             "retry_on")}
    job_kw.pop("array")
    mem = per_task["mem"]
    if isinstance(mem, str):
        try:
            mem = parse_size(mem)
        except ValueError as e:
            raise UsageError(f"--mem: {e}") from None
    tasks = []
    for i, chunk in enumerate(chunks):
        path = "chunk" + Path(chunk["key"]).suffix
        sub = {"{chunk}": path, "{index}": str(i)}

        def fill(text: str, sub: dict[str, str] = sub) -> str:
            for name, value in sub.items():
                text = text.replace(name, value)
            return text

        task = {k: v for k, v in per_task.items() if v is not None and k != "mem"}
        if mem:
            task["mem"] = mem
        task["command"] = [fill(a) for a in per_task["command"]]
        task["inputs"] = [[chunk["key"], path],
                          *([fill(k), fill(p)] for k, p in per_task["inputs"])]
        task["outputs"] = [[fill(p), fill(k)] for p, k in per_task["outputs"]]
        tasks.append(task)
    return {**job_kw, "tasks": tasks}


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
    print(f"{'JOB':<8} {'NAME':<20} {'OWNER':<12} {'STATE':<10} {'AGE':>5}  TASKS")
    for j in jobs:
        print(f"{j['id']:<8} {j['name'][:20]:<20} {_owner(j)[:12]:<12} {j['state']:<10} "
              f"{_age(j['created']):>5}  {_progress_text(j)}")
    return 0


def _owner(j: dict[str, Any]) -> str:
    """Who submitted the job ("-" when the master does not know: a job stored before
    owners were recorded, or a master that does not say)."""
    return str(j.get("owner") or "-")


def _attempt_how(a: dict[str, Any]) -> str:
    peak = f", peak {_human(a['peak_rss'])}" if a.get("peak_rss") else ""
    if a["exit_code"] is not None:
        return f"exit {a['exit_code']}{peak}"
    if a["signal"] is not None:
        return f"signal {a['signal']}{peak}"
    return f"-{peak}"


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
    print(f"  owner: {_owner(j)}")
    where = j.get("locality") or {}
    if where.get("local") or where.get("remote"):
        n = where.get("local", 0) + where.get("remote", 0)
        print(f"  locality: {where.get('local', 0)}/{n} attempts started data-local "
              f"({100 * where.get('local', 0) / n:.0f}%), {where.get('remote', 0)} remote")
    for t in j["tasks"]:
        treason = f" ({t['reason']})" if t.get("reason") else ""
        waits = t.get("waiting_for") or ""
        if waits:  # "job j3 to succeed", "a free slot (...)", "no live worker"
            waits = f", {waits}" if waits.startswith("no ") else f", waiting for {waits}"
        print(f"  task {t['index']}: {t['state']}{treason}{waits}")
        for position, a in enumerate(t["attempts"], 1):
            dur = f"{a['duration']:.2f}s" if a.get("duration") is not None else "-"
            why = f"  {a['reason']}" if a.get("reason") else ""
            if a.get("cause") and a["cause"] != a["state"]:
                why += f" [cause: {a['cause']}]"
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
            # A progress line needs the counts only: the first page of tasks, not all.
            j = c.wait(args.job, step, all_tasks=not tty)
            final = j["state"] in ("succeeded", "failed", "cancelled")
            if tty:
                line = f"\r{j['id']}: {j['state']}, {_progress_text(j)}"
                sys.stderr.write(line + " " * max(0, len(shown) - len(line)))
                sys.stderr.flush()
                shown = line
            if final or (deadline is not None and time.monotonic() >= deadline):
                break
        if tty and j.get("next") is not None and (j.get("counts") or {}).get("failed"):
            j = c.job_status(args.job)  # every page, to name each failed task
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
