"""Cluster configuration: one YAML file, parsed once into frozen attrs objects.

A single file (``etc/dsml.yaml`` in the tree) describes the whole cluster: the shared
secret, the master, every worker and the connection limits.  Every process reads the same
file; a worker finds its own section by name.  :func:`load_config` validates everything up
front, so a typo is one clear line at start-up (naming the file, the key and the problem)
rather than a surprise an hour later::

    etc/dsml.yaml: workers.w1.port: must be an integer from 0 to 65535, got 'abc'

Relative paths in the file (``data_dir``, ``state_dir``, ``token_file``) are relative to the
directory holding the file, so the same file works from any working directory.

This module knows nothing of Twisted: the twistd plugins (:mod:`dsml.tap`), the CLI and the
tests all share it.  The ``limits`` section becomes :class:`dsml.net.limits.Limits`, the
very object the net layer enforces (that module imports no Twisted either).

One room (some 830 lines, most of them the checks of single keys): one parser reads every
key, so every problem is reported the same way.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import attrs
import yaml

from dsml import safeyaml
from dsml.net.limits import (
    DEFAULT_AUTH_TIMEOUT,
    DEFAULT_HEAD_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_UNAUTHENTICATED,
    DEFAULT_MAX_UNAUTHENTICATED_PER_HOST,
    DEFAULT_PAYLOAD_MIN_RATE,
    DEFAULT_PAYLOAD_TIMEOUT,
    DEFAULT_PAYLOAD_TOTAL_TIMEOUT,
    Limits,
)
from dsml.protocol import limits as wire_limits
from dsml.protocol.limits import GPU_ID, MAX_GPUS

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "MASTER_ADDR_FILE",
    "WORKER_ADDR_FILE",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "Limits",
    "MasterConfig",
    "Retention",
    "WorkerConfig",
    "check_listen_safe",
    "find_config",
    "is_loopback",
    "load_config",
    "parse_size",
    "read_address",
]

#: Default largest value payload, in bytes (memcached's item limit).
DEFAULT_VALUE_MAX: Final = wire_limits.DEFAULT_VALUE_MAX
#: Largest ``cluster.value_max`` accepted: values are buffered in memory, files are not.
#: It matches the most the codec will drain from a rejected request.
VALUE_MAX_LIMIT: Final = 64 * 1024 * 1024
#: Default number of copies of every stored file and value.
DEFAULT_REPLICATION: Final = 2
#: Default seconds between a worker's heartbeats.
DEFAULT_HEARTBEAT_INTERVAL: Final = 1.0
#: Default seconds of silence after which the master declares a worker dead.
DEFAULT_HEARTBEAT_TIMEOUT: Final = 10.0
#: Default listening address of every role: loopback, so nothing is exposed by accident.
DEFAULT_HOST: Final = "127.0.0.1"
#: Default master port.
DEFAULT_MASTER_PORT: Final = 7400
#: Largest config file read (a cluster of a thousand workers is well under it).
MAX_CONFIG_BYTES: Final = 1024 * 1024

#: Environment variable naming the configuration file when none is given.
CONFIG_ENV: Final = "DSML_CONFIG"
#: The configuration used when none is given and $DSML_CONFIG is unset, relative to the
#: working directory (a source checkout's own).
DEFAULT_CONFIG: Final = Path("etc/dsml.yaml")
#: The file, under the master's state_dir, that says where it listens (its port may be 0).
MASTER_ADDR_FILE: Final = "master.addr"
#: The file, under a worker's data_dir, that says where its storage server listens.
WORKER_ADDR_FILE: Final = "worker.addr"
#: Default number of task slots (CPUs) of a worker, where the machine's cannot be read.
DEFAULT_SLOTS: Final = 1
#: Most task slots one worker may declare.
MAX_SLOTS: Final = wire_limits.MAX_SLOTS
#: Default bytes a worker keeps of task inputs fetched from other workers (``input_cache``).
DEFAULT_INPUT_CACHE: Final = 8 << 30
#: Longest token, in UTF-8 bytes: it travels in one header line of at most 1 KiB.
MAX_TOKEN_BYTES: Final = 512
#: Shortest token, in characters: a short one is guessed (etc/dsml.yaml's example is 19).
MIN_TOKEN_CHARS: Final = 16
#: Largest ``cluster.token_file`` read: a token is one short line.
MAX_TOKEN_FILE_BYTES: Final = 4096
#: The PKI directory when ``cluster.pki_dir`` is not set, relative to the config file.
DEFAULT_PKI_DIR: Final = "../var/pki"
#: Longest host name (DNS limit).
MAX_HOST: Final = 253

_SIZE = re.compile(r"\s*([0-9]{1,20})\s*([A-Za-z]*)\s*\Z")
_SIZE_UNITS: Final = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
                      "tib": 1024**4, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
# Whitespace, C0 controls, DEL and the C1 controls: never part of a token or a host.
_BAD_CHARS = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
# How much of an offending value an error message quotes.
_SHOW_MAX = 60


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid.

    ``str()`` is one line: ``<file>: <key path>: <what is wrong>`` (the key path is left
    out when the problem is with the file as a whole, such as a YAML syntax error).
    """

    def __init__(self, path: str | Path, key: str | None, problem: str) -> None:
        super().__init__(str(path), key, problem)
        self.path = str(path)
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        if self.key:
            return f"{self.path}: {self.key}: {self.problem}"
        return f"{self.path}: {self.problem}"


