"""twistd glue: command-line options and service makers for ``dsml-worker`` and ``dsml-master``.

The plugin stubs in ``twisted/plugins/dsml_plugins.py`` import this module only when twistd
actually runs one of the roles::

    twistd -n dsml-master -c etc/dsml.yaml
    twistd -n dsml-worker -c etc/dsml.yaml --name w1

The options load and validate the configuration in ``postOptions``, so a bad file or a bad
``--name`` makes twistd print one line naming the file, the key and the problem (after the
role's usage text) and exit with status 1, instead of a traceback from inside the service.

Each role keeps its pid file (and, when daemonized, its log file) beside its own state:
``master.pid`` / ``master.log`` in the master's ``state_dir``, ``worker.pid`` /
``worker.log`` in the worker's ``data_dir``.  twistd's defaults (``twistd.pid`` and
``twistd.log`` in the working directory) would make the second process started from one
directory refuse to start ("Another twistd server is running") and leave files in the
checkout.  An explicit ``--pidfile`` or ``--logfile`` still wins.

A role's state is its owner's alone (SQLite files hold job environments): both roles run
with a umask that keeps group and others out (``umask | 077``, also given to twistd's own
``--umask`` so that its pid and log files get it), on top of the explicit 0700/0600 modes
the nodes create their directories and files with (:mod:`dsml.fsutil`).  Tasks inherit
it: what a task writes in its attempt directory is the worker's too.

Both roles run their reactor's timers on the monotonic clock (:func:`daemon_reactor`,
:mod:`dsml.clocks`): Twisted's own runs them on the wall clock, which NTP or an operator
may step by minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from twisted.python import usage

from dsml import fsutil
from dsml.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    check_listen_safe,
    find_config,
    load_config,
)

if TYPE_CHECKING:
    from twisted.application.service import IService
    from twisted.internet.interfaces import IReactorCore

__all__ = [
    "MasterOptions", "WorkerOptions", "daemon_reactor", "makeMasterService", "makeWorkerService",
]


#: twistd's own default pid file, replaced by the role's (see the module docstring).
TWISTD_DEFAULT_PIDFILE = "twistd.pid"


class _ConfigOptions(usage.Options):
    """Options shared by both roles: ``--config``, loaded and validated in postOptions.

    After parsing, ``loaded_config`` holds the validated :class:`~dsml.config.Config`.
    """

    optParameters = [
        [
            "config",
            "c",
            None,
            f"Cluster configuration file (YAML). Default: ${CONFIG_ENV} if set, else "
            f"{DEFAULT_CONFIG} if it exists.",
        ],
    ]

    loaded_config: Config

    def postOptions(self) -> None:
        """Load the configuration, turning every ConfigError into a one-line UsageError."""
        # Read the environment here, not at import time, so it is the value at start-up.
        path = find_config(self["config"])
        if path is None:
            raise usage.UsageError(
                f"--config is required (or set {CONFIG_ENV}, or start where {DEFAULT_CONFIG}"
                " is)"
            )
        self["config"] = str(path)
        try:
            self.loaded_config = load_config(self["config"])
            self.check()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self._own_files()

    def check(self) -> None:
        """Role-specific checks of the loaded configuration; raise ConfigError."""

    def home(self) -> tuple[Path, str]:
        """The role's own directory and the stem of its pid and log files."""
        raise NotImplementedError

    def _own_files(self) -> None:
        """Point twistd's pid file (and a daemon's log file) into the role's directory.

        ``self.parent`` is twistd's ServerOptions; it has parsed its own options already
        (a subcommand is parsed inside the parent's parseOptions, before the parent's
        postOptions), so a value still equal to twistd's default was not given.
        """
        parent = self.parent
        if parent is None:
            return
        # twistd applies its --umask before it writes the pid file; keep others out of
        # it whatever was given (a stricter umask stays as it is).
        parent["umask"] = (parent.get("umask") or 0) | 0o077
        home, stem = self.home()
        if parent.get("pidfile") == TWISTD_DEFAULT_PIDFILE:
            try:
                fsutil.private_dir(home)
            except OSError as e:
                raise usage.UsageError(f"cannot create {home}: {e.strerror}") from None
            parent["pidfile"] = str(home / f"{stem}.pid")
        if not parent.get("nodaemon") and not parent.get("logfile"):
            parent["logfile"] = str(home / f"{stem}.log")


