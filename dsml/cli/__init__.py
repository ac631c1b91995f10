"""The ``dsml`` command.

Errors are one line on stderr and a non-zero exit status, never a traceback:
1 for an error from the cluster or the filesystem, 2 for bad usage or config, 141 when
the reader of stdout went away (``dsml ls | head``), 130 on Ctrl-C.  Data goes to stdout;
notes, hints and progress to stderr.  ``--json`` makes a listing one JSON document.

Rooms: :mod:`.common` (finding and reaching the cluster, printing), :mod:`.storage` (files,
values, nodes), :mod:`.jobs` (the job commands), :mod:`.main` (the parser and ``main``).
This package must not import Twisted (every command would pay for it): a test checks.
"""

from .common import EXIT_BROKEN_PIPE, UsageError, resolve_server
from .main import build_parser, main

__all__ = ["EXIT_BROKEN_PIPE", "UsageError", "build_parser", "main", "resolve_server"]