@attrs.frozen
class MasterConfig:
    """Where the master listens and keeps its state (the ``master`` section)."""

    #: Address to listen on and for workers and clients to connect to.
    host: str
    #: TCP port; 0 lets the operating system choose.
    port: int
    #: Directory of the master's SQLite state (absolute).
    state_dir: Path


@attrs.frozen
class WorkerConfig:
    """One worker (an entry of the ``workers`` section)."""

    #: The worker's name, its key in ``workers``.
    name: str
    #: Address the worker's storage server listens on.
    host: str
    #: TCP port; 0 lets the operating system choose.
    port: int
    #: Directory of the worker's stored files and index (absolute).
    data_dir: Path
    #: CPUs the worker offers tasks (``cpus``, or ``slots`` by its old name; default:
    #: the CPUs this process may run on), a task holds as many as it asks for.
    slots: int
    #: Bytes of remote task inputs kept under ``data_dir/cache`` (0: none kept).
    input_cache: int = DEFAULT_INPUT_CACHE
    #: Names (``*`` allowed at the end: ``CUDA_*``) of the worker's environment
    #: variables its tasks get, besides :data:`TASK_ENV_DEFAULT`.
    task_env: tuple[str, ...] = ()
    #: Memory it offers tasks, in bytes (``mem``); None: the machine's (detected at start).
    mem: int | None = None
    #: Its GPUs' ids (``gpus``: indices or UUIDs, what CUDA_VISIBLE_DEVICES takes); None:
    #: those ``nvidia-smi -L`` lists at start; ``[]``: none.
    gpus: tuple[str, ...] | None = None
    #: Who its tasks run as (``task_user``: a user name or a numeric uid), resolved with
    #: ``pwd`` at the worker's start; None: ``nobody`` on a root worker, else the worker's
    #: own user (see :mod:`dsml.worker.tasks.taskuser`).
    task_user: str | None = None
    #: The interpreter function tasks run by default (``python``: an absolute path;
    #: what ``dsml-python`` names, and what its warm interpreters run); None: the
    #: worker's own.  It must import dsml and cloudpickle (checked at the worker's start).
    python: str | None = None
    #: Modules its warm interpreters import before they are given a call (``preload``:
    #: e.g. ``[numpy, pandas]``, whose 0.7 s of imports a map over a dataset's chunks
    #: would otherwise pay per chunk); one that cannot be imported is left out.
    preload: tuple[str, ...] = ()


@attrs.frozen
class ClusterConfig:
    """Settings shared by every role (the ``cluster`` section)."""

    #: Shared secret every connection presents first; None means no authentication,
    #: which is only allowed on loopback addresses (see :func:`check_listen_safe`).
    token: str | None = attrs.field(repr=False)
    #: Largest value payload, in bytes.
    value_max: int
    #: Copies kept of every file and value.
    replication: int
    #: Seconds between a worker's heartbeats.
    heartbeat_interval: float
    #: Seconds of silence after which a worker is declared dead.
    heartbeat_timeout: float
    #: Every link is TLS 1.3, both sides verified against the cluster CA (``cluster.tls``).
    tls: bool = False
    #: The CA, certificates and keys (``cluster.pki_dir``, absolute); None: not set, see
    #: :attr:`Config.pki_dir` for the default.
    pki_dir: Path | None = None
    #: Users who may cancel any job and read any job's logs (``cluster.admins``);
    #: every other user only their own jobs'.
    admins: tuple[str, ...] = ("admin",)


