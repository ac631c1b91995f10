"""Downloading every key under a prefix into a directory (``dsml download -r`` and
:meth:`ClusterClient.download_prefix`), without writing anything outside it.

Keys are taken relative to the prefix's directory part: ``datasets/`` into ``out``
makes ``out/a.csv`` of ``datasets/a.csv``, ``datasets`` makes ``out/datasets/a.csv``.
A key that is no safe relative path (``..``, ``.`` or empty segments) is skipped, and a
symbolic link or a file met on the way is never passed through.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import DsmlError


def relative_path(key: str, prefix: str) -> list[str]:
    """The path segments under the directory that ``key`` becomes when the keys under
    ``prefix`` are downloaded there.

    Raises ValueError for a key that is no safe relative path (``..`` or ``.`` or empty
    segments, a NUL).
    """
    base = prefix[: prefix.rfind("/") + 1]
    rest = key[len(base):]
    segments = rest.split("/")
    for seg in segments:
        if seg in ("", ".", "..") or "\0" in seg:
            raise ValueError(f"key {key!r} is not a safe relative path ({seg!r} segment)")
    return segments


def safe_parent(root: Path, segments: list[str]) -> Path:
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


#: Called with (key, the error) for each key that could not be downloaded.
OnError = Callable[[str, Exception], None]


def download_tree(
    c: Any, prefix: str, root: str | os.PathLike[str], on_error: OnError | None = None
) -> tuple[dict[str, Path], int]:
    """Every key under ``prefix`` into ``root`` with ``c`` (a :class:`ClusterClient` or
    a one-server :class:`Client`): ({key: the file written}, bytes written).

    Each key is downloaded whole and checked (temp file + rename).  A key that cannot
    be (an unsafe name, a directory in its way, a read error) is passed to ``on_error``
    and the others go on; without ``on_error`` the first such error is raised after
    the rest were tried.  ``not-found`` when no key is under the prefix.
    """
    keys = [e.key for e in c.list(prefix)]
    if not keys:
        raise DsmlError(f"no keys under {prefix!r}", "not-found")
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    if base.is_symlink():
        base = base.resolve()
    done: dict[str, Path] = {}
    total = 0
    first: Exception | None = None
    for key in keys:
        try:
            segments = relative_path(key, prefix)
            target = safe_parent(base, segments) / segments[-1]
            if target.is_dir() and not target.is_symlink():
                raise ValueError(f"{target} is a directory")
            total += c.download(key, target).size
            done[key] = target
        except (ValueError, DsmlError, OSError) as e:
            if on_error is None:
                first = first or e
            else:
                on_error(key, e)
    if first is not None:
        raise first
    return done, total


__all__ = ["OnError", "download_tree", "relative_path", "safe_parent"]
