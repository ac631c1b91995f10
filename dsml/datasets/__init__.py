"""Datasets: a file stored as chunks split on record boundaries, with a manifest (#15).

A dataset ``NAME`` is the keys ``NAME/part-00000.csv``, ``NAME/part-00001.csv``, ...
(each a whole file: a CSV chunk with the header, a text chunk, an ``.npy`` of rows, a
Parquet file of whole row groups; see :mod:`.chunking`) and ``NAME/_manifest.json``,
written last: a dataset is there once its manifest is, with exactly the chunks it lists.
So a reader that finds the manifest finds every chunk at the version it names;
``dsml://NAME/part-*.csv`` is also what pandas or Dask read as a directory of parts.

The manifest (:data:`MANIFEST_FORMAT`): the format (``csv``, ``text``, ``npy``,
``parquet``), the source's name and size, the header (CSV), the column names (CSV and
Parquet), the total rows and, per chunk, its key, size, rows, sha256 and version.  An
upload over an existing dataset replaces it: the new manifest is written, then parts it
does not list are deleted.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DsmlError
from .chunking import ChunkError, guess_format, split
from .reduce import FAN_IN, tree_reduce

if TYPE_CHECKING:
    from ..client.cluster import ClusterClient

#: The manifest's format; a reader refuses another.
MANIFEST_FORMAT = 1
MANIFEST = "_manifest.json"
#: The default chunk size (bytes).
DEFAULT_CHUNK = 64 << 20
_EXT = {"csv": ".csv", "text": ".txt", "npy": ".npy", "parquet": ".parquet"}

__all__ = ["DEFAULT_CHUNK", "FAN_IN", "MANIFEST", "ChunkError", "chunk_locality",
           "manifest_key", "map_chunks", "read_manifest", "tree_reduce", "upload_dataset"]


def manifest_key(name: str) -> str:
    return f"{name.rstrip('/')}/{MANIFEST}"


def upload_dataset(client: ClusterClient, source: str | os.PathLike[str], name: str,
                   chunk: int = DEFAULT_CHUNK, fmt: str | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Split the file ``source`` into chunks of about ``chunk`` bytes on record
    boundaries, upload each as ``NAME/part-NNNNN.EXT``, then the manifest; returns it.
    ``progress(chunks, bytes)`` after each chunk.  ``source`` may be a URL fsspec
    opens (``s3://bucket/games.csv``, ``https://...``): it is streamed as a file is."""
    name = name.rstrip("/")
    if not name:
        raise DsmlError("a dataset needs a name", "bad-key")
    url = isinstance(source, str) and "://" in source
    base = source.rstrip("/").rsplit("/", 1)[-1] if url else Path(source).name  # type: ignore[union-attr]
    fmt = fmt or guess_format(base)
    ext = _EXT.get(fmt, "")
    chunks: list[dict[str, Any]] = []
    header = ""
    names: list[str] | None = None
    with _open_source(source, url) as src:
        size = getattr(src, "size", None) if url else os.fstat(src.fileno()).st_size
        if fmt == "parquet":
            from .parquet import columns

            names = columns(src)
        for i, c in enumerate(split(src, chunk, fmt)):
            key = f"{name}/part-{i:05d}{ext}"
            with c.file:
                if fmt == "csv" and i == 0:
                    header = _header_of(c.file)
                    names = next(csv.reader([header]), [])
                stored = client.upload(c.file, key)
            if stored.sha256 != c.sha256 or stored.size != c.size:
                raise DsmlError(f"chunk {key!r} was stored as {stored.size} bytes, sha256 "
                                f"{stored.sha256}; {c.size} bytes, {c.sha256} were sent",
                                "checksum")
            chunks.append({"key": key, "size": c.size, "rows": c.rows, "sha256": c.sha256,
                           "version": stored.version})
            if progress is not None:
                progress(len(chunks), sum(x["size"] for x in chunks))
    manifest = {
        "format": MANIFEST_FORMAT, "kind": fmt, "source": base,
        "source_size": size,
        "header": header,
        **({"columns": names} if names is not None else {}),
        "rows": sum(x["rows"] for x in chunks), "chunks": chunks, "created": time.time(),
    }
    client.upload(json.dumps(manifest, indent=1).encode(), manifest_key(name))
    listed = {x["key"] for x in chunks} | {manifest_key(name)}
    for k in client.list(f"{name}/"):
        if k.key not in listed and k.key.startswith(f"{name}/part-"):
            client.delete(k.key)  # a part of the dataset this upload replaced
    return manifest


