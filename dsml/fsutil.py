"""Small filesystem helpers shared by the SQLite-backed stores (worker, master, jobs), and
the copy of a file that shares blocks where the filesystem can (:func:`copy_file`)."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

#: ``ioctl(dest, FICLONE, src)``: make ``dest`` a copy-on-write clone of ``src`` (btrfs,
#: XFS, bcachefs...; ``_IOW(0x94, 9, int)`` in linux/fs.h).  Not in the fcntl module.
FICLONE = 0x40049409

#: Bytes per ``copy_file_range`` call (the kernel copies them without user space).
COPY_RANGE_CHUNK = 64 * 1024 * 1024


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


def copy_file(src: int, dest: int, size: int) -> str:
    """Copy the ``size`` bytes of the open file ``src`` (from its start) into the empty
    open file ``dest``; returns how: ``"clone"``, ``"copy_file_range"`` or ``"copy"``.

    A reflink first (``FICLONE``: instant, and the two files share blocks until one is
    written, so the copy still never changes the original); else an in-kernel copy
    (``os.copy_file_range``); else read and write.  Never a hard link: whoever writes
    ``dest`` must not touch ``src``.
    """
    if size == 0:
        return "copy"
    try:
        fcntl.ioctl(dest, FICLONE, src)
        return "clone"
    except OSError:
        pass  # not supported here (ext4, tmpfs, across filesystems): copy the bytes
    offset = 0
    if hasattr(os, "copy_file_range"):
        try:
            while offset < size:
                n = os.copy_file_range(src, dest, min(COPY_RANGE_CHUNK, size - offset),
                                       offset, offset)
                if n == 0:
                    break
                offset += n
            if offset >= size:
                return "copy_file_range"
        except OSError:
            pass  # an old kernel, or a filesystem pair it refuses: the bytes from here
    with os.fdopen(os.dup(src), "rb") as fin, os.fdopen(os.dup(dest), "wb") as fout:
        fin.seek(offset)
        fout.seek(offset)
        shutil.copyfileobj(fin, fout, 1024 * 1024)
    return "copy"
