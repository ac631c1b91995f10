"""twistd plugins ``dsml-worker`` and ``dsml-master``.

Twisted imports every module in ``twisted/plugins`` whenever anything looks for plugins, so
this stub imports nothing heavy: the options and services live in :mod:`dsml.tap` and are
imported only when twistd runs one of these roles.  There is deliberately no
``__init__.py`` here or in ``twisted/``: one would shadow Twisted's own package.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class _DsmlServiceMaker:
    """An IServiceMaker whose options and makeService are looked up in dsml.tap on use."""

    def __init__(self, tapname: str, description: str, options: str, make: str) -> None:
        self.tapname = tapname
        self.name = tapname
        self.description = description
        self._options = options
        self._make = make

    @property
    def options(self) -> Any:
        """The role's usage.Options subclass."""
        return getattr(import_module("dsml.tap"), self._options)

    def makeService(self, options: Any) -> Any:
        """Build the role's service from parsed options."""
        return getattr(import_module("dsml.tap"), self._make)(options)


dsmlWorker = _DsmlServiceMaker(
    "dsml-worker",
    "A dsml worker: stores files and values and runs job tasks (--config FILE --name NAME).",
    "WorkerOptions",
    "makeWorkerService",
)

dsmlMaster = _DsmlServiceMaker(
    "dsml-master",
    "The dsml master: membership, file directory and job queue (--config FILE).",
    "MasterOptions",
    "makeMasterService",
)
