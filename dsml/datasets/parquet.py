"""Splitting a Parquet file into chunks by row group (issue #15), where pyarrow is
installed.

A Parquet file is already cut into row groups, each readable alone: a chunk is a
Parquet file of consecutive whole row groups (never a row group split), closed once
their compressed bytes reach ``target``, so every chunk but the last holds at least
``target`` bytes of column data (and the last more than :data:`~.chunk.SLOP` of it,
unless it is the only one).  Each row group is read and rewritten as one row group
with the source's schema (its metadata kept) and its first column's codec: memory is one
row group, whatever the file's size.

The source must be seekable (Parquet's footer, at the end, says where the groups are):
a local file or an fsspec file.  Its columns are the manifest's ``columns``; a linear
model reads them by name (:mod:`dsml.ml`).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from .chunk import BLOCK, SLOP, SPOOL, Chunk, ChunkError


def _pq() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ChunkError("splitting Parquet needs pyarrow (pip install pyarrow)") from None
    return pq


def open_parquet(src: IO[bytes]) -> Any:
    """``src`` as a ``pyarrow.parquet.ParquetFile`` (ChunkError if it is not one)."""
    pq = _pq()
    import pyarrow as pa

    try:
        return pq.ParquetFile(src)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ChunkError(f"not a Parquet file: {e}") from None


def columns(src: IO[bytes]) -> list[str]:
    """The column names of the Parquet file ``src`` (rewound afterwards)."""
    pos = src.tell()
    try:
        return list(open_parquet(src).schema_arrow.names)
    finally:
        src.seek(pos)


def split_parquet(src: IO[bytes], target: int) -> Iterator[Chunk]:
    """The chunks of the Parquet file ``src``: consecutive whole row groups, each chunk
    closed once their compressed size reaches ``target`` (a file of no row group gives
    one chunk of no rows, as an empty CSV gives one of its header)."""
    pf = open_parquet(src)
    md = pf.metadata
    sizes = []
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        sizes.append(sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)))
    after = sum(sizes)  # the bytes of the groups after the current one
    group: list[int] = []
    size = 0
    for i in range(md.num_row_groups):
        group.append(i)
        size += sizes[i]
        after -= sizes[i]
        if size >= target and after > SLOP * target:  # no chunk of a tail alone
            yield _write(pf, group)
            group, size = [], 0
    if group or md.num_row_groups == 0:
        yield _write(pf, group)


def _codec(pf: Any) -> str:
    md = pf.metadata
    if md.num_row_groups and md.row_group(0).num_columns:
        codec = str(md.row_group(0).column(0).compression).lower()
        if codec in ("snappy", "gzip", "brotli", "zstd", "lz4", "uncompressed"):
            return "none" if codec == "uncompressed" else codec
    return "snappy"


def _write(pf: Any, groups: list[int]) -> Chunk:
    pq = _pq()
    import pyarrow as pa

    out: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL)  # noqa: SIM115
    rows = 0
    try:
        with pq.ParquetWriter(out, pf.schema_arrow, compression=_codec(pf)) as w:
            for i in groups:
                try:
                    table = pf.read_row_group(i)
                except (pa.ArrowException, OSError) as e:
                    raise ChunkError(f"row group {i} cannot be read: {e}") from None
                rows += table.num_rows
                w.write_table(table, row_group_size=max(1, table.num_rows))
        size = out.tell()
        out.seek(0)
        digest = hashlib.sha256()
        while block := out.read(BLOCK):
            digest.update(block)
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return Chunk(out, size, rows, digest.hexdigest())


__all__ = ["columns", "open_parquet", "split_parquet"]
