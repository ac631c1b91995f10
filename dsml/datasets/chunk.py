"""What splitting a file gives (:mod:`.chunking`, :mod:`.parquet`): a chunk, the error
for a file that cannot be split, and the sizes both read and spool by."""

from __future__ import annotations

import os
from typing import IO

import attrs

#: Bytes read at a time.
BLOCK = 1 << 20
#: Bytes of a chunk kept in memory before its temporary file goes to disk.
SPOOL = 8 << 20
#: A last chunk of at most this fraction of the chunk size joins the one before it.
SLOP = 0.1


class ChunkError(ValueError):
    """The file cannot be split as asked (a header too long, a bad ``.npy``, ...)."""


@attrs.define
class Chunk:
    """One chunk: ``file`` (rewound, closed by the caller), ``size`` in bytes,
    ``rows`` (records, the repeated header not counted) and ``sha256``."""

    file: IO[bytes]
    size: int
    rows: int
    sha256: str


def remaining(src: IO[bytes]) -> int | None:
    """Bytes from ``src``'s position to its end, None if it cannot tell (a pipe)."""
    try:
        if hasattr(src, "fileno"):
            try:
                return os.fstat(src.fileno()).st_size - src.tell()
            except (OSError, ValueError, AttributeError):
                pass  # not a file descriptor's (BytesIO): by seeking
        pos = src.tell()
        end = src.seek(0, os.SEEK_END)
        src.seek(pos)
        return end - pos
    except (OSError, ValueError, AttributeError):
        return None


__all__ = ["BLOCK", "SLOP", "SPOOL", "Chunk", "ChunkError", "remaining"]
