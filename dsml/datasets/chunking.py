"""Splitting a file into chunks on record boundaries, streaming (issue #15).

A chunk is cut at the first record boundary at or after ``target`` bytes of records, so
no record is ever split and every chunk but the last holds at least ``target`` bytes;
where the source's size is known (a file), no cut leaves a last chunk of :data:`SLOP`
of ``target`` or less: that tail joins the chunk before it (Hadoop's splits do the same),
rather than cost a task of its own that fetches it or waits for its holders:

- ``csv``: a record ends at a newline outside double quotes (RFC 4180: a field may hold
  newlines inside quotes, and ``""`` is a quote inside them, which leaves the state as
  it was, so the state at any byte is the parity of the quotes before it).  The first
  record is the header: every chunk starts with it, so each parses alone;
- ``text``: a record is a line;
- ``npy``: a record is a row of a C-ordered array (numpy's ``.npy`` format); each chunk
  is an ``.npy`` file of its rows;
- ``parquet`` (with pyarrow): whole row groups, each chunk a Parquet file of its own
  (:mod:`.parquet`).

Memory is bounded by one read block (:data:`BLOCK`) and what a spooled temporary file
keeps before it goes to disk (:data:`SPOOL`), whatever the file's size.  Each chunk
comes as a :class:`Chunk`: its temporary file (rewound), its size, its number of
records (the header not counted), and its sha256.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from .chunk import BLOCK, SLOP, SPOOL, Chunk, ChunkError, remaining

#: The longest CSV header accepted (it is repeated in every chunk).
MAX_HEADER = 1 << 20
#: The formats :func:`split` knows, by file name suffix.
SUFFIXES = {".csv": "csv", ".tsv": "csv", ".txt": "text", ".jsonl": "text",
            ".ndjson": "text", ".log": "text", ".npy": "npy", ".parquet": "parquet",
            ".pq": "parquet"}
FORMATS = ("csv", "text", "npy", "parquet")

QUOTE, NEWLINE = b'"', b"\n"


def guess_format(name: str) -> str:
    """The format for a file name (ChunkError if its suffix is not known)."""
    for suffix, fmt in SUFFIXES.items():
        if name.lower().endswith(suffix):
            return fmt
    raise ChunkError(f"cannot tell how to split {name!r}: name a format "
                     f"({', '.join(FORMATS)})")


def split(src: IO[bytes], target: int, fmt: str, block: int = BLOCK) -> Iterator[Chunk]:
    """The chunks of ``src`` (read from its position to its end, ``block`` bytes at a
    time) in order."""
    if target < 1:
        raise ChunkError(f"the chunk size must be at least 1 byte, not {target}")
    if fmt == "npy":
        yield from _split_npy(src, target)
    elif fmt == "parquet":
        from .parquet import split_parquet

        yield from split_parquet(src, target)
    elif fmt in ("csv", "text"):
        yield from _split_records(src, target, quoted=fmt == "csv", header=fmt == "csv",
                                  block=block, size=remaining(src))
    else:
        raise ChunkError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")


class _Writer:
    """The chunk being written: a spooled temporary file, hashed as it is written."""

    def __init__(self, head: bytes = b"") -> None:
        self.file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL)  # noqa: SIM115
        self.hash = hashlib.sha256()
        self.size = self.data = self.rows = 0
        self.write(head, data=False)

    def write(self, b: bytes | memoryview, data: bool = True) -> None:
        if not b:
            return
        self.file.write(b)
        self.hash.update(b)
        self.size += len(b)
        if data:
            self.data += len(b)

    def done(self) -> Chunk:
        self.file.seek(0)
        return Chunk(self.file, self.size, self.rows, self.hash.hexdigest())


def _boundary(buf: bytes, start: int, inside: bool, quoted: bool) -> int:
    """The index just after the first record end at or after ``start`` in ``buf`` (whose
    first byte is inside quotes if ``inside``), or -1 if none is in ``buf``."""
    k = buf.find(NEWLINE, start)
    if not quoted:
        return -1 if k < 0 else k + 1
    odd, counted = False, 0  # the parity of the quotes in buf[:counted]
    while k >= 0:
        odd ^= buf.count(QUOTE, counted, k) % 2 == 1  # counted once: linear in buf
        counted = k
        if odd == inside:
            return k + 1  # outside quotes: the parity before it is the start's
        k = buf.find(NEWLINE, k + 1)
    return -1


def _records(seg: bytes, inside: bool, quoted: bool) -> tuple[int, bool]:
    """(record ends in ``seg``, whether its end is inside quotes), starting ``inside``."""
    if not quoted or QUOTE not in seg:
        return (0 if inside else seg.count(NEWLINE)), inside
    n, i = 0, 0
    while True:
        q = seg.find(QUOTE, i)
        end = len(seg) if q < 0 else q
        if not inside:
            n += seg.count(NEWLINE, i, end)
        if q < 0:
            return n, inside
        inside, i = not inside, q + 1


def _split_records(src: IO[bytes], target: int, *, quoted: bool, header: bool,
                   block: int, size: int | None = None) -> Iterator[Chunk]:
    buf = b""
    eof = False
    read = 0  # bytes read from src: buf's end is there
    # No cut leaves SLOP of the target or less after it (a known size only).
    tail = -1 if size is None else int(SLOP * target)

    def more() -> bool:
        nonlocal buf, eof, read
        data = src.read(block)
        if not data:
            eof = True
            return False
        buf += data
        read += len(data)
        return True

    head = b""
    if header:
        while (end := _boundary(buf, 0, False, quoted)) < 0 and more():
            if len(buf) > MAX_HEADER:
                break
        if end < 0 and len(buf) > MAX_HEADER:
            raise ChunkError(f"the header (the first record) is longer than {MAX_HEADER} bytes")
        end = len(buf) if end < 0 else end
        head, buf = buf[:end], buf[end:]
        if not buf and not more():
            if head:
                w = _Writer(head)
                yield w.done()
            return
    w = _Writer(head)
    inside = False  # the state at buf[0]
    while True:
        if not buf and (eof or not more()):
            break
        need = max(0, target - w.data)
        cut = _boundary(buf, need, inside, quoted) if need <= len(buf) else -1
        if cut >= 0 and size is not None and size - (read - len(buf) + cut) <= tail:
            cut, tail = -1, size  # the rest is this chunk's: no cut from here on
        if cut < 0:  # all of it is this chunk's (its last record goes on after it)
            n, inside = _records(buf, inside, quoted)
            w.rows += n
            w.write(buf)
            buf = b""
            continue
        n, _ = _records(buf[:cut], inside, quoted)
        w.rows += n
        w.write(buf[:cut])
        buf = buf[cut:]
        inside = False
        yield w.done()
        w = _Writer(head)
        if not buf and (eof or not more()):
            return
    if w.data:
        if not w.file.tell() or _last_byte(w) != NEWLINE:
            w.rows += 1  # a last record with no newline after it
        yield w.done()


def _last_byte(w: _Writer) -> bytes:
    w.file.seek(-1, 2)
    b = w.file.read(1)
    w.file.seek(0, 2)
    return b


def _split_npy(src: IO[bytes], target: int) -> Iterator[Chunk]:
    try:
        import numpy as np
        from numpy.lib import format as npf
    except ImportError:
        raise ChunkError("splitting .npy needs numpy") from None
    try:
        version = npf.read_magic(src)
        read = {(1, 0): npf.read_array_header_1_0, (2, 0): npf.read_array_header_2_0}
        if version not in read:
            raise ValueError(f".npy format version {version} is not read here")
        shape, fortran, dtype = read[version](src)
    except (ValueError, OSError) as e:
        raise ChunkError(f"not a .npy file: {e}") from None
    if fortran or not shape or dtype.hasobject:
        raise ChunkError("a .npy array is split by rows: it must be C-ordered, at least 1-d "
                         "and hold no Python objects")
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    per_chunk = max(1, -(-target // max(1, row_bytes)))
    first = 0
    while first < shape[0]:
        rows = min(per_chunk, shape[0] - first)
        if shape[0] - first - rows <= SLOP * per_chunk:
            rows = shape[0] - first  # no last chunk of a tail: it goes with this one
        w = _Writer()
        header: dict[str, Any] = {"descr": npf.dtype_to_descr(dtype), "fortran_order": False,
                                  "shape": (rows, *shape[1:])}
        head = _npy_header(npf, header)
        w.write(head, data=False)
        left = rows * row_bytes
        while left:
            b = src.read(min(left, BLOCK))
            if not b:
                raise ChunkError("the .npy file is shorter than its header says")
            w.write(b)
            left -= len(b)
        w.rows = rows
        first += rows
        yield w.done()


def _npy_header(npf: Any, header: dict[str, Any]) -> bytes:
    import io

    out = io.BytesIO()
    try:
        npf.write_array_header_1_0(out, header)
    except ValueError:  # a header over 64 KiB (a very long dtype): format 2.0
        out = io.BytesIO()
        npf.write_array_header_2_0(out, header)
    return out.getvalue()
