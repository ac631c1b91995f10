"""The digest of a worker's inventory, which both sides compute (no I/O, no Twisted).

A worker registers with its whole inventory (JSON lines of ``{key, size, sha256,
version}``) and, beside it, ``Inventory-Digest``: 16 hex digits of
:func:`inventory_digest`.  A master that kept the digest of what it last recorded for
that worker, and finds it unchanged, skips parsing and reconciling the inventory (a
crowd of workers re-registering after a master restart then costs a lookup each).

The digest is the XOR of a 64-bit blake2b of each entry, so order does not matter and
one entry more, less or changed updates it in O(1).  It guards against accidents, not
against a worker that lies on purpose (such a worker could lie in its inventory too:
what it claims is checked where it is used, see docs/protocol.md "Trust").
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

#: The header, and the form of its value.
HEADER = "Inventory-Digest"
HEX_DIGITS = 16


def entry_digest(key: str, size: int, sha256: str, version: int) -> int:
    """One inventory entry's share of :func:`inventory_digest` (64 bits)."""
    return int.from_bytes(
        hashlib.blake2b(f"{key}\0{size}\0{sha256}\0{version}".encode(), digest_size=8).digest(),
        "little",
    )


def inventory_digest(entries: Iterable[Sequence[Any]]) -> int:
    """The digest of an inventory, (key, size, sha256, version) entries of distinct keys."""
    digest = 0
    for key, size, sha256, version in entries:
        digest ^= entry_digest(key, size, sha256, version)
    return digest


def format_digest(digest: int) -> str:
    """The header's value: 16 lowercase hex digits."""
    return f"{digest:0{HEX_DIGITS}x}"


__all__ = ["HEADER", "HEX_DIGITS", "entry_digest", "format_digest", "inventory_digest"]
