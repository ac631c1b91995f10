"""A dataset as one entry of a listing (``dsml ls -l``, ``dsml stat``; issue #15).

:func:`group_datasets` walks the master's listing (sorted keys) and folds each dataset
it meets, ``NAME/_manifest.json`` and the chunks it lists, into one
:class:`DatasetEntry`: the manifest's totals (bytes, rows, chunks) and the spread of its
chunks (the workers holding them, the copies each holds), with the chunks the manifest
lists but the listing lacks.  A manifest sorts before its parts (``_`` before ``p``),
so only the keys under one dataset's prefix are held at a time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import attrs

from ..errors import DsmlError
from . import MANIFEST, read_manifest

if TYPE_CHECKING:
    from ..client.cluster import ClusterClient


@attrs.define
class DatasetEntry:
    """A dataset, as a listing shows it."""

    name: str
    kind: str
    size: int
    rows: int
    chunks: int
    #: Copies of its chunks per worker (a chunk counts once per worker holding it).
    held: Counter[str] = attrs.field(factory=Counter)
    #: Chunks the manifest lists that the listing did not show (at their version).
    missing: int = 0
    manifest: dict[str, Any] = attrs.field(factory=dict, repr=False)

    @property
    def spread(self) -> str:
        """"12 chunks on 4 workers" (and what is missing)."""
        plural = "s" if len(self.held) != 1 else ""
        text = f"{self.chunks} chunks on {len(self.held)} worker{plural}"
        return text + (f", {self.missing} missing" if self.missing else "")

    def as_json(self) -> dict[str, Any]:
        return {"dataset": self.name, "kind": self.kind, "size": self.size,
                "rows": self.rows, "chunks": self.chunks, "workers": dict(sorted(
                    self.held.items())), "missing": self.missing,
                "source": self.manifest.get("source"),
                "created": self.manifest.get("created"),
                "header": self.manifest.get("header") or None}


def _entry(name: str, manifest: dict[str, Any]) -> DatasetEntry:
    chunks = manifest.get("chunks", [])
    return DatasetEntry(name, str(manifest.get("kind", "?")),
                        sum(int(c.get("size", 0)) for c in chunks),
                        int(manifest.get("rows", 0)), len(chunks), manifest=manifest)


def group_datasets(client: ClusterClient, listed: Iterable[Any]) -> Iterator[Any]:
    """``listed`` (the master's listing, sorted by key) with each dataset's manifest
    and chunks replaced by one :class:`DatasetEntry`, which comes before the other keys
    under its name; every other key as it was."""
    current: DatasetEntry | None = None
    parts: dict[str, int] = {}  # its chunks not yet seen: key -> version
    held: list[Any] = []  # other keys under its name, after it

    def close() -> Iterator[Any]:
        nonlocal current
        if current is not None:
            current.missing = len(parts)
            yield current
            yield from held
            current = None
            held.clear()
            parts.clear()

    for e in listed:
        if current is not None and not e.key.startswith(current.name + "/"):
            yield from close()
        if e.key.endswith("/" + MANIFEST) and current is None:
            name = e.key[: -len(MANIFEST) - 1]
            try:
                manifest = read_manifest(client, name)
            except DsmlError:
                yield e  # not a manifest this version reads: a key like any other
                continue
            current = _entry(name, manifest)
            parts = {c["key"]: c.get("version") for c in manifest.get("chunks", [])}
            continue
        if current is not None and e.key in parts:
            if parts[e.key] in (None, e.version):
                del parts[e.key]
                current.held.update(getattr(e, "replicas", ()))
                continue
        if current is not None:
            held.append(e)
        else:
            yield e
    yield from close()


def describe(client: ClusterClient, name: str) -> DatasetEntry:
    """The dataset ``name`` (``not-found`` if it has no manifest)."""
    name = name.rstrip("/")
    for e in group_datasets(client, client.list(f"{name}/")):
        if isinstance(e, DatasetEntry) and e.name == name:
            return e
    raise DsmlError(f"no dataset {name!r}", "not-found")
