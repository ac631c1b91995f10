"""twistd glue: command-line options and service makers for ``dsml-worker`` and ``dsml-master``.

The plugin stubs in ``twisted/plugins/dsml_plugins.py`` import this module only when twistd
actually runs one of the roles::

    twistd -n dsml-master -c etc/dsml.yaml
    twistd -n dsml-worker -c etc/dsml.yaml --name w1

The options load and validate the configuration in ``postOptions``, so a bad file or a bad
``--name`` makes twistd print one line naming the file, the key and the problem (after the
role's usage text) and exit with status 1, instead of a traceback from inside the service.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.python import usage

from dsml.config import Config, ConfigError, check_listen_safe, load_config

if TYPE_CHECKING:
    from twisted.application.service import IService
    from twisted.internet.interfaces import IReactorCore

__all__ = ["MasterOptions", "WorkerOptions", "makeMasterService", "makeWorkerService"]

#: Environment variable naming the configuration file when ``--config`` is not given.
CONFIG_ENV = "DSML_CONFIG"


class _ConfigOptions(usage.Options):
    """Options shared by both roles: ``--config``, loaded and validated in postOptions.

    After parsing, ``loaded_config`` holds the validated :class:`~dsml.config.Config`.
    """

    optParameters = [
        [
            "config",
            "c",
            None,
            f"Cluster configuration file (YAML). Default: ${CONFIG_ENV} if set.",
        ],
    ]

    loaded_config: Config

    def postOptions(self) -> None:
        """Load the configuration, turning every ConfigError into a one-line UsageError."""
        if not self["config"]:
            # Read the environment here, not at import time, so it is the value at start-up.
            self["config"] = os.environ.get(CONFIG_ENV) or None
        if not self["config"]:
            raise usage.UsageError(f"--config is required (or set {CONFIG_ENV})")
        try:
            self.loaded_config = load_config(self["config"])
            self.check()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def check(self) -> None:
        """Role-specific checks of the loaded configuration; raise ConfigError."""


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


def makeWorkerService(options: WorkerOptions, reactor: IReactorCore | None = None) -> IService:
    """Build the worker's service from parsed options.

    ``reactor`` is for tests; twistd passes only the options, and the global reactor is
    imported here, never at module level.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = options.loaded_config
    name: str = options["name"]
    worker = config.worker(name)
    check_listen_safe(config, worker.host, f"workers.{name}.host")

    from dsml.worker.service import make_worker_service

    return make_worker_service(config, name, reactor)


def makeMasterService(options: MasterOptions, reactor: IReactorCore | None = None) -> IService:
    """Build the master's service from parsed options (``reactor`` as for the worker)."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = options.loaded_config
    check_listen_safe(config, config.master.host, "master.host")

    from dsml.master.service import make_master_service

    return make_master_service(config, reactor)
