"""Whether a client's idle connection is still open: the servers close a connection
left unused for ``limits.idle_timeout`` (a minute by default), and a blocking client
only learns it when its next request fails.  A client waiting for a long job on another
connection (``dsml.ml.linear_regression`` over gigabytes) then failed its next request
with ConnectionLost where a new connection would have served it.  So a request after
:data:`IDLE_CHECK` seconds without one first asks, with one ``select()``, whether the
socket is readable: with no request out, that is the server's close (or bytes nobody
asked for); either way the connection is dropped and a new one opened.
"""

from __future__ import annotations

import select
from time import monotonic
from typing import Any

__all__ = ["IDLE_CHECK", "monotonic", "stale"]

#: Seconds without a request after which a request first checks the connection.
IDLE_CHECK = 1.0


def stale(sock: Any, last: float) -> bool:
    """Whether ``sock`` (a socket, or a TlsSocket over one), whose last request began at
    ``last`` (``monotonic()``), was unused for :data:`IDLE_CHECK` seconds and has been
    closed by the server since.  False where that cannot be asked."""
    if monotonic() - last <= IDLE_CHECK:
        return False
    raw = getattr(sock, "_sock", sock)
    try:
        return bool(select.select([raw], [], [], 0)[0])
    except (OSError, ValueError, TypeError):
        return False
