"""Small filesystem helpers shared by the SQLite-backed stores (worker, master, jobs), the
copy of a file that shares blocks where the filesystem can (:func:`copy_file`), and the
owner-only modes of everything a node keeps on disk (:func:`private_dir`,
:func:`private_file`, :func:`tighten_tree`).

A node's state and data (SQLite files holding job environments, stored objects, values,
task logs) are its owner's alone: directories are :data:`PRIVATE_DIR` (0700) and files
:data:`PRIVATE_FILE` (0600) whatever the process umask, since the modes are given at
creation (and forced on a file that may already exist).  A directory an older install
left open to others is tightened, with everything under it, once at start-up
(:func:`private_dir`), in one log line.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from pathlib import Path

#: ``ioctl(dest, FICLONE, src)``: make ``dest`` a copy-on-write clone of ``src`` (btrfs,
#: XFS, bcachefs...; ``_IOW(0x94, 9, int)`` in linux/fs.h).  Not in the fcntl module.
FICLONE = 0x40049409

#: Bytes per ``copy_file_range`` call (the kernel copies them without user space).
COPY_RANGE_CHUNK = 64 * 1024 * 1024

#: Mode of every directory a node creates for its state and data: its owner's alone.
PRIVATE_DIR = 0o700
#: Mode of every file a node writes there.
PRIVATE_FILE = 0o600
#: The bits that let anyone but the owner in.
_OTHERS = 0o077


def private_umask() -> int:
    """Make the process umask keep group and others out (``umask | 077``); returns the
    umask it replaced.  For the twistd roles only: files a library creates by itself
    (SQLite's, twistd's pid and log files) then get owner-only modes too."""
    old = os.umask(_OTHERS)
    os.umask(old | _OTHERS)
    return old


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it
    (``/proc/self/status``); else set to 077 and restored at once."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(_OTHERS)
    os.umask(mask)
    return mask


def mkdir_private(path: Path) -> None:
    """``mkdir`` one directory as 0700 (a umask can only take bits away: the mode holds
    whatever it is, unless it would keep the owner out).  Raises as ``os.mkdir``."""
    os.mkdir(path, PRIVATE_DIR)


def makedirs_private(path: Path) -> None:
    """``mkdir -p`` where every directory created (parents too) is 0700; existing ones
    are left as they are.  Raises OSError (a path component that is a file...)."""
    missing: list[Path] = []
    here = path
    while not here.is_dir():
        missing.append(here)
        parent = here.parent
        if parent == here:
            break
        here = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, PRIVATE_DIR)
        except FileExistsError:
            if not d.is_dir():
                raise


def private_dir(path: Path) -> None:
    """Make ``path`` (and any missing parent) a 0700 directory.

    An existing ``path`` that group or others may enter is an older install's: it and
    everything under it are made owner-only (:func:`tighten_tree`: a one-time walk), and
    one line is logged saying so.  Parents that already exist are never touched (they
    are the administrator's: ``/var/lib``, a home directory).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        makedirs_private(path)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    if st.st_mode & _OTHERS:
        # Here only: the dsml command imports this module, and no Twisted (test_cli).
        from twisted.logger import Logger

        dirs, files = tighten_tree(path)
        Logger(namespace=__name__).info(
            "{path} was open to other users (mode {mode:04o}): tightened to owner-only"
            " ({dirs} dir(s), {files} file(s) changed)",
            path=str(path), mode=stat.S_IMODE(st.st_mode), dirs=dirs, files=files,
        )


def tighten_tree(root: Path) -> tuple[int, int]:
    """Take group and others' bits off ``root`` and everything under it (symbolic links
    are neither followed nor changed); returns how many directories and files changed."""
    dirs = files = 0

    def tighten(path: str, st: os.stat_result) -> bool:
        if not st.st_mode & _OTHERS:
            return False
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~_OTHERS)
        return True

    dirs += tighten(str(root), os.stat(root))
    for top, subdirs, names in os.walk(root):
        for name in subdirs + names:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    continue
                if tighten(path, st):
                    if stat.S_ISDIR(st.st_mode):
                        dirs += 1
                    else:
                        files += 1
            except FileNotFoundError:  # gone meanwhile
                continue
    return dirs, files


def private_file(path: Path, flags: int = os.O_WRONLY) -> int:
    """Open (creating if needed) ``path`` with ``flags`` as a 0600 file whatever the umask,
    and force 0600 on a file that already existed more open; returns the descriptor
    (close-on-exec).  Raises OSError."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        if os.fstat(fd).st_mode & _OTHERS:
            os.fchmod(fd, PRIVATE_FILE)
    except BaseException:
        os.close(fd)
        raise
    return fd


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
