"""What splitting a file gives (:mod:`.chunking`, :mod:`.parquet`): a chunk, the error
for a file that cannot be split, and the sizes both read and spool by."""

from __future__ import annotations

from typing import IO

import attrs

#: Bytes read at a time.
BLOCK = 1 << 20
#: Bytes of a chunk kept in memory before its temporary file goes to disk.
SPOOL = 8 << 20


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


__all__ = ["BLOCK", "SPOOL", "Chunk", "ChunkError"]
