"""Tests for dsml.worker.store: the worker's on-disk store of files and values."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsml.worker.store import (
    ChecksumMismatch,
    DiskFull,
    IndexEntry,
    NotFound,
    Store,
    StoreError,
    TooLarge,
    WrongKind,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The store's directory (not created yet: the store creates it)."""
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> Iterator[Store]:
    """An open store under tmp_path, closed after the test."""
    s = Store(root)
    yield s
    s.close()


def sha(data: bytes) -> str:
    """Hex sha256 of data."""
    return hashlib.sha256(data).hexdigest()


def objects(root: Path) -> list[Path]:
    """Every regular file under root/objects."""
    return [p for p in (root / "objects").rglob("*") if p.is_file()]


def put_file(store: Store, key: str, *chunks: bytes) -> IndexEntry:
    """Write, prepare and commit a file made of chunks."""
    w = store.begin_file(key)
    for chunk in chunks:
        w.write(chunk)
    w.prepare()
    return w.commit()


def read_file(store: Store, key: str) -> bytes:
    """The whole content of key, through open_read."""
    _, f = store.open_read(key)
    with f:
        return f.read()


def test_value_round_trip(store: Store) -> None:
    """A value put is returned by get_value and stat with its size and sha256."""
    entry = store.put_value("k", b"hello")
    assert entry.kind == "value"
    assert entry.size == 5
    assert entry.sha256 == sha(b"hello")
    got, data = store.get_value("k")
    assert data == b"hello"
    assert got == entry
    assert store.stat("k") == entry
    _, f = store.open_read("k")
    assert f.read() == b"hello"


def test_empty_value(store: Store) -> None:
    """An empty value is a value like any other."""
    entry = store.put_value("k", b"")
    assert entry.size == 0
    assert store.get_value("k")[1] == b""


def test_overwrite_value_gets_higher_version(store: Store) -> None:
    """Writing a key again replaces it with a higher version; list shows one entry."""
    first = store.put_value("k", b"one")
    second = store.put_value("k", b"two")
    assert second.version > first.version
    assert store.get_value("k")[1] == b"two"
    assert [e.key for e in store.list()] == ["k"]
    assert store.list()[0] == second


def test_file_round_trip(store: Store, root: Path) -> None:
    """A file written in chunks reads back whole, with the right size and sha256."""
    w = store.begin_file("f")
    w.write(b"abc")
    w.write(b"defg")
    assert w.size == 7
    assert w.sha256 == sha(b"abcdefg")
    w.prepare()
    entry = w.commit(sha(b"abcdefg"))
    assert entry.kind == "file"
    assert entry.size == 7
    assert entry.sha256 == sha(b"abcdefg")
    assert store.stat("f") == entry
    assert read_file(store, "f") == b"abcdefg"
    assert len(objects(root)) == 1
    assert list((root / "tmp").iterdir()) == []


def test_empty_file(store: Store) -> None:
    """prepare() before any write gives an empty file."""
    w = store.begin_file("empty")
    w.prepare()
    entry = w.commit(sha(b""))
    assert entry.size == 0
    assert read_file(store, "empty") == b""


def test_overwriting_file_removes_old_object(store: Store, root: Path) -> None:
    """A new version of a file leaves exactly one object: the old one is unlinked."""
    put_file(store, "f", b"old")
    put_file(store, "f", b"new")
    assert len(objects(root)) == 1
    assert read_file(store, "f") == b"new"


def test_file_replaces_value_and_value_replaces_file(store: Store, root: Path) -> None:
    """Files and values share one key space: each replaces the other."""
    v1 = store.put_value("k", b"value")
    f = put_file(store, "k", b"file")
    assert f.version > v1.version
    assert store.stat("k").kind == "file"
    with pytest.raises(WrongKind):
        store.get_value("k")
    v2 = store.put_value("k", b"value again")
    assert v2.version > f.version
    assert store.get_value("k")[1] == b"value again"
    assert objects(root) == []
    assert store.count == 1


def test_versions_increase_across_delete_and_reopen(root: Path) -> None:
    """Versions never repeat: not after deleting the newest key, nor after a restart."""
    s = Store(root)
    a = s.put_value("a", b"1")
    b = s.put_value("b", b"2")
    s.delete("b")  # the highest version is now in no row
    c = s.put_value("c", b"3")
    assert a.version < b.version < c.version
    s.delete("c")
    s.close()
    s = Store(root)
    d = s.put_value("d", b"4")
    assert d.version > c.version
    e = put_file(s, "e", b"5")
    s.close()
    s = Store(root)
    assert s.put_value("a", b"6").version > e.version
    s.close()


