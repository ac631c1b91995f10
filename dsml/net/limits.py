"""The connection limits of a dsml server: one frozen class, from the config file to the wire.

The ``limits`` section of the configuration (:mod:`dsml.config`) is read into
:class:`Limits`, and every dsml connection enforces that same object (docs/protocol.md,
section 8).  No Twisted here: the config module imports this one.
"""

from __future__ import annotations

from typing import Final

import attrs

#: Default connection limits (docs/protocol.md, section 8).
DEFAULT_MAX_CONNECTIONS: Final = 1024
DEFAULT_MAX_UNAUTHENTICATED: Final = 64
DEFAULT_AUTH_TIMEOUT: Final = 10.0
DEFAULT_HEAD_TIMEOUT: Final = 10.0
DEFAULT_IDLE_TIMEOUT: Final = 60.0
DEFAULT_PAYLOAD_TIMEOUT: Final = 60.0
DEFAULT_MAX_UNAUTHENTICATED_PER_HOST: Final = 16
DEFAULT_PAYLOAD_MIN_RATE: Final = 64 * 1024
DEFAULT_PAYLOAD_TOTAL_TIMEOUT: Final = 300.0


@attrs.frozen
class Limits:
    """Connection limits every dsml server enforces (the ``limits`` section of the config)."""

    #: Most simultaneous authenticated connections a server keeps (unauthenticated ones
    #: are counted apart and never take one of these places).
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: Most connections that have not yet authenticated; a new one over it closes the
    #: oldest of them.
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED
    #: Most unauthenticated connections from one source address; a new one over it
    #: closes that address's oldest.
    max_unauthenticated_per_host: int = DEFAULT_MAX_UNAUTHENTICATED_PER_HOST
    #: Seconds a new connection has to authenticate before it is closed.
    auth_timeout: float = DEFAULT_AUTH_TIMEOUT
    #: Seconds a peer has to finish a message's header block once it has started it.
    head_timeout: float = DEFAULT_HEAD_TIMEOUT
    #: Seconds a connection may sit with no request in progress.
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    #: Seconds a payload transfer may go without any progress.
    payload_timeout: float = DEFAULT_PAYLOAD_TIMEOUT
    #: Seconds a request's payload may take in all, however it trickles, on top of its
    #: size at ``payload_min_rate``: a payload of ``n`` bytes must be whole within
    #: ``payload_total_timeout + n / payload_min_rate`` seconds of its head.
    payload_total_timeout: float = DEFAULT_PAYLOAD_TOTAL_TIMEOUT
    #: Bytes per second of that allowance (0: no such deadline).
    payload_min_rate: float = DEFAULT_PAYLOAD_MIN_RATE