#: Finished jobs older than this are purged from the master's job state (30 days).
DEFAULT_JOBS_MAX_AGE: Final = 30 * 86400.0
#: Finished jobs kept at most (the newest); older ones are purged.
DEFAULT_JOBS_MAX_COUNT: Final = 10_000
#: What a worker's environment gives every task, besides what ``task_env`` adds: the
#: locale, the home and the search paths, and the variables a GPU program needs to find
#: its libraries and devices.  Nothing else leaks (no credentials, no PYTHONPATH of the
#: worker's virtualenv).
TASK_ENV_DEFAULT: Final = ("PATH", "HOME", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR",
                           "USER", "LOGNAME", "LD_LIBRARY_PATH", "CUDA_*", "NVIDIA_*")
_ENV_PATTERN: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?\Z")
#: A module name (``preload``): dotted identifiers, at most 200 characters.
_MODULE = re.compile(r"(?=.{1,200}\Z)[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z", re.ASCII)
#: A user name (what useradd accepts, and more: a name with a dot, a trailing $) or a uid.
_USER_PATTERN: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?\Z")

#: Tombstones (deleted keys) older than this are forgotten by the master (30 days).
DEFAULT_TOMBSTONES_MAX_AGE: Final = 30 * 86400.0
#: Bytes of finished attempt directories a worker keeps at most (10 GiB).
DEFAULT_ATTEMPT_DIRS_MAX_BYTES: Final = 10 * 1024**3
#: Finished attempt directories older than this are removed (7 days).
DEFAULT_ATTEMPT_DIRS_MAX_AGE: Final = 7 * 86400.0
#: Finished attempt directories a worker keeps at most (the newest).
DEFAULT_ATTEMPT_DIRS_MAX_COUNT: Final = 1000


@attrs.frozen
class Retention:
    """What is kept of finished work, and for how long (the ``retention`` section)."""

    #: Seconds a finished job (its tasks and attempts) is kept on the master.
    jobs_max_age: float = DEFAULT_JOBS_MAX_AGE
    #: Finished jobs kept at most on the master (the newest).
    jobs_max_count: int = DEFAULT_JOBS_MAX_COUNT
    #: Bytes of finished attempt directories (logs, inputs, outputs) a worker keeps.
    attempt_dirs_max_bytes: int = DEFAULT_ATTEMPT_DIRS_MAX_BYTES
    #: Seconds a finished attempt directory is kept on a worker.
    attempt_dirs_max_age: float = DEFAULT_ATTEMPT_DIRS_MAX_AGE
    #: Finished attempt directories a worker keeps at most (the newest).
    attempt_dirs_max_count: int = DEFAULT_ATTEMPT_DIRS_MAX_COUNT
    #: Seconds the master keeps a deleted key's tombstone (once no worker holds a copy).
    tombstones_max_age: float = DEFAULT_TOMBSTONES_MAX_AGE


@attrs.frozen
class Config:
    """A whole cluster's configuration, as loaded from one file."""

    #: The file it was loaded from, as given (error messages name it this way).
    path: Path
    cluster: ClusterConfig
    master: MasterConfig
    #: Workers by name, in file order; read-only.
    workers: Mapping[str, WorkerConfig]
    limits: Limits
    retention: Retention = Retention()

    @property
    def pki_dir(self) -> Path:
        """Where the cluster's CA, certificates and keys live (``dsml pki init`` writes
        them): ``cluster.pki_dir``, by default ``../var/pki`` beside the config file."""
        if self.cluster.pki_dir is not None:
            return self.cluster.pki_dir
        return (self.path.parent / DEFAULT_PKI_DIR).resolve()

    def worker(self, name: str) -> WorkerConfig:
        """Return the worker called ``name``, or raise ConfigError naming the known ones."""
        try:
            return self.workers[name]
        except KeyError:
            known = ", ".join(self.workers)
            raise ConfigError(
                self.path, "workers", f"no worker named {_show(name)} (known: {known})"
            ) from None


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """Which config file to use: ``explicit``, else $DSML_CONFIG, else ./etc/dsml.yaml.

    None when none is given and the default file does not exist.  Read at call time,
    so the environment is the one of the moment.
    """
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def read_address(what: str, host: str, port: int, addr_file: Path) -> tuple[str, int]:
    """A configured address; port 0 means the OS chose it and ``addr_file`` says which.

    Raises OSError (naming the file) when the port is 0 and the file is missing or bad.
    The file's format is ``host:port`` (``dsml.net.listen.write_addr_file``).
    """
    if port:
        return host, port
    try:
        addr_host, _, addr_port = addr_file.read_text().strip().rpartition(":")
        return addr_host.strip("[]"), int(addr_port)
    except (OSError, ValueError):
        raise FileNotFoundError(
            f"{what} listens on an OS-chosen port and {addr_file} is missing: is it running?"
        ) from None


