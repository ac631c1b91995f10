"""Parquet datasets (issue #15, where pyarrow is installed): a file is split into chunks of
whole row groups that give back its rows exactly, and a linear model reads a Parquet
chunk by column name as it reads a CSV one."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsml import ml
from dsml.datasets.chunk import SLOP
from dsml.datasets.chunking import ChunkError, guess_format, split

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
np = pytest.importorskip("numpy")


def _parquet(groups: list[int], seed: int = 0, compression: str = "snappy") -> tuple[bytes, object]:
    """A Parquet file of row groups of ``groups`` rows (x1, x2 float, n int, y float)."""
    rng = np.random.default_rng(seed)
    total = sum(groups)
    table = pa.table({"x1": rng.normal(size=total), "x2": rng.normal(size=total) * 1e3,
                      "n": rng.integers(-5, 5, size=total), "y": rng.normal(size=total)})
    out = io.BytesIO()
    with pq.ParquetWriter(out, table.schema, compression=compression) as w:
        start = 0
        for g in groups:
            w.write_table(table.slice(start, g), row_group_size=max(1, g))
            start += g
    return out.getvalue(), table


@settings(max_examples=40, deadline=None)
@given(groups=st.lists(st.integers(1, 300), min_size=0, max_size=8),
       target=st.integers(1, 20000))
def test_chunks_are_whole_row_groups_and_give_back_the_table(groups: list[int],
                                                             target: int) -> None:
    data, table = _parquet(groups)
    chunks = list(split(io.BytesIO(data), target, "parquet"))
    assert len(chunks) >= 1
    ends = {sum(groups[:i]) for i in range(len(groups) + 1)}
    seen = 0
    parts = []
    for c in chunks:
        body = c.file.read()
        assert len(body) == c.size and hashlib.sha256(body).hexdigest() == c.sha256
        back = pq.read_table(io.BytesIO(body))
        assert back.num_rows == c.rows
        seen += c.rows
        assert seen in ends  # a chunk ends where a row group ends: none is split
        parts.append(back)
    assert seen == sum(groups)
    assert pa.concat_tables(parts).equals(table)
    if len(chunks) > 1:  # the last chunk is not a tail of SLOP or less of the target
        md = pq.ParquetFile(io.BytesIO(data)).metadata
        sizes = [sum(md.row_group(g).column(c).total_compressed_size
                     for c in range(md.num_columns)) for g in range(md.num_row_groups)]
        last = len(groups) - next(i for i in range(len(groups))
                                  if sum(groups[i:]) == chunks[-1].rows)
        assert sum(sizes[-last:]) > SLOP * target
    # Every chunk but the last was closed by reaching the target (in compressed bytes).
    assert len(chunks) <= max(1, len(groups))


def test_codec_and_schema_metadata_are_kept() -> None:
    data, table = _parquet([50, 50], compression="zstd")
    f = pq.ParquetFile(io.BytesIO(data))
    schema = f.schema_arrow.with_metadata({b"origin": b"lab"})
    out = io.BytesIO()
    with pq.ParquetWriter(out, schema, compression="zstd") as w:
        w.write_table(table.replace_schema_metadata({b"origin": b"lab"}), row_group_size=50)
    (c,) = split(io.BytesIO(out.getvalue()), 1 << 30, "parquet")
    back = pq.ParquetFile(c.file)
    assert back.schema_arrow.metadata[b"origin"] == b"lab"
    assert back.metadata.row_group(0).column(0).compression == "ZSTD"
    assert back.metadata.num_row_groups == 2


def test_not_parquet_is_a_clear_error() -> None:
    assert guess_format("games.parquet") == "parquet"
    with pytest.raises(ChunkError, match="not a Parquet file"):
        list(split(io.BytesIO(b"id,y\n1,2\n"), 100, "parquet"))
    data, _ = _parquet([10, 10])
    with pytest.raises(ChunkError, match="not a Parquet file|cannot be read"):
        list(split(io.BytesIO(data[:-30] + b"\0" * 30), 100, "parquet"))


def test_a_parquet_chunk_gives_the_statistics_of_its_rows(tmp_path: Path) -> None:
    data, table = _parquet([700, 300], seed=3)
    path = tmp_path / "part-00000.parquet"
    path.write_bytes(data)
    names = table.schema.names
    cols = [names.index(c) for c in ("x2", "n", "y")]  # out of file order, an int column
    z = np.column_stack([table.column(c).to_numpy().astype(np.float64) for c in ("x2", "n", "y")])
    got = np.concatenate(list(ml._blocks(path, cols)))
    assert np.array_equal(got, z)
    n, mean, co = ml.chunk_stats(path, cols)
    assert n == 1000
    assert np.allclose(mean, z.mean(axis=0), rtol=1e-12)
    zc = z - z.mean(axis=0)
    assert np.allclose(co, zc.T @ zc, rtol=1e-10)


def test_a_null_or_text_value_names_the_chunk(tmp_path: Path) -> None:
    path = tmp_path / "part-00001.parquet"
    pq.write_table(pa.table({"x": [1.0, None, 3.0], "y": [1.0, 2.0, 3.0]}), path)
    with pytest.raises(ValueError, match="part-00001.parquet: column 'x': a value missing"):
        ml.chunk_stats(path, [0, 1])
    pq.write_table(pa.table({"x": ["a", "b"], "y": [1.0, 2.0]}), path)
    with pytest.raises(ValueError, match="part-00001.parquet"):
        ml.chunk_stats(path, [0, 1])
    pq.write_table(pa.table({"x": [1.0, float("nan")], "y": [1.0, 2.0]}), path)
    with pytest.raises(ValueError, match="row 2: a value not a number"):
        ml.chunk_stats(path, [0, 1])
