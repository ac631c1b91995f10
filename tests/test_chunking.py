"""Splitting files into chunks on record boundaries (:mod:`dsml.datasets.chunking`): no
record is ever split, the chunks give back the original bytes, their counts and
checksums are right; CSV with quoted newlines, plain lines and ``.npy`` rows."""

from __future__ import annotations

import csv
import hashlib
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsml.datasets import chunking
from dsml.datasets.chunking import ChunkError, guess_format, split

FIELD = st.text(alphabet=st.sampled_from('ab,"\n\r x1é'), max_size=12)
ROWS = st.lists(st.lists(FIELD, min_size=2, max_size=2), min_size=0, max_size=40)


def _csv(header: list[str], rows: list[list[str]], last_newline: bool,
         crlf: bool = False) -> bytes:
    """A CSV as Python writes it; with LF line ends a bare CR is left out of the fields
    (the writer would not quote it, and a reader takes it for a line end)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n" if crlf else "\n")
    w.writerow(header)
    w.writerows(rows if crlf else [[f.replace("\r", "") for f in r] for r in rows])
    text = out.getvalue()
    if not last_newline and rows:
        text = text[:-2 if crlf else -1]
    return text.encode()


def _parse(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode(), newline="")))


@settings(max_examples=300, deadline=None)
@given(rows=ROWS, target=st.integers(1, 200), block=st.integers(1, 64),
       last_newline=st.booleans(), crlf=st.booleans())
def test_csv_chunks_never_split_a_record(rows: list[list[str]], target: int, block: int,
                                         last_newline: bool, crlf: bool) -> None:
    """Random CSVs (quotes, commas, newlines and CRs inside fields, LF or CRLF line
    ends), chunk sizes and read blocks: each chunk is the header and whole records;
    together they are the file."""
    data = _csv(["k", "v"], rows, last_newline, crlf)
    chunks = list(split(io.BytesIO(data), target, "csv", block))
    header = _csv(["k", "v"], [], True, crlf)
    bodies = []
    for i, c in enumerate(chunks):
        b = c.file.read()
        assert len(b) == c.size and hashlib.sha256(b).hexdigest() == c.sha256
        assert b.startswith(header)
        parsed = _parse(b)
        assert parsed[0] == ["k", "v"]
        assert c.rows == len(parsed) - 1
        if i < len(chunks) - 1:
            assert len(b) - len(header) >= target  # cut at the first end past the target
        bodies.append(b[len(header):])
    if len(chunks) > 1:  # no last chunk of a tail (the size of a BytesIO is known)
        assert len(bodies[-1]) > int(chunking.SLOP * target)
    assert header + b"".join(bodies) == data
    assert [r for b in bodies for r in _parse(header + b)[1:]] == _parse(data)[1:]
    assert sum(c.rows for c in chunks) == len(rows)


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(st.text(alphabet="ab \"x", max_size=20), max_size=50),
       target=st.integers(1, 100), block=st.integers(1, 32))
def test_text_chunks_are_whole_lines(lines: list[str], target: int, block: int) -> None:
    data = "".join(f"{ln}\n" for ln in lines).encode()
    chunks = list(split(io.BytesIO(data), target, "text", block))
    parts = [c.file.read() for c in chunks]
    assert b"".join(parts) == data
    assert all(p.endswith(b"\n") for p in parts)
    assert [c.rows for c in chunks] == [p.count(b"\n") for p in parts]
    assert all(len(p) >= target for p in parts[:-1])
    if len(parts) > 1:
        assert len(parts[-1]) > int(chunking.SLOP * target)


def test_a_tail_joins_the_last_chunk_only_where_the_size_is_known() -> None:
    # 34 lines of 5 bytes, chunks of 50: cut after 11 lines (55 bytes) three times, the
    # last line left, 5 bytes: SLOP of 50 (5) or less, so it joins the third chunk.
    data = b"".join(b"%04d\n" % i for i in range(34))
    assert [c.rows for c in split(io.BytesIO(data), 50, "text")] == [11, 11, 12]

    class Pipe(io.RawIOBase):  # a stream of no known size: the tail stays a chunk
        def __init__(self) -> None:
            self.src = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            chunk = self.src.read(len(b))
            b[:len(chunk)] = chunk
            return len(chunk)

    assert chunking.remaining(Pipe()) is None
    assert [c.rows for c in split(Pipe(), 50, "text")] == [11, 11, 11, 1]


def test_a_csv_of_only_a_header_is_one_chunk_of_no_rows() -> None:
    (c,) = split(io.BytesIO(b"a,b\n"), 10, "csv")
    assert (c.file.read(), c.rows) == (b"a,b\n", 0)
    assert list(split(io.BytesIO(b""), 10, "csv")) == []


def test_a_header_too_long_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunking, "MAX_HEADER", 100)
    with pytest.raises(ChunkError, match="header"):
        list(split(io.BytesIO(b"x" * 500 + b"\n1\n"), 10, "csv"))


@pytest.mark.parametrize("shape", [(0,), (7,), (10, 3), (5, 2, 4)])
@pytest.mark.parametrize("target", [1, 20, 1 << 20])
def test_npy_chunks_are_arrays_of_whole_rows(shape: tuple[int, ...], target: int) -> None:
    np = pytest.importorskip("numpy")
    a = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    buf = io.BytesIO()
    np.save(buf, a)
    buf.seek(0)
    chunks = list(split(buf, target, "npy"))
    parts = [np.load(io.BytesIO(c.file.read())) for c in chunks]
    if shape[0]:
        assert np.array_equal(np.concatenate(parts), a)
    assert sum(c.rows for c in chunks) == shape[0]
    assert all(p.shape[1:] == a.shape[1:] for p in parts)
    if len(parts) > 1:  # no last chunk of a tail
        per_chunk = parts[0].shape[0]
        assert parts[-1].shape[0] > chunking.SLOP * per_chunk


def test_npy_that_cannot_be_split_by_rows_is_refused() -> None:
    np = pytest.importorskip("numpy")
    for a in (np.asfortranarray(np.ones((3, 3))), np.array(1.0), np.array([object()])):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=True)
        buf.seek(0)
        with pytest.raises(ChunkError):
            list(split(buf, 10, "npy"))
    with pytest.raises(ChunkError, match="not a .npy"):
        list(split(io.BytesIO(b"not numpy at all"), 10, "npy"))


def test_the_format_comes_from_the_name_or_is_asked_for() -> None:
    assert [guess_format(n) for n in ("a.csv", "B.TSV", "l.jsonl", "x.npy")] == [
        "csv", "csv", "text", "npy"]
    with pytest.raises(ChunkError, match="name a format"):
        guess_format("data.bin")
    with pytest.raises(ChunkError, match="unknown format"):
        list(split(io.BytesIO(b"x"), 10, "orc"))
    with pytest.raises(ChunkError, match="at least 1"):
        list(split(io.BytesIO(b"x"), 0, "text"))