def test_abort_leaves_nothing(store: Store, root: Path) -> None:
    """abort() removes the temp file and creates no entry, before or after prepare."""
    w = store.begin_file("k")
    w.write(b"data")
    w.abort()
    w.abort()  # idempotent
    w2 = store.begin_file("k2")
    w2.write(b"data")
    w2.prepare()
    w2.abort()
    assert list((root / "tmp").iterdir()) == []
    assert objects(root) == []
    assert store.count == 0
    with pytest.raises(NotFound):
        store.stat("k")
    with pytest.raises(ValueError):
        w.write(b"more")


def test_write_after_commit_raises(store: Store) -> None:
    """A committed writer accepts no more writes, and abort() no longer touches its file."""
    w = store.begin_file("k")
    w.write(b"data")
    w.prepare()
    w.commit()
    with pytest.raises(ValueError):
        w.write(b"more")
    w.abort()
    assert read_file(store, "k") == b"data"


def test_checksum_mismatch_keeps_previous_version(store: Store, root: Path) -> None:
    """A wrong expected sha256 raises, removes the new object and keeps the old version."""
    old = put_file(store, "k", b"old")
    w = store.begin_file("k")
    w.write(b"corrupted")
    w.prepare()
    with pytest.raises(ChecksumMismatch) as info:
        w.commit(sha(b"what the sender meant"))
    assert info.value.code == "checksum-mismatch"
    assert "'k'" in info.value.message
    assert store.stat("k") == old
    assert read_file(store, "k") == b"old"
    assert len(objects(root)) == 1


def test_recovery_removes_tmp_and_orphans(root: Path) -> None:
    """Reopening after a crash empties tmp/, removes unindexed objects, keeps committed data."""
    s = Store(root)
    s.put_value("v", b"value")
    put_file(s, "f", b"file")
    w = s.begin_file("prepared-not-committed")  # crash between rename and commit
    w.write(b"lost")
    w.prepare()
    s.begin_file("half-written").write(b"partial")  # crash mid-upload
    s.close()
    (root / "tmp" / "stray").write_bytes(b"junk")
    (root / "tmp" / "straydir").mkdir()
    (root / "objects" / "ab" / "orphan").write_bytes(b"junk")
    assert len(objects(root)) == 3

    s = Store(root)
    assert s.recovered.tmp_removed == 3
    assert s.recovered.orphans_removed == 2
    assert s.recovered.missing_objects == 0
    assert list((root / "tmp").iterdir()) == []
    assert len(objects(root)) == 1
    assert s.get_value("v")[1] == b"value"
    assert read_file(s, "f") == b"file"
    assert s.count == 2
    with pytest.raises(NotFound):
        s.stat("prepared-not-committed")
    s.close()


def test_recovery_drops_rows_whose_object_is_gone(root: Path) -> None:
    """A row whose object vanished is dropped on open, and its version is not reused."""
    s = Store(root)
    e = put_file(s, "f", b"file")
    s.close()
    (path,) = objects(root)
    path.unlink()
    s = Store(root)
    assert s.recovered.missing_objects == 1
    assert s.count == 0
    with pytest.raises(NotFound):
        s.stat("f")
    s.close()
    s = Store(root)
    assert s.put_value("x", b"").version > e.version
    s.close()


PATH_LIKE_KEYS = [
    "../../etc/passwd",
    "/etc/passwd",
    "a/../../b",
    "..",
    ".",
    "a/b/c",
    "./x",
    "~",
    "\\..\\windows",
    "ключ/日本語/🙂",
    "k" * 1024,
    "é" * 512,  # 1024 UTF-8 bytes
]


def test_path_like_keys_stay_inside_root(tmp_path: Path, root: Path) -> None:
    """Keys that look like paths are ordinary keys: every file lands inside root."""
    before = sorted(os.listdir(tmp_path.parent))
    s = Store(root)
    for i, key in enumerate(PATH_LIKE_KEYS):
        put_file(s, key, key.encode())
        s.put_value(key + "#v", b"%d" % i)
    for key in PATH_LIKE_KEYS:
        assert read_file(s, key) == key.encode()
        assert s.stat(key).key == key
    assert s.count == 2 * len(PATH_LIKE_KEYS)
    s.close()

    resolved_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name).resolve()
            assert path.is_relative_to(resolved_root), path
    assert os.listdir(tmp_path) == ["store"]
    assert sorted(os.listdir(tmp_path.parent)) == before
    assert not (root / ".." / ".." / "etc").exists()
    assert not (root / "a").exists()


