"""Job files: a YAML description of a job (``dsml submit -f job.yaml``).

::

    name: sweep                 # optional; default: the file's name without .yaml
    priority: 0                 # optional; higher runs first
    after: [j3]                 # optional; run once these jobs have succeeded
    tasks:
      - command: python train.py --lr 0.1      # a string (split like a shell) or a list
        inputs: ["datasets/train.csv:train.csv"]   # KEY:PATH, KEY, or [KEY, PATH]
        outputs: ["model.pt:models/lr0.1.pt"]      # PATH:KEY, PATH, or [PATH, KEY]
        env: {WANDB_MODE: offline}
        cpus: 2                                # (or slots: 2) its thread pools are told
        mem: 8G                                # reserved, and its limit (out-of-memory)
        gpus: 1                                # CUDA_VISIBLE_DEVICES names it
        timeout: 3600
        max_attempts: 3
        retry_on: [lost, staging]              # the causes retried (these by default)
      - python train.py --lr 0.01              # a task may be just its command

Every problem is one line naming the file, the task and the field
(``job.yaml: tasks[3].inputs[0]: ...``).  The file is read with a size cap and through
:mod:`dsml.safeyaml`, so an alias bomb is refused at once, not expanded.  What the master
checks again (key rules, limits) it checks on submit, whatever the client sent.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Final

import attrs
import yaml

from . import safeyaml
from .config import parse_size

__all__ = ["MAX_JOB_FILE", "JobFile", "JobFileError", "input_pair", "load_job_file", "output_pair"]

#: Largest job file read, in bytes (the master's cap on a submitted job, JOB_MAX).
MAX_JOB_FILE: Final = 64 * 1024 * 1024

_JOB_FIELDS: Final = ("name", "priority", "after", "tasks")
_TASK_FIELDS: Final = (
    "command", "env", "inputs", "outputs", "cpus", "slots", "mem", "gpus", "timeout",
    "max_attempts", "retry_on",
)


class JobFileError(ValueError):
    """A job file that cannot be submitted; the message names the file and the field."""


@attrs.frozen
class JobFile:
    """What a job file asks for, in the shape ``ClusterClient.submit`` takes."""

    name: str | None
    priority: int | None
    after: tuple[str, ...]
    tasks: tuple[dict[str, Any], ...]


def input_pair(text: str) -> tuple[str, str]:
    """``KEY[:PATH]`` as (key, path); the path defaults to the key's last segment.

    Raises ValueError for an empty key.
    """
    key, sep, path = text.partition(":")
    if not key:
        raise ValueError(f"want KEY[:PATH], got {text!r}")
    return key, (path if sep and path else key.rstrip("/").rpartition("/")[2])


def output_pair(text: str) -> tuple[str, str]:
    """``PATH[:KEY]`` as (path, key); the key defaults to the path."""
    path, sep, key = text.partition(":")
    if not path:
        raise ValueError(f"want PATH[:KEY], got {text!r}")
    return path, (key if sep and key else path)


def load_job_file(path: str | Path) -> JobFile:
    """Read and check the job file at ``path``; raise JobFileError naming what is wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JOB_FILE + 1)
    except OSError as e:
        raise JobFileError(f"{path}: {e.strerror or e}") from None
    if len(raw) > MAX_JOB_FILE:
        raise JobFileError(f"{path}: larger than {MAX_JOB_FILE // (1024 * 1024)} MiB")
    try:
        doc = safeyaml.load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise JobFileError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = " ".join(str(e.problem or e.context or "invalid YAML").split())
        raise JobFileError(f"{path}: {where}not valid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise JobFileError(f"{path}: {' '.join(str(e).split())}") from None
    return _Checker(str(path)).job(doc)


@attrs.frozen
class _Checker:
    path: str

    def error(self, where: str, problem: str) -> JobFileError:
        return JobFileError(f"{self.path}: {where}: {problem}" if where else
                            f"{self.path}: {problem}")

    def job(self, doc: object) -> JobFile:
        if not isinstance(doc, dict):
            raise self.error("", "a job file is a mapping with a list 'tasks'")
        unknown = [str(k) for k in doc if k not in _JOB_FIELDS]
        if unknown:
            raise self.error(unknown[0], f"unknown field (known: {', '.join(_JOB_FIELDS)})")
        tasks = doc.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise self.error("tasks", "must be a non-empty list of tasks")
        name = doc.get("name")
        if name is not None and not isinstance(name, str):
            raise self.error("name", "must be a string")
        priority = doc.get("priority")
        if priority is not None:
            priority = self.integer("priority", priority)
        after = doc.get("after", [])
        if isinstance(after, str):
            after = [after]
        if not isinstance(after, list) or not all(isinstance(j, str) for j in after):
            raise self.error("after", "must be a job id or a list of job ids")
        return JobFile(name, priority, tuple(after),
                       tuple(self.task(i, t) for i, t in enumerate(tasks)))

    def task(self, i: int, t: object) -> dict[str, Any]:
        where = f"tasks[{i}]"
        if isinstance(t, (str, list)):
            t = {"command": t}
        if not isinstance(t, dict):
            raise self.error(where, "a task is a command or a mapping with 'command'")
        unknown = [str(k) for k in t if k not in _TASK_FIELDS]
        if unknown:
            raise self.error(f"{where}.{unknown[0]}",
                             f"unknown field (known: {', '.join(_TASK_FIELDS)})")
        if "command" not in t:
            raise self.error(f"{where}.command", "missing: every task needs a command")
        out: dict[str, Any] = {"command": self.command(f"{where}.command", t["command"])}
        if t.get("env") is not None:
            out["env"] = self.env(f"{where}.env", t["env"])
        for field, pair in (("inputs", input_pair), ("outputs", output_pair)):
            if t.get(field) is not None:
                out[field] = self.pairs(f"{where}.{field}", t[field], pair)
        if t.get("cpus") is not None and t.get("slots") is not None:
            raise self.error(f"{where}.cpus", "give cpus or slots (the same thing), not both")
        for field in ("cpus", "slots", "max_attempts"):
            if t.get(field) is not None:
                out["slots" if field == "cpus" else field] = self.integer(
                    f"{where}.{field}", t[field], minimum=1)
        if t.get("gpus") is not None:
            out["gpus"] = self.integer(f"{where}.gpus", t["gpus"], minimum=0)
        if t.get("mem") is not None:
            try:
                out["mem"] = parse_size(t["mem"])
            except ValueError as e:
                raise self.error(f"{where}.mem", str(e)) from None
        if t.get("timeout") is not None:
            timeout = t["timeout"]
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                    or not timeout > 0:
                raise self.error(f"{where}.timeout", f"must be seconds > 0, got {timeout!r}")
            out["timeout"] = float(timeout)
        if t.get("retry_on") is not None:
            causes = t["retry_on"]
            if isinstance(causes, str):
                causes = [c.strip() for c in causes.split(",") if c.strip()]
            if not isinstance(causes, list) or not all(isinstance(c, str) for c in causes):
                raise self.error(f"{where}.retry_on", "must be a list of causes")
            out["retry_on"] = causes
        return out

    def command(self, where: str, value: object) -> list[str]:
        if isinstance(value, str):
            try:
                argv = shlex.split(value)
            except ValueError as e:
                raise self.error(where, f"cannot split {value!r}: {e}") from None
        elif isinstance(value, list) and all(
            isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in value
        ):
            argv = [str(a) for a in value]
        else:
            raise self.error(where, "must be a string or a list of strings")
        if not argv:
            raise self.error(where, "is empty")
        return argv

    def env(self, where: str, value: object) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.error(where, "must be a mapping of NAME: value")
        env = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise self.error(where, f"name {k!r} is not a string")
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise self.error(f"{where}.{k}", "must be a string or a number")
            env[k] = str(v)
        return env

    def pairs(self, where: str, value: object, pair: Any) -> list[list[str]]:
        if not isinstance(value, list):
            raise self.error(where, "must be a list")
        out = []
        for j, item in enumerate(value):
            here = f"{where}[{j}]"
            if isinstance(item, str):
                try:
                    out.append(list(pair(item)))
                except ValueError as e:
                    raise self.error(here, str(e)) from None
            elif isinstance(item, list) and len(item) == 2 and all(
                isinstance(x, str) and x for x in item
            ):
                out.append([item[0], item[1]])
            else:
                what = "KEY:PATH or [KEY, PATH]" if pair is input_pair else \
                    "PATH:KEY or [PATH, KEY]"
                raise self.error(here, f"want {what}, got {item!r}")
        return out

    def integer(self, where: str, value: object, minimum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(where, f"must be a whole number, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(where, f"must be at least {minimum}, got {value}")
        return value
