"""Where a new write goes: the pipeline order of live workers for a key
(:meth:`dsml.master.directory.Directory.place` checks and cuts it to the factor).

Workers that already hold a copy of the key come first (the write replaces it in
place; among them most free disk, fewest stored bytes, name).  The others come by free
disk in :data:`DISK_CLASSES` classes of the most any has (an eighth of it apart:
workers on disks alike, or on one disk, are one class), then fewest stored bytes (the
caller counts what it placed since the last report), then the key's rendezvous rank
(:func:`rank`): the keys of a burst (a dataset's chunks) spread evenly over the
workers of the first class rather than all going to whichever reported a few more
bytes free (measured: 14 chunks, 4 workers, 2 copies each: 14/8/6/0 before, 7/7/7/7).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from typing import Any

import attrs

#: Classes of free disk (see the module docstring).
DISK_CLASSES = 8


@attrs.frozen
class WorkerLoad:
    """What placement needs to know of a live worker."""

    free_disk: int
    stored_bytes: int


def rank(key: str, worker: str) -> bytes:
    """Rendezvous-hash rank of ``worker`` for ``key``: spreads keys over workers."""
    return hashlib.blake2b(f"{key}\0{worker}".encode(), digest_size=8).digest()


def pipeline_order(key: str, fits: list[str], live: Mapping[str, WorkerLoad],
                   holders: Collection[str]) -> list[str]:
    """``fits`` (live workers with room) in pipeline order for a write of ``key``."""
    most = max(live[w].free_disk for w in fits) or 1

    def order(w: str) -> tuple[Any, ...]:
        load = live[w]
        if w in holders:
            return (0, -load.free_disk, load.stored_bytes, w)
        return (1, (most - load.free_disk) * DISK_CLASSES // most, load.stored_bytes,
                rank(key, w))

    return sorted(fits, key=order)