def test_value_too_large(root: Path) -> None:
    """A value over value_max raises TooLarge and stores nothing; value_max itself fits."""
    s = Store(root, value_max=10)
    s.put_value("k", b"x" * 10)
    with pytest.raises(TooLarge) as info:
        s.put_value("k", b"x" * 11)
    assert info.value.code == "too-large"
    assert isinstance(info.value, StoreError)
    assert s.get_value("k")[1] == b"x" * 10
    s.close()


def test_get_value_on_file_is_wrong_kind(store: Store) -> None:
    """get_value refuses a key holding a file; open_read serves it."""
    put_file(store, "f", b"data")
    with pytest.raises(WrongKind) as info:
        store.get_value("f")
    assert info.value.code == "wrong-kind"
    assert info.value.message == "key 'f' holds a file, not a value"


def test_missing_key_is_not_found(store: Store) -> None:
    """Every read and delete of an absent key raises NotFound naming the key."""
    for op in (store.stat, store.get_value, store.open_read, store.delete):
        with pytest.raises(NotFound) as info:
            op("nope")
        assert info.value.code == "not-found"
        assert "'nope'" in info.value.message


def test_list_prefix_after_limit(store: Store) -> None:
    """list filters by prefix, starts after `after`, stops at limit, in UTF-8 byte order."""
    keys = ["a", "a/1", "a/2", "a/3", "ab", "b", "é", "é/x", "日本", "日本語", "🙂", "\U0010ffff"]
    for k in reversed(keys):
        store.put_value(k, b"")

    def names(prefix: str = "", after: str | None = None, limit: int = 1000) -> list[str]:
        return [e.key for e in store.list(prefix, after, limit)]

    assert names() == sorted(keys, key=str.encode)
    assert names() == keys  # the list above is already in UTF-8 byte order
    assert names("a") == ["a", "a/1", "a/2", "a/3", "ab"]
    assert names("a/") == ["a/1", "a/2", "a/3"]
    assert names("a/", after="a/1") == ["a/2", "a/3"]
    assert names("a/", after="a/3") == []
    assert names("a/", after="0") == ["a/1", "a/2", "a/3"]  # after before the prefix
    assert names("a/", after="b") == []  # after beyond the prefix
    assert names("a", limit=2) == ["a", "a/1"]
    assert names("a", limit=0) == []
    assert names(after="é") == ["é/x", "日本", "日本語", "🙂", "\U0010ffff"]
    assert names("é") == ["é", "é/x"]
    assert names("日本") == ["日本", "日本語"]
    assert names("\U0010ffff") == ["\U0010ffff"]
    assert names("zz") == []


def test_list_prefix_ending_in_max_code_point(store: Store) -> None:
    """A prefix ending in U+10FFFF (which has no successor) still bounds the range."""
    top = "\U0010ffff"
    keys = ["a" + top, "a" + top + "x", "a" + top + top, "b", top, top + "a"]
    for k in keys:
        store.put_value(k, b"")
    assert [e.key for e in store.list("a" + top)] == ["a" + top, "a" + top + "x", "a" + top + top]
    assert [e.key for e in store.list(top)] == [top, top + "a"]
    assert [e.key for e in store.list("\ud7ff")] == []  # its successor skips the surrogates
    store.put_value("\ud7ff!", b"")
    store.put_value("\ue000", b"")
    assert [e.key for e in store.list("\ud7ff")] == ["\ud7ff!"]


