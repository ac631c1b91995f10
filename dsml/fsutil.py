"""Small filesystem helpers shared by the SQLite-backed stores (worker, master, jobs)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prefix_end(prefix: str) -> str | None:
    """Return the smallest string greater than every string starting with ``prefix``.

    That is the prefix with its last character incremented, after dropping
    trailing U+10FFFF (which has no successor); None if there is no such bound
    (empty prefix, or all U+10FFFF).  Code-point order is UTF-8 byte order, which
    is how SQLite compares TEXT, so the bound is right for the index too.
    """
    for i in range(len(prefix) - 1, -1, -1):
        c = ord(prefix[i])
        if c < 0x10FFFF:
            c += 1
            if c == 0xD800:  # surrogates cannot be encoded in UTF-8; skip them
                c = 0xE000
            return prefix[:i] + chr(c)
    return None
