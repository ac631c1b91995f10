"""The ``dsml://`` filesystem: fsspec's :class:`AbstractFileSystem` over a cluster, so
``fsspec.open("dsml://datasets/x.csv")`` and ``pandas.read_csv("dsml://...")`` work.

    fs = fsspec.filesystem("dsml")                 # the cluster of $DSML_CONFIG / etc/dsml.yaml
    fs = fsspec.filesystem("dsml", config="etc/dsml.yaml")   # or host=, port=, token=
    fs.put("runs/", "dsml://results/", recursive=True)
    pandas.read_csv("dsml://datasets/x.csv", storage_options={"config": "etc/dsml.yaml"})

Registered as the fsspec entry point ``dsml`` (pyproject.toml).  The cluster is found
with :func:`dsml.connect` from the storage options.  What a key-value store makes of
files and directories:

- A key is a file; ``/`` in keys makes pseudo-directories for listing: ``ls("datasets")``
  lists ``datasets/a.csv`` and ``datasets/sub`` when a key ``datasets/sub/...`` exists.
  A directory exists only while a key is under it: ``mkdir``/``makedirs`` do nothing,
  and no directory is ever empty.  Listing reads every key under the prefix from the
  master (its ``list`` has no delimiter).
- Reads check the sha256 and fail over between replicas, as the client does.  The
  storage protocol has no ranged read (``file_retrieve`` sends the whole file), so
  ``open(path, "rb")`` downloads the whole file once, checked, to a temporary file (in
  memory up to :data:`IN_MEMORY`) and serves seeks and ranges from it: one version,
  whatever is written meanwhile.  ``cat_file`` with a range reads the whole file too.
- ``open(path, "wb")`` writes to a temporary file and uploads it on ``close()``: the key
  becomes visible whole, or not at all (an exception in the ``with`` block, or a file
  dropped without ``close()``, uploads nothing).  ``"xb"`` and ``mode="create"`` check
  that the key does not exist first: not atomic against another writer.
- ``cp_file`` moves the bytes through this machine (there is no copy on the workers);
  ``mv`` is a copy then a delete.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import IO, Any

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from fsspec.utils import isfilelike

from .client.cluster import ClusterClient
from .errors import DsmlError

#: A file opened for reading up to this size is held in memory, a larger one on disk.
IN_MEMORY = 8 * 1024 * 1024


def _missing(path: str, e: DsmlError | None = None) -> FileNotFoundError:
    """The error fsspec and pandas expect for a key that is not there."""
    return FileNotFoundError(2, f"no key or directory {path!r} in the cluster", path)


class DsmlFileSystem(AbstractFileSystem):
    """A dsml cluster as an fsspec filesystem (see the module's docstring).

    Storage options: ``config`` (a config file), or ``host``/``port``/``token``;
    ``identity`` (the TLS user); ``timeout``; or ``client``, a :class:`ClusterClient`
    to use (it stays the caller's to close).
    """

    protocol = "dsml"
    root_marker = ""

    def __init__(
        self,
        config: str | os.PathLike[str] | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        token: str | None = None,
        identity: str | None = None,
        timeout: float | None = 60.0,
        client: ClusterClient | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if client is None:
            from . import connect

            client = connect(
                config, host=host, port=port, token=token, identity=identity,
                timeout=timeout, name="dsml-fsspec",
            )
        self.client = client

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        return str(super()._strip_protocol(path)).strip("/")

    # -- what is there ----------------------------------------------------------------

    def _file_info(self, key: str, size: int, sha256: str, version: int,
                   replicas: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
        return {"name": key, "size": size, "type": "file", "sha256": sha256,
                "version": version, "replicas": list(replicas)}

    def _located(self, path: str) -> dict[str, Any] | None:
        """The file ``path``, or None when no such key is stored."""
        try:
            loc = self.client.locate(path)
        except DsmlError as e:
            if e.code == "not-found":
                return None
            raise
        return self._file_info(path, loc.size, loc.sha256, loc.version,
                               [name for name, _ in loc.replicas])

    def _has_under(self, path: str) -> bool:
        """A key exists under ``path/`` (so ``path`` is a directory)."""
        if not path:
            return True
        return next(iter(self.client.list(path + "/", page=1)), None) is not None

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        prefix = path + "/" if path else ""
        files: list[dict[str, Any]] = []
        dirs: dict[str, dict[str, Any]] = {}
        for e in self.client.list(prefix):
            head, sep, _ = e.key[len(prefix):].partition("/")
            if not sep:
                files.append(self._file_info(e.key, e.size, e.sha256, e.version, e.replicas))
            elif head:  # (a key with an empty segment, "a//b", has no name to list)
                d = dirs.setdefault(prefix + head, {"name": prefix + head, "size": 0,
                                                    "type": "directory"})
                d["size"] += e.size
        out = sorted(files + list(dirs.values()), key=lambda d: d["name"])
        if not out and path:
            found = self._located(path)
            if found is None:
                raise _missing(path)
            out = [found]
        return out if detail else [d["name"] for d in out]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        if not path:
            return {"name": "", "size": 0, "type": "directory"}
        found = self._located(path)
        if found is not None:
            return found
        if self._has_under(path):
            return {"name": path, "size": 0, "type": "directory"}
        raise _missing(path)

    def isdir(self, path: str) -> bool:
        return self._has_under(self._strip_protocol(path))

    def isfile(self, path: str) -> bool:
        return self._located(self._strip_protocol(path)) is not None

    def exists(self, path: str, **kwargs: Any) -> bool:
        path = self._strip_protocol(path)
        return self._located(path) is not None or self._has_under(path)

    def checksum(self, path: str) -> int:
        return int(self.info(path)["sha256"][:16], 16)

    # -- directories: only as prefixes of keys ----------------------------------------

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """Nothing: a directory exists while a key is under it."""

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """Nothing: a directory exists while a key is under it."""

    def rmdir(self, path: str) -> None:
        """Nothing: a directory goes when its last key does."""

    # -- bytes ------------------------------------------------------------------------

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> bytes:
        path = self._strip_protocol(path)
        try:
            data = self.client.read(path)
        except DsmlError as e:
            if e.code == "not-found":
                raise _missing(path, e) from None
            raise
        return data if start is None and end is None else data[start:end]

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite",
                  **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        if mode == "create" and self._located(path) is not None:
            raise FileExistsError(path)
        self.client.upload(bytes(value), path)

    def put_file(self, lpath: Any, rpath: str, callback: Any = None,
                 mode: str = "overwrite", chunk: int | str | None = None,
                 format: str | None = None, **kwargs: Any) -> None:
        """Upload ``lpath`` to ``rpath``; with ``chunk`` (bytes, or "64MiB") as the
        dataset ``rpath``, split on record boundaries (``dsml upload --chunk``: see
        :mod:`dsml.datasets`; ``format`` when the name does not tell), so
        ``fs.put("games.csv", "dsml://datasets/games", chunk="64MiB")`` works."""
        rpath = self._strip_protocol(rpath)
        if mode == "create" and self._located(rpath) is not None:
            raise FileExistsError(rpath)
        if os.path.isdir(lpath):
            return  # no empty directories: its files make it
        if callback is not None:
            callback.set_size(os.path.getsize(lpath))
        if chunk is not None:
            from .config import parse_size
            from .datasets import upload_dataset

            step = None if callback is None else (lambda _n, done: callback.absolute_update(done))
            upload_dataset(self.client, os.fspath(lpath), rpath, parse_size(chunk), format, step)
            return
        progress = callback.relative_update if callback is not None else None
        self.client.upload(os.fspath(lpath), rpath, progress)

    def get_file(self, rpath: str, lpath: Any, callback: Any = None,
                 outfile: IO[bytes] | None = None, **kwargs: Any) -> None:
        rpath = self._strip_protocol(rpath)
        if outfile is None and isfilelike(lpath):
            outfile = lpath
        progress = callback.relative_update if callback is not None else None
        try:
            if outfile is not None:
                self.client.download_to(rpath, outfile, progress)
                return
            if self._located(rpath) is None and self._has_under(rpath):
                os.makedirs(lpath, exist_ok=True)
                return
            parent = os.path.dirname(os.fspath(lpath))
            if parent:
                os.makedirs(parent, exist_ok=True)
            self.client.download(rpath, lpath, progress)
        except DsmlError as e:
            if e.code == "not-found":
                raise _missing(rpath, e) from None
            raise

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        if self._located(path1) is None:
            if self._has_under(path1):
                return  # a directory: its files are copied one by one
            raise _missing(path1)
        with tempfile.TemporaryFile(prefix="dsml-copy-") as spool:
            self.client.download_to(path1, spool)
            spool.seek(0)
            self.client.upload(spool, path2)

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        try:
            self.client.delete(path)
        except DsmlError as e:
            if e.code == "not-found":
                raise _missing(path, e) from None
            raise

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        for p in reversed(self.expand_path(path, recursive=recursive, maxdepth=maxdepth)):
            try:
                self.rm_file(p)
            except FileNotFoundError:
                pass  # a pseudo-directory (nothing of its own), or removed meanwhile

    def _open(self, path: str, mode: str = "rb", block_size: Any = None,
              autocommit: bool = True, cache_options: Any = None, **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if mode == "rb":
            return DsmlReadFile(self, path, cache_options=cache_options, **kwargs)
        if mode in ("wb", "xb"):
            if mode == "xb" and self._located(path) is not None:
                raise FileExistsError(path)
            return DsmlWriteFile(self, path, block_size, autocommit, **kwargs)
        raise NotImplementedError(f"mode {mode!r}: dsml keys are read or written whole")


class DsmlReadFile(AbstractBufferedFile):
    """A key opened for reading: downloaded whole and checked once, at open, to a
    temporary file (in memory up to :data:`IN_MEMORY`); reads, seeks and ranges are
    served from it (the protocol has no ranged read)."""

    def __init__(self, fs: DsmlFileSystem, path: str, cache_options: Any = None,
                 **kwargs: Any) -> None:
        info = fs._located(path)
        if info is None:
            if fs._has_under(path):
                raise IsADirectoryError(path)
            raise _missing(path)
        spool: IO[bytes] = (io.BytesIO() if info["size"] <= IN_MEMORY
                            else tempfile.TemporaryFile(prefix="dsml-read-"))
        try:
            entry = fs.client.download_to(path, spool)
        except BaseException as e:
            spool.close()
            if isinstance(e, DsmlError) and e.code == "not-found":
                raise _missing(path, e) from None
            raise
        self._spool = spool
        kwargs.pop("cache_type", None)
        super().__init__(fs, path, "rb", block_size=IN_MEMORY, cache_type="none",
                         cache_options=cache_options, size=entry.size, **kwargs)
        self.details = {**info, "size": entry.size, "sha256": entry.sha256,
                        "version": entry.version}

    def _fetch_range(self, start: int, end: int) -> bytes:
        self._spool.seek(start)
        return self._spool.read(max(0, end - start))

    def close(self) -> None:
        super().close()
        self._spool.close()


class DsmlWriteFile(AbstractBufferedFile):
    """A key opened for writing: buffered to a temporary file, uploaded whole on
    ``close()`` (or at the transaction's commit); an exception in its ``with`` block or
    :meth:`discard` uploads nothing."""

    def __init__(self, fs: DsmlFileSystem, path: str, block_size: Any, autocommit: bool,
                 **kwargs: Any) -> None:
        kwargs.pop("cache_type", None)
        super().__init__(fs, path, "wb", block_size or "default", autocommit, **kwargs)
        self._spool: IO[bytes] | None = None

    def _initiate_upload(self) -> None:
        self._spool = tempfile.TemporaryFile(prefix="dsml-write-")

    def _upload_chunk(self, final: bool = False) -> bool:
        assert self._spool is not None
        self._spool.write(self.buffer.getbuffer())
        if final and self.autocommit:
            self.commit()
        return True

    def commit(self) -> None:
        """Upload what was written (once the file is closed, in a transaction)."""
        spool, self._spool = self._spool, None
        if spool is None:
            return
        try:
            spool.seek(0)
            self.fs.client.upload(spool, self.path)
        finally:
            spool.close()

    def discard(self) -> None:
        """Drop what was written: nothing is uploaded."""
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abandon()

    def __del__(self) -> None:
        if not self.closed:
            self._abandon()  # never close(): a file dropped unclosed uploads nothing

    def _abandon(self) -> None:
        self.discard()
        self.buffer = io.BytesIO()
        self.closed = True


__all__ = ["IN_MEMORY", "DsmlFileSystem", "DsmlReadFile", "DsmlWriteFile"]
