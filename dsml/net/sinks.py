"""Where a downloaded payload goes: response sinks that check what they receive.

Owns the :class:`~dsml.net.calling.ResponseSink` implementations of a ``file_retrieve``
answer (docs/protocol.md, section 9): the payload is hashed as it arrives and checked
against the answer's ``Sha256`` at the end (:class:`~dsml.errors.ChecksumMismatch`
otherwise).  :class:`FileSink` writes it to a temporary file beside the target, renamed
onto the target only once whole and verified, and removed on any failure, so nothing
half-written is ever visible; :class:`BytesSink` keeps it in memory (small files, tests).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..errors import ChecksumMismatch, DsmlError


class _Verified:
    """Hashes the payload and checks it against the head's ``Sha256`` at the end."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._digest = hashlib.sha256()
        self._expected = ""
        #: The answer's headers (set by ``begin``).
        self.headers: Mapping[str, str] = {}

    def begin(self, headers: Mapping[str, str], length: int) -> None:
        """Check the head is a file's content offered for writing."""
        if headers.get("action") != "write-file":
            raise DsmlError("server did not offer the file", "bad-frame")
        self.headers = headers
        self._expected = headers.get("sha256", "")

    def _hash(self, chunk: bytes) -> None:
        self._digest.update(chunk)

    def _check(self) -> None:
        got = self._digest.hexdigest()
        if got != self._expected:
            raise ChecksumMismatch(
                f"{self.what} arrived with sha256 {got}, expected {self._expected}"
            )


class FileSink(_Verified):
    """Writes the payload to ``target`` through a temporary file beside it.

    The temporary file (``.NAME.*.part``, in the target's directory so the rename is
    atomic) is made when the head arrives; at the end the hash is checked, the file
    flushed (and fsynced with ``fsync``) and renamed onto ``target``.  Any failure, a
    checksum that does not match or an ``abort``, removes it.
    """

    def __init__(self, target: Path, what: str = "the download", fsync: bool = True) -> None:
        super().__init__(what)
        self.target = target
        self.fsync = fsync
        self._tmp: str | None = None
        self._fd: int | None = None

    def begin(self, headers: Mapping[str, str], length: int) -> None:
        """Check the head, open the temporary file."""
        super().begin(headers, length)
        fd, self._tmp = tempfile.mkstemp(
            prefix=f".{self.target.name}.", suffix=".part", dir=self.target.parent
        )
        self._fd = fd

    def data(self, chunk: bytes) -> None:
        """Hash and write a chunk (all of it: ``os.write`` may take part)."""
        self._hash(chunk)
        fd = self._fd
        assert fd is not None
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]

    def end(self) -> None:
        """Check the hash, then make the file visible under its name."""
        try:
            self._check()
            assert self._fd is not None and self._tmp is not None
            if self.fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self.target)
            self._tmp = None
        finally:
            self.abort()

    def abort(self) -> None:
        """Close and remove the temporary file, if it is still there."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


class BytesSink(_Verified):
    """Keeps the payload in memory (a list of chunks, joined once at the end)."""

    def __init__(self, what: str = "the download") -> None:
        super().__init__(what)
        self._chunks: list[bytes] = []
        #: The payload, once it arrived whole and verified.
        self.value = b""

    def data(self, chunk: bytes) -> None:
        """Hash and keep a chunk."""
        self._hash(chunk)
        self._chunks.append(chunk)

    def end(self) -> None:
        """Check the hash; the payload is then :attr:`value`."""
        self._check()
        self.value = b"".join(self._chunks)
        self._chunks = []

    def abort(self) -> None:
        """Forget what arrived."""
        self._chunks = []


__all__ = ["BytesSink", "FileSink"]