def test_list_uses_primary_key_range(store: Store) -> None:
    """list searches the primary key by range rather than scanning the table."""
    from dsml.worker import store as store_module

    for sql in store_module._LIST.values():
        params = ("a", "b", 10) if "key < ?" in sql else ("a", 10)
        plan = " ".join(row[-1] for row in store._db.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert "SEARCH" in plan and "SCAN" not in plan, plan


def test_inventory_lists_everything(store: Store) -> None:
    """inventory yields every entry, across several pages."""
    for i in range(2500):
        store.put_value(f"k{i:05d}", b"")
    keys = [e.key for e in store.inventory()]
    assert keys == [f"k{i:05d}" for i in range(2500)]


def test_delete_removes_object(store: Store, root: Path) -> None:
    """delete returns the entry it removed and unlinks the file's object."""
    entry = put_file(store, "f", b"data")
    assert store.delete("f") == entry
    assert objects(root) == []
    with pytest.raises(NotFound):
        store.stat("f")
    with pytest.raises(NotFound):
        store.delete("f")


def test_values_and_files_survive_reopen(root: Path) -> None:
    """Committed values and files, with their entries, are all there after reopening."""
    s = Store(root)
    v = s.put_value("v", b"\x00binary\xff")
    f = put_file(s, "f", b"file data")
    s.close()
    s = Store(root)
    assert s.recovered.tmp_removed == s.recovered.orphans_removed == 0
    assert s.get_value("v") == (v, b"\x00binary\xff")
    assert s.stat("f") == f
    assert read_file(s, "f") == b"file data"
    assert (s.count, s.stored_bytes) == (2, v.size + f.size)
    s.close()


def test_large_file_in_chunks(store: Store) -> None:
    """A 20 MiB file written in 1 MiB chunks keeps its size and sha256."""
    chunks = [bytes([i]) * (1 << 20) for i in range(20)]
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    entry = put_file(store, "big", *chunks)
    assert entry.size == 20 << 20
    assert entry.sha256 == h.hexdigest()
    _, f = store.open_read("big")
    with f:
        h2 = hashlib.sha256()
        while block := f.read(1 << 20):
            h2.update(block)
    assert h2.hexdigest() == entry.sha256


def test_count_and_stored_bytes(root: Path) -> None:
    """count and stored_bytes follow puts, overwrites, kind changes and deletes."""
    s = Store(root)
    assert (s.count, s.stored_bytes) == (0, 0)
    s.put_value("a", b"12345")
    assert (s.count, s.stored_bytes) == (1, 5)
    s.put_value("a", b"12")
    assert (s.count, s.stored_bytes) == (1, 2)
    put_file(s, "b", b"x" * 100)
    assert (s.count, s.stored_bytes) == (2, 102)
    put_file(s, "a", b"y" * 10)
    assert (s.count, s.stored_bytes) == (2, 110)
    s.delete("b")
    assert (s.count, s.stored_bytes) == (1, 10)
    s.close()
    s = Store(root)
    assert (s.count, s.stored_bytes) == (1, 10)
    s.close()


def test_open_handle_survives_overwrite(store: Store) -> None:
    """An open read handle keeps reading the old content after the key is overwritten."""
    put_file(store, "f", b"old content")
    _, f = store.open_read("f")
    with f:
        assert f.read(4) == b"old "
        put_file(store, "f", b"new content")
        store.delete("f")
        assert f.read() == b"content"


def test_disk_full_on_write_cleans_up(store: Store, root: Path) -> None:
    """ENOSPC while writing raises DiskFull and the writer removes its temp file.

    /dev/full is a real device that fails every write with ENOSPC.
    """
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    w = store.begin_file("k")
    w._file.close()
    w._file = open("/dev/full", "wb", buffering=0)
    with pytest.raises(DiskFull) as info:
        w.write(b"x" * 100)
    assert info.value.code == "disk-full"
    assert list((root / "tmp").iterdir()) == []
    w.abort()  # still safe
    with pytest.raises(ValueError):
        w.write(b"x")
    assert store.count == 0


def test_disk_full_on_prepare_cleans_up(store: Store, root: Path) -> None:
    """ENOSPC surfacing only at flush time (in prepare) also raises DiskFull and cleans up."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    w = store.begin_file("k")
    w._file.close()
    w._file = open("/dev/full", "wb")  # buffered: the small write only fails on flush
    w.write(b"x" * 100)
    with pytest.raises(DiskFull):
        w.prepare()
    assert list((root / "tmp").iterdir()) == []
    assert objects(root) == []
    w.abort()


def test_prepare_in_a_thread(store: Store) -> None:
    """prepare() runs in another thread (as the worker does with deferToThread)."""
    import threading

    w = store.begin_file("k")
    w.write(b"threaded")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            w.prepare()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors == []
    assert w.commit(sha(b"threaded")).size == 8
    assert read_file(store, "k") == b"threaded"


def test_commit_before_prepare_raises(store: Store, root: Path) -> None:
    """commit() needs prepare() first; the writer can still be aborted cleanly."""
    w = store.begin_file("k")
    w.write(b"x")
    with pytest.raises(ValueError):
        w.commit()
    w.abort()
    assert list((root / "tmp").iterdir()) == []
    assert store.count == 0


# -- the values log ------------------------------------------------------------------


def log_path(root: Path) -> Path:
    """The store's values log."""
    return root / "values.log"


def index_row(store: Store, key: str) -> tuple[object, ...] | None:
    """The key's row in SQLite itself (kind, size, version), bypassing the overlay."""
    return store._db.execute(
        "SELECT kind, size, version FROM entries WHERE key = ?", (key,)
    ).fetchone()


def crash(store: Store) -> None:
    """Drop a store as kill -9 would: close its index and log fds without flushing."""
    store._closed = True
    os.close(store._log_fd)
    store._db.close()


def test_pending_put_is_read_before_flush(root: Path) -> None:
    """A put lands in the log, not SQLite; get_value, stat and open_read see it at once."""
    s = Store(root)
    entry = s.put_value("k", b"pending")
    assert index_row(s, "k") is None
    assert log_path(root).stat().st_size > 0
    assert s.get_value("k") == (entry, b"pending")
    assert s.stat("k") == entry
    got, f = s.open_read("k")
    assert (got, f.read()) == (entry, b"pending")
    s.flush()
    assert index_row(s, "k") == ("value", 7, entry.version)
    assert log_path(root).stat().st_size == 0
    assert s.get_value("k") == (entry, b"pending")
    s.close()


def test_count_and_stored_bytes_with_pending_puts(root: Path) -> None:
    """count and stored_bytes stay exact through pending puts, overwrites, kind changes
    and deletes, and agree with the index after a flush and a reopen."""
    s = Store(root)
    s.put_value("a", b"12345")
    s.put_value("b", b"1")
    assert (s.count, s.stored_bytes) == (2, 6)
    s.put_value("a", b"12")  # pending over pending
    assert (s.count, s.stored_bytes) == (2, 3)
    s.flush()
    s.put_value("a", b"1234")  # pending over a flushed value
    assert (s.count, s.stored_bytes) == (2, 5)
    put_file(s, "a", b"x" * 10)  # a file over a pending value
    assert (s.count, s.stored_bytes) == (2, 11)
    s.put_value("a", b"123")  # a value over a file
    assert (s.count, s.stored_bytes) == (2, 4)
    assert objects(root) == []
    s.put_value("c", b"12")
    s.delete("c")  # delete of a pending value
    assert (s.count, s.stored_bytes) == (2, 4)
    with pytest.raises(NotFound):
        s.stat("c")
    s.flush()
    assert s._db.execute("SELECT count(*), total(size) FROM entries").fetchone() == (2, 4.0)
    s.put_value("d", b"")
    s.close()
    s = Store(root)
    assert (s.count, s.stored_bytes) == (3, 4)
    s.close()


def test_value_over_file_unlinks_object_after_commit(store: Store, root: Path) -> None:
    """A value replacing a file unlinks the file's object only once the value's row
    is committed to the index (not merely in the log)."""
    put_file(store, "k", b"file")
    store.put_value("other", b"pending")  # flushed first, in order
    seen: list[tuple[object, ...] | None] = []
    unlink = store._unlink_object

    def spy(name: str) -> None:
        seen.append(index_row(store, "k"))
        assert not store._db.in_transaction
        unlink(name)

    store._unlink_object = spy  # type: ignore[method-assign]
    entry = store.put_value("k", b"value")
    assert seen == [("value", 5, entry.version)]
    assert objects(root) == []
    assert index_row(store, "other") is not None


def test_automatic_flush(root: Path) -> None:
    """The overlay is applied once the log holds flush_every records or flush_bytes bytes."""
    s = Store(root, flush_every=3)
    s.put_value("a", b"1")
    s.put_value("a", b"2")
    assert index_row(s, "a") is None
    e = s.put_value("b", b"3")
    assert index_row(s, "b") == ("value", 1, e.version)
    assert log_path(root).stat().st_size == 0
    s.close()
    s = Store(root, flush_bytes=10)
    s.put_value("c", b"123456789")
    assert index_row(s, "c") is None
    s.put_value("d", b"1")
    assert index_row(s, "c") is not None and index_row(s, "d") is not None
    s.close()


def test_list_and_inventory_include_pending_puts(store: Store) -> None:
    """list and inventory flush first, so pending puts are listed, with their entries."""
    e = store.put_value("b", b"1")
    assert store.list() == [e]
    f = store.put_value("a", b"2")
    assert list(store.inventory()) == [f, e]


def test_close_flushes(root: Path) -> None:
    """close applies pending puts and empties the log: the next open replays nothing."""
    s = Store(root)
    e = s.put_value("k", b"v")
    s.close()
    s.close()  # idempotent
    assert log_path(root).stat().st_size == 0
    s = Store(root)
    assert s.recovered.log_records_replayed == 0
    assert s.get_value("k") == (e, b"v")
    s.close()


_CRASH_SCRIPT = """
import json, os, sys
from dsml.worker.store import Store

s = Store(sys.argv[1])
s.put_value("a", b"first")
s.put_value("b", b"kept")
w = s.begin_file("f")  # a file commit flushes the two puts above
w.write(b"file")
w.prepare()
w.commit()
s.put_value("a", b"second")  # these stay in the log
s.put_value("c", b"")
s.put_value("c", b"third")
entries = [s.stat(k) for k in ("a", "b", "c", "f")]
print(json.dumps([[e.key, e.kind, e.size, e.sha256, e.version, e.mtime] for e in entries]))
sys.stdout.flush()
os._exit(0)
"""


def test_kill_keeps_pending_puts(root: Path) -> None:
    """A process that dies without closing loses no acknowledged put: the next open
    replays the log, with the versions and mtimes the puts returned, and issues no
    version again."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, str(root)],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    before = [IndexEntry(*row) for row in json.loads(out)]
    assert log_path(root).stat().st_size > 0
    s = Store(root)
    assert s.recovered.log_records_replayed == 3
    assert s.recovered.log_bytes_dropped == 0
    assert log_path(root).stat().st_size == 0
    assert [s.stat(k) for k in ("a", "b", "c", "f")] == before
    assert s.get_value("a")[1] == b"second"
    assert s.get_value("c")[1] == b"third"
    assert index_row(s, "c") is not None  # in the index now, not only in memory
    assert (s.count, s.stored_bytes) == (4, 6 + 4 + 5 + 4)
    top = max(e.version for e in before)
    assert s.last_version == top
    assert s.put_value("d", b"").version > top
    s.close()


@pytest.mark.parametrize("damage", ["cut", "garbage", "bad-crc"])
def test_torn_log_tail_is_dropped(root: Path, damage: str) -> None:
    """Replay stops at the first short or corrupt record, cuts it off and keeps the ones
    before it; ``recovered`` counts both."""
    s = Store(root)
    a = s.put_value("a", b"one")
    size_a = log_path(root).stat().st_size
    b = s.put_value("b", b"two")
    size_ab = log_path(root).stat().st_size
    s.put_value("c", b"three")
    crash(s)
    log = log_path(root).read_bytes()
    if damage == "cut":  # the last write was cut short
        log_path(root).write_bytes(log[:-3])
        kept, dropped = 2, len(log) - 3 - size_ab
    elif damage == "garbage":
        log_path(root).write_bytes(log + b"garbage!" * 10)
        kept, dropped = 3, 80
    else:  # one byte of b's value flipped: b and everything after it goes
        damaged = bytearray(log)
        damaged[size_ab - 1] ^= 0xFF
        log_path(root).write_bytes(bytes(damaged))
        kept, dropped = 1, len(log) - size_a
    s = Store(root)
    assert (s.recovered.log_records_replayed, s.recovered.log_bytes_dropped) == (kept, dropped)
    assert log_path(root).stat().st_size == 0
    assert s.get_value("a") == (a, b"one")
    if kept >= 2:
        assert s.get_value("b") == (b, b"two")
    else:
        with pytest.raises(NotFound):
            s.stat("b")
    assert [e.key for e in s.list()] == ["a", "b", "c"][:kept]
    assert s.count == kept
    s.close()


def test_replay_never_overwrites_newer_rows(root: Path) -> None:
    """Records a flush already applied (a crash between its commit and the log's
    truncation) replay harmlessly: they never replace a newer row, value or file."""
    s = Store(root)
    s.put_value("v", b"old")
    s.put_value("f", b"old value")
    s.put_value("same", b"same")
    old_records = log_path(root).read_bytes()
    s.flush()
    v = s.put_value("v", b"new")
    put_file(s, "f", b"new file")
    s.put_value("pending", b"p")
    crash(s)
    pending = log_path(root).read_bytes()
    # The flushed records again, then the pending one, as if truncation never happened.
    log_path(root).write_bytes(old_records + pending)
    s = Store(root)
    assert s.recovered.log_records_replayed == 4
    assert s.recovered.orphans_removed == 0
    assert s.get_value("v") == (v, b"new")
    assert read_file(s, "f") == b"new file"
    assert s.get_value("same")[1] == b"same"
    assert s.get_value("pending")[1] == b"p"
    assert len(objects(root)) == 1
    assert (s.count, s.stored_bytes) == (4, 3 + 8 + 4 + 1)
    s.close()


def test_versions_not_reused_after_crash_with_pending_puts(root: Path) -> None:
    """The highest versions may exist only in the log; reopening still never reissues them,
    even when a delete came between."""
    s = Store(root)
    s.put_value("a", b"1")
    s.delete("a")
    b = s.put_value("b", b"2")
    c = s.put_value("c", b"3")
    crash(s)
    s = Store(root)
    assert s.last_version == c.version > b.version
    assert s.put_value("d", b"").version > c.version
    s.close()


def test_failed_append_stores_nothing(store: Store, root: Path) -> None:
    """A put whose log write fails (ENOSPC from /dev/full) raises DiskFull and changes
    nothing; the log keeps only whole records."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    e = store.put_value("k", b"old")
    real_fd = store._log_fd
    store._log_fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(DiskFull):
            store.put_value("k", b"new")
        with pytest.raises(DiskFull):
            store.put_value("k2", b"new")
    finally:
        os.close(store._log_fd)
        store._log_fd = real_fd
    assert store.get_value("k") == (e, b"old")
    assert (store.count, store.stored_bytes) == (1, 3)
    with pytest.raises(NotFound):
        store.stat("k2")
    assert store.put_value("k", b"new").version > e.version


def test_sync(store: Store) -> None:
    """sync works with puts pending and after a flush, and changes no content."""
    e = store.put_value("k", b"v")
    store.sync()
    store.flush()
    store.sync()
    store.sync()
    assert store.get_value("k") == (e, b"v")


def test_writes_take_the_version_they_are_given(store: Store) -> None:
    """A cluster write carries the master's version: values and files store it as is,
    and the store's own counter moves past it."""
    assert store.put_value("v", b"x", version=40).version == 40
    w = store.begin_file("f", version=41)
    w.write(b"data")
    w.prepare()
    assert w.commit().version == 41
    assert store.stat("f").version == 41
    assert store.put_value("other", b"y").version == 42


def test_an_older_version_never_replaces_a_newer_one(store: Store) -> None:
    """A late replica of an old write is refused (Stale) and the newer data stays;
    the same version again is accepted (a retried copy)."""
    from dsml.worker.store import Stale

    store.put_value("k", b"new", version=10)
    with pytest.raises(Stale) as e:
        store.put_value("k", b"old", version=9)
    assert e.value.code == "stale-version"
    assert store.get_value("k")[1] == b"new"
    w = store.begin_file("k", version=8)
    w.write(b"old file")
    w.prepare()
    with pytest.raises(Stale):
        w.commit()
    assert store.get_value("k")[1] == b"new"
    assert list((store.root / "tmp").iterdir()) == []
    assert store.put_value("k", b"new", version=10).version == 10
    store.flush()
    assert store.get_value("k")[0].version == 10


def test_value_cache_never_serves_a_stale_value(store: Store) -> None:
    """Hot values are served from memory, and every kind of write of the key (a put, a
    file, a delete) replaces or drops the cached copy: reads always see the last write."""
    store.put_value("k", b"one")
    store.flush()
    assert store.get_value("k")[1] == b"one"  # now cached
    store.put_value("k", b"two")
    store.flush()
    assert store.get_value("k")[1] == b"two"
    w = store.begin_file("k")
    w.write(b"a file")
    w.prepare()
    w.commit()
    with pytest.raises(WrongKind):
        store.get_value("k")
    store.put_value("k", b"three")
    store.flush()
    assert store.get_value("k")[1] == b"three"
    store.delete("k")
    with pytest.raises(NotFound):
        store.get_value("k")
    store.cache_max = 64
    for i in range(20):
        store.put_value(f"e{i}", b"x" * 8)
    assert store._cache_bytes <= 64
    store.flush()
    assert [store.get_value(f"e{i}")[1] for i in range(20)] == [b"x" * 8] * 20
