"""A task's two log files: capped on disk with the tail kept, and the stderr tail that a
failed attempt's result carries.

Each attempt writes its stdout and stderr to :data:`STDOUT_NAME` and :data:`STDERR_NAME`
in its attempt directory, through a :class:`CappedLog` each; a failed attempt's result
carries the last lines of its stderr (:func:`stderr_tail`), made safe to show on a
terminal (:func:`tail_text`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from twisted.logger import Logger

from ...fsutil import PRIVATE_FILE

log = Logger()

#: Default cap, per stream, on the bytes of a task's log kept on disk (the tail is kept).
LOG_CAP = 1024 * 1024

#: Names of the two log files inside an attempt directory.
STDOUT_NAME = "dsml-stdout.log"
STDERR_NAME = "dsml-stderr.log"

#: A failed attempt's result carries at most this many last lines of its stderr...
STDERR_TAIL_LINES = 10
#: ...and at most this many bytes of it (the tail).
STDERR_TAIL_BYTES = 2048

#: Control characters a stderr tail may not carry (newline and tab it may): a terminal
#: showing ``dsml status`` must not be driven by a task's escape sequences.
_TAIL_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


class CappedLog:
    """A log file that keeps at most about ``cap`` bytes: the tail.

    Bytes are appended as they arrive (unbuffered, so a reader sees them at once).  When the
    file holds more than ``2 * cap`` bytes of output, it is rewritten to hold the last
    ``cap`` bytes after one line ``[dsml: N earlier bytes dropped]``, so rewriting costs
    O(1) per byte written and the file never exceeds ``2 * cap`` plus that line.  A write
    error (disk full) stops the capture and is logged once; the task itself goes on.
    """

    def __init__(self, path: Path, cap: int) -> None:
        self.path = path
        self.cap = cap
        self.kept = 0
        self.dropped = 0
        # Created on the first byte: most tasks of a big array print nothing, and
        # creating two files per attempt cost ~1 ms each on a busy disk.  (A reader
        # of a log that was never created sees an empty log.)
        self._fd: int | None = None
        self._closed = False

    def write(self, data: bytes) -> None:
        """Append ``data``; trim to the tail when the file has grown past twice the cap."""
        if self._closed:
            return
        try:
            if self._fd is None:
                # A bare descriptor: the cheapest way to create the file and append.
                self._fd = os.open(self.path, _LOG_FLAGS, PRIVATE_FILE)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self.kept += len(data)
            if self.kept > 2 * self.cap:
                self._trim()
        except OSError as e:
            log.error("log {path} no longer captured: {error}", path=str(self.path), error=e)
            self.close()

    def _trim(self) -> None:
        """Rewrite the file as a 'dropped' line plus its last ``cap`` bytes."""
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        with open(self.path, "rb") as f:
            f.seek(-self.cap, os.SEEK_END)
            tail = f.read()
        self.dropped += self.kept - len(tail)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with os.fdopen(os.open(tmp, _LOG_FLAGS, PRIVATE_FILE), "wb") as f:
            f.write(self.dropped_line())
            f.write(tail)
        os.replace(tmp, self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.kept = len(tail)

    def dropped_line(self) -> bytes:
        """The line the file begins with once trimmed (b"" while it never was)."""
        if not self.dropped:
            return b""
        return f"[dsml: {self.dropped} earlier bytes dropped]\n".encode()

    def close(self) -> None:
        """Stop capturing and close the file."""
        self._closed = True
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass


def open_logs(directory: Path, cap: int) -> tuple[CappedLog, CappedLog]:
    """The stdout and stderr logs of an attempt working in ``directory`` (no file is made
    until a byte arrives)."""
    return CappedLog(directory / STDOUT_NAME, cap), CappedLog(directory / STDERR_NAME, cap)


def tail_text(data: bytes, cut: bool = False) -> str:
    """The last :data:`STDERR_TAIL_LINES` lines of ``data``, within its last
    :data:`STDERR_TAIL_BYTES` bytes, as text: UTF-8 with errors replaced, and control
    characters but newline and tab replaced by U+FFFD.

    ``cut``: ``data`` is the end of something longer (so it may begin inside a character).
    """
    if len(data) > STDERR_TAIL_BYTES:
        data, cut = data[-STDERR_TAIL_BYTES:], True
    # A final line without a newline counts as a line; a final newline starts none.
    pos = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(STDERR_TAIL_LINES):
        pos = data.rfind(b"\n", 0, pos)
        if pos < 0:
            break
    if pos >= 0:
        data = data[pos + 1 :]
    elif cut:
        # It begins inside a line, perhaps inside a character: not half a character.
        skip = 0
        while skip < 3 and skip < len(data) and 0x80 <= data[skip] < 0xC0:
            skip += 1
        data = data[skip:]
    return _TAIL_CONTROL.sub("\ufffd", data.decode("utf-8", "replace"))


def stderr_tail(log: CappedLog) -> str:
    """The tail of a finished attempt's stderr log for its result (:func:`tail_text`);
    "" if nothing was written (then no file is read) or it cannot be read."""
    if not log.kept:
        return ""
    # The "[dsml: N earlier bytes dropped]" line of a trimmed log is not the task's.
    first = len(log.dropped_line())
    try:
        with open(log.path, "rb") as f:
            start = max(first, os.fstat(f.fileno()).st_size - STDERR_TAIL_BYTES)
            f.seek(start)
            data = f.read(STDERR_TAIL_BYTES)
    except OSError:
        return ""
    return tail_text(data, cut=start > 0)