class WorkerOptions(_ConfigOptions):
    """Options of ``twistd dsml-worker``: ``--config`` and the worker's ``--name``."""

    synopsis = "--config FILE --name NAME"
    longdesc = (
        "Run one dsml worker: a storage server for files and values and the task slots "
        "that run jobs. NAME picks this worker's entry under 'workers' in the config file."
    )

    # No short form: "-n" would read as twistd's own --nodaemon to a human eye.
    optParameters = [
        *_ConfigOptions.optParameters,
        ["name", None, None, "This worker's name: a key of 'workers' in the config file."],
    ]

    def check(self) -> None:
        """``--name`` is required, must be a configured worker, and it may listen there."""
        config = self.loaded_config
        name = self["name"]
        if not name:
            known = ", ".join(config.workers)
            raise usage.UsageError(f"--name is required (workers in {config.path}: {known})")
        worker = config.worker(name)
        check_listen_safe(config, worker.host, f"workers.{name}.host")
        _check_tls(config, "worker", name)
        from dsml.worker.tasks.taskuser import for_worker

        for_worker(config, name)  # an unknown task_user stops it here, in one line

    def home(self) -> tuple[Path, str]:
        return self.loaded_config.worker(self["name"]).data_dir, "worker"


class MasterOptions(_ConfigOptions):
    """Options of ``twistd dsml-master``: ``--config``."""

    synopsis = "--config FILE"
    longdesc = (
        "Run the dsml master: membership, the directory of stored files and values, "
        "and the job queue, with its state in master.state_dir."
    )

    def check(self) -> None:
        """The master may listen on its configured host."""
        config = self.loaded_config
        check_listen_safe(config, config.master.host, "master.host")
        _check_tls(config, "master", "master")

    def home(self) -> tuple[Path, str]:
        return self.loaded_config.master.state_dir, "master"


def _check_tls(config: Config, kind: str, name: str) -> None:
    """With cluster.tls, this role's certificate and key must load (one line if not)."""
    if not config.cluster.tls:
        return
    from dsml.net.tls import TlsIdentity
    from dsml.pki import PkiError

    try:
        TlsIdentity(config.pki_dir, kind, name)
    except PkiError as e:
        raise usage.UsageError(e.message) from None


def daemon_reactor() -> IReactorCore:
    """The reactor twistd runs, made the daemon's: its timers on the monotonic clock
    (:func:`dsml.clocks.monotonic_reactor`: a step of the wall clock must not fire
    every heartbeat timeout at once), the process's umask its own.  Called before the
    node is built, so no timer of the node was ever due at a wall-clock time."""
    from twisted.internet import reactor

    from dsml.clocks import monotonic_reactor

    monotonic_reactor(reactor)
    fsutil.private_umask()
    return reactor  # type: ignore[return-value]


def makeWorkerService(options: WorkerOptions, reactor: IReactorCore | None = None) -> IService:
    """Build the worker's service from parsed options.

    ``reactor`` is for tests; twistd passes only the options, and the global reactor is
    imported here (:func:`daemon_reactor`), never at module level.
    """
    if reactor is None:
        reactor = daemon_reactor()  # twistd runs us: the process is the worker's
    config = options.loaded_config
    name: str = options["name"]
    worker = config.worker(name)
    check_listen_safe(config, worker.host, f"workers.{name}.host")

    from dsml.worker.service import make_worker_service

    return make_worker_service(config, name, reactor)


def makeMasterService(options: MasterOptions, reactor: IReactorCore | None = None) -> IService:
    """Build the master's service from parsed options (``reactor`` as for the worker)."""
    if reactor is None:
        reactor = daemon_reactor()  # twistd runs us: the process is the master's
    config = options.loaded_config
    check_listen_safe(config, config.master.host, "master.host")

    from dsml.master.service import make_master_service

    return make_master_service(config, reactor)