def default_cpus() -> int:
    """The CPUs this process may run on (its affinity), at most :data:`MAX_SLOTS`."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or DEFAULT_SLOTS
    return max(1, min(n, MAX_SLOTS))


def parse_size(text: str | int) -> int:
    """Parse a byte count such as ``1MiB``, ``512 KiB``, ``100B`` or ``4096``.

    Units are B, KiB, MiB, GiB and TiB, or K, M, G and T for the same (powers of 1024,
    case-insensitive, as Slurm's ``--mem=4G``); a bare number is bytes.  Raises
    ValueError for anything else, including decimal units (KB, MB) whose meaning is
    ambiguous, fractions and negative numbers.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a size such as 1MiB, got {_show(text)}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size cannot be negative, got {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"expected a size such as 1MiB, got {_show(text)}")
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"expected a size such as 1MiB or 512KiB, got {_show(text)}")
    number, unit = m.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"unknown size unit {_show(unit)} (use B, KiB, MiB, GiB, TiB or K, M, G, T)")
    return int(number) * factor


def is_loopback(host: str) -> bool:
    """True if ``host`` names this machine only: 127.0.0.0/8, ::1 or ``localhost``."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_listen_safe(config: Config, host: str, role_key: str) -> None:
    """Refuse to listen on a non-loopback ``host`` unless the cluster uses TLS.

    Without a token anyone who can reach the port can read, overwrite and run anything;
    with only a token, it travels in clear text and one stolen copy speaks for every
    machine.  That is acceptable on 127.0.0.1 and nowhere else: any other address needs
    ``cluster.tls`` (certificates per identity, every link encrypted).  ``role_key`` is
    the key path the host came from (``master.host``, ``workers.w1.host``), for the
    error message.
    """
    if is_loopback(host):
        return
    if config.cluster.token is None and not config.cluster.tls:
        raise ConfigError(
            config.path,
            role_key,
            f"refusing to listen on non-loopback {host} without cluster.token",
        )
    if not config.cluster.tls:
        raise ConfigError(
            config.path,
            role_key,
            f"refusing to listen on non-loopback {host} without cluster.tls: true "
            "(the token alone travels in clear text)",
        )


def load_config(path: str | Path) -> Config:
    """Read, validate and return the cluster configuration in ``path``.

    Raises ConfigError (one line naming the file, the key and the problem) if the file is
    missing, unreadable, not YAML, or breaks the schema in any way.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(path, None, f"larger than {MAX_CONFIG_BYTES} bytes: not a config")
        text = raw.decode("utf-8")
    except OSError as e:
        raise ConfigError(path, None, f"cannot read config file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not UTF-8 text (byte {e.start})") from None
    try:
        document = safeyaml.load(text)  # no objects, duplicate keys or alias bombs
    except yaml.MarkedYAMLError as e:
        raise ConfigError(path, None, _yaml_problem(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(path, None, f"YAML error: {_one_line(str(e))}") from None
    if document is None:
        raise ConfigError(path, None, "the file is empty; expected a mapping of sections")
    return _Parser(path).config(document)


def _yaml_problem(error: yaml.MarkedYAMLError) -> str:
    """One line for a YAML error: where it is (1-based) and what it is."""
    mark = error.problem_mark or error.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = error.problem or error.context or "invalid YAML"
    return f"{where}invalid YAML: {_one_line(problem)}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _show(value: object) -> str:
    """A short, single-line description of a bad value for an error message."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    if len(text) > _SHOW_MAX:
        text = text[: _SHOW_MAX - 3] + "..."
    return text


@attrs.frozen
class _Parser:
    """Validates one document; every error names ``path`` and the key path."""

    path: Path

    def error(self, key: str | None, problem: str) -> ConfigError:
        return ConfigError(self.path, key, problem)

    # -- sections -------------------------------------------------------------

    def config(self, document: object) -> Config:
        top = self.mapping(
            None, document, ["cluster", "master", "workers", "limits", "retention"]
        )
        for required in ("master", "workers"):
            if required not in top:
                raise self.error(required, "required section is missing")
        cluster = self.cluster(top.get("cluster", {}))
        master = self.master(top["master"])
        workers = self.workers(top["workers"])
        limits = self.limits(top.get("limits", {}))
        retention = self.retention(top.get("retention", {}))
        self.check_distinct_addresses(master, workers)
        return Config(
            path=self.path,
            cluster=cluster,
            master=master,
            workers=MappingProxyType(workers),
            limits=limits,
            retention=retention,
        )

    def cluster(self, section: object) -> ClusterConfig:
        known = [
            "token",
            "token_file",
            "value_max",
            "replication",
            "heartbeat_interval",
            "heartbeat_timeout",
            "tls",
            "pki_dir",
            "admins",
        ]
        s = self.mapping("cluster", section, known)
        if "token" in s and "token_file" in s:
            raise self.error("cluster", "token and token_file are mutually exclusive; set one")
        token: str | None = None
        if "token" in s:
            token = self.token("cluster.token", s["token"])
        elif "token_file" in s:
            token_path = self.path_value("cluster.token_file", s["token_file"])
            content = self.token_file("cluster.token_file", token_path)
            token = self.token("cluster.token_file", content.strip(), source=str(token_path))
        value_max = self.size("cluster.value_max", s.get("value_max", DEFAULT_VALUE_MAX))
        replication = self.integer(
            "cluster.replication", s.get("replication", DEFAULT_REPLICATION), 1, None
        )
        interval = self.seconds(
            "cluster.heartbeat_interval", s.get("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL)
        )
        timeout = self.seconds(
            "cluster.heartbeat_timeout", s.get("heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT)
        )
        if timeout <= interval:
            raise self.error(
                "cluster.heartbeat_timeout",
                f"must be greater than cluster.heartbeat_interval ({interval:g}), got {timeout:g}",
            )
        tls = s.get("tls", False)
        if not isinstance(tls, bool):
            raise self.error("cluster.tls", f"must be true or false, got {_show(tls)}")
        pki_dir = self.path_value("cluster.pki_dir", s["pki_dir"]) if "pki_dir" in s else None
        admins = s.get("admins", ["admin"])
        if not isinstance(admins, list) or not all(
            isinstance(a, str) and wire_limits.WORKER_NAME.match(a) for a in admins
        ):
            raise self.error("cluster.admins", f"must be a list of user names, got {_show(admins)}")
        return ClusterConfig(
            token=token,
            value_max=value_max,
            replication=replication,
            heartbeat_interval=interval,
            heartbeat_timeout=timeout,
            tls=tls,
            pki_dir=pki_dir,
            admins=tuple(admins),
        )

    def master(self, section: object) -> MasterConfig:
        s = self.mapping("master", section, ["host", "port", "state_dir"])
        if "state_dir" not in s:
            raise self.error("master.state_dir", "required key is missing")
        return MasterConfig(
            host=self.host("master.host", s.get("host", DEFAULT_HOST)),
            port=self.port("master.port", s.get("port", DEFAULT_MASTER_PORT)),
            state_dir=self.path_value("master.state_dir", s["state_dir"]),
        )

    def workers(self, section: object) -> dict[str, WorkerConfig]:
        if section is None or (isinstance(section, Mapping) and not section):
            raise self.error("workers", "at least one worker is required")
        s = self.mapping("workers", section, None)
        workers: dict[str, WorkerConfig] = {}
        for name, entry in s.items():
            if not isinstance(name, str) or not wire_limits.WORKER_NAME.match(name):
                raise self.error(
                    "workers",
                    f"worker name must be 1 to 64 of A-Z a-z 0-9 _ . -, got {_show(name)}",
                )
            workers[name] = self.worker(name, entry)
        return workers

    def worker(self, name: str, section: object) -> WorkerConfig:
        prefix = f"workers.{name}"
        s = self.mapping(prefix, section, ["host", "port", "data_dir", "cpus", "slots", "mem",
                                           "gpus", "input_cache", "task_env", "task_user",
                                           "python", "preload"])
        for required in ("port", "data_dir"):
            if required not in s:
                raise self.error(f"{prefix}.{required}", "required key is missing")
        return WorkerConfig(
            name=name,
            host=self.host(f"{prefix}.host", s.get("host", DEFAULT_HOST)),
            port=self.port(f"{prefix}.port", s["port"]),
            data_dir=self.path_value(f"{prefix}.data_dir", s["data_dir"]),
            slots=self.cpus(prefix, s),
            mem=None if s.get("mem") is None else self.byte_count(f"{prefix}.mem", s["mem"]),
            gpus=self.gpu_ids(f"{prefix}.gpus", s.get("gpus")),
            input_cache=self.byte_count(f"{prefix}.input_cache",
                                        s.get("input_cache", DEFAULT_INPUT_CACHE)),
            task_env=self.env_names(f"{prefix}.task_env", s.get("task_env", [])),
            task_user=self.task_user(f"{prefix}.task_user", s.get("task_user")),
            python=self.interpreter(f"{prefix}.python", s.get("python")),
            preload=self.modules(f"{prefix}.preload", s.get("preload", [])),
        )

    def modules(self, key: str, value: object) -> tuple[str, ...]:
        """A list of at most 64 module names (``numpy``, ``os.path``)."""
        if not isinstance(value, list) or len(value) > 64 or not all(
                isinstance(v, str) and _MODULE.match(v) for v in value):
            raise self.error(key, f"must be a list of module names, got {_show(value)}")
        return tuple(value)

    def interpreter(self, key: str, value: object) -> str | None:
        """An absolute path (the interpreter of function tasks), or None (not given)."""
        if value is None:
            return None
        if isinstance(value, str) and value.startswith("/") and value.isprintable() and len(
                value) <= 4096:
            return value
        raise self.error(key, "must be the absolute path of a Python interpreter, "
                              f"got {_show(value)}")

    def task_user(self, key: str, value: object) -> str | None:
        """A user name or a numeric uid (as a string), or None (not given)."""
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32:
            return str(value)
        if isinstance(value, str) and _USER_PATTERN.match(value):
            return value
        raise self.error(key, "must be a user name or a numeric uid (the user tasks run "
                              f"as), got {_show(value)}")

    def cpus(self, prefix: str, s: dict[str, object]) -> int:
        """``cpus`` (or ``slots``, its old name: not both), default the CPUs this
        process may run on, at most :data:`MAX_SLOTS`."""
        if "cpus" in s and "slots" in s:
            raise self.error(f"{prefix}.slots", "give cpus or slots (the same thing), not both")
        key = "slots" if "slots" in s else "cpus"
        return self.integer(f"{prefix}.{key}", s.get(key, default_cpus()), 1, MAX_SLOTS)

    def gpu_ids(self, key: str, value: object) -> tuple[str, ...] | None:
        """A list of GPU ids (indices or UUIDs), or None (not given: detect them)."""
        if value is None:
            return None
        if not isinstance(value, list) or len(value) > MAX_GPUS or not all(
            isinstance(v, (str, int)) and not isinstance(v, bool) and GPU_ID.match(str(v))
            for v in value
        ) or len({str(v) for v in value}) != len(value):
            raise self.error(key, f"must be a list of at most {MAX_GPUS} distinct GPU ids"
                                  " (indices such as 0, or UUIDs such as GPU-5f3c...),"
                                  f" got {_show(value)}")
        return tuple(str(v) for v in value)

    def env_names(self, key: str, value: object) -> tuple[str, ...]:
        """A list of environment variable names, each maybe ending in ``*``."""
        if not isinstance(value, list) or not all(
            isinstance(v, str) and _ENV_PATTERN.match(v) for v in value
        ):
            raise self.error(key, "must be a list of variable names (a trailing * allowed),"
                                  f" got {_show(value)}")
        return tuple(value)

    def limits(self, section: object) -> Limits:
        known = [f.name for f in attrs.fields(Limits)]
        s = self.mapping("limits", section, known)
        max_connections = self.integer(
            "limits.max_connections", s.get("max_connections", DEFAULT_MAX_CONNECTIONS), 1, None
        )
        max_unauthenticated = self.integer(
            "limits.max_unauthenticated",
            s.get("max_unauthenticated", DEFAULT_MAX_UNAUTHENTICATED),
            1,
            max_connections,
        )
        per_host = self.integer(
            "limits.max_unauthenticated_per_host",
            s.get(
                "max_unauthenticated_per_host",
                min(DEFAULT_MAX_UNAUTHENTICATED_PER_HOST, max_unauthenticated),
            ),
            1,
            max_unauthenticated,
        )
        min_rate = self.integer(
            "limits.payload_min_rate", s.get("payload_min_rate", DEFAULT_PAYLOAD_MIN_RATE), 0, None
        )
        timeouts = {
            name: self.seconds(f"limits.{name}", s.get(name, default))
            for name, default in [
                ("auth_timeout", DEFAULT_AUTH_TIMEOUT),
                ("head_timeout", DEFAULT_HEAD_TIMEOUT),
                ("idle_timeout", DEFAULT_IDLE_TIMEOUT),
                ("payload_timeout", DEFAULT_PAYLOAD_TIMEOUT),
                ("payload_total_timeout", DEFAULT_PAYLOAD_TOTAL_TIMEOUT),
            ]
        }
        return Limits(
            max_connections=max_connections,
            max_unauthenticated=max_unauthenticated,
            max_unauthenticated_per_host=per_host,
            payload_min_rate=min_rate,
            **timeouts,
        )

    def byte_count(self, key: str, value: object) -> int:
        """A byte count: an int, or a string such as ``8GiB`` (:func:`parse_size`)."""
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.error(key, f"want a size such as 8GiB or a number of bytes, got "
                                  f"{_show(value)}")
        try:
            return parse_size(value)
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def retention(self, section: object) -> Retention:
        """The ``retention`` section: every key optional (see :class:`Retention`)."""
        d = Retention()
        s = self.mapping("retention", section, [f.name for f in attrs.fields(Retention)])
        max_bytes = s.get("attempt_dirs_max_bytes", d.attempt_dirs_max_bytes)
        try:
            max_bytes = parse_size(max_bytes)
        except ValueError as e:
            raise self.error("retention.attempt_dirs_max_bytes", str(e)) from None
        return Retention(
            jobs_max_age=self.seconds(
                "retention.jobs_max_age", s.get("jobs_max_age", d.jobs_max_age)
            ),
            jobs_max_count=self.integer(
                "retention.jobs_max_count", s.get("jobs_max_count", d.jobs_max_count), 0, None
            ),
            tombstones_max_age=self.seconds(
                "retention.tombstones_max_age",
                s.get("tombstones_max_age", d.tombstones_max_age),
            ),
            attempt_dirs_max_bytes=max_bytes,
            attempt_dirs_max_age=self.seconds(
                "retention.attempt_dirs_max_age",
                s.get("attempt_dirs_max_age", d.attempt_dirs_max_age),
            ),
            attempt_dirs_max_count=self.integer(
                "retention.attempt_dirs_max_count",
                s.get("attempt_dirs_max_count", d.attempt_dirs_max_count),
                0,
                None,
            ),
        )

    def check_distinct_addresses(
        self, master: MasterConfig, workers: Mapping[str, WorkerConfig]
    ) -> None:
        """Two roles cannot listen on the same host and fixed port."""
        used: dict[tuple[str, int], str] = {}
        roles = [("master", master.host, master.port)]
        roles += [(f"workers.{w.name}", w.host, w.port) for w in workers.values()]
        for key, host, port in roles:
            if port == 0:
                continue
            other = used.setdefault((host, port), key)
            if other != key:
                raise self.error(f"{key}.port", f"port {port} on {host} is already used by {other}")

    # -- values ---------------------------------------------------------------

    def mapping(
        self, key: str | None, value: object, known: Sequence[str] | None
    ) -> Mapping[Any, Any]:
        """``value`` as a mapping; with ``known`` given, no other keys are allowed."""
        if not isinstance(value, Mapping):
            if key is None:
                raise self.error(None, f"the top level must be a mapping, got {_show(value)}")
            raise self.error(key, f"must be a mapping, got {_show(value)}")
        if known is not None:
            for k in value:
                if k not in known:
                    child = f"{key}.{k}" if key is not None else str(k)
                    raise self.error(child, f"unknown key (known: {', '.join(known)})")
        return value

    def integer(self, key: str, value: object, low: int, high: int | None) -> int:
        """An int (not a bool) from ``low`` to ``high`` (no upper bound if None)."""
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value >= low
            and (high is None or value <= high)
        ):
            return value
        if high is None:
            expected = f"an integer of at least {low}"
        else:
            expected = f"an integer from {low} to {high}"
        raise self.error(key, f"must be {expected}, got {_show(value)}")

    def port(self, key: str, value: object) -> int:
        """A TCP port; 0 lets the operating system choose."""
        return self.integer(key, value, 0, 65535)

    def seconds(self, key: str, value: object) -> float:
        """A finite duration greater than zero."""
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        ):
            return float(value)
        raise self.error(key, f"must be a number of seconds greater than 0, got {_show(value)}")

    def size(self, key: str, value: object) -> int:
        try:
            size = parse_size(value)  # type: ignore[arg-type]
        except ValueError as e:
            raise self.error(key, str(e)) from None
        if not 1 <= size <= VALUE_MAX_LIMIT:
            raise self.error(key, f"must be from 1 B to 64 MiB, got {_show(value)}")
        return size

    def string(self, key: str, value: object) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {_show(value)}")
        return value

    def host(self, key: str, value: object) -> str:
        host = self.string(key, value)
        if not host or len(host) > MAX_HOST or _BAD_CHARS.search(host):
            raise self.error(
                key, f"must be a host name or IP address with no spaces, got {_show(value)}"
            )
        return host

    def path_value(self, key: str, value: object) -> Path:
        """A path, made absolute against the config file's directory."""
        text = self.string(key, value)
        if not text or "\x00" in text:
            raise self.error(key, f"must be a non-empty path, got {_show(value)}")
        return (self.path.parent / Path(text).expanduser()).resolve()

    def token_file(self, key: str, path: Path) -> str:
        """The text of a token file: a regular file of at most MAX_TOKEN_FILE_BYTES that
        only its owner may read or write (a secret: refused otherwise, as ssh refuses an
        open private key)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise self.error(key, f"cannot read {path}: {e.strerror or e}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self.error(key, f"{path} is not a regular file")
            if st.st_mode & 0o077:
                raise self.error(
                    key,
                    f"{path} is open to group or others (mode {stat.S_IMODE(st.st_mode):04o});"
                    f" a token is a secret: chmod 600 {path}",
                )
            try:
                raw = f.read(MAX_TOKEN_FILE_BYTES + 1)
            except OSError as e:
                raise self.error(key, f"cannot read {path}: {e.strerror or e}") from None
        if len(raw) > MAX_TOKEN_FILE_BYTES:
            raise self.error(
                key, f"{path} is larger than {MAX_TOKEN_FILE_BYTES} bytes: not a token file"
            )
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(key, f"{path} is not UTF-8 text") from None

    def token(self, key: str, value: object, source: str | None = None) -> str:
        """A shared secret; never quoted in error messages (nor its length)."""
        if not isinstance(value, str):
            # Do not echo it: it may be a secret that YAML read as a number.
            raise self.error(
                key, f"must be a string (put it in quotes), not {type(value).__name__}"
            )
        what = f"the token in {source}" if source else "the token"
        if not value:
            raise self.error(key, f"{what} is empty")
        if _BAD_CHARS.search(value):
            raise self.error(key, f"{what} contains whitespace or control characters")
        if len(value.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
            raise self.error(key, f"{what} is longer than {MAX_TOKEN_BYTES} bytes")
        if len(value) < MIN_TOKEN_CHARS:
            raise self.error(
                key,
                f"{what} is shorter than {MIN_TOKEN_CHARS} characters: make a random one,"
                " e.g. python3 -c 'import secrets; print(secrets.token_hex(16))'",
            )
        return value
