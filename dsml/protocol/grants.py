"""Write grants: the master's signature on a version it issued for a key.

Versions are the master's alone to issue (docs/protocol.md, section 12).  A write reaches
the workers without the master in the path (the client streams to the first worker,
which passes the bytes on), so the master's word travels with it: ``place`` answers a
``Grant`` header that the client hands to the first worker (and each worker to the
next), and back to ``commit``; the master's repair orders carry one too.  A ``Version``
header on a write is refused from anyone, so no peer names a version of its choosing.

A grant is ``VERSION.MAC`` followed by one ``,NAME=MAC`` per worker the write was placed
on (``7.3fa0…,w2=91c4…,w1=0b7e…``), each MAC an HMAC-SHA256 (truncated to 128 bits) of the
key and the version:

* the first under the master's own secret (kept in its state, 0600, made once): the
  master checks it (``commit``);
* each ``NAME=MAC`` under that worker's own key, derived from the master's secret and
  the worker's name and given to it alone in its registration reply (``Grant-Key``): a
  worker stores a write only if the grant has an entry for its own name that checks out.

So a key a worker holds lets it sign for itself only: a name that manages to register
(a token holder, without TLS) can forge no write to any other worker.  A grant has no
expiry: it lets its holder write that one version of that one key on those workers,
which it was allowed to do anyway, and a store never goes back to an older version.

Sans-IO: :class:`Grants` (the master) and :class:`WorkerGrants` (a worker) sign and
check strings, nothing more.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable

from ..errors import DsmlError
from .limits import MAX_LINE

__all__ = ["GRANT_RE", "MAX_GRANT_WORKERS", "SECRET_BYTES", "Grants", "WorkerGrants", "new_secret"]

#: Bytes of a secret (the master's, a worker's key).
SECRET_BYTES = 32

#: Hex digits of each MAC a grant carries (128 bits).
MAC_HEX = 32

#: Most workers one grant names (a pipeline: its first worker and 16 Forward hops).
MAX_GRANT_WORKERS = 17

_NAME = r"[A-Za-z0-9_.-]{1,64}"
#: A grant on the wire: the version (1 to 18 digits, no leading zero), the master's MAC,
#: then ``,NAME=MAC`` per worker.
GRANT_RE = re.compile(
    rf"([1-9][0-9]{{0,17}})\.([0-9a-f]{{{MAC_HEX}}})"
    rf"((?:,{_NAME}=[0-9a-f]{{{MAC_HEX}}}){{0,{MAX_GRANT_WORKERS}}})\Z"
)
_ENTRY = re.compile(rf",({_NAME})=([0-9a-f]{{{MAC_HEX}}})")
_SECRET_RE = re.compile(rf"[0-9a-f]{{{2 * SECRET_BYTES}}}\Z")

# The longest grant fits a header line with room to spare.
assert 18 + 1 + MAC_HEX + MAX_GRANT_WORKERS * (2 + 64 + MAC_HEX) < MAX_LINE - 16


def new_secret() -> str:
    """A fresh secret, as hex."""
    return secrets.token_hex(SECRET_BYTES)


def _bytes(secret_hex: str) -> bytes:
    if not _SECRET_RE.match(secret_hex):
        raise ValueError(f"a grant secret is {2 * SECRET_BYTES} lowercase hex digits")
    return bytes.fromhex(secret_hex)


def _mac(secret: bytes, key: str, version: int) -> str:
    msg = b"dsml-grant\0" + key.encode("utf-8", "surrogatepass") + b"\0" + b"%d" % version
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()[:MAC_HEX]


def _parse(grant: str) -> tuple[int, str, dict[str, str]]:
    """(version, the master's MAC, {worker: MAC}); ``bad-header`` if malformed."""
    m = GRANT_RE.match(grant)
    if m is None:
        raise DsmlError("Grant must be VERSION.MAC[,NAME=MAC...], as place answered",
                        "bad-header")
    return int(m.group(1)), m.group(2), dict(_ENTRY.findall(m.group(3)))


def _forged(key: str, whose: str) -> DsmlError:
    return DsmlError(f"the Grant for {key!r} is not one the master issued {whose}", "forbidden")


class Grants:
    """The master's side: issues grants and checks them (``commit``)."""

    def __init__(self, secret_hex: str) -> None:
        self._secret = _bytes(secret_hex)

    def worker_key(self, name: str) -> str:
        """Worker ``name``'s own key (hex): what its registration reply gives it."""
        return hmac.new(
            self._secret, b"dsml-worker-key\0" + name.encode(), hashlib.sha256
        ).hexdigest()

    def issue(self, key: str, version: int, workers: Iterable[str] = ()) -> str:
        """The grant for writing ``key`` at ``version`` on ``workers``."""
        parts = [f"{version}.{_mac(self._secret, key, version)}"]
        for name in workers:
            parts.append(f"{name}={_mac(bytes.fromhex(self.worker_key(name)), key, version)}")
        return ",".join(parts)

    def version_of(self, key: str, grant: str) -> int:
        """The version ``grant`` allows for ``key``; ``forbidden`` unless the master
        signed all of it for that key."""
        version, mac, entries = _parse(grant)
        if not hmac.compare_digest(mac, _mac(self._secret, key, version)):
            raise _forged(key, "for that key")
        for name, worker_mac in entries.items():
            expected = _mac(bytes.fromhex(self.worker_key(name)), key, version)
            if not hmac.compare_digest(worker_mac, expected):
                raise _forged(key, f"for worker {name}")
        return version


class WorkerGrants:
    """A worker's side: checks that a grant lets it store a write."""

    def __init__(self, name: str, key_hex: str) -> None:
        self.name = name
        self._key = _bytes(key_hex)

    def version_of(self, key: str, grant: str) -> int:
        """The version ``grant`` lets this worker store ``key`` under; ``forbidden`` if
        it has no entry for this worker or that entry is not the master's."""
        version, _, entries = _parse(grant)
        mine = entries.get(self.name)
        if mine is None:
            raise DsmlError(
                f"the Grant for {key!r} does not name worker {self.name}: not placed here",
                "forbidden",
            )
        if not hmac.compare_digest(mine, _mac(self._key, key, version)):
            raise _forged(key, f"for worker {self.name}")
        return version