def _open_source(source: str | os.PathLike[str], url: bool) -> Any:
    if not url:
        return open(source, "rb")
    import fsspec

    return fsspec.open(str(source), "rb").open()


def read_manifest(client: ClusterClient, name: str) -> dict[str, Any]:
    """The manifest of dataset ``name`` (``not-found`` if it has none)."""
    data = client.read(manifest_key(name))
    try:
        manifest = json.loads(data)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DsmlError(f"{manifest_key(name)!r} is not a dataset manifest of format "
                        f"{MANIFEST_FORMAT}", "bad-manifest")
    return manifest


def map_chunks(client: ClusterClient, fn: Callable[..., Any], dataset: str, *args: Any,
               resources: dict[str, Any] | None = None,
               reduce: Callable[[Any, Any], Any] | None = None,
               fan_in: int = FAN_IN) -> Any:
    """``fn(path, *args)`` for each chunk of ``dataset``, ``path`` the chunk's local copy
    on the worker that runs it: ONE job of one task per chunk, each chunk a task input,
    so the master offers the task first to a worker that holds the chunk (which links it
    from its own store, no network copy).  A future per chunk, in the manifest's order
    (each with ``chunk_key``); see :func:`chunk_locality`.

    With ``reduce`` (an associative function of two results): ONE future, of the
    results folded in the manifest's order by a tree of reduce jobs on the cluster, each
    task folding at most ``fan_in`` (see :mod:`.reduce`); its ``map_futures`` are the
    chunks' (resolving to None; for :func:`chunk_locality`), its ``jobs`` the ids."""
    from ..fnrun import Key

    keys = [c["key"] for c in read_manifest(client, dataset)["chunks"]]
    n = len(keys)
    if reduce is not None:
        root = tree_reduce(client, fn, [(Key(k), *args) for k in keys], reduce,
                           fan_in=fan_in, resources=resources,
                           name=f"{getattr(fn, '__qualname__', 'fn')} {dataset}")
        for f, key in zip(root.map_futures, keys, strict=True):  # type: ignore[attr-defined]
            f.chunk_key = key
        return root
    futures = client.map(fn, [Key(k) for k in keys], *[[a] * n for a in args],
                         resources=resources, batch_size=1)
    for f, key in zip(futures, keys, strict=True):
        f.chunk_key = key  # type: ignore[attr-defined]
    return futures


def chunk_locality(client: ClusterClient, futures: list[Future[Any]]) -> float:
    """The fraction of :func:`map_chunks` calls whose successful attempt the master
    started on a worker holding its chunk (its scheduler's record: each attempt's
    ``local``; 1.0 for none)."""
    statuses: dict[str, dict[str, Any]] = {}
    local = counted = 0
    for f in futures:
        job_id, task, key = (getattr(f, a, None) for a in ("job_id", "task", "chunk_key"))
        if job_id is None or key is None:
            continue
        if job_id not in statuses:
            statuses[job_id] = client.job_status(job_id)
        tasks = statuses[job_id]["tasks"]
        ran = [a for a in tasks[task]["attempts"] if a["state"] == "succeeded"]
        if not ran:
            continue
        counted += 1
        local += bool(ran[-1].get("local"))
    return local / counted if counted else 1.0


def _header_of(f: Any) -> str:
    """The first line of a CSV chunk (its header), for the manifest; rewinds ``f``."""
    line = f.readline(1 << 20)
    f.seek(0)
    return bytes(line).decode("utf-8", errors="replace").rstrip("\r\n")
